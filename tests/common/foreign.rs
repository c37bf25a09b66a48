//! The RabbitMQ tutorials' RPC programs as child processes, for `tests/interop.rs` (pika,
//! `tests/interop/*.py`) and `tests/interop_langs.rs` (`tests/interop/<lang>/`): how each one
//! runs, the queue its server declares, a server's log and liveness, and the checks that
//! amqp-rpcd and a tutorial server share one service queue (README, "Sharing a queue with a
//! tutorial server").
//!
//! Those two test files include it with `#[path = "common/foreign.rs"] mod foreign;`, next to
//! `mod common;`.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_rpc::config::QueueType;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::common::*;

pub const DEPS_HINT: &str = "install the interop runtimes with deploy/local/interop-deps.sh \
                             (pika: deploy/local/test.sh)";

/// How long a tutorial server may take to get ready, or to die.
const SERVER_LIMIT: Duration = Duration::from_secs(15);

/// Host and port of the test broker, for the foreign programs.
pub fn broker_host_port() -> (String, u16) {
    let url = amqp_url();
    let uri: lapin::uri::AMQPUri = url
        .split(',')
        .next()
        .unwrap()
        .parse()
        .expect("AMQP_URL parses");
    (uri.authority.host, uri.authority.port)
}

/// Where the tutorial programs are.
pub fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// Where interop-deps.sh keeps what it installs outside the repository.
fn interop_cache() -> PathBuf {
    std::env::var_os("AMQP_RPC_INTEROP_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/amqp-rpc".into())
}

/// Point a tutorial program at the test broker and `queue`; killed when dropped.
pub fn point_at<'a>(cmd: &'a mut Command, queue: &str) -> &'a mut Command {
    let (host, port) = broker_host_port();
    cmd.env("AMQP_HOST", host)
        .env("AMQP_PORT", port.to_string())
        .env("RPC_QUEUE", queue)
        .stdin(Stdio::null())
        .kill_on_drop(true)
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Lang {
    /// The seed documents' Python programs (`tests/interop/tutorial_*.py`).
    Pika,
    Perl,
    Node,
    Php,
    Ruby,
    Go,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Program {
    Client,
    Server,
}

impl Program {
    fn role(self) -> &'static str {
        match self {
            Program::Client => "client",
            Program::Server => "server",
        }
    }
}

