//! Daemon and client configuration: `config.toml` plus `AMQP_RPC__SECTION__KEY` overrides.
//!
//! Every key has a named default, so an empty file is a working config. [`load`] merges the file
//! and the environment (through the `config` crate) and reports *every* problem at once: each key
//! is read on its own, so one bad value does not hide the next, and semantic checks
//! ([`Config::validate`]) run on top. Secrets never appear in `Debug` output or in problems:
//! URLs are shown through [`redact_url`].

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::secret::{redact_text, redact_url, split_urls, url_secrets};

/// Environment prefix: `AMQP_RPC__AMQP__URL` sets `amqp.url`.
pub const ENV_PREFIX: &str = "AMQP_RPC";

/// A config that could not be loaded: every problem found, one per entry.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    /// Human-readable problems, each naming its key.
    pub problems: Vec<String>,
}

/// Queue flavour of the service queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Classic queue, declared durable with no arguments (RabbitMQ 4.3 deprecates
    /// non-durable, non-exclusive queues).
    #[default]
    Classic,
    /// Replicated quorum queue (durable by nature), for clusters.
    Quorum,
}

/// How the daemon treats the service queue (`service.declare`, see [`crate::queue`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Declare {
    /// Serve a queue that exists as it is, whatever its type and arguments, and say what it
    /// is; declare a missing one in the `queue_type` shape.
    #[default]
    Auto,
    /// Declare the `queue_type` shape; a queue that exists in another shape is a fatal clash
    /// (exit 78), for deployments where the config is the truth.
    Strict,
    /// Never declare: the queue is the operator's (definitions, policies). A missing queue
    /// is waited for.
    Never,
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Declares a config section: the struct, its defaults, and a per-key checker so that every bad
/// key is reported rather than only the first one serde trips over.
macro_rules! section {
    ($(#[$sm:meta])* $name:ident, $section:literal {
        $( $(#[$fm:meta])* $field:ident : $ty:ty = $default:expr ),* $(,)?
    }) => {
        $(#[$sm])*
        #[derive(Clone, Deserialize, PartialEq)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name { $( $(#[$fm])* pub $field: $ty ),* }

        impl Default for $name {
            fn default() -> Self { $name { $( $field: $default ),* } }
        }

        impl $name {
            const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];

            fn key_problems(cfg: &config::Config, problems: &mut Vec<String>) {
                $(
                    let key = concat!($section, ".", stringify!($field));
                    match cfg.get::<$ty>(key) {
                        Ok(_) | Err(config::ConfigError::NotFound(_)) => {}
                        Err(e) => problems.push(format!("{key}: {}", redact_text(&e.to_string()))),
                    }
                )*
                if let Ok(table) = cfg.get_table($section) {
                    for k in table.keys().filter(|k| !Self::KEYS.contains(&k.as_str())) {
                        problems.push(format!("{}.{k}: unknown key", $section));
                    }
                }
            }
        }
    };
}

section!(
    /// `[amqp]`: how to reach the broker.
    AmqpConfig, "amqp" {
        /// One or more `amqp://` / `amqps://` URLs of one cluster, comma-separated.
        url: String = "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
        /// File holding the password; replaces the URLs' password when set.
        password_file: Option<PathBuf> = None,
        /// Heartbeat interval negotiated with the broker; a silent peer is detected in two.
        heartbeat_secs: u16 = 10,
        /// TCP + AMQP handshake timeout per attempt.
        connect_timeout_secs: u64 = 5,
        /// Cap of the exponential reconnect backoff.
        reconnect_max_backoff_secs: u64 = 30,
        /// Run lapin's socket loop on a thread of its own (lapin's default) rather than as a
        /// task of the tokio runtime (see `crate::amqp`).
        io_thread: bool = false,
        /// PEM file of the CA(s) that signed the broker's certificate (`amqps://`); unset =
        /// the system's trust store.
        tls_ca_file: Option<PathBuf> = None,
        /// PEM client certificate, for brokers that require one (with `tls_key_file`).
        tls_cert_file: Option<PathBuf> = None,
        /// PEM (PKCS#8) private key of `tls_cert_file`.
        tls_key_file: Option<PathBuf> = None,
    }
);

section!(
    /// `[service]`: the queue and the limits of the work.
    ServiceConfig, "service" {
        /// Service queue name (routing key on the default exchange).
        queue: String = "rpc_queue".into(),
        /// `classic` or `quorum`: the shape a missing queue is declared in.
        queue_type: QueueType = QueueType::Classic,
        /// `auto`, `strict` or `never` (see [`Declare`]).
        declare: Declare = Declare::Auto,
        /// CPU-heavy handlers running at once; 0 = number of CPUs.
        concurrency: usize = 0,
        /// Unacknowledged deliveries the broker may push to this daemon.
        prefetch: u16 = 64,
        /// Largest `n` the fib method accepts.
        max_n: u64 = 100_000,
        /// Largest request body accepted, in bytes.
        max_body_bytes: usize = 1024,
        /// Attempts before a request is declared poison.
        max_deliveries: u32 = 5,
        /// Reply cache capacity (entries).
        reply_cache_entries: u64 = 10_000,
        /// Reply cache entry lifetime.
        reply_cache_ttl_secs: u64 = 300,
        /// Ack a request only once the broker confirmed its reply (publisher confirms). When
        /// false, the reply goes out on the consume channel and its ack once it is written:
        /// the broker acts on the ack only after routing the reply, but a node failure can
        /// lose a routed reply.
        confirm_replies: bool = true,
        /// Queue that receives copies of poison requests; empty = none.
        dead_letter_queue: String = String::new(),
    }
);

section!(
    /// `[shutdown]`: graceful drain.
    ShutdownConfig, "shutdown" {
        /// How long in-flight requests may take to finish after SIGTERM.
        grace_secs: u64 = 20,
    }
);

section!(
    /// `[http]`: metrics and probes.
    HttpConfig, "http" {
        /// Listen address for `/metrics`, `/healthz`, `/readyz`; empty disables the listener.
        listen: String = "127.0.0.1:9090".into(),
    }
);

section!(
    /// `[log]`: tracing output.
    LogConfig, "log" {
        /// An `EnvFilter` directive (`info`, `amqp_rpc=debug,lapin=warn`, ...); `RUST_LOG` wins.
        /// The default silences `lapin::channel`, which logs every channel the broker closes
        /// as an error, the daemon's own probes of its queue included (a passive declare of a
        /// missing queue, the comparison with one of another shape); the daemon says what each
        /// means itself, and a channel lost while serving ends in its own warning.
        level: String = "info,lapin::channel=off".into(),
        /// `text` or `json`.
        format: LogFormat = LogFormat::Text,
    }
);

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
}

const SECTIONS: &[&str] = &["amqp", "service", "shutdown", "http", "log"];

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
    let mut builder = config::Config::builder();
    if let Some(path) = path {
        builder = builder.add_source(config::File::from(path).required(true));
    }
    let environment = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .source(env);
    let cfg = builder
        .add_source(environment)
        .build()
        .map_err(|e| ConfigError {
            problems: vec![redact_text(&e.to_string())],
        })?;

    let mut problems = Vec::new();
    if let Ok(root) = cfg.get_table("") {
        for k in root.keys().filter(|k| !SECTIONS.contains(&k.as_str())) {
            problems.push(format!("{k}: unknown section"));
        }
    }
    AmqpConfig::key_problems(&cfg, &mut problems);
    ServiceConfig::key_problems(&cfg, &mut problems);
    ShutdownConfig::key_problems(&cfg, &mut problems);
    HttpConfig::key_problems(&cfg, &mut problems);
    LogConfig::key_problems(&cfg, &mut problems);
    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    let config: Config = cfg.try_deserialize().map_err(|e| ConfigError {
        problems: vec![redact_text(&e.to_string())],
    })?;
    config.validate().map(|()| config)
}

