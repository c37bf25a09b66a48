//! Traces across the wire: the client's spans of a call and of each attempt, the daemon's
//! request span continuing the caller's trace, the handler's span inside it, and the W3C
//! `traceparent`/`tracestate` headers that carry their context in requests and replies.
//!
//! The library makes spans and moves their context; exporting them is the application's: it
//! installs `tracing-opentelemetry`'s layer and sets `opentelemetry`'s global propagator to
//! `TraceContextPropagator` (the binaries do both from `[telemetry]` and `OTEL_*`). Without the
//! layer, or built without the `otel` feature, every function here is a check and a return:
//! the semantic-convention attributes go straight to OpenTelemetry, never through the log
//! formatter, so a daemon logging at `info` pays nothing for them.
//!
//! Names, kinds and attributes follow OpenTelemetry's RPC and messaging conventions (semconv
//! 1.42): the call is a CLIENT span named after the method, each attempt a PRODUCER `send`
//! span whose context the request carries, the daemon's request a SERVER span named after
//! the method, its handler an INTERNAL `handler` span. No attribute carries a body, a URL or
//! a user name.

use lapin::message::Delivery;
use lapin::types::FieldTable;
use tracing::Span;

use crate::protocol::RequestMeta;

/// `rpc.system.name`: ours, as the conventions allow for systems they do not list.
pub const RPC_SYSTEM: &str = "amqp_rpc";

/// The handler span's target: its level is `debug`, so a daemon logging at `info` does not
/// pay for one more span per request, while the binaries' trace export asks for it.
pub const HANDLER_TARGET: &str = "amqp_rpc::handler";

/// The target of the span holding a request's `user_id` and `app_id`, inside its request
/// span: for the logs, never for trace export (a user name is personal data).
pub const CALLER_TARGET: &str = "amqp_rpc::caller";

/// The client's span of one call (all its attempts): `{method}`, kind client.
pub(crate) fn call_span(method: &str, queue: &str) -> Span {
    let span = tracing::info_span!("call", otel.name = method, otel.kind = "client");
    imp::call(&span, method, queue);
    span
}

/// One attempt of a call: `send`, kind producer, its context what the request carries.
pub(crate) fn attempt_span(queue: &str, attempt: u32) -> Span {
    let span = tracing::info_span!("send", otel.kind = "producer");
    imp::attempt(&span, queue, attempt);
    span
}

/// Put OpenTelemetry's current span's context (an attempt's) into a request's headers, with
/// the request's correlation id on that span.
pub(crate) fn inject_request(headers: &mut FieldTable, correlation_id: &str) {
    imp::inject_request(headers, correlation_id);
}

/// How a call ended, on its span: the code on success and failure, an error status on
/// failure. `kind` is `CallError::kind` or `"ok"`.
pub(crate) fn call_ended(span: &Span, kind: &'static str) {
    imp::ended(span, kind);
}

/// Continue the caller's trace (its `traceparent`, if any) in the daemon's request span, and
/// name it after `served`, the method that serves the request (`None`: none does), kind server. Before the span is first entered: its parent and
/// name are fixed then.
pub(crate) fn continue_trace(
    span: &Span,
    delivery: &Delivery,
    meta: &RequestMeta,
    served: Option<&str>,
) {
    imp::continue_trace(span, delivery, meta, served);
}

/// How the daemon answered, on the request span (OpenTelemetry's current span: the `caller`
/// span between them is not traced).
pub(crate) fn answered(code: &'static str) {
    imp::answered(code);
}

/// Put the request span's context (OpenTelemetry's current one) into a reply's headers.
pub(crate) fn inject_reply(props: lapin::BasicProperties) -> lapin::BasicProperties {
    imp::inject_reply(props)
}

/// The span of a method's own work.
pub(crate) fn handler_span(method: &str) -> Span {
    if imp::unsampled() {
        return Span::none();
    }
    tracing::debug_span!(target: HANDLER_TARGET, "handler", otel.kind = "internal", method)
}

#[cfg(feature = "otel")]
mod imp {
    use lapin::message::Delivery;
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::BasicProperties;
    use opentelemetry::propagation::{Extractor, Injector};
    use opentelemetry::trace::{Status, TraceContextExt};
    use opentelemetry::{global, Context, KeyValue};
    use tracing::Span;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::RPC_SYSTEM;
    use crate::protocol::{header_str, RequestMeta};

