//! `amqp-rpc`: the command-line client. `call` makes one call and maps its outcome to an exit
//! code; `bench` drives closed-loop load. Both are thin layers over [`amqp_rpc::Client`].
//! Arguments and replies of the methods it knows are checked ([`known`]).

mod bench;
mod known;
#[path = "../common/otlp.rs"]
mod otlp;
#[path = "../common/telemetry.rs"]
mod telemetry;

use std::process::ExitCode;
use std::time::Duration;

use amqp_rpc::config::{self, AmqpConfig, LogConfig};
use amqp_rpc::{CallError, CallOptions, Client};
use bench::{Amount, BenchSpec};
use clap::{Args, Parser, Subcommand};

const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Exit codes of `amqp-rpc call` (the README lists them).
mod exit {
    pub const NO_SERVER: u8 = 3;
    pub const TIMEOUT: u8 = 4;
    pub const REMOTE: u8 = 5;
    pub const UNAVAILABLE: u8 = 6;
    /// clap's own code for usage errors: a known method's argument it does not take, too.
    pub const USAGE: u8 = 2;
    /// A success reply that is not what the method promises (a foreign server's nonsense).
    pub const BAD_REPLY: u8 = 7;
}

/// Call RPC methods served by amqp-rpcd (or any tutorial-style server) over RabbitMQ.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Target {
    /// Broker URL, or several of one cluster, comma-separated.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_URL, hide_env_values = true)]
    url: String,
    /// Service queue.
    #[arg(long, default_value = "rpc_queue")]
    queue: String,
    /// Per-call timeout, e.g. 700ms, 5s.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Never resend a call. By default a method known to be idempotent (`fib`, or any method
    /// with --idempotent) is retried on connection loss and unavailability within the
    /// timeout; other methods never are.
    #[arg(long, conflicts_with = "idempotent")]
    no_retry: bool,
    /// The method is safe to run twice: resend it (same message_id) within the timeout after a
    /// lost connection or an `unavailable` answer.
    #[arg(long)]
    idempotent: bool,
    /// Run the AMQP socket loop on a thread of its own (lapin's default) rather than as a task
    /// of the runtime (`amqp.io_thread`); slower, for comparison.
    #[arg(long)]
    io_thread: bool,
    /// Send the URL's user as every request's `user_id` (the broker checks it), for methods
    /// a daemon answers only for some callers (`service.callers`).
    #[arg(long)]
    identify: bool,
    /// Publish requests in confirm mode, so a request the queue refuses (`x-overflow =
    /// reject-publish` at its length limit) fails at once (exit 6) instead of at the timeout.
    #[arg(long)]
    publisher_confirms: bool,
}

