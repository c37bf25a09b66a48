//! The `amqp-rpcd` worker: connect, declare, consume, answer, reconnect, drain.
//!
//! [`Daemon::start`] does everything that can fail fast (config validation, metrics
//! registration, binding the HTTP listener); [`Daemon::run`] then serves until the injected
//! shutdown token fires, reconnecting whenever the broker goes away. The binary only wires
//! these together; tests drive the same code in-process.

use crate::reply_to::ReplyToPolicy;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::amqp::{jittered, Connector};
use crate::config::Config;
use crate::error::Error;
use crate::http::{self, HttpState};
use crate::service::Methods;
use idempotency::Idempotency;

mod ctx;
pub(crate) mod decide;
pub(crate) mod idempotency;
mod ledger;
pub mod metrics;
mod reply;
mod reply_link;
mod request;
mod run;
mod session;
mod settle;

pub use crate::liveness::Liveness;
pub use metrics::Metrics;

/// Pause before reconnecting after a lost session, so a broker that accepts connections and
/// then drops them does not get hammered.
const RELOOP_PAUSE: Duration = Duration::from_millis(200);

/// A started daemon, ready to [`run`](Daemon::run).
#[derive(Debug)]
pub struct Daemon {
    config: Config,
    registry: Registry,
    metrics: Metrics,
    methods: Methods,
    /// `service.reply_to`, parsed once.
    reply_to: ReplyToPolicy,
    ready: watch::Sender<bool>,
    /// The broker's reason while it blocks the connection (`connection.blocked`).
    blocked: watch::Sender<Option<String>>,
    liveness: Liveness,
    http: Option<(TcpListener, SocketAddr)>,
}

impl Daemon {
    /// Validate the config, register the metrics into `registry`, bind the HTTP listener.
    pub async fn start(config: Config, registry: Registry) -> Result<Self, Error> {
        config.validate()?;
        let reply_to = ReplyToPolicy::parse(&config.service.reply_to).map_err(|e| {
            Error::Config(crate::config::ConfigError {
                problems: vec![format!("service.reply_to: {e}")],
            })
        })?;
        let metrics = Metrics::register(&registry)?;
        let http = match config.http.listen.as_str() {
            "" => None,
            addr => Some(http::bind(addr).await?),
        };
        Ok(Daemon {
            config,
            registry,
            metrics,
            methods: Methods::default(),
            reply_to,
            ready: watch::Sender::new(false),
            blocked: watch::Sender::new(None),
            liveness: Liveness::default(),
            http,
        })
    }

    /// The methods to serve. A daemon serves none until given some: every request then gets
    /// `unknown_method`. `service.default_method`, when set, overrides the set's own default
    /// (see [`Methods::default_method`]) and must name one of them.
    pub fn with_methods(mut self, methods: Methods) -> Result<Self, Error> {
        let unserved: Vec<_> = (self.config.service.callers.keys())
            .filter(|name| methods.get(name).is_none() || name.is_empty())
            .map(|name| format!("service.callers: {name:?} is not a method this daemon serves"))
            .collect();
        if !unserved.is_empty() {
            return Err(Error::Config(crate::config::ConfigError {
                problems: unserved,
            }));
        }
        let default = &self.config.service.default_method;
        self.methods = match default.as_str() {
            "" => methods,
            name if methods.get(name).is_some() => methods.default_method(name),
            name => {
                return Err(Error::Config(crate::config::ConfigError {
                    problems: vec![format!(
                        "service.default_method: {name:?} is not a method this daemon serves \
                         (it serves {:?})",
                        methods.names()
                    )],
                }))
            }
        };
        Ok(self)
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, when enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(_, addr)| *addr)
    }

    /// Follows readiness: true while connected, consuming and not draining.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Whether the consume loop is alive (not wedged): what `/healthz` answers, for a
    /// process supervisor's watchdog (`amqp-rpcd` pings systemd's with it).
    pub fn liveness(&self) -> Liveness {
        self.liveness.clone()
    }

    /// The metric handles (tests read counters directly).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serve until `shutdown` fires, then drain within `shutdown.grace_secs`.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let http_stop = CancellationToken::new();
        let http_task = self.http.take().map(|(listener, addr)| {
            tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
            let state = HttpState {
                registry: self.registry.clone(),
                ready: self.ready.subscribe(),
                blocked: self.blocked.subscribe(),
                liveness: self.liveness.clone(),
            };
            http::serve(listener, state, http_stop.clone())
        });
        let result = self.serve(&shutdown).await;
        self.ready.send_replace(false);
        http_stop.cancel();
        if let Some(task) = http_task {
            let _ = task.await;
        }
        match &result {
            Ok(()) => tracing::info!("stopped"),
            Err(e) => tracing::error!(error = %e, "stopped with an error"),
        }
        result
    }

    async fn serve(&self, shutdown: &CancellationToken) -> Result<(), Error> {
        self.metrics.expose_methods(self.methods.names());
        let name = format!("amqp-rpcd pid={}", std::process::id());
        let mut connector = Connector::new(&self.config.amqp, &name)?;
        let service = &self.config.service;
        let cpu = Arc::new(Semaphore::new(service.effective_concurrency()));
        let idempotency = Arc::new(Idempotency::new(
            service.reply_cache_entries,
            Duration::from_secs(service.reply_cache_ttl_secs),
        ));
        tracing::info!(
            queue = %self.config.service.queue,
            methods = ?self.methods.names(),
            concurrency = self.config.service.effective_concurrency(),
            prefetch = self.config.service.prefetch,
            "starting"
        );
        let mut connected_before = false;
        loop {
            let Some(conn) = connector.connect(shutdown, |_| {}).await else {
                return Ok(());
            };
            let reconnected = connected_before;
            if reconnected {
                self.metrics.reconnects.inc();
            }
            connected_before = true;
            let parts = session::Parts {
                config: &self.config,
                methods: &self.methods,
                reply_to: &self.reply_to,
                metrics: &self.metrics,
                ready: &self.ready,
                blocked: &self.blocked,
                cpu: cpu.clone(),
                idempotency: idempotency.clone(),
                liveness: &self.liveness,
                after_loss: reconnected,
            };
            match session::serve(&conn, parts, shutdown).await {
                session::End::Shutdown(result) => return result,
                session::End::Fatal(e) => return Err(e),
                session::End::Lost(reason) => {
                    tracing::warn!(%reason, "broker session lost; reconnecting");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(jittered(RELOOP_PAUSE)) => {}
                    }
                }
            }
        }
    }
}

/// Start and run a daemon serving `methods`: the whole daemon in one call. `registry` receives
/// the daemon's metrics and is served on `/metrics`; `shutdown` starts the drain.
///
/// ```no_run
/// use amqp_rpc::service::{handler, Methods, Request};
/// use amqp_rpc::protocol::RequestError;
///
/// async fn ping(_req: Request) -> Result<Vec<u8>, RequestError> {
///     Ok(b"pong".to_vec())
/// }
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let config = amqp_rpc::config::load(None)?;
/// let methods = Methods::default().with(handler("ping", ping));
/// let shutdown = tokio_util::sync::CancellationToken::new();
/// amqp_rpc::run(config, methods, prometheus::Registry::new(), shutdown).await?;
/// # Ok(())
/// # }
/// ```
pub async fn run(
    config: Config,
    methods: Methods,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    Daemon::start(config, registry)
        .await?
        .with_methods(methods)?
        .run(shutdown)
        .await
}
