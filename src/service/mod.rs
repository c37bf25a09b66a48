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
#[non_exhaustive]
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
    /// Content type of a success reply, if it has one (error replies are one-line
    /// `text/plain`). None, the default, is raw bytes: the reply carries no `content_type`.
    fn content_type(&self) -> Option<&'static str> {
        None
    }
    /// A limit of this method's own on requests running at once, if it has one.
    fn limit(&self) -> Option<&Arc<Semaphore>> {
        None
    }
}

/// The methods a daemon serves, by name, and the one a request without a `type` gets.
#[derive(Clone, Default)]
pub struct Methods {
    by_name: HashMap<String, Arc<dyn Method>>,
    default: Option<Arc<dyn Method>>,
}

impl fmt::Debug for Methods {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Methods")
            .field("names", &self.names())
            .field("default", &self.default.as_ref().map(|m| m.name()))
            .finish()
    }
}

impl Methods {
    /// Add (or replace) a method.
    pub fn with(mut self, method: impl Method) -> Self {
        let method: Arc<dyn Method> = Arc::new(method);
        if self
            .default
            .as_ref()
            .is_some_and(|d| d.name() == method.name())
        {
            self.default = Some(method.clone());
        }
        self.by_name.insert(method.name().to_owned(), method);
        self
    }

    /// Answer requests that name no method (no or an empty `type`, as the RabbitMQ
    /// tutorial's clients send) with `name`, which must have been added. Without a default
    /// such requests get `unknown_method`. `service.default_method` overrides this.
    ///
    /// # Panics
    /// When no method `name` was added: a programming error, found at start-up.
    pub fn default_method(mut self, name: &str) -> Self {
        let method = self
            .by_name
            .get(name)
            .unwrap_or_else(|| panic!("default_method({name:?}): no such method was added"));
        self.default = Some(method.clone());
        self
    }

    /// Look a method up by the request's `type`; the empty name is the default method.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Method>> {
        match name {
            "" => self.default.as_ref(),
            name => self.by_name.get(name),
        }
    }

    /// The default method's name, if there is one.
    pub fn default_name(&self) -> Option<&str> {
        self.default.as_ref().map(|m| m.name())
    }

    /// Registered names, sorted, for logs.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping(_req: Request) -> BoxReply {
        Box::pin(async { Ok(b"pong".to_vec()) })
    }

    #[test]
    fn the_empty_name_is_the_default_method_when_there_is_one() {
        let methods = Methods::default().with(handler("ping", ping));
        assert!(methods.get("").is_none(), "no default unless asked for");
        let methods = methods.default_method("ping");
        assert_eq!(methods.get("").map(|m| m.name()), Some("ping"));
        assert_eq!(methods.default_name(), Some("ping"));
        assert!(methods.get("pong").is_none());
        // Replacing the default method's implementation keeps it the default.
        let methods = methods.with(handler("ping", ping).limit(1));
        assert!(methods.get("").unwrap().limit().is_some());
    }

    #[test]
    #[should_panic(expected = "no such method")]
    fn a_default_method_must_exist() {
        let _ = Methods::default().default_method("fib");
    }
}
