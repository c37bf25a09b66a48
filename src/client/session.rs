//! The client's connection: a supervisor task that (re)connects, one channel carrying publishes,
//! confirms and the direct reply-to consumer, and the reply router that hands each reply to the
//! call waiting for its `correlation_id`.
//!
//! Direct reply-to requires consuming `amq.rabbitmq.reply-to` (no-ack) on the very channel that
//! publishes, so one channel does both; the consumer is started before the session is handed to
//! callers, so no request can be published before its reply can be received.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use quick_cache::sync::{Cache, DefaultLifecycle};
use quick_cache::{DefaultHashBuilder, OptionsBuilder, UnitWeighter};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::{jittered, probe_queue, Connector, QueueProbe};
use crate::client::CallError;
use crate::protocol::{header_str, ErrorCode, DIRECT_REPLY_TO, ERROR_CODE_HEADER};

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
    served_at_ms: AtomicU64,
    /// When the probe whose "go ahead" is trusted started: trusted for [`PROBE_TTL`], and only
    /// on a session born before it (a new connection probes afresh). Read without a lock, so
    /// the common case costs one atomic load per call.
    ok_from_ms: AtomicU64,
    /// The last probe's outcome, for calls that waited while it ran (they take it rather than
    /// probe again: concurrent calls of a missing queue cost one probe, not one each).
    last: Mutex<Option<LastProbe>>,
}

#[derive(Debug)]
struct LastProbe {
    finished: Instant,
    session_born_ms: u64,
    result: Result<(), CallError>,
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
    fn probed_ok(&self, session: &Session, now_ms: u64) -> bool {
        let from = self.ok_from_ms.load(Ordering::Relaxed);
        from >= session.born_ms && now_ms < from + PROBE_TTL.as_millis() as u64
    }
}

