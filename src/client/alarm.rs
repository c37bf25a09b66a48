//! The broker's resource alarms as the client sees them: with a memory or disk alarm on,
//! RabbitMQ blocks every connection that publishes (`connection.blocked`, with its reason)
//! until the alarm clears (`connection.unblocked`). A request published then only waits at the
//! broker until its deadline, so calls made while blocked fail at once instead
//! ([`CallError::Blocked`](crate::CallError::Blocked)).
//!
//! The broker tells a connection it is blocked only once it publishes, so a fresh connection
//! publishes one empty message nobody receives (to a reserved `amq.` name no queue can have)
//! before its first call, and waits for a round trip: a blocked connection hears it then,
//! instead of with its first request.

use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use lapin::options::{BasicPublishOptions, BasicQosOptions};
use lapin::{BasicProperties, Channel, Event};

use crate::client::shared::Shared;

/// A connection's events (lapin delivers each to one listener, so there is one per session).
pub(super) type Events = Pin<Box<dyn Stream<Item = Event> + Send>>;

/// Routing key of the probe: the default exchange routes it nowhere (names starting with
/// `amq.` are reserved, no client can declare such a queue) and drops it.
const PROBE_KEY: &str = "amq.amqp-rpc.alarm-probe";

/// How long a new connection waits to hear whether it is blocked. A broker that is not
/// blocking answers the round trip in milliseconds; one that is says so as fast.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// Follow one event of the connection.
pub(super) fn on_event(shared: &Shared, event: Event) {
    match event {
        Event::ConnectionBlocked(reason) => {
            tracing::warn!(%reason, "the broker blocked the client's connection");
            shared.set_blocked(Some(reason));
        }
        Event::ConnectionUnblocked => {
            tracing::info!("the broker unblocked the client's connection");
            shared.set_blocked(None);
        }
        _ => {}
    }
}

/// Find out whether the broker blocks this new connection before calls are made on it.
pub(super) async fn probe(channel: &Channel, events: &mut Events, shared: &Shared) {
    let publish = channel.basic_publish(
        "".into(),
        PROBE_KEY.into(),
        BasicPublishOptions::default(),
        b"",
        BasicProperties::default(),
    );
    let round_trip = async {
        publish.await?;
        // A method the broker answers: it reads it only after the publish, and a blocked
        // connection is not read at all, so the answer means "not blocked".
        channel.basic_qos(0, BasicQosOptions::default()).await
    };
    let blocked = async {
        while let Some(event) = events.next().await {
            let blocked = matches!(event, Event::ConnectionBlocked(_));
            on_event(shared, event);
            if blocked {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    let _ = tokio::time::timeout(PROBE_WAIT, async {
        tokio::select! {
            _ = round_trip => {}
            _ = blocked => {}
        }
    })
    .await;
}