impl Target {
    /// Options for calls of `method`: only methods said or known to be idempotent are retried.
    fn options(&self, method: &str) -> CallOptions {
        let known = known::known(method).is_some_and(|k| k.idempotent);
        CallOptions {
            timeout: self.timeout,
            idempotent: !self.no_retry && (self.idempotent || known),
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make one call and print the result. Exit codes: 0 ok, 2 usage (or an argument the
    /// method does not take), 3 no server, 4 timeout, 5 remote error, 6 broker unreachable or
    /// connection lost, 7 a reply that is not what the method promises.
    Call {
        /// Method name, e.g. fib.
        method: String,
        /// Argument, sent as the request body (may start with '-').
        #[arg(allow_hyphen_values = true)]
        arg: String,
        #[command(flatten)]
        target: Target,
    },
    /// Closed-loop load: prints calls/s and latency percentiles.
    Bench {
        /// Calls in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Total calls (default: run for --duration).
        #[arg(long, conflicts_with = "duration")]
        requests: Option<u64>,
        /// How long to run when --requests is not given.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Unrecorded warm-up before measuring.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        /// Method to call.
        #[arg(long, default_value = "fib")]
        method: String,
        /// Argument of each call.
        #[arg(long, default_value = "10")]
        arg: String,
        /// Print one JSON object as the last line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let url = match &cli.command {
        Command::Call { target, .. } | Command::Bench { target, .. } => target.url.clone(),
    };
    let urls: Vec<String> = config::split_urls(&url).map(str::to_owned).collect();
    let log = LogConfig {
        // lapin logs a broker's channel close (e.g. the 404 of our no-server probe) as an
        // error; the CLI reports outcomes itself, so only our own warnings are shown.
        level: "warn,lapin=off".into(),
        ..LogConfig::default()
    };
    // Trace export from OTEL_* alone: the CLI has no config file.
    let export = match config::TelemetryConfig::default()
        .resolve("amqp-rpc", config::telemetry::process_env)
    {
        Ok(export) => export,
        Err(problems) => {
            eprintln!("amqp-rpc: {}", problems.join("; "));
            return ExitCode::from(exit::USAGE);
        }
    };
    let export = match telemetry::init(&log, config::url_secrets(&urls), export.as_ref()) {
        Ok(export) => export,
        Err(e) => {
            eprintln!("amqp-rpc: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    // One async thread: a client is I/O (lapin reads and writes the socket on a thread of its
    // own), and one thread carries thousands of calls per second; a multi-threaded scheduler
    // only adds cross-worker wake-ups (3% fewer calls/s at 64 in flight, BENCHMARKS.md).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("amqp-rpc: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Call {
                method,
                arg,
                target,
            } => call(method, arg, target).await,
            Command::Bench {
                concurrency,
                requests,
                duration,
                warmup,
                method,
                arg,
                json,
                target,
            } => {
                if let Err(e) = known::check_arg(&method, &arg) {
                    eprintln!("error: {e}");
                    return exit::USAGE;
                }
                let amount = requests.map_or(Amount::Duration(duration), Amount::Requests);
                let options = target.options(&method);
                let spec = BenchSpec {
                    concurrency,
                    amount,
                    warmup,
                    method,
                    arg,
                    options,
                    progress: true,
                };
                run_bench(spec, json, target).await
            }
        }
    });
    runtime.shutdown_background();
    // After the runtime, outside it: the SDK's shutdown blocks until the last spans are sent.
    if let Some(export) = export {
        export.shutdown();
    }
    ExitCode::from(code)
}

fn client(target: &Target) -> Result<Client, CallError> {
    let amqp = AmqpConfig {
        io_thread: target.io_thread,
        ..AmqpConfig::default()
    };
    Client::builder(target.url.as_str())
        .amqp(amqp)
        .queue(target.queue.as_str())
        .timeout(target.timeout)
        .identify(target.identify)
        .publisher_confirms(target.publisher_confirms)
        .build()
}

async fn call(method: String, arg: String, target: Target) -> u8 {
    if let Err(e) = known::check_arg(&method, &arg) {
        eprintln!("error: {e}");
        return exit::USAGE;
    }
    let result = match client(&target) {
        Ok(client) => {
            client
                .call_with(&method, arg.as_bytes(), target.options(&method))
                .await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(body) => match known::check_reply(&method, &body) {
            Ok(()) => {
                println!("{}", String::from_utf8_lossy(&body));
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                exit::BAD_REPLY
            }
        },
        Err(e) => {
            let code = match &e {
                CallError::NoServer { .. } => exit::NO_SERVER,
                CallError::Timeout(_) => exit::TIMEOUT,
                CallError::Remote { .. } => exit::REMOTE,
                // ConnectionLost, Unavailable, and whatever the library adds later.
                _ => exit::UNAVAILABLE,
            };
            match &e {
                CallError::Remote { code, message } => eprintln!("error: {code}: {message}"),
                other => eprintln!("error: {other}"),
            }
            code
        }
    }
}

async fn run_bench(spec: BenchSpec, json: bool, target: Target) -> u8 {
    let client = match client(&target) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::UNAVAILABLE;
        }
    };
    let report = bench::run(client, spec).await;
    print!("{}", report.summary());
    if json {
        match serde_json::to_string(&report) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("error: cannot encode the report: {e}"),
        }
    }
    0
}
