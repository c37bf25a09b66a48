//! A real OTLP/HTTP trace receiver for tests: `POST /v1/traces` with a protobuf
//! `ExportTraceServiceRequest` (what `opentelemetry-otlp`'s HTTP exporter sends by default),
//! decoded with the published OpenTelemetry protobuf definitions (`opentelemetry-proto`).
//! Every span it gets is kept with its resource's `service.name`; [`Receiver::wait_for`]
//! wakes on each batch received (never a sleep loop).
//!
//! Point a child at it with `OTEL_EXPORTER_OTLP_ENDPOINT=<Receiver::endpoint()>` (the exporter
//! appends `/v1/traces` to that variable itself).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as OtlpStatus;
use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// `Status.code` of an error span (`STATUS_CODE_ERROR`).
pub const STATUS_ERROR: i32 = OtlpStatus::Error as i32;

/// One span as received, flattened for assertions.
#[derive(Clone, PartialEq)]
pub struct ReceivedSpan {
    /// The resource's `service.name` ("" when the resource had none).
    pub service: String,
    /// The instrumentation scope's name.
    pub scope: String,
    pub name: String,
    pub kind: SpanKind,
    /// Lowercase hex (32 digits).
    pub trace_id: String,
    /// Lowercase hex (16 digits).
    pub span_id: String,
    /// Lowercase hex; empty for a root span.
    pub parent_span_id: String,
    /// The proto `Status.code`: 0 unset, 1 ok, 2 error ([`STATUS_ERROR`]).
    pub status_code: i32,
    pub status_message: String,
    /// The span's attributes, every value rendered as text.
    pub attributes: BTreeMap<String, String>,
    /// The resource's attributes, rendered the same way.
    pub resource: BTreeMap<String, String>,
    /// The span's events: (name, attributes).
    pub events: Vec<(String, BTreeMap<String, String>)>,
}

impl ReceivedSpan {
    /// The attribute `key`, as text.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    /// Whether the span has no parent (it started its trace).
    pub fn is_root(&self) -> bool {
        self.parent_span_id.is_empty()
    }

    pub fn is_error(&self) -> bool {
        self.status_code == STATUS_ERROR
    }

    /// Every text the span carries: name, status message, attribute and event values, and
    /// its resource's attribute values (for "no secret anywhere" checks).
    pub fn texts(&self) -> Vec<&str> {
        let mut all = vec![self.name.as_str(), self.status_message.as_str()];
        all.extend(self.attributes.values().map(String::as_str));
        all.extend(self.resource.values().map(String::as_str));
        for (name, attrs) in &self.events {
            all.push(name);
            all.extend(attrs.values().map(String::as_str));
        }
        all
    }
}

