//! The sending side of a delivery, carrying out what `decide.rs` decided: starting the reply
//! and handing it to the settler, which acks once the broker confirmed it (with
//! `confirm_replies`) or lapin wrote it (without); wary replies, published and acked here one
//! at a time; giving work back during a drain; giving up on poison requests (the dead-letter
//! copy).
//!
//! The order is the contract's at-least-once rule: a request is acked only after its reply was
//! handed to the broker; when that fails the request stays unacked and is redelivered.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::types::AMQPValue;
use lapin::BasicProperties;

use crate::protocol::{now_epoch_ms, reply_properties, ErrorCode, RequestMeta, DIRECT_REPLY_TO};
use crate::publish::Publish;
use crate::server::ctx::RequestCtx;
use crate::server::decide::{
    delivered_before, drained, given_up, method_label, too_late_to_reply, Drained, Reply,
};
use crate::server::metrics::Rejected;
use crate::server::settle::Settling;
use crate::trace;

/// Publish `result` to the caller and ack, or leave the request for redelivery when the reply
/// cannot be handed over.
pub(super) async fn answer(
    ctx: &RequestCtx,
    meta: &RequestMeta,
    delivery: &Delivery,
    label: &str,
    result: &Reply,
) {
    let Some(reply_to) = meta.reply_to.as_deref() else {
        return; // checked by the caller; nothing to answer
    };
    let outcome = match result {
        Ok(_) => "ok",
        Err(e) => e.code.as_str(),
    };
    let remaining = meta.remaining(now_epoch_ms());
    if too_late_to_reply(remaining) {
        tracing::debug!(outcome, "finished after the deadline, not replying");
        trace::answered("deadline_exceeded");
        ctx.metrics.request(label, "deadline_exceeded").inc();
        ack(ctx, delivery);
        return;
    }
    if let Err(e) = result {
        tracing::info!(code = %e.code, message = %e.message, "error reply");
    }
    trace::answered(outcome);
    let answered = ctx.metrics.request(label, outcome);
    if !wary(ctx, meta, delivery) {
        let (body, props) = reply_parts(ctx, meta, result, remaining);
        // Started, not awaited, and handed to the settler, which acks once the broker has
        // confirmed the reply (with `confirm_replies`) or once lapin has written it (without:
        // the reply channel is then the consume channel itself, so the broker sees the reply
        // before the ack). The ack must not be queued right behind the publish: lapin writes
        // queued acks ahead of queued publishes, so it would overtake its reply.
        let published = Publish::start(
            &ctx.reply_channel,
            reply_to.into(),
            BasicPublishOptions::default(),
            body.to_vec(),
            props,
        )
        .map(|reply| {
            ctx.settler.hand_over(Settling {
                reply,
                delivery_tag: delivery.delivery_tag,
                answered,
            })
        });
        if let Err(e) = published {
            lost(ctx, &e);
        }
        return;
    }
    match publish_wary(ctx, reply_to, meta, result, remaining).await {
        Ok(()) => {
            if ctx.confirm_replies {
                ctx.known_nodes.learned(reply_to); // confirmed: its node is running
            }
            answered.inc();
            ack(ctx, delivery);
        }
        Err(failure @ (PublishFailure::Nacked | PublishFailure::WaryUnavailable(_))) => {
            // Nothing was said about this request: another attempt may well succeed.
            ctx.metrics.reply_publish_failures.inc();
            tracing::warn!(error = %failure, "reply not handed over; requeueing the request");
            requeue(ctx, delivery);
        }
        Err(PublishFailure::Wary(e)) => {
            // Wary replies go one at a time, so this reply is what broke the link (the next
            // wary reply reopens it): its reply-to is unreachable, most likely a client of a
            // failed broker node. Requeued, it would only break the link again until its
            // delivery limit, so it ends here.
            ctx.metrics.reply_publish_failures.inc();
            ctx.metrics.reject(Rejected::ReplyToUnreachable);
            tracing::warn!(error = %e, "reply-to unreachable; acking the request without a reply");
            ack(ctx, delivery);
        }
    }
}

