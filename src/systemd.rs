//! systemd integration (`Type=notify`): READY=1 once consuming, STOPPING=1 when the drain
//! starts, and WATCHDOG=1 pings while the daemon's loops are alive. Outside systemd (no
//! `NOTIFY_SOCKET`) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::liveness::Liveness;

/// Tell systemd the service is up (sent on every (re)connection; repeats are harmless).
pub fn ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("consuming")]);
}

/// Tell systemd the service is shutting down.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// When `WATCHDOG_USEC` is set, ping at half the interval for as long as `liveness` says the
/// loops are alive; a wedged consume loop stops the pings and systemd restarts us.
pub fn spawn_watchdog(liveness: Liveness, stop: CancellationToken) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let timeout = Duration::from_micros(usec);
    tracing::info!(?timeout, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(timeout / 2);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if liveness.is_alive(timeout) {
                notify(&[NotifyState::Watchdog]);
            } else {
                tracing::error!(
                    "consume loop silent for longer than the watchdog timeout; not pinging"
                );
            }
        }
    });
}
