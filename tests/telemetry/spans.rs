//! Reading what the receiver got: the spans of one call's trace, the daemon's request span
//! and its handler, attributes, and the daemon's JSON log lines inside a request.

use super::common::otlp::{ReceivedSpan, SpanKind};

/// The `service.name` of each binary's spans.
pub const CLI: &str = "amqp-rpc";
pub const DAEMON: &str = "amqp-rpcd";

pub fn is(span: &ReceivedSpan, service: &str, name: &str, kind: SpanKind) -> bool {
    span.service == service && span.name == name && span.kind == kind
}

/// The spans matching `pred`.
pub fn all(spans: &[ReceivedSpan], pred: impl Fn(&ReceivedSpan) -> bool) -> Vec<&ReceivedSpan> {
    spans.iter().filter(|s| pred(s)).collect()
}

/// The one span matching `pred`; panics, listing the spans, if there is none or several.
pub fn one<'a>(
    spans: &'a [ReceivedSpan],
    what: &str,
    pred: impl Fn(&ReceivedSpan) -> bool,
) -> &'a ReceivedSpan {
    match all(spans, pred)[..] {
        [span] => span,
        ref found => panic!(
            "expected exactly one {what}, found {}; spans:\n{}",
            found.len(),
            dump(spans)
        ),
    }
}

pub fn dump(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| format!("  {s:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The CLI's call: its CLIENT span named after `method`, its PRODUCER `send` child, and the
/// daemon's SERVER span (named `method`) that continues that `send`.
pub struct CallTrace<'a> {
    pub client: &'a ReceivedSpan,
    pub send: &'a ReceivedSpan,
    pub server: &'a ReceivedSpan,
}

pub fn call_trace<'a>(spans: &'a [ReceivedSpan], method: &str) -> Option<CallTrace<'a>> {
    let client = spans
        .iter()
        .find(|s| is(s, CLI, method, SpanKind::Client))?;
    let sends = all(spans, |s| {
        is(s, CLI, "send", SpanKind::Producer) && s.parent_span_id == client.span_id
    });
    let server = spans.iter().find(|s| {
        is(s, DAEMON, method, SpanKind::Server)
            && sends.iter().any(|send| send.span_id == s.parent_span_id)
    })?;
    let send = sends
        .into_iter()
        .find(|send| send.span_id == server.parent_span_id)?;
    Some(CallTrace {
        client,
        send,
        server,
    })
}

/// The daemon's `handler` span inside `server`.
pub fn handler_of<'a>(
    spans: &'a [ReceivedSpan],
    server: &ReceivedSpan,
) -> Option<&'a ReceivedSpan> {
    spans.iter().find(|s| {
        is(s, DAEMON, "handler", SpanKind::Internal) && s.parent_span_id == server.span_id
    })
}

/// The daemon's SERVER span of the request with this correlation id.
pub fn server_of<'a>(spans: &'a [ReceivedSpan], correlation_id: &str) -> Option<&'a ReceivedSpan> {
    spans.iter().find(|s| {
        s.service == DAEMON
            && s.kind == SpanKind::Server
            && s.attr("messaging.message.conversation_id") == Some(correlation_id)
    })
}

pub fn assert_attrs(span: &ReceivedSpan, expected: &[(&str, &str)]) {
    for (key, value) in expected {
        assert_eq!(span.attr(key), Some(*value), "{key} of {span:?}");
    }
}

/// No span carries a broker URL with its password.
pub fn assert_no_secret(spans: &[ReceivedSpan]) {
    for span in spans {
        for t in span.texts() {
            assert!(!t.contains("guest@"), "a credential in {span:?}");
        }
    }
}

pub fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// (trace id, parent id) of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn parse_traceparent(tp: &str) -> (String, String) {
    let parts: Vec<&str> = tp.split('-').collect();
    assert!(
        parts.len() == 4
            && parts[0] == "00"
            && is_hex(parts[1], 32)
            && is_hex(parts[2], 16)
            && is_hex(parts[3], 2),
        "not a W3C traceparent: {tp:?}"
    );
    (parts[1].to_owned(), parts[2].to_owned())
}

/// Every JSON object in `value` (itself included).
pub fn objects(value: &serde_json::Value) -> Vec<&serde_json::Map<String, serde_json::Value>> {
    let mut out = Vec::new();
    match value {
        serde_json::Value::Object(map) => {
            out.push(map);
            for v in map.values() {
                out.extend(objects(v));
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                out.extend(objects(v));
            }
        }
        _ => {}
    }
    out
}

/// The daemon's JSON log lines emitted inside the request with this correlation id (its
/// `request` span, listed in the line's "spans", records it).
pub fn request_lines(log: &[String], correlation_id: &str) -> Vec<serde_json::Value> {
    log.iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| {
            line["spans"].as_array().is_some_and(|spans| {
                spans
                    .iter()
                    .any(|s| s["correlation_id"].as_str() == Some(correlation_id))
            })
        })
        .collect()
}

/// Every log line inside the request carries `"trace_id"` = the trace and `"span_id"` = one
/// of the daemon's spans of that trace; returns how many lines that was.
pub fn assert_request_lines_carry_the_trace(
    log: &[String],
    spans: &[ReceivedSpan],
    correlation_id: &str,
    trace_id: &str,
) -> usize {
    let daemon_spans: Vec<&str> = all(spans, |s| s.service == DAEMON && s.trace_id == trace_id)
        .iter()
        .map(|s| s.span_id.as_str())
        .collect();
    let lines = request_lines(log, correlation_id);
    for line in &lines {
        let carries = objects(line).iter().any(|o| {
            o.get("trace_id").and_then(|t| t.as_str()) == Some(trace_id)
                && o.get("span_id")
                    .and_then(|s| s.as_str())
                    .is_some_and(|s| daemon_spans.contains(&s))
        });
        assert!(
            carries,
            "a log line inside request {correlation_id} without \"trace_id\":\"{trace_id}\" \
             and the \"span_id\" of one of the daemon's spans {daemon_spans:?} of that trace: \
             {line}"
        );
    }
    lines.len()
}
