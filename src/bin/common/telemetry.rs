//! Logging set-up of our binaries (each includes this file; the library leaves logging to
//! the application): tracing-subscriber with an `EnvFilter` (RUST_LOG wins over `log.level`),
//! text or one-JSON-object-per-line output on stderr, and with trace export on
//! (`[telemetry]`, `OTEL_*`; `otlp.rs`) the OpenTelemetry layer beside it.
//!
//! Output goes through [`RedactingWriter`], which masks the configured secrets in every line
//! whatever crate logged it: our own code never logs a password, but a dependency logging a
//! URI or a connection status at trace level must not leak one either.

use std::io::{self, IsTerminal, Write};
use std::sync::Arc;

use opentelemetry::trace::TraceContextExt;
use tracing::{Level, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use amqp_rpc::config::telemetry::TraceExport;
use amqp_rpc::config::{LogConfig, LogFormat};

use super::otlp::Export;

/// Install the global subscriber, and start trace export when `export` says so. `secrets` are
/// masked in all output (empty strings ignored). Returns an error if a subscriber is already
/// installed or the exporter cannot be built.
pub fn init(
    log: &LogConfig,
    secrets: Vec<String>,
    export: Option<&TraceExport>,
) -> Result<Option<Export>, String> {
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
    let ansi = io::stderr().is_terminal();
    let Some(export) = export else {
        // Without export, the one global filter as before: per-layer filtering costs every
        // span and event a little more, for nothing here.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer)
            .with_ansi(ansi)
            .log_internal_errors(false);
        let result = match log.format {
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
            _ => builder.try_init(), // text, and any format the library adds later
        };
        return result.map(|()| None).map_err(|e| e.to_string());
    };
    let export = Export::start(export)?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        .log_internal_errors(false);
    let fmt = match log.format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .event_format(WithTraceIds(
                format::Format::default().json().flatten_event(true),
            ))
            .with_filter(filter)
            .boxed(),
        _ => fmt.with_filter(filter).boxed(),
    };
    // Our spans only, whatever the log level: the exporter's own crates (HTTP client,
    // OpenTelemetry) never, or exporting would make spans of its own.
    let ours = Targets::new()
        .with_target("amqp_rpc", Level::INFO)
        .with_target(amqp_rpc::trace::HANDLER_TARGET, Level::DEBUG)
        .with_target(amqp_rpc::trace::CALLER_TARGET, LevelFilter::OFF)
        .with_target("amqp_rpcd", Level::INFO);
    // Only what the spans say: source locations, thread names and ids, busy/idle times and
    // targets would be most of each exported span's bytes, about 200 of its 500.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(export.tracer())
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_target(false)
        .with_filter(ours);
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(Some(export))
}

/// A JSON line of an event inside a traced span, with the trace's and the span's ids first:
/// what lets a log search and a trace view find each other.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let cx = opentelemetry::Context::current();
        let span = cx.span();
        let ids = span.span_context();
        if !ids.is_valid() {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.0
            .format_event(ctx, format::Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{}\",\"span_id\":\"{}\",{rest}",
                ids.trace_id(),
                ids.span_id()
            ),
            None => writer.write_str(&line),
        }
    }
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
