//! Interop with the RabbitMQ tutorials' RPC programs in other languages and AMQP libraries
//! (tests/interop/<lang>/, each a copy of the tutorial's rpc_client and rpc_server; see their
//! header comments): their client against our daemon, our client against their server.
//!
//! | lang | library | server's queue |
//! |---|---|---|
//! | perl | AnyEvent::RabbitMQ / Net::AMQP | classic, non-durable |
//! | node | amqplib 0.10.9 | durable quorum |
//! | php | php-amqplib | durable quorum |
//! | ruby | bunny | durable quorum |
//! | go | amqp091-go | durable quorum |
//!
//! The runtimes and libraries come from `deploy/local/interop-deps.sh`. A missing one fails
//! its tests (never skips them), naming that script.
//!
//! Perl's Net::AMQP decodes only a few AMQP field types (`S`, `I`, `D`, `T`, `t`, `F`, `A`,
//! `V`): a header of any other type (a 64-bit `l`, say) makes it die inside its frame reader,
//! which leaves the tutorial's Perl server deaf (under EV) or dead. So the Perl server test is
//! also the check that nothing our client sends needs more than those.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// The answers every test checks.
const FIBS: &[(&str, &str)] = &[("30", "832040"), ("0", "0"), ("1", "1")];

/// How long one foreign client run may take.
const CLIENT_LIMIT: Duration = Duration::from_secs(15);

/// Host and port of the test broker, for the foreign programs.
fn broker_host_port() -> (String, u16) {
    let url = amqp_url();
    let uri: lapin::uri::AMQPUri = url
        .split(',')
        .next()
        .unwrap()
        .parse()
        .expect("AMQP_URL parses");
    (uri.authority.host, uri.authority.port)
}

/// Where interop-deps.sh keeps what it installs outside the repository.
fn interop_cache() -> PathBuf {
    std::env::var_os("AMQP_RPC_INTEROP_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/amqp-rpc".into())
}

const DEPS_HINT: &str = "install the interop runtimes with deploy/local/interop-deps.sh";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Lang {
    Perl,
    Node,
    Php,
    Ruby,
    Go,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Program {
    Client,
    Server,
}

impl Program {
    fn stem(self) -> &'static str {
        match self {
            Program::Client => "rpc_client",
            Program::Server => "rpc_server",
        }
    }
}

impl Lang {
    fn name(self) -> &'static str {
        match self {
            Lang::Perl => "perl",
            Lang::Node => "node",
            Lang::Php => "php",
            Lang::Ruby => "ruby",
            Lang::Go => "go",
        }
    }

    /// The tutorial's server prints this once it has set up (Go's on stderr, through `log`).
    fn ready_line(self) -> &'static str {
        match self {
            Lang::Go => " [*] Awaiting RPC requests",
            _ => " [x] Awaiting RPC requests",
        }
    }

    /// Whether the tutorial's client takes several values of n in one run (the Perl one asks
    /// for two in a row); the others ask for one per run.
    fn client_takes_many(self) -> bool {
        self == Lang::Perl
    }

    /// The command running `program` on `queue`, killed when dropped (Go's is compiled first).
    async fn command(self, program: Program, queue: &str) -> Command {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
        let script = |ext: &str| {
            dir.join(self.name())
                .join(format!("{}.{ext}", program.stem()))
        };
        let mut cmd = match self {
            Lang::Perl => {
                let mut c = Command::new("perl");
                c.arg(script("pl"));
                c
            }
            Lang::Node => {
                let mut c = Command::new("node");
                c.arg(script("js"))
                    .env("NODE_PATH", interop_cache().join("npm/node_modules"));
                c
            }
            Lang::Php => {
                let mut c = Command::new("php");
                c.arg(script("php"));
                c
            }
            Lang::Ruby => {
                let mut c = Command::new("ruby");
                c.arg(script("rb"));
                c
            }
            Lang::Go => Command::new(go_build(program, queue).await),
        };
        let (host, port) = broker_host_port();
        cmd.env("AMQP_HOST", host)
            .env("AMQP_PORT", port.to_string())
            .env("RPC_QUEUE", queue)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }
}

/// Compile the Go tutorial program in GOPATH mode against Debian's amqp091-go; the binary's
/// path. Tests run in parallel: each builds to a file named after its queue, then renames it
/// into place (a running binary keeps its old file).
async fn go_build(program: Program, tag: &str) -> PathBuf {
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("interop-go");
    std::fs::create_dir_all(&out_dir).unwrap();
    let bin = out_dir.join(program.stem());
    let fresh = out_dir.join(format!("{}.{tag}.tmp", program.stem()));
    let gopath = std::env::var("AMQP_RPC_INTEROP_GOPATH").unwrap_or("/usr/share/gocode".into());
    let out = Command::new("go")
        .arg("build")
        .arg("-o")
        .arg(&fresh)
        .arg(format!("./tests/interop/go/{}", program.stem()))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("GO111MODULE", "off")
        .env("GOPATH", gopath)
        .env("GOCACHE", interop_cache().join("go-build"))
        .env("GOFLAGS", "")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("go build runs ({e}); {DEPS_HINT}"));
    assert!(
        out.status.success(),
        "go build {} failed ({DEPS_HINT}):\n{}",
        program.stem(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&fresh, &bin).unwrap();
    bin
}