impl Config {
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
        if s.max_n > 10_000_000 {
            p.push("service.max_n: at most 10000000 (fib of that has ~2 million digits)".into());
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
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems: p })
        }
    }
}

impl AmqpConfig {
    /// The broker URLs as configured (comma-separated list split, blanks dropped).
    pub fn urls(&self) -> Vec<String> {
        split_urls(&self.url).map(str::to_owned).collect()
    }

    /// The password from `password_file`, when one is configured (trailing newline dropped).
    pub fn file_password(&self) -> Result<Option<String>, String> {
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("amqp.password_file: cannot read {}: {e}", path.display()))?;
        Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()))
    }

    /// Every secret the logs must never show: the URLs' passwords and the file's.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets = url_secrets(&self.urls());
        if let Ok(Some(pw)) = self.file_password() {
            secrets.push(pw);
        }
        secrets
    }
}

impl ServiceConfig {
    /// Handlers allowed at once, resolving 0 to the number of CPUs.
    pub fn effective_concurrency(&self) -> usize {
        match self.concurrency {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact_url(&self.url))
            .field("password_file", &self.password_file)
            .field("heartbeat_secs", &self.heartbeat_secs)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .field(
                "reconnect_max_backoff_secs",
                &self.reconnect_max_backoff_secs,
            )
            .field("io_thread", &self.io_thread)
            .finish()
    }
}

macro_rules! plain_debug {
    ($($name:ident { $($field:ident),* })*) => {$(
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($name)) $(.field(stringify!($field), &self.$field))* .finish()
            }
        }
    )*};
}

plain_debug! {
    ServiceConfig { queue, queue_type, declare, concurrency, prefetch, max_n, max_body_bytes, max_deliveries,
        reply_cache_entries, reply_cache_ttl_secs, confirm_replies, dead_letter_queue }
    ShutdownConfig { grace_secs }
    HttpConfig { listen }
    LogConfig { level, format }
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
        let c = load_with_env(Some(&path), env(&[])).expect("config.toml loads");
        assert_eq!(c, Config::default(), "config.toml documents the defaults");
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
