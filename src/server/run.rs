//! Running a decided [`Job`]: under the method's own limit and `service.concurrency`, within
//! the request's deadline, with panics caught, and given back when a drain starts before it
//! did. What it leads to is an [`Outcome`]; sending it is `reply.rs`'s part.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use lapin::message::Delivery;
use tracing::Instrument;

use crate::protocol::{now_epoch_ms, ErrorCode, RequestError, RequestMeta};
use crate::server::ctx::RequestCtx;
use crate::server::decide::{panicked, Job, Reply};
use crate::server::idempotency::CachedReply;
use crate::service::{Request, Work};

/// An error reply is sent this long before the caller's deadline at the latest, so it still
/// arrives while the caller waits (a reply after the deadline is only noise).
pub const REPLY_MARGIN: Duration = Duration::from_millis(20);

/// What running a request's work led to.
#[derive(Clone, Debug)]
pub(super) enum Outcome {
    /// Send this reply (shared with the reply cache, never copied).
    Reply(CachedReply),
    /// The deadline passed before work started: ack, no reply.
    Expired,
    /// Draining began before the work started: hand the request back.
    GiveBack,
    /// The work ended after its session was lost or a drain gave up on it: whatever it
    /// answered is neither sent nor cached (the request stays unacked, so the broker
    /// redelivers it, and that copy is run again).
    Abandoned,
}

impl Outcome {
    fn reply(result: Reply) -> Self {
        Outcome::Reply(std::sync::Arc::new(result))
    }
}

/// Run a method's work under its limits and the deadline: CPU work on the blocking pool under
/// `service.concurrency`, async work on the reactor. Gives up with a `deadline_exceeded` reply
/// that still arrives in time when the deadline draws near, and then cancels the handler's
/// [`Request::cancelled`] (an async handler's future is dropped as well).
pub(super) async fn run(
    ctx: &RequestCtx,
    meta: &RequestMeta,
    delivery: &Delivery,
    attempt: u32,
    job: Job,
) -> Outcome {
    let give_up_at = give_up_at(meta);
    let too_late = too_late;
    let needs_cpu = matches!(job.work, Work::Heavy(_) | Work::Blocking(_));
    let acquire = async {
        let own = match &job.limit {
            Some(limit) => Some(limit.clone().acquire_owned().await),
            None => None,
        };
        let cpu = match needs_cpu {
            true => Some(ctx.cpu.clone().acquire_owned().await),
            false => None,
        };
        (own, cpu)
    };
    let acquire = async {
        tokio::select! {
            biased;
            permits = acquire => Some(permits),
            _ = ctx.draining.cancelled() => None,
        }
    };
    let permits = match until(give_up_at, acquire).await {
        None => return too_late(),
        Some(None) => return Outcome::GiveBack,
        Some(Some((Some(Err(_)), _) | (_, Some(Err(_))))) => unreachable!("never closed"),
        Some(Some(permits)) => permits,
    };
    if meta.expired(now_epoch_ms()) {
        return Outcome::Expired;
    }
    let cancel = ctx.abandon.child_token();
    let request = || {
        Request::new(
            delivery.data.clone(),
            meta.clone(),
            &delivery.properties,
            attempt,
            delivery.redelivered,
            cancel.clone(),
        )
    };
    // The permits move into the work: if we stop waiting, the limits still count a blocking
    // thread until it really finishes (an async handler's future is dropped with them).
    let span = job.span;
    let blocking = |permits: Permits, work: Box<dyn FnOnce() -> Reply + Send>| {
        let span = span.clone();
        tokio::task::spawn_blocking(move || {
            let _permits = permits;
            span.in_scope(work)
        })
    };
    let finished = match job.work {
        Work::Done(body) => Some(Ok(Ok(body))),
        Work::Heavy(work) => until(give_up_at, blocking(permits, work)).await.map(joined),
        Work::Blocking(work) => {
            let req = request();
            until(give_up_at, blocking(permits, Box::new(move || work(req))))
                .await
                .map(joined)
        }
        Work::Async(work) => {
            // A handler may panic before its future exists (in the closure) or in it.
            let Ok(reply) =
                span.in_scope(|| std::panic::catch_unwind(AssertUnwindSafe(|| work(request()))))
            else {
                return Outcome::reply(Err(panicked()));
            };
            let reply = AssertUnwindSafe(reply)
                .catch_unwind()
                .instrument(span.clone());
            let reply = async move {
                let _permits = permits;
                reply.await
            };
            until(give_up_at, reply)
                .await
                .map(|r| r.map_err(|_| Failed::Panicked))
        }
    };
    if ctx.abandon.is_cancelled() {
        return Outcome::Abandoned;
    }
    match finished {
        None => {
            cancel.cancel();
            too_late()
        }
        Some(Ok(result)) => Outcome::reply(result),
        Some(Err(Failed::Panicked)) => Outcome::reply(Err(panicked())),
        Some(Err(Failed::Other(e))) => Outcome::reply(Err(RequestError::new(
            ErrorCode::Internal,
            format!("handler task failed: {e}"),
        ))),
    }
}

/// The reply of work that could not finish before its deadline.
pub(super) fn too_late() -> Outcome {
    Outcome::reply(Err(RequestError::new(
        ErrorCode::DeadlineExceeded,
        "the work could not finish before the request's deadline",
    )))
}

/// When a request gives up waiting (for permits, its work, or a copy's run): [`REPLY_MARGIN`]
/// before its deadline, so the `deadline_exceeded` reply still arrives in time.
pub(super) fn give_up_at(meta: &RequestMeta) -> Option<tokio::time::Instant> {
    meta.remaining(now_epoch_ms())
        .map(|left| tokio::time::Instant::now() + left.saturating_sub(REPLY_MARGIN))
}

/// The permits a running request holds: its method's own, and a CPU one for blocking work.
type Permits = (
    Option<Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError>>,
    Option<Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError>>,
);

/// How running a handler failed, other than by its own error.
enum Failed {
    Panicked,
    Other(String),
}

/// A blocking task's end, as [`Failed`].
fn joined(r: Result<Reply, tokio::task::JoinError>) -> Result<Reply, Failed> {
    r.map_err(|e| match e.is_panic() {
        true => Failed::Panicked,
        false => Failed::Other(e.to_string()),
    })
}

/// Await `fut`, or give up at `at` (never, when there is no deadline).
async fn until<F: std::future::Future>(
    at: Option<tokio::time::Instant>,
    fut: F,
) -> Option<F::Output> {
    match at {
        Some(at) => tokio::time::timeout_at(at, fut).await.ok(),
        None => Some(fut.await),
    }
}
