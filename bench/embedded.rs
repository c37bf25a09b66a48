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
//!   library's defaults: lapin's socket loop as a task of this runtime, confirm mode,
//!   mandatory publishes, the deadline metadata); each call is `client.call(method, body)`.
//! - `lib+thread`: the same with `amqp.io_thread = true` (the socket loop on lapin's thread).
//! - `bare`: a direct reply-to client over plain lapin (`ConnectionProperties::default()`,
//!   so lapin's own I/O thread), as `examples/bare_echo.rs`'s: one channel, a pending map, a
//!   router task, a uuid per call, `type` = the method. No deadline, confirm or mandatory.
//! - `bare+task`, `bare+confirm`, `bare+mandatory`, `bare+meta`, `bare+nowait` and any combination
//!   (`bare+task+confirm+meta+nowait` sends what the library sends, the way it sends it): the
//!   bare client with, one at a time, what the library does differently. `task` runs the
//!   socket loop as a task of the runtime (vendored lapin's option); `confirm` puts the
//!   channel in confirm mode and publishes `mandatory`, looking at the confirm after the reply
//!   (as the library does); `meta` sends the library's request metadata (`x-deadline-ms`,
//!   `expiration`, `content_type`; amqp-rpcd then works to the deadline); `nowait` does not
//!   await the publish's write before waiting for the reply (the library's `Publish::start`
//!   does not).
//!
//! Each run reports calls/s, p50 and p99, and per call: this process's CPU (µs), split by
//! thread name (runtime workers, lapin's I/O thread), its context switches (voluntary +
//! involuntary, from `/proc/self/task/*/status`: each is a thread that slept and was woken,
//! or was preempted), and the CPU of the processes given with `--watch name=pid` (the daemon,
//! the broker). The machine's steal is printed with every run. The last table has the
//! medians, and the ratio of each system to the first one, round by round.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_rpc::config::AmqpConfig;
use amqp_rpc::protocol::{expiration_ms, now_epoch_ms, DEADLINE_HEADER};
use amqp_rpc::Client;
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::oneshot;

#[path = "closed_loop.rs"]
#[allow(dead_code)] // the summary text is for the programs that print it
mod closed_loop;

use closed_loop::Report;

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

/// Wait until the whole machine used less than `pct` % of one CPU over 2 s (at most 10 min).
async fn wait_quiet(pct: f64) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let give_up = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let a = Usage::now(&[]).machine;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let b = Usage::now(&[]).machine;
        let busy = 100.0 * cpus * (b.0 - a.0) as f64 / (b.1 - a.1).max(1) as f64;
        if busy < pct || std::time::Instant::now() > give_up {
            return;
        }
    }
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
                "unknown system {name:?}: lib[+thread] or bare[+task][+confirm][+mandatory][+meta][+nowait]"
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

/// What the bare client does beyond the plain bare echo client.
#[derive(Clone, Copy, Debug, Default)]
struct Features {
    task: bool,
    confirm: bool,
    /// `mandatory` without confirm mode (confirm mode implies it).
    mandatory: bool,
    meta: bool,
    nowait: bool,
}

/// A direct reply-to client over lapin, as `examples/bare_echo.rs`'s.
#[derive(Clone)]
struct Bare {
    channel: lapin::Channel,
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<bool>>>>,
    method: ShortString,
    features: Features,
}

#[cfg(lapin_io_loop_on_runtime)]
fn socket_loop(props: ConnectionProperties, task: bool) -> ConnectionProperties {
    props.with_io_loop_on_runtime(task)
}

#[cfg(not(lapin_io_loop_on_runtime))]
fn socket_loop(props: ConnectionProperties, task: bool) -> ConnectionProperties {
    assert!(
        !task,
        "bare+task needs the vendored lapin (build in this workspace)"
    );
    props
}

