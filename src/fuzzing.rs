//! Entry points of the fuzz targets in `fuzz/` and of their regression tests, behind the
//! `fuzzing` feature: not part of the API.
//!
//! Each takes what a peer controls, the encoded properties of a message (an AMQP content
//! header's property flags and list, header tables of every field type included) and its body,
//! and runs the code that acts on it, checking what must hold whatever the input: no panic, and
//! exactly one outcome.

use std::sync::Arc;
use std::time::Duration;

use lapin::protocol::basic::parse_properties;
use lapin::BasicProperties;

use crate::protocol::{now_epoch_ms, reply_properties, ErrorCode, RequestError, RequestMeta};
use crate::reply_to::ReplyToPolicy;
use crate::server::decide::{decide, Decision, Delivered, Reply, Rules};
use crate::server::idempotency::Idempotency;
use crate::service::{handler, json, Method, Methods, Request, Work};

/// Decode fuzz input: the first byte's low bit is the delivery's `redelivered` flag, then the
/// encoded properties, the rest is the body. `None` when the properties do not decode (the
/// broker would not have delivered them).
pub fn split(data: &[u8]) -> Option<(bool, BasicProperties, &[u8])> {
    let (&flags, rest) = data.split_first()?;
    let (body, props) = parse_properties(rest).ok()?;
    Some((flags & 1 == 1, props, body))
}

/// A method answered inline, like the demo's small `fib`.
struct Inline;

impl Method for Inline {
    fn name(&self) -> &str {
        "inline"
    }

    fn prepare(&self, body: &[u8]) -> Result<Work, RequestError> {
        match std::str::from_utf8(body)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            Some(n) if n <= 1000 => Ok(Work::Done(n.to_string().into_bytes())),
            Some(_) => Err(RequestError::new(ErrorCode::OutOfRange, "n > 1000")),
            None => Err(RequestError::new(
                ErrorCode::InvalidArgument,
                "not a number",
            )),
        }
    }
}

#[derive(serde::Deserialize)]
struct Pair {
    a: i64,
    b: i64,
}

fn methods() -> Methods {
    Methods::default()
        .with(Inline)
        .with(handler("echo", |req: Request| async move {
            Ok(req.body().to_vec())
        }))
        .with(json("add", |_req: Request, p: Pair| async move {
            p.a.checked_add(p.b)
                .ok_or_else(|| RequestError::new(ErrorCode::OutOfRange, "overflow"))
        }))
        .default_method("inline")
}

/// The daemon's decision on a delivery, twice over one reply cache (a first delivery, then
/// the same request again as the broker would redeliver it), with the reply's properties
/// built as the daemon would send them.
pub fn delivery(data: &[u8]) {
    let Some((redelivered, props, body)) = split(data) else {
        return;
    };
    let mut meta = RequestMeta::from_properties(&props);
    let methods = methods();
    if meta.method.is_empty() {
        meta.method = methods.default_name().unwrap_or_default().to_owned();
    }
    let callers = [("echo".to_owned(), vec!["alice".to_owned()])].into();
    let reply_to = ReplyToPolicy::default();
    let rules = Rules {
        methods: &methods,
        max_body_bytes: 64,
        max_deliveries: 2,
        reply_to: &reply_to,
        callers: &callers,
    };
    let memory = Idempotency::new(16, Duration::from_secs(60));
    for again in [redelivered, true] {
        let delivered = Delivered {
            meta: &meta,
            body,
            redelivered: again,
            now_ms: now_epoch_ms(),
        };
        match decide(&delivered, &rules, &memory) {
            Decision::NoReplyTo => assert!(meta.reply_to.is_none()),
            Decision::ReplyToRefused(_) => {
                let to = meta.reply_to.as_deref().expect("refused a reply_to");
                assert!(reply_to.check(to).is_err());
            }
            Decision::Expired => assert!(meta.expired(now_epoch_ms())),
            Decision::Replay(reply) | Decision::Answer { reply, .. } => {
                let code = reply.as_ref().as_ref().err().map(|e| e.code);
                if let Some(e) = reply.as_ref().as_ref().err() {
                    assert!(!e.message.contains('\n'), "error messages are one line");
                }
                let _ = reply_properties(meta.correlation_id.as_deref(), code, meta.remaining(0));
                remember(&memory, &meta, body, reply);
            }
            Decision::Poison { attempt } => assert!(attempt > rules.max_deliveries),
            Decision::Run { job, .. } => assert!(!matches!(job.work, Work::Done(_))),
        }
    }
}

/// Store an answered reply as `request.rs` does, so the second round meets it.
fn remember(memory: &Idempotency, meta: &RequestMeta, body: &[u8], reply: Arc<Reply>) {
    if let Some(key) = Idempotency::key(meta, body) {
        if crate::server::idempotency::cacheable(&reply) {
            memory.remember(key, reply);
        }
    }
}

/// The client's handling of a reply: a call waits for id `1`; the reply (whatever its
/// correlation id, headers and body) ends that call at most once, and a second copy is only
/// ever counted late.
pub fn reply(data: &[u8]) {
    let Some((_, props, body)) = split(data) else {
        return;
    };
    crate::client::fuzz_reply(props, body.to_vec());
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every file under `fuzz/{corpus,regressions}/<target>/`: the seeds, what the fuzzer
    /// kept, and every input that once failed, run through the target on every test run.
    fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut out = Vec::new();
        for kind in ["corpus", "regressions"] {
            let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) else {
                continue;
            };
            for entry in dir.flatten() {
                let path = entry.path();
                if path.is_file() && !path.ends_with(".gitkeep") {
                    let bytes = std::fs::read(&path).expect("readable");
                    out.push((path.display().to_string(), bytes));
                }
            }
        }
        out
    }

    #[test]
    fn every_kept_delivery_input_holds() {
        let inputs = inputs("delivery");
        assert!(inputs.len() >= 10, "the seeds are there ({})", inputs.len());
        for (name, data) in inputs {
            super::delivery(&data);
            // The hand-written seeds (fuzz/seeds.py) are well-formed requests.
            let seed = [
                "tutorial",
                "ours",
                "idempotent",
                "json",
                "every_type",
                "all_fields",
            ];
            if seed
                .iter()
                .any(|s| name.ends_with(&format!("corpus/delivery/{s}")))
            {
                assert!(super::split(&data).is_some(), "{name} decodes");
            }
        }
    }

    #[test]
    fn every_kept_reply_input_holds() {
        let inputs = inputs("reply");
        assert!(inputs.len() >= 5, "the seeds are there ({})", inputs.len());
        for (_, data) in inputs {
            super::reply(&data);
        }
    }
}
