//! The daemon's fatal errors: what makes `amqp-rpcd` exit non-zero. Per-request failures are
//! [`crate::protocol::RequestError`] (they become error replies) and the client's are
//! [`crate::client::CallError`]; each audience gets its own enum.

use crate::amqp::SetupError;
use crate::config::ConfigError;

/// Why the daemon stopped for good.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A set-up problem no reconnect fixes (bad URL, queue clash).
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The HTTP listener could not bind.
    #[error("http.listen {addr}: {source}")]
    HttpBind {
        /// Address from the config.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    /// Metrics could not be registered (a name clash in the registry passed in).
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The grace period ended with requests still running; they stay unacked and the broker
    /// redelivers them.
    #[error("shutdown grace period over with {0} request(s) unfinished")]
    DrainTimeout(usize),
}

impl Error {
    /// The process exit code for this error (sysexits-style where one fits).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Setup(_) => 78,    // EX_CONFIG
            Error::HttpBind { .. } => 71,                // EX_OSERR
            Error::Metrics(_) | Error::Signals(_) => 70, // EX_SOFTWARE
            Error::DrainTimeout(_) => 75,                // EX_TEMPFAIL
        }
    }
}
