//! Every branch of [`decide`] and the drain's decision, without a broker: a fake [`Memory`]
//! stands in for the reply cache and says what it was asked.

use std::cell::Cell;

use super::*;
use crate::service::Method;

const NOW: u64 = 1_764_572_400_000;
const MAX_BODY: usize = 16;
const MAX_DELIVERIES: u32 = 3;
/// A direct reply-to address of the shape brokers hand out.
const DIRECT: &str =
    "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AAA8DQAAAABrDsDK.2CUud3s79kInSgWszR/mDw==";

/// A method whose `prepare` is a plain function.
struct Test {
    name: &'static str,
    prepare: fn(&[u8]) -> Result<Work, RequestError>,
}

impl Method for Test {
    fn name(&self) -> &str {
        self.name
    }
    fn prepare(&self, body: &[u8]) -> Result<Work, RequestError> {
        (self.prepare)(body)
    }
}

fn methods() -> Methods {
    let method = |name, prepare| Test { name, prepare };
    Methods::default()
        .with(method("inline", |body| Ok(Work::Done(body.to_vec()))))
        .with(method("heavy", |_| {
            Ok(Work::Heavy(Box::new(|| Ok(b"h".to_vec()))))
        }))
        .with(method("refuse", |_| {
            Err(RequestError::new(ErrorCode::OutOfRange, "n is too big"))
        }))
        .with(method("busy", |_| {
            Err(RequestError::new(ErrorCode::Unavailable, "busy"))
        }))
        .with(method("panics", |_| panic!("a bug in prepare")))
        .with(method("guarded", |body| Ok(Work::Done(body.to_vec()))))
}

/// `service.callers` of these tests: `guarded` answers alice only.
fn callers() -> HashMap<String, Vec<String>> {
    HashMap::from([("guarded".to_owned(), vec!["alice".to_owned()])])
}

/// The reply cache as the decision sees it, counting what it is asked.
#[derive(Default)]
struct Fake {
    cached: Option<CachedReply>,
    attempt: u32,
    asked_cache: Cell<u32>,
    asked_attempt: Cell<u32>,
}

impl Fake {
    fn attempt(attempt: u32) -> Self {
        Fake {
            attempt,
            ..Fake::default()
        }
    }

    fn holding(reply: &[u8]) -> Self {
        Fake {
            cached: Some(Arc::new(Ok(reply.to_vec()))),
            attempt: 1,
            ..Fake::default()
        }
    }

    fn asked(&self) -> (u32, u32) {
        (self.asked_cache.get(), self.asked_attempt.get())
    }
}

impl Memory for Fake {
    fn cached(&self, _key: &str) -> Option<CachedReply> {
        self.asked_cache.set(self.asked_cache.get() + 1);
        self.cached.clone()
    }
    fn attempt(&self, _key: &str, _meta: &RequestMeta, _redelivered: bool) -> u32 {
        self.asked_attempt.set(self.asked_attempt.get() + 1);
        self.attempt
    }
}

/// A request for `method` as a fresh publish with a `correlation_id` and no `message_id`.
fn meta(method: &str) -> RequestMeta {
    RequestMeta {
        reply_to: Some(DIRECT.into()),
        correlation_id: Some("1".into()),
        method: method.into(),
        ..RequestMeta::default()
    }
}

fn named(method: &str) -> RequestMeta {
    RequestMeta {
        message_id: Some("call-7".into()),
        ..meta(method)
    }
}

fn decide_on(meta: &RequestMeta, body: &[u8], redelivered: bool, memory: &Fake) -> Decision {
    decide_among(&methods(), meta, body, redelivered, memory)
}

/// A first delivery, the cache remembering nothing.
fn first(meta: &RequestMeta, body: &[u8]) -> Decision {
    decide_on(meta, body, false, &Fake::attempt(1))
}

fn decide_among(
    methods: &Methods,
    meta: &RequestMeta,
    body: &[u8],
    redelivered: bool,
    memory: &Fake,
) -> Decision {
    let delivered = Delivered {
        meta,
        body,
        redelivered,
        now_ms: NOW,
    };
    let rules = Rules {
        methods,
        max_body_bytes: MAX_BODY,
        max_deliveries: MAX_DELIVERIES,
        reply_to: &ReplyToPolicy::default(),
        callers: &callers(),
    };
    decide(&delivered, &rules, memory)
}

