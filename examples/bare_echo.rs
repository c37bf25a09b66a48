//! The reference point for benchmarks: the simplest correct request/reply over lapin, with
//! nothing else. The server consumes a queue and, for each request, publishes the body back to
//! `reply_to` with the `correlation_id` and acks. The client keeps N calls in flight over direct
//! reply-to on one channel. No deadlines, no confirms, no validation, no metrics, no retry.
//!
//! ```sh
//! cargo run --release --example bare_echo -- server --queue echo_q
//! cargo run --release --example bare_echo -- bench --queue echo_q --concurrency 64 --duration 10s --json
//! ```
//! The bench prints the same report (and `--json` line) as `amqp-rpc bench`, from the same loop.
//!
//! Opt-in safety features, one at a time, so that `bench/features.py` can price each of them
//! (without flags both sides are exactly the plain bare echo):
//!
//! - `bench --confirms`: the channel is in confirm mode, and each call awaits its publish
//!   confirm before it awaits the reply, as a simple client would. A nack is error kind
//!   `unavailable`. (amqp-rpc's own client does not await the confirm when the reply comes
//!   first; it looks at it only when the reply is late.)
//! - `bench --mandatory`: mandatory publish. With `--confirms`, a returned request is error kind
//!   `no_server`; without it a returned request simply times out.
//! - `bench --deadline`: the per-request metadata amqp-rpc's client sends: an `x-deadline-ms`
//!   long-long header (now + timeout, epoch ms), `expiration` (the timeout in ms), a
//!   `message_id` (per-client random prefix + counter, like amqp-rpc's), `type` (`--method`)
//!   and `content_type` `text/plain`.
//! - `server --confirms`: replies go out on a second channel in confirm mode, and each request
//!   is acked only after its reply's confirm, as amqp-rpcd does with `confirm_replies = true`
//!   (a nacked reply requeues the request). The wait for the confirm runs in a task per
//!   request, like amqp-rpcd's, so the server keeps publishing while confirms are pending; so
//!   `--confirms` implies `--pipelined`.
//! - `server --pipelined`: no confirms, but the ack is sent from a task per request, so the
//!   loop goes on to the next delivery without waiting for it (the plain server waits). This
//!   is not a safety feature: it separates the cost of confirms from the gain of not waiting.

// The load generator of `amqp-rpc bench`, from its source: both clients are measured alike.
#[allow(dead_code)] // bare_echo drives its own calls through `bench::run_calls`
#[path = "../src/bin/amqp-rpc/bench.rs"]
mod bench;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_rpc::protocol::{expiration_ms, now_epoch_ms, DEADLINE_HEADER};
use amqp_rpc::CallOptions;
use bench::{Amount, BenchSpec};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use tokio::sync::oneshot;

/// Per-call timeout of the bench client (also the deadline budget with `--deadline`).
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Broker URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true
    )]
    url: String,
    /// Queue.
    #[arg(long, default_value = "bare_echo", global = true)]
    queue: String,
    /// Run lapin's socket loop as a task of the runtime (the option amqp-rpc's vendored lapin
    /// adds and amqp-rpc uses) instead of on lapin's own thread. Off: plain lapin, the
    /// reference. For measuring what the option is worth on its own. Refused (exit 2) when the
    /// build has crates.io's lapin, which lacks the option: a benchmark must not quietly measure
    /// the other mode.
    #[arg(long, global = true)]
    io_task: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Echo every request back.
    Server {
        /// basic.qos prefetch.
        #[arg(long, default_value_t = 64)]
        prefetch: u16,
        /// Publish replies on a confirm-mode channel; ack each request after its reply's
        /// confirm.
        #[arg(long)]
        confirms: bool,
        /// Ack from a task per request instead of in line (implied by --confirms).
        #[arg(long)]
        pipelined: bool,
    },
    /// Closed-loop load, measured like `amqp-rpc bench`.
    Bench {
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long)]
        requests: Option<u64>,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        #[arg(long, default_value = "10")]
        arg: String,
        #[arg(long)]
        json: bool,
        /// Confirm mode; each call awaits its publish confirm, then the reply.
        #[arg(long)]
        confirms: bool,
        /// Mandatory publish (a returned request is `no_server` with --confirms).
        #[arg(long)]
        mandatory: bool,
        /// Send amqp-rpc's per-request metadata: deadline header, expiration, message_id, type,
        /// content_type.
        #[arg(long)]
        deadline: bool,
        /// Send only these fields of that metadata (comma-separated: header, expiration,
        /// message_id, type, content_type), to price them one by one.
        #[arg(long, value_delimiter = ',')]
        meta: Vec<String>,
        /// The `type` sent with --deadline (the bare server ignores it; amqp-rpcd runs it).
        #[arg(long, default_value = "fib")]
        method: String,
    },
}