/// Run the tutorial's client for `ns` (several runs at once when it takes one n per run);
/// checks that each run exits 0 and prints the right answers.
async fn run_their_client(lang: Lang, queue: &str, ns: &[(&str, &str)]) {
    let runs: Vec<Vec<(&str, &str)>> = if lang.client_takes_many() {
        vec![ns.to_vec()]
    } else {
        ns.iter().map(|p| vec![*p]).collect()
    };
    // Built one after the other (Go compiles them), run all at once.
    let mut cmds = Vec::new();
    for run in &runs {
        let mut cmd = lang.command(Program::Client, queue).await;
        cmd.args(run.iter().map(|(n, _)| *n));
        cmds.push(cmd);
    }
    let runs = runs.into_iter().zip(cmds).map(|(run, mut cmd)| async move {
        let out = tokio::time::timeout(CLIENT_LIMIT, cmd.output())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} tutorial client for {run:?}: no exit within {CLIENT_LIMIT:?}",
                    lang.name()
                )
            })
            .unwrap_or_else(|e| panic!("{} runs ({e}); {DEPS_HINT}", lang.name()));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "{} tutorial client for {run:?}: {} (a library missing? {DEPS_HINT})\nstdout: {stdout}\nstderr: {stderr}",
            lang.name(),
            out.status
        );
        for (n, want) in &run {
            let line = format!("fib({n}) = {want}");
            assert!(
                stdout.lines().any(|l| l.trim() == line),
                "{} tutorial client: no line {line:?}\nstdout: {stdout}\nstderr: {stderr}",
                lang.name()
            );
        }
    });
    futures_util::future::join_all(runs).await;
}

/// Their client against amqp-rpcd (in-process), on a queue of the test's own.
async fn their_client_gets_exact_answers(lang: Lang, ns: &[(&str, &str)]) {
    let queue = unique_queue(&format!("{}-client", lang.name()));
    let daemon = TestDaemon::start(test_config(&queue)).await;
    run_their_client(lang, &queue, ns).await;
    daemon.expect_requests("fib", "ok", ns.len() as u64).await;
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

/// The tutorial's server as a child process, its stdout and stderr collected (and echoed to
/// the test's stderr).
struct TheirServer {
    lang: Lang,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    lines: watch::Receiver<usize>,
}

impl TheirServer {
    /// Start it on `queue` and wait until it prints its ready line and consumes the queue.
    async fn start(lang: Lang, queue: &str) -> Self {
        let mut child = lang
            .command(Program::Server, queue)
            .await
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{} runs ({e}); {DEPS_HINT}", lang.name()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = watch::channel(0);
        let tx = Arc::new(tx);
        drain(child.stdout.take().unwrap(), lang, log.clone(), tx.clone());
        drain(child.stderr.take().unwrap(), lang, log.clone(), tx);
        let mut server = TheirServer {
            lang,
            child,
            log,
            lines,
        };
        let ready = lang.ready_line();
        let log = server.log.clone();
        let seen = tokio::time::timeout(
            Duration::from_secs(15),
            server
                .lines
                .wait_for(|_| log.lock().unwrap().iter().any(|l| l.contains(ready))),
        )
        .await
        .map(|r| r.is_ok());
        match seen {
            Ok(true) => {}
            Ok(false) => panic!(
                "{} tutorial server ended before it was ready ({DEPS_HINT}?):\n{}",
                lang.name(),
                server.log_text()
            ),
            Err(_) => panic!(
                "{} tutorial server not ready in 15 s:\n{}",
                lang.name(),
                server.log_text()
            ),
        }
        // Some print the ready line before their consume is in place (Ruby's before it even
        // declares the queue): wait for the broker to show the consumer.
        wait_for_consumer(queue, &server).await;
        server
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Panic unless the process still runs.
    fn assert_alive(&mut self, after: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "{} tutorial server exited ({status}) after {after}:\n{}",
                self.lang.name(),
                self.log_text()
            );
        }
    }
}

fn drain(
    stream: impl AsyncRead + Unpin + Send + 'static,
    lang: Lang,
    log: Arc<Mutex<Vec<String>>>,
    tx: Arc<watch::Sender<usize>>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[{} server] {line}", lang.name());
            log.lock().unwrap().push(line);
            tx.send_modify(|n| *n += 1);
        }
    });
}

