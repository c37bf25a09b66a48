//! Traces for real (issue 17): `amqp-rpcd` and `amqp-rpc` as child processes exporting OTLP
//! to the test's own receiver (`tests/common/otlp.rs`), configured only by their environment
//! (`OTEL_TRACES_EXPORTER=otlp`, `OTEL_EXPORTER_OTLP_ENDPOINT`). One CLI call is one trace of
//! the client's spans, the daemon's server span as their child and the handler's inside it;
//! an error reply is an error span on both sides; a pika client's `traceparent` is continued
//! and the reply carries the trace back. At the bottom, the receiver itself, proven with the
//! real SDK and exporter.
#![cfg(feature = "otlp")]

mod common;
#[path = "common/foreign.rs"]
mod foreign;
#[path = "telemetry/spans.rs"]
mod spans;

use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::child::{free_port, signal, wait_ready};
use common::otlp::{Receiver, SpanKind, STATUS_ERROR};
use common::*;
use spans::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// Every wait of these tests.
const LIMIT: Duration = Duration::from_secs(20);

/// Telemetry for a child, by its environment only: export on, to `receiver`, batches sent
/// every 100 ms. Any `OTEL_*` of the test's own environment is left out.
fn traced(cmd: &mut Command, receiver: &Receiver) {
    without_otel(cmd)
        .env("OTEL_TRACES_EXPORTER", "otlp")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
}

/// `cmd` without any `OTEL_*` variable of the test's own environment.
fn without_otel(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OTEL_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// `amqp-rpcd` on `queue`, exporting to `receiver`, logging JSON (per-request debug lines
/// included) to a pipe that is read line by line.
struct TracedDaemon {
    child: Child,
    log: JoinHandle<Vec<String>>,
}

impl TracedDaemon {
    async fn start(queue: &str, receiver: &Receiver) -> Self {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_amqp-rpcd"));
        traced(&mut cmd, receiver);
        let mut child = cmd
            .env("AMQP_RPC__AMQP__URL", amqp_url())
            .env("AMQP_RPC__SERVICE__QUEUE", queue)
            .env("AMQP_RPC__HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env("AMQP_RPC__LOG__FORMAT", "json")
            .env("RUST_LOG", "info,amqp_rpc=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("amqp-rpcd runs");
        let stderr = child.stderr.take().unwrap();
        let log = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut all = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("amqp-rpcd: {line}");
                all.push(line);
            }
            all
        });
        wait_ready(port).await;
        TracedDaemon { child, log }
    }

    /// SIGTERM (so it flushes its spans), wait for a clean exit; its whole log.
    async fn stop(mut self) -> Vec<String> {
        signal(&self.child, "-TERM");
        let status = tokio::time::timeout(LIMIT, self.child.wait())
            .await
            .expect("amqp-rpcd exits after SIGTERM")
            .unwrap();
        assert_eq!(status.code(), Some(0), "amqp-rpcd's exit after SIGTERM");
        tokio::time::timeout(LIMIT, self.log)
            .await
            .expect("the log ends with the process")
            .unwrap()
    }
}

