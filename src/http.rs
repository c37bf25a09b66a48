//! `/metrics`, `/healthz` and `/readyz` over axum.
//!
//! The listener is bound before the daemon connects to the broker, so a bad `http.listen` fails
//! at start-up and probes answer (503) while the broker is still unreachable. `/healthz`
//! follows [`Liveness`]: a broker outage keeps it green, a wedged consume loop turns it red.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::liveness::Liveness;

/// What the handlers read.
#[derive(Clone, Debug)]
pub struct HttpState {
    /// The registry `main` created.
    pub registry: Registry,
    /// True while connected, consuming and not draining.
    pub ready: watch::Receiver<bool>,
    /// The broker's reason while it blocks the daemon's connection.
    pub blocked: watch::Receiver<Option<String>>,
    /// Whether the work loop is alive, for `/healthz`.
    pub liveness: Liveness,
}

/// `/healthz` fails when the consume loop has been silent this long (it beats every second).
const HEALTH_MAX_SILENCE: Duration = Duration::from_secs(10);

/// Bind the listener (`127.0.0.1:0` picks a free port; tests read it back).
pub async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr), Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::HttpBind {
            addr: addr.to_owned(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| Error::HttpBind {
        addr: addr.to_owned(),
        source,
    })?;
    Ok((listener, local))
}

/// Serve until `shutdown` fires.
pub fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "http server failed");
        }
    })
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&state.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_owned())],
            e.to_string().into_bytes(),
        ),
    }
}

async fn healthz(State(state): State<HttpState>) -> impl IntoResponse {
    if state.liveness.is_alive(HEALTH_MAX_SILENCE) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "consume loop stalled\n")
    }
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if let Some(reason) = state.blocked.borrow().as_deref() {
        // Requests are still taken, but no reply can leave until the broker's alarm clears.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("blocked by the broker: {reason}\n"),
        );
    }
    if *state.ready.borrow() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned())
    }
}
