//! Calling a service of your own with amqp-rpc's client: the inventory of
//! `examples/service.rs`.
//!
//! Against the local broker (guest/guest on 127.0.0.1:5672), with the service running:
//!
//! ```sh
//! cargo run --example service                   # terminal 1
//! cargo run --example client                    # terminal 2
//! ```
//!
//! It makes each kind of call once and prints what came back: typed JSON calls with a deadline
//! (`call_json_with` and `CallOptions`), the service's application errors (`not_found`,
//! `already_exists`, `failed_precondition`) as `CallError::Remote { code, .. }`, the
//! I/O-bound `supplier_eta` one at a time and 128 at once, a deadline shorter than the work
//! (`Timeout`), and a queue nobody serves (`NoServer`). It exits 1 if a call ends in an
//! outcome the service does not give (the service not running: `NoServer` on the first call).
//! Run it again as often as you like: each run uses new order ids.
//!
//! The same environment variables as the service say where: `AMQP_RPC__AMQP__URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`) and `AMQP_RPC__SERVICE__QUEUE` (default
//! `inventory`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use amqp_rpc::{CallError, CallOptions, Client, ErrorCode};
use serde::{Deserialize, Serialize};

/// `stock`'s request.
#[derive(Serialize)]
struct StockQuery<'a> {
    sku: &'a str,
}

/// `stock`'s reply.
#[derive(Debug, Deserialize)]
struct Stock {
    sku: String,
    name: String,
    available: u32,
    reserved: u32,
}

/// `reserve`'s request.
#[derive(Serialize)]
struct Reserve<'a> {
    order: &'a str,
    sku: &'a str,
    qty: u32,
}

/// `reserve`'s reply.
#[derive(Debug, Deserialize)]
struct Reservation {
    order: String,
    qty: u32,
    sku: String,
    left: u32,
}

/// Reads may be sent again after a lost connection: the service answers a copy once.
const READ: CallOptions = CallOptions {
    timeout: Duration::from_secs(2),
    idempotent: true,
};

/// A reservation is sent once: a retry after `ConnectionLost` would need the caller to know
/// whether the first one ran (here `already_exists` would tell).
const WRITE: CallOptions = CallOptions {
    timeout: Duration::from_secs(2),
    idempotent: false,
};

/// Print an outcome the service does not give, and remember it.
fn unexpected(failed: &mut bool, what: &str, e: &CallError) {
    eprintln!("{what}: unexpected: {e} ({})", e.kind());
    *failed = true;
}

#[tokio::main]
async fn main() -> ExitCode {
    let url = std::env::var("AMQP_RPC__AMQP__URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let queue = std::env::var("AMQP_RPC__SERVICE__QUEUE").unwrap_or_else(|_| "inventory".into());
    let client = match Client::builder(url.as_str())
        .queue(queue.as_str())
        .timeout(Duration::from_secs(5))
        .connect()
        .await
    {
        Ok(client) => client,
        Err(e) => {
            eprintln!("cannot reach the broker: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;

    // A typed read, with a deadline.
    let stock: Result<Stock, _> = client
        .call_json_with("stock", &StockQuery { sku: "sku-1" }, READ)
        .await;
    match stock {
        Ok(s) => println!(
            "stock {}: {} available, {} reserved ({})",
            s.sku, s.available, s.reserved, s.name
        ),
        Err(e) if e.is_no_server() => {
            eprintln!("nobody serves {queue:?}: start the service first ({e})");
            return ExitCode::FAILURE;
        }
        Err(e) => unexpected(&mut failed, "stock sku-1", &e),
    }

    // Application errors come back as `Remote { code, message }`.
    let missing: Result<Stock, _> = client
        .call_json_with("stock", &StockQuery { sku: "sku-404" }, READ)
        .await;
    match missing {
        Err(CallError::Remote {
            code: ErrorCode::NotFound,
            message,
        }) => println!("stock sku-404: not found ({message})"),
        Ok(s) => println!("stock sku-404: exists after all: {s:?}"),
        Err(e) => unexpected(&mut failed, "stock sku-404", &e),
    }

    // A reservation, then the same order again, then more than there is.
    let order = format!("order-{}", std::process::id());
    for (order, sku, qty) in [
        (order.as_str(), "sku-1", 2),
        (order.as_str(), "sku-1", 2),
        ("big-order", "sku-2", 1_000),
    ] {
        let what = format!("reserve {qty} x {sku} for {order}");
        let reserved: Result<Reservation, _> = client
            .call_json_with("reserve", &Reserve { order, sku, qty }, WRITE)
            .await;
        match reserved {
            Ok(r) => println!(
                "{what}: reserved {} x {} for {}, {} left",
                r.qty, r.sku, r.order, r.left
            ),
            Err(CallError::Remote { code, message }) => match code {
                ErrorCode::AlreadyExists => println!("{what}: already reserved ({message})"),
                ErrorCode::FailedPrecondition => println!("{what}: refused ({message})"),
                ErrorCode::NotFound => println!("{what}: no such product ({message})"),
                other => unexpected(
                    &mut failed,
                    &what,
                    &CallError::Remote {
                        code: other,
                        message,
                    },
                ),
            },
            Err(e) => unexpected(&mut failed, &what, &e),
        }
    }

    // The I/O-bound method: raw bytes in and out.
    let started = Instant::now();
    match client.call("supplier_eta", b"sku-3").await {
        Ok(body) => println!(
            "supplier_eta sku-3: {} (in {:?})",
            String::from_utf8_lossy(&body),
            started.elapsed()
        ),
        Err(e) => unexpected(&mut failed, "supplier_eta sku-3", &e),
    }

    // Many at once over the one connection: the service runs at most its limit of them (64)
    // at a time, each awaiting the supplier without blocking the others, so 128 take about
    // two supplier calls' time.
    let started = Instant::now();
    let calls = (0..128).map(|_| client.call("supplier_eta", b"sku-2"));
    let results = futures_util::future::join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    println!(
        "supplier_eta sku-2 x 128 at once: {ok} answered in {:?}",
        started.elapsed()
    );
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        unexpected(&mut failed, "supplier_eta x 128", e);
    }

    // A deadline shorter than the work: the call ends in `Timeout` at its deadline (or the
    // service's `deadline_exceeded`, which `is_timeout` covers too), never later.
    let started = Instant::now();
    match client
        .call_timeout("supplier_eta", b"sku-1", Duration::from_millis(10))
        .await
    {
        Err(e) if e.is_timeout() => println!(
            "supplier_eta with a 10 ms deadline: timed out after {:?} ({e})",
            started.elapsed()
        ),
        Ok(body) => println!(
            "supplier_eta with a 10 ms deadline: answered anyway: {}",
            String::from_utf8_lossy(&body)
        ),
        Err(e) => unexpected(&mut failed, "supplier_eta, 10 ms", &e),
    }

    // A queue nobody serves: `NoServer` in milliseconds, not at the deadline.
    let started = Instant::now();
    let nobody = client.service("inventory-nobody-serves-this");
    match nobody.call("stock", br#"{"sku":"sku-1"}"#).await {
        Err(e @ CallError::NoServer { .. }) => println!(
            "queue {:?}: no server, known after {:?} ({e})",
            nobody.queue(),
            started.elapsed()
        ),
        Ok(_) => println!("queue {:?}: someone serves it after all", nobody.queue()),
        Err(e) => unexpected(&mut failed, "the unserved queue", &e),
    }

    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
