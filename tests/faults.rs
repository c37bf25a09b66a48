//! Network faults between a process and the broker, injected with the test proxy: the daemon
//! boots before the broker, survives cuts and blackholes; the client fails in-flight calls with
//! `ConnectionLost` and recovers. Every call's outcome is counted.

mod common;

use std::time::{Duration, Instant};

use amqp_rpc::service::Methods;
use amqp_rpc::CallError;
use common::proxy::{broker_addr, method_frames, Proxy};
use common::*;

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test]
async fn daemon_boots_before_the_broker_and_connects_when_it_appears() {
    let queue = unique_queue("boot");
    let addr = free_addr();
    let mut config = test_config(&queue);
    config.amqp.url = format!("amqp://{}@{addr}/%2f", credentials());
    let (daemon, mut ready) = TestDaemon::spawn(config, None).await;
    assert!(!*ready.borrow(), "nothing listens yet");
    // The broker "appears": a proxy to it starts listening on the daemon's address.
    let _proxy = Proxy::start(addr, broker_addr(&amqp_url())).await;
    readiness_becomes(
        &mut ready,
        true,
        Duration::from_secs(15),
        "ready once the broker is reachable",
    )
    .await;
    let client = client(&queue, Duration::from_secs(5)).await;
    assert_eq!(fib(&client, 12).await.unwrap().to_string(), "144");
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

/// `user:password` of the test broker URL.
fn credentials() -> String {
    let uri: lapin::uri::AMQPUri = amqp_url().parse().unwrap();
    format!(
        "{}:{}",
        uri.authority.userinfo.username, uri.authority.userinfo.password
    )
}

#[tokio::test]
async fn daemon_reconnects_after_a_network_cut() {
    let queue = unique_queue("cut");
    let proxy = Proxy::start(free_addr(), broker_addr(&amqp_url())).await;
    let mut config = test_config(&queue);
    config.amqp.url = proxy.url(&amqp_url());
    let (daemon, mut ready) = TestDaemon::spawn(config, None).await;
    readiness_becomes(&mut ready, true, Duration::from_secs(20), "daemon ready").await;
    let client = client(&queue, Duration::from_secs(10)).await;
    assert_eq!(fib(&client, 10).await.unwrap().to_string(), "55");

    proxy.cut_all();
    readiness_becomes(
        &mut ready,
        false,
        Duration::from_secs(10),
        "readiness drops on the cut",
    )
    .await;
    readiness_becomes(
        &mut ready,
        true,
        Duration::from_secs(10),
        "ready again after reconnecting",
    )
    .await;
    assert_eq!(daemon.metrics.reconnects.get(), 1);
    assert_eq!(fib(&client, 11).await.unwrap().to_string(), "89");
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn daemon_detects_a_blackholed_broker_by_heartbeat_and_recovers() {
    let queue = unique_queue("blackhole");
    let proxy = Proxy::start(free_addr(), broker_addr(&amqp_url())).await;
    let mut config = test_config(&queue);
    config.amqp.url = proxy.url(&amqp_url());
    config.amqp.heartbeat_secs = 1;
    config.amqp.connect_timeout_secs = 1;
    let (daemon, mut ready) = TestDaemon::spawn(config, None).await;
    readiness_becomes(&mut ready, true, Duration::from_secs(20), "daemon ready").await;

    proxy.set_blackhole(true);
    let t0 = Instant::now();
    readiness_becomes(
        &mut ready,
        false,
        Duration::from_secs(10),
        "a silent broker is noticed",
    )
    .await;
    // Two heartbeat intervals, plus scheduling slack.
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t0.elapsed()
    );
    proxy.set_blackhole(false);
    readiness_becomes(
        &mut ready,
        true,
        Duration::from_secs(15),
        "recovers once traffic flows",
    )
    .await;
    let client = client(&queue, Duration::from_secs(10)).await;
    assert_eq!(fib(&client, 13).await.unwrap().to_string(), "233");
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn client_fails_in_flight_calls_on_a_cut_then_recovers() {
    let queue = unique_queue("client-cut");
    let (block, gate) = Block::new();
    let daemon =
        TestDaemon::start_with(test_config(&queue), Some(Methods::default().with(block))).await;
    let proxy = Proxy::start(free_addr(), broker_addr(&amqp_url())).await;
    let client = amqp_rpc::Client::builder(proxy.url(&amqp_url()))
        .queue(queue.as_str())
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.call("block", b"").await }
    });
    wait_until(Duration::from_secs(10), "the call is in flight", || {
        daemon.metrics.in_flight.get() == 1
    })
    .await;

    let t0 = Instant::now();
    proxy.cut_all();
    let err = in_flight.await.unwrap().unwrap_err();
    assert_eq!(err, CallError::ConnectionLost);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "fails at once, not at the deadline"
    );
    assert_eq!(client.pending_calls(), 0);
    open_gate(&gate);

    // A call made now waits for the reconnection (within its deadline) and succeeds.
    assert_eq!(fib(&client, 14).await.unwrap().to_string(), "377");
    assert_eq!(client.reconnects(), 1);
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn dropping_a_call_removes_its_pending_entry() {
    let queue = unique_queue("drop");
    let (block, gate) = Block::new();
    let daemon =
        TestDaemon::start_with(test_config(&queue), Some(Methods::default().with(block))).await;
    let client = client(&queue, Duration::from_secs(10)).await;
    let call = client.call("block", b"");
    // The caller gives up on its own (drops the future) long before the call's deadline.
    assert!(tokio::time::timeout(Duration::from_millis(300), call)
        .await
        .is_err());
    assert_eq!(client.pending_calls(), 0);
    open_gate(&gate);
    wait_until(
        Duration::from_secs(10),
        "the orphan reply arrives and is dropped",
        || client.late_replies() == 1,
    )
    .await;
    assert_eq!(fib(&client, 15).await.unwrap().to_string(), "610");
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn idempotent_call_survives_a_cut_and_runs_once() {
    let queue = unique_queue("retry");
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let methods = Methods::default().with(Counted(runs.clone()));
    let daemon = TestDaemon::start_with(test_config(&queue), Some(methods)).await;
    let proxy = Proxy::start(free_addr(), broker_addr(&amqp_url())).await;
    let client = amqp_rpc::Client::builder(proxy.url(&amqp_url()))
        .queue(queue.as_str())
        .connect()
        .await
        .unwrap();
    let options = amqp_rpc::CallOptions {
        timeout: Duration::from_secs(10),
        idempotent: true,
    };
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call_with("counted", b"once", options).await }
    });
    wait_until(
        Duration::from_secs(10),
        "the call is being computed",
        || daemon.metrics.in_flight.get() == 1,
    )
    .await;
    proxy.cut_all();
    // The retry carries the same message_id: the daemon joins the running computation.
    assert_eq!(call.await.unwrap().unwrap(), b"once");
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(client.reconnects(), 1);
    wait_until(
        Duration::from_secs(10),
        "the retry counted as a replay",
        || daemon.metrics.replays.get() == 1,
    )
    .await;
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

