//! One broker connection's worth of serving: declare, qos, consume, dispatch deliveries, and
//! on shutdown drain (cancel the consumer, give back what was not started, let in-flight work
//! finish within the grace period).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::Connection;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::amqp::{Connector, DeclareError};
use crate::config::Config;
use crate::error::Error;
use crate::liveness::{Liveness, BEAT_EVERY};
use crate::queue::{declare_dead_letter_queue, ensure_service_queue, meaning};
use crate::reply_to::{KnownNodes, ReplyToPolicy};
use crate::server::ctx::RequestCtx;
use crate::server::idempotency::Idempotency;
use crate::server::ledger::Ledger;
use crate::server::metrics::Metrics;
use crate::server::reply;
use crate::server::reply_link::{close, ReplyLink};
use crate::server::request;
use crate::server::settle::Settler;
use crate::service::Methods;

/// How long after a lost connection every reply goes through the wary link: about as long
/// as requests from a failed node's clients stay in the queue (their callers' timeouts).
const WARY_AFTER_LOSS: Duration = Duration::from_secs(10);

/// What a session borrows from the daemon.
pub(super) struct Parts<'a> {
    pub config: &'a Config,
    pub methods: &'a Methods,
    pub reply_to: &'a ReplyToPolicy,
    pub metrics: &'a Metrics,
    pub ready: &'a watch::Sender<bool>,
    pub blocked: &'a watch::Sender<Option<String>>,
    pub cpu: Arc<Semaphore>,
    pub idempotency: Arc<Idempotency>,
    pub liveness: &'a Liveness,
    /// This session follows a lost one (replies are wary for a while).
    pub after_loss: bool,
}

/// How a session ended.
pub(super) enum End {
    /// Shutdown was requested; the drain's result.
    Shutdown(Result<(), Error>),
    /// The connection, channel or consumer went away: reconnect.
    Lost(String),
    /// Nothing a reconnect can fix.
    Fatal(Error),
}

