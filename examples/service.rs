//! A small service of your own, served by amqp-rpc: an inventory.
//!
//! Run it against the local broker (guest/guest on 127.0.0.1:5672) in one terminal, and the
//! matching client (`examples/client.rs`) in another:
//!
//! ```sh
//! cargo run --example service                   # terminal 1: serves the queue `inventory`
//! cargo run --example client                    # terminal 2: calls it, prints every outcome
//! ```
//!
//! Ctrl-C (or SIGTERM) stops the service gracefully: it stops taking requests, finishes the
//! ones running, and exits 0. A second signal exits at once (130).
//!
//! The configuration is amqp-rpc's own (`[amqp]`, `[service]`, ... as in `config.toml`) plus
//! the service's section `[inventory]`, loaded together by
//! `amqp_rpc::config::load_with_section` from an optional TOML file (the first argument) and
//! the environment: every key can be set as `AMQP_RPC__SECTION__KEY`, for example
//!
//! ```sh
//! AMQP_RPC__AMQP__URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//! AMQP_RPC__SERVICE__QUEUE=inventory-eu AMQP_RPC__HTTP__LISTEN=127.0.0.1:9191 \
//! AMQP_RPC__INVENTORY__SUPPLIER_DELAY_MS=50 cargo run --example service
//! cargo run --example service -- inventory.toml        # the same keys from a file
//! ```
//!
//! The queue is `inventory` unless the configuration names another (the library's default is
//! `rpc_queue`). `/metrics`, `/healthz` and `/readyz` are served on `http.listen` (default
//! `127.0.0.1:9090`; empty turns them off). `[inventory]` has `supplier_delay_ms` (default
//! 20), how long the simulated supplier API takes, and `supplier_limit` (default 64), how many
//! supplier calls may run at once. A configuration with a problem (an unknown key, a bad
//! value) exits 64 listing every problem. Logs go to stderr at `RUST_LOG` (default `info`).
//!
//! Methods (the request's AMQP `type`):
//!
//! | method | body in | reply | application errors |
//! |---|---|---|---|
//! | `stock` | JSON `{"sku": "sku-1"}` | JSON `{"sku", "name", "available", "reserved"}` | `not_found` |
//! | `reserve` | JSON `{"order": "o-1", "sku": "sku-1", "qty": 2}` | JSON `{"order", "sku", "qty", "left"}` | `not_found`, `already_exists` (the order has a reservation), `failed_precondition` (not enough stock), `invalid_argument` (qty 0) |
//! | `supplier_eta` | the SKU as plain text | plain text: when the supplier can restock | `not_found`; `cancelled` when the wait is given up |
//!
//! `stock` and `reserve` share the in-memory stock (`Arc<Mutex<..>>`; the lock is never held
//! across an `.await`). `supplier_eta` is I/O-bound: it awaits a (simulated) HTTP call to the
//! supplier, without blocking anything, at most `INVENTORY_SUPPLIER_LIMIT` at once
//! (`.limit(n)`), and stops waiting when the caller's deadline passes.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_rpc::protocol::{ErrorCode, RequestError};
use amqp_rpc::service::{handler, json, Methods, Request};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// The queue served when the configuration does not name one.
const DEFAULT_QUEUE: &str = "inventory";

/// The service's own section, `[inventory]` (`AMQP_RPC__INVENTORY__*`).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    /// How long the supplier's API takes to answer, in ms.
    supplier_delay_ms: u64,
    /// Supplier calls running at once, at most.
    supplier_limit: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            supplier_delay_ms: 20,
            supplier_limit: 64,
        }
    }
}

/// `stock`'s request.
#[derive(Debug, Deserialize)]
struct StockQuery {
    sku: String,
}

/// `stock`'s reply.
#[derive(Debug, Serialize)]
struct Stock {
    sku: String,
    name: String,
    available: u32,
    reserved: u32,
}

