//! Broker plumbing shared by the daemon and the client: connecting with backoff across a list
//! of brokers, and probing the service queue (the daemon's declaration policy is
//! [`crate::queue`]).
//!
//! TCP_NODELAY is set by lapin's tokio reactor on every socket (async-rs `set_nodelay(true)`),
//! heartbeats are requested through the URI so a dead peer is noticed, and every attempt is
//! bounded by the connect timeout so a blackholed address cannot stall the rotation.
//!
//! lapin's socket loop runs as a task of the caller's tokio runtime, not on the thread lapin
//! gives it by default (`amqp.io_thread = false`; `vendor/lapin` carries that option). On its
//! own thread every incoming frame crosses threads twice (the runtime's reactor wakes the I/O
//! thread, which wakes the task the frame is for) and every publish wakes the I/O thread once
//! more. Those wake-ups were most of a call's cost at one call in flight (BENCHMARKS.md). As a
//! task, a frame is read, parsed and handed over on the thread that then runs its consumer.
//! It asks one thing of the application: not to block the runtime's threads, which this crate
//! never does (heavy work runs on the blocking pool).
//!
//! The option exists only in the patched lapin, which Cargo uses only where the workspace root
//! carries `[patch.crates-io] lapin = { path = ".../vendor/lapin" }` (this repository does). A
//! crate that depends on amqp-rpc without it builds against crates.io's lapin: `build.rs` then
//! leaves `cfg(lapin_io_loop_on_runtime)` unset, and the socket loop stays on lapin's thread
//! whatever `amqp.io_thread` says (logged once). [`io_loop_on_runtime_available`] tells which
//! build this is; docs/LIBRARY.md says how a dependent gets the faster mode.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind};
use tokio_util::sync::CancellationToken;

use crate::config::{redact_text, redact_url, AmqpConfig};

/// First reconnect delay; doubles up to the configured cap.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

/// Whether the lapin this crate was built against can run its socket loop as a task of the
/// runtime (`ConnectionProperties::with_io_loop_on_runtime`, added by `vendor/lapin`).
///
/// True in this repository's own workspace, which patches lapin. False in a crate that depends
/// on amqp-rpc without that `[patch.crates-io]` entry in its own workspace root: there
/// `amqp.io_thread = false` still runs the loop on lapin's thread (docs/LIBRARY.md).
pub const fn io_loop_on_runtime_available() -> bool {
    cfg!(lapin_io_loop_on_runtime)
}

/// Whether connections made with `amqp` run lapin's socket loop as a task of the runtime:
/// `amqp.io_thread = false` and [`io_loop_on_runtime_available`].
pub fn io_loop_on_runtime(amqp: &AmqpConfig) -> bool {
    !amqp.io_thread && io_loop_on_runtime_available()
}

/// `props` with the socket loop placed as `io_thread` asks, where this build's lapin can.
#[cfg(lapin_io_loop_on_runtime)]
fn place_io_loop(props: ConnectionProperties, io_thread: bool) -> ConnectionProperties {
    props.with_io_loop_on_runtime(!io_thread)
}

/// `props` unchanged: this build's lapin always runs the socket loop on its own thread.
#[cfg(not(lapin_io_loop_on_runtime))]
fn place_io_loop(props: ConnectionProperties, _io_thread: bool) -> ConnectionProperties {
    props
}

/// Say once per process that `amqp.io_thread = false` cannot be honoured, why, and the fix.
fn note_io_loop_fallback(amqp: &AmqpConfig) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if amqp.io_thread || io_loop_on_runtime_available() {
        return;
    }
    ONCE.call_once(|| {
        tracing::info!(
            "lapin's socket loop runs on lapin's own I/O thread, not as a task of the runtime \
             (amqp.io_thread = false): this build uses crates.io's lapin, which lacks the option \
             amqp-rpc's vendored lapin adds. For the faster mode, add `[patch.crates-io] lapin = \
             {{ path = \"<amqp-rpc checkout>/vendor/lapin\" }}` to your workspace's root \
             Cargo.toml (amqp-rpc's docs/LIBRARY.md)"
        );
    });
}