impl Shared {
    /// Ms since this client was created, plus one (so 0 can mean "never").
    fn now_ms(&self) -> u64 {
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

    fn take(&self, id: &str) -> Option<oneshot::Sender<ReplyResult>> {
        self.pending.lock().expect("pending lock").remove(id)
    }

    fn fail_all(&self, error: &CallError) {
        let drained: Vec<_> = self.pending.lock().expect("pending lock").drain().collect();
        for (_, tx) in drained {
            let _ = tx.send(Err(error.clone()));
        }
    }

    fn set_last_error(&self, e: &str) {
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

/// One live connection.
#[derive(Debug)]
pub(crate) struct Session {
    pub conn: Connection,
    /// Publishes requests (confirm mode) and consumes direct replies.
    pub channel: Channel,
    /// The probe channel. One probe at a time: a passive declare of a missing queue closes
    /// the channel it runs on, which would fail another queue's probe running beside it.
    probe: tokio::sync::Mutex<Probe>,
    /// When this session was handed out ([`Shared`]'s ms): probes of older sessions do not
    /// count on it.
    born_ms: u64,
}

#[derive(Debug, Default)]
struct Probe {
    channel: Option<Channel>,
}

impl Session {
    /// Fail fast when nobody serves `queue`: a passive declare, cached per queue for
    /// [`PROBE_TTL`] when it finds consumers. Probe errors other than "missing" are not fatal
    /// (and are cached too): the mandatory flag and the deadline still bound the call.
    pub async fn check_server(
        &self,
        queue: &str,
        state: &QueueState,
        shared: &Shared,
    ) -> Result<(), CallError> {
        if state.probed_ok(self, shared.now_ms()) {
            return Ok(());
        }
        let waited_from = Instant::now();
        let mut probe = self.probe.lock().await;
        if state.probed_ok(self, shared.now_ms()) {
            return Ok(()); // another call probed this queue while we waited for the lock
        }
        if let Some(last) = state.last.lock().expect("probe lock").as_ref() {
            if last.finished >= waited_from && last.session_born_ms == self.born_ms {
                return last.result.clone(); // ... and found it unserved: no need to ask twice
            }
        }
        let started_ms = shared.now_ms();
        let result = self
            .probe(&mut probe, queue, state, shared, started_ms)
            .await;
        *state.last.lock().expect("probe lock") = Some(LastProbe {
            finished: Instant::now(),
            session_born_ms: self.born_ms,
            result: result.clone(),
        });
        result
    }

    async fn probe(
        &self,
        probe: &mut Probe,
        queue: &str,
        state: &QueueState,
        shared: &Shared,
        started_ms: u64,
    ) -> Result<(), CallError> {
        let channel = match &probe.channel {
            Some(c) if c.status().connected() => c.clone(),
            _ => match self.conn.create_channel().await {
                Ok(c) => {
                    probe.channel = Some(c.clone());
                    c
                }
                Err(e) => return Err(unavailable(&e)),
            },
        };
        let no_server = |reason: &str| CallError::NoServer {
            queue: queue.to_owned(),
            reason: reason.to_owned(),
        };
        match probe_queue(&channel, queue).await {
            Ok(QueueProbe::Consumers(0)) => Err(no_server("the queue has no consumer")),
            Ok(QueueProbe::Consumers(_)) => {
                state.served_at_ms.store(shared.now_ms(), Ordering::Relaxed);
                state.ok_from_ms.store(started_ms, Ordering::Relaxed);
                Ok(())
            }
            Ok(QueueProbe::Missing) => {
                probe.channel = None;
                Err(no_server("the queue does not exist"))
            }
            Err(e) => {
                // E.g. ACCESS_REFUSED: since RabbitMQ 4.2.6 and 4.3.0 a passive declare needs
                // configure permission, which a caller's user often lacks. Not asked again
                // for a while, so such a client does not pay a refused probe per call.
                probe.channel = None;
                state.ok_from_ms.store(started_ms, Ordering::Relaxed);
                tracing::debug!(
                    error = %e,
                    queue,
                    "queue probe failed; relying on mandatory + deadline"
                );
                Ok(())
            }
        }
    }
}

fn unavailable(e: &lapin::Error) -> CallError {
    CallError::Unavailable(e.to_string())
}

async fn open(
    conn: Connection,
    shared: &Shared,
) -> Result<(Arc<Session>, Consumer), (Connection, lapin::Error)> {
    let setup = async {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>((channel, consumer))
    };
    match setup.await {
        Ok((channel, consumer)) => Ok((
            Arc::new(Session {
                conn,
                channel,
                probe: tokio::sync::Mutex::new(Probe::default()),
                born_ms: shared.now_ms(),
            }),
            consumer,
        )),
        Err(e) => Err((conn, e)),
    }
}

/// Keep a session available in `sessions` until `cancel` fires.
pub(crate) async fn supervise(
    mut connector: Connector,
    shared: Arc<Shared>,
    sessions: watch::Sender<Option<Arc<Session>>>,
    cancel: CancellationToken,
) {
    let mut connected_before = false;
    loop {
        let Some(conn) = connector
            .connect(&cancel, |e| shared.set_last_error(e))
            .await
        else {
            return;
        };
        let (session, consumer) = match open(conn, &shared).await {
            Ok(opened) => opened,
            Err((conn, e)) => {
                shared.set_last_error(&format!("opening the reply channel: {e}"));
                let _ = conn.close(200, "setup failed".into()).await;
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(jittered(Duration::from_millis(200))) => continue,
                }
            }
        };
        if connected_before {
            shared.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        connected_before = true;
        sessions.send_replace(Some(session.clone()));
        let reason = route(consumer, &shared, &cancel).await;
        sessions.send_replace(None);
        shared.fail_all(&CallError::ConnectionLost);
        if cancel.is_cancelled() {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                session.conn.close(200, "client dropped".into()),
            )
            .await;
            return;
        }
        tracing::warn!(%reason, "client connection lost; reconnecting");
        shared.set_last_error(&reason);
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            session.conn.close(200, "reconnecting".into()),
        )
        .await;
    }
}

/// Hand each reply to its waiting call until the consumer ends; returns why it ended.
async fn route(mut consumer: Consumer, shared: &Shared, cancel: &CancellationToken) -> String {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return "client dropped".into(),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => dispatch(shared, delivery),
                Some(Err(e)) => return format!("reply consumer error: {e}"),
                None => return "reply consumer cancelled".into(),
            },
        }
    }
}

fn dispatch(shared: &Shared, delivery: Delivery) {
    let id = delivery
        .properties
        .correlation_id()
        .as_ref()
        .map(|s| s.as_str())
        .unwrap_or("");
    let Some(tx) = shared.take(id) else {
        // Late (after a timeout) or duplicate (a redelivered request answered twice).
        shared.late_replies.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(correlation_id = id, "dropping a reply nobody waits for");
        return;
    };
    let headers = delivery.properties.headers().as_ref();
    let result = match header_str(headers, ERROR_CODE_HEADER) {
        None => Ok(delivery.data),
        Some(code) => {
            let message = String::from_utf8_lossy(&delivery.data).into_owned();
            Err(match code.parse::<ErrorCode>() {
                Ok(code) => CallError::Remote { code, message },
                Err(_) => CallError::Remote {
                    code: ErrorCode::Internal,
                    message: format!("unknown error code {code:?}: {message}"),
                },
            })
        }
    };
    let _ = tx.send(result);
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