#[tokio::main]
async fn main() -> Result<(), lapin::Error> {
    let cli = Cli::parse();
    let props = socket_loop(ConnectionProperties::default(), cli.io_task);
    let conn = Connection::connect(&cli.url, props).await?;
    match cli.command {
        Command::Server {
            prefetch,
            confirms,
            pipelined,
        } => server(conn, &cli.queue, prefetch, confirms, pipelined).await,
        Command::Bench {
            concurrency,
            requests,
            duration,
            warmup,
            arg,
            json,
            confirms,
            mandatory,
            deadline,
            meta,
            method,
        } => {
            let all = ["header", "expiration", "message_id", "type", "content_type"];
            let meta: Vec<String> = if deadline && meta.is_empty() {
                all.iter().map(|f| f.to_string()).collect()
            } else {
                meta
            };
            if let Some(bad) = meta.iter().find(|f| !all.contains(&f.as_str())) {
                eprintln!("unknown --meta field {bad:?}; one of {all:?}");
                std::process::exit(2);
            }
            let features = Features {
                confirms,
                mandatory,
                deadline: (!meta.is_empty()).then(|| method.as_str().into()),
                meta,
                id_prefix: uuid::Uuid::new_v4().simple().to_string(),
                next_id: AtomicU64::new(0),
            };
            let call = client(conn, features).await?;
            let queue: Arc<str> = cli.queue.as_str().into();
            let body: Arc<[u8]> = arg.as_bytes().into();
            let spec = BenchSpec {
                concurrency,
                amount: requests.map_or(Amount::Duration(duration), Amount::Requests),
                warmup,
                method,
                arg,
                options: CallOptions {
                    timeout: TIMEOUT,
                    idempotent: false,
                },
                progress: true,
            };
            let report = bench::run_calls(
                move || call.clone().call(queue.clone(), body.clone()),
                &spec,
            )
            .await;
            print!("{}", report.summary());
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&report).expect("report encodes")
                );
            }
            Ok(())
        }
    }
}

/// `props` with lapin's socket loop on the runtime when `io_task`, as the vendored lapin allows.
#[cfg(lapin_io_loop_on_runtime)]
fn socket_loop(props: ConnectionProperties, io_task: bool) -> ConnectionProperties {
    props.with_io_loop_on_runtime(io_task)
}

/// `props` unchanged (lapin's own thread); `--io-task` cannot be honoured, so exit.
#[cfg(not(lapin_io_loop_on_runtime))]
fn socket_loop(props: ConnectionProperties, io_task: bool) -> ConnectionProperties {
    if io_task {
        eprintln!(
            "bare_echo: --io-task needs amqp-rpc's vendored lapin (vendor/lapin), and this \
             build has crates.io's: build it in the amqp-rpc workspace (docs/LIBRARY.md)"
        );
        std::process::exit(2);
    }
    props
}