impl Lang {
    pub fn name(self) -> &'static str {
        match self {
            Lang::Pika => "pika",
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
    pub fn client_takes_many(self) -> bool {
        matches!(self, Lang::Perl | Lang::Pika)
    }

    /// Whether its server declares the queue durable and quorum, as today's tutorials do (the
    /// others declare it classic and non-durable).
    pub fn declares_quorum(self) -> bool {
        !matches!(self, Lang::Pika | Lang::Perl)
    }

    /// The queue declaration its server makes.
    fn queue_shape(self) -> (QueueDeclareOptions, FieldTable) {
        if !self.declares_quorum() {
            return (QueueDeclareOptions::default(), FieldTable::default());
        }
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        (QueueDeclareOptions::durable(), args)
    }

    /// The command running `program` on `queue`, killed when dropped (Go's is compiled first).
    pub async fn command(self, program: Program, queue: &str) -> Command {
        let script = |ext: &str| {
            interop_dir()
                .join(self.name())
                .join(format!("rpc_{}.{ext}", program.role()))
        };
        let mut cmd = match self {
            Lang::Pika => {
                let mut c = Command::new("python3");
                c.arg(interop_dir().join(format!("tutorial_{}.py", program.role())));
                c
            }
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
        point_at(&mut cmd, queue);
        cmd
    }
}

/// Compile the Go tutorial program in GOPATH mode against Debian's amqp091-go; the binary's
/// path. Tests run in parallel: each builds to a file named after its queue, then renames it
/// into place (a running binary keeps its old file).
async fn go_build(program: Program, tag: &str) -> PathBuf {
    let stem = format!("rpc_{}", program.role());
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("interop-go");
    std::fs::create_dir_all(&out_dir).unwrap();
    let bin = out_dir.join(&stem);
    let fresh = out_dir.join(format!("{stem}.{tag}.tmp"));
    let gopath = std::env::var("AMQP_RPC_INTEROP_GOPATH").unwrap_or("/usr/share/gocode".into());
    let out = Command::new("go")
        .arg("build")
        .arg("-o")
        .arg(&fresh)
        .arg(format!("./tests/interop/go/{stem}"))
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
        "go build {stem} failed ({DEPS_HINT}):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&fresh, &bin).unwrap();
    bin
}

/// The tutorial's server as a child process, its stdout and stderr collected (and echoed to
/// the test's stderr).
pub struct TheirServer {
    pub lang: Lang,
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Lines read so far; closed once both pipes are drained.
    lines: watch::Receiver<usize>,
}

impl TheirServer {
    /// Start it on `queue` and wait until it prints its ready line and consumes the queue.
    pub async fn start(lang: Lang, queue: &str) -> Self {
        Self::start_beside(lang, queue, 0).await
    }

    /// Like [`TheirServer::start`] on a queue that `others` consumers consume already.
    pub async fn start_beside(lang: Lang, queue: &str, others: u32) -> Self {
        let mut server = Self::spawn(lang, queue).await;
        server.wait_ready().await;
        // Some print the ready line before their consume is in place (Ruby's before it even
        // declares the queue): wait for the broker to show the consumer.
        wait_for_consumers(queue, others + 1, &server).await;
        server
    }

    /// Start it on `queue`, without waiting for anything.
    pub async fn spawn(lang: Lang, queue: &str) -> Self {
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
        TheirServer {
            lang,
            child,
            log,
            lines,
        }
    }

    async fn wait_ready(&mut self) {
        let (ready, log) = (self.lang.ready_line(), self.log.clone());
        let seen = tokio::time::timeout(
            SERVER_LIMIT,
            self.lines
                .wait_for(|_| log.lock().unwrap().iter().any(|l| l.contains(ready))),
        )
        .await
        .map(|r| r.is_ok());
        match seen {
            Ok(true) => {}
            Ok(false) => panic!(
                "{} tutorial server ended before it was ready ({DEPS_HINT}?):\n{}",
                self.lang.name(),
                self.log_text()
            ),
            Err(_) => panic!(
                "{} tutorial server not ready in {SERVER_LIMIT:?}:\n{}",
                self.lang.name(),
                self.log_text()
            ),
        }
    }

    /// Wait until it exits; its status, with the whole log read.
    pub async fn exit(&mut self) -> ExitStatus {
        let status = tokio::time::timeout(SERVER_LIMIT, self.child.wait()).await;
        let Ok(status) = status else {
            panic!(
                "{} tutorial server still runs after {SERVER_LIMIT:?}:\n{}",
                self.lang.name(),
                self.log_text()
            )
        };
        let _ = tokio::time::timeout(SERVER_LIMIT, async {
            while self.lines.changed().await.is_ok() {}
        })
        .await;
        status.unwrap()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Panic unless the process still runs.
    pub fn assert_alive(&mut self, after: &str) {
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

/// Wait until the broker shows `n` consumers on `queue` (a passive declare per look, on a
/// fresh channel since a failed one closes it).
async fn wait_for_consumers(queue: &str, n: u32, server: &TheirServer) {
    let conn = raw_connection().await;
    let give_up = tokio::time::Instant::now() + SERVER_LIMIT;
    loop {
        let ch = conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await;
        if matches!(&q, Ok(q) if q.consumer_count() >= n) {
            let _ = ch.close(200, "bye".into()).await;
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "{} tutorial server: fewer than {n} consumers on {queue} after {SERVER_LIMIT:?} \
             ({q:?}):\n{}",
            server.lang.name(),
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = conn.close(200, "bye".into()).await;
}

// ---- amqp-rpcd and a tutorial server on one queue ----

/// fib(n) by its definition, to check answers with (exact in u128 for n <= 186).
fn fib_u128(n: u64) -> u128 {
    let (mut a, mut b) = (0u128, 1u128);
    for _ in 0..n {
        (a, b) = (b, a + b);
    }
    a
}

/// Calls made while both serve the queue.
const SHARED_CALLS: u64 = 20;

/// Both consume `queue`: [`SHARED_CALLS`] calls of fib through our library client, one after
/// the other so the broker alternates between the two, with 20 distinct n of 0..=25 in a
/// scrambled order (the tutorial servers compute fib recursively: nothing larger). Every
/// answer is right, both still run afterwards, the tutorial's own declaration still succeeds
/// (the queue was not changed), and each of the two answered some: the daemon's count is
/// final once it has drained, the tutorial server answered the rest.
async fn calls_are_shared(daemon: TestDaemon, mut server: TheirServer, queue: &str) {
    let lang = server.lang.name();
    let client = client(queue, Duration::from_secs(5)).await;
    for i in 0..SHARED_CALLS {
        let n = i * 7 % 26;
        let got = fib(&client, n).await;
        assert!(
            matches!(&got, Ok(v) if v.to_string() == fib_u128(n).to_string()),
            "Client::fib({n}) with amqp-rpcd and the {lang} tutorial server on one queue: \
             {got:?}, want {}\nserver log:\n{}",
            fib_u128(n),
            server.log_text()
        );
    }
    server.assert_alive("the shared calls");
    assert!(
        !daemon.task.is_finished(),
        "amqp-rpcd exited while sharing the queue with the {lang} tutorial server"
    );

    let conn = raw_connection().await;
    let (options, args) = server.lang.queue_shape();
    let ch = conn.create_channel().await.unwrap();
    let again = ch.queue_declare(queue.into(), options, args).await;
    assert!(
        again.is_ok(),
        "the {lang} tutorial's declaration of {queue} is refused now: {again:?}"
    );
    let _ = conn.close(200, "bye".into()).await;

    let ours = daemon.metrics.request("fib", "ok");
    daemon.stop().await.unwrap();
    assert!(
        (1..SHARED_CALLS).contains(&ours.get()),
        "amqp-rpcd answered {} of {SHARED_CALLS} calls: both should have answered some\n\
         server log:\n{}",
        ours.get(),
        server.log_text()
    );
    server.child.kill().await.unwrap();
}

/// Started first, the tutorial server declares the queue in its shape; amqp-rpcd on the
/// default config (`declare = "auto"`, `queue_type = "classic"`) becomes ready serving that
/// queue as it is, and the two split the requests.
pub async fn amqp_rpcd_joins_their_server(lang: Lang) {
    let queue = unique_queue(&format!("{}-first", lang.name()));
    let server = TheirServer::start(lang, &queue).await;
    let daemon = TestDaemon::start(test_config(&queue)).await;
    calls_are_shared(daemon, server, &queue).await;
    delete_queue(&queue).await;
}

/// With `queue_type = "quorum"`, amqp-rpcd declares the queue as today's tutorials do, so such
/// a tutorial server started after it declares the same queue and consumes it beside it.
pub async fn their_server_joins_amqp_rpcd_on_quorum(lang: Lang) {
    assert!(lang.declares_quorum(), "{lang:?} declares a classic queue");
    let queue = unique_queue(&format!("{}-after-quorum", lang.name()));
    let mut config = test_config(&queue);
    config.service.queue_type = QueueType::Quorum;
    let daemon = TestDaemon::start(config).await;
    let server = TheirServer::start_beside(lang, &queue, 1).await;
    calls_are_shared(daemon, server, &queue).await;
    delete_queue(&queue).await;
}

/// The documented limitation: started after amqp-rpcd on its default (a durable classic
/// queue), a tutorial server's declaration is refused with PRECONDITION_FAILED and it dies;
/// the daemon serves on.
pub async fn their_server_dies_after_amqp_rpcd_on_classic(lang: Lang) {
    let queue = unique_queue(&format!("{}-after-classic", lang.name()));
    let daemon = TestDaemon::start(test_config(&queue)).await;
    let mut server = TheirServer::spawn(lang, &queue).await;
    let status = server.exit().await;
    assert!(
        !status.success() && server.log_text().contains("PRECONDITION_FAILED"),
        "{} tutorial server after amqp-rpcd on a classic queue: {status}, want a death by \
         PRECONDITION_FAILED:\n{}",
        lang.name(),
        server.log_text()
    );
    let client = client(&queue, Duration::from_secs(5)).await;
    assert_eq!(fib(&client, 30).await.unwrap().to_string(), "832040");
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}