/// `amqp-rpc ARGS --queue QUEUE`, exporting to `receiver`.
async fn cli(receiver: &Receiver, queue: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_amqp-rpc"));
    traced(&mut cmd, receiver);
    let out = cmd
        .args(args)
        .args(["--queue", queue])
        .env("AMQP_URL", amqp_url())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(LIMIT, out)
        .await
        .expect("amqp-rpc exits in time")
        .expect("amqp-rpc runs");
    eprintln!(
        "amqp-rpc {args:?}: {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn one_cli_call_is_one_trace_of_client_daemon_and_handler_spans() {
    let receiver = Receiver::start().await;
    let queue = unique_queue("otel-call");
    let daemon = TracedDaemon::start(&queue, &receiver).await;

    let out = cli(&receiver, &queue, &["call", "fib", "10"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "55");

    let spans = receiver
        .wait_for(
            LIMIT,
            "the CLI's fib and send spans, the daemon's fib and handler spans",
            |spans| {
                call_trace(spans, "fib")
                    .is_some_and(|call| handler_of(spans, call.server).is_some())
            },
        )
        .await;
    let CallTrace {
        client,
        send,
        server,
    } = call_trace(&spans, "fib").unwrap();
    let handler = handler_of(&spans, server).unwrap();

    // One trace: the client's span is its root, everything else inside it.
    assert!(
        is_hex(&client.trace_id, 32) && is_hex(&client.span_id, 16),
        "{client:?}"
    );
    assert!(client.is_root(), "{client:?}");
    one(&spans, "CLI call span", |s| {
        s.service == CLI && s.kind == SpanKind::Client
    });
    for span in all(&spans, |s| s.service == CLI) {
        assert_eq!(
            span.trace_id, client.trace_id,
            "one CLI call, one trace: {span:?}"
        );
    }
    for span in [send, server, handler] {
        assert_eq!(span.trace_id, client.trace_id, "{span:?}");
    }
    assert_eq!(send.parent_span_id, client.span_id);
    assert_eq!(server.parent_span_id, send.span_id);
    assert_eq!(handler.parent_span_id, server.span_id);

    // The conventions' attributes.
    assert_attrs(
        client,
        &[
            ("rpc.system.name", "amqp_rpc"),
            ("rpc.method", "fib"),
            ("rpc.response.status_code", "ok"),
        ],
    );
    assert_ne!(client.status_code, STATUS_ERROR, "{client:?}");
    assert_eq!(client.attr("error.type"), None, "{client:?}");
    assert_attrs(
        send,
        &[
            ("messaging.system", "rabbitmq"),
            ("messaging.operation.type", "send"),
            ("messaging.destination.name", ""),
            ("messaging.rabbitmq.destination.routing_key", &queue),
        ],
    );
    let conversation = send
        .attr("messaging.message.conversation_id")
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| panic!("a conversation id on {send:?}"));
    assert_attrs(
        server,
        &[
            ("rpc.system.name", "amqp_rpc"),
            ("rpc.method", "fib"),
            ("messaging.system", "rabbitmq"),
            ("messaging.operation.type", "process"),
            ("messaging.rabbitmq.destination.routing_key", &queue),
            ("messaging.message.conversation_id", conversation),
            ("rpc.response.status_code", "ok"),
        ],
    );
    assert_eq!(server.attr("error.type"), None, "{server:?}");
    assert_ne!(server.status_code, STATUS_ERROR, "{server:?}");
    assert_no_secret(&spans);

    // The daemon's JSON log lines inside the request carry its trace and span ids. (A
    // successful fib(10) may log nothing inside its request: that at least one such line
    // exists is the error test's, whose "error reply" line is logged at info.)
    let log = daemon.stop().await;
    let spans = receiver.spans();
    assert_request_lines_carry_the_trace(&log, &spans, conversation, &client.trace_id);
    assert_no_secret(&spans);
    delete_queue(&queue).await;
}

#[tokio::test]
async fn an_error_reply_is_an_error_span_on_both_sides() {
    let receiver = Receiver::start().await;
    let queue = unique_queue("otel-error");
    let daemon = TracedDaemon::start(&queue, &receiver).await;

    // The CLI sends it (a decimal n >= 0); the daemon's fib answers out_of_range (max_n
    // 100000): a remote error, exit 5. With the caller's user_id, which the logs show and
    // the trace must not.
    let code = "out_of_range";
    let out = cli(&receiver, &queue, &["call", "fib", "100001", "--identify"]).await;
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(code), "{}", text(&out.stderr));

    let spans = receiver
        .wait_for(
            LIMIT,
            "the CLI's fib and send spans and the daemon's fib span",
            |spans| call_trace(spans, "fib").is_some(),
        )
        .await;
    let CallTrace {
        client,
        send,
        server,
    } = call_trace(&spans, "fib").unwrap();
    assert_eq!(server.trace_id, client.trace_id, "one trace");
    assert_eq!(send.trace_id, client.trace_id, "one trace");
    assert_eq!(
        server.attr("messaging.message.conversation_id"),
        send.attr("messaging.message.conversation_id")
    );
    for span in [client, server] {
        assert_eq!(span.status_code, STATUS_ERROR, "an error status: {span:?}");
        assert_attrs(
            span,
            &[("error.type", code), ("rpc.response.status_code", code)],
        );
    }
    assert_no_secret(&spans);

    // The daemon's "error reply" line, inside the request, carries the trace and span ids.
    let log = daemon.stop().await;
    let conversation = server.attr("messaging.message.conversation_id").unwrap();
    let lines = assert_request_lines_carry_the_trace(&log, &spans, conversation, &client.trace_id);
    assert!(
        lines >= 1,
        "no JSON log line inside request {conversation}; the log:\n{}",
        log.join("\n")
    );
    let identified = request_lines(&log, conversation).iter().any(|line| {
        // In a `caller` span; the value itself is masked here: guest's password is guest.
        let line = line.to_string();
        line.contains(r#""name":"caller""#) && line.contains(r#""user_id":"#)
    });
    assert!(identified, "the log shows the caller: {}", log.join("\n"));
    for span in &spans {
        assert!(
            span.attr("user_id").is_none() && span.texts().iter().all(|t| *t != "guest"),
            "a user name in an exported span: {span:?}"
        );
    }
    delete_queue(&queue).await;
}

#[tokio::test]
async fn a_pika_call_with_a_traceparent_continues_its_trace() {
    let receiver = Receiver::start().await;
    let queue = unique_queue("otel-pika");
    let daemon = TracedDaemon::start(&queue, &receiver).await;

    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let parent_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let traceparent = format!("00-{trace_id}-{parent_id}-01");
    let mut cmd = Command::new("python3");
    cmd.arg(foreign::interop_dir().join("traced_client.py"))
        .env("RPC_TIMEOUT_S", "20")
        // The second call as the tutorial's client makes it: no `type`, answered by the
        // default method, whose name the span takes.
        .args([traceparent.as_str(), "10", "-", "=10"]);
    foreign::point_at(&mut cmd, &queue);
    let out = tokio::time::timeout(LIMIT, cmd.output())
        .await
        .expect("the pika client exits in time")
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}\n({})",
        text(&out.stdout),
        text(&out.stderr),
        foreign::DEPS_HINT
    );
    let replies: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    assert_eq!(replies.len(), 2, "{replies:?}");
    for reply in &replies {
        assert_eq!(reply["body"], "55", "{reply}");
        assert!(reply["error_code"].is_null(), "{reply}");
    }
    let correlation = |i: usize| replies[i]["correlation_id"].as_str().unwrap().to_owned();
    let (traced, untraced) = (correlation(0), correlation(1));

    let spans = receiver
        .wait_for(
            LIMIT,
            "the daemon's server spans of both calls, the first one's handler span",
            |spans| {
                server_of(spans, &traced).is_some_and(|s| handler_of(spans, s).is_some())
                    && server_of(spans, &untraced).is_some()
            },
        )
        .await;

    // The caller's trace, continued: its trace id, its span as the parent.
    let server = server_of(&spans, &traced).unwrap();
    assert_eq!(server.name, "fib", "{server:?}");
    assert_eq!(server.trace_id, trace_id, "{server:?}");
    assert_eq!(server.parent_span_id, parent_id, "{server:?}");
    assert_attrs(
        server,
        &[
            ("rpc.method", "fib"),
            ("messaging.rabbitmq.destination.routing_key", &queue),
            ("rpc.response.status_code", "ok"),
        ],
    );
    let handler = handler_of(&spans, server).unwrap();
    assert_eq!(handler.trace_id, trace_id);
    // ... and carried back in the reply.
    let reply_tp = replies[0]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("a traceparent on the reply: {}", replies[0]));
    assert_eq!(parse_traceparent(reply_tp).0, trace_id, "the reply's trace");

    // No trace context: the daemon starts a new trace.
    let fresh = server_of(&spans, &untraced).unwrap();
    assert!(
        fresh.is_root(),
        "a new trace starts at the daemon: {fresh:?}"
    );
    // Untyped, as the tutorial's client sends it: named after the default method.
    assert_eq!(fresh.name, "fib", "{fresh:?}");
    assert_attrs(fresh, &[("rpc.method", "fib")]);
    assert!(is_hex(&fresh.trace_id, 32), "{fresh:?}");
    assert_ne!(fresh.trace_id, "0".repeat(32));
    assert_ne!(fresh.trace_id, trace_id, "a fresh trace id");
    assert_ne!(fresh.trace_id, server.trace_id);
    let reply_tp = replies[1]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("a traceparent on the reply: {}", replies[1]));
    assert_eq!(
        parse_traceparent(reply_tp).0,
        fresh.trace_id,
        "the reply's trace"
    );
    assert_no_secret(&spans);
    daemon.stop().await;
    delete_queue(&queue).await;
}

