//! The benchmark's own service (`cargo build --release --examples` builds it as
//! `target/release/examples/bench_service`), for the handler rows of BENCHMARKS.md: an
//! I/O-bound async method, and a typed JSON method against a raw-bytes one of the same work.
//! `bench/methods.py` drives it; by hand:
//!
//! ```sh
//! AMQP_RPC__SERVICE__QUEUE=bench_methods AMQP_RPC__SERVICE__PREFETCH=512 \
//! AMQP_RPC__HTTP__LISTEN=127.0.0.1:0 target/release/examples/bench_service serve &
//! target/release/amqp-rpc bench --queue bench_methods --method wait --concurrency 256 --duration 8s
//! target/release/examples/bench_service load --queue bench_methods --method echo_json --typed \
//!     --concurrency 64 --duration 8s --json
//! ```
//!
//! Both subcommands run on a current-thread runtime, as `amqp-rpcd` and `amqp-rpc bench` do
//! (`--multi-thread` for tokio's default one). `serve` runs a daemon (configured like any:
//! `amqp_rpc::config::load`, so `AMQP_RPC__SECTION__KEY` variables) serving:
//! - `wait`: async, awaits `--wait-ms` (default 20) with `tokio::time::sleep`, as a handler
//!   awaiting a database or an HTTP call would; answers `cancelled` if the request is
//!   cancelled first. No per-method limit: the daemon's prefetch bounds what runs at once, so
//!   it must be at least the concurrency driven (the shipped 64 caps `wait` at 64 / 20 ms =
//!   3,200 calls/s).
//! - `echo`: raw bytes, an async handler returning the body.
//! - `echo_json`: typed JSON (`json`), deserializing the body into [`Line`] and serializing it
//!   back: the same work as `echo`, plus the JSON.
//!
//! `load` is the closed loop of `amqp-rpc bench` (`bench/closed_loop.rs`, measuring the same
//! way) over `amqp_rpc::Client` with its defaults, printing the same summary and `--json`
//! line. Without
//! `--typed` a call is `Service::call_with` with the body `--arg` (raw bytes, as
//! `amqp-rpc bench` sends); with `--typed` it is `Service::call_json_with` of a [`Line`] and
//! a typed reply, so the client's JSON is counted too. Neither retries (no `message_id`).

use std::process::ExitCode;
use std::time::Duration;

use amqp_rpc::protocol::{ErrorCode, RequestError};
use amqp_rpc::service::{handler, json, Methods, Request};
use amqp_rpc::{CallOptions, Client};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

#[path = "closed_loop.rs"]
mod closed_loop;

/// The body of `echo_json` and of `--typed` calls: a small order line.
#[derive(Clone, Debug, Deserialize, Serialize)]
struct Line {
    order: String,
    sku: String,
    qty: u32,
    note: String,
}

impl Line {
    fn sample() -> Self {
        Line {
            order: "o-1234567".into(),
            sku: "sku-7".into(),
            qty: 3,
            note: "gift wrap".into(),
        }
    }
}

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// tokio's multi-threaded runtime instead of a current-thread one (as `amqp-rpcd` and
    /// `amqp-rpc bench` run).
    #[arg(long, global = true)]
    multi_thread: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Serve `wait`, `echo` and `echo_json` on `service.queue`.
    Serve {
        /// How long `wait` awaits, in ms.
        #[arg(long, default_value_t = 20)]
        wait_ms: u64,
    },
    /// How long `tokio::time::sleep(--wait-ms)` really takes here, with nothing else running
    /// (the timer's own overshoot, which `wait` pays on top of its nominal time): p50, p90 and
    /// max over `--samples` sleeps, one at a time.
    Timer {
        #[arg(long, default_value_t = 20)]
        wait_ms: u64,
        #[arg(long, default_value_t = 100)]
        samples: usize,
    },
    /// Closed-loop load through `amqp_rpc::Client`.
    Load {
        #[arg(
            long,
            env = "AMQP_URL",
            default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
        )]
        url: String,
        #[arg(long, default_value = "bench_methods")]
        queue: String,
        #[arg(long, default_value = "echo")]
        method: String,
        /// Raw body; default: the sample `Line` as JSON.
        #[arg(long)]
        arg: Option<String>,
        /// `call_json_with` a `Line`, decoding the reply as one.
        #[arg(long)]
        typed: bool,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        #[arg(long)]
        json: bool,
    },
}