async fn server(
    conn: Connection,
    queue: &str,
    prefetch: u16,
    confirms: bool,
    pipelined: bool,
) -> Result<(), lapin::Error> {
    let channel = conn.create_channel().await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let reply_channel = if confirms {
        let reply = conn.create_channel().await?;
        reply
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Some(reply)
    } else {
        None
    };
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    eprintln!(
        "bare echo serving {queue}{}",
        match (confirms, pipelined) {
            (true, _) => " (confirmed replies, acks from a task per request)",
            (false, true) => " (acks from a task per request)",
            (false, false) => "",
        }
    );
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        if let (Some(reply_to), Some(id)) = (
            delivery.properties.reply_to(),
            delivery.properties.correlation_id(),
        ) {
            let props = BasicProperties::default().with_correlation_id(id.clone());
            let publisher = reply_channel.as_ref().unwrap_or(&channel);
            let confirm = publisher
                .basic_publish(
                    "".into(),
                    reply_to.clone(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    props,
                )
                .await?;
            if reply_channel.is_some() {
                // Ack after the broker has the reply; meanwhile serve the next delivery.
                tokio::spawn(async move {
                    match confirm.await {
                        Ok(Confirmation::Nack(_)) => {
                            let requeue = BasicRejectOptions { requeue: true };
                            let _ = delivery.acker.reject(requeue).await;
                        }
                        Ok(_) => {
                            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                        }
                        Err(e) => eprintln!("reply not confirmed: {e}"),
                    }
                });
                continue;
            }
        }
        if pipelined {
            tokio::spawn(async move {
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            });
            continue;
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// The client's opt-in features.
struct Features {
    confirms: bool,
    mandatory: bool,
    /// `Some(method)`: send the deadline metadata, with this `type`.
    deadline: Option<lapin::types::ShortString>,
    /// Which fields of the metadata to send.
    meta: Vec<String>,
    /// `message_id`s with --deadline: a random prefix and a counter, like amqp-rpc's.
    id_prefix: String,
    next_id: AtomicU64,
}

/// A direct reply-to client: one channel, a pending map, a router task.
#[derive(Clone)]
struct Caller {
    channel: lapin::Channel,
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>,
    features: Arc<Features>,
}

async fn client(conn: Connection, features: Features) -> Result<Caller, lapin::Error> {
    let channel = conn.create_channel().await?;
    if features.confirms {
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
    let pending: Arc<Mutex<HashMap<String, oneshot::Sender<()>>>> = Arc::default();
    let router = pending.clone();
    tokio::spawn(async move {
        let _conn = conn; // keep the connection open while the router runs
        while let Some(Ok(d)) = replies.next().await {
            if let Some(id) = d.properties.correlation_id() {
                if let Some(tx) = router.lock().unwrap().remove(id.as_str()) {
                    let _ = tx.send(());
                }
            }
        }
    });
    Ok(Caller {
        channel,
        pending,
        features: Arc::new(features),
    })
}

impl Caller {
    async fn call(self, queue: Arc<str>, body: Arc<[u8]>) -> Result<(), &'static str> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id.clone(), tx);
        let mut props = BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id(id.as_str().into());
        if let Some(method) = &self.features.deadline {
            let timeout_ms = TIMEOUT.as_millis() as u64;
            let has = |f: &str| self.features.meta.iter().any(|m| m == f);
            if has("header") {
                let mut headers = FieldTable::default();
                // As amqp-rpc's client sends it: decimal digits in a long string.
                headers.insert(
                    DEADLINE_HEADER.into(),
                    AMQPValue::LongString((now_epoch_ms() + timeout_ms).to_string().into()),
                );
                props = props.with_headers(headers);
            }
            if has("message_id") {
                let n = self.features.next_id.fetch_add(1, Ordering::Relaxed);
                let message_id = format!("{}-{n:x}", self.features.id_prefix);
                props = props.with_message_id(message_id.into());
            }
            if has("type") {
                props = props.with_type(method.clone());
            }
            if has("content_type") {
                props = props.with_content_type("text/plain".into());
            }
            if has("expiration") {
                props = props.with_expiration(expiration_ms(TIMEOUT).into());
            }
        }
        let options = BasicPublishOptions {
            mandatory: self.features.mandatory,
            ..BasicPublishOptions::default()
        };
        let published = self
            .channel
            .basic_publish("".into(), (*queue).into(), options, &body, props)
            .await;
        let confirm = match published {
            Ok(confirm) => confirm,
            Err(_) => return self.fail(&id, "connection_lost"),
        };
        if self.features.confirms {
            match tokio::time::timeout(TIMEOUT, confirm).await {
                Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => {}
                Ok(Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)))) => {
                    return self.fail(&id, "no_server");
                }
                Ok(Ok(Confirmation::Nack(None))) => return self.fail(&id, "unavailable"),
                Ok(Err(_)) => return self.fail(&id, "connection_lost"),
                Err(_) => return self.fail(&id, "timeout"),
            }
        }
        match tokio::time::timeout(TIMEOUT, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("connection_lost"),
            Err(_) => self.fail(&id, "timeout"),
        }
    }

    /// End a call in error `kind`, forgetting its pending entry.
    fn fail(&self, id: &str, kind: &'static str) -> Result<(), &'static str> {
        self.pending.lock().unwrap().remove(id);
        Err(kind)
    }
}