/// The reply channel failed: ending the session closes the connection, so the broker
/// redelivers this request and every other one left without a reply, instead of the daemon
/// sitting on them with a dead channel.
fn lost(ctx: &RequestCtx, e: &lapin::Error) {
    ctx.metrics.reply_publish_failures.inc();
    tracing::warn!(error = %e, "could not publish the reply; reconnecting");
    ctx.session_lost.cancel();
}

/// A request seen more than `max_deliveries` times: answer `internal` without running it, copy
/// it to the dead-letter queue when one is configured, and ack so it never loops.
pub(super) async fn give_up(
    ctx: &RequestCtx,
    meta: &RequestMeta,
    delivery: &Delivery,
    attempt: u32,
    label: &str,
) {
    tracing::error!(attempt, "poison request: giving up");
    ctx.metrics.poison.inc();
    if !ctx.dead_letter_queue.is_empty() {
        // A copy for inspection: the request's identity and headers, but not its expiration
        // (the copy must outlive the caller's deadline).
        let original = &delivery.properties;
        let mut headers = original.headers().clone().unwrap_or_default();
        headers.insert(
            "x-poison-attempts".into(),
            // `I`, not `l`: a DLQ consumer on Net::AMQP cannot decode 64-bit integers.
            AMQPValue::LongInt(i32::try_from(attempt).unwrap_or(i32::MAX)),
        );
        let mut props = BasicProperties::default().with_headers(headers);
        if let Some(v) = original.correlation_id() {
            props = props.with_correlation_id(v.clone());
        }
        if let Some(v) = original.reply_to() {
            props = props.with_reply_to(v.clone());
        }
        if let Some(v) = original.message_id() {
            props = props.with_message_id(v.clone());
        }
        if let Some(v) = original.kind() {
            props = props.with_type(v.clone());
        }
        let copy = ctx.reply_channel.basic_publish(
            "".into(),
            ctx.dead_letter_queue.as_str().into(),
            BasicPublishOptions::default(),
            &delivery.data,
            props,
        );
        // Confirmed (when replies are) before the ack below, so the copy is not lost.
        let copied = match copy.await {
            Ok(confirm) if ctx.confirm_replies => confirm.await.map(drop),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = copied {
            tracing::warn!(error = %e, "could not copy the poison request to the dead-letter queue");
        }
    }
    let error = given_up(attempt, ctx.max_deliveries);
    answer(ctx, meta, delivery, label, &error).await;
}

#[derive(Debug, thiserror::Error)]
enum PublishFailure {
    #[error("the broker refused the reply")]
    Nacked,
    /// Publishing on the wary link broke it; the session is fine.
    #[error("wary reply link: {0}")]
    Wary(String),
    /// The wary link could not be opened.
    #[error("no connection for a wary reply: {0}")]
    WaryUnavailable(String),
}

/// Whether a reply may crash the connection that publishes it (see `reply_link.rs`): the
/// request was delivered before (its first worker's connection may have died with a broker
/// node), or this session follows a lost connection and the queue may still hold requests
/// from a failed node's clients.
fn wary(ctx: &RequestCtx, meta: &RequestMeta, delivery: &Delivery) -> bool {
    delivered_before(meta, delivery.redelivered)
        || ctx
            .wary_until
            .is_some_and(|until| tokio::time::Instant::now() < until)
        // A node this session has not replied to yet may not be running (see
        // `reply_to::KnownNodes`). Without confirms nothing would tell that it is, so then
        // only the rules above apply.
        || (ctx.confirm_replies
            && meta
                .reply_to
                .as_deref()
                .is_some_and(|to| ctx.known_nodes.risky(to)))
}

/// The reply's body and properties: a success reply carries its method's content type.
fn reply_parts<'r>(
    ctx: &RequestCtx,
    meta: &RequestMeta,
    result: &'r Reply,
    remaining: Option<Duration>,
) -> (&'r [u8], BasicProperties) {
    let (body, code) = match result {
        Ok(body) => (body.as_slice(), None),
        Err(e) => (e.message.as_bytes(), Some(e.code)),
    };
    // A direct reply-to reply is never queued, so a TTL on it does nothing; leaving it out
    // spares the broker a property to decode and re-encode (RabbitMQ 4.x re-encodes every
    // delivered message's properties). A named reply queue keeps it: nobody waits past it.
    let ttl = remaining.filter(|_| {
        !meta
            .reply_to
            .as_deref()
            .is_some_and(|to| to.starts_with(DIRECT_REPLY_TO))
    });
    let mut props =
        trace::inject_reply(reply_properties(meta.correlation_id.as_deref(), code, ttl));
    if result.is_ok() {
        if let Some(content_type) = ctx.methods.get(&meta.method).and_then(|m| m.content_type()) {
            props = props.with_content_type(content_type.into());
        }
    }
    (body, props)
}

