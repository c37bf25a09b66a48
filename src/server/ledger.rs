//! The ack ledger: the consume channel's unsettled delivery tags, so that the acks of several
//! requests settled together go as one `basic.ack` with `multiple = true`.
//!
//! `multiple = true` acks *every* outstanding tag up to the one named, so it may only be used
//! when no tag below is still being worked on or waiting for its reply. The ledger knows that:
//! each delivery is entered (in tag order, before its task starts) and leaves when its ack or
//! reject is queued. A batch of acks then splits in two: the tags below the lowest unsettled
//! one go as one frame at the highest of them; the rest, above a gap, one frame each.
//!
//! Nothing is held back to make batches: a batch is what one look of the settler found
//! confirmed (see `settle.rs`), so at 1 in flight every ack is still a frame of its own, and
//! under load the broker handles one ack frame where it handled many. The set is bounded by
//! the prefetch window (the broker never has more unacked deliveries out on the channel).

use std::collections::BTreeSet;
use std::sync::Mutex;

use futures_util::FutureExt;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::Channel;
use prometheus::IntCounter;

/// One `basic.ack` to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct AckFrame {
    pub delivery_tag: u64,
    pub multiple: bool,
}

/// The bookkeeping alone, without a channel (unit- and property-tested).
#[derive(Debug, Default)]
pub(super) struct Unsettled {
    tags: BTreeSet<u64>,
}

impl Unsettled {
    /// A delivery arrived; tags arrive in increasing order.
    pub fn delivered(&mut self, tag: u64) {
        self.tags.insert(tag);
    }

    /// A tag settled by a frame of its own (a reject, or an ack sent alone).
    pub fn settled(&mut self, tag: u64) {
        self.tags.remove(&tag);
    }

    /// The frames that ack `batch` (settled tags, any order), and the tags leave the ledger.
    /// Tags not in the ledger are acked one by one, as before there was a ledger.
    pub fn ack(&mut self, batch: &mut [u64]) -> Vec<AckFrame> {
        batch.sort_unstable();
        let mut known = 0;
        for tag in batch.iter() {
            known += usize::from(self.tags.remove(tag));
        }
        // Every tag below `floor` is settled (or was never delivered on this channel).
        let floor = self.tags.first().copied().unwrap_or(u64::MAX);
        let below = batch.partition_point(|&tag| tag < floor);
        let mut frames = Vec::with_capacity(1 + batch.len() - below);
        // With a tag the ledger never saw, nothing is known below it: every tag goes alone.
        let alone = match below > 0 && known == batch.len() {
            true => {
                frames.push(AckFrame {
                    delivery_tag: batch[below - 1],
                    multiple: below > 1,
                });
                &batch[below..]
            }
            false => &batch[..],
        };
        frames.extend(alone.iter().map(|&tag| AckFrame {
            delivery_tag: tag,
            multiple: false,
        }));
        frames
    }

    /// How many tags are unsettled.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.tags.len()
    }
}

/// The ledger of one consume channel; every ack and reject of its deliveries goes through it.
#[derive(Debug)]
pub(super) struct Ledger {
    channel: Channel,
    /// Locked while frames are queued, so frames leave in the order they were planned.
    unsettled: Mutex<Unsettled>,
    /// `amqp_rpc_ack_frames_total` (counted when queued).
    frames: IntCounter,
}

impl Ledger {
    pub fn new(channel: Channel, frames: IntCounter) -> Self {
        Ledger {
            channel,
            unsettled: Mutex::default(),
            frames,
        }
    }

    /// Enter a delivery, before anything can settle it.
    pub fn delivered(&self, tag: u64) {
        self.lock().delivered(tag);
    }

    /// Ack one delivery.
    pub fn ack(&self, tag: u64) {
        self.ack_all(&mut [tag]);
    }

    /// Ack a batch of deliveries with as few frames as the ledger allows.
    ///
    /// Not awaited: the frames are queued on the first poll, and waiting for their write would
    /// cost a wake-up that tells nothing (the broker never confirms an ack). An ack lost with
    /// its connection means a redelivery, which the reply cache answers again.
    pub fn ack_all(&self, batch: &mut [u64]) {
        if batch.is_empty() {
            return;
        }
        let mut unsettled = self.lock();
        for frame in unsettled.ack(batch) {
            self.frames.inc();
            let options = BasicAckOptions {
                multiple: frame.multiple,
            };
            let queued = self
                .channel
                .basic_ack(frame.delivery_tag, options)
                .now_or_never();
            if let Some(Err(e)) = queued {
                // The channel died under us; the broker redelivers.
                tracing::debug!(error = %e, delivery_tag = frame.delivery_tag, "ack failed");
            }
        }
    }

