//! One call's path: the retry loop within the deadline, each attempt's publish and its wait
//! for the reply (or for what the broker said of the request), and the JSON bodies of typed
//! calls.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::Instant;
use tracing::Instrument;

use super::session::Session;
use super::shared::ReplyResult;
use super::{CallError, CallOptions, Inner, Target, NO_SERVER_RETRY_WINDOW, SERVED_RECENTLY};
use crate::amqp::jittered;
use crate::protocol::{
    deadline_header_value, expiration_ms, now_epoch_ms, ErrorCode, DEADLINE_HEADER,
    DIRECT_REPLY_TO, JSON_CONTENT_TYPE,
};
use crate::publish::Publish;
use crate::trace;

const RETRY_INITIAL_BACKOFF: Duration = Duration::from_millis(25);
const RETRY_MAX_BACKOFF: Duration = Duration::from_millis(500);

/// How long a call waits for its reply before it looks at its publish confirm: a request the
/// broker returned (no queue) or refused is reported this soon.
const CONFIRM_GRACE: Duration = Duration::from_millis(25);

/// Without confirms, a late call looks for its request among the returned ones again after
/// twice as long each time, up to this: how late a `NoServer` can be at worst, when the
/// broker's return itself came late.
const RETURN_LOOK_MAX: Duration = Duration::from_millis(400);

