//! [`CallError`]: how a call can end other than with a value. Exactly one per failed call.

use std::time::Duration;

use crate::protocol::ErrorCode;

/// Why a call did not return a value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// No reply before the call's deadline.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// Nobody serves the queue: it does not exist, or has no consumer.
    #[error("no server for queue {queue:?}: {reason}")]
    NoServer {
        /// The service queue.
        queue: String,
        /// What showed it (`queue does not exist`, `no consumer`, `returned: NO_ROUTE`).
        reason: String,
    },
    /// The connection dropped while the call was in flight: the request may or may not have
    /// been processed.
    #[error("connection to the broker lost while the call was in flight; outcome unknown")]
    ConnectionLost,
    /// The broker could not be reached (or refused the request) before the deadline.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker blocks this client's connection (a memory or disk alarm: it takes no
    /// publishes until the alarm clears); the call was not sent. A kind of unavailability
    /// ([`is_unavailable`](Self::is_unavailable)), reported at once rather than at the deadline,
    /// with the broker's reason.
    #[error("broker unavailable: it blocked the connection ({0})")]
    Blocked(String),
    /// The server answered with an error reply.
    #[error("remote error {code}: {message}")]
    Remote {
        /// The contract's error code.
        code: ErrorCode,
        /// The server's one-line message.
        message: String,
    },
}

impl CallError {
    /// The broker returned the request (`mandatory`): no queue by that name, so nobody serves it.
    pub(crate) fn returned(queue: &str, reply_text: &str) -> Self {
        CallError::NoServer {
            queue: queue.to_owned(),
            reason: format!("request returned: {reply_text}"),
        }
    }

    /// No answer in time, locally or as the server's `deadline_exceeded`.
    pub fn is_timeout(&self) -> bool {
        matches!(self, CallError::Timeout(_))
            || self.remote_code() == Some(ErrorCode::DeadlineExceeded)
    }

    /// Nobody is serving the queue.
    pub fn is_no_server(&self) -> bool {
        matches!(self, CallError::NoServer { .. })
    }

    /// The connection dropped mid-call.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, CallError::ConnectionLost)
    }

    /// The broker could not be reached.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, CallError::Unavailable(_) | CallError::Blocked(_))
            || self.remote_code() == Some(ErrorCode::Unavailable)
    }

    /// The server answered with an error.
    pub fn is_remote(&self) -> bool {
        matches!(self, CallError::Remote { .. })
    }

    /// The remote error code, for remote errors.
    pub fn remote_code(&self) -> Option<ErrorCode> {
        match self {
            CallError::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether sending the same request again may succeed. `ConnectionLost` is retryable only
    /// for idempotent methods: the first attempt may have run.
    pub fn is_retryable(&self) -> bool {
        match self {
            CallError::Timeout(_) | CallError::NoServer { .. } => true,
            CallError::ConnectionLost | CallError::Unavailable(_) | CallError::Blocked(_) => true,
            CallError::Remote { code, .. } => code.is_retryable(),
        }
    }

    /// A short stable name: `timeout`, `no_server`, `connection_lost`, `unavailable`, `blocked`, or the
    /// remote error code. Used for counting (bench) and exit codes (CLI).
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Timeout(_) => "timeout",
            CallError::NoServer { .. } => "no_server",
            CallError::ConnectionLost => "connection_lost",
            CallError::Unavailable(_) => "unavailable",
            CallError::Blocked(_) => "blocked",
            CallError::Remote { code, .. } => code.as_str(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifiers() {
        assert!(CallError::Timeout(Duration::from_secs(1)).is_timeout());
        let remote = |code| CallError::Remote {
            code,
            message: String::new(),
        };
        assert!(remote(ErrorCode::DeadlineExceeded).is_timeout());
        assert!(remote(ErrorCode::DeadlineExceeded).is_retryable());
        assert!(!remote(ErrorCode::OutOfRange).is_retryable());
        assert_eq!(remote(ErrorCode::OutOfRange).kind(), "out_of_range");
        let ns = CallError::NoServer {
            queue: "q".into(),
            reason: "r".into(),
        };
        assert!(ns.is_no_server() && !ns.is_timeout() && ns.kind() == "no_server");
        assert!(CallError::ConnectionLost.is_connection_lost());
        let blocked = CallError::Blocked("low on memory".into());
        assert!(blocked.is_unavailable() && blocked.kind() == "blocked");
        assert!(blocked.to_string().contains("low on memory"), "{blocked}");
    }
}
