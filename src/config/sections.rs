//! The sections of [`Config`](super::Config): their keys, defaults and per-key checks.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use super::{redact_text, redact_url, split_urls, url_secrets};

/// Queue flavour of the service queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
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
#[non_exhaustive]
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
#[non_exhaustive]
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

            pub(super) fn key_problems(cfg: &config::Config, problems: &mut Vec<String>) {
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
        /// Unacknowledged deliveries the broker may push to this daemon. Well above the
        /// callers' usual concurrency: a request holds its slot until its reply is confirmed
        /// and its ack is sent, a while after the caller has its answer.
        prefetch: u16 = 256,
        /// The method a request without a `type` gets (the RabbitMQ tutorial's clients send
        /// none); empty = the program's own choice (`amqp-rpcd`: `fib`), if it made one.
        default_method: String = String::new(),
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
        /// The reply queues replies may go to, comma-separated: names, `prefix*`, or `*` for
        /// any. A request naming another `reply_to` is acked without work and counted
        /// (`rejected{reason="reply_to_refused"}`). The default is direct reply-to and
        /// server-named queues; add the names of clients' named reply queues.
        reply_to: String = crate::reply_to::DEFAULT_REPLY_TO.into(),
        /// Methods that answer only some callers: method name -> the `user_id`s allowed (the
        /// broker validates `user_id` against the connection's user). Others get
        /// `permission_denied`; methods not listed answer anyone.
        callers: std::collections::HashMap<String, Vec<String>> = Default::default(),
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

section!(
    /// `[telemetry]`: trace export, OTLP over HTTP/protobuf (see [`super::telemetry`]). The
    /// standard `OTEL_*` variables win over these keys.
    TelemetryConfig, "telemetry" {
        /// Export traces. `OTEL_TRACES_EXPORTER=otlp` turns it on and `=none` off;
        /// `OTEL_SDK_DISABLED=true` turns it off.
        enabled: bool = false,
        /// The collector's base URL; `/v1/traces` is appended. `OTEL_EXPORTER_OTLP_ENDPOINT`
        /// wins, and `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as it is) over both.
        endpoint: String = "http://localhost:4318".into(),
        /// The spans' `service.name`; empty = the program's name. `OTEL_SERVICE_NAME` wins.
        service_name: String = String::new(),
        /// `parentbased_always_on`, `parentbased_always_off`, `parentbased_traceidratio`,
        /// `always_on`, `always_off` or `traceidratio`. `OTEL_TRACES_SAMPLER` wins.
        sampler: String = "parentbased_always_on".into(),
        /// The share of traces the `*traceidratio` samplers keep, 0 to 1.
        /// `OTEL_TRACES_SAMPLER_ARG` wins.
        sampler_ratio: f64 = 1.0,
    }
);

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
    ServiceConfig { queue, queue_type, declare, concurrency, prefetch, default_method, max_body_bytes, max_deliveries,
        reply_cache_entries, reply_cache_ttl_secs, confirm_replies, dead_letter_queue, reply_to, callers }
    ShutdownConfig { grace_secs }
    HttpConfig { listen }
    LogConfig { level, format }
    TelemetryConfig { enabled, endpoint, service_name, sampler, sampler_ratio }
}
