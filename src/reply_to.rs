//! Where replies may go: `service.reply_to`, a list of the reply queues the daemon publishes
//! to, and the shape of a direct reply-to address.
//!
//! A request names its reply queue itself, so without a policy anyone who can publish to the
//! service queue can make the daemon write into any queue of the vhost (a confused deputy:
//! the daemon's user usually may write where the caller may not). The usual reply queues are
//! direct reply-to (`amq.rabbitmq.reply-to.*`, our client's and the newer tutorials') and
//! server-named exclusive queues (`amq.gen-*`, the classic tutorials' callback queues); both
//! are the default. Clients with named reply queues are allowed by adding their names or
//! prefixes. A refused request is acked without work, logged and counted.
//!
//! A direct reply-to address is checked for its shape before anything is published to it:
//! RabbitMQ before 3.10.12 / 3.11.4 closes the publishing connection when asked to publish to
//! a malformed one, so a forged address must never reach the broker.

use std::fmt;

mod shape;

pub use shape::Direct;

/// The default `service.reply_to`: direct reply-to and server-named queues.
pub const DEFAULT_REPLY_TO: &str = "amq.rabbitmq.reply-to.*, amq.gen-*";

/// The direct reply-to prefix, with the dot that starts the broker's suffix.
const DIRECT_PREFIX: &str = "amq.rabbitmq.reply-to.";

/// The reply queues a daemon answers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyToPolicy {
    patterns: Vec<Pattern>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    /// Any queue.
    Any,
    /// Exactly this name.
    Exact(String),
    /// Names starting with this.
    Prefix(String),
}

/// Why a `reply_to` is not answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The policy does not list it.
    NotAllowed,
    /// It claims to be a direct reply-to address but is not shaped like one.
    MalformedDirect,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::NotAllowed => "reply_to is not a reply queue service.reply_to allows",
            Refusal::MalformedDirect => "reply_to is not a well-formed direct reply-to address",
        })
    }
}

impl Default for ReplyToPolicy {
    fn default() -> Self {
        Self::parse(DEFAULT_REPLY_TO).expect("the default parses")
    }
}

impl ReplyToPolicy {
    /// Parse a comma-separated list of queue names, `prefix*` patterns, or `*` (any queue).
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut patterns = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let pattern = match item.strip_suffix('*') {
                Some("") => Pattern::Any,
                Some(prefix) if prefix.contains('*') => {
                    return Err(format!("{item:?}: only a trailing * is a wildcard"))
                }
                Some(prefix) => Pattern::Prefix(prefix.to_owned()),
                None if item.contains('*') => {
                    return Err(format!("{item:?}: only a trailing * is a wildcard"))
                }
                None => Pattern::Exact(item.to_owned()),
            };
            if item.len() > 255 {
                return Err(format!("{item:?}: queue names are at most 255 bytes"));
            }
            patterns.push(pattern);
        }
        if patterns.is_empty() {
            return Err("empty: no reply could be sent (\"*\" allows any queue)".into());
        }
        Ok(ReplyToPolicy { patterns })
    }

    /// Whether a reply may be published to `reply_to`.
    pub fn check(&self, reply_to: &str) -> Result<(), Refusal> {
        let listed = self.patterns.iter().any(|p| match p {
            Pattern::Any => true,
            Pattern::Exact(name) => name == reply_to,
            Pattern::Prefix(prefix) => reply_to.starts_with(prefix.as_str()),
        });
        if !listed {
            return Err(Refusal::NotAllowed);
        }
        // Whatever the list says, nothing malformed goes to the broker's direct reply-to.
        if reply_to.starts_with("amq.rabbitmq.reply-to") && !is_direct_reply_to(reply_to) {
            return Err(Refusal::MalformedDirect);
        }
        Ok(())
    }
}

/// Whether `address` has the shape of a direct reply-to address that a broker handed out.
pub fn is_direct_reply_to(address: &str) -> bool {
    direct(address).is_some()
}

/// The direct reply-to address `address` is, if it is one of the broker's shape.
pub fn direct(address: &str) -> Option<Direct> {
    shape::parse(address.strip_prefix(DIRECT_PREFIX)?)
}

/// The broker nodes a session has published direct replies to without harm. On RabbitMQ
/// 3.10.0–3.10.11 and 3.11.0–3.11.3 a direct reply to a node that is not running closes the
/// publishing connection, so the first reply to each node goes through the wary link (where a
/// crash costs only that link); once one is confirmed there, that node's replies go the
/// usual way for the rest of the session.
#[derive(Debug, Default)]
pub struct KnownNodes {
    nodes: std::sync::RwLock<Vec<u32>>,
}

/// How many nodes a session remembers: a cluster has a handful; forged addresses could name
/// any, and once this many are known a new one is simply never remembered.
const MAX_KNOWN_NODES: usize = 64;

impl KnownNodes {
    /// Whether a reply to `to` may crash the connection that publishes it: a direct address
    /// of a node not known yet, or an unusual one.
    pub fn risky(&self, to: &str) -> bool {
        match direct(to) {
            None => false, // not direct reply-to; refused earlier when malformed
            Some(Direct::Unusual { .. }) => true,
            Some(Direct::Usual { node }) => !self.nodes.read().expect("lock").contains(&node),
        }
    }

