//! Daemon and client configuration: `config.toml` plus `AMQP_RPC__SECTION__KEY` overrides.
//!
//! Every key has a named default, so an empty file is a working config. [`load`] merges the file
//! and the environment (through the `config` crate) and reports *every* problem at once: each key
//! is read on its own, so one bad value does not hide the next, and semantic checks
//! ([`Config::validate`]) run on top. Secrets never appear in `Debug` output or in problems:
//! URLs are shown through [`redact_url`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

pub use crate::secret::{redact_text, redact_url, split_urls, url_secrets};
pub use sections::{
    AmqpConfig, Declare, HttpConfig, LogConfig, LogFormat, QueueType, ServiceConfig,
    ShutdownConfig, TelemetryConfig,
};

mod sections;
pub mod telemetry;

/// Environment prefix: `AMQP_RPC__AMQP__URL` sets `amqp.url`.
pub const ENV_PREFIX: &str = "AMQP_RPC";

/// A config that could not be loaded: every problem found, one per entry.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    /// Human-readable problems, each naming its key.
    pub problems: Vec<String>,
}
/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Broker connection.
    pub amqp: AmqpConfig,
    /// Service queue and work limits.
    pub service: ServiceConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// HTTP endpoints.
    pub http: HttpConfig,
    /// Logging.
    pub log: LogConfig,
    /// Trace export.
    pub telemetry: TelemetryConfig,
    /// The program's own sections, kept for [`Config::section`].
    #[serde(skip)]
    apps: AppSections,
}

/// Sections a program adds to ours (see [`load_with`]), as loaded; their keys are the
/// program's business, so `Debug` shows only their names.
#[derive(Clone, Default, PartialEq)]
struct AppSections(BTreeMap<String, config::Value>);

impl fmt::Debug for AppSections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

const SECTIONS: &[&str] = &["amqp", "service", "shutdown", "http", "log", "telemetry"];

/// Load `path` (optional) and the process environment, then validate.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    load_with_env(path, None)
}

/// Like [`load`], with the environment given explicitly (`None` = the process environment);
/// tests use it so they never touch global state.
pub fn load_with_env(
    path: Option<&Path>,
    env: Option<HashMap<String, String>>,
) -> Result<Config, ConfigError> {
    load_with(path, env, &[])
}

/// Like [`load_with_env`], accepting the program's own sections `apps` next to ours, from the
/// same file and environment (`[fib]` and `AMQP_RPC__FIB__MAX_N` for a section `fib`); read
/// each with [`Config::section`]. Any other section is still a problem.
pub fn load_with(
    path: Option<&Path>,
    env: Option<HashMap<String, String>>,
    apps: &[&str],
) -> Result<Config, ConfigError> {
    load_parts(path, env, apps).0
}

/// Like [`load_with`] for a program with one section of its own, `name`, read as `A`: its
/// problems are reported with ours, all at once (`--check-config` lists every one).
///
/// ```
/// #[derive(Default, serde::Deserialize)]
/// #[serde(default, deny_unknown_fields)]
/// struct Inventory { max_items: u32 }
///
/// let env = [("AMQP_RPC__INVENTORY__MAX_ITEMS".to_owned(), "12".to_owned())];
/// let (config, inventory): (_, Inventory) =
///     amqp_rpc::config::load_with_section(None, Some(env.into()), "inventory")?;
/// assert_eq!(inventory.max_items, 12);
/// assert_eq!(config.service.queue, "rpc_queue");
/// # Ok::<(), amqp_rpc::config::ConfigError>(())
/// ```
pub fn load_with_section<A: serde::de::DeserializeOwned + Default>(
    path: Option<&Path>,
    env: Option<HashMap<String, String>>,
    name: &str,
) -> Result<(Config, A), ConfigError> {
    let (ours, apps) = load_parts(path, env, &[name]);
    let theirs = section_of(&apps, name);
    match (ours, theirs) {
        (Ok(config), Ok(app)) => Ok((config, app)),
        (ours, theirs) => {
            let mut problems = ours.err().map(|e| e.problems).unwrap_or_default();
            problems.extend(theirs.err().map(|e| e.problems).unwrap_or_default());
            Err(ConfigError { problems })
        }
    }
}

