//! State shared by the calls and the connection supervisor: the pending calls by
//! `correlation_id` (each removed however its call ends), and what the client knows of each
//! service queue it calls (probe results, when it was last served), bounded in size.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quick_cache::sync::{Cache, DefaultLifecycle};
use quick_cache::{DefaultHashBuilder, OptionsBuilder, UnitWeighter};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::client::CallError;

/// How long a "the queue has consumers" answer is trusted: long enough that the probe costs
/// nothing per call, short enough that a vanished server is noticed quickly.
pub(crate) const PROBE_TTL: Duration = Duration::from_secs(1);

/// What a waiting call receives.
pub(crate) type ReplyResult = Result<Vec<u8>, CallError>;

/// How many service queues a client remembers (probe results, "served lately"). An
/// application calls a handful; a caller of random names churns through this many entries
/// and no more. Frequently used queues stay (CLOCK-Pro keeps what is used again); an evicted
/// queue that is called again starts afresh, as on a new client.
pub const MAX_QUEUES: usize = 1024;

/// State shared by the calls and the supervisor.
#[derive(Debug)]
pub(crate) struct Shared {
    pending: Mutex<HashMap<String, oneshot::Sender<ReplyResult>>>,
    pub late_replies: AtomicU64,
    pub reconnects: AtomicU64,
    pub last_error: Mutex<String>,
    /// The broker's reason while it blocks the connection; `is_blocked` is the lock-free
    /// look every call takes.
    blocked: Mutex<Option<String>>,
    is_blocked: std::sync::atomic::AtomicBool,
    created: Instant,
    /// What the client knows about each service queue it calls, by name, bounded.
    queues: Cache<String, Arc<QueueState>>,
}

impl Default for Shared {
    fn default() -> Self {
        let options = OptionsBuilder::new()
            .estimated_items_capacity(MAX_QUEUES)
            .weight_capacity(MAX_QUEUES as u64)
            // Only `Client::service` looks entries up (a handle keeps its own), so one shard.
            .shards(1)
            .build()
            .expect("capacity and items are set");
        Shared {
            pending: Mutex::default(),
            late_replies: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            last_error: Mutex::default(),
            blocked: Mutex::default(),
            is_blocked: Default::default(),
            created: Instant::now(),
            queues: Cache::with_options(
                options,
                UnitWeighter,
                DefaultHashBuilder::default(),
                DefaultLifecycle::default(),
            ),
        }
    }
}

/// What the client knows about one service queue, shared by every handle of it (see
/// [`Shared::queue`]). Times are ms after [`Shared`]'s creation plus one, so 0 means never.
#[derive(Debug, Default)]
pub(crate) struct QueueState {
    /// When a probe last found the queue served. Outlives connections: that is the point
    /// (see [`QueueState::served_within`]).
    pub(super) served_at_ms: AtomicU64,
    /// When the probe whose "go ahead" is trusted started: trusted for [`PROBE_TTL`], and only
    /// on a session born before it (a new connection probes afresh). Read without a lock, so
    /// the common case costs one atomic load per call.
    pub(super) ok_from_ms: AtomicU64,
    /// The last probe's outcome, for calls that waited while it ran (they take it rather than
    /// probe again: concurrent calls of a missing queue cost one probe, not one each).
    pub(super) last: Mutex<Option<LastProbe>>,
}

#[derive(Debug)]
pub(super) struct LastProbe {
    pub(super) finished: Instant,
    pub(super) session_born_ms: u64,
    pub(super) result: Result<(), CallError>,
}

impl QueueState {
    /// Whether this client saw the queue served within `window`: then "no consumer" is most
    /// likely a gap (a failover, a restart, a rolling deploy), not a queue nobody serves.
    pub fn served_within(&self, shared: &Shared, window: Duration) -> bool {
        match self.served_at_ms.load(Ordering::Relaxed) {
            0 => false,
            at => shared.now_ms().saturating_sub(at) < window.as_millis() as u64,
        }
    }

