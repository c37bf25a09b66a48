//! What every delivery of a connection shares: the methods and limits its decision needs, the
//! channels and helpers its reply and ack go through, and the tokens of the session's end.
//!
//! A module of its own so that deciding (`decide.rs`), running (`run.rs`), sending
//! (`reply.rs`) and the delivery's driver (`request.rs`) all depend on it and never on each
//! other's internals.

use std::collections::HashMap;
use std::sync::Arc;

use lapin::Channel;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::protocol::RequestMeta;
use crate::reply_to::{KnownNodes, ReplyToPolicy};
use crate::server::idempotency::Idempotency;
use crate::server::ledger::Ledger;
use crate::server::metrics::Metrics;
use crate::server::reply_link::ReplyLink;
use crate::server::settle::Settler;
use crate::service::Methods;

/// Everything a delivery needs, shared by all deliveries of a connection.
#[derive(Debug)]
pub struct RequestCtx {
    /// Registered methods.
    pub methods: Methods,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// Bounds CPU-heavy work to `service.concurrency`; shared across reconnects.
    pub cpu: Arc<Semaphore>,
    /// Channel replies are published on: a confirm-mode channel of its own with
    /// `confirm_replies`, else the consume channel (each ack, sent once its reply is written,
    /// then reaches the broker behind it).
    pub reply_channel: Channel,
    /// Where replies that may crash a connection go instead (see `reply_link.rs`).
    pub wary_replies: ReplyLink,
    /// Until when every reply counts as wary: set for a while after a lost connection, when
    /// the queue may still hold requests from clients of a failed broker node.
    pub wary_until: Option<tokio::time::Instant>,
    /// Whether `reply_channel` is in confirm mode and confirms are awaited before the ack.
    pub confirm_replies: bool,
    /// Metric handles.
    pub metrics: Metrics,
    /// Fires when the daemon starts draining: work not yet started is given back.
    pub draining: CancellationToken,
    /// Fires when a drain gives up on the requests still running: each handler's
    /// [`Request::cancelled`](crate::service::Request::cancelled) is a child of it.
    pub abandon: CancellationToken,
    /// Reply cache and attempt counts; shared across reconnects.
    pub idempotency: Arc<Idempotency>,
    /// Attempts before a request is poison.
    pub max_deliveries: u32,
    /// Where replies may go (`service.reply_to`).
    pub reply_to: ReplyToPolicy,
    /// The broker nodes this session's direct replies reached without harm.
    pub known_nodes: KnownNodes,
    /// Methods that answer only some callers (`service.callers`).
    pub callers: HashMap<String, Vec<String>>,
    /// Where poison requests are copied; empty = nowhere.
    pub dead_letter_queue: String,
    /// Acks requests once their replies are in (see `settle.rs`).
    pub(super) settler: Settler,
    /// Every ack and reject of the consume channel goes through it (see `ledger.rs`).
    pub(super) ledger: Arc<Ledger>,
    /// Cancelled when a request finds the connection's channels broken: the session ends
    /// and the daemon reconnects.
    pub session_lost: CancellationToken,
}

impl RequestCtx {
    /// A delivery's contract fields, with a missing method read as the default method's
    /// name: the span, the handler's `Request`, the reply-cache key and the metrics then all
    /// see one name, whether the caller sent `type = fib` or (as the tutorial's clients do)
    /// no `type` at all.
    pub fn meta(&self, props: &lapin::BasicProperties) -> RequestMeta {
        let mut meta = RequestMeta::from_properties(props);
        if meta.method.is_empty() {
            if let Some(default) = self.methods.default_name() {
                meta.method = default.to_owned();
            }
        }
        meta
    }
}