pub(super) async fn serve(
    conn: &Connection,
    parts: Parts<'_>,
    shutdown: &CancellationToken,
) -> End {
    let service = &parts.config.service;
    let setup = async {
        let found = ensure_service_queue(conn, service).await?;
        if !parts.after_loss {
            tracing::info!(queue = %service.queue, ?found, "service queue: {}", meaning(&found, service));
        }
        if !service.dead_letter_queue.is_empty() {
            declare_dead_letter_queue(conn, &service.dead_letter_queue).await?;
        }
        let consume = conn.create_channel().await?;
        consume
            .basic_qos(service.prefetch, BasicQosOptions::default())
            .await?;
        // Without confirms, replies share the consume channel, so that each ack, sent once
        // its reply is written, reaches the broker behind it (see `reply::answer`).
        let reply = if service.confirm_replies {
            let reply = conn.create_channel().await?;
            reply
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            reply
        } else {
            consume.clone()
        };
        let tag = format!(
            "amqp-rpcd-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        let consumer = consume
            .basic_consume(
                service.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, DeclareError>((consume, reply, consumer, tag))
    };
    let (consume, reply, mut consumer, tag) = match setup.await {
        Ok(parts) => parts,
        Err(DeclareError::Fatal(e)) => return End::Fatal(e.into()),
        Err(e @ (DeclareError::Broker(_) | DeclareError::Missing(_))) => {
            close(conn).await;
            return End::Lost(format!("set-up failed: {e}"));
        }
    };
    let name = format!("amqp-rpcd pid={} wary replies", std::process::id());
    let wary_replies = match Connector::new(&parts.config.amqp, &name) {
        Ok(connector) => ReplyLink::new(connector, service.confirm_replies),
        Err(e) => return End::Fatal(e.into()),
    };
    let known_nodes = KnownNodes::default();
    if service.confirm_replies {
        known_nodes.learn_own_node(conn).await;
    }
    let session_lost = CancellationToken::new();
    let closing = CancellationToken::new();
    let abandon = CancellationToken::new();
    let ledger = Arc::new(Ledger::new(
        consume.clone(),
        parts.metrics.ack_frames.clone(),
    ));
    let (settler, settler_task) = Settler::spawn(
        ledger.clone(),
        parts.metrics.clone(),
        session_lost.clone(),
        closing.clone(),
    );
    let ctx = Arc::new(RequestCtx {
        methods: parts.methods.clone(),
        max_body_bytes: service.max_body_bytes,
        cpu: parts.cpu.clone(),
        reply_channel: reply,
        wary_replies,
        wary_until: parts
            .after_loss
            .then(|| tokio::time::Instant::now() + WARY_AFTER_LOSS),
        confirm_replies: service.confirm_replies,
        metrics: parts.metrics.clone(),
        draining: shutdown.clone(),
        abandon: abandon.clone(),
        idempotency: parts.idempotency.clone(),
        max_deliveries: service.max_deliveries,
        reply_to: parts.reply_to.clone(),
        known_nodes,
        callers: service.callers.clone(),
        dead_letter_queue: service.dead_letter_queue.clone(),
        settler,
        ledger,
        session_lost,
    });
    parts.ready.send_replace(true);
    parts.metrics.connection_up.set(1);
    parts.liveness.set_consuming(true);
    tracing::info!(queue = %service.queue, "consuming");

    let tracker = TaskTracker::new();
    let mut beat = tokio::time::interval(BEAT_EVERY);
    let mut events = std::pin::pin!(conn.events_listener());
    let mut alarm_probe = tokio::time::interval(ALARM_PROBE_EVERY);
    let lost = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break None,
            _ = beat.tick() => parts.liveness.beat(),
            Some(event) = events.next() => alarm(&parts, event),
            _ = alarm_probe.tick() => probe_alarm(&consume),
            _ = ctx.session_lost.cancelled() => break Some("a reply could not be published".to_owned()),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    ctx.ledger.delivered(delivery.delivery_tag);
                    tracker.spawn(request::handle(ctx.clone(), delivery));
                }
                Some(Err(e)) => break Some(format!("consumer error: {e}")),
                None => break Some("the broker cancelled our consumer (queue deleted?)".to_owned()),
            },
        }
    };
    parts.ready.send_replace(false);
    parts.metrics.connection_up.set(0);
    parts.liveness.set_consuming(false);
    if parts.blocked.send_replace(None).is_some() {
        parts.metrics.connection_blocked.set(0); // a new connection starts unblocked
    }
    tracker.close();
    if let Some(reason) = lost {
        // In-flight tasks may still finish; their acks go to a dead channel and fail, and the
        // broker redelivers. Nothing from this connection is ever acked on the next one, so
        // handlers still running are told their work is wasted.
        abandon.cancel();
        settler_task.abort();
        close(conn).await;
        ctx.wary_replies.close().await;
        return End::Lost(reason);
    }

    // One deadline bounds the whole drain, so shutdown never outlasts the grace period (and
    // systemd's TimeoutStopSec above it), even on a half-dead socket.
    let grace = Duration::from_secs(parts.config.shutdown.grace_secs);
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(in_flight = tracker.len(), ?grace, "draining");
    let cancel = consume.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
    let _ = tokio::time::timeout_at(deadline, cancel).await;
    // Deliveries already pushed to us but not started go back to the queue for another worker.
    let give_back = async {
        let mut returned = 0u32;
        while let Some(Ok(delivery)) = consumer.next().await {
            ctx.ledger.delivered(delivery.delivery_tag);
            let meta = ctx.meta(&delivery.properties);
            reply::give_back(&ctx, &meta, &delivery).await;
            returned += 1;
        }
        returned
    };
    if let Ok(returned) = tokio::time::timeout_at(deadline, give_back).await {
        if returned > 0 {
            tracing::info!(returned, "requeued deliveries that had not started");
        }
    }
    let finished = tokio::time::timeout_at(deadline, tracker.wait())
        .await
        .is_ok();
    if !finished {
        // Left unacked for redelivery: tell the handlers still running that it is over.
        abandon.cancel();
    }
    let unfinished = tracker.len();
    // The last replies' acks, before the connection closes (or they would be redelivered).
    closing.cancel();
    let drained = finished
        && tokio::time::timeout_at(deadline, settler_task)
            .await
            .is_ok();
    close(conn).await;
    ctx.wary_replies.close().await;
    End::Shutdown(if drained {
        Ok(())
    } else {
        Err(Error::DrainTimeout(unfinished))
    })
}

/// How often the daemon publishes an empty message nobody receives, so that the broker, which
/// tells a connection of an alarm only when it publishes, tells an idle daemon too.
const ALARM_PROBE_EVERY: Duration = Duration::from_secs(1);

/// Publish the alarm probe (to a reserved `amq.` name no queue can have: dropped by the
/// default exchange) on the consume channel, which is never in confirm mode. Started, not
/// awaited: while the broker blocks the connection nothing it writes is read anyway.
fn probe_alarm(channel: &lapin::Channel) {
    let _ = crate::publish::Publish::start(
        channel,
        "amq.amqp-rpc.alarm-probe".into(),
        Default::default(),
        Vec::new(),
        Default::default(),
    );
}

/// The broker blocks a connection that publishes while a memory or disk alarm is on
/// (`connection.blocked`), and unblocks it when the alarm clears. Requests keep arriving and
/// their work runs, but no reply leaves until then, so the callers' deadlines may pass: said
/// here, in `amqp_rpc_connection_blocked` and in `/readyz`, so an operator can tell why calls
/// time out. Nothing else changes: the consume loop keeps beating (an alarm must not get the
/// daemon restarted by its own liveness probe) and replies go out when the broker lets them.
fn alarm(parts: &Parts<'_>, event: lapin::Event) {
    match event {
        lapin::Event::ConnectionBlocked(reason) => {
            tracing::warn!(%reason, "the broker blocked this connection: replies wait until it clears");
            parts.metrics.connection_blocked.set(1);
            parts.blocked.send_replace(Some(reason));
        }
        lapin::Event::ConnectionUnblocked => {
            tracing::warn!("the broker unblocked this connection");
            parts.metrics.connection_blocked.set(0);
            parts.blocked.send_replace(None);
        }
        _ => {}
    }
}
