//! The v1 wire contract shared by the daemon and the client (DESIGN.md section 1).
//!
//! Everything both sides must agree on lives here: header names, the error codes carried in
//! `x-error-code`, how the absolute deadline is encoded, and how a request's routing facts are read
//! out of AMQP properties. Keeping it in one module means a change to the contract is one diff.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;

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
/// Method used when `type` is absent or empty: the tutorial's clients never set it.
pub const DEFAULT_METHOD: &str = "fib";
/// RabbitMQ's pseudo-queue for direct reply-to.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// Content type of raw requests and replies, and of every error reply (a one-line message).
pub const REPLY_CONTENT_TYPE: &str = "text/plain";
/// Content type of typed JSON requests and of their success replies.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// The error codes of the contract, carried in the `x-error-code` header of an error reply.
///
/// The first seven are the daemon's own; the rest are for methods' application errors, after
/// the gRPC canonical codes (same names, same meanings), so a caller in any language can act
/// on them. Whether a retry may help is a property of the code ([`ErrorCode::is_retryable`]),
/// also sent as the `x-error-retryable` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Body not what the method takes, not UTF-8, or `correlation_id` missing.
    InvalidArgument,
    /// Argument parsed but beyond the method's bound (`n > max_n`).
    OutOfRange,
    /// `type` names no registered method.
    UnknownMethod,
    /// Body over `max_body_bytes`, or a method's own quota.
    ResourceExhausted,
    /// Work could not finish before the request's deadline.
    DeadlineExceeded,
    /// Handler failed or panicked, or a poison request was given up.
    Internal,
    /// The daemon cannot serve now.
    Unavailable,
    /// The caller may not do this (a method's own check).
    PermissionDenied,
    /// The thing asked about does not exist.
    NotFound,
    /// The thing to be created exists already.
    AlreadyExists,
    /// The system is not in the state the operation needs (retrying the same request will
    /// not help until the state changes).
    FailedPrecondition,
    /// The operation was aborted by a conflict (a concurrency clash): a retry may succeed.
    Aborted,
    /// The method exists but does not implement this operation.
    Unimplemented,
    /// The caller is not authenticated as the method requires.
    Unauthenticated,
    /// The operation was cancelled (by the server, e.g. while draining).
    Cancelled,
    /// Unrecoverable data loss or corruption.
    DataLoss,
    /// An error the method could not classify.
    Unknown,
}

impl ErrorCode {
    /// Every code, in contract order.
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::InvalidArgument,
        ErrorCode::OutOfRange,
        ErrorCode::UnknownMethod,
        ErrorCode::ResourceExhausted,
        ErrorCode::DeadlineExceeded,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
        ErrorCode::PermissionDenied,
        ErrorCode::NotFound,
        ErrorCode::AlreadyExists,
        ErrorCode::FailedPrecondition,
        ErrorCode::Aborted,
        ErrorCode::Unimplemented,
        ErrorCode::Unauthenticated,
        ErrorCode::Cancelled,
        ErrorCode::DataLoss,
        ErrorCode::Unknown,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::OutOfRange => "out_of_range",
            ErrorCode::UnknownMethod => "unknown_method",
            ErrorCode::ResourceExhausted => "resource_exhausted",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::FailedPrecondition => "failed_precondition",
            ErrorCode::Aborted => "aborted",
            ErrorCode::Unimplemented => "unimplemented",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::DataLoss => "data_loss",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// Whether the same request may succeed if sent again (the contract's "caller may retry?"):
    /// `deadline_exceeded`, `unavailable` and `aborted`, as gRPC advises. `internal` is
    /// "maybe": we say no, because a handler that failed once on the same input will most
    /// likely fail again, and the poison limit already retried on the server side.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::DeadlineExceeded | ErrorCode::Unavailable | ErrorCode::Aborted
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErrorCode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown error code {s:?}"))
    }
}

/// A request the daemon refuses or fails: becomes an error reply with this code and message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RequestError {
    /// The contract code sent in `x-error-code`.
    pub code: ErrorCode,
    /// A one-line human message sent as the reply body.
    pub message: String,
}

impl RequestError {
    /// Build an error; newlines are flattened because the contract promises a one-line body.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let message = message.into().replace(['\r', '\n'], " ");
        RequestError { code, message }
    }
}

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
    /// Method name; the contract's default when absent or empty.
    pub method: String,
    /// Absolute deadline, epoch ms.
    pub deadline_ms: Option<u64>,
    /// Earlier deliveries the broker counted (quorum queues): the larger of
    /// `x-delivery-count` and `x-acquired-count`, when either is present.
    pub delivery_count: Option<u64>,
    /// W3C trace context, when present.
    pub traceparent: Option<String>,
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
            method: non_empty(props.kind()).unwrap_or_else(|| DEFAULT_METHOD.to_owned()),
            deadline_ms: header_u64(headers, DEADLINE_HEADER),
            delivery_count: header_u64(headers, DELIVERY_COUNT_HEADER)
                .max(header_u64(headers, ACQUIRED_COUNT_HEADER)),
            traceparent: header_str(headers, TRACEPARENT_HEADER).map(str::to_owned),
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

/// Build the properties of a reply: correlation id copied, `text/plain`, the error code header
/// when it is an error, and `expiration` set to the time left so an unread reply does not linger.
pub fn reply_properties(
    correlation_id: Option<&str>,
    error: Option<ErrorCode>,
    remaining: Option<Duration>,
) -> BasicProperties {
    let mut props = BasicProperties::default().with_content_type(REPLY_CONTENT_TYPE.into());
    if let Some(id) = correlation_id {
        props = props.with_correlation_id(id.into());
    }
    if let Some(code) = error {
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
    fn meta_defaults_method_and_ignores_empty_fields() {
        let props = BasicProperties::default()
            .with_reply_to("q".into())
            .with_correlation_id("".into())
            .with_type("".into());
        let meta = RequestMeta::from_properties(&props);
        assert_eq!(meta.reply_to.as_deref(), Some("q"));
        assert_eq!(meta.correlation_id, None);
        assert_eq!(meta.method, DEFAULT_METHOD);
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