/// Publish a wary reply on the wary link, one at a time, and wait for it to be handed over.
async fn publish_wary(
    ctx: &RequestCtx,
    reply_to: &str,
    meta: &RequestMeta,
    result: &Reply,
    remaining: Option<Duration>,
) -> Result<(), PublishFailure> {
    let (body, props) = reply_parts(ctx, meta, result, remaining);
    let _one_at_a_time = ctx.wary_replies.one_at_a_time.lock().await;
    let channel = ctx
        .wary_replies
        .channel()
        .await
        .map_err(PublishFailure::WaryUnavailable)?;
    match send(ctx, &channel, reply_to, body, props).await {
        Ok(false) => Ok(()),
        Ok(true) => Err(PublishFailure::Nacked),
        Err(e) => Err(PublishFailure::Wary(e.to_string())),
    }
}

/// Publish one reply and wait for it; `Ok(true)` when the broker nacked it.
async fn send(
    ctx: &RequestCtx,
    channel: &lapin::Channel,
    reply_to: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<bool, lapin::Error> {
    let confirm = channel
        .basic_publish(
            "".into(),
            reply_to.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await?;
    match ctx.confirm_replies {
        true => confirm.await.map(|c| c.is_nack()),
        false => Ok(false),
    }
}

/// Return a request that was not started because the daemon is draining: requeue it for
/// another worker, or answer `unavailable` when too little time is left for that to help.
pub(super) async fn give_back(ctx: &RequestCtx, meta: &RequestMeta, delivery: &Delivery) {
    let remaining = meta.remaining(now_epoch_ms());
    if let Drained::Refuse { reply_to, error } = drained(meta, remaining) {
        if let Err(refusal) = ctx.reply_to.check(reply_to) {
            // Never published to; another worker would refuse it as well.
            ctx.metrics.reject(Rejected::from(refusal));
            ack(ctx, delivery);
            return;
        }
        // Waited for here, not settled later: the drain closes the connection soon after.
        let published = match wary(ctx, meta, delivery) {
            true => publish_wary(ctx, reply_to, meta, &error, remaining)
                .await
                .is_ok(),
            false => {
                let (body, props) = reply_parts(ctx, meta, &error, remaining);
                let sent = send(ctx, &ctx.reply_channel, reply_to, body, props).await;
                matches!(sent, Ok(false))
            }
        };
        if published {
            let label = method_label(&ctx.methods, &meta.method);
            ctx.metrics
                .request(label, ErrorCode::Unavailable.as_str())
                .inc();
            ack(ctx, delivery);
            return;
        }
    }
    requeue(ctx, delivery);
}

/// Requeue a request, through the ledger (see `ledger.rs`).
fn requeue(ctx: &RequestCtx, delivery: &Delivery) {
    ctx.ledger.reject(delivery.delivery_tag, true);
}

/// Acknowledge a delivery on the consume channel, through the ledger, without waiting.
///
/// lapin's `Acker::ack` goes through its internal RPC task and then waits until the frame is
/// written: two thread hand-offs per request that tell nothing (the broker never confirms an
/// ack), seen in profiles as a third of the daemon's wake-ups. `basic_ack` queues the frame on
/// its first poll, which is all we need: an ack can only be lost with its connection, and then
/// the broker redelivers the request, which the reply cache answers again.
pub(super) fn ack(ctx: &RequestCtx, delivery: &Delivery) {
    ctx.ledger.ack(delivery.delivery_tag);
}