    /// Learn the node the daemon is connected to, so that replies to the callers on that
    /// node (all of them, on a single broker) never need the wary link: ask the broker for a
    /// direct reply-to address of our own, by publishing a message with `reply_to` set to the
    /// pseudo-queue into a queue of our own and reading it back. Best effort: a user who may
    /// not declare queues learns nothing here, and the first reply to each node goes the
    /// wary way.
    pub async fn learn_own_node(&self, conn: &lapin::Connection) {
        match own_address(conn).await {
            Ok(address) => {
                tracing::debug!(%address, "own direct reply-to address");
                self.learned(&address);
            }
            Err(e) => tracing::debug!(error = %e, "could not learn this node's reply-to address"),
        }
    }

    /// A confirmed wary reply to `to` did no harm: its node is running.
    pub fn learned(&self, to: &str) {
        if let Some(Direct::Usual { node }) = direct(to) {
            let mut nodes = self.nodes.write().expect("lock");
            if !nodes.contains(&node) && nodes.len() < MAX_KNOWN_NODES {
                nodes.push(node);
            }
        }
    }
}

/// A direct reply-to address the broker hands this connection.
async fn own_address(conn: &lapin::Connection) -> Result<String, String> {
    use lapin::options::{
        BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    };
    use lapin::types::FieldTable;
    let e = |e: lapin::Error| e.to_string();
    let ch = conn.create_channel().await.map_err(e)?;
    let ask = async {
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let _replies = ch
            .basic_consume(
                "amq.rabbitmq.reply-to".into(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await
            .map_err(e)?;
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let queue = ch
            .queue_declare("".into(), exclusive, FieldTable::default())
            .await
            .map_err(e)?;
        let props = lapin::BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into());
        ch.basic_publish(
            "".into(),
            queue.name().clone(),
            BasicPublishOptions::default(),
            b"",
            props,
        )
        .await
        .map_err(e)?;
        // The channel routes the publish before it asks the queue, so the message is there.
        let got = ch
            .basic_get(queue.name().clone(), BasicGetOptions { no_ack: true })
            .await
            .map_err(e)?;
        let _ = ch
            .queue_delete(queue.name().clone(), QueueDeleteOptions::default())
            .await;
        let message = got.ok_or("the message did not come back")?;
        let reply_to = message.delivery.properties.reply_to().as_ref();
        reply_to
            .map(|r| r.to_string())
            .ok_or_else(|| "no reply_to".to_owned())
    };
    let result = tokio::time::timeout(std::time::Duration::from_secs(5), ask)
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    let _ = ch.close(200, "done".into()).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const GENUINE: &str =
        "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AAA8DQAAAABrDsDK.2CUud3s79kInSgWszR/mDw==";

    #[test]
    fn a_node_is_risky_until_a_reply_to_it_did_no_harm() {
        let known = KnownNodes::default();
        assert!(known.risky(GENUINE));
        assert!(!known.risky("amq.gen-x"), "not direct reply-to");
        known.learned(GENUINE);
        assert!(!known.risky(GENUINE));
        let same_node_other_key =
            "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AAA8EgAAAABrDsDK.qd8C/DGco8FB5GSuXVJl9g==";
        assert!(!known.risky(same_node_other_key));
        let other_node =
            "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAyNzIyNTAxMAAABrcAAAAAZl7V7w==.oyvwJ9+5nczD2h7KpiJN0Q==";
        assert!(known.risky(other_node));
    }

    #[test]
    fn the_default_allows_direct_and_server_named_queues_only() {
        let policy = ReplyToPolicy::default();
        assert_eq!(policy.check("amq.gen-JzTY20BRgKO-HjmUJj0wLg"), Ok(()));
        assert_eq!(policy.check("billing"), Err(Refusal::NotAllowed));
        assert_eq!(policy.check("amq.genx"), Err(Refusal::NotAllowed));
        assert_eq!(policy.check(""), Err(Refusal::NotAllowed));
        assert_eq!(
            policy.check("amq.rabbitmq.reply-to.nonsense"),
            Err(Refusal::MalformedDirect)
        );
        assert_eq!(policy.check(GENUINE), Ok(()));
        assert_eq!(
            policy.check("amq.rabbitmq.reply-to"),
            Err(Refusal::NotAllowed),
            "the bare pseudo-queue is no address"
        );
    }

    #[test]
    fn lists_names_prefixes_and_any() {
        let policy = ReplyToPolicy::parse(" replies , rpc-replies-* ").unwrap();
        assert_eq!(policy.check("replies"), Ok(()));
        assert_eq!(policy.check("replies2"), Err(Refusal::NotAllowed));
        assert_eq!(policy.check("rpc-replies-7"), Ok(()));
        assert_eq!(policy.check("amq.gen-x"), Err(Refusal::NotAllowed));
        let any = ReplyToPolicy::parse("*").unwrap();
        assert_eq!(any.check("billing"), Ok(()));
        assert_eq!(
            any.check("amq.rabbitmq.reply-to.AAAA"),
            Err(Refusal::MalformedDirect),
            "even `*` never sends a forged direct address to the broker"
        );
        for bad in ["", " , ", "a*b", "*a", "a**"] {
            assert!(ReplyToPolicy::parse(bad).is_err(), "{bad:?}");
        }
    }
}
