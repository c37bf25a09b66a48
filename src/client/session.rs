//! The client's connection: a supervisor task that (re)connects, one channel carrying publishes,
//! confirms and the direct reply-to consumer, and the reply router that hands each reply to the
//! call waiting for its `correlation_id`.
//!
//! Direct reply-to requires consuming `amq.rabbitmq.reply-to` (no-ack) on the very channel that
//! publishes, so one channel does both; the consumer is started before the session is handed to
//! callers, so no request can be published before its reply can be received.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::{jittered, probe_queue, Connector, QueueProbe};
use crate::client::alarm;
use crate::client::shared::{LastProbe, QueueState, Shared};
use crate::client::CallError;
use crate::protocol::{header_str, ErrorCode, DIRECT_REPLY_TO, ERROR_CODE_HEADER};

/// How often the router collects returned requests that no call looked for (see
/// [`Session::collect_returns`]): what lapin holds meanwhile is bounded by this.
const COLLECT_RETURNS_EVERY: Duration = Duration::from_secs(1);

/// One live connection.
#[derive(Debug)]
pub(crate) struct Session {
    pub conn: Connection,
    /// Publishes requests (`mandatory`; in confirm mode when asked) and consumes direct
    /// replies.
    pub channel: Channel,
    /// The channel is in confirm mode.
    pub confirms: bool,
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
    /// Whether a call must ask [`check_server`](Self::check_server) first: no probe on this
    /// session said "served" less than `PROBE_TTL` ago. One atomic load.
    pub fn needs_probe(&self, state: &QueueState, shared: &Shared) -> bool {
        !state.probed_ok(self.born_ms, shared.now_ms())
    }

    /// Fail fast when nobody serves `queue`: a passive declare, cached per queue for
    /// [`PROBE_TTL`] when it finds consumers. Probe errors other than "missing" are not fatal
    /// (and are cached too): the mandatory flag and the deadline still bound the call.
    pub async fn check_server(
        &self,
        queue: &str,
        state: &QueueState,
        shared: &Shared,
    ) -> Result<(), CallError> {
        if state.probed_ok(self.born_ms, shared.now_ms()) {
            return Ok(());
        }
        let waited_from = Instant::now();
        let mut probe = self.probe.lock().await;
        if state.probed_ok(self.born_ms, shared.now_ms()) {
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

impl Session {
    /// Hand every request the broker returned to its call, as `NoServer`. Without confirm
    /// mode lapin keeps returned messages until asked (`wait_for_confirms`, which then has no
    /// confirm to wait for); a call whose reply is late asks, and the router asks now and then
    /// for the calls that ended before they looked, so none is kept for long.
    pub fn collect_returns(&self, shared: &Shared) {
        use futures_util::FutureExt;
        let Some(Ok(returned)) = self.channel.wait_for_confirms().now_or_never() else {
            return;
        };
        for message in returned {
            let id = message
                .delivery
                .properties
                .correlation_id()
                .as_ref()
                .map_or("", |s| s.as_str());
            if let Some(tx) = shared.take(id) {
                let queue = message.delivery.routing_key.as_str();
                let _ = tx.send(Err(CallError::returned(queue, message.reply_text.as_str())));
            }
        }
    }
}

fn unavailable(e: &lapin::Error) -> CallError {
    CallError::Unavailable(e.to_string())
}

async fn open(
    conn: Connection,
    confirms: bool,
    shared: &Shared,
) -> Result<(Arc<Session>, Consumer), (Connection, lapin::Error)> {
    let setup = async {
        let channel = conn.create_channel().await?;
        if confirms {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        }
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
                confirms,
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
    confirms: bool,
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
        let (session, consumer) = match open(conn, confirms, &shared).await {
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
        let mut events: alarm::Events = Box::pin(session.conn.events_listener());
        alarm::probe(&session.channel, &mut events, &shared).await;
        sessions.send_replace(Some(session.clone()));
        let reason = route(&session, consumer, events, &shared, &cancel).await;
        sessions.send_replace(None);
        shared.set_blocked(None); // a new connection starts unblocked
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
async fn route(
    session: &Session,
    mut consumer: Consumer,
    mut events: alarm::Events,
    shared: &Shared,
    cancel: &CancellationToken,
) -> String {
    let mut collect = tokio::time::interval(COLLECT_RETURNS_EVERY);
    collect.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return "client dropped".into(),
            _ = collect.tick(), if !session.confirms => session.collect_returns(shared),
            // A memory or disk alarm: calls fail at once until it clears (calls already
            // published end by their deadlines, as their requests wait at the broker).
            Some(event) = events.next() => alarm::on_event(shared, event),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => dispatch(shared, &delivery.properties, delivery.data),
                Some(Err(e)) => return format!("reply consumer error: {e}"),
                None => return "reply consumer cancelled".into(),
            },
        }
    }
}

/// Hand a reply to the call waiting for its `correlation_id`, or count it late.
pub(super) fn dispatch(shared: &Shared, properties: &lapin::BasicProperties, data: Vec<u8>) {
    let id = properties
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
    let headers = properties.headers().as_ref();
    let result = match header_str(headers, ERROR_CODE_HEADER) {
        None => Ok(data),
        Some(code) => {
            let message = String::from_utf8_lossy(&data).into_owned();
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
