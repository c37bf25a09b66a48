//! Logging set-up of our binaries (each includes this file; the library leaves logging to
//! the application): tracing-subscriber with an `EnvFilter` (RUST_LOG wins over `log.level`),
//! text or one-JSON-object-per-line output on stderr.
//!
//! Output goes through [`RedactingWriter`], which masks the configured secrets in every line
//! whatever crate logged it: our own code never logs a password, but a dependency logging a
//! URI or a connection status at trace level must not leak one either.

use std::io::{self, IsTerminal, Write};
use std::sync::Arc;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use amqp_rpc::config::{LogConfig, LogFormat};

/// Install the global subscriber. `secrets` are masked in all output (empty strings ignored).
/// Returns an error if a subscriber is already installed.
pub fn init(log: &LogConfig, secrets: Vec<String>) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(v),
        _ => EnvFilter::try_new(&log.level),
    }
    .map_err(|e| format!("log filter: {e}"))?;
    let writer = RedactingWriter::new(secrets);
    // A broken stderr (a closed pipe) must not take the daemon down: tracing-subscriber would
    // report the write error with eprintln!, which panics on EPIPE in whatever task logged.
    // Colours only on a terminal: journald and log collectors would store the escape codes,
    // and styling every field name cost a third of each request span's creation.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(io::stderr().is_terminal())
        .log_internal_errors(false);
    let result = match log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        _ => builder.try_init(), // text, and any format the library adds later
    };
    result.map_err(|e| e.to_string())
}

/// A `MakeWriter` for stderr that replaces each secret with `***` before writing.
#[derive(Clone, Debug)]
pub struct RedactingWriter {
    secrets: Arc<Vec<String>>,
}

impl RedactingWriter {
    /// Mask these strings (short ones are ignored: masking "a" would shred every line).
    pub fn new(secrets: Vec<String>) -> Self {
        let secrets = secrets.into_iter().filter(|s| s.len() >= 3).collect();
        RedactingWriter {
            secrets: Arc::new(secrets),
        }
    }

    fn redact(&self, buf: &[u8]) -> Vec<u8> {
        let mut text = String::from_utf8_lossy(buf).into_owned();
        for s in self.secrets.iter() {
            if text.contains(s.as_str()) {
                text = text.replace(s.as_str(), "***");
            }
        }
        text.into_bytes()
    }
}

impl<'a> MakeWriter<'a> for RedactingWriter {
    type Writer = RedactingLine;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingLine {
            parent: self.clone(),
        }
    }
}

/// One event's writer: the fmt layer writes each formatted event in one `write_all`.
#[derive(Debug)]
pub struct RedactingLine {
    parent: RedactingWriter,
}

impl Write for RedactingLine {
    /// Never fails: a log line that cannot be written is dropped, the work goes on.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = if self.parent.secrets.is_empty() {
            io::stderr().write_all(buf)
        } else {
            io::stderr().write_all(&self.parent.redact(buf))
        };
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_secrets() {
        let w = RedactingWriter::new(vec!["hunter2".into(), "x".into()]);
        assert_eq!(w.redact(b"pw=hunter2 x"), b"pw=*** x");
    }
}