    /// Reject one delivery (requeued or not). Queued before the tag leaves the ledger, so a
    /// later `multiple` ack can never reach it first.
    pub fn reject(&self, tag: u64, requeue: bool) {
        let mut unsettled = self.lock();
        let queued = self
            .channel
            .basic_reject(tag, BasicRejectOptions { requeue })
            .now_or_never();
        if let Some(Err(e)) = queued {
            tracing::debug!(error = %e, delivery_tag = tag, "reject failed");
        }
        unsettled.settled(tag);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Unsettled> {
        // Never held across an await. A panic while it is held could at worst leave tags
        // out of the ledger whose frames were not queued: their later acks then go one by
        // one, and the broker redelivers them when the connection ends; nothing is acked
        // twice or early.
        self.unsettled.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(delivery_tag: u64, multiple: bool) -> AckFrame {
        AckFrame {
            delivery_tag,
            multiple,
        }
    }

    #[test]
    fn a_contiguous_batch_is_one_multiple_ack() {
        let mut l = Unsettled::default();
        (1..=5).for_each(|t| l.delivered(t));
        assert_eq!(l.ack(&mut [3, 1, 2]), vec![frame(3, true)]);
        assert_eq!(l.ack(&mut [4]), vec![frame(4, false)]);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn tags_above_a_gap_go_one_by_one() {
        let mut l = Unsettled::default();
        (1..=6).for_each(|t| l.delivered(t));
        // 3 is still being worked on: 1 and 2 go together, 4 and 6 alone.
        assert_eq!(
            l.ack(&mut [6, 4, 2, 1]),
            vec![frame(2, true), frame(4, false), frame(6, false)]
        );
        // Once 3 settles nothing is left below 5, but it is acked alone.
        assert_eq!(l.ack(&mut [3]), vec![frame(3, false)]);
        assert_eq!(l.ack(&mut [5]), vec![frame(5, false)]);
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn a_rejected_tag_does_not_block_a_multiple_ack_above_it() {
        let mut l = Unsettled::default();
        (1..=3).for_each(|t| l.delivered(t));
        l.settled(1);
        assert_eq!(l.ack(&mut [2, 3]), vec![frame(3, true)]);
    }

    #[test]
    fn an_unknown_tag_is_acked_alone() {
        let mut l = Unsettled::default();
        l.delivered(2);
        assert_eq!(l.ack(&mut [1, 2]), vec![frame(1, false), frame(2, false)]);
    }

    /// What the broker does with the frames: an ack of a tag it does not hold outstanding
    /// closes the channel (`PRECONDITION_FAILED`), and `multiple` settles every outstanding
    /// tag up to the one named.
    #[derive(Clone, Debug)]
    enum Step {
        Deliver,
        /// Settle these (indexes into the outstanding-and-undecided tags) by one ack batch.
        Ack(Vec<prop::sample::Index>),
        Reject(prop::sample::Index),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => Just(Step::Deliver),
            2 => prop::collection::vec(any::<prop::sample::Index>(), 1..6).prop_map(Step::Ack),
            1 => any::<prop::sample::Index>().prop_map(Step::Reject),
        ]
    }

    proptest! {
        /// Whatever the order requests settle in, the broker ends up with exactly the
        /// deliveries not yet settled, and never sees a frame for a tag it does not hold.
        #[test]
        fn the_broker_settles_exactly_what_was_settled(steps in prop::collection::vec(step(), 1..200)) {
            let mut ledger = Unsettled::default();
            let mut broker: BTreeSet<u64> = BTreeSet::new();
            let mut working: Vec<u64> = Vec::new();
            let mut next = 1;
            for step in steps {
                match step {
                    Step::Deliver => {
                        ledger.delivered(next);
                        broker.insert(next);
                        working.push(next);
                        next += 1;
                    }
                    Step::Reject(i) if !working.is_empty() => {
                        let tag = working.remove(i.index(working.len()));
                        prop_assert!(broker.remove(&tag));
                        ledger.settled(tag);
                    }
                    Step::Ack(picks) if !working.is_empty() => {
                        let mut batch = Vec::new();
                        for i in picks {
                            if working.is_empty() { break; }
                            batch.push(working.remove(i.index(working.len())));
                        }
                        for f in ledger.ack(&mut batch) {
                            prop_assert!(broker.contains(&f.delivery_tag), "unknown tag {}", f.delivery_tag);
                            if f.multiple {
                                broker.retain(|&t| t > f.delivery_tag);
                            } else {
                                broker.remove(&f.delivery_tag);
                            }
                        }
                    }
                    _ => {}
                }
                let expected: BTreeSet<u64> = working.iter().copied().collect();
                prop_assert_eq!(&broker, &expected);
                prop_assert_eq!(ledger.len(), working.len());
            }
        }
    }
}
