//! Replies go only where replies belong (`service.reply_to`), forged direct reply-to
//! addresses never reach the broker, and methods that answer only some callers
//! (`service.callers`) refuse the others with `permission_denied`.

mod common;

use std::time::Duration;

use amqp_rpc::{CallError, ErrorCode};
use common::*;
use lapin::BasicProperties;

fn rejected(daemon: &TestDaemon, reason: &str) -> u64 {
    daemon.metrics.rejected.with_label_values(&[reason]).get()
}

async fn expect_rejected(daemon: &TestDaemon, reason: &str, n: u64) {
    let what = format!("rejected{{reason={reason:?}}} reaches {n}");
    wait_until(Duration::from_secs(10), &what, || {
        rejected(daemon, reason) >= n
    })
    .await;
    assert_eq!(rejected(daemon, reason), n, "{reason}");
}

#[tokio::test]
async fn replies_never_go_into_another_services_queue() {
    // A confused deputy: a request whose reply_to names an ordinary queue of another service
    // would make the daemon write its replies there.
    let queue = unique_queue("deputy");
    let victim = unique_queue("deputy-victim");
    let _victim = declare_queue(&victim).await;
    let daemon = TestDaemon::start(test_config(&queue)).await;
    let raw = RawRequester::new().await;
    for i in 0..3 {
        let props = BasicProperties::default()
            .with_reply_to(victim.as_str().into())
            .with_correlation_id(i.to_string().into())
            .with_type("fib".into());
        raw.publish(&queue, b"10", props).await;
    }
    expect_rejected(&daemon, "reply_to_refused", 3).await;
    // Honest callers are answered all along, and nothing was written into the victim.
    let client = client(&queue, Duration::from_secs(10)).await;
    assert_eq!(fib(&client, 10).await.unwrap().to_string(), "55");
    assert_eq!(queue_message_count(&victim).await, 0);
    assert_eq!(
        daemon.requests_sum(),
        1,
        "refused requests are not answered"
    );
    assert_eq!(
        queue_message_count(&queue).await,
        0,
        "refused requests are acked"
    );
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
    delete_queue(&victim).await;
}

#[tokio::test]
async fn a_named_reply_queue_the_policy_lists_is_answered() {
    let queue = unique_queue("listed");
    let replies = unique_queue("listed-replies");
    let mut config = test_config(&queue);
    config.service.reply_to = format!("amq.rabbitmq.reply-to.*, amq.gen-*, {replies}");
    let daemon = TestDaemon::start(config).await;
    let _replies = declare_queue(&replies).await;
    let props = BasicProperties::default()
        .with_reply_to(replies.as_str().into())
        .with_correlation_id("1".into());
    RawRequester::new()
        .await
        .publish(&queue, b"10", props)
        .await;
    daemon.expect_requests("fib", "ok", 1).await;
    wait_until_async(
        Duration::from_secs(10),
        "the reply is in the listed queue",
        || async { queue_message_count(&replies).await == 1 },
    )
    .await;
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
    delete_queue(&replies).await;
}

