//! Methods the daemon serves, and the registry that maps a request's `type` to one of them.
//!
//! Most methods are written as functions ([`handler`], [`json`], [`blocking`]); the
//! [`Method`] trait under them splits a method's work in two so the daemon can keep the async
//! reactor free: [`Method::prepare`] parses and bounds-checks the body (cheap, always on the
//! reactor), and returns either a finished answer ([`Work::Done`], for work too small to be
//! worth a thread hop), a future to await ([`Work::Async`]), or a closure that the daemon runs
//! on the blocking pool under its concurrency limit ([`Work::Heavy`], [`Work::Blocking`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::protocol::RequestError;

mod context;
pub mod fib;
mod handler;

pub use context::Request;
pub use handler::{blocking, handler, json, Blocking, BoxReply, Handler, Json, JSON_CONTENT_TYPE};

/// CPU work deferred to the blocking pool.
pub type HeavyWork = Box<dyn FnOnce() -> Result<Vec<u8>, RequestError> + Send + 'static>;
/// CPU work deferred to the blocking pool that needs the request.
pub type BlockingWork = Box<dyn FnOnce(Request) -> Result<Vec<u8>, RequestError> + Send + 'static>;
/// Async work: given the request, the future of its reply.
pub type AsyncWork = Box<dyn FnOnce(Request) -> BoxReply + Send + 'static>;

/// What [`Method::prepare`] hands back once the input is known to be valid.
pub enum Work {
    /// The answer, computed inline because it was cheap.
    Done(Vec<u8>),
    /// Work to run off the reactor, at most `service.concurrency` at a time.
    Heavy(HeavyWork),
    /// The same, with the request.
    Blocking(BlockingWork),
    /// A future to await on the reactor (I/O-bound work: it must not block).
    Async(AsyncWork),
}

impl fmt::Debug for Work {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Work::Done(body) => f.debug_tuple("Done").field(&body.len()).finish(),
            Work::Heavy(_) => f.write_str("Heavy(..)"),
            Work::Blocking(_) => f.write_str("Blocking(..)"),
            Work::Async(_) => f.write_str("Async(..)"),
        }
    }
}

/// One RPC method.
pub trait Method: Send + Sync + 'static {
    /// The name requests use in their `type` property.
    fn name(&self) -> &str;
    /// Validate the body and either answer at once or hand back the heavy part.
    /// Must be cheap and must not panic on any input (the daemon catches panics anyway).
    fn prepare(&self, body: &[u8]) -> Result<Work, RequestError>;
    /// Content type of a success reply (error replies are one-line `text/plain`).
    fn content_type(&self) -> &'static str {
        crate::protocol::REPLY_CONTENT_TYPE
    }
    /// A limit of this method's own on requests running at once, if it has one.
    fn limit(&self) -> Option<&Arc<Semaphore>> {
        None
    }
}

/// The methods a daemon serves, by name.
#[derive(Clone, Default)]
pub struct Methods {
    by_name: HashMap<String, Arc<dyn Method>>,
}

impl fmt::Debug for Methods {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.by_name.keys()).finish()
    }
}

impl Methods {
    /// The standard set: the demo `fib` method bounded by `max_n`.
    pub fn standard(max_n: u64) -> Self {
        Methods::default().with(fib::Fib::new(max_n))
    }

    /// Add (or replace) a method.
    pub fn with(mut self, method: impl Method) -> Self {
        self.by_name
            .insert(method.name().to_owned(), Arc::new(method));
        self
    }

    /// Look a method up by the request's `type`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Method>> {
        self.by_name.get(name)
    }

    /// Registered names, for logs.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}
