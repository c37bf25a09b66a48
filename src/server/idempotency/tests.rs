//! The reply cache, single-flight and attempt counts, without a broker.

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
    assert_eq!(Idempotency::key(&meta(None, None), b""), None);
}

#[test]
fn reused_correlation_ids_tell_requests_apart() {
    let first = Idempotency::key(&meta(None, Some("1")), b"10").unwrap();
    assert!(first.starts_with("r:q\u{0}1\u{0}"));
    assert_ne!(
        Idempotency::key(&meta(None, Some("1")), b"30").unwrap(),
        first,
        "another body"
    );
    let other_method = RequestMeta {
        method: "echo".into(),
        ..meta(None, Some("1"))
    };
    assert_ne!(Idempotency::key(&other_method, b"10").unwrap(), first);
    let other_queue = RequestMeta {
        reply_to: Some("q2".into()),
        ..meta(None, Some("1"))
    };
    assert_ne!(Idempotency::key(&other_queue, b"10").unwrap(), first);
}

#[test]
fn only_named_calls_and_redeliveries_replay() {
    assert!(Idempotency::may_replay(&meta(Some("m"), Some("c")), false));
    assert!(Idempotency::may_replay(&meta(None, Some("c")), true));
    assert!(!Idempotency::may_replay(&meta(None, Some("c")), false));
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

/// Eight concurrent duplicates of key "k" whose computation replies `body`: how many
/// computations ran, and each caller's (reply, computed here).
async fn eight_duplicates(idem: &Idempotency, body: Vec<u8>) -> (u32, Vec<(CachedReply, bool)>) {
    let runs = AtomicU32::new(0);
    let calls = (0..8).map(|_| {
        let (runs, body) = (&runs, body.clone());
        idem.single_flight::<(), _>("k".into(), None, || (), async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Ok(Arc::new(Ok(body)))
        })
    });
    let results = futures_util::future::join_all(calls).await;
    let results = results.into_iter().map(Result::unwrap).collect();
    (runs.load(Ordering::SeqCst), results)
}

#[tokio::test]
async fn concurrent_duplicates_compute_once() {
    let idem = Idempotency::new(100, Duration::from_secs(60));
    let (runs, results) = eight_duplicates(&idem, b"v".to_vec()).await;
    assert_eq!(runs, 1);
    assert_eq!(results.iter().filter(|(_, fresh)| *fresh).count(), 1);
    assert!(idem.cached("k").is_some());
}

#[test]
fn entries_older_than_the_ttl_count_as_absent() {
    let idem = Idempotency::new(100, Duration::ZERO);
    idem.remember("k".into(), Arc::new(Ok(b"v".to_vec())));
    assert!(idem.cached("k").is_none(), "stored, but expired at once");
    let m = meta(Some("k"), None);
    assert_eq!(idem.attempt("k", &m, true), 2);
    assert_eq!(idem.attempt("k", &m, true), 2, "the first count expired");
    let kept = Idempotency::new(100, Duration::from_secs(60));
    kept.remember("k".into(), Arc::new(Ok(b"v".to_vec())));
    assert_eq!(kept.cached("k").unwrap().as_ref().as_ref().unwrap(), b"v");
}

#[tokio::test]
async fn a_result_not_to_cache_is_not_stored() {
    let idem = Idempotency::new(100, Duration::from_secs(60));
    let first = idem.single_flight("k".into(), None, || "late", async {
        Err::<CachedReply, _>("moment")
    });
    assert_eq!(first.await.unwrap_err(), "moment");
    assert!(idem.cached("k").is_none());
    let again = idem.single_flight::<(), _>("k".into(), None, || (), async {
        Ok(Arc::new(Ok(b"v".to_vec())))
    });
    assert!(again.await.unwrap().1, "computed afresh");
}

#[test]
fn the_newest_replies_are_kept() {
    let idem = Idempotency::new(1_000, Duration::from_secs(60));
    for i in 0..10_000 {
        idem.remember(format!("k{i}"), Arc::new(Ok(b"v".to_vec())));
    }
    let newest = (9_500..10_000)
        .filter(|i| idem.cached(&format!("k{i}")).is_some())
        .count();
    assert!(newest >= 450, "{newest} of the newest 500 replies kept");
}

#[tokio::test]
async fn duplicates_of_a_reply_too_heavy_to_store_compute_once() {
    let idem = Idempotency::new(100, Duration::from_secs(60));
    // 200 KiB weighs 200 units, over the whole capacity of 100: never stored.
    let (runs, results) = eight_duplicates(&idem, vec![7; 200 * 1024]).await;
    assert_eq!(runs, 1, "every duplicate joined");
    assert_eq!(results.len(), 8);
    assert!(results
        .iter()
        .all(|(r, _)| r.as_ref().as_ref().unwrap().len() == 200 * 1024));
    assert!(idem.cached("k").is_none(), "too heavy to keep");
}

#[tokio::test(start_paused = true)]
async fn a_copy_waits_for_another_copys_run_no_longer_than_its_own_deadline() {
    let idem = Arc::new(Idempotency::new(100, Duration::from_secs(60)));
    let (started, started_rx) = tokio::sync::oneshot::channel();
    let slow = tokio::spawn({
        let idem = idem.clone();
        async move {
            idem.single_flight("k".into(), None, || "late", async move {
                let _ = started.send(());
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok::<CachedReply, &str>(Arc::new(Ok(b"slow".to_vec())))
            })
            .await
        }
    });
    started_rx.await.unwrap();
    let until = tokio::time::Instant::now() + Duration::from_millis(400);
    let joined = idem.single_flight("k".into(), Some(until), || "late", async {
        unreachable!("the run is another copy's")
    });
    assert_eq!(joined.await.unwrap_err(), "late");
    assert_eq!(
        tokio::time::Instant::now(),
        until,
        "gave up at its own deadline"
    );
    let (reply, fresh) = slow.await.unwrap().unwrap();
    assert!(fresh && reply.as_ref().as_ref().unwrap() == b"slow");
}

#[test]
fn the_capacity_bounds_the_weight() {
    let idem = Idempotency::new(50, Duration::from_secs(60));
    for i in 0..1_000 {
        idem.remember(format!("k{i}"), Arc::new(Ok(vec![0; 2_000])));
    }
    assert!(
        idem.replies.weight() <= 50,
        "weight {}",
        idem.replies.weight()
    );
}