/// `start + timeout`, saturating: a `Duration::MAX` timeout means "about never", not a panic.
pub(super) fn far(start: Instant, timeout: Duration) -> Instant {
    start
        .checked_add(timeout)
        .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// A reply, or `ConnectionLost` when its sender went away: the router drops senders only
/// after failing every pending call with an explicit `ConnectionLost`, so a bare drop means the
/// same.
fn reply_result(
    received: Result<ReplyResult, tokio::sync::oneshot::error::RecvError>,
) -> ReplyResult {
    received.unwrap_or(Err(CallError::ConnectionLost))
}

/// The JSON body of a request.
pub(super) fn encode_json<Req: Serialize + ?Sized>(request: &Req) -> Result<Vec<u8>, CallError> {
    serde_json::to_vec(request).map_err(|e| CallError::Remote {
        code: ErrorCode::InvalidArgument,
        message: format!("the request does not serialize as JSON: {e}"),
    })
}

/// A reply body as `Resp`: one that is not is a reply that breaks the method's promise, the
/// server's fault (`internal`), as [`Client::fib`] treats a reply that is not a number.
pub(super) fn decode_json<Resp: DeserializeOwned>(body: &[u8]) -> Result<Resp, CallError> {
    serde_json::from_slice(body).map_err(|e| CallError::Remote {
        code: ErrorCode::Internal,
        message: format!(
            "the server's reply does not deserialize as {}: {e}",
            std::any::type_name::<Resp>()
        ),
    })
}

impl Inner {
    /// A call of `method` on `target`'s queue, in its span; see [`Client::call_with`] for the
    /// retries.
    pub(super) async fn call(
        &self,
        target: &Target,
        method: &str,
        body: &[u8],
        content_type: Option<&'static str>,
        options: CallOptions,
    ) -> Result<Vec<u8>, CallError> {
        let span = trace::call_span(method, &target.queue);
        let result = self
            .call_in_span(target, method, body, content_type, options)
            .instrument(span.clone())
            .await;
        trace::call_ended(
            &span,
            result.as_ref().map_or_else(CallError::kind, |_| "ok"),
        );
        result
    }

    async fn call_in_span(
        &self,
        target: &Target,
        method: &str,
        body: &[u8],
        content_type: Option<&'static str>,
        options: CallOptions,
    ) -> Result<Vec<u8>, CallError> {
        if method.is_empty() || method.len() > 255 {
            return Err(CallError::Remote {
                code: ErrorCode::InvalidArgument,
                message: "method names are 1 to 255 bytes".into(),
            });
        }
        if target.queue.len() > 255 {
            // AMQP cannot even carry it; the request would never leave.
            return Err(CallError::Remote {
                code: ErrorCode::InvalidArgument,
                message: "queue names are at most 255 bytes".into(),
            });
        }
        let started = Instant::now();
        let deadline = far(started, options.timeout);
        let timeout_ms = u64::try_from(options.timeout.as_millis()).unwrap_or(u64::MAX);
        let deadline_ms = now_epoch_ms()
            .saturating_add(timeout_ms)
            .min(i64::MAX as u64);
        // Only a call that may be sent again needs a name for its copies: without one, the
        // server still answers a broker redelivery from its cache (its key then is
        // reply_to + correlation_id + method + body), and the broker has a field less to decode
        // and re-encode per message (RabbitMQ 4.x re-encodes every delivered message's
        // properties; BENCHMARKS.md prices the request metadata there).
        let message_id = options.idempotent.then(|| self.ids.next());
        let mut backoff = RETRY_INITIAL_BACKOFF;
        for attempt in 1.. {
            let request = Request {
                method,
                body,
                content_type,
                deadline,
                deadline_ms,
                message_id: message_id.as_deref(),
            };
            let attempt = self
                .attempt(target, request)
                .instrument(trace::attempt_span(&target.queue, attempt));
            let result = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Err(CallError::Timeout(_))) | Err(_) => Err(CallError::Timeout(options.timeout)),
                Ok(result) => result,
            };
            let pause = jittered(backoff);
            let retry = match &result {
                // A queue nobody served lately is reported within about a second (the next
                // attempt must still start inside the window); one served a moment ago is
                // waited for, up to the deadline.
                Err(CallError::NoServer { .. }) => {
                    started.elapsed() + pause < NO_SERVER_RETRY_WINDOW
                        || target.state.served_within(&self.shared, SERVED_RECENTLY)
                }
                // Blocked is said at once: the alarm lasts until an operator acts.
                Err(CallError::Blocked(_)) => false,
                Err(e) => e.is_connection_lost() || e.is_unavailable(),
                Ok(_) => false,
            };
            if !options.idempotent || !retry || Instant::now() + pause >= deadline {
                return result;
            }
            tracing::debug!(
                queue = &*target.queue,
                error = ?result.as_ref().err(),
                ?pause,
                "retrying an idempotent call"
            );
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(RETRY_MAX_BACKOFF);
        }
        unreachable!("attempts are counted in u32 and end by the deadline")
    }

    /// A JSON call on `target`'s queue.
    pub(super) async fn call_json<Req, Resp>(
        &self,
        target: &Target,
        method: &str,
        request: &Req,
        options: CallOptions,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let body = encode_json(request)?;
        let reply = self
            .call(target, method, &body, Some(JSON_CONTENT_TYPE), options)
            .await?;
        decode_json(&reply)
    }

    /// One request/reply exchange, bounded by the caller's deadline.
    async fn attempt(&self, target: &Target, request: Request<'_>) -> Result<Vec<u8>, CallError> {
        // An attempt may end without awaiting anything (the connection blocked, the queue
        // known unserved): a caller looping on such failures must still yield, or it starves
        // the runtime's other tasks, the router that hears of the unblock and the timers of
        // other calls among them (a blocked load once held a call 7 s past its 3 s deadline).
        tokio::task::coop::consume_budget().await;
        let Request {
            method,
            body,
            content_type,
            deadline,
            deadline_ms,
            message_id,
        } = request;
        let session = self.session(deadline).await?;
        if let Some(reason) = self.shared.blocked() {
            return Err(CallError::Blocked(reason));
        }
        if session.needs_probe(&target.state, &self.shared) {
            // Boxed: every pending call's future would otherwise be as large as this rare
            // path's (BENCHMARKS.md, Floods: memory per pending call).
            Box::pin(session.check_server(&target.queue, &target.state, &self.shared)).await?;
        }
        let id = self.ids.next();
        let (_guard, mut reply) = self.shared.register(id.clone());
        let mut headers = FieldTable::default();
        headers.insert(DEADLINE_HEADER.into(), deadline_header_value(deadline_ms));
        trace::inject_request(&mut headers, &id);
        let mut props = BasicProperties::default()
            .with_reply_to(DIRECT_REPLY_TO.into())
            .with_correlation_id(id.into());
        if let Some(message_id) = message_id {
            props = props.with_message_id(message_id.into());
        }
        if let Some(content_type) = content_type {
            props = props.with_content_type(content_type.into());
        }
        if let Some(user) = self.user_id.as_deref() {
            props = props.with_user_id(user.into());
        }
        let props = props
            .with_type(method.into())
            .with_expiration(expiration_ms(deadline - Instant::now()).into())
            .with_headers(headers);
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        // The reply alone proves the request was routed, so neither the write nor the confirm
        // is awaited on the way to it: each would cost the call a thread wake-up (profiled:
        // one futex and one socket read more per call than a bare client). They are looked at
        // when the reply is late, which is when they matter: a request returned as
        // unroutable (`NoServer`), nacked, or never written.
        let queue = target.queue.as_ref().into();
        let mut publish = Some(
            Publish::start(&session.channel, queue, options, body.to_vec(), props)
                .map_err(|_| CallError::ConnectionLost)?,
        );
        let mut look_after = CONFIRM_GRACE;
        loop {
            let look = tokio::time::sleep_until(deadline.min(Instant::now() + look_after));
            tokio::select! {
                biased;
                result = &mut reply => return reply_result(result),
                _ = look => {}
            }
            if session.confirms {
                let publish = publish.as_mut().expect("looked at once in confirm mode");
                return match publish.confirmation().await {
                    Err(_) => Err(CallError::ConnectionLost),
                    Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned))) => {
                        Err(CallError::returned(
                            &target.queue,
                            returned.reply_text.as_str(),
                        ))
                    }
                    Ok(Confirmation::Nack(None)) => Err(CallError::Unavailable(
                        "the broker refused the request".into(),
                    )),
                    Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => {
                        reply_result(reply.await)
                    }
                };
            }
            // Without confirms the broker says nothing of a routed request, and lapin keeps a
            // returned one until asked: ask, handing every returned request to its call (this
            // one's included, through `reply`), and look again later, less and less often.
            if let Some(started) = publish.as_mut() {
                match started.peek() {
                    Some(Err(_)) => return Err(CallError::ConnectionLost),
                    Some(Ok(_)) => publish = None, // written
                    None => {}
                }
            }
            session.collect_returns(&self.shared);
            if Instant::now() >= deadline {
                return Err(CallError::Timeout(Duration::ZERO)); // the caller's own timeout
            }
            look_after = (look_after * 2).min(RETURN_LOOK_MAX);
        }
    }

    pub(super) async fn session(&self, deadline: Instant) -> Result<Arc<Session>, CallError> {
        // The common case, connected: no receiver clone and no timer.
        if let Some(session) = self.sessions.borrow().as_ref() {
            return Ok(session.clone());
        }
        Box::pin(self.wait_for_session(deadline)).await
    }

    /// The rare path of [`session`](Self::session): no connection yet, or a reconnect.
    async fn wait_for_session(&self, deadline: Instant) -> Result<Arc<Session>, CallError> {
        let mut sessions = self.sessions.clone();
        let wait = async {
            sessions
                .wait_for(|s| s.is_some())
                .await
                .map(|s| s.clone().expect("wait_for checked Some"))
        };
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(Ok(session)) => Ok(session),
            Ok(Err(_)) => Err(CallError::Unavailable("client is shutting down".into())),
            Err(_) => {
                let last = self.shared.last_error.lock().expect("lock").clone();
                Err(CallError::Unavailable(if last.is_empty() {
                    "not connected to the broker yet".into()
                } else {
                    last
                }))
            }
        }
    }
}