/// Wait until the broker shows a consumer on `queue` (a passive declare per look, on a fresh
/// channel since a failed one closes it).
async fn wait_for_consumer(queue: &str, server: &TheirServer) {
    let conn = raw_connection().await;
    let give_up = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let ch = conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        if matches!(&q, Ok(q) if q.consumer_count() > 0) {
            let _ = ch.close(200, "bye".into()).await;
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "{} tutorial server: no consumer on {queue} after 15 s:\n{}",
            server.lang.name(),
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// Our CLI and our library client against their server: right answers, and the server still
/// runs and answers after everything we sent.
async fn amqp_rpc_calls_their_server(lang: Lang) {
    let queue = unique_queue(&format!("{}-server", lang.name()));
    let mut server = TheirServer::start(lang, &queue).await;

    for (n, want) in FIBS {
        let out = Command::new(env!("CARGO_BIN_EXE_amqp-rpc"))
            .args(["call", "fib", n, "--timeout", "3s", "--queue", &queue])
            .args(["--url", &amqp_url()])
            .kill_on_drop(true)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.code() == Some(0) && String::from_utf8_lossy(&out.stdout).trim() == *want,
            "amqp-rpc call fib {n} against the {} tutorial server: {}, stdout {:?}, stderr {:?}\nserver log:\n{}",
            lang.name(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            server.log_text()
        );
        server.assert_alive(&format!("amqp-rpc call fib {n}"));
    }

    let client = client(&queue, Duration::from_secs(3)).await;
    for (n, want) in FIBS {
        let got = client.fib(n.parse().unwrap()).await;
        assert!(
            matches!(&got, Ok(v) if v.to_string() == *want),
            "Client::fib({n}) against the {} tutorial server: {got:?}\nserver log:\n{}",
            lang.name(),
            server.log_text()
        );
    }
    let raw = client.call("fib", b"25").await;
    assert!(
        matches!(&raw, Ok(body) if body == b"75025"),
        "Client::call(\"fib\", \"25\") against the {} tutorial server: {raw:?}\nserver log:\n{}",
        lang.name(),
        server.log_text()
    );
    server.assert_alive("the library client's calls");

    // Still answering, also a client other than ours.
    run_their_client(lang, &queue, &[("20", "6765")]).await;
    server.assert_alive("everything");

    server.child.kill().await.unwrap();
    delete_queue(&queue).await;
}

// ---- Perl: AnyEvent::RabbitMQ (the tutorial's Net::RabbitFoot is a front of it) ----

#[tokio::test]
async fn perl_tutorial_client_gets_exact_answers_from_amqp_rpcd() {
    their_client_gets_exact_answers(Lang::Perl, FIBS).await;
}

#[tokio::test]
async fn amqp_rpc_calls_the_perl_tutorial_server() {
    amqp_rpc_calls_their_server(Lang::Perl).await;
}

// ---- Node.js: amqplib ----

#[tokio::test]
async fn node_tutorial_client_gets_exact_answers_from_amqp_rpcd() {
    their_client_gets_exact_answers(Lang::Node, FIBS).await;
}

#[tokio::test]
async fn amqp_rpc_calls_the_node_tutorial_server() {
    amqp_rpc_calls_their_server(Lang::Node).await;
}

// ---- PHP: php-amqplib ----

/// Not fib(0): the tutorial's PHP client waits `while (!$this->response)`, and PHP takes the
/// reply "0" as false, so it never returns on fib(0), whoever answers (its own server too).
#[tokio::test]
async fn php_tutorial_client_gets_exact_answers_from_amqp_rpcd() {
    their_client_gets_exact_answers(Lang::Php, &[("30", "832040"), ("1", "1")]).await;
}

#[tokio::test]
async fn amqp_rpc_calls_the_php_tutorial_server() {
    amqp_rpc_calls_their_server(Lang::Php).await;
}

// ---- Ruby: bunny ----

#[tokio::test]
async fn ruby_tutorial_client_gets_exact_answers_from_amqp_rpcd() {
    their_client_gets_exact_answers(Lang::Ruby, FIBS).await;
}

#[tokio::test]
async fn amqp_rpc_calls_the_ruby_tutorial_server() {
    amqp_rpc_calls_their_server(Lang::Ruby).await;
}

// ---- Go: amqp091-go ----

#[tokio::test]
async fn go_tutorial_client_gets_exact_answers_from_amqp_rpcd() {
    their_client_gets_exact_answers(Lang::Go, FIBS).await;
}

#[tokio::test]
async fn amqp_rpc_calls_the_go_tutorial_server() {
    amqp_rpc_calls_their_server(Lang::Go).await;
}
