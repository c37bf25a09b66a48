//! A second reply channel, on a connection of its own, for replies that may be toxic.
//!
//! RabbitMQ 3.10 closes the connection that publishes a reply to the direct reply-to address
//! of a client whose node is down (541 INTERNAL_ERROR; the broker's channel crashes in
//! `rabbit_channel:deliver_reply`). After a node failure, the quorum queue still holds such
//! clients' requests. Published on the consumer's connection, each of those replies cost the
//! daemon its consumer: every unacked delivery went back to the queue and readiness dropped,
//! 8-9 times per failover in the cluster test. Sent through this link, one at a time, such a
//! reply costs only the link (which the next reply reopens) and is pinned to its request, which
//! is then acked without a reply: its caller is gone with the failed node.
//!
//! Only replies that may be toxic take this way (see `reply::wary`): a second connection
//! means a second lapin I/O thread, and sending every reply through it cost 10-18% of
//! throughput and latency in the benchmarks.

use std::sync::RwLock;
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};
use tokio::sync::Mutex;

use crate::amqp::Connector;

/// Bound on closing a connection that may already be dead.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The reply channel, shared by a session's requests.
pub struct ReplyLink {
    /// The open channel; read on every reply, so a plain lock held for a clone.
    current: RwLock<Option<Channel>>,
    /// Serialises reopening, and owns the connection.
    link: Mutex<Link>,
    /// Held across one publish and its confirm: with one reply in flight at a time, a
    /// connection crash points at exactly the reply that caused it.
    pub one_at_a_time: Mutex<()>,
    confirm: bool,
}

struct Link {
    connector: Connector,
    conn: Option<Connection>,
}

impl std::fmt::Debug for ReplyLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyLink")
            .field("confirm", &self.confirm)
            .finish_non_exhaustive()
    }
}

impl ReplyLink {
    /// A link that connects on first use; replies are confirmed when `confirm`.
    pub fn new(connector: Connector, confirm: bool) -> Self {
        ReplyLink {
            current: RwLock::new(None),
            link: Mutex::new(Link {
                connector,
                conn: None,
            }),
            one_at_a_time: Mutex::new(()),
            confirm,
        }
    }

    /// The open channel, (re)connecting first when there is none (trying each broker once).
    pub async fn channel(&self) -> Result<Channel, String> {
        if let Some(channel) = self.open_channel() {
            return Ok(channel);
        }
        let mut link = self.link.lock().await;
        if let Some(channel) = self.open_channel() {
            return Ok(channel); // another reply reopened it while we waited
        }
        if let Some(old) = link.conn.take() {
            close(&old).await;
        }
        let mut last = String::new();
        for _ in 0..link.connector.brokers() {
            let conn = match link.connector.connect_once().await {
                Ok(conn) => conn,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            match self.setup(&conn).await {
                Ok(channel) => {
                    *self.current.write().expect("reply link lock") = Some(channel.clone());
                    link.conn = Some(conn);
                    return Ok(channel);
                }
                Err(e) => {
                    last = format!("opening the reply channel: {e}");
                    close(&conn).await;
                }
            }
        }
        Err(last)
    }

    async fn setup(&self, conn: &Connection) -> Result<Channel, lapin::Error> {
        let channel = conn.create_channel().await?;
        if self.confirm {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        }
        Ok(channel)
    }

    fn open_channel(&self) -> Option<Channel> {
        let current = self.current.read().expect("reply link lock");
        current.as_ref().filter(|c| c.status().connected()).cloned()
    }

    /// Close the connection, if one was opened (at the end of the session).
    pub async fn close(&self) {
        self.current.write().expect("reply link lock").take();
        if let Some(conn) = self.link.lock().await.conn.take() {
            close(&conn).await;
        }
    }
}

/// Close a connection that may already be dead, within [`CLOSE_TIMEOUT`]. Here rather than in
/// `session.rs`, which closes its own connection with it too: the session depends on this link,
/// never the other way round.
pub(super) async fn close(conn: &Connection) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "amqp-rpcd closing".into())).await;
}