/// What one attempt sends.
#[derive(Clone, Copy)]
struct Request<'a> {
    method: &'a str,
    body: &'a [u8],
    /// None for raw bytes: a property the broker would only carry along (RabbitMQ 4.x decodes
    /// and re-encodes each one per hop), and "text/plain" was never true of every raw body.
    content_type: Option<&'static str>,
    deadline: Instant,
    deadline_ms: u64,
    /// Idempotent calls only: every attempt carries the same one.
    message_id: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Pong {
        seq: u64,
    }

    #[test]
    fn json_bodies_and_their_errors() {
        assert_eq!(
            encode_json(&serde_json::json!({"seq": 1})).unwrap(),
            br#"{"seq":1}"#
        );
        assert_eq!(
            decode_json::<Pong>(br#"{"seq":7}"#).unwrap(),
            Pong { seq: 7 }
        );
        for bad in [
            &b"not json"[..],
            b"",
            br#"{"sequence":7}"#,
            b"7",
            br#"{"seq":-1}"#,
        ] {
            let err = decode_json::<Pong>(bad).unwrap_err();
            assert_eq!(err.remote_code(), Some(ErrorCode::Internal), "{err:?}");
            assert!(!err.is_retryable() && !err.is_timeout() && !err.is_no_server());
            assert!(err.to_string().contains("does not deserialize as"), "{err}");
        }
        // A map with non-string keys has no JSON form.
        let map: std::collections::HashMap<(u8, u8), u8> = [((1, 2), 3)].into();
        let err = encode_json(&map).unwrap_err();
        assert_eq!(
            err.remote_code(),
            Some(ErrorCode::InvalidArgument),
            "{err:?}"
        );
    }
}
