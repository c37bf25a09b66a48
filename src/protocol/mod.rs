//! The v1 wire contract shared by the daemon and the client (written out in `docs/PROTOCOL.md`).
//!
//! Everything both sides must agree on lives here: header names, the error codes carried in
//! `x-error-code`, how the absolute deadline is encoded, and how a request's routing facts are read
//! out of AMQP properties. Keeping it in one module means a change to the contract is one diff.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;

mod codes;

pub use codes::{ErrorCode, RequestError};

/// Header carrying the absolute deadline, Unix epoch milliseconds.
pub const DEADLINE_HEADER: &str = "x-deadline-ms";
/// Header carrying the error code on an error reply.
pub const ERROR_CODE_HEADER: &str = "x-error-code";
/// Header on an error reply: whether a retry of the same request may help (a boolean, `t`).
pub const ERROR_RETRYABLE_HEADER: &str = "x-error-retryable";
/// Optional W3C trace context, carried into the daemon's request span.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Delivery counter that quorum queues maintain. Up to RabbitMQ 4.2 it counts every return
/// of a message (rejected, or its consumer's channel gone); from 4.3 only failed deliveries.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
/// RabbitMQ 4.3's count of earlier acquisitions of a quorum queue's message, whatever ended
/// them: the one that counts a request whose worker died with it.
pub const ACQUIRED_COUNT_HEADER: &str = "x-acquired-count";
/// RabbitMQ's pseudo-queue for direct reply-to.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// Content type of every error reply (a one-line message). Raw requests and raw success
/// replies carry none: they are bytes, and each property is work for the broker.
pub const ERROR_CONTENT_TYPE: &str = "text/plain";
/// Content type of typed JSON requests and of their success replies.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// Milliseconds since the Unix epoch, the deadline header's unit.
pub fn now_epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The `x-deadline-ms` value our client sends: the decimal digits as a long string (AMQP
/// field type `S`). Every mainstream AMQP library decodes a long string; the natural 64-bit
/// integer (`l`) is one that Perl's Net::AMQP cannot decode, and a Perl server dies on it
/// (the contract, `docs/PROTOCOL.md`, says so too).
pub fn deadline_header_value(deadline_ms: u64) -> AMQPValue {
    AMQPValue::LongString(deadline_ms.to_string().into())
}

/// Read an integer header of any AMQP integer type (pika sends a signed long), a whole
/// non-negative float (JavaScript numbers), or a string of decimal digits (what our client
/// sends, see [`deadline_header_value`]).
pub fn header_u64(headers: Option<&FieldTable>, name: &str) -> Option<u64> {
    let value = headers?.inner().get(name)?;
    match value {
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Float(v) => whole_f64(f64::from(*v)),
        AMQPValue::Double(v) => whole_f64(*v),
        // AMQP timestamps count seconds, not milliseconds.
        AMQPValue::Timestamp(v) => v.checked_mul(1000),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

/// A float that holds a whole number of milliseconds, as a `u64` (no rounding of fractions).
fn whole_f64(v: f64) -> Option<u64> {
    // 2^64 itself is not representable as u64; below it every whole f64 is.
    (v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 18_446_744_073_709_551_616.0)
        .then_some(v as u64)
}

/// Read a string header (long or short string).
pub fn header_str<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a str> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// The routing facts of one request, read from its AMQP properties.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestMeta {
    /// Where the reply goes; `None` means the daemon cannot answer.
    pub reply_to: Option<String>,
    /// Copied to the reply; `None` gets an `invalid_argument` reply.
    pub correlation_id: Option<String>,
    /// Idempotency key when present.
    pub message_id: Option<String>,
    /// Method name (`type`); empty when absent, which the server's default method answers
    /// (the tutorial's clients never set it).
    pub method: String,
    /// Absolute deadline, epoch ms.
    pub deadline_ms: Option<u64>,
    /// Earlier deliveries the broker counted (quorum queues): the larger of
    /// `x-delivery-count` and `x-acquired-count`, when either is present.
    pub delivery_count: Option<u64>,
    /// W3C trace context, when present.
    pub traceparent: Option<String>,
    /// `user_id`: RabbitMQ refuses a publish whose `user_id` is not the publishing
    /// connection's user (unless that user is tagged `impersonator`), so when present it is the
    /// caller's validated identity.
    pub user_id: Option<String>,
    /// `app_id`: what the caller says it is; nobody checks it.
    pub app_id: Option<String>,
}

fn non_empty(s: &Option<ShortString>) -> Option<String> {
    s.as_ref()
        .map(|s| s.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

impl RequestMeta {
    /// Extract the contract's fields from a delivery's properties.
    pub fn from_properties(props: &BasicProperties) -> Self {
        let headers = props.headers().as_ref();
        RequestMeta {
            reply_to: non_empty(props.reply_to()),
            correlation_id: non_empty(props.correlation_id()),
            message_id: non_empty(props.message_id()),
            method: non_empty(props.kind()).unwrap_or_default(),
            deadline_ms: header_u64(headers, DEADLINE_HEADER),
            delivery_count: header_u64(headers, DELIVERY_COUNT_HEADER)
                .max(header_u64(headers, ACQUIRED_COUNT_HEADER)),
            traceparent: header_str(headers, TRACEPARENT_HEADER).map(str::to_owned),
            user_id: non_empty(props.user_id()),
            app_id: non_empty(props.app_id()),
        }
    }

    /// Time left before the deadline, `None` when the request carries no deadline,
    /// `Some(ZERO)` when it has passed.
    pub fn remaining(&self, now_ms: u64) -> Option<Duration> {
        self.deadline_ms
            .map(|d| Duration::from_millis(d.saturating_sub(now_ms)))
    }

    /// Whether the deadline has passed at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.deadline_ms.is_some_and(|d| d <= now_ms)
    }
}

/// Build the properties of a reply: correlation id copied; when it is an error, `text/plain`
/// and the error code headers; and `expiration` set to the time left so an unread reply does not linger.
pub fn reply_properties(
    correlation_id: Option<&str>,
    error: Option<ErrorCode>,
    remaining: Option<Duration>,
) -> BasicProperties {
    let mut props = BasicProperties::default();
    if let Some(id) = correlation_id {
        props = props.with_correlation_id(id.into());
    }
    if let Some(code) = error {
        props = props.with_content_type(ERROR_CONTENT_TYPE.into());
        let mut headers = FieldTable::default();
        headers.insert(
            ERROR_CODE_HEADER.into(),
            AMQPValue::LongString(code.as_str().into()),
        );
        headers.insert(
            ERROR_RETRYABLE_HEADER.into(),
            AMQPValue::Boolean(code.is_retryable()),
        );
        props = props.with_headers(headers);
    }
    if let Some(left) = remaining {
        props = props.with_expiration(expiration_ms(left).into());
    }
    props
}

/// Largest `expiration` RabbitMQ accepts (an Erlang timer: 2^32 - 1 ms, about 49 days). A
/// larger value makes the broker close the publishing channel, so budgets are capped here.
pub const MAX_EXPIRATION_MS: u128 = 4_294_967_295;

/// The `expiration` property's value for a time budget: whole milliseconds, at least 1 because
/// RabbitMQ reads "0" as "deliver now or drop", which is not what a live budget means, and at
/// most [`MAX_EXPIRATION_MS`].
pub fn expiration_ms(budget: Duration) -> String {
    budget.as_millis().clamp(1, MAX_EXPIRATION_MS).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in ErrorCode::ALL {
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(code));
        }
        assert!("nope".parse::<ErrorCode>().is_err());
    }

    #[test]
    fn deadline_header_accepts_every_integer_type() {
        for value in [
            AMQPValue::LongLongInt(1_700_000_000_000),
            AMQPValue::Timestamp(1_700_000_000),
            AMQPValue::LongString("1700000000000".into()),
            AMQPValue::ShortString(" 1700000000000 ".into()),
            AMQPValue::LongUInt(1_700_000_000),
            AMQPValue::Double(1_700_000_000_000.0),
            deadline_header_value(1_700_000_000_000),
        ] {
            let expect = match value {
                AMQPValue::LongUInt(v) => u64::from(v),
                _ => 1_700_000_000_000,
            };
            let mut t = FieldTable::default();
            t.insert(DEADLINE_HEADER.into(), value);
            assert_eq!(header_u64(Some(&t), DEADLINE_HEADER), Some(expect));
        }
        for bad in [
            AMQPValue::LongInt(-5),
            AMQPValue::Double(1.5),
            AMQPValue::Double(f64::NAN),
            AMQPValue::LongString("12x".into()),
            AMQPValue::Boolean(true),
        ] {
            let mut t = FieldTable::default();
            t.insert(DEADLINE_HEADER.into(), bad);
            assert_eq!(header_u64(Some(&t), DEADLINE_HEADER), None);
        }
    }

    #[test]
    fn our_deadline_is_a_long_string() {
        // Net::AMQP decodes `S` but not `l`: the encoding is part of the contract.
        assert!(matches!(
            deadline_header_value(1_700_000_000_000),
            AMQPValue::LongString(s) if s.as_bytes() == b"1700000000000"
        ));
    }

    #[test]
    fn meta_leaves_a_missing_method_to_the_server_and_ignores_empty_fields() {
        let props = BasicProperties::default()
            .with_reply_to("q".into())
            .with_correlation_id("".into())
            .with_type("".into());
        let meta = RequestMeta::from_properties(&props);
        assert_eq!(meta.reply_to.as_deref(), Some("q"));
        assert_eq!(meta.correlation_id, None);
        assert_eq!(meta.method, "");
    }

    #[test]
    fn broker_counts_are_the_larger_of_both_headers() {
        let count = |pairs: &[(&str, i64)]| {
            let mut t = FieldTable::default();
            for (k, v) in pairs {
                t.insert((*k).into(), AMQPValue::LongLongInt(*v));
            }
            RequestMeta::from_properties(&BasicProperties::default().with_headers(t)).delivery_count
        };
        assert_eq!(count(&[]), None);
        assert_eq!(count(&[(DELIVERY_COUNT_HEADER, 2)]), Some(2));
        // RabbitMQ 4.3: a worker that died does not fail the delivery, but it did acquire it.
        assert_eq!(
            count(&[(DELIVERY_COUNT_HEADER, 0), (ACQUIRED_COUNT_HEADER, 3)]),
            Some(3)
        );
        assert_eq!(count(&[(ACQUIRED_COUNT_HEADER, 1)]), Some(1));
    }

    #[test]
    fn error_messages_are_one_line() {
        let e = RequestError::new(ErrorCode::Internal, "a\nb\r\nc");
        assert!(!e.message.contains('\n') && !e.message.contains('\r'));
    }

    #[test]
    fn expiration_is_never_zero() {
        assert_eq!(expiration_ms(Duration::ZERO), "1");
        assert_eq!(expiration_ms(Duration::from_millis(700)), "700");
        assert_eq!(expiration_ms(Duration::MAX), "4294967295");
    }
}
