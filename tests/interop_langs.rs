//! Interop with the RabbitMQ tutorials' RPC programs in other languages and AMQP libraries
//! (tests/interop/<lang>/, each a copy of the tutorial's rpc_client and rpc_server; see their
//! header comments): their client against our daemon, our client against their server, and
//! our daemon and their server on one queue (README, "Sharing a queue with a tutorial
//! server"): their server first, then amqp-rpcd on its default config; amqp-rpcd first with
//! `queue_type = "quorum"`, then their (quorum) server; and the documented limitation, their
//! server after amqp-rpcd on a classic queue dies with PRECONDITION_FAILED. The helpers are in
//! `tests/common/foreign.rs`, shared with the pika tests in `tests/interop.rs`.
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
#[path = "common/foreign.rs"]
mod foreign;

use std::time::Duration;

use common::*;
use foreign::*;
use tokio::process::Command;

/// The answers every test checks.
const FIBS: &[(&str, &str)] = &[("30", "832040"), ("0", "0"), ("1", "1")];

/// How long one foreign client run may take.
const CLIENT_LIMIT: Duration = Duration::from_secs(15);

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
        let got = fib(&client, n.parse().unwrap()).await;
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

#[tokio::test]
async fn amqp_rpcd_shares_the_perl_tutorial_servers_queue() {
    amqp_rpcd_joins_their_server(Lang::Perl).await;
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

/// The Node server takes only 1 or 2 of the 20 calls (the others about 10): amqplib leaves
/// Nagle on (`noDelay` defaults to false), so its ack, written right after the reply, waits
/// for the broker's delayed TCP ACK (~40 ms). Until then it has no credit (prefetch 1) and the
/// broker gives every request to amqp-rpcd. With Nagle off it takes 10 of 20 too.
#[tokio::test]
async fn amqp_rpcd_shares_the_node_tutorial_servers_queue() {
    amqp_rpcd_joins_their_server(Lang::Node).await;
}

#[tokio::test]
async fn node_tutorial_server_shares_amqp_rpcds_quorum_queue() {
    their_server_joins_amqp_rpcd_on_quorum(Lang::Node).await;
}

#[tokio::test]
async fn node_tutorial_server_dies_after_amqp_rpcd_on_a_classic_queue() {
    their_server_dies_after_amqp_rpcd_on_classic(Lang::Node).await;
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

#[tokio::test]
async fn amqp_rpcd_shares_the_php_tutorial_servers_queue() {
    amqp_rpcd_joins_their_server(Lang::Php).await;
}

#[tokio::test]
async fn php_tutorial_server_shares_amqp_rpcds_quorum_queue() {
    their_server_joins_amqp_rpcd_on_quorum(Lang::Php).await;
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

#[tokio::test]
async fn amqp_rpcd_shares_the_ruby_tutorial_servers_queue() {
    amqp_rpcd_joins_their_server(Lang::Ruby).await;
}

#[tokio::test]
async fn ruby_tutorial_server_shares_amqp_rpcds_quorum_queue() {
    their_server_joins_amqp_rpcd_on_quorum(Lang::Ruby).await;
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

#[tokio::test]
async fn amqp_rpcd_shares_the_go_tutorial_servers_queue() {
    amqp_rpcd_joins_their_server(Lang::Go).await;
}

#[tokio::test]
async fn go_tutorial_server_shares_amqp_rpcds_quorum_queue() {
    their_server_joins_amqp_rpcd_on_quorum(Lang::Go).await;
}
