//! Users without configure permission, as production callers and workers often are, on a
//! private node (users are never added to the shared one). Since RabbitMQ 4.2.6 and 4.3.0 even a
//! passive declare needs configure permission: the daemon must still serve a queue someone else
//! declared, and the client must still call it, and still detect a missing queue fast.

mod common;

use std::time::{Duration, Instant};

use amqp_rpc::config::AmqpConfig;
use amqp_rpc::Client;
use common::broker::PrivateBroker;
use common::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

/// A user that may read and write everything and configure nothing.
async fn add_user_without_configure(broker: &PrivateBroker, user: &str) -> String {
    broker.ctl(&["add_user", user, "secret"]).await;
    broker
        .ctl(&["set_permissions", "-p", "/", user, "^$", ".*", ".*"])
        .await;
    broker
        .url()
        .replace("guest:guest", &format!("{user}:secret"))
}

#[tokio::test]
async fn a_worker_and_a_caller_without_configure_permission_still_serve_and_call() {
    let broker = PrivateBroker::start().await;
    let queue = unique_queue("perm");
    // The operator (guest, an administrator) declares the queue.
    let admin = Connection::connect(&broker.url(), ConnectionProperties::default())
        .await
        .unwrap();
    admin
        .create_channel()
        .await
        .unwrap()
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let worker_url = add_user_without_configure(&broker, "worker").await;
    let caller_url = add_user_without_configure(&broker, "caller").await;

    let mut config = test_config(&queue);
    config.amqp.url = worker_url;
    let daemon = TestDaemon::start(config).await;

    let caller = |queue: &str| {
        let amqp = AmqpConfig {
            url: caller_url.clone(),
            ..AmqpConfig::default()
        };
        Client::builder(caller_url.as_str())
            .amqp(amqp)
            .queue(queue)
            .timeout(Duration::from_secs(5))
            .connect()
    };
    let client = caller(&queue).await.unwrap();
    for _ in 0..3 {
        assert_eq!(fib(&client, 30).await.unwrap().to_string(), "832040");
    }
    daemon.expect_requests("fib", "ok", 3).await;

    // A queue nobody declared: the probe may be refused, but the mandatory publish comes back.
    let missing = caller(&unique_queue("perm-missing")).await.unwrap();
    let t0 = Instant::now();
    let err = missing.call("fib", b"1").await.unwrap_err();
    assert!(err.is_no_server(), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());

    daemon.stop().await.unwrap();
    let _ = admin.close(200, "done".into()).await;
}
