//! amqp-rpc: production-grade request/reply RPC over RabbitMQ (AMQP 0-9-1).
//!
//! The RabbitMQ RPC tutorial's pattern (a worker consumes a queue and answers on `reply_to`
//! with the request's `correlation_id`), with what production needs: deadlines, fast no-server
//! detection, error replies with codes, input bounds, the reply cache, poison limits, metrics,
//! reconnection and graceful drain, for methods you write as plain async functions. The wire
//! contract (`docs/PROTOCOL.md`) stays compatible with the tutorial's clients and servers in
//! every language.
//!
//! Serve your own methods:
//!
//! ```no_run
//! use amqp_rpc::protocol::{ErrorCode, RequestError};
//! use amqp_rpc::service::{json, Methods, Request};
//!
//! #[derive(serde::Deserialize)]
//! struct Lookup { sku: String }
//! #[derive(serde::Serialize)]
//! struct Item { sku: String, stock: u32 }
//!
//! async fn lookup(_req: Request, q: Lookup) -> Result<Item, RequestError> {
//!     match q.sku.as_str() {
//!         "A-1" => Ok(Item { sku: q.sku, stock: 3 }),
//!         _ => Err(RequestError::new(ErrorCode::NotFound, format!("no item {}", q.sku))),
//!     }
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = amqp_rpc::config::load(None)?; // config.toml keys, AMQP_RPC__* variables
//! config.service.queue = "inventory".into();
//! let methods = Methods::default().with(json("lookup", lookup));
//! let shutdown = tokio_util::sync::CancellationToken::new(); // cancel it to drain and stop
//! amqp_rpc::run(config, methods, prometheus::Registry::new(), shutdown).await?;
//! # Ok(()) }
//! ```
//!
//! and call them ([`Client`], one connection for any number of services):
//!
//! ```no_run
//! # #[derive(serde::Serialize)] struct Lookup { sku: String }
//! # #[derive(serde::Deserialize)] struct Item { stock: u32 }
//! # async fn demo() -> Result<(), amqp_rpc::CallError> {
//! let client = amqp_rpc::Client::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
//!     .connect()
//!     .await?;
//! let item: Item = client
//!     .service("inventory")
//!     .call_json("lookup", &Lookup { sku: "A-1".into() })
//!     .await?;
//! # let _ = item.stock; Ok(()) }
//! ```
//!
//! # Layout
//! - [`service`]: methods from async functions ([`service::handler`], [`service::json`],
//!   [`service::blocking`]), the [`service::Request`] they get, the [`service::Methods`] served.
//! - [`server`]: the worker ([`Daemon`], [`run`]).
//! - [`client`]: [`Client`], the multiplexing RPC client with deadlines, and [`CallError`].
//! - [`protocol`]: the wire contract shared by both sides (headers, error codes, deadlines).
//! - [`config`]: `config.toml` + `AMQP_RPC__SECTION__KEY` overrides, validation, redaction,
//!   and sections of the application's own.
//! - [`amqp`]: connecting with backoff across brokers, probing a queue.
//! - [`error`]: the daemon's fatal errors.
//! - [`trace`]: the spans of calls and requests, and the W3C trace context they carry
//!   (OpenTelemetry, with the `otel` feature).
//!
//! Logging set-up, signals, systemd and the load generator belong to the binaries
//! (`amqp-rpcd`, `amqp-rpc`), not to the library.

pub mod amqp;
pub mod client;
pub mod config;
pub mod error;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod http;
mod liveness;
pub mod protocol;
mod publish;
mod queue;
mod reply_to;
mod secret;
pub mod server;
pub mod service;
mod tls;
pub mod trace;

pub use client::{CallError, CallOptions, Client, ClientBuilder, Service};
pub use config::Config;
pub use error::Error;
pub use protocol::ErrorCode;
pub use server::{run, Daemon};
