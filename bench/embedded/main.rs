//! amqp-rpc's client embedded in an application, against a bare lapin client in the same
//! application: one `#[tokio::main]` process (tokio's default multi-threaded runtime, one
//! worker per CPU), both clients connected side by side, driven in alternating rounds by the
//! same closed loop (`bench/closed_loop.rs`), calling `amqp-rpcd`'s `fib` with the body `10`.
//! Built as `target/release/examples/embedded_bench`; `bench/embedded.py` starts the daemon
//! and runs it:
//!
//! ```sh
//! cargo build --release --bins --examples
//! python3 bench/embedded.py --duration 8s --rounds 3                 # lib vs bare, 1 and 64
//! # or by hand, against a running daemon:
//! AMQP_RPC__SERVICE__QUEUE=embedded_q AMQP_RPC__HTTP__LISTEN=127.0.0.1:0 target/release/amqp-rpcd &
//! target/release/examples/embedded_bench --queue embedded_q --concurrency 1,64 --rounds 3
//! ```
//!
//! Systems (`--systems`, comma-separated; default `bare,lib`: ratios are against the first):
//! - `lib`: `amqp_rpc::Client::builder(url).queue(q).connect()`, nothing else set (the
//!   library's defaults: lapin's socket loop as a task of this runtime, mandatory publishes
//!   without confirm mode, the deadline metadata); each call is `client.call(method, body)`.
//! - `lib+thread`: the same with `amqp.io_thread = true` (the socket loop on lapin's thread).
//! - `bare`: a direct reply-to client over plain lapin (`ConnectionProperties::default()`,
//!   so lapin's own I/O thread), as `examples/bare_echo.rs`'s: one channel, a pending map, a
//!   router task, a uuid per call, `type` = the method. No deadline, confirm or mandatory.
//! - `bare+task`, `bare+confirm`, `bare+mandatory`, `bare+meta`, `bare+nowait` and any combination
//!   (`bare+task+mandatory+meta+nowait` sends what the library sends, the way it sends it): the
//!   bare client with, one at a time, what the library does differently. `task` runs the
//!   socket loop as a task of the runtime (vendored lapin's option); `confirm` puts the
//!   channel in confirm mode and publishes `mandatory`, looking at the confirm after the reply
//!   (as the library does with `publisher_confirms(true)`); `meta` sends the library's
//!   deadline metadata (`x-deadline-ms` and `expiration`; amqp-rpcd then works to the
//!   deadline), `header` and `expiration` one of the two each; `nowait` does not
//!   await the publish's write before waiting for the reply (the library's `Publish::start`
//!   does not).
//!
//! Each run reports calls/s, p50 and p99, and per call: this process's CPU (µs), split by
//! thread name (runtime workers, lapin's I/O thread), its context switches (voluntary +
//! involuntary, from `/proc/self/task/*/status`: each is a thread that slept and was woken,
//! or was preempted), and the CPU of the processes given with `--watch name=pid` (the daemon,
//! the broker). The machine's steal is printed with every run. The last table has the
//! medians, and the ratio of each system to the first one, round by round.
//!
//! Here: the command line and the rounds; the bare client is in `bare.rs`, the `/proc`
//! accounting in `usage.rs`, the tables in `table.rs`.

use std::sync::Arc;
use std::time::Duration;

use amqp_rpc::config::AmqpConfig;
use amqp_rpc::Client;
use clap::Parser;
use lapin::types::ShortString;

#[path = "../closed_loop.rs"]
#[allow(dead_code)] // the summary text is for the programs that print it
mod closed_loop;

mod bare;
mod table;
mod usage;

use bare::{Bare, Features};
use closed_loop::Report;
use usage::{per_call, wait_quiet, Usage};

/// Per-call timeout of every system.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Parser)]
struct Cli {
    /// Broker URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    url: String,
    /// The queue `amqp-rpcd` serves.
    #[arg(long)]
    queue: String,
    #[arg(long, default_value = "fib")]
    method: String,
    #[arg(long, default_value = "10")]
    arg: String,
    /// Calls in flight, one table each.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    concurrency: Vec<usize>,
    /// Rounds: each system runs once per round, in alternating order (ABBA).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Measured time of each run.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured time before each run.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Systems to compare; ratios are against the first.
    #[arg(long, value_delimiter = ',', default_value = "bare,lib")]
    systems: Vec<String>,
    /// Other processes to account CPU for, as `name=pid` (repeatable).
    #[arg(long)]
    watch: Vec<String>,
    /// Print one JSON line per run on stdout as well.
    #[arg(long)]
    json: bool,
    /// Repeat a whole round (every system once, so they stay side by side) when one of its
    /// runs saw other processes use more than this much CPU (% of one CPU): on a shared
    /// machine they are the noise. Off by default.
    #[arg(long)]
    max_others: Option<f64>,
    /// How often a round is repeated at most for `--max-others`.
    #[arg(long, default_value_t = 5)]
    retries: usize,
    /// Before each round, wait (up to 10 minutes) until the machine has been less busy than
    /// this (% of one CPU) for 2 s, so a round starts in a quiet moment. Off by default.
    #[arg(long)]
    wait_quiet: Option<f64>,
}

/// One way of making calls.
#[derive(Clone)]
enum System {
    Lib(Client),
    Bare(Bare),
}

