//! Memory stays flat: rounds of 100k client calls that time out leave the client's memory
//! where it was (no pending entry, confirm or timer survives its call). nextest runs each test in
//! its own process, so this process's RSS is the client's.

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
async fn a_hundred_thousand_timed_out_calls_leave_memory_flat() {
    let queue = unique_queue("mem");
    // A stalled server: it holds one request (prefetch 1) and never answers; the rest wait in
    // the queue and expire there (each request's expiration is its timeout).
    let _stalled = stalled_server(&queue, Some(1)).await;

    let client = client(&queue, Duration::from_secs(5)).await;
    let timeout = Duration::from_millis(20);
    timed_out_calls(&client, 10_000, 250, timeout).await; // warm the allocator and the maps
    let warm = rss_kib();
    timed_out_calls(&client, 100_000, 250, timeout).await;
    let first = rss_kib();
    timed_out_calls(&client, 100_000, 250, timeout).await;
    let second = rss_kib();
    eprintln!("client RSS (KiB): {warm} warm, {first} after 100k timed-out calls, {second} after 100k more");
    assert_eq!(client.pending_calls(), 0);
    // RSS is a high-water mark: a loaded machine (confirms arriving late) can raise the first
    // round's peak. A leak shows as growth in *every* round: 40 bytes a call is 4 MB here.
    assert!(
        second <= first + 4 * 1024,
        "RSS grew again: {first} KiB -> {second} KiB"
    );
    assert!(
        first <= warm + 16 * 1024,
        "RSS grew from {warm} KiB to {first} KiB"
    );
    delete_queue(&queue).await;
}
