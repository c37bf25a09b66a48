//! Idempotent redelivery: the reply cache, single-flight, and delivery-attempt counting.
//!
//! A request is identified by its idempotency key (`message_id`, else `reply_to` +
//! `correlation_id`, always with the method and the body). Its reply is cached (bounded by
//! entries and TTL), so a redelivered or duplicated request gets the same reply without
//! running the handler again (without a `message_id`, only a redelivery counts as a
//! duplicate, see [`Idempotency::may_replay`]); a duplicate that
//! arrives while the first is still running joins that computation instead of starting a
//! second (quick_cache's placeholder: one caller computes, the others wait for its value).
//!
//! The caches are quick_cache's (sharded, CLOCK-Pro, foldhash). An entry carries the time it
//! was stored and counts as absent once older than the TTL; the capacity bounds the rest. At
//! 64 requests in flight the daemon stores about 20,000 replies a second and evicts as many,
//! and moka's table (SipHash, rehashing as it churned) took a fifth of the daemon's CPU.
//! Work answered inline needs no single-flight (it takes microseconds and has no await, so no
//! duplicate can start meanwhile): its reply is stored with [`Idempotency::remember`] right
//! after it is sent, which keeps the entry API's cost off the caller's latency.
//! Attempts are counted so that a request that keeps killing its worker ends as poison.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quick_cache::sync::{Cache, DefaultLifecycle, EntryAction, EntryResult};
use quick_cache::{DefaultHashBuilder, OptionsBuilder, UnitWeighter, Weighter};

use crate::protocol::{ErrorCode, RequestError, RequestMeta};

/// A reply as cached: the body or the error, shared by every replay.
pub type CachedReply = Arc<Result<Vec<u8>, RequestError>>;

/// A cached value and when it was stored; older than the TTL, it counts as absent.
#[derive(Clone, Debug)]
struct Stamped<T> {
    at: Instant,
    value: T,
}

/// Cache weight of a reply: one unit per started KiB of key and body.
#[derive(Clone, Debug)]
struct ByKib;

impl Weighter<String, Stamped<CachedReply>> for ByKib {
    fn weight(&self, key: &String, reply: &Stamped<CachedReply>) -> u64 {
        u64::from(weight(key, &reply.value))
    }
}

