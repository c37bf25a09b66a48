//! `amqp-rpcd`: the worker daemon, serving the demo `fib` method. Thin by design: parse
//! arguments, load the config (the library's sections and the demo's `[fib]`), set up logging,
//! own the process (signals, systemd, exit codes), build the metrics registry and the shutdown
//! token, and hand the rest to [`amqp_rpc::Daemon`].

use std::path::PathBuf;
use std::process::ExitCode;

use amqp_rpc::config::{self, Config, ConfigError};
use amqp_rpc::Daemon;
use clap::Parser;

mod fib;
#[path = "../common/otlp.rs"]
mod otlp;
mod shutdown;
mod systemd;
#[path = "../common/telemetry.rs"]
mod telemetry;

/// Exit code for an invalid configuration (EX_USAGE), as `--check-config` promises.
const EXIT_CONFIG: u8 = 64;

/// Request/reply RPC worker over RabbitMQ.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML); every key can also be set as AMQP_RPC__SECTION__KEY.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Validate the configuration and exit: 0 when valid, 64 with every problem listed.
    #[arg(long)]
    check_config: bool,
}

/// The daemon's config and the demo method's, every problem of both reported at once.
fn load(path: Option<&std::path::Path>) -> Result<(Config, fib::FibConfig), ConfigError> {
    let (config, fib): (_, fib::FibConfig) = config::load_with_section(path, None, fib::SECTION)?;
    fib.validate().map_err(|problem| ConfigError {
        problems: vec![problem],
    })?;
    Ok((config, fib))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (config, fib) = match load(args.config.as_deref()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("amqp-rpcd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // `[telemetry]` with the OTEL_* variables over it: checked by --check-config too.
    let export = match config
        .telemetry
        .resolve("amqp-rpcd", config::telemetry::process_env)
    {
        Ok(export) => export,
        Err(problems) => {
            eprintln!("amqp-rpcd: {}", ConfigError { problems });
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check_config {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    let secrets = config.amqp.secrets();
    let export = match telemetry::init(&config.log, secrets, export.as_ref()) {
        Ok(export) => export,
        Err(e) => {
            eprintln!("amqp-rpcd: logging: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // One async thread: the plumbing (socket I/O, deliveries, replies, acks, /metrics) is I/O
    // that one thread keeps up with past what one queue delivers; lapin's socket loop runs
    // here too (`amqp.io_thread = false`). CPU-heavy handlers run on the blocking pool, bounded by
    // `service.concurrency`. A multi-threaded scheduler only added cross-worker wake-ups:
    // measured against it in one run at 64 in flight, 13% less daemon CPU per request and
    // 3-6% more calls/s (BENCHMARKS.md).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("amqp-rpcd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let registry = prometheus::Registry::new();
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let shutdown = shutdown::install().map_err(amqp_rpc::Error::Signals)?;
        let daemon = Daemon::start(config, registry)
            .await?
            .with_methods(fib.methods())?;
        systemd::follow(&daemon, shutdown.clone());
        daemon.run(shutdown).await
    });
    // Blocking handler threads may still be computing; do not wait for them.
    runtime.shutdown_background();
    // After the runtime, outside it: the SDK's shutdown blocks until the last spans are sent.
    if let Some(export) = export {
        export.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("amqp-rpcd: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