/// `reserve`'s request: `qty` units of `sku` for `order`, at most one reservation per order.
#[derive(Debug, Deserialize)]
struct Reserve {
    order: String,
    sku: String,
    qty: u32,
}

/// `reserve`'s reply.
#[derive(Debug, Serialize)]
struct Reservation {
    order: String,
    sku: String,
    qty: u32,
    /// Units still available after this reservation.
    left: u32,
}

/// One product line.
#[derive(Debug)]
struct Item {
    name: String,
    available: u32,
    reserved: u32,
}

/// The service's state, shared by its methods.
#[derive(Debug, Default)]
struct Inventory {
    items: HashMap<String, Item>,
    /// Order id -> (sku, qty): an order reserves once.
    orders: HashMap<String, (String, u32)>,
}

type Shared = Arc<Mutex<Inventory>>;

impl Inventory {
    /// A few products to play with.
    fn seeded() -> Self {
        let mut inventory = Inventory::default();
        for (sku, name, available) in [
            ("sku-1", "widget", 1_000),
            ("sku-2", "gadget", 25),
            ("sku-3", "gizmo", 0),
        ] {
            inventory.items.insert(
                sku.to_owned(),
                Item {
                    name: name.to_owned(),
                    available,
                    reserved: 0,
                },
            );
        }
        inventory
    }

    fn stock(&self, sku: &str) -> Result<Stock, RequestError> {
        let item = self.items.get(sku).ok_or_else(|| not_found(sku))?;
        Ok(Stock {
            sku: sku.to_owned(),
            name: item.name.clone(),
            available: item.available,
            reserved: item.reserved,
        })
    }

    fn reserve(&mut self, r: Reserve) -> Result<Reservation, RequestError> {
        if r.qty == 0 {
            return Err(RequestError::new(
                ErrorCode::InvalidArgument,
                "qty must be at least 1",
            ));
        }
        if let Some((sku, qty)) = self.orders.get(&r.order) {
            return Err(RequestError::new(
                ErrorCode::AlreadyExists,
                format!("order {} already reserved {qty} x {sku}", r.order),
            ));
        }
        let item = self
            .items
            .get_mut(&r.sku)
            .ok_or_else(|| not_found(&r.sku))?;
        if item.available < r.qty {
            return Err(RequestError::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "not enough {}: {} wanted, {} available",
                    r.sku, r.qty, item.available
                ),
            ));
        }
        item.available -= r.qty;
        item.reserved += r.qty;
        let left = item.available;
        self.orders.insert(r.order.clone(), (r.sku.clone(), r.qty));
        Ok(Reservation {
            order: r.order,
            sku: r.sku,
            qty: r.qty,
            left,
        })
    }
}

fn not_found(sku: &str) -> RequestError {
    RequestError::new(ErrorCode::NotFound, format!("no product {sku:?}"))
}

/// `supplier_eta`: ask the supplier's API (simulated by a sleep of `delay`) when it can
/// restock a product. Gives up when the request is cancelled (its deadline is about to pass,
/// or a drain gave up on it): nobody would read the answer.
async fn supplier_eta(
    req: Request,
    inventory: Shared,
    delay: Duration,
) -> Result<Vec<u8>, RequestError> {
    let sku = std::str::from_utf8(req.body())
        .map_err(|_| RequestError::new(ErrorCode::InvalidArgument, "the SKU is not UTF-8"))?
        .trim()
        .to_owned();
    // A cheap check first, under the lock; the slow call after, without it.
    let name = match inventory.lock().expect("inventory lock").items.get(&sku) {
        Some(item) => item.name.clone(),
        None => return Err(not_found(&sku)),
    };
    // No point starting a call that cannot finish before the caller stops waiting.
    if req.time_left().is_some_and(|left| left < delay) {
        return Err(RequestError::new(
            ErrorCode::DeadlineExceeded,
            format!("the supplier takes {delay:?}, more than the time left"),
        ));
    }
    tokio::select! {
        _ = req.cancelled() => Err(RequestError::new(
            ErrorCode::Cancelled,
            "gave up waiting for the supplier",
        )),
        _ = tokio::time::sleep(delay) => {
            // What the supplier's API would have answered.
            let days = 1 + sku.bytes().map(u32::from).sum::<u32>() % 7;
            Ok(format!("{sku} ({name}): restock in {days} days").into_bytes())
        }
    }
}