impl Bare {
    async fn connect(url: &str, method: &str, features: Features) -> lapin::Result<Self> {
        let props = socket_loop(ConnectionProperties::default(), features.task);
        let conn = Connection::connect(url, props).await?;
        let channel = conn.create_channel().await?;
        if features.confirm {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        }
        let mut replies = channel
            .basic_consume(
                "amq.rabbitmq.reply-to".into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let pending: Arc<Mutex<HashMap<String, oneshot::Sender<bool>>>> = Arc::default();
        let router = pending.clone();
        tokio::spawn(async move {
            let _conn = conn; // open while the router runs
            while let Some(Ok(d)) = replies.next().await {
                let Some(id) = d.properties.correlation_id() else {
                    continue;
                };
                if let Some(tx) = router.lock().unwrap().remove(id.as_str()) {
                    // An error reply of amqp-rpcd carries x-error-code.
                    let ok = d
                        .properties
                        .headers()
                        .as_ref()
                        .is_none_or(|h| !h.inner().contains_key("x-error-code"));
                    let _ = tx.send(ok);
                }
            }
        });
        Ok(Bare {
            channel,
            pending,
            method: method.into(),
            features,
        })
    }

    async fn call(self, queue: ShortString, body: &[u8]) -> Result<(), &'static str> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id.clone(), tx);
        let mut props = BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id(id.as_str().into())
            .with_type(self.method.clone());
        if self.features.meta {
            let mut headers = FieldTable::default();
            headers.insert(
                DEADLINE_HEADER.into(),
                AMQPValue::LongString(
                    (now_epoch_ms() + TIMEOUT.as_millis() as u64)
                        .to_string()
                        .into(),
                ),
            );
            props = props
                .with_content_type("text/plain".into())
                .with_expiration(expiration_ms(TIMEOUT).into())
                .with_headers(headers);
        }
        let options = BasicPublishOptions {
            mandatory: self.features.confirm || self.features.mandatory,
            ..BasicPublishOptions::default()
        };
        let publish = {
            let channel = self.channel.clone();
            let body = body.to_vec();
            async move {
                channel
                    .basic_publish("".into(), queue, options, &body, props)
                    .await
            }
        };
        // The write is awaited, as bare_echo does; with `nowait` the publish runs beside the
        // wait for the reply, as the library does not await the write either.
        let reply = tokio::time::timeout(TIMEOUT, rx);
        let (confirm, reply) = if self.features.nowait {
            let mut publish = std::pin::pin!(publish);
            let mut reply = std::pin::pin!(reply);
            let mut confirm = None;
            let reply = loop {
                tokio::select! {
                    biased;
                    r = &mut reply => break r,
                    p = &mut publish, if confirm.is_none() => match p {
                        Ok(c) => confirm = Some(c),
                        Err(_) => return self.fail(&id, "connection_lost"),
                    },
                }
            };
            (confirm, reply)
        } else {
            match publish.await {
                Ok(c) => (Some(c), reply.await),
                Err(_) => return self.fail(&id, "connection_lost"),
            }
        };
        if self.features.confirm {
            // In by now, almost always: the broker confirms on routing, long before the reply.
            if let Some(confirm) = confirm {
                let _ = confirm.await;
            }
        }
        match reply {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err("remote"),
            Ok(Err(_)) => Err("connection_lost"),
            Err(_) => self.fail(&id, "timeout"),
        }
    }

    fn fail(&self, id: &str, kind: &'static str) -> Result<(), &'static str> {
        self.pending.lock().unwrap().remove(id);
        Err(kind)
    }
}

/// CPU and context switches of this process's threads (by name) and of watched processes.
#[derive(Clone, Debug, Default)]
struct Usage {
    /// Thread name (its kind, digits stripped) -> CPU ticks.
    threads: BTreeMap<String, u64>,
    /// Context switches of this process's threads.
    switches: u64,
    /// Watched name -> CPU ticks.
    watched: BTreeMap<String, u64>,
    /// Machine (busy, total, steal) jiffies; busy leaves idle, iowait and steal out.
    machine: (u64, u64, u64),
}

fn ticks(stat: &str) -> Option<u64> {
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn thread_kind(stat: &str) -> String {
    let name = stat
        .find('(')
        .zip(stat.rfind(')'))
        .map_or("?", |(a, b)| &stat[a + 1..b]);
    name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-')
        .to_owned()
}

impl Usage {
    fn now(watch: &[(String, u32)]) -> Usage {
        let mut usage = Usage::default();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let path = task.path();
                if let Ok(stat) = std::fs::read_to_string(path.join("stat")) {
                    *usage.threads.entry(thread_kind(&stat)).or_default() +=
                        ticks(&stat).unwrap_or(0);
                }
                if let Ok(status) = std::fs::read_to_string(path.join("status")) {
                    usage.switches += status
                        .lines()
                        .filter(|l| l.contains("ctxt_switches:"))
                        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                        .sum::<u64>();
                }
            }
        }
        for (name, pid) in watch {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            usage
                .watched
                .insert(name.clone(), ticks(&stat).unwrap_or(0));
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/stat") {
            let v: Vec<u64> = stat
                .lines()
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            if v.len() >= 8 {
                let total: u64 = v[..8].iter().sum();
                usage.machine = (total - v[3] - v[4] - v[7], total, v[7]);
            }
        }
        usage
    }
}

/// One run's figures.
#[derive(Clone, Debug, serde::Serialize)]
struct Run {
    system: String,
    round: usize,
    concurrency: usize,
    calls_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
    error_kinds: BTreeMap<String, u64>,
    /// This process's CPU per call, µs, by thread kind and in total.
    cpu_us: BTreeMap<String, f64>,
    /// This process's context switches per call.
    switches_per_call: f64,
    /// Watched processes' CPU per call, µs.
    watched_us: BTreeMap<String, f64>,
    steal_pct: f64,
    /// Other processes' CPU over the window, in % of one CPU (the noise).
    others_pct: f64,
}

