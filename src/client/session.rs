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

/// State shared by the calls and the supervisor.
#[derive(Debug)]
pub(crate) struct Shared {
    pending: Mutex<HashMap<String, oneshot::Sender<ReplyResult>>>,
    pub late_replies: AtomicU64,
    pub reconnects: AtomicU64,
    pub last_error: Mutex<String>,
    created: Instant,
    /// When (ms after `created`, plus one so 0 means never) a probe last found the queue
    /// served. Outlives connections: that is the point (see [`Shared::served_within`]).
    served_at_ms: AtomicU64,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            pending: Mutex::default(),
            late_replies: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            last_error: Mutex::default(),
            created: Instant::now(),
            served_at_ms: AtomicU64::new(0),
        }
    }
}

impl Shared {
    fn mark_served(&self) {
        let now = self.created.elapsed().as_millis() as u64 + 1;
        self.served_at_ms.store(now, Ordering::Relaxed);
    }

    /// Whether this client saw the queue served within `window`: then "no consumer" is most
    /// likely a gap (a failover, a restart, a rolling deploy), not a queue nobody serves.
    pub fn served_within(&self, window: Duration) -> bool {
        match self.served_at_ms.load(Ordering::Relaxed) {
            0 => false,
            at => {
                let seen = self.created + Duration::from_millis(at - 1);
                seen.elapsed() < window
            }
        }
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
    probe: tokio::sync::Mutex<Probe>,
    /// Until when (ms after `born`) the last probe's "has consumers" holds: read without the
    /// lock, so the common case costs one atomic load per call.
    probe_ok_until_ms: AtomicU64,
    born: Instant,
}

#[derive(Debug, Default)]
struct Probe {
    channel: Option<Channel>,
}

impl Session {
    /// Fail fast when nobody serves `queue`: a passive declare, cached for [`PROBE_TTL`] when it
    /// finds consumers. Probe errors other than "missing" are not fatal (and are cached too):
    /// the mandatory flag and the deadline still bound the call.
    pub async fn check_server(&self, queue: &str, shared: &Shared) -> Result<(), CallError> {
        let now_ms = |born: Instant| born.elapsed().as_millis() as u64;
        if now_ms(self.born) < self.probe_ok_until_ms.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut probe = self.probe.lock().await;
        if now_ms(self.born) < self.probe_ok_until_ms.load(Ordering::Relaxed) {
            return Ok(()); // another call probed while we waited for the lock
        }
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
                shared.mark_served();
                let until = now_ms(self.born) + PROBE_TTL.as_millis() as u64;
                self.probe_ok_until_ms.store(until, Ordering::Relaxed);
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
                let until = now_ms(self.born) + PROBE_TTL.as_millis() as u64;
                self.probe_ok_until_ms.store(until, Ordering::Relaxed);
                tracing::debug!(error = %e, "queue probe failed; relying on mandatory + deadline");
                Ok(())
            }
        }
    }
}

fn unavailable(e: &lapin::Error) -> CallError {
    CallError::Unavailable(e.to_string())
}

async fn open(conn: Connection) -> Result<(Arc<Session>, Consumer), (Connection, lapin::Error)> {
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
                probe_ok_until_ms: AtomicU64::new(0),
                born: Instant::now(),
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
        let (session, consumer) = match open(conn).await {
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
