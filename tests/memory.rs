//! Memory stays flat: once warm, rounds of 100k client calls that time out leave the client's
//! memory where it was (no pending entry, confirm or timer survives its call). nextest runs each
//! test in its own process, so this process's RSS is the client's.

mod common;

use std::time::Duration;

use amqp_rpc::{CallError, CallOptions};
use common::*;
use futures_util::StreamExt;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// `total` calls, `in_flight` at a time, each timing out after `timeout`.
async fn timed_out_calls(
    client: &amqp_rpc::Client,
    total: usize,
    in_flight: usize,
    timeout: Duration,
) {
    let options = CallOptions {
        timeout,
        idempotent: false,
    };
    let calls = futures_util::stream::iter(0..total)
        .map(|_| async { client.call_with("fib", b"10", options).await })
        .buffer_unordered(in_flight);
    let outcomes: Vec<_> = calls.collect().await;
    let timeouts = outcomes
        .iter()
        .filter(|r| matches!(r, Err(CallError::Timeout(_))))
        .count();
    assert_eq!(
        timeouts,
        total,
        "every call timed out: {:?}",
        outcomes
            .iter()
            .find(|r| r.is_ok() || !matches!(r, Err(CallError::Timeout(_))))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_calls_leave_memory_flat() {
    let queue = unique_queue("mem");
    // A stalled server: it holds one request (prefetch 1) and never answers; the rest wait in
    // the queue and expire there (each request's expiration is its timeout).
    let _stalled = stalled_server(&queue, Some(1)).await;

    let client = client(&queue, Duration::from_secs(5)).await;
    let timeout = Duration::from_millis(20);
    // Warm-up: the allocator's arenas and the maps reach their working size in the first
    // rounds (measured here: about +5 MB over the first 200k calls, then flat).
    timed_out_calls(&client, 10_000, 250, timeout).await;
    for _ in 0..2 {
        timed_out_calls(&client, 100_000, 250, timeout).await;
    }
    let warm = rss_kib();
    let mut rounds = Vec::new();
    for _ in 0..3 {
        timed_out_calls(&client, 100_000, 250, timeout).await;
        rounds.push(rss_kib());
    }
    eprintln!(
        "client RSS (KiB): {warm} after warm-up, then {rounds:?} after each 100k timed-out calls"
    );
    assert_eq!(client.pending_calls(), 0);
    // A leak of 10 bytes a call would add 1 MB to every round of 100k calls. The allocator
    // can still take one step of a few MB after the warm-up (seen once in CI: +4.9 MB in one
    // round, then +4 KiB), so the check is on the smallest round's growth: a leak shows in
    // all of them, a one-off step in one.
    let growth: Vec<i64> = std::iter::once(warm)
        .chain(rounds.iter().copied())
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1] as i64 - w[0] as i64)
        .collect();
    let least = *growth.iter().min().unwrap();
    assert!(
        least <= 1024,
        "RSS grew by at least {least} KiB in every round of 100k calls: {growth:?}"
    );
    delete_queue(&queue).await;
}