#[tokio::test]
async fn forged_direct_reply_to_addresses_never_reach_the_broker() {
    // RabbitMQ before 3.10.12 / 3.11.4 closes the publishing connection on a malformed direct
    // reply-to address: if the daemon published one reply to any of these, it would
    // reconnect (and, on 3.10.8, the test broker, it does).
    let queue = unique_queue("forged");
    let daemon = TestDaemon::start(test_config(&queue)).await;
    let raw = RawRequester::new().await;
    let forged = [
        "amq.rabbitmq.reply-to.",
        "amq.rabbitmq.reply-to.x",
        "amq.rabbitmq.reply-to.AAAA",
        "amq.rabbitmq.reply-to.AAAA.BBBB",
        "amq.rabbitmq.reply-to.g2gDZAAA.Zm9v",
        "amq.rabbitmq.reply-to.!!!!.????",
        "amq.rabbitmq.reply-to.anything.at.all",
    ];
    for (i, to) in forged.iter().enumerate() {
        raw.publish(
            &queue,
            b"10",
            BasicProperties::default()
                .with_reply_to((*to).into())
                .with_correlation_id(i.to_string().into()),
        )
        .await;
    }
    expect_rejected(&daemon, "reply_to_malformed", forged.len() as u64).await;
    // Well-formed, naming a node of another cluster: RabbitMQ 3.10.0-3.10.11 (the host's
    // 3.10.8 among them) closes the publishing connection on it (rabbitmq-server#6396), later
    // versions drop it. The daemon does not know that node, so the reply goes through its
    // wary link: at most that link is lost, never the consuming connection.
    let foreign =
        "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAyNzIyNTAxMAAABrcAAAAAZl7V7w==.oyvwJ9+5nczD2h7KpiJN0Q==";
    raw.publish(
        &queue,
        b"10",
        BasicProperties::default()
            .with_reply_to(foreign.into())
            .with_correlation_id("foreign".into()),
    )
    .await;
    wait_until(
        Duration::from_secs(10),
        "the foreign reply is settled",
        || rejected(&daemon, "reply_to_unreachable") + daemon.requests("fib", "ok") == 1,
    )
    .await;
    eprintln!(
        "FOREIGN NODE: reply {}",
        match rejected(&daemon, "reply_to_unreachable") {
            1 => "broke the wary link (the broker closed it)",
            _ => "was dropped by the broker",
        }
    );
    // The same daemon, on the same connection, still answers direct reply-to callers.
    let client = client(&queue, Duration::from_secs(10)).await;
    assert_eq!(fib(&client, 12).await.unwrap().to_string(), "144");
    assert_eq!(
        daemon.metrics.reconnects.get(),
        0,
        "no connection was closed"
    );
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn methods_with_callers_answer_only_those_users() {
    // The test broker's user is guest; RabbitMQ refuses a publish whose user_id is another
    // user, so user_id = guest is what a guest connection can claim.
    let queue = unique_queue("callers");
    let mut config = test_config(&queue);
    config
        .service
        .callers
        .insert("fib".into(), vec!["billing".into(), "guest".into()]);
    let daemon = TestDaemon::start(config).await;
    let mut raw = RawRequester::new().await;
    raw.publish(
        &queue,
        b"10",
        raw.props("anonymous").with_type("fib".into()),
    )
    .await;
    let reply = raw.next_reply(Duration::from_secs(10)).await;
    assert_eq!(reply.error_code, Some(ErrorCode::PermissionDenied));
    assert!(
        String::from_utf8_lossy(&reply.body).contains("user_id"),
        "{reply:?}"
    );
    raw.publish(
        &queue,
        b"10",
        raw.props("guest")
            .with_type("fib".into())
            .with_user_id("guest".into()),
    )
    .await;
    let reply = raw.next_reply(Duration::from_secs(10)).await;
    assert_eq!(
        (reply.error_code, reply.body.as_slice()),
        (None, &b"55"[..])
    );
    // Our client sends no user_id unless asked to: a caller must say who it is.
    let anonymous = client(&queue, Duration::from_secs(10)).await;
    match anonymous.call("fib", b"10").await {
        Err(CallError::Remote { code, .. }) => assert_eq!(code, ErrorCode::PermissionDenied),
        other => panic!("{other:?}"),
    }
    let identified = amqp_rpc::Client::builder(amqp_url())
        .queue(&queue)
        .identify(true)
        .connect()
        .await
        .unwrap();
    assert_eq!(identified.call("fib", b"11").await.unwrap(), b"89");
    daemon.expect_requests("fib", "permission_denied", 2).await;
    daemon.expect_requests("fib", "ok", 2).await;
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn callers_must_name_served_methods_and_reply_to_must_parse() {
    let queue = unique_queue("callers-config");
    let mut config = test_config(&queue);
    config
        .service
        .callers
        .insert("nosuch".into(), vec!["a".into()]);
    let started = amqp_rpc::Daemon::start(config, prometheus::Registry::new())
        .await
        .unwrap()
        .with_methods(amqp_rpc::service::Methods::default());
    let err = started.unwrap_err().to_string();
    assert!(
        err.contains("service.callers") && err.contains("nosuch"),
        "{err}"
    );
    let mut config = test_config(&queue);
    config.service.reply_to = "a*b".into();
    let err = amqp_rpc::Daemon::start(config, prometheus::Registry::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("service.reply_to"), "{err}");
}
