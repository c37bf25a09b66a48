//! Where lapin's socket loop runs (`amqp.io_thread`): as a task of the runtime by default, so
//! neither the daemon nor the client starts lapin's I/O thread, and on that thread when asked.
//! Both modes answer calls. One connecting test per file: it counts this process's threads by
//! name.
//!
//! The option comes from the vendored lapin, which this workspace patches in and a dependent's
//! workspace does not (`build.rs` detects it; `tests/outside_crate.rs` covers the dependent).
//! Here it must be detected, or every test of the suite would quietly run on lapin's thread.

mod common;

use std::time::Duration;

use amqp_rpc::config::AmqpConfig;
use amqp_rpc::Client;
use common::fib::fib_decimal;
use common::*;

/// lapin names its I/O thread so (std::thread::Builder::name; /proc shows up to 15 bytes).
const IO_THREAD: &str = "lapin-io-loop";

/// This process's threads named [`IO_THREAD`].
fn io_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == IO_THREAD)
        .count()
}

/// Start a daemon and a client with `io_thread`, check 40 answers, and return the number of
/// lapin I/O threads seen while both were connected.
async fn answers_with(io_thread: bool) -> usize {
    let queue = unique_queue("ioloop");
    let amqp = AmqpConfig {
        url: amqp_url(),
        io_thread,
        ..AmqpConfig::default()
    };
    let mut config = test_config(&queue);
    config.amqp = amqp.clone();
    let daemon = TestDaemon::start(config).await;
    let client = Client::builder(amqp_url())
        .amqp(amqp)
        .queue(&queue)
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("client connects");
    for n in 0..40u64 {
        let got = client.call("fib", n.to_string().as_bytes()).await;
        assert_eq!(
            got.expect("fib answers"),
            fib_decimal(n).as_bytes(),
            "fib({n})"
        );
    }
    let seen = io_threads();
    daemon.expect_requests("fib", "ok", 40).await;
    drop(client);
    daemon.stop().await.expect("clean stop");
    delete_queue(&queue).await;
    seen
}

#[test]
fn this_workspace_builds_against_the_patched_lapin() {
    assert!(
        amqp_rpc::amqp::io_loop_on_runtime_available(),
        "build.rs did not see DEP_LAPIN_IO_LOOP_ON_RUNTIME_IO_LOOP_ON_RUNTIME: is \
         [patch.crates-io] lapin = vendor/lapin still in Cargo.toml, and does vendor/lapin \
         still declare `links` and print the metadata key (vendor/README.md)?"
    );
    assert!(amqp_rpc::amqp::io_loop_on_runtime(&AmqpConfig::default()));
}

#[tokio::test]
async fn the_socket_loop_runs_on_the_runtime_unless_io_thread_is_set() {
    assert_eq!(io_threads(), 0, "no connection yet");
    assert_eq!(
        answers_with(false).await,
        0,
        "io_thread = false: the daemon's and the client's connections start no I/O thread"
    );
    // Both the daemon and the client connect: at least two threads of lapin's own.
    let threads = answers_with(true).await;
    assert!(
        threads >= 2,
        "io_thread = true: one I/O thread per connection, saw {threads}"
    );
}
