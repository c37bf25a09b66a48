//! The closed loop the bench programs in `bench/` share (included with `#[path]`): exactly
//! `amqp-rpc bench`'s own (`src/bin/amqp-rpc/bench.rs`, `run_calls`), so every figure is
//! measured the same way. `concurrency` tasks each keep one call in flight until the time is
//! up, after an unrecorded warm-up; every call started is counted once.

use std::future::Future;
use std::time::Duration;

// The parts of the CLI's bench module a program here does not use (its `run` over a
// `Client`, the method and body fields) are the CLI's.
#[allow(dead_code)]
#[path = "../src/bin/amqp-rpc/bench.rs"]
mod bench;

pub use bench::BenchReport as Report;

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
    let spec = bench::BenchSpec {
        concurrency,
        amount: bench::Amount::Duration(duration),
        warmup,
        method: String::new(),
        arg: String::new(),
        // Unused by `run_calls`: `call` makes the calls.
        options: amqp_rpc::CallOptions {
            timeout: duration,
            idempotent: false,
        },
        progress: false,
    };
    bench::run_calls(call, &spec).await
}