/// Without reply confirms, a request is still acked only after its reply was handed to the
/// broker: on the daemon's connection, each request's ack (alone or `multiple`) comes after
/// the reply carrying its correlation id. (lapin writes acks ahead of queued publishes, so an
/// ack queued right behind its reply would overtake it, and a cut between the two would leave
/// the request acked and its caller without a reply.)
#[tokio::test]
async fn without_reply_confirms_no_ack_reaches_the_broker_before_its_reply() {
    let queue = unique_queue("ackorder");
    let proxy = Proxy::start(free_addr(), broker_addr(&amqp_url())).await;
    let mut config = test_config(&queue);
    config.amqp.url = proxy.url(&amqp_url());
    config.service.confirm_replies = false;
    let daemon = TestDaemon::start(config).await;
    let client = client(&queue, Duration::from_secs(10)).await;
    assert_eq!(fib_burst(&client, 300).await, 300);
    daemon.expect_requests("fib", "ok", 300).await;
    daemon.stop().await.expect("clean stop");

    // Which request each delivery tag is (basic.deliver: consumer tag, then delivery tag).
    let mut request_of = std::collections::BTreeMap::new();
    for m in method_frames(&proxy.received(0)) {
        if (m.class, m.method) == (60, 60) {
            let at = 1 + m.args[0] as usize;
            let tag = u64::from_be_bytes(m.args[at..at + 8].try_into().unwrap());
            request_of.insert(
                tag,
                m.correlation_id.expect("requests carry a correlation id"),
            );
        }
    }
    assert_eq!(request_of.len(), 300);
    let mut replied = std::collections::HashSet::new();
    let mut acked = std::collections::BTreeSet::new();
    for m in method_frames(&proxy.sent(0)) {
        match (m.class, m.method) {
            // basic.publish: replies, and the alarm probe the daemon publishes every second
            // (to a reserved name, without a correlation id; see server/session.rs).
            (60, 40) => {
                if let Some(id) = m.correlation_id {
                    replied.insert(id);
                }
            }
            // basic.ack: delivery tag, then the `multiple` bit
            (60, 80) => {
                let tag = u64::from_be_bytes(m.args[..8].try_into().unwrap());
                let newly: Vec<u64> = match m.args[8] & 1 {
                    1 => (1..=tag).filter(|t| !acked.contains(t)).collect(),
                    _ => vec![tag],
                };
                for t in newly {
                    assert!(
                        replied.contains(&request_of[&t]),
                        "the ack of tag {t} reached the broker before its reply"
                    );
                    assert!(acked.insert(t), "tag {t} acked twice");
                }
            }
            _ => {}
        }
    }
    assert_eq!((replied.len(), acked.len()), (300, 300));
    delete_queue(&queue).await;
}