// The receiver itself, with the real SDK and OTLP/HTTP exporter (no broker, no binaries).

/// Export over https to a collector whose certificate a private CA signed: spans arrive when
/// the CA is trusted (`SSL_CERT_FILE`, read by the system trust store's loader), and never
/// when it is not.
#[tokio::test]
async fn spans_go_over_https_to_a_collector_the_system_trusts() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique_queue("otlp-tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            text(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=amqp-rpc test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "sink.key",
        "-out",
        "sink.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "sink.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "sink.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    let mut sink = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/interop/otlp_tls_sink.py"
        ))
        .args([dir.join("sink.crt"), dir.join("sink.key")])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut lines = BufReader::new(sink.stdout.take().unwrap()).lines();
    let port = tokio::time::timeout(LIMIT, lines.next_line())
        .await
        .expect("the sink starts")
        .unwrap()
        .and_then(|l| l.strip_prefix("listening ").map(str::to_owned))
        .expect("the sink's port");
    let queue = unique_queue("otel-tls");
    let call = |trusted: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_amqp-rpc"));
        without_otel(&mut cmd)
            .env_remove("SSL_CERT_FILE")
            .env("OTEL_TRACES_EXPORTER", "otlp")
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("https://localhost:{port}"),
            )
            .env("AMQP_URL", amqp_url())
            .args(["call", "fib", "1", "--no-retry", "--queue", &queue]);
        match trusted {
            true => cmd.env("SSL_CERT_FILE", dir.join("ca.crt")),
            // A path of its own: if its spans got through, the sink would say so.
            false => cmd.env(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                format!("https://localhost:{port}/untrusted"),
            ),
        };
        async move {
            tokio::time::timeout(LIMIT, cmd.output())
                .await
                .expect("exits")
                .unwrap()
        }
    };
    // No daemon serves the queue: the call fails at once (no server; --no-retry, so it is
    // not retried into a timeout on a loaded machine), and its spans still go out when the
    // CLI exits.
    let untrusted = call(false).await;
    assert_eq!(
        untrusted.status.code(),
        Some(3),
        "{}",
        text(&untrusted.stderr)
    );
    let trusted = call(true).await;
    assert_eq!(trusted.status.code(), Some(3), "{}", text(&trusted.stderr));
    // The sink prints a line per export it answered, in order: the first is the trusted
    // CLI's, so the untrusted one (which exited before the trusted one started, after its
    // attempts) got nothing through.
    let first = tokio::time::timeout(LIMIT, lines.next_line())
        .await
        .expect("an export over https")
        .unwrap()
        .expect("the sink is alive");
    assert!(first.starts_with("POST /v1/traces "), "{first}");
    let _ = sink.kill().await;
}