/// The figures of one run. The usage window (`span` seconds) also covers the warm-up, run at
/// about the measured rate: its counts are scaled to the measured share, so they stay per call.
fn per_call(
    (before, after): (&Usage, &Usage),
    span: f64,
    report: &Report,
    name: &str,
    round: usize,
) -> Run {
    let wall = report.elapsed_secs.max(1e-9);
    let tick_us = 1e6 / 100.0; // USER_HZ: 100 on Linux
    let calls = report.calls.max(1) as f64;
    let busy = after.machine.0 - before.machine.0;
    let total = after.machine.1 - before.machine.1;
    let steal = after.machine.2 - before.machine.2;
    let window = |t: u64| t as f64 * tick_us;
    let mut cpu_us = BTreeMap::new();
    let mut all = 0.0;
    for (kind, &t) in &after.threads {
        let d = t.saturating_sub(before.threads.get(kind).copied().unwrap_or(0));
        all += window(d);
        cpu_us.insert(kind.clone(), window(d));
    }
    cpu_us.insert("total".into(), all);
    let watched_ticks: u64 = after
        .watched
        .iter()
        .map(|(k, &t)| t.saturating_sub(before.watched.get(k).copied().unwrap_or(0)))
        .sum();
    // CPU of every other process on the machine, in % of one CPU, over the window.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let others_pct = if total > 0 {
        let machine_pct = 100.0 * cpus * busy as f64 / total as f64;
        let ours_ticks = all / tick_us + watched_ticks as f64;
        (machine_pct - ours_ticks / span.max(wall)).max(0.0)
    } else {
        0.0
    };
    let scale = |x: f64| x * (wall / span.max(wall)) / calls;
    for v in cpu_us.values_mut() {
        *v = scale(*v);
    }
    cpu_us.retain(|k, v| k == "total" || *v >= 0.5);
    let watched_us = after
        .watched
        .iter()
        .map(|(k, &t)| {
            let d = t.saturating_sub(before.watched.get(k).copied().unwrap_or(0));
            (k.clone(), scale(window(d)))
        })
        .collect();
    Run {
        system: name.to_owned(),
        round,
        concurrency: report.concurrency,
        calls_per_sec: report.calls_per_sec,
        p50_us: report.p50_us,
        p99_us: report.p99_us,
        errors: report.errors,
        error_kinds: report.error_kinds.clone(),
        cpu_us,
        switches_per_call: scale(after.switches.saturating_sub(before.switches) as f64),
        watched_us,
        others_pct,
        steal_pct: if total > 0 {
            100.0 * steal as f64 / total as f64
        } else {
            0.0
        },
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

fn table(runs: &[Run], systems: &[String], concurrency: usize) {
    let mine: Vec<&Run> = runs
        .iter()
        .filter(|r| r.concurrency == concurrency)
        .collect();
    let of = |s: &str| -> Vec<&Run> { mine.iter().copied().filter(|r| r.system == s).collect() };
    let base = &systems[0];
    println!(
        "\n### {concurrency} in flight (medians of {} rounds)\n",
        of(base).len()
    );
    println!(
        "| system | calls/s | vs {base} (per round) | p50 µs | p99 µs | CPU µs/call (threads) | \
         switches/call | watched µs/call | other processes, % CPU | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for system in systems {
        let rs = of(system);
        let cps = median(rs.iter().map(|r| r.calls_per_sec).collect());
        // Paired: this system's run against the first system's run of the same round.
        let ratios: Vec<f64> = rs
            .iter()
            .filter_map(|r| {
                of(base)
                    .into_iter()
                    .find(|b| b.round == r.round)
                    .map(|b| r.calls_per_sec / b.calls_per_sec)
            })
            .collect();
        let ratio_text = ratios
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut kinds: Vec<String> = rs.iter().flat_map(|r| r.cpu_us.keys().cloned()).collect();
        kinds.sort();
        kinds.dedup();
        let cpu = kinds
            .iter()
            .map(|k| {
                let v = median(
                    rs.iter()
                        .map(|r| r.cpu_us.get(k).copied().unwrap_or(0.0))
                        .collect(),
                );
                format!("{k} {v:.0}")
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut watched: Vec<String> = rs
            .iter()
            .flat_map(|r| r.watched_us.keys().cloned())
            .collect();
        watched.sort();
        watched.dedup();
        let watched = watched
            .iter()
            .map(|k| {
                let v = median(
                    rs.iter()
                        .map(|r| r.watched_us.get(k).copied().unwrap_or(0.0))
                        .collect(),
                );
                format!("{k} {v:.0}")
            })
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {system} | {cps:.0} | {:.2}× ({ratio_text}) | {:.0} | {:.0} | {cpu} | {:.1} | {watched} | {:.0} | {} |",
            median(ratios.clone()),
            median(rs.iter().map(|r| r.p50_us as f64).collect()),
            median(rs.iter().map(|r| r.p99_us as f64).collect()),
            median(rs.iter().map(|r| r.switches_per_call).collect()),
            median(rs.iter().map(|r| r.others_pct).collect()),
            rs.iter().map(|r| r.errors).sum::<u64>(),
        );
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
                     others {:.0}% of a CPU, steal {:.0}%",
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
        table(&runs, &cli.systems, concurrency);
    }
    Ok(())
}
