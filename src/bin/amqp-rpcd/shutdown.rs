//! Turning SIGTERM/SIGINT into a [`CancellationToken`], after linkerd2-proxy's signal handling.
//!
//! The first signal cancels the token: the daemon stops taking work and drains. A second signal
//! means the operator will not wait: the process exits at once with [`FORCED_EXIT_CODE`].
//! The library never installs handlers itself: `Daemon::run` takes the token, so tests (and
//! applications with signal handling of their own) drive shutdown directly.

use futures_util::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio_util::sync::CancellationToken;

/// Exit code when a second signal cuts the drain short (128 + SIGINT, the shell convention).
pub const FORCED_EXIT_CODE: i32 = 130;

/// Install the handlers and return the token the first signal cancels.
pub fn install() -> std::io::Result<CancellationToken> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        if let Some(sig) = signals.next().await {
            // Cancel first: nothing (not even a failing log write) may stand between the
            // signal and the drain.
            trigger.cancel();
            tracing::info!(signal = sig, "shutdown requested, draining");
        }
        if let Some(sig) = signals.next().await {
            tracing::warn!(signal = sig, "second signal, exiting now");
            std::process::exit(FORCED_EXIT_CODE);
        }
    });
    Ok(token)
}