/// The program's section `name` from `apps`, as `T`; its defaults when absent.
fn section_of<T: serde::de::DeserializeOwned + Default>(
    apps: &BTreeMap<String, config::Value>,
    name: &str,
) -> Result<T, ConfigError> {
    match apps.get(name) {
        None => Ok(T::default()),
        Some(value) => value.clone().try_deserialize().map_err(|e| ConfigError {
            problems: vec![format!("{name}: {}", redact_text(&e.to_string()))],
        }),
    }
}

/// Our config, and the program's sections as loaded whatever became of ours.
fn load_parts(
    path: Option<&Path>,
    env: Option<HashMap<String, String>>,
    apps: &[&str],
) -> (Result<Config, ConfigError>, BTreeMap<String, config::Value>) {
    let mut builder = config::Config::builder();
    if let Some(path) = path {
        builder = builder.add_source(config::File::from(path).required(true));
    }
    let environment = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .source(env);
    let cfg = match builder.add_source(environment).build() {
        Ok(cfg) => cfg,
        Err(e) => {
            let problems = vec![redact_text(&e.to_string())];
            return (Err(ConfigError { problems }), BTreeMap::new());
        }
    };

    let mut problems = Vec::new();
    // The whole tree as a map (`get_table("")` finds no root key).
    let mut root = cfg
        .clone()
        .try_deserialize::<config::Map<String, config::Value>>()
        .unwrap_or_default();
    for k in root.keys() {
        if !SECTIONS.contains(&k.as_str()) && !apps.contains(&k.as_str()) {
            problems.push(format!("{k}: unknown section"));
        }
    }
    AmqpConfig::key_problems(&cfg, &mut problems);
    ServiceConfig::key_problems(&cfg, &mut problems);
    ShutdownConfig::key_problems(&cfg, &mut problems);
    HttpConfig::key_problems(&cfg, &mut problems);
    LogConfig::key_problems(&cfg, &mut problems);
    TelemetryConfig::key_problems(&cfg, &mut problems);
    let app_sections: BTreeMap<String, config::Value> = apps
        .iter()
        .filter_map(|name| root.remove_entry(*name))
        .collect();
    if !problems.is_empty() {
        return (Err(ConfigError { problems }), app_sections);
    }
    let ours = config::Value::from(root)
        .try_deserialize::<Config>()
        .map_err(|e| ConfigError {
            problems: vec![redact_text(&e.to_string())],
        })
        .and_then(|mut config| {
            config.apps = AppSections(app_sections.clone());
            config.validate().map(|()| config)
        });
    (ours, app_sections)
}

impl Config {
    /// The program's own section `name` (see [`load_with`]) as `T`; its defaults when the
    /// file and the environment set none of it. Every problem names the section.
    pub fn section<T: serde::de::DeserializeOwned + Default>(
        &self,
        name: &str,
    ) -> Result<T, ConfigError> {
        section_of(&self.apps.0, name)
    }