/// The service's methods over one shared inventory.
fn methods(inventory: Shared, delay: Duration, supplier_limit: usize) -> Methods {
    let for_stock = inventory.clone();
    let for_reserve = inventory.clone();
    Methods::default()
        .with(json("stock", move |_req: Request, q: StockQuery| {
            let result = for_stock.lock().expect("inventory lock").stock(&q.sku);
            async move { result }
        }))
        .with(json("reserve", move |_req: Request, r: Reserve| {
            let result = for_reserve.lock().expect("inventory lock").reserve(r);
            async move { result }
        }))
        .with(
            handler("supplier_eta", move |req: Request| {
                supplier_eta(req, inventory.clone(), delay)
            })
            .limit(supplier_limit),
        )
}

/// A token cancelled by the first Ctrl-C or SIGTERM; a second one exits at once.
fn shutdown_on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        trigger.cancel();
        eprintln!("inventory: stopping (finishing the requests in flight; again to exit now)");
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        std::process::exit(130);
    });
    Ok(token)
}

#[tokio::main]
async fn main() -> ExitCode {
    let path = std::env::args_os().nth(1).map(std::path::PathBuf::from);
    let loaded = amqp_rpc::config::load_with_section(path.as_deref(), None, "inventory");
    let (mut config, settings): (_, Settings) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("inventory: {e}");
            return ExitCode::from(64);
        }
    };
    if config.service.queue == amqp_rpc::Config::default().service.queue {
        config.service.queue = DEFAULT_QUEUE.into();
    }
    let Settings {
        supplier_delay_ms: delay_ms,
        supplier_limit,
    } = settings;
    // The library logs through `tracing` (connections, the queue, drains); show it on
    // stderr, at `RUST_LOG` (default `info`). It never logs the broker password.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let shutdown = match shutdown_on_signals() {
        Ok(token) => token,
        Err(e) => {
            eprintln!("inventory: signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let inventory: Shared = Arc::new(Mutex::new(Inventory::seeded()));
    let methods = methods(inventory, Duration::from_millis(delay_ms), supplier_limit);
    eprintln!(
        "inventory: serving {:?} on queue {:?} (supplier: {delay_ms} ms, {supplier_limit} at once)",
        methods.names(),
        config.service.queue
    );
    let served = async {
        amqp_rpc::Daemon::start(config, prometheus::Registry::new())
            .await?
            .with_methods(methods)?
            .run(shutdown)
            .await
    };
    match served.await {
        Ok(()) => {
            eprintln!("inventory: stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("inventory: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_follow_the_stock() {
        let mut inv = Inventory::seeded();
        let reserve = |order: &str, sku: &str, qty| Reserve {
            order: order.into(),
            sku: sku.into(),
            qty,
        };
        assert_eq!(inv.reserve(reserve("o1", "sku-2", 5)).unwrap().left, 20);
        let code = |r: Result<Reservation, RequestError>| r.unwrap_err().code;
        assert_eq!(
            code(inv.reserve(reserve("o1", "sku-2", 1))),
            ErrorCode::AlreadyExists
        );
        assert_eq!(
            code(inv.reserve(reserve("o2", "sku-2", 21))),
            ErrorCode::FailedPrecondition
        );
        assert_eq!(
            code(inv.reserve(reserve("o3", "nope", 1))),
            ErrorCode::NotFound
        );
        assert_eq!(inv.stock("sku-2").unwrap().reserved, 5);
    }
}
