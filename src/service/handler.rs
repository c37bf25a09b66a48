//! Methods from plain functions: async handlers, typed JSON handlers, and CPU-heavy handlers
//! run off the reactor. Each is a [`Method`] the daemon gives every guarantee (bounds before
//! work, the deadline, one reply, panics as `internal`, the reply cache, poison limits, drain,
//! metrics by method).
//!
//! ```
//! use std::sync::Arc;
//! use amqp_rpc::service::{handler, json, Methods, Request};
//! use amqp_rpc::protocol::{ErrorCode, RequestError};
//!
//! #[derive(serde::Deserialize)]
//! struct Lookup { id: u64 }
//! #[derive(serde::Serialize)]
//! struct User { id: u64, name: String }
//!
//! async fn ping(_req: Request) -> Result<Vec<u8>, RequestError> {
//!     Ok(b"pong".to_vec())
//! }
//!
//! let names = Arc::new(vec!["ada".to_owned(), "grace".to_owned()]);
//! let methods = Methods::default()
//!     .with(handler("ping", ping))
//!     .with(json("user", move |_req: Request, q: Lookup| {
//!         let names = names.clone();
//!         async move {
//!             let name = names.get(q.id as usize).cloned().ok_or_else(|| {
//!                 RequestError::new(ErrorCode::NotFound, format!("no user {}", q.id))
//!             })?;
//!             Ok(User { id: q.id, name })
//!         }
//!     }).limit(16));
//! assert_eq!(methods.names(), ["ping", "user"]);
//! ```

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;

use super::{Method, Request, Work};
use crate::protocol::{ErrorCode, RequestError};

/// The future an async handler returns, boxed.
pub type BoxReply = Pin<Box<dyn Future<Output = Result<Vec<u8>, RequestError>> + Send>>;

pub use crate::protocol::JSON_CONTENT_TYPE;

/// An async method: `f(request)` answers with the reply body or an error.
pub fn handler<F, Fut>(name: impl Into<String>, f: F) -> Handler<F>
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, RequestError>> + Send + 'static,
{
    Handler {
        name: name.into(),
        f: Arc::new(f),
        limit: None,
    }
}

/// An async method with typed JSON in and out: the body is deserialized into `I` before any
/// work (a body that does not deserialize is `invalid_argument` with serde's one-line reason),
/// and `O` is serialized into the reply, sent as `content_type: application/json`.
pub fn json<I, O, F, Fut>(name: impl Into<String>, f: F) -> Json<I, O, F>
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(Request, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, RequestError>> + Send + 'static,
{
    Json {
        name: name.into(),
        f: Arc::new(f),
        limit: None,
        types: PhantomData,
    }
}

/// A CPU-heavy method: `f(request)` runs on the blocking pool, at most
/// `service.concurrency` of those at once across every method, so the reactor (and with it
/// every other request, heartbeats and acks) never waits for it.
pub fn blocking<F>(name: impl Into<String>, f: F) -> Blocking<F>
where
    F: Fn(Request) -> Result<Vec<u8>, RequestError> + Send + Sync + 'static,
{
    Blocking {
        name: name.into(),
        f: Arc::new(f),
    }
}

/// See [`handler`].
pub struct Handler<F> {
    name: String,
    f: Arc<F>,
    limit: Option<Arc<Semaphore>>,
}

/// See [`json`].
pub struct Json<I, O, F> {
    name: String,
    f: Arc<F>,
    limit: Option<Arc<Semaphore>>,
    types: PhantomData<fn(I) -> O>,
}

/// See [`blocking`].
pub struct Blocking<F> {
    name: String,
    f: Arc<F>,
}

impl<F> Handler<F> {
    /// At most `n` requests of this method run at once; the rest wait (their deadline still
    /// counts, and a drain gives back those that have not started).
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = Some(Arc::new(Semaphore::new(n.max(1))));
        self
    }
}

impl<I, O, F> Json<I, O, F> {
    /// At most `n` requests of this method run at once (see [`Handler::limit`]).
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = Some(Arc::new(Semaphore::new(n.max(1))));
        self
    }
}

impl<F, Fut> Method for Handler<F>
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, RequestError>> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare(&self, _body: &[u8]) -> Result<Work, RequestError> {
        let f = self.f.clone();
        Ok(Work::Async(Box::new(move |req| Box::pin(f(req)))))
    }

    fn limit(&self) -> Option<&Arc<Semaphore>> {
        self.limit.as_ref()
    }
}

impl<I, O, F, Fut> Method for Json<I, O, F>
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(Request, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, RequestError>> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare(&self, body: &[u8]) -> Result<Work, RequestError> {
        let input: I = serde_json::from_slice(body).map_err(|e| {
            RequestError::new(
                ErrorCode::InvalidArgument,
                format!("the body is not this method's JSON: {e}"),
            )
        })?;
        let f = self.f.clone();
        Ok(Work::Async(Box::new(move |req| {
            Box::pin(async move {
                let output = f(req, input).await?;
                serde_json::to_vec(&output).map_err(|e| {
                    RequestError::new(
                        ErrorCode::Internal,
                        format!("the reply could not be encoded: {e}"),
                    )
                })
            })
        })))
    }

    fn content_type(&self) -> Option<&'static str> {
        Some(JSON_CONTENT_TYPE)
    }

    fn limit(&self) -> Option<&Arc<Semaphore>> {
        self.limit.as_ref()
    }
}

impl<F> Method for Blocking<F>
where
    F: Fn(Request) -> Result<Vec<u8>, RequestError> + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare(&self, _body: &[u8]) -> Result<Work, RequestError> {
        let f = self.f.clone();
        Ok(Work::Blocking(Box::new(move |req| f(req))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Add {
        a: i64,
        b: i64,
    }

    fn adder() -> impl Method {
        json("add", |_req: Request, q: Add| async move {
            q.a.checked_add(q.b)
                .ok_or_else(|| RequestError::new(ErrorCode::OutOfRange, "overflow"))
        })
    }

    #[tokio::test]
    async fn json_bodies_are_parsed_before_any_work() {
        let add = adder();
        assert_eq!(add.content_type(), Some(JSON_CONTENT_TYPE));
        let err = match add.prepare(br#"{"a": 1}"#) {
            Err(e) => e,
            Ok(_) => panic!("a body without b was accepted"),
        };
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert!(err.message.contains("missing field `b`"), "{}", err.message);
        assert!(!err.message.contains('\n'));
        let Ok(Work::Async(run)) = add.prepare(br#"{"a": 2, "b": 40}"#) else {
            panic!("not async work");
        };
        let reply = run(Request::for_test("add", &b""[..])).await.unwrap();
        assert_eq!(reply, b"42");
    }

    #[tokio::test]
    async fn application_errors_keep_their_code() {
        let Ok(Work::Async(run)) = adder().prepare(br#"{"a": 9223372036854775807, "b": 1}"#) else {
            panic!("not async work");
        };
        let err = run(Request::for_test("add", &b""[..])).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::OutOfRange);
    }
}
