//! Interop with the RabbitMQ tutorial's own Python pika programs (tests/interop/*.py, kept as
//! the tutorial wrote them): their client against our daemon, our client against their server,
//! and our daemon and their server on one queue (helpers in `tests/common/foreign.rs`).

mod common;
#[path = "common/foreign.rs"]
mod foreign;

use std::time::{Duration, Instant};

use common::*;
use foreign::*;
use tokio::process::Command;

fn python(script: &str, queue: &str) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(interop_dir().join(script))
        .env("RPC_TIMEOUT_S", "20");
    point_at(&mut cmd, queue);
    cmd
}

#[tokio::test]
async fn tutorial_client_gets_exact_answers_from_amqp_rpcd() {
    let queue = unique_queue("pika-client");
    let daemon = TestDaemon::start(test_config(&queue)).await;
    let out = python("tutorial_client.py", &queue)
        .args(["30", "100"])
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("fib(30) = 832040"), "{stdout}");
    assert!(
        stdout.contains("fib(100) = 354224848179261915075"),
        "{stdout}"
    );
    daemon.expect_requests("fib", "ok", 2).await;
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn tutorial_client_fails_loudly_on_an_error_reply_instead_of_hanging() {
    let queue = unique_queue("pika-bad");
    let daemon = TestDaemon::start(test_config(&queue)).await;
    let t0 = Instant::now();
    let out = python("tutorial_client.py", &queue)
        .arg("abc")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // int(body) raised on our one-line message: the reply arrived (the 20 s alarm did not fire).
    assert!(
        stderr.contains("ValueError") && stderr.contains("invalid argument"),
        "{stderr}"
    );
    assert!(t0.elapsed() < Duration::from_secs(15));
    daemon.expect_requests("fib", "invalid_argument", 1).await;
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn amqp_rpc_calls_the_tutorial_server() {
    let queue = unique_queue("pika-server");
    let mut server = TheirServer::start(Lang::Pika, &queue).await;

    let out = Command::new(env!("CARGO_BIN_EXE_amqp-rpc"))
        .args(["call", "fib", "20", "--queue", &queue, "--url", &amqp_url()])
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "6765");

    let client = client(&queue, Duration::from_secs(10)).await;
    assert_eq!(fib(&client, 25).await.unwrap().to_string(), "75025");
    server.child.kill().await.unwrap();
    delete_queue(&queue).await;
}

/// Started first, the tutorial server declares its classic non-durable queue; amqp-rpcd on its
/// default config serves that queue beside it.
#[tokio::test]
async fn amqp_rpcd_shares_the_tutorial_servers_queue() {
    amqp_rpcd_joins_their_server(Lang::Pika).await;
}

/// Started after amqp-rpcd, the tutorial server's non-durable declaration is refused: the
/// daemon never declares a non-durable queue, so this server must start first.
#[tokio::test]
async fn tutorial_server_dies_after_amqp_rpcd_on_a_classic_queue() {
    their_server_dies_after_amqp_rpcd_on_classic(Lang::Pika).await;
}

/// Two client processes, one after the other, on one named reply queue, both with
/// correlation id "1" for every call (a counter that restarts, or one id kept for every call):
/// each gets the answer to its own request, never the reply cached for the earlier one.
#[tokio::test]
async fn reused_correlation_ids_never_get_another_requests_reply() {
    let queue = unique_queue("reused-ids");
    let replies = unique_queue("reused-ids-replies");
    // A named reply queue is answered once `service.reply_to` lists it.
    let mut config = test_config(&queue);
    config.service.reply_to = format!("amq.rabbitmq.reply-to.*, amq.gen-*, {replies}");
    let daemon = TestDaemon::start(config).await;
    let run = |args: &'static [&'static str]| {
        let mut cmd = python("reused_ids_client.py", &queue);
        cmd.env("REPLY_QUEUE", &replies).args(args);
        async move {
            let out = cmd.output().await.expect("python3 runs");
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "stdout: {stdout}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            stdout.lines().map(str::to_owned).collect::<Vec<_>>()
        }
    };
    assert_eq!(run(&["fib", "10"]).await, ["55"]);
    // The second process repeats the first one's ids with other requests.
    let second = run(&["fib", "30", "no_such_method", "7", "fib", "10"]).await;
    assert_eq!(second.len(), 3, "{second:?}");
    assert_eq!(second[0], "832040");
    assert!(
        second[1].starts_with("error unknown_method: unknown method \"no_such_method\""),
        "{second:?}"
    );
    assert_eq!(second[2], "55");
    // Three new calls of fib(10) (one from the first process, two reusing its ids), each computed.
    daemon.expect_requests("fib", "ok", 3).await;
    assert_eq!(
        daemon.metrics.replays.get(),
        0,
        "no reply came from the cache"
    );
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
    delete_queue(&replies).await;
}