fn answer(decision: Decision) -> (Reply, Option<String>) {
    match decision {
        Decision::Answer { reply, remember } => (reply.as_ref().clone(), remember),
        other => panic!("expected an answer, got {other:?}"),
    }
}

/// The attempt and the caching of a decision to run.
fn runs(decision: &Decision) -> Option<(u32, &Caching)> {
    match decision {
        Decision::Run {
            attempt, caching, ..
        } => Some((*attempt, caching)),
        _ => None,
    }
}

fn error(decision: Decision) -> RequestError {
    match answer(decision).0 {
        Err(e) => e,
        Ok(body) => panic!("expected an error, got {body:?}"),
    }
}

#[test]
fn without_reply_to_nothing_else_is_looked_at() {
    let memory = Fake::holding(b"cached");
    let m = RequestMeta {
        reply_to: None,
        deadline_ms: Some(NOW - 1),
        ..named("inline")
    };
    let d = decide_on(&m, b"x", true, &memory);
    assert!(matches!(d, Decision::NoReplyTo), "{d:?}");
    assert_eq!(memory.asked(), (0, 0));
}

#[test]
fn a_request_past_its_deadline_is_dropped_before_the_cache() {
    let memory = Fake::holding(b"cached");
    let due = |deadline| RequestMeta {
        deadline_ms: Some(deadline),
        ..named("inline")
    };
    for deadline in [NOW - 1, NOW] {
        let d = decide_on(&due(deadline), b"x", false, &memory);
        assert!(matches!(d, Decision::Expired), "{d:?}");
    }
    assert_eq!(memory.asked(), (0, 0), "expired copies count no attempt");
    let d = decide_on(&due(NOW + 1), b"x", false, &memory);
    assert!(matches!(d, Decision::Replay(_)), "{d:?}");
}

#[test]
fn a_named_call_is_answered_from_the_cache_without_counting_an_attempt() {
    let memory = Fake::holding(b"cached");
    match decide_on(&named("heavy"), b"x", false, &memory) {
        Decision::Replay(reply) => assert_eq!(reply.as_ref().as_ref().unwrap(), b"cached"),
        other => panic!("{other:?}"),
    }
    assert_eq!(memory.asked(), (1, 0));
}

#[test]
fn a_fresh_publish_without_message_id_is_computed_again() {
    let memory = Fake::holding(b"cached");
    let d = decide_on(&meta("heavy"), b"x", false, &memory);
    let key = Idempotency::key(&meta("heavy"), b"x").unwrap();
    assert_eq!(runs(&d), Some((1, &Caching::Remember(key))));
    assert_eq!(memory.asked(), (0, 1), "the cache is not asked");
}

#[test]
fn a_redelivered_copy_without_message_id_is_a_duplicate() {
    let memory = Fake::holding(b"cached");
    let quorum = RequestMeta {
        delivery_count: Some(1),
        ..meta("heavy")
    };
    for (m, redelivered) in [(meta("heavy"), true), (quorum, false)] {
        let d = decide_on(&m, b"x", redelivered, &memory);
        assert!(matches!(d, Decision::Replay(_)), "{d:?}");
    }
    let d = decide_on(&meta("heavy"), b"x", true, &Fake::attempt(2));
    let key = Idempotency::key(&meta("heavy"), b"x").unwrap();
    assert_eq!(runs(&d), Some((2, &Caching::SingleFlight(key))));
}

#[test]
fn past_max_deliveries_a_request_is_poison_before_any_check() {
    let memory = Fake::attempt(MAX_DELIVERIES + 1);
    let big = [b'1'; MAX_BODY + 1];
    let d = decide_on(&named("nope"), &big, true, &memory);
    assert!(
        matches!(d, Decision::Poison { attempt } if attempt == MAX_DELIVERIES + 1),
        "{d:?}"
    );
    assert_eq!(memory.asked(), (1, 1));
    let d = decide_on(&named("heavy"), b"x", true, &Fake::attempt(MAX_DELIVERIES));
    assert_eq!(runs(&d).map(|(attempt, _)| attempt), Some(MAX_DELIVERIES));
}