    /// Lapin's headers as a propagator's carrier. W3C names are lowercase, as AMQP keeps them.
    struct Headers<'a>(&'a mut FieldTable);

    impl Injector for Headers<'_> {
        fn set(&mut self, key: &str, value: String) {
            self.0
                .insert(key.into(), AMQPValue::LongString(value.into()));
        }
    }

    struct ReadHeaders<'a>(Option<&'a FieldTable>);

    impl Extractor for ReadHeaders<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            header_str(self.0, key)
        }

        fn keys(&self) -> Vec<&str> {
            self.0
                .map(|t| t.inner().keys().map(|k| k.as_str()).collect())
                .unwrap_or_default()
        }
    }

    /// Whether the span will reach OpenTelemetry: enabled, with the layer installed.
    fn traced(cx: &Context) -> bool {
        cx.span().span_context().is_valid()
    }

    /// Start the span now and give it its attributes in one go, when it records: an
    /// unsampled span gets none, so costs no allocation for them.
    fn set(span: &Span, attributes: impl FnOnce() -> Vec<KeyValue>) {
        let cx = span.context();
        let span = cx.span();
        if span.is_recording() {
            span.set_attributes(attributes());
        }
    }

    /// Inside a trace that is not sampled: spans of our own would only cost.
    pub fn unsampled() -> bool {
        let cx = Context::current();
        let ids = cx.span().span_context().clone();
        ids.is_valid() && !ids.is_sampled()
    }

    pub fn call(span: &Span, method: &str, queue: &str) {
        if span.is_disabled() {
            return;
        }
        set(span, || {
            vec![
                KeyValue::new("rpc.system.name", RPC_SYSTEM),
                KeyValue::new("rpc.method", method.to_owned()),
                KeyValue::new("messaging.system", "rabbitmq"),
                KeyValue::new(
                    "messaging.rabbitmq.destination.routing_key",
                    queue.to_owned(),
                ),
            ]
        });
    }

    pub fn attempt(span: &Span, queue: &str, attempt: u32) {
        if span.is_disabled() {
            return;
        }
        set(span, || {
            vec![
                KeyValue::new("messaging.system", "rabbitmq"),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.operation.name", "send"),
                // The default exchange, which every request is published to.
                KeyValue::new("messaging.destination.name", ""),
                KeyValue::new(
                    "messaging.rabbitmq.destination.routing_key",
                    queue.to_owned(),
                ),
                KeyValue::new("amqp_rpc.attempt", i64::from(attempt)),
            ]
        });
    }

    pub fn inject_request(headers: &mut FieldTable, correlation_id: &str) {
        let cx = Context::current();
        if !traced(&cx) {
            return;
        }
        cx.span().set_attribute(KeyValue::new(
            "messaging.message.conversation_id",
            correlation_id.to_owned(),
        ));
        global::get_text_map_propagator(|p| p.inject_context(&cx, &mut Headers(headers)));
    }

    pub fn ended(span: &Span, code: &'static str) {
        if !span.is_disabled() {
            outcome(&span.context(), code);
        }
    }

    pub fn answered(code: &'static str) {
        outcome(&Context::current(), code);
    }

    /// How a call or a request ended, on the span of `cx` (nothing when it does not record).
    fn outcome(cx: &Context, code: &'static str) {
        let span = cx.span();
        if !span.is_recording() {
            return;
        }
        span.set_attribute(KeyValue::new("rpc.response.status_code", code));
        if code != "ok" {
            span.set_attribute(KeyValue::new("error.type", code));
            span.set_status(Status::error(code));
        }
    }

    pub fn continue_trace(
        span: &Span,
        delivery: &Delivery,
        meta: &RequestMeta,
        served: Option<&str>,
    ) {
        if span.is_disabled() {
            return;
        }
        // Asked first with an empty parent, which costs nothing: without an OpenTelemetry
        // layer there is nothing more to do, not even reading the headers.
        if span.set_parent(Context::new()).is_err() {
            return;
        }
        let headers = delivery.properties.headers().as_ref();
        let parent = global::get_text_map_propagator(|p| p.extract(&ReadHeaders(headers)));
        // Still unstarted: it cannot fail now.
        let _ = span.set_parent(parent);
        // The serving method's name: a request without `type` is its default method's, and
        // an unknown name is the caller's input, which does not name the span.
        span.record("otel.name", served.unwrap_or(RPC_SYSTEM));
        span.record("otel.kind", "server");
        set(span, || {
            let mut attributes = vec![
                KeyValue::new("rpc.system.name", RPC_SYSTEM),
                KeyValue::new("messaging.system", "rabbitmq"),
                KeyValue::new("messaging.operation.type", "process"),
                KeyValue::new("messaging.operation.name", "process"),
                KeyValue::new("messaging.destination.name", delivery.exchange.to_string()),
                KeyValue::new(
                    "messaging.rabbitmq.destination.routing_key",
                    delivery.routing_key.to_string(),
                ),
                KeyValue::new(
                    "messaging.rabbitmq.message.delivery_tag",
                    delivery.delivery_tag as i64,
                ),
                KeyValue::new("messaging.message.body.size", delivery.data.len() as i64),
                KeyValue::new("rpc.method", served.unwrap_or("_OTHER").to_owned()),
            ];
            if let Some(id) = &meta.correlation_id {
                attributes.push(KeyValue::new(
                    "messaging.message.conversation_id",
                    id.clone(),
                ));
            }
            if let Some(id) = &meta.message_id {
                attributes.push(KeyValue::new("messaging.message.id", id.clone()));
            }
            attributes
        });
    }

    pub fn inject_reply(props: BasicProperties) -> BasicProperties {
        let cx = Context::current();
        if !traced(&cx) {
            return props;
        }
        let mut headers = props.headers().clone().unwrap_or_default();
        global::get_text_map_propagator(|p| p.inject_context(&cx, &mut Headers(&mut headers)));
        props.with_headers(headers)
    }
}

#[cfg(not(feature = "otel"))]
mod imp {
    use lapin::message::Delivery;
    use lapin::types::FieldTable;
    use lapin::BasicProperties;
    use tracing::Span;

    use crate::protocol::RequestMeta;

    pub fn call(_: &Span, _: &str, _: &str) {}
    pub fn attempt(_: &Span, _: &str, _: u32) {}
    pub fn inject_request(_: &mut FieldTable, _: &str) {}
    pub fn ended(_: &Span, _: &'static str) {}
    pub fn answered(_: &'static str) {}
    pub fn continue_trace(_: &Span, _: &Delivery, _: &RequestMeta, _: Option<&str>) {}
    pub fn inject_reply(props: BasicProperties) -> BasicProperties {
        props
    }
    pub fn unsampled() -> bool {
        false
    }
}
