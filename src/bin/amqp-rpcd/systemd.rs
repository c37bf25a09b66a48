//! systemd integration (`Type=notify`), owned by the binary: READY=1 whenever the daemon is
//! ready (connected and consuming, again after every reconnection), STOPPING=1 when the drain
//! starts, and WATCHDOG=1 pings while the daemon's loops are alive. Outside systemd (no
//! `NOTIFY_SOCKET`) every notification is a no-op.

use std::time::Duration;

use amqp_rpc::server::Liveness;
use amqp_rpc::Daemon;
use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Follow `daemon` for systemd until the process ends: readiness, the drain, the watchdog.
pub fn follow(daemon: &Daemon, shutdown: CancellationToken) {
    let mut ready = daemon.readiness();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
                    return;
                }
                changed = ready.changed() => {
                    if changed.is_err() {
                        return; // the daemon is gone
                    }
                    if *ready.borrow_and_update() {
                        notify(&[NotifyState::Ready, NotifyState::Status("consuming")]);
                    }
                }
            }
        }
    });
    spawn_watchdog(daemon.liveness());
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// When `WATCHDOG_USEC` is set, ping at half the interval for as long as `liveness` says the
/// loops are alive; a wedged consume loop stops the pings and systemd restarts us.
fn spawn_watchdog(liveness: Liveness) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let timeout = Duration::from_micros(usec);
    tracing::info!(?timeout, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(timeout / 2);
        loop {
            tick.tick().await;
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
