//! [`Service`]: a handle on one service queue of a [`Client`], sharing its connection.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{CallError, CallOptions, Inner, Target};

/// A service queue called through a [`Client`]'s connection: made by [`Client::service`],
/// cheap to clone (an `Arc` of the client and the queue's name and state). Its calls share the
/// client's connection, its one direct reply-to consumer, its call ids (so no call can get
/// another's reply, whichever queues they go to) and its default timeout; what is known about
/// the queue (whether it is served, whether it was lately) is the queue's own. The client's
/// connection stays open while a handle lives.
///
/// ```no_run
/// # async fn demo() -> Result<(), amqp_rpc::CallError> {
/// let client = amqp_rpc::Client::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .timeout(std::time::Duration::from_secs(5))
///     .connect()
///     .await?;
/// let (billing, inventory) = (client.service("billing"), client.service("inventory"));
/// // Both in flight at once, on one connection.
/// let (invoice, stock) = tokio::join!(
///     billing.call("invoice", b"42"),
///     inventory.call_idempotent("count", b"sku-7"),
/// );
/// match invoice {
///     Err(e) if e.is_no_server() => eprintln!("nobody serves {}", billing.queue()),
///     other => println!("{:?}", other?),
/// }
/// # let _ = stock;
/// # Ok(()) }
/// ```
///
/// [`Client`]: super::Client
/// [`Client::service`]: super::Client::service
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
    target: Target,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("queue", &&*self.target.queue)
            .finish_non_exhaustive()
    }
}

impl Service {
    pub(super) fn new(inner: Arc<Inner>, queue: &str) -> Self {
        let target = Target {
            queue: queue.into(),
            state: inner.shared.queue(queue),
        };
        Service { inner, target }
    }

    /// A handle on a queue the client already knows (its default queue).
    pub(super) fn on(inner: Arc<Inner>, target: Target) -> Self {
        Service { inner, target }
    }

    /// The queue this handle calls.
    pub fn queue(&self) -> &str {
        &self.target.queue
    }

    /// Call `method` with the client's default timeout. No retry.
    pub async fn call(&self, method: &str, body: &[u8]) -> Result<Vec<u8>, CallError> {
        self.call_timeout(method, body, self.inner.timeout).await
    }

    /// Call `method`, giving up after `timeout`; as
    /// [`Client::call_timeout`](super::Client::call_timeout).
    pub async fn call_timeout(
        &self,
        method: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        self.call_with(method, body, CallOptions::once(timeout))
            .await
    }

    /// Call an idempotent method with the client's default timeout, retrying within the
    /// deadline; as [`Client::call_idempotent`](super::Client::call_idempotent).
    pub async fn call_idempotent(&self, method: &str, body: &[u8]) -> Result<Vec<u8>, CallError> {
        let options = CallOptions::retrying(self.inner.timeout);
        self.call_with(method, body, options).await
    }

    /// Call with explicit options; retries as in [`Client::call_with`](super::Client::call_with),
    /// "served lately" being this queue's.
    pub async fn call_with(
        &self,
        method: &str,
        body: &[u8],
        options: CallOptions,
    ) -> Result<Vec<u8>, CallError> {
        self.inner
            .call(&self.target, method, body, None, options)
            .await
    }

    /// Call `method` with `request` as JSON and the client's default timeout, and deserialize
    /// the reply as `Resp`; as [`Client::call_json`](super::Client::call_json) (a reply that
    /// does not deserialize is `Remote { code: Internal, .. }`).
    ///
    /// ```no_run
    /// # async fn demo(client: amqp_rpc::Client) -> Result<(), amqp_rpc::CallError> {
    /// #[derive(serde::Serialize)]
    /// struct Invoice<'a> { customer: &'a str, cents: u64 }
    /// #[derive(serde::Deserialize)]
    /// struct Issued { number: String }
    ///
    /// let billing = client.service("billing");
    /// let issued: Issued = billing
    ///     .call_json("invoice", &Invoice { customer: "c-17", cents: 4_200 })
    ///     .await?;
    /// println!("invoice {}", issued.number);
    /// # Ok(()) }
    /// ```
    pub async fn call_json<Req, Resp>(&self, method: &str, request: &Req) -> Result<Resp, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let options = CallOptions::once(self.inner.timeout);
        self.call_json_with(method, request, options).await
    }

    /// [`call_json`](Self::call_json) with explicit options.
    pub async fn call_json_with<Req, Resp>(
        &self,
        method: &str,
        request: &Req,
        options: CallOptions,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.inner
            .call_json(&self.target, method, request, options)
            .await
    }
}
