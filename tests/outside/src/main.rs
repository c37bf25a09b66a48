//! A program of a crate outside amqp-rpc's workspace, built and run by `tests/outside_crate.rs`.
//! Its manifest (written by that test) depends on amqp-rpc by path and says nothing about lapin,
//! so Cargo builds it against crates.io's lapin (issue 15). It does what the README shows a
//! new user: serve methods of its own and call them.
//!
//! `amqp-rpc-outside <queue>`: runs a daemon in-process on `<queue>` (broker at `AMQP_URL`)
//! serving an async typed JSON method `add` (with an application error code) and an async
//! `slow` one, calls both through `amqp_rpc::Client` with deadlines, and prints `key=value`
//! lines: whether the build has the socket-loop-on-runtime option, what each call got, and how
//! many of lapin's I/O threads this process has while the daemon and the client are connected.

use std::time::Duration;

use amqp_rpc::protocol::{ErrorCode, RequestError};
use amqp_rpc::service::{handler, json, Methods, Request};
use amqp_rpc::{CallError, CallOptions, Client, Config, Daemon};
use tokio_util::sync::CancellationToken;

/// lapin names its I/O thread so.
const IO_THREAD: &str = "lapin-io-loop";

#[derive(serde::Serialize, serde::Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Sum {
    sum: i64,
}

/// Adds, refusing odd sums: an application error of the method's own.
async fn add(_req: Request, q: Add) -> Result<Sum, RequestError> {
    let sum = q.a + q.b;
    if sum % 2 != 0 {
        return Err(RequestError::new(
            ErrorCode::FailedPrecondition,
            format!("{sum} is odd"),
        ));
    }
    Ok(Sum { sum })
}

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
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut config = Config::default();
    if let Ok(url) = std::env::var("AMQP_URL") {
        config.amqp.url = url;
    }
    config.service.queue = queue.clone();
    config.http.listen = "127.0.0.1:0".into();
    config.shutdown.grace_secs = 5;
    println!(
        "io_loop_on_runtime_available={}",
        amqp_rpc::amqp::io_loop_on_runtime_available()
    );

    let methods = Methods::default()
        .with(json("add", add))
        .with(handler("slow", |req: Request| async move {
            // An I/O wait that gives up with the call: the cancellation fires at the deadline.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(30)) => Ok(b"late".to_vec()),
                _ = req.cancelled() => Err(RequestError::new(ErrorCode::Cancelled, "gave up")),
            }
        }));
    let daemon = Daemon::start(config.clone(), prometheus::Registry::new())
        .await?
        .with_methods(methods)?;
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
    let sum: Sum = client.call_json("add", &Add { a: 2, b: 4 }).await?;
    println!("add={}", sum.sum);
    match client.call_json::<_, Sum>("add", &Add { a: 3, b: 4 }).await {
        // 7 is odd: the method's own code arrives, with its message.
        Err(CallError::Remote { code, message }) => println!("add_error={code}: {message}"),
        other => println!("add_error={:?}", other.map(|s| s.sum)),
    }
    let short = CallOptions {
        timeout: Duration::from_millis(300),
        idempotent: false,
    };
    match client.call_with("slow", b"", short).await {
        Err(e) if e.is_timeout() => println!("slow=timeout"),
        other => println!("slow={other:?}"),
    }
    println!("lapin_io_threads={}", io_threads());

    drop(client);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), task).await???;
    Ok(())
}
