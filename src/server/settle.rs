//! The settler: acks each request once its reply is confirmed (or, without `confirm_replies`,
//! written), off the latency path.
//!
//! The contract acks a request only after its reply was handed to the broker (confirmed, with
//! `confirm_replies`; written to the connection without, the reply then going out on the
//! consume channel itself, ahead of the ack). Awaiting that in the request's own task costs two wake-ups of the
//! daemon's thread per request (the reply written, then confirmed), and they come right when
//! the broker is routing the reply and the caller is sending its next request: on a 2-core
//! machine, that is CPU taken from the next call. So a request task only starts its reply (see
//! `publish.rs`) and hands it here; the settler looks at the replies when it is awake anyway,
//! at the next hand-over, and acks those that are in. Only when nothing new comes for
//! [`SETTLE_PAUSE`] does it wait for the oldest reply with a real wake-up.
//!
//! Replies are settled in the order they were published, which is the order the broker writes
//! them and confirms them in, so looking at the oldest first is enough. The acks of everything
//! settled at one look go to the ledger as one batch: one `multiple` ack where they are
//! contiguous (see `ledger.rs`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use lapin::Confirmation;
use prometheus::IntCounter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::publish::Publish;
use crate::server::ledger::Ledger;
use crate::server::metrics::Metrics;

/// How long the settler waits for another hand-over before it waits for the oldest reply's
/// verdict with a wake-up of its own. Short next to any deadline: only the ack waits, and the
/// prefetch window is what the wait holds.
pub const SETTLE_PAUSE: Duration = Duration::from_millis(2);

/// A reply on its way, and what to do once it is in.
pub(super) struct Settling {
    pub reply: Publish,
    pub delivery_tag: u64,
    /// `amqp_rpc_requests_total{method,outcome}` of this request, counted once the reply is in.
    pub answered: IntCounter,
}

/// Where request tasks hand their replies over.
#[derive(Clone, Debug)]
pub(super) struct Settler {
    tx: mpsc::UnboundedSender<Settling>,
}

impl Settler {
    /// Start settling for one session's consume channel. The task ends after `closing` fires
    /// (the drain, once no request task is left) and everything handed over is settled; or at
    /// once when the session is lost (`session_lost`), leaving the rest unacked for the broker
    /// to redeliver.
    pub fn spawn(
        ledger: Arc<Ledger>,
        metrics: Metrics,
        session_lost: CancellationToken,
        closing: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(rx, ledger, metrics, session_lost, closing));
        (Settler { tx }, task)
    }

    /// Hand a started reply over. When the settler is gone (the session is ending), the reply
    /// is dropped unacked and the broker redelivers the request.
    pub fn hand_over(&self, settling: Settling) {
        let _ = self.tx.send(settling);
    }
}

impl std::fmt::Debug for Settling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settling")
            .field("delivery_tag", &self.delivery_tag)
            .finish_non_exhaustive()
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Settling>,
    ledger: Arc<Ledger>,
    metrics: Metrics,
    session_lost: CancellationToken,
    closing: CancellationToken,
) {
    let mut waiting: VecDeque<Settling> = VecDeque::new();
    let mut acks: Vec<u64> = Vec::new();
    let mut open = true;
    loop {
        // Everything already in, oldest first, without registering a wake-up.
        while let Some(oldest) = waiting.front_mut() {
            let Some(verdict) = oldest.reply.peek() else {
                break;
            };
            let settled = waiting.pop_front().expect("front exists");
            if !settle(
                &ledger,
                &metrics,
                &session_lost,
                settled,
                verdict,
                &mut acks,
            ) {
                return;
            }
        }
        ledger.ack_all(&mut acks);
        acks.clear();
        if waiting.is_empty() && !open {
            return;
        }
        let more = async {
            match open {
                true => rx.recv().await,
                false => std::future::pending().await,
            }
        };
        let oldest = async {
            match waiting.front_mut() {
                Some(oldest) => {
                    tokio::time::sleep(SETTLE_PAUSE).await;
                    oldest.reply.confirmation().await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = session_lost.cancelled() => return,
            _ = closing.cancelled(), if open => {
                while let Ok(settling) = rx.try_recv() {
                    waiting.push_back(settling);
                }
                open = false;
            }
            next = more => match next {
                Some(settling) => {
                    waiting.push_back(settling);
                    // Take every hand-over already queued before the next look, so that replies
                    // which went out together are acked together rather than one look (and one
                    // ack frame) each.
                    while let Ok(settling) = rx.try_recv() {
                        waiting.push_back(settling);
                    }
                }
                None => open = false,
            },
            verdict = oldest => {
                let settled = waiting.pop_front().expect("awaited the front");
                if !settle(&ledger, &metrics, &session_lost, settled, verdict, &mut acks) {
                    return;
                }
            }
        }
    }
}

/// Settle one request by its reply's verdict: its tag joins `acks`, or it is requeued at once;
/// `false` when the session is lost.
fn settle(
    ledger: &Ledger,
    metrics: &Metrics,
    session_lost: &CancellationToken,
    settled: Settling,
    verdict: lapin::Result<Confirmation>,
    acks: &mut Vec<u64>,
) -> bool {
    let tag = settled.delivery_tag;
    match verdict {
        Ok(Confirmation::Nack(_)) => {
            // Nothing was said about this request: another attempt may well succeed.
            metrics.reply_publish_failures.inc();
            tracing::warn!(delivery_tag = tag, "the broker refused a reply; requeueing");
            ledger.reject(tag, true);
        }
        Ok(_) => {
            settled.answered.inc();
            acks.push(tag);
        }
        Err(e) => {
            // The reply channel is gone: ending the session closes the connection, so the
            // broker redelivers this request and every other one left without a reply, and
            // also those of this look not acked yet (the reply cache answers them again).
            metrics.reply_publish_failures.inc();
            tracing::warn!(error = %e, "could not publish a reply; reconnecting");
            session_lost.cancel();
            return false;
        }
    }
    true
}
