//! amqp-rpc: production-grade request/reply RPC over RabbitMQ (AMQP 0-9-1).
//!
//! The RabbitMQ RPC tutorial's pattern (a worker consumes a queue and answers on `reply_to`
//! with the request's `correlation_id`), with what production needs: deadlines, fast no-server
//! detection, error replies with codes, input bounds, metrics, reconnection and graceful
//! shutdown. The wire contract stays compatible with the tutorial's own pika client and server.
//!
//! # Layout
//! - [`protocol`]: the wire contract shared by both sides (headers, error codes, deadlines).
//! - [`config`]: `config.toml` + `AMQP_RPC__SECTION__KEY` overrides, validation, redaction.
//! - [`amqp`]: connecting with backoff across brokers, probing the queue.
//! - [`queue`]: finding or declaring the service queue (`service.declare`).
//! - [`service`]: the methods served (`fib`) behind the [`service::Method`] trait.
//! - [`server`]: the `amqp-rpcd` worker ([`server::Daemon`], [`server::run`]).
//! - [`client`]: [`Client`], the multiplexing RPC client with deadlines, and [`CallError`].
//! - `publish`: publishes started without awaiting their write or confirm (both sides).
//! - [`bench`]: the closed-loop load generator behind `amqp-rpc bench`.
//! - [`secret`]: password redaction for logs and messages.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`shutdown`]: SIGTERM/SIGINT to a cancellation token.
//! - [`systemd`]: READY/STOPPING notifications and watchdog pings.
//! - [`liveness`]: whether the consume loop is alive (watchdog, `/healthz`).
//! - [`telemetry`]: tracing set-up with secret redaction.
//! - [`tls`]: CA bundle and client certificate for `amqps://`.
//! - [`error`]: the daemon's fatal errors.

pub mod amqp;
pub mod bench;
pub mod client;
pub mod config;
pub mod error;
pub mod http;
pub mod liveness;
pub mod protocol;
pub(crate) mod publish;
pub mod queue;
pub mod secret;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod systemd;
pub mod telemetry;
pub mod tls;

pub use client::{CallError, CallOptions, Client, ClientBuilder, Service};
pub use config::Config;
pub use error::Error;
pub use protocol::ErrorCode;
pub use server::{run, Daemon};