fn methods(wait: Duration) -> Methods {
    Methods::default()
        .with(handler("wait", move |req: Request| async move {
            tokio::select! {
                _ = req.cancelled() => {
                    Err(RequestError::new(ErrorCode::Cancelled, "cancelled while waiting"))
                }
                _ = tokio::time::sleep(wait) => Ok(b"done".to_vec()),
            }
        }))
        .with(handler("echo", |req: Request| async move {
            Ok(req.into_body())
        }))
        .with(json("echo_json", |_req: Request, line: Line| async move {
            Ok(line)
        }))
}

async fn serve(wait: Duration) -> Result<(), String> {
    let config = amqp_rpc::config::load(None).map_err(|e| e.to_string())?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        trigger.cancel();
    });
    eprintln!(
        "bench_service serving wait ({wait:?}), echo, echo_json on {:?}",
        config.service.queue
    );
    amqp_rpc::run(config, methods(wait), prometheus::Registry::new(), shutdown)
        .await
        .map_err(|e| e.to_string())
}

async fn timer(wait: Duration, samples: usize) {
    let mut took: Vec<Duration> = Vec::with_capacity(samples);
    for _ in 0..samples.max(1) {
        let t0 = tokio::time::Instant::now();
        tokio::time::sleep(wait).await;
        took.push(t0.elapsed());
    }
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q) as usize];
    println!(
        "sleep({wait:?}) took p50 {:?}, p90 {:?}, max {:?} over {} samples",
        at(0.5),
        at(0.9),
        at(1.0),
        took.len()
    );
    println!(
        "{}",
        serde_json::json!({
            "wait_us": wait.as_micros() as u64,
            "p50_us": at(0.5).as_micros() as u64,
            "p90_us": at(0.9).as_micros() as u64,
            "max_us": at(1.0).as_micros() as u64,
        })
    );
}

#[allow(clippy::too_many_arguments)]
async fn load(
    url: String,
    queue: String,
    method: String,
    arg: Option<String>,
    typed: bool,
    spec: (usize, Duration, Duration),
    json: bool,
) -> Result<(), String> {
    let client = Client::builder(url.as_str())
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let service = client.service(&queue);
    let (concurrency, duration, warmup) = spec;
    let options = CallOptions {
        timeout: Duration::from_secs(5),
        idempotent: false,
    };
    let body = arg.unwrap_or_else(|| serde_json::to_string(&Line::sample()).expect("encodes"));
    let report = if typed {
        let line = Line::sample();
        let call = move || {
            let (service, method, line) = (service.clone(), method.clone(), line.clone());
            async move {
                let back: Line = service
                    .call_json_with(&method, &line, options)
                    .await
                    .map_err(|e| e.kind())?;
                if back.qty != line.qty {
                    return Err("wrong_reply");
                }
                Ok(())
            }
        };
        closed_loop::run(call, concurrency, duration, warmup).await
    } else {
        let body: std::sync::Arc<[u8]> = body.as_bytes().into();
        let call = move || {
            let (service, method, body) = (service.clone(), method.clone(), body.clone());
            async move {
                service
                    .call_with(&method, &body, options)
                    .await
                    .map(drop)
                    .map_err(|e| e.kind())
            }
        };
        closed_loop::run(call, concurrency, duration, warmup).await
    };
    print!("{}", report.summary());
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("report encodes")
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = if cli.multi_thread {
        tokio::runtime::Runtime::new()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench_service: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { wait_ms } => serve(Duration::from_millis(wait_ms)).await,
            Command::Timer { wait_ms, samples } => {
                timer(Duration::from_millis(wait_ms), samples).await;
                Ok(())
            }
            Command::Load {
                url,
                queue,
                method,
                arg,
                typed,
                concurrency,
                duration,
                warmup,
                json,
            } => {
                let spec = (concurrency, duration, warmup);
                load(url, queue, method, arg, typed, spec, json).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_service: {e}");
            ExitCode::FAILURE
        }
    }
}
