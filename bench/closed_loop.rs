//! The closed loop the bench programs in `bench/` share (included with `#[path]`), so they
//! depend on nothing but amqp-rpc's public client: `concurrency` tasks each keep one call in
//! flight until the time is up, after an unrecorded warm-up. It measures like
//! `amqp-rpc bench` (per-task HDR histograms merged at the end; every call started is counted
//! once, `ok + errors == calls`) and prints the same summary and JSON fields.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// One run's result; the `--json` line.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub calls: u64,
    pub ok: u64,
    pub errors: u64,
    pub calls_per_sec: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub elapsed_secs: f64,
    pub concurrency: usize,
    pub error_kinds: BTreeMap<String, u64>,
}

impl Report {
    /// The human-readable summary, as `amqp-rpc bench` prints it.
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

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// `warmup` unrecorded, then `duration` measured, `concurrency` calls in flight. An `Err`
/// names the error kind.
pub async fn run<F, Fut>(
    call: F,
    concurrency: usize,
    duration: Duration,
    warmup: Duration,
) -> Report
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), &'static str>> + Send,
{
    if !warmup.is_zero() {
        measure(call.clone(), concurrency, warmup).await;
    }
    measure(call, concurrency, duration).await
}

async fn measure<F, Fut>(call: F, concurrency: usize, duration: Duration) -> Report
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), &'static str>> + Send,
{
    let started = Instant::now();
    let stop_at = started + duration;
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut hist = histogram();
                let mut ok = 0u64;
                let mut errors: BTreeMap<&'static str, u64> = BTreeMap::new();
                while Instant::now() < stop_at {
                    let t0 = Instant::now();
                    let result = call().await;
                    hist.saturating_record(t0.elapsed().as_micros().max(1) as u64);
                    match result {
                        Ok(()) => ok += 1,
                        Err(kind) => *errors.entry(kind).or_default() += 1,
                    }
                }
                (hist, ok, errors)
            })
        })
        .collect();
    let mut hist = histogram();
    let mut report = Report {
        concurrency,
        ..Report::default()
    };
    for task in tasks {
        let (h, ok, errors) = task.await.expect("bench task panicked");
        hist.add(&h).expect("same bounds");
        report.ok += ok;
        for (kind, n) in errors {
            *report.error_kinds.entry(kind.to_owned()).or_default() += n;
        }
    }
    report.elapsed_secs = started.elapsed().as_secs_f64();
    report.calls = hist.len();
    report.errors = report.error_kinds.values().sum();
    report.calls_per_sec = report.calls as f64 / report.elapsed_secs.max(1e-9);
    report.p50_us = hist.value_at_quantile(0.5);
    report.p90_us = hist.value_at_quantile(0.9);
    report.p99_us = hist.value_at_quantile(0.99);
    report.p999_us = hist.value_at_quantile(0.999);
    report.max_us = hist.max();
    report
}