/// Errors of connection set-up that no retry can fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// A URL that does not parse (the message never contains the password).
    #[error("amqp.url: {url:?} is not an AMQP URL: {reason}")]
    BadUrl {
        /// The redacted URL.
        url: String,
        /// What the parser said.
        reason: String,
    },
    /// The service queue exists with other arguments than ours.
    #[error(
        "queue {queue:?} already exists with different settings ({detail}), and \
         service.declare = \"strict\". Fix: set service.declare = \"auto\" to serve the queue \
         as it is, or make service.queue_type and service.dead_letter_queue match it, or delete \
         it (rabbitmqctl delete_queue {queue}; its messages are lost) so it is redeclared, or \
         pick another service.queue"
    )]
    QueueClash {
        /// Queue name.
        queue: String,
        /// The broker's own description of the difference.
        detail: String,
    },
}

/// Connects to one of several brokers, rotating on failure, with capped exponential backoff and
/// full jitter between rounds so a fleet of daemons does not reconnect in lockstep.
#[derive(Debug)]
pub struct Connector {
    uris: Vec<(AMQPUri, String)>,
    connect_timeout: Duration,
    max_backoff: Duration,
    name: String,
    next: usize,
    tls: OwnedTLSConfig,
    io_thread: bool,
}

/// The largest frame our connections ask for (see [`Connector::new`]).
pub const FRAME_MAX: u32 = 16 * 1024;

impl Connector {
    /// Build from the `[amqp]` section; `name` is shown in the broker's connection list.
    pub fn new(amqp: &AmqpConfig, name: &str) -> Result<Self, SetupError> {
        let password = amqp.file_password().map_err(|reason| SetupError::BadUrl {
            url: redact_url(&amqp.url),
            reason,
        })?;
        let uris = amqp
            .urls()
            .iter()
            .map(|url| {
                let mut uri: AMQPUri =
                    url.parse().map_err(|reason: String| SetupError::BadUrl {
                        url: redact_url(url),
                        reason: redact_text(&reason),
                    })?;
                uri.query.heartbeat.get_or_insert(amqp.heartbeat_secs);
                // lapin gives each connection a read and a write buffer of 32 frames, so the
                // broker's default frame_max (128 KiB) costs 8 MiB per connection, touched
                // as it is used. RPC bodies are small (max_body_bytes: 1 KiB by default); a
                // larger one simply goes in several frames. A URL's own frame_max wins.
                uri.query.frame_max.get_or_insert(FRAME_MAX);
                // On the parsed URI, so any character works and a URL without a password
                // (amqp://user@host) gets it too.
                if let Some(pw) = &password {
                    uri.authority.userinfo.password = pw.clone();
                }
                Ok((uri, redact_url(url)))
            })
            .collect::<Result<Vec<_>, SetupError>>()?;
        if uris.is_empty() {
            return Err(SetupError::BadUrl {
                url: String::new(),
                reason: "no URL given".into(),
            });
        }
        note_io_loop_fallback(amqp);
        Ok(Connector {
            uris,
            connect_timeout: Duration::from_secs(amqp.connect_timeout_secs),
            max_backoff: Duration::from_secs(amqp.reconnect_max_backoff_secs),
            name: name.to_owned(),
            next: 0,
            io_thread: amqp.io_thread,
            tls: crate::tls::load(amqp).map_err(|reason| SetupError::BadUrl {
                url: redact_url(&amqp.url),
                reason,
            })?,
        })
    }

    /// How many brokers the rotation holds.
    pub fn brokers(&self) -> usize {
        self.uris.len()
    }

    /// One attempt against the next broker in the rotation.
    pub async fn connect_once(&mut self) -> Result<Connection, String> {
        let (uri, shown) = self.uris[self.next].clone();
        self.next = (self.next + 1) % self.uris.len();
        let props = ConnectionProperties::default().with_connection_name(self.name.clone().into());
        let props = place_io_loop(props, self.io_thread);
        let tls = self.tls.clone();
        let connect = async move {
            let runtime = lapin::runtime::default_runtime()?;
            Connection::connect_uri_with_config(uri, props, tls, runtime).await
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(conn)) => {
                tracing::info!(url = %shown, "connected to broker");
                Ok(conn)
            }
            Ok(Err(e)) => Err(format!("{shown}: {e}")),
            Err(_) => Err(format!(
                "{shown}: no answer within {:?}",
                self.connect_timeout
            )),
        }
    }

    /// Try until connected or `cancel` fires (then `None`). Each full pass over the list is
    /// followed by a backoff sleep; `on_failure` sees every failed attempt's message.
    pub async fn connect(
        &mut self,
        cancel: &CancellationToken,
        mut on_failure: impl FnMut(&str),
    ) -> Option<Connection> {
        let mut backoff = INITIAL_BACKOFF;
        loop {
            for _ in 0..self.uris.len() {
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    r = self.connect_once() => match r {
                        Ok(conn) => return Some(conn),
                        Err(e) => {
                            tracing::warn!(error = %e, "broker connection attempt failed");
                            on_failure(&e);
                        }
                    },
                }
            }
            let sleep = jittered(backoff);
            tracing::debug!(?sleep, "backing off before the next connection round");
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(sleep) => {}
            }
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }
}