/// Reply cache plus attempt counts.
pub struct Idempotency {
    replies: Cache<String, Stamped<CachedReply>, ByKib>,
    attempts: Cache<String, Stamped<u32>>,
    ttl: Duration,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("replies", &self.replies.len())
            .field("attempts", &self.attempts.len())
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl Idempotency {
    /// A cache of at most `entries` replies, each kept for `ttl`. A reply weighs one entry
    /// per started KiB, so `entries` bounds memory too (about `entries` KiB of bodies), even
    /// when every reply is a 20 KB fib(100000).
    /// `entries` is at least 1 (`Config::validate`).
    pub fn new(entries: u64, ttl: Duration) -> Self {
        Idempotency {
            replies: Cache::with_options(
                options(entries),
                ByKib,
                Default::default(),
                Default::default(),
            ),
            attempts: Cache::with_options(
                options(entries),
                UnitWeighter,
                Default::default(),
                Default::default(),
            ),
            ttl,
        }
    }

    fn fresh<T>(&self, stamped: &Stamped<T>) -> bool {
        stamped.at.elapsed() < self.ttl
    }

    /// The idempotency key of a request, when it has one: its id (`message_id`, else
    /// `reply_to` + `correlation_id`) together with the method and a hash of the body. Ids
    /// alone are not enough: clients reuse them (a counter that starts again at 1, one id
    /// kept for every call, an order number as `message_id`), and a request must never get
    /// another request's reply.
    pub fn key(meta: &RequestMeta, body: &[u8]) -> Option<String> {
        let id = match (&meta.message_id, &meta.reply_to, &meta.correlation_id) {
            (Some(id), _, _) => format!("m:{id}"),
            (None, Some(to), Some(id)) => format!("r:{to}\u{0}{id}"),
            _ => return None,
        };
        let mut hasher = std::hash::DefaultHasher::new();
        body.hash(&mut hasher);
        Some(format!(
            "{id}\u{0}{}\u{0}{:016x}",
            meta.method,
            hasher.finish()
        ))
    }

    /// Whether this delivery may be answered from the cache (or join a running copy). A
    /// `message_id` names the call, so every copy of it may. Without one, only a copy the
    /// broker delivered before is certainly a duplicate: a fresh publish with the same
    /// `reply_to`, `correlation_id`, method and body is a new call (a client that restarted
    /// its counter, asking again for a value that may have changed), so it is computed.
    pub fn may_replay(meta: &RequestMeta, delivered_before: bool) -> bool {
        meta.message_id.is_some() || delivered_before
    }

    /// A reply already computed for this key.
    pub fn cached(&self, key: &str) -> Option<CachedReply> {
        let stamped = self.replies.get(key)?;
        self.fresh(&stamped).then_some(stamped.value)
    }

    /// Keep a reply computed without single-flight (see `single_flight`).
    pub fn remember(&self, key: String, reply: CachedReply) {
        let at = Instant::now();
        self.replies.insert(key, Stamped { at, value: reply });
    }

    /// This delivery's attempt number (1 for the first). Quorum queues count for us
    /// (`x-delivery-count`); otherwise this daemon counts the redeliveries it has seen, and a
    /// redelivery it never saw before counts as the second attempt.
    pub fn attempt(&self, key: &str, meta: &RequestMeta, redelivered: bool) -> u32 {
        if let Some(count) = meta.delivery_count {
            return u32::try_from(count).unwrap_or(u32::MAX).saturating_add(1);
        }
        if !redelivered {
            return 1; // not recorded: first deliveries are the common case and cost nothing
        }
        let attempt = self
            .attempts
            .get(key)
            .filter(|seen| self.fresh(seen))
            .map_or(2, |seen| seen.value.saturating_add(1));
        let at = Instant::now();
        let stamped = Stamped { at, value: attempt };
        self.attempts.insert(key.to_owned(), stamped);
        attempt
    }

    /// Run `compute` once per key: concurrent callers with the same key wait for the first
    /// one's result. Returns the reply and whether this caller computed it (`false` = replay).
    /// `compute` returns `Err(other)` for results that must not be cached: nothing is
    /// stored, and a caller that was waiting computes for itself.
    pub async fn single_flight<E, F>(
        &self,
        key: String,
        wait_until: Option<tokio::time::Instant>,
        timed_out: impl FnOnce() -> E,
        compute: F,
    ) -> Result<(CachedReply, bool), E>
    where
        F: Future<Output = Result<CachedReply, E>>,
    {
        // Waiting for another copy's run is bounded by this copy's own deadline: the run may
        // belong to a caller with more time (or to a session that is gone).
        let wait = async {
            match wait_until {
                Some(at) => tokio::time::timeout_at(at, self.guard_or_value(&key))
                    .await
                    .ok(),
                None => Some(self.guard_or_value(&key).await),
            }
        };
        match wait.await {
            None => Err(timed_out()),
            Some(Ok(reply)) => Ok((reply, false)),
            Some(Err(guard)) => self.compute_into(guard, compute).await,
        }
    }

    /// A fresh cached reply for `key`, or the placeholder to compute it under (waiting while
    /// another copy holds it).
    async fn guard_or_value<'a>(&'a self, key: &String) -> Result<CachedReply, ReplyGuard<'a>> {
        // The common path hands a waiting duplicate the computing caller's value itself, even
        // one too heavy to be stored. Only a stale entry needs the entry API to replace it.
        match self.replies.get_value_or_guard_async(key).await {
            Ok(stamped) if self.fresh(&stamped) => return Ok(stamped.value),
            Ok(_stale) => {}
            Err(guard) => return Err(guard),
        }
        match self
            .replies
            .entry_async(key, |_, stamped| {
                if self.fresh(stamped) {
                    EntryAction::Retain(stamped.value.clone())
                } else {
                    EntryAction::ReplaceWithGuard
                }
            })
            .await
        {
            EntryResult::Retained(reply) => Ok(reply),
            EntryResult::Vacant(guard) | EntryResult::Replaced(guard, _) => Err(guard),
            // Neither is asked for: the callback never removes, and there is no timeout.
            EntryResult::Removed(..) | EntryResult::Timeout => unreachable!("not requested"),
        }
    }

    /// Compute with the key's placeholder held, so duplicates wait; store what may be cached.
    async fn compute_into<E, F>(
        &self,
        guard: ReplyGuard<'_>,
        compute: F,
    ) -> Result<(CachedReply, bool), E>
    where
        F: Future<Output = Result<CachedReply, E>>,
    {
        // On `Err` (or if this future is dropped) the guard goes unfilled, and one waiting
        // duplicate gets it and computes for itself.
        let reply = compute.await?;
        let at = Instant::now();
        let _ = guard.insert(Stamped {
            at,
            value: reply.clone(),
        });
        Ok((reply, true))
    }
}

type ReplyGuard<'a> = quick_cache::sync::PlaceholderGuard<
    'a,
    String,
    Stamped<CachedReply>,
    ByKib,
    DefaultHashBuilder,
    DefaultLifecycle<String, Stamped<CachedReply>>,
>;

/// Cache options for `entries` units of weight. One shard: only the daemon's one async thread
/// touches the caches, and a single shard keeps the whole capacity for one heavy reply. Most
/// of it is "cold": replies are written once and rarely read again, so what matters is
/// recency. With quick_cache's default (97% hot), the first replies ever stored filled the
/// hot part for good and new ones got 3% of the capacity.
fn options(entries: u64) -> quick_cache::Options {
    OptionsBuilder::new()
        .estimated_items_capacity(usize::try_from(entries).unwrap_or(usize::MAX))
        .weight_capacity(entries)
        .shards(1)
        .hot_allocation(0.05)
        .build()
        .expect("capacity and items are set")
}

/// Cache weight of a reply: one unit per started KiB of key and body.
fn weight(key: &str, reply: &CachedReply) -> u32 {
    let body = match reply.as_ref() {
        Ok(body) => body.len(),
        Err(e) => e.message.len(),
    };
    u32::try_from((key.len() + body).div_ceil(1024))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// Whether a reply is a fact about the request (cache it) or about the moment (do not):
/// a retry after `deadline_exceeded` or `unavailable` deserves a fresh attempt.
pub fn cacheable(reply: &Result<Vec<u8>, RequestError>) -> bool {
    match reply {
        Ok(_) => true,
        Err(e) => !matches!(e.code, ErrorCode::DeadlineExceeded | ErrorCode::Unavailable),
    }
}

#[cfg(test)]
mod tests;