#[test]
fn heavy_work_of_a_named_call_runs_single_flight() {
    match first(&named("heavy"), b"x") {
        Decision::Run {
            job,
            attempt: 1,
            caching: Caching::SingleFlight(key),
        } => {
            assert!(matches!(job.work, Work::Heavy(_)));
            assert!(job.limit.is_none());
            assert_eq!(Some(key), Idempotency::key(&named("heavy"), b"x"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn inline_work_is_answered_and_remembered_after() {
    let (reply, remember) = answer(first(&named("inline"), b"42"));
    assert_eq!(reply.unwrap(), b"42");
    assert_eq!(remember, Idempotency::key(&named("inline"), b"42"));
}

#[test]
fn a_refusal_is_remembered_but_one_about_the_moment_is_not() {
    let (reply, remember) = answer(first(&named("refuse"), b"x"));
    assert_eq!(reply.unwrap_err().code, ErrorCode::OutOfRange);
    assert!(remember.is_some(), "a fact about the request");
    let (reply, remember) = answer(first(&named("busy"), b"x"));
    assert_eq!(reply.unwrap_err().code, ErrorCode::Unavailable);
    assert_eq!(remember, None, "a retry deserves a fresh attempt");
}

#[test]
fn a_panic_in_prepare_is_an_internal_error() {
    let e = error(first(&named("panics"), b"x"));
    assert_eq!(e.code, ErrorCode::Internal);
}

#[test]
fn without_any_id_the_request_is_answered_invalid_argument_and_nothing_is_kept() {
    let memory = Fake::holding(b"cached");
    let m = RequestMeta {
        correlation_id: None,
        ..meta("inline")
    };
    let (reply, remember) = answer(decide_on(&m, b"x", true, &memory));
    let e = reply.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.contains("correlation_id"), "{}", e.message);
    assert_eq!(remember, None);
    assert_eq!(memory.asked(), (0, 0), "no key: no cache, no attempt count");
}

#[test]
fn the_checks_go_in_the_contract_order() {
    let big = [b'1'; MAX_BODY + 1];
    let no_correlation = RequestMeta {
        correlation_id: None,
        ..named("nope")
    };
    let e = error(first(&no_correlation, &big));
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    let e = error(first(&named("nope"), &big));
    assert_eq!(e.code, ErrorCode::ResourceExhausted);
    let expected = format!(
        "request body is {} bytes, over the limit of {MAX_BODY} bytes",
        big.len()
    );
    assert_eq!(e.message, expected);
    let (reply, _) = answer(first(&named("inline"), &[b'1'; MAX_BODY]));
    assert!(reply.is_ok(), "the limit itself is allowed");
}

#[test]
fn an_unknown_method_is_named_with_the_served_ones() {
    let e = error(first(&named("nope"), b"x"));
    assert_eq!(e.code, ErrorCode::UnknownMethod);
    assert_eq!(
        e.message,
        "unknown method \"nope\"; this server has: busy, guarded, heavy, inline, panics, refuse"
    );
    let e = error(first(&named(&"é".repeat(100)), b"x"));
    let cut = format!("unknown method \"{}\";", "é".repeat(64));
    assert!(e.message.starts_with(&cut), "{}", e.message);
}

#[test]
fn a_request_naming_no_method_without_a_default_is_told_so() {
    let e = error(first(&named(""), b"x"));
    assert_eq!(e.code, ErrorCode::UnknownMethod);
    assert_eq!(
        e.message,
        "the request names no method (`type`) and this server has no default method; \
         name one of: busy, guarded, heavy, inline, panics, refuse"
    );
    let memory = Fake::attempt(1);
    let e = error(decide_among(
        &Methods::default(),
        &named(""),
        b"x",
        false,
        &memory,
    ));
    assert_eq!(
        e.message,
        "the request names no method (`type`) and this server has no default method"
    );
}

#[test]
fn a_request_naming_no_method_gets_the_default_one() {
    let with_default = methods().default_method("inline");
    let decision = decide_among(&with_default, &named(""), b"7", false, &Fake::attempt(1));
    assert_eq!(answer(decision).0.unwrap(), b"7");
    assert_eq!(method_label(&with_default, ""), "inline");
    assert_eq!(method_label(&methods(), ""), UNKNOWN_METHOD_LABEL);
    assert_eq!(method_label(&methods(), "heavy"), "heavy");
    assert_eq!(method_label(&methods(), "nope"), UNKNOWN_METHOD_LABEL);
}

#[test]
fn delivered_before_counts_the_flag_and_the_quorum_counters() {
    let counted = |n| RequestMeta {
        delivery_count: Some(n),
        ..meta("x")
    };
    assert!(!delivered_before(&meta("x"), false));
    assert!(delivered_before(&meta("x"), true));
    assert!(!delivered_before(&counted(0), false));
    assert!(delivered_before(&counted(2), false));
}

#[test]
fn a_reply_is_too_late_only_once_the_deadline_has_passed() {
    assert!(!too_late_to_reply(None));
    assert!(!too_late_to_reply(Some(Duration::from_millis(1))));
    assert!(too_late_to_reply(Some(Duration::ZERO)));
}

#[test]
fn a_poison_reply_says_how_many_attempts() {
    let e = given_up(4, 3).unwrap_err();
    assert_eq!(e.code, ErrorCode::Internal);
    let expected = "request given up after 4 delivery attempts (max_deliveries = 3)";
    assert_eq!(e.message, expected);
}

#[test]
fn a_drain_requeues_unless_too_little_time_is_left() {
    let m = meta("heavy");
    assert!(matches!(drained(&m, None), Drained::Requeue));
    let enough = Some(REQUEUE_MIN_REMAINING);
    assert!(matches!(drained(&m, enough), Drained::Requeue));
    let short = Some(REQUEUE_MIN_REMAINING - Duration::from_millis(1));
    match drained(&m, short) {
        Drained::Refuse { reply_to, error } => {
            assert_eq!(reply_to, DIRECT);
            assert_eq!(error.unwrap_err().code, ErrorCode::Unavailable);
        }
        other => panic!("{other:?}"),
    }
    let nobody = RequestMeta {
        reply_to: None,
        ..m
    };
    assert!(matches!(drained(&nobody, short), Drained::Requeue));
}

#[test]
fn a_reply_to_the_policy_refuses_is_never_answered_nor_looked_up() {
    for (to, refusal) in [
        ("billing", Refusal::NotAllowed),
        ("amq.rabbitmq.reply-to.AAAA.BBBB", Refusal::MalformedDirect),
    ] {
        let m = RequestMeta {
            reply_to: Some(to.into()),
            ..named("inline")
        };
        let memory = Fake::attempt(1);
        let d = decide_on(&m, b"x", true, &memory);
        assert!(
            matches!(d, Decision::ReplyToRefused(r) if r == refusal),
            "{to}: {d:?}"
        );
        assert_eq!(
            (memory.asked_cache.get(), memory.asked_attempt.get()),
            (0, 0)
        );
    }
}

#[test]
fn a_guarded_method_answers_its_callers_and_denies_the_rest_before_the_cache() {
    let as_user = |user: Option<&str>| RequestMeta {
        user_id: user.map(str::to_owned),
        ..named("guarded")
    };
    for user in [None, Some("bob")] {
        // Even a cached reply of the same call is not handed to a caller who may not call.
        let memory = Fake {
            cached: Some(Arc::new(Ok(b"secret".to_vec()))),
            ..Fake::attempt(1)
        };
        let (reply, remember) = answer(decide_on(&as_user(user), b"x", true, &memory));
        let err = reply.unwrap_err();
        assert_eq!(err.code, ErrorCode::PermissionDenied, "{user:?}");
        assert!(remember.is_none());
        assert_eq!(memory.asked_cache.get(), 0, "{user:?}");
    }
    let (reply, _) = answer(first(&as_user(Some("alice")), b"x"));
    assert_eq!(reply.unwrap(), b"x");
    // Methods not listed answer anyone.
    let (reply, _) = answer(first(&named("inline"), b"y"));
    assert_eq!(reply.unwrap(), b"y");
}
