//! Helpers of the user-method tests (tests/user_methods*.rs): the `deposit` request's JSON,
//! reading a batch of raw replies by correlation id, proving no reply is left to come, and a
//! call spawned to run beside the test's own steps.

use std::collections::HashMap;
use std::time::Duration;

use amqp_rpc::{CallError, Client};
use tokio::task::JoinHandle;

use super::{RawReply, RawRequester};

/// The request of the tests' `deposit` methods.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Deposit {
    pub account: String,
    pub cents: u64,
    /// How long the deposit's await takes (a database write).
    #[serde(default)]
    pub ms: u64,
}

/// A deposit of `cents` whose handler takes `ms`.
pub fn deposit_body(cents: u64, ms: u64) -> Vec<u8> {
    let d = Deposit {
        account: "acct".into(),
        cents,
        ms,
    };
    serde_json::to_vec(&d).unwrap()
}

/// `n` replies, by correlation id (each id once: a second reply for one fails the test).
pub async fn replies(raw: &mut RawRequester, n: usize) -> HashMap<String, RawReply> {
    let mut by_id = HashMap::new();
    for _ in 0..n {
        let reply = raw.next_reply(Duration::from_secs(10)).await;
        let id = reply.correlation_id.clone().expect("a correlation id");
        assert!(
            by_id.insert(id.clone(), reply).is_none(),
            "two replies to {id}"
        );
    }
    by_id
}

/// No reply beyond those read: the next one to arrive is a sentinel's, sent to `method` (one
/// that answers at once). Replies come in order on the one reply queue, so a late one for an
/// earlier request would come first.
pub async fn nothing_more(raw: &mut RawRequester, queue: &str, method: &str) {
    let props = raw.props("sentinel").with_type(method.into());
    raw.publish(queue, b"end", props).await;
    let next = raw.next_reply(Duration::from_secs(10)).await;
    assert_eq!(next.correlation_id.as_deref(), Some("sentinel"), "{next:?}");
}

/// `client.call(method, b"")` as a task of its own, for a call that must be in flight while
/// the test goes on (holding a method's limit, or running while its worker drains).
pub fn spawn_call(client: &Client, method: &str) -> JoinHandle<Result<Vec<u8>, CallError>> {
    let (client, method) = (client.clone(), method.to_owned());
    tokio::spawn(async move { client.call(&method, b"").await })
}