impl fmt::Debug for ReceivedSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] {:?} {} trace={} span={} parent={} status={}{}{} {:?}",
            self.service,
            self.name,
            self.kind.as_str_name(),
            self.trace_id,
            self.span_id,
            if self.parent_span_id.is_empty() {
                "-"
            } else {
                &self.parent_span_id
            },
            self.status_code,
            if self.status_message.is_empty() {
                ""
            } else {
                ":"
            },
            self.status_message,
            self.attributes,
        )?;
        if !self.events.is_empty() {
            write!(f, " events={:?}", self.events)?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Store {
    spans: Vec<ReceivedSpan>,
    /// A request the receiver could not take (wrong encoding, not protobuf): reported by the
    /// next wait, since a panic in the server task would only reach the exporter.
    problem: Option<String>,
}

struct Shared {
    store: Mutex<Store>,
    /// Bumped on every request received.
    batches: watch::Sender<u64>,
}

/// The receiver: listening on 127.0.0.1 until dropped.
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl Receiver {
    /// Bind 127.0.0.1:0 and serve `POST /v1/traces`.
    pub async fn start() -> Self {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            batches: watch::Sender::new(0),
        });
        let app = Router::new().route(
            "/v1/traces",
            post({
                let shared = shared.clone();
                move |headers: HeaderMap, body: Bytes| {
                    let shared = shared.clone();
                    async move { export(&shared, &headers, body) }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the OTLP receiver binds");
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("the OTLP receiver serves")
        });
        Receiver {
            addr,
            shared,
            server,
        }
    }

    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/v1/traces`, for an exporter's `with_endpoint` (used verbatim).
    pub fn traces_url(&self) -> String {
        format!("{}/v1/traces", self.endpoint())
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        let store = self.shared.store.lock().unwrap();
        if let Some(problem) = &store.problem {
            panic!("OTLP receiver: {problem}");
        }
        store.spans.clone()
    }

    /// Wait until `cond` holds on the spans received so far (checked again on each batch
    /// received), and return them; panics after `limit` with `what` and the spans seen, or
    /// at once if a request could not be taken.
    pub async fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        cond: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let give_up = tokio::time::Instant::now() + limit;
        // Subscribed before the first look: a batch landing between a look and the wait
        // marks the value changed, so it is never missed.
        let mut batches = self.shared.batches.subscribe();
        loop {
            let spans = self.spans();
            if cond(&spans) {
                return spans;
            }
            match tokio::time::timeout_at(give_up, batches.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => unreachable!("the receiver holds the sender"),
                Err(_) => panic!(
                    "timed out after {limit:?} waiting for: {what}\n{} span(s) received:\n{}",
                    spans.len(),
                    spans
                        .iter()
                        .map(|s| format!("  {s:?}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// One `POST /v1/traces`.
fn export(shared: &Shared, headers: &HeaderMap, body: Bytes) -> (StatusCode, HeaderMap, Vec<u8>) {
    let header = |name| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let result = match header(header::CONTENT_ENCODING) {
        Some(enc) if !enc.trim().is_empty() && !enc.trim().eq_ignore_ascii_case("identity") => {
            Err((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "Content-Encoding {enc:?}: this receiver takes uncompressed bodies only \
                     (leave OTEL_EXPORTER_OTLP_COMPRESSION unset)"
                ),
            ))
        }
        _ => ExportTraceServiceRequest::decode(body.clone())
            .map_err(|e| {
                (
                    StatusCode::BAD_REQUEST,
                    format!(
                        "a body of {} bytes with Content-Type {:?} is not a protobuf \
                         ExportTraceServiceRequest ({e}); OTLP/HTTP JSON is not supported",
                        body.len(),
                        header(header::CONTENT_TYPE).unwrap_or_default()
                    ),
                )
            })
            .map(flatten),
    };
    let mut response_headers = HeaderMap::new();
    let answer = match result {
        Ok(spans) => {
            shared.store.lock().unwrap().spans.extend(spans);
            response_headers.insert(
                header::CONTENT_TYPE,
                "application/x-protobuf".parse().unwrap(),
            );
            (
                StatusCode::OK,
                response_headers,
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        }
        Err((status, problem)) => {
            eprintln!("OTLP receiver: {problem}");
            shared
                .store
                .lock()
                .unwrap()
                .problem
                .get_or_insert(problem.clone());
            (status, response_headers, problem.into_bytes())
        }
    };
    shared.batches.send_modify(|n| *n += 1);
    answer
}

fn flatten(request: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let resource = rs
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for ss in rs.scope_spans {
            let scope = ss.scope.map(|s| s.name).unwrap_or_default();
            for s in ss.spans {
                let status = s.status.unwrap_or_default();
                out.push(ReceivedSpan {
                    service: service.clone(),
                    scope: scope.clone(),
                    kind: SpanKind::try_from(s.kind).unwrap_or(SpanKind::Unspecified),
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    status_code: status.code,
                    status_message: status.message,
                    attributes: attributes(&s.attributes),
                    resource: resource.clone(),
                    events: s
                        .events
                        .iter()
                        .map(|e| (e.name.clone(), attributes(&e.attributes)))
                        .collect(),
                });
            }
        }
    }
    out
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), render(kv.value.as_ref())))
        .collect()
}

/// An attribute value as text: strings as they are, numbers and booleans as Rust prints
/// them, arrays as `[a, b]`, maps as `{k=v}`, bytes as hex.
fn render(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        None => String::new(),
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BytesValue(b)) => hex(b),
        Some(Value::ArrayValue(a)) => format!(
            "[{}]",
            a.values
                .iter()
                .map(|v| render(Some(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(Value::KvlistValue(kv)) => format!(
            "{{{}}}",
            kv.values
                .iter()
                .map(|kv| format!("{}={}", kv.key, render(kv.value.as_ref())))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(Value::StringValueStrindex(i)) => format!("strindex:{i}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