/// Full jitter in [d/2, d]: spreads reconnects without ever waiting longer than the cap.
pub fn jittered(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(fastrand::f64())
}

/// Why a declaration failed: fatal (fix the config) or a broker hiccup (retry).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeclareError {
    /// No retry will fix it.
    #[error(transparent)]
    Fatal(#[from] SetupError),
    /// The connection or channel failed; retry after reconnecting.
    #[error("broker error while declaring: {0}")]
    Broker(#[from] lapin::Error),
    /// `service.declare = "never"` and the queue does not exist (yet): retry later.
    #[error("queue {0:?} does not exist, and service.declare = \"never\": waiting for it to be declared")]
    Missing(String),
}

/// What a passive declare says about a service queue.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueProbe {
    /// The queue exists; with this many consumers.
    Consumers(u32),
    /// The queue does not exist.
    Missing,
}

/// Passive declare. A missing queue closes the channel (404), so callers keep a channel just for
/// probing and reopen it after `Missing`.
pub async fn probe_queue(channel: &Channel, queue: &str) -> Result<QueueProbe, lapin::Error> {
    match channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
    {
        Ok(q) => Ok(QueueProbe::Consumers(q.consumer_count())),
        Err(e) if matches!(soft_error(&e), Some((AMQPSoftError::NOTFOUND, _))) => {
            Ok(QueueProbe::Missing)
        }
        Err(e) => Err(e),
    }
}

/// The channel-level AMQP error inside a lapin error, with the broker's text.
pub fn soft_error(e: &lapin::Error) -> Option<(AMQPSoftError, String)> {
    match e.kind() {
        ErrorKind::ProtocolError(err) => match err.kind() {
            AMQPErrorKind::Soft(soft) => Some((soft.clone(), err.get_message().to_string())),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_bounds() {
        for _ in 0..1000 {
            let j = jittered(Duration::from_millis(1000));
            assert!(j >= Duration::from_millis(500) && j <= Duration::from_millis(1000));
        }
    }

    #[test]
    fn connector_rotates_and_sets_heartbeat() {
        let amqp = AmqpConfig {
            url: "amqp://u:pw@h1:5672/%2f,amqp://u:pw@h2:5673/%2f".into(),
            heartbeat_secs: 7,
            ..AmqpConfig::default()
        };
        let c = Connector::new(&amqp, "t").unwrap();
        assert_eq!(c.uris.len(), 2);
        assert!(c.uris.iter().all(|(u, _)| u.query.heartbeat == Some(7)));
        assert_eq!(c.uris[c.next].1, "amqp://u:***@h1:5672/%2f");
    }

    #[test]
    fn password_file_applies_to_the_parsed_url_whatever_its_characters() {
        let dir =
            std::env::temp_dir().join(format!("amqp-rpc-pw-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "S3cr/et@#?:x\n").unwrap();
        let amqp = AmqpConfig {
            url: "amqp://rpc@h1:5672/%2f,amqp://rpc:old@h2:5672/%2f".into(),
            password_file: Some(file),
            ..AmqpConfig::default()
        };
        let c = Connector::new(&amqp, "t").unwrap();
        for (uri, shown) in &c.uris {
            assert_eq!(uri.authority.userinfo.password, "S3cr/et@#?:x");
            assert!(!shown.contains("S3cr"), "{shown}");
        }
        assert!(amqp.secrets().contains(&"S3cr/et@#?:x".to_owned()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_url_error_does_not_leak_password() {
        let amqp = AmqpConfig {
            url: "amqp://u:topsecret@h1:notaport/%2f".into(),
            ..AmqpConfig::default()
        };
        let e = Connector::new(&amqp, "t").unwrap_err().to_string();
        assert!(!e.contains("topsecret"), "{e}");
    }
}