impl System {
    async fn connect(name: &str, cli: &Cli) -> Result<System, String> {
        let mut parts = name.split('+');
        let base = parts.next().unwrap_or_default();
        let flags: Vec<&str> = parts.collect();
        let unknown = |f: &&str| format!("system {name:?}: unknown option {f:?}");
        match base {
            "lib" => {
                let mut builder = Client::builder(cli.url.as_str()).queue(cli.queue.as_str());
                for flag in &flags {
                    match *flag {
                        "thread" => {
                            builder = builder.amqp(AmqpConfig {
                                io_thread: true,
                                ..AmqpConfig::default()
                            })
                        }
                        _ => return Err(unknown(flag)),
                    }
                }
                let client = builder.connect().await.map_err(|e| e.to_string())?;
                Ok(System::Lib(client))
            }
            "bare" => {
                let mut features = Features::default();
                for flag in &flags {
                    match *flag {
                        "task" => features.task = true,
                        "confirm" => features.confirm = true,
                        "mandatory" => features.mandatory = true,
                        "meta" => features.meta = true,
                        "header" => features.header = true,
                        "expiration" => features.expiration = true,
                        "nowait" => features.nowait = true,
                        _ => return Err(unknown(flag)),
                    }
                }
                let bare = Bare::connect(&cli.url, &cli.method, features)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(System::Bare(bare))
            }
            _ => Err(format!(
                "unknown system {name:?}: lib[+thread] or bare[+task][+confirm][+mandatory][+meta|+header|+expiration][+nowait]"
            )),
        }
    }

    async fn run(&self, cli: &Cli, concurrency: usize) -> Report {
        let body: Arc<[u8]> = cli.arg.as_bytes().into();
        match self {
            System::Lib(client) => {
                let (client, method) = (client.clone(), Arc::<str>::from(cli.method.as_str()));
                let call = move || {
                    let (client, method, body) = (client.clone(), method.clone(), body.clone());
                    async move {
                        client
                            .call(&method, &body)
                            .await
                            .map(drop)
                            .map_err(|e| e.kind())
                    }
                };
                closed_loop::run(call, concurrency, cli.duration, cli.warmup).await
            }
            System::Bare(bare) => {
                let (bare, queue) = (bare.clone(), ShortString::from(cli.queue.as_str()));
                let call = move || {
                    let (bare, queue, body) = (bare.clone(), queue.clone(), body.clone());
                    async move { bare.call(queue, &body).await }
                };
                closed_loop::run(call, concurrency, cli.duration, cli.warmup).await
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let cli = Cli::parse();
    let watch: Vec<(String, u32)> = cli
        .watch
        .iter()
        .map(|w| {
            let (name, pid) = w
                .split_once('=')
                .ok_or(format!("--watch {w:?}: name=pid"))?;
            Ok((
                name.to_owned(),
                pid.parse().map_err(|_| format!("--watch {w:?}"))?,
            ))
        })
        .collect::<Result<_, String>>()?;
    let mut systems = Vec::new();
    for name in &cli.systems {
        systems.push((name.clone(), System::connect(name, &cli).await?));
    }
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    eprintln!(
        "embedded_bench: {workers} runtime workers; systems {:?}; {} x {:?} (+{:?} warm-up) per run",
        cli.systems, cli.rounds, cli.duration, cli.warmup
    );
    let mut runs = Vec::new();
    for &concurrency in &cli.concurrency {
        let mut retries = cli.retries;
        let mut round = 0;
        while round < cli.rounds {
            let order: Vec<usize> = if round % 2 == 0 {
                (0..systems.len()).collect()
            } else {
                (0..systems.len()).rev().collect()
            };
            if let Some(pct) = cli.wait_quiet {
                wait_quiet(pct).await;
            }
            let mut this_round = Vec::new();
            for i in order {
                let (name, system) = &systems[i];
                let before = Usage::now(&watch);
                let t0 = std::time::Instant::now();
                let report = system.run(&cli, concurrency).await;
                let span = t0.elapsed().as_secs_f64();
                let after = Usage::now(&watch);
                let run = per_call((&before, &after), span, &report, name, round);
                eprintln!(
                    "c={concurrency} round {round} {name}: {:.0} calls/s p50 {} µs p99 {} µs, \
                     errors {}; CPU/call {:?} µs, {:.1} switches/call, watched {:?} µs/call, \
                     syscalls/call {:?}, others {:.0}% of a CPU, steal {:.0}%",
                    run.calls_per_sec,
                    run.p50_us,
                    run.p99_us,
                    run.errors,
                    run.cpu_us
                        .iter()
                        .map(|(k, v)| format!("{k} {v:.0}"))
                        .collect::<Vec<_>>(),
                    run.switches_per_call,
                    run.watched_us
                        .iter()
                        .map(|(k, v)| format!("{k} {v:.0}"))
                        .collect::<Vec<_>>(),
                    run.syscalls_per_call
                        .iter()
                        .map(|(k, v)| format!("{k} {v:.2}"))
                        .collect::<Vec<_>>(),
                    run.others_pct,
                    run.steal_pct
                );
                this_round.push(run);
            }
            let noisy = this_round.iter().map(|r| r.others_pct).fold(0.0, f64::max);
            if let Some(max) = cli.max_others {
                if noisy > max && retries > 0 {
                    retries -= 1;
                    eprintln!(
                        "c={concurrency} round {round}: other processes used {noisy:.0}% of a \
                         CPU (over {max:.0}%): repeating the round ({retries} repeats left)"
                    );
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    continue;
                }
            }
            for run in this_round {
                if cli.json {
                    println!("{}", serde_json::to_string(&run).expect("encodes"));
                }
                runs.push(run);
            }
            round += 1;
        }
    }
    for &concurrency in &cli.concurrency {
        table::table(&runs, &cli.systems, concurrency);
    }
    Ok(())
}