/// `--check-config` checks the `OTEL_*` variables as it checks keys: each bad one named, exit
/// 64; good ones pass. The CLI refuses bad ones with its usage code before calling.
#[tokio::test]
async fn check_config_checks_the_otel_variables() {
    let run = |bin: &'static str, args: &'static [&'static str], vars: &'static [(&str, &str)]| async move {
        let mut cmd = Command::new(match bin {
            DAEMON => env!("CARGO_BIN_EXE_amqp-rpcd"),
            _ => env!("CARGO_BIN_EXE_amqp-rpc"),
        });
        without_otel(&mut cmd).args(args).envs(vars.iter().copied());
        tokio::time::timeout(LIMIT, cmd.output())
            .await
            .expect("exits")
            .expect("runs")
    };
    let bad: &[(&str, &str)] = &[
        ("OTEL_TRACES_EXPORTER", "zipkin"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://user:hunter2@collector:4318",
        ),
    ];
    let out = run(DAEMON, &["--check-config"], bad).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    for var in [
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_TRACES_SAMPLER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        assert!(err.contains(var), "{var} not named: {err}");
    }
    assert!(!err.contains("hunter2"), "{err}");
    let good: &[(&str, &str)] = &[
        ("OTEL_TRACES_EXPORTER", "otlp"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
    ];
    let out = run(DAEMON, &["--check-config"], good).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = run(CLI, &["call", "fib", "1", "--timeout", "1s"], bad).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("OTEL_TRACES_EXPORTER"));
}

#[tokio::test]
async fn receiver_gets_spans_exported_by_the_sdk() {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry::trace::{Span as _, SpanKind as Kind, Status, TraceContextExt, Tracer as _};
    use opentelemetry::{Context, KeyValue};
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use opentelemetry_sdk::Resource;

    let receiver = Receiver::start().await;
    let url = receiver.traces_url();
    // The simple processor exports with the blocking HTTP client as each span ends: not on a
    // tokio worker thread.
    tokio::task::spawn_blocking(move || {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(url)
            .build()
            .expect("exporter");
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter)
            .with_resource(
                Resource::builder_empty()
                    .with_service_name("receiver-test")
                    .build(),
            )
            .build();
        let tracer = provider.tracer("receiver-scope");
        let outer = tracer
            .span_builder("outer")
            .with_kind(Kind::Client)
            .with_attributes([
                KeyValue::new("s", "text"),
                KeyValue::new("i", 42_i64),
                KeyValue::new("b", true),
                KeyValue::new("d", 1.5),
            ])
            .start(&tracer);
        let cx = Context::new().with_span(outer);
        let mut inner = tracer.start_with_context("inner", &cx);
        inner.set_status(Status::error("boom"));
        inner.end();
        cx.span().end();
        provider.shutdown().expect("provider shuts down");
    })
    .await
    .unwrap();

    let spans = receiver
        .wait_for(LIMIT, "two spans of receiver-test", |spans| {
            spans.len() >= 2
        })
        .await;
    assert_eq!(spans.len(), 2, "{spans:?}");
    let outer = one(&spans, "outer", |s| s.name == "outer");
    let inner = one(&spans, "inner", |s| s.name == "inner");
    for span in [outer, inner] {
        assert_eq!(span.service, "receiver-test");
        assert_eq!(span.scope, "receiver-scope");
        assert!(
            is_hex(&span.trace_id, 32) && is_hex(&span.span_id, 16),
            "{span:?}"
        );
    }
    assert_eq!(outer.kind, SpanKind::Client);
    assert!(outer.is_root());
    assert_attrs(
        outer,
        &[("s", "text"), ("i", "42"), ("b", "true"), ("d", "1.5")],
    );
    assert_eq!(outer.status_code, 0, "unset");
    assert_eq!(inner.kind, SpanKind::Internal);
    assert_eq!(inner.trace_id, outer.trace_id);
    assert_eq!(inner.parent_span_id, outer.span_id);
    assert_eq!(
        (inner.status_code, inner.status_message.as_str()),
        (STATUS_ERROR, "boom")
    );
    assert!(inner.attributes.is_empty(), "{inner:?}");
}

#[tokio::test]
async fn receiver_refuses_a_compressed_body_loudly() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let receiver = Arc::new(Receiver::start().await);
    let addr = receiver.endpoint().trim_start_matches("http://").to_owned();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /v1/traces HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-protobuf\r\n\
          Content-Encoding: gzip\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .await
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 415"), "{answer}");

    let waiter = tokio::spawn({
        let receiver = receiver.clone();
        async move { receiver.wait_for(LIMIT, "nothing", |_| false).await }
    });
    let panic = waiter.await.expect_err("the wait panics").into_panic();
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("Content-Encoding \"gzip\""), "{message}");
}