    /// Semantic checks on top of the types; returns every problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        let s = &self.service;
        if let Err(e) = self.amqp.file_password() {
            p.push(e);
        }
        let urls = self.amqp.urls();
        if urls.is_empty() {
            p.push("amqp.url: no URL given".into());
        }
        for url in urls {
            if let Err(e) = url.parse::<lapin::uri::AMQPUri>() {
                p.push(format!(
                    "amqp.url: {:?} is not an AMQP URL: {}",
                    redact_url(&url),
                    redact_text(&e)
                ));
            }
        }
        if self.amqp.heartbeat_secs == 0 {
            p.push(
                "amqp.heartbeat_secs: must be at least 1 (a dead socket must be noticed)".into(),
            );
        }
        if self.amqp.connect_timeout_secs == 0 {
            p.push("amqp.connect_timeout_secs: must be at least 1".into());
        }
        if self.amqp.reconnect_max_backoff_secs == 0 {
            p.push("amqp.reconnect_max_backoff_secs: must be at least 1".into());
        }
        if let Err(e) = crate::tls::load(&self.amqp) {
            p.push(e);
        }
        if s.queue.is_empty() || s.queue.len() > 255 {
            p.push("service.queue: must be 1 to 255 bytes".into());
        } else if s.queue.starts_with("amq.") {
            p.push("service.queue: names starting with \"amq.\" are reserved by the broker".into());
        }
        if s.prefetch == 0 {
            p.push("service.prefetch: must be at least 1 (0 would mean unbounded)".into());
        }
        if s.max_body_bytes == 0 || s.max_body_bytes > 16 * 1024 * 1024 {
            p.push("service.max_body_bytes: must be 1 to 16777216".into());
        }
        if s.max_deliveries == 0 {
            p.push("service.max_deliveries: must be at least 1".into());
        }
        if s.reply_cache_entries == 0 {
            p.push(
                "service.reply_cache_entries: must be at least 1 (the reply cache makes \
                 redelivery idempotent)"
                    .into(),
            );
        }
        if let Err(e) = crate::reply_to::ReplyToPolicy::parse(&s.reply_to) {
            p.push(format!("service.reply_to: {e}"));
        }
        for (method, users) in &s.callers {
            if users.iter().any(|u| u.is_empty()) {
                p.push(format!(
                    "service.callers.{method}: an empty user name matches no caller"
                ));
            }
        }
        if s.reply_cache_ttl_secs == 0 {
            p.push("service.reply_cache_ttl_secs: must be at least 1".into());
        }
        if s.dead_letter_queue == s.queue {
            p.push("service.dead_letter_queue: must differ from service.queue".into());
        }
        if !self.http.listen.is_empty() && self.http.listen.parse::<SocketAddr>().is_err() {
            p.push(format!(
                "http.listen: {:?} is not an address like 127.0.0.1:9090",
                self.http.listen
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            p.push(format!("log.level: {:?}: {e}", self.log.level));
        }
        // The keys only: the OTEL_* variables are the binaries' to read (an application with
        // telemetry of its own may set them for another exporter).
        if let Err(problems) = self.telemetry.resolve("", |_| None) {
            p.extend(problems);
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems: p })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_are_valid() {
        let c = load_with_env(None, env(&[])).expect("defaults load");
        assert_eq!(c, Config::default());
        assert_eq!(c.service.queue, "rpc_queue");
    }

    #[test]
    fn shipped_config_toml_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        // config.toml is amqp-rpcd's: ours and its demo method's `[fib]`.
        let c = load_with(Some(&path), env(&[]), &["fib"]).expect("config.toml loads");
        assert_eq!(
            c.amqp,
            Config::default().amqp,
            "config.toml documents the defaults"
        );
        assert_eq!(c.service, Config::default().service);
        assert_eq!(c.shutdown, Config::default().shutdown);
        assert_eq!(c.http, Config::default().http);
        assert_eq!(c.log, Config::default().log);
        assert_eq!(c.telemetry, Config::default().telemetry);
        let unknown = load_with_env(Some(&path), env(&[])).unwrap_err();
        assert_eq!(
            unknown.problems,
            ["fib: unknown section"],
            "only to those who know it"
        );
    }

    #[test]
    fn env_overrides_and_every_bad_value_is_reported() {
        let c = load_with_env(
            None,
            env(&[
                ("AMQP_RPC__SERVICE__QUEUE", "q1"),
                ("AMQP_RPC__SERVICE__PREFETCH", "7"),
            ]),
        )
        .unwrap();
        assert_eq!((c.service.queue.as_str(), c.service.prefetch), ("q1", 7));

        let err = load_with_env(
            None,
            env(&[
                ("AMQP_RPC__SERVICE__PREFETCH", "lots"),
                ("AMQP_RPC__SERVICE__QUEUE_TYPE", "stream"),
                ("AMQP_RPC__LOG__FORMAT", "xml"),
                ("AMQP_RPC__SERVICE__CONCURENCY", "2"),
            ]),
        )
        .unwrap_err();
        let all = err.problems.join("\n");
        for key in [
            "service.prefetch",
            "service.queue_type",
            "log.format",
            "service.concurency",
        ] {
            assert!(all.contains(key), "{key} missing from {all}");
        }
    }

    #[test]
    fn semantic_problems_are_all_listed_and_never_leak_the_password() {
        let err = load_with_env(
            None,
            env(&[
                ("AMQP_RPC__AMQP__URL", "http://bob:s3cr3t@host/"),
                ("AMQP_RPC__SERVICE__PREFETCH", "0"),
                ("AMQP_RPC__HTTP__LISTEN", "nowhere"),
            ]),
        )
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 3, "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
    }

    #[test]
    fn several_urls() {
        let a = AmqpConfig {
            url: " amqp://a:1@h1 , amqp://a:1@h2,".into(),
            ..AmqpConfig::default()
        };
        assert_eq!(a.urls(), vec!["amqp://a:1@h1", "amqp://a:1@h2"]);
    }
}
