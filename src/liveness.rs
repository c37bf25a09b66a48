//! Is the daemon's work loop alive? The consume loop beats on a timer; while it is consuming
//! and has not beaten for a while, something is wedged (a deadlock, a blocked reactor), and
//! the watchdog and `/healthz` say so. While reconnecting, the loop is waiting on purpose and
//! counts as alive: a broker outage is not a reason to restart the process.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the consume loop beats.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);

/// Shared, cheap-to-clone liveness state.
#[derive(Clone, Debug)]
pub struct Liveness {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    origin: Instant,
    last_beat_ms: AtomicU64,
    consuming: AtomicBool,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            inner: Arc::new(Inner {
                origin: Instant::now(),
                last_beat_ms: AtomicU64::new(0),
                consuming: AtomicBool::new(false),
            }),
        }
    }
}

impl Liveness {
    /// The loop made progress.
    pub fn beat(&self) {
        let now = self.inner.origin.elapsed().as_millis() as u64;
        self.inner.last_beat_ms.store(now, Ordering::Relaxed);
    }

    /// Entering or leaving the consume loop.
    pub fn set_consuming(&self, consuming: bool) {
        self.beat();
        self.inner.consuming.store(consuming, Ordering::Relaxed);
    }

    /// Alive unless consuming and silent for longer than `max_silence`.
    pub fn is_alive(&self, max_silence: Duration) -> bool {
        if !self.inner.consuming.load(Ordering::Relaxed) {
            return true;
        }
        let now = self.inner.origin.elapsed().as_millis() as u64;
        let last = self.inner.last_beat_ms.load(Ordering::Relaxed);
        Duration::from_millis(now.saturating_sub(last)) <= max_silence
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_consumer_is_dead_reconnecting_is_alive() {
        let l = Liveness::default();
        assert!(l.is_alive(Duration::ZERO), "not consuming: alive");
        l.set_consuming(true);
        assert!(l.is_alive(Duration::from_secs(1)));
        std::thread::sleep(Duration::from_millis(5));
        assert!(!l.is_alive(Duration::from_millis(1)));
        l.beat();
        assert!(l.is_alive(Duration::from_secs(1)));
    }
}
