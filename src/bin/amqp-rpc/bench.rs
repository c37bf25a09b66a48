//! `amqp-rpc bench`: a closed-loop load generator over the client library.
//!
//! `concurrency` workers each keep exactly one call in flight, by total count or for a
//! duration, after an optional warm-up that is not recorded. Latencies go into per-worker HDR
//! histograms (merged at the end, so workers never contend on a lock); every call that starts
//! ends in `ok` or in one counted error kind, so `ok + errors == calls` holds by construction.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use amqp_rpc::client::{CallOptions, Client};

/// How long the load runs.
#[derive(Clone, Copy, Debug)]
pub enum Amount {
    /// This many calls in total.
    Requests(u64),
    /// Calls until this much time has passed.
    Duration(Duration),
}

/// A bench run's parameters.
#[derive(Clone, Debug)]
pub struct BenchSpec {
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Count or duration.
    pub amount: Amount,
    /// Unrecorded calls at the start, per the same loop.
    pub warmup: Duration,
    /// Method to call.
    pub method: String,
    /// Request body.
    pub arg: String,
    /// Per-call timeout and retry.
    pub options: CallOptions,
    /// Show a progress bar (only when stderr is a terminal).
    pub progress: bool,
}

/// The measured result; serialised as the `--json` line.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Calls started (and ended) in the measured phase.
    pub calls: u64,
    /// Calls that returned a value.
    pub ok: u64,
    /// Calls that ended in an error.
    pub errors: u64,
    /// Calls per second over the measured phase.
    pub calls_per_sec: f64,
    /// Latency percentiles of all calls, in microseconds.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Slowest call.
    pub max_us: u64,
    /// Measured wall time, seconds.
    pub elapsed_secs: f64,
    /// Concurrency used.
    pub concurrency: usize,
    /// Error count per kind (`timeout`, `no_server`, `connection_lost`, `unavailable`, or a
    /// remote error code).
    pub error_kinds: BTreeMap<String, u64>,
}

struct Worker {
    hist: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<&'static str, u64>,
}

/// Run the load against `client` and return the report.
pub async fn run(client: Client, spec: BenchSpec) -> BenchReport {
    let method: Arc<str> = spec.method.as_str().into();
    let body: Arc<[u8]> = spec.arg.as_bytes().into();
    let options = spec.options;
    let call = move || {
        let (client, method, body) = (client.clone(), method.clone(), body.clone());
        async move {
            client
                .call_with(&method, &body, options)
                .await
                .map(drop)
                .map_err(|e| e.kind())
        }
    };
    run_calls(call, &spec).await
}

/// Run the load with any call function (the reference programs use this with their own
/// clients, so every system is measured by the same loop). An `Err` names the error kind.
pub async fn run_calls<F, Fut>(call: F, spec: &BenchSpec) -> BenchReport
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), &'static str>> + Send,
{
    if !spec.warmup.is_zero() {
        let warm = BenchSpec {
            amount: Amount::Duration(spec.warmup),
            progress: false,
            warmup: Duration::ZERO,
            ..spec.clone()
        };
        let _ = measure(call.clone(), &warm).await;
    }
    measure(call, spec).await
}

async fn measure<F, Fut>(call: F, spec: &BenchSpec) -> BenchReport
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), &'static str>> + Send,
{
    let started = Instant::now();
    let issued = Arc::new(AtomicU64::new(0));
    let bar = progress_bar(spec);
    let stop_at = match spec.amount {
        Amount::Duration(d) => Some(started + d),
        Amount::Requests(_) => None,
    };
    let limit = match spec.amount {
        Amount::Requests(n) => n,
        Amount::Duration(_) => u64::MAX,
    };
    let mut tasks = Vec::with_capacity(spec.concurrency);
    for _ in 0..spec.concurrency.max(1) {
        let call = call.clone();
        let issued = issued.clone();
        let bar = bar.clone();
        tasks.push(tokio::spawn(async move {
            let mut w = Worker {
                hist: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
                ok: 0,
                errors: BTreeMap::new(),
            };
            // Claim a call slot first, so the total never exceeds the limit.
            while stop_at.is_none_or(|t| Instant::now() < t)
                && issued.fetch_add(1, Ordering::Relaxed) < limit
            {
                let t0 = Instant::now();
                let result = call().await;
                let us = t0.elapsed().as_micros().max(1) as u64;
                w.hist.saturating_record(us);
                match result {
                    Ok(_) => w.ok += 1,
                    Err(kind) => *w.errors.entry(kind).or_default() += 1,
                }
                if let Some(bar) = &bar {
                    bar.inc(1);
                }
            }
            w
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
    let mut ok = 0;
    let mut error_kinds = BTreeMap::new();
    for task in tasks {
        let w = task.await.expect("bench worker panicked");
        hist.add(&w.hist).expect("same bounds");
        ok += w.ok;
        for (k, v) in w.errors {
            *error_kinds.entry(k.to_owned()).or_default() += v;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let calls = hist.len();
    let errors: u64 = error_kinds.values().sum();
    BenchReport {
        calls,
        ok,
        errors,
        calls_per_sec: if elapsed > 0.0 {
            calls as f64 / elapsed
        } else {
            0.0
        },
        p50_us: hist.value_at_quantile(0.5),
        p90_us: hist.value_at_quantile(0.9),
        p99_us: hist.value_at_quantile(0.99),
        p999_us: hist.value_at_quantile(0.999),
        max_us: hist.max(),
        elapsed_secs: elapsed,
        concurrency: spec.concurrency,
        error_kinds,
    }
}

fn progress_bar(spec: &BenchSpec) -> Option<ProgressBar> {
    if !spec.progress || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match spec.amount {
        Amount::Requests(n) => ProgressBar::new(n),
        Amount::Duration(_) => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} calls {per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    Some(bar)
}

impl BenchReport {
    /// The human-readable summary.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "calls: {}  ok: {}  errors: {}  concurrency: {}  elapsed: {:.2}s\n\
             throughput: {:.1} calls/s\n\
             latency (us): p50 {}  p90 {}  p99 {}  p99.9 {}  max {}\n",
            self.calls,
            self.ok,
            self.errors,
            self.concurrency,
            self.elapsed_secs,
            self.calls_per_sec,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us
        );
        for (kind, n) in &self.error_kinds {
            s.push_str(&format!("errors[{kind}]: {n}\n"));
        }
        s
    }
}
