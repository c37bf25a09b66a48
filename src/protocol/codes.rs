//! The contract's error codes (`x-error-code`, and whether a retry may help:
//! `x-error-retryable`) and the error a request is answered with.

use std::fmt;
use std::str::FromStr;

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
    /// Argument parsed but beyond the method's bound (fib: `n > max_n`).
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
