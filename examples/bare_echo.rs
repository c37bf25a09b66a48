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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_rpc::bench::{self, Amount, BenchSpec};
use amqp_rpc::CallOptions;
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::oneshot;

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
}

#[derive(Subcommand)]
enum Command {
    /// Echo every request back.
    Server {
        /// basic.qos prefetch.
        #[arg(long, default_value_t = 64)]
        prefetch: u16,
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
    },
}

#[tokio::main]
async fn main() -> Result<(), lapin::Error> {
    let cli = Cli::parse();
    let conn = Connection::connect(&cli.url, ConnectionProperties::default()).await?;
    match cli.command {
        Command::Server { prefetch } => server(conn, &cli.queue, prefetch).await,
        Command::Bench {
            concurrency,
            requests,
            duration,
            warmup,
            arg,
            json,
        } => {
            let call = client(conn).await?;
            let queue: Arc<str> = cli.queue.as_str().into();
            let body: Arc<[u8]> = arg.as_bytes().into();
            let spec = BenchSpec {
                concurrency,
                amount: requests.map_or(Amount::Duration(duration), Amount::Requests),
                warmup,
                method: "echo".into(),
                arg,
                options: CallOptions {
                    timeout: Duration::from_secs(5),
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

async fn server(conn: Connection, queue: &str, prefetch: u16) -> Result<(), lapin::Error> {
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
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    eprintln!("bare echo serving {queue}");
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        if let (Some(reply_to), Some(id)) = (
            delivery.properties.reply_to(),
            delivery.properties.correlation_id(),
        ) {
            let props = BasicProperties::default().with_correlation_id(id.clone());
            channel
                .basic_publish(
                    "".into(),
                    reply_to.clone(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    props,
                )
                .await?;
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// A direct reply-to client: one channel, a pending map, a router task.
#[derive(Clone)]
struct Caller {
    channel: lapin::Channel,
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>,
}

async fn client(conn: Connection) -> Result<Caller, lapin::Error> {
    let channel = conn.create_channel().await?;
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
    Ok(Caller { channel, pending })
}

impl Caller {
    async fn call(self, queue: Arc<str>, body: Arc<[u8]>) -> Result<(), &'static str> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id.clone(), tx);
        let props = BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id(id.as_str().into());
        self.channel
            .basic_publish(
                "".into(),
                (*queue).into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .map_err(|_| "connection_lost")?;
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("connection_lost"),
            Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                Err("timeout")
            }
        }
    }
}