    /// Whether a probe on `session` said "go ahead" less than [`PROBE_TTL`] ago.
    pub(super) fn probed_ok(&self, session_born_ms: u64, now_ms: u64) -> bool {
        let from = self.ok_from_ms.load(Ordering::Relaxed);
        from >= session_born_ms && now_ms < from + PROBE_TTL.as_millis() as u64
    }
}

impl Shared {
    /// Ms since this client was created, plus one (so 0 can mean "never").
    pub(super) fn now_ms(&self) -> u64 {
        self.created.elapsed().as_millis() as u64 + 1
    }

    /// The state of `queue`: the same for every caller while it is remembered.
    pub fn queue(&self, queue: &str) -> Arc<QueueState> {
        self.queues
            .get_or_insert_with(queue, || Ok::<_, std::convert::Infallible>(Arc::default()))
            .unwrap_or_else(|never| match never {})
    }

    /// Queues remembered right now (at most [`MAX_QUEUES`]).
    #[cfg(test)]
    pub fn queues_len(&self) -> usize {
        self.queues.len()
    }

    /// Register a call; the guard removes the entry however the call ends (reply, timeout,
    /// error, or the caller dropping the future), so the map never leaks.
    pub fn register(
        self: &Arc<Self>,
        id: String,
    ) -> (PendingGuard, oneshot::Receiver<ReplyResult>) {
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("pending lock")
            .insert(id.clone(), tx);
        (
            PendingGuard {
                shared: self.clone(),
                id,
            },
            rx,
        )
    }

    pub fn pending_len(&self) -> usize {
        self.pending.lock().expect("pending lock").len()
    }

    pub(super) fn take(&self, id: &str) -> Option<oneshot::Sender<ReplyResult>> {
        self.pending.lock().expect("pending lock").remove(id)
    }

    pub(super) fn fail_all(&self, error: &CallError) {
        let drained: Vec<_> = self.pending.lock().expect("pending lock").drain().collect();
        for (_, tx) in drained {
            let _ = tx.send(Err(error.clone()));
        }
    }

    /// The broker blocked (`Some(reason)`) or unblocked (`None`) the connection.
    pub(super) fn set_blocked(&self, reason: Option<String>) {
        let mut blocked = self.blocked.lock().expect("blocked lock");
        self.is_blocked.store(reason.is_some(), Ordering::Relaxed);
        *blocked = reason;
    }

    /// The broker's reason, while it blocks the connection.
    pub(super) fn blocked(&self) -> Option<String> {
        match self.is_blocked.load(Ordering::Relaxed) {
            false => None,
            true => self.blocked.lock().expect("blocked lock").clone(),
        }
    }

    pub(super) fn set_last_error(&self, e: &str) {
        *self.last_error.lock().expect("last_error lock") = e.to_owned();
    }
}

/// Removes a pending entry on drop.
#[derive(Debug)]
pub(crate) struct PendingGuard {
    shared: Arc<Shared>,
    id: String,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.shared.take(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_state_per_queue_and_served_is_per_queue() {
        let shared = Shared::default();
        let (a, again, b) = (shared.queue("a"), shared.queue("a"), shared.queue("b"));
        assert!(
            Arc::ptr_eq(&a, &again),
            "handles of one queue share its state"
        );
        assert!(!Arc::ptr_eq(&a, &b));
        a.served_at_ms.store(shared.now_ms(), Ordering::Relaxed);
        assert!(a.served_within(&shared, Duration::from_secs(30)));
        assert!(
            !b.served_within(&shared, Duration::from_secs(30)),
            "a's service is not b's"
        );
    }

    #[test]
    fn random_queue_names_do_not_grow_the_state_without_bound() {
        let shared = Shared::default();
        let billing = shared.queue("billing");
        for i in 0..20 * MAX_QUEUES {
            let _ = shared.queue(&format!("random-{i}"));
            if i % 16 == 0 {
                let _ = shared.queue("billing"); // used all along
            }
        }
        assert!(shared.queues_len() <= MAX_QUEUES, "{}", shared.queues_len());
        assert!(
            Arc::ptr_eq(&billing, &shared.queue("billing")),
            "a queue in use stays remembered through a flood of one-off names"
        );
    }
}
