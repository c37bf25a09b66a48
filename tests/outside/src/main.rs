//! A program of a crate outside amqp-rpc's workspace, built and run by `tests/outside_crate.rs`.
//! Its manifest (written by that test) depends on amqp-rpc by path and says nothing about lapin,
//! so Cargo builds it against crates.io's lapin (issue 15).
//!
//! `amqp-rpc-outside <queue>`: runs a daemon in-process on `<queue>` (broker at `AMQP_URL`),
//! calls `fib(30)` through `amqp_rpc::Client`, and prints `key=value` lines: whether the build
//! has the socket-loop-on-runtime option, fib's answer, and how many of lapin's I/O threads
//! this process has while the daemon and the client are connected.

use std::time::Duration;

use amqp_rpc::{Client, Config, Daemon};
use tokio_util::sync::CancellationToken;

/// lapin names its I/O thread so.
const IO_THREAD: &str = "lapin-io-loop";

/// This process's threads named [`IO_THREAD`] (Linux: /proc).
fn io_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == IO_THREAD)
        .count()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let queue = std::env::args()
        .nth(1)
        .ok_or("usage: amqp-rpc-outside <queue>")?;
    let mut config = Config::default();
    if let Ok(url) = std::env::var("AMQP_URL") {
        config.amqp.url = url;
    }
    config.service.queue = queue.clone();
    config.http.listen = "127.0.0.1:0".into();
    config.shutdown.grace_secs = 5;
    amqp_rpc::telemetry::init(&config.log, config.amqp.secrets())?;
    println!(
        "io_loop_on_runtime_available={}",
        amqp_rpc::amqp::io_loop_on_runtime_available()
    );

    let daemon = Daemon::start(config.clone(), prometheus::Registry::new()).await?;
    let mut ready = daemon.readiness();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(daemon.run(shutdown.clone()));
    tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|ready| *ready)).await??;

    let client = Client::builder(config.amqp.url.clone())
        .amqp(config.amqp.clone())
        .queue(&queue)
        .timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let answer = client.call("fib", b"30").await?;
    println!("fib(30)={}", String::from_utf8_lossy(&answer));
    println!("lapin_io_threads={}", io_threads());

    drop(client);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), task).await???;
    Ok(())
}
