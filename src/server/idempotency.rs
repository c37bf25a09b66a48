//! Idempotent redelivery: the reply cache, single-flight, and delivery-attempt counting.
//!
//! A request is identified by its idempotency key (`message_id`, else `reply_to` +
//! `correlation_id`). Its reply is cached (bounded by entries and TTL), so a redelivered or
//! duplicated request gets the same reply without running the handler again; a duplicate that
//! arrives while the first is still running joins that computation instead of starting a
//! second (moka's entry API runs one initialiser per key and hands its result to every waiter).
//! Work answered inline needs no single-flight (it takes microseconds and has no await, so no
//! duplicate can start meanwhile): its reply is stored with [`Idempotency::remember`] right
//! after it is sent, which keeps the entry API's cost off the caller's latency.
//! Attempts are counted so that a request that keeps killing its worker ends as poison.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::{ErrorCode, RequestError, RequestMeta};

/// A reply as cached: the body or the error, shared by every replay.
pub type CachedReply = Arc<Result<Vec<u8>, RequestError>>;

/// Reply cache plus attempt counts.
#[derive(Debug)]
pub struct Idempotency {
    replies: moka::future::Cache<String, CachedReply>,
    attempts: moka::sync::Cache<String, u32>,
}

impl Idempotency {
    /// A cache of at most `entries` replies, each kept for `ttl`. A reply weighs one entry
    /// per started KiB, so `entries` bounds memory too (about `entries` KiB of bodies), even
    /// when every reply is a 20 KB fib(100000).
    pub fn new(entries: u64, ttl: Duration) -> Self {
        Idempotency {
            replies: moka::future::Cache::builder()
                .max_capacity(entries)
                .weigher(|key: &String, reply: &CachedReply| weight(key, reply))
                .time_to_live(ttl)
                .build(),
            attempts: moka::sync::Cache::builder()
                .max_capacity(entries)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// The idempotency key of a request, when it has one. A `message_id` counts together with
    /// the method and a hash of the body: a client that reuses `message_id` for something
    /// else (an order number, a counter) must never get another request's reply.
    pub fn key(meta: &RequestMeta, body: &[u8]) -> Option<String> {
        if let Some(id) = &meta.message_id {
            let mut hasher = std::hash::DefaultHasher::new();
            body.hash(&mut hasher);
            return Some(format!(
                "m:{id}\u{0}{}\u{0}{:016x}",
                meta.method,
                hasher.finish()
            ));
        }
        match (&meta.reply_to, &meta.correlation_id) {
            (Some(to), Some(id)) => Some(format!("r:{to}\u{0}{id}")),
            _ => None,
        }
    }

    /// A reply already computed for this key.
    pub async fn cached(&self, key: &str) -> Option<CachedReply> {
        self.replies.get(key).await
    }

    /// Keep a reply computed without single-flight (see `single_flight`).
    pub async fn remember(&self, key: String, reply: CachedReply) {
        self.replies.insert(key, reply).await;
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
            .map_or(2, |seen| seen.saturating_add(1));
        self.attempts.insert(key.to_owned(), attempt);
        attempt
    }

    /// Run `compute` once per key: concurrent callers with the same key wait for the first
    /// one's result. Returns the reply and whether this caller computed it (`false` = replay).
    /// `compute` returns `Err(other)` for results that must not be cached (they are still
    /// shared with callers that joined meanwhile).
    pub async fn single_flight<E, F>(
        &self,
        key: String,
        compute: F,
    ) -> Result<(CachedReply, bool), Arc<E>>
    where
        E: Send + Sync + 'static,
        F: Future<Output = Result<CachedReply, E>>,
    {
        let entry = self.replies.entry(key).or_try_insert_with(compute).await?;
        let fresh = entry.is_fresh();
        Ok((entry.into_value(), fresh))
    }
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
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn meta(message_id: Option<&str>, corr: Option<&str>) -> RequestMeta {
        RequestMeta {
            reply_to: Some("q".into()),
            correlation_id: corr.map(Into::into),
            message_id: message_id.map(Into::into),
            ..RequestMeta::default()
        }
    }

    #[test]
    fn key_prefers_message_id_with_method_and_body() {
        let m1 = meta(Some("m1"), Some("c"));
        let key = Idempotency::key(&m1, b"10").unwrap();
        assert!(key.starts_with("m:m1\u{0}"));
        assert_eq!(
            Idempotency::key(&meta(Some("m1"), Some("other")), b"10").unwrap(),
            key
        );
        assert_ne!(Idempotency::key(&m1, b"11").unwrap(), key, "another body");
        let other_method = RequestMeta {
            method: "echo".into(),
            ..m1.clone()
        };
        assert_ne!(
            Idempotency::key(&other_method, b"10").unwrap(),
            key,
            "another method"
        );
        assert_eq!(
            Idempotency::key(&meta(None, Some("c")), b"").unwrap(),
            "r:q\u{0}c"
        );
        assert_eq!(Idempotency::key(&meta(None, None), b""), None);
    }

    #[test]
    fn big_replies_weigh_more() {
        assert_eq!(weight("k", &Arc::new(Ok(vec![0; 10]))), 1);
        assert_eq!(weight("k", &Arc::new(Ok(vec![0; 20_900]))), 21);
    }

    #[test]
    fn attempts_count_redeliveries() {
        let idem = Idempotency::new(100, Duration::from_secs(60));
        let m = meta(Some("k"), None);
        assert_eq!(idem.attempt("k", &m, false), 1);
        assert_eq!(idem.attempt("k", &m, true), 2);
        assert_eq!(idem.attempt("k", &m, true), 3);
        let quorum = RequestMeta {
            delivery_count: Some(4),
            ..m
        };
        assert_eq!(idem.attempt("k", &quorum, true), 5);
    }

    #[tokio::test]
    async fn concurrent_duplicates_compute_once() {
        let idem = Arc::new(Idempotency::new(100, Duration::from_secs(60)));
        let runs = Arc::new(AtomicU32::new(0));
        let calls = (0..8).map(|_| {
            let (idem, runs) = (idem.clone(), runs.clone());
            async move {
                idem.single_flight::<(), _>("k".into(), async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    Ok(Arc::new(Ok(b"v".to_vec())))
                })
                .await
                .unwrap()
            }
        });
        let results = futures_util::future::join_all(calls).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(results.iter().filter(|(_, fresh)| *fresh).count(), 1);
        assert!(idem.cached("k").await.is_some());
    }
}
