//! One client, many services (issue 15): one connection and its one reply consumer call any
//! number of service queues through `Client::service` handles; whether a queue is served is
//! known per queue; typed JSON calls. Real broker, in-process daemons.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp_rpc::protocol::RequestError;
use amqp_rpc::service::{Method, Methods, Work};
use amqp_rpc::{CallError, CallOptions, Client, ErrorCode};
use common::fib::fib_decimal;
use common::proxy::broker_addr;
use common::*;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};

/// Answers `{tag}:{body}`, so a reply shows which daemon (queue) made it.
struct Tag(&'static str);

impl Method for Tag {
    fn name(&self) -> &str {
        "tag"
    }
    fn prepare(&self, body: &[u8]) -> Result<Work, RequestError> {
        Ok(Work::Done([self.0.as_bytes(), b":", body].concat()))
    }
}

/// Answers its request's body as it came.
struct Echo;

impl Method for Echo {
    fn name(&self) -> &str {
        "echo"
    }
    fn prepare(&self, body: &[u8]) -> Result<Work, RequestError> {
        Ok(Work::Done(body.to_vec()))
    }
}

/// Answers something that is not JSON.
struct Garbage;

impl Method for Garbage {
    fn name(&self) -> &str {
        "garbage"
    }
    fn prepare(&self, _body: &[u8]) -> Result<Work, RequestError> {
        Ok(Work::Done(b"not json {".to_vec()))
    }
}

async fn daemon(queue: &str, methods: Methods) -> TestDaemon {
    TestDaemon::start_with(test_config(queue), Some(methods)).await
}

/// A TCP forwarder to the broker that counts the connections made through it: the client's
/// own count of its connections would be its own word, this is the socket layer's. Only the
/// client under test connects through it (the daemons connect to the broker directly).
struct CountingForwarder {
    url: String,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingForwarder {
    async fn start() -> Self {
        let upstream = broker_addr(&amqp_url());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let accepted = accepted.clone();
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        if let Ok(mut broker) = TcpStream::connect(upstream).await {
                            let _ = client.set_nodelay(true);
                            let _ = broker.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                        }
                    });
                }
            }
        });
        let base: lapin::uri::AMQPUri = amqp_url().parse().expect("AMQP_URL parses");
        let user = &base.authority.userinfo;
        let url = format!(
            "amqp://{}:{}@{addr}/{}",
            user.username,
            user.password,
            base.vhost.replace('/', "%2f")
        );
        CountingForwarder {
            url,
            accepted,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CountingForwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn one_client_calls_three_services_concurrently_on_one_connection() {
    let queues = [
        unique_queue("svc-a"),
        unique_queue("svc-b"),
        unique_queue("svc-c"),
    ];
    let tags = ["a", "b", "c"];
    let mut daemons = Vec::new();
    for (queue, tag) in queues.iter().zip(tags) {
        daemons.push(daemon(queue, Methods::default().with(Tag(tag))).await);
    }
    let missing = unique_queue("svc-missing");
    let forwarder = CountingForwarder::start().await;
    let client = Client::builder(forwarder.url.as_str())
        .queue(queues[0].as_str()) // the default queue: `client.call` goes to a
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .expect("client connects");
    let (b, c) = (client.service(&queues[1]), client.service(&queues[2]));
    assert_eq!(
        (client.queue(), b.queue(), c.queue()),
        (&*queues[0], &*queues[1], &*queues[2])
    );
    let gone = client.service(&missing);

    // 3 x 300 calls in flight at once, fib (inline and heavy: replies come back out of order)
    // and tag alternating, plus calls of a queue nobody serves among them.
    const PER_SERVICE: u64 = 300;
    let mut calls = Vec::new();
    for i in 0..PER_SERVICE {
        for s in 0..3usize {
            let (client, b, c) = (client.clone(), b.clone(), c.clone());
            calls.push(tokio::spawn(async move {
                let (method, body) = if i % 2 == 0 {
                    ("fib", ((i * 13 + s as u64) % 3000).to_string())
                } else {
                    ("tag", format!("{i}"))
                };
                let result = match s {
                    0 => client.call(method, body.as_bytes()).await,
                    1 => b.call(method, body.as_bytes()).await,
                    _ => c.call_idempotent(method, body.as_bytes()).await,
                };
                (s, method, body, result)
            }));
        }
    }
    let no_server_calls: Vec<_> = (0..20)
        .map(|i| {
            let gone = gone.clone();
            tokio::spawn(async move {
                let t0 = Instant::now();
                let result = if i % 2 == 0 {
                    gone.call("tag", b"x").await
                } else {
                    gone.call_idempotent("fib", b"10").await
                };
                (result, t0.elapsed())
            })
        })
        .collect();
    for call in calls {
        let (s, method, body, result) = call.await.unwrap();
        let reply = result.unwrap_or_else(|e| panic!("{method}({body}) on {}: {e}", tags[s]));
        let want = match method {
            "fib" => fib_decimal(body.parse().unwrap()),
            _ => format!("{}:{body}", tags[s]),
        };
        assert_eq!(
            String::from_utf8(reply).unwrap(),
            want,
            "{method}({body}) on {}: another call's reply?",
            tags[s]
        );
    }
    for call in no_server_calls {
        let (result, took) = call.await.unwrap();
        let err = result.unwrap_err();
        assert!(
            matches!(&err, CallError::NoServer { queue, .. } if *queue == missing),
            "{err:?}"
        );
        assert!(took < Duration::from_secs(2), "NoServer took {took:?}");
    }
    for daemon in &daemons {
        daemon.expect_requests("fib", "ok", PER_SERVICE / 2).await;
        daemon.expect_requests("tag", "ok", PER_SERVICE / 2).await;
    }
    assert_eq!(client.pending_calls(), 0);
    assert_eq!(client.late_replies(), 0);
    assert_eq!(client.reconnects(), 0);
    assert_eq!(
        forwarder.connections(),
        1,
        "one TCP connection carried the calls to every service"
    );
    for daemon in daemons {
        daemon.stop().await.unwrap();
    }
    for queue in &queues {
        delete_queue(queue).await;
    }
}

#[tokio::test]
async fn whether_a_queue_is_served_is_known_per_queue() {
    let served = unique_queue("svc-served");
    let idle = unique_queue("svc-idle"); // exists, nobody consumes it
    let missing = unique_queue("svc-nowhere");
    let daemon = daemon(&served, Methods::default().with(Tag("s"))).await;
    let _idle = declare_queue(&idle).await;
    let client = client(&served, Duration::from_secs(10)).await;

    // The served queue's fresh "has consumers" (trusted for a second) must not let a request
    // for another queue through unprobed: an idle queue would hold it to the timeout.
    assert_eq!(client.call("tag", b"1").await.unwrap(), b"s:1");
    let t0 = Instant::now();
    let err = client
        .service(&idle)
        .call_timeout("tag", b"2", Duration::from_secs(5))
        .await
        .unwrap_err();
    let no_consumer = match &err {
        CallError::NoServer { reason, queue } => reason.contains("no consumer") && *queue == idle,
        _ => false,
    };
    assert!(no_consumer, "{err:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t0.elapsed()
    );

    // "Served within 30 s" is the served queue's: an idempotent call of another queue still
    // gives up after the one-second window, not at its deadline.
    for queue in [&missing, &idle] {
        let t0 = Instant::now();
        let err = client
            .service(queue)
            .call_idempotent("fib", b"10")
            .await
            .unwrap_err();
        assert!(err.is_no_server(), "{queue}: {err:?}");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{queue}: took {:?}",
            t0.elapsed()
        );
    }

    // And the other way round: the missing queue's probe (which the broker answers by closing
    // the probe channel) leaves the served one served, now and after its cached answer expired.
    assert_eq!(client.call("tag", b"3").await.unwrap(), b"s:3");
    // Past the probe cache's second: the cache is under test, so time itself is the event.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let missing_svc = client.service(&missing);
    let (gone, ok) = tokio::join!(missing_svc.call("tag", b"4"), client.call("tag", b"5"));
    assert!(gone.unwrap_err().is_no_server());
    assert_eq!(ok.unwrap(), b"s:5");
    assert_eq!(fib(&client, 20).await.unwrap().to_string(), "6765");
    assert_eq!(client.pending_calls(), 0);
    daemon.stop().await.unwrap();
    delete_queue(&served).await;
    delete_queue(&idle).await;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u64,
    items: Vec<String>,
    note: Option<String>,
    total: f64,
}

#[derive(Debug, Deserialize)]
struct Receipt {
    #[allow(dead_code)]
    receipt_no: String,
}

#[tokio::test]
async fn call_json_round_trip_and_its_errors() {
    let queue = unique_queue("svc-json");
    let other = unique_queue("svc-json2");
    let methods = || Methods::default().with(Echo).with(Garbage);
    let daemon_a = daemon(&queue, methods()).await;
    let daemon_b = daemon(&other, methods()).await;
    let client = client(&queue, Duration::from_secs(10)).await;
    let order = Order {
        id: 17,
        items: vec!["sku-1".into(), "ünïcødé ✓".into(), "\"quoted\"\n".into()],
        note: None,
        total: 42.5,
    };

    // On the default queue and on another one, at once.
    let svc = client.service(&other);
    let (here, there) = tokio::join!(
        client.call_json::<Order, Order>("echo", &order),
        svc.call_json::<_, Order>("echo", &order),
    );
    assert_eq!(here.unwrap(), order);
    assert_eq!(there.unwrap(), order);
    // Unsized requests, other shapes, explicit options.
    let options = CallOptions {
        timeout: Duration::from_secs(5),
        idempotent: true,
    };
    let words: Vec<String> = svc
        .call_json_with("echo", &["a", "b"][..], options)
        .await
        .unwrap();
    assert_eq!(words, ["a", "b"]);
    let n: u64 = client.call_json("echo", &7u64).await.unwrap();
    assert_eq!(n, 7);

    // A reply that does not deserialize as what the caller expects: the server's fault.
    for (method, callee) in [("echo", &svc), ("garbage", &svc)] {
        let err = callee
            .call_json::<_, Receipt>(method, &order)
            .await
            .unwrap_err();
        let undecodable = match &err {
            CallError::Remote { code, message } => {
                *code == ErrorCode::Internal && message.contains("does not deserialize")
            }
            _ => false,
        };
        assert!(undecodable, "{method}: {err:?}");
        assert!(err.is_remote() && !err.is_retryable() && !err.is_timeout() && !err.is_no_server());
        assert_eq!(err.kind(), "internal");
    }
    // An error reply stays the server's error, not a decoding failure.
    let err = svc
        .call_json::<_, Order>("no-such-method", &order)
        .await
        .unwrap_err();
    assert_eq!(err.remote_code(), Some(ErrorCode::UnknownMethod), "{err:?}");
    // A queue nobody serves is `NoServer`, as for raw calls.
    let err = client
        .service(&unique_queue("svc-json-missing"))
        .call_json::<_, Order>("echo", &order)
        .await
        .unwrap_err();
    assert!(err.is_no_server(), "{err:?}");

    daemon_a.expect_requests("echo", "ok", 2).await;
    daemon_b.expect_requests("echo", "ok", 3).await;
    assert_eq!(client.pending_calls(), 0);
    daemon_a.stop().await.unwrap();
    daemon_b.stop().await.unwrap();
    delete_queue(&queue).await;
    delete_queue(&other).await;
}

#[tokio::test]
async fn json_requests_say_so_on_the_wire() {
    // A raw consumer sees what a server gets: the JSON body and its content type; raw calls
    // are bytes and say nothing of their type (the tutorial's servers never look).
    let queue = unique_queue("svc-json-wire");
    let (_conn, _ch, mut requests) = stalled_server(&queue, None).await;
    let client = client(&queue, Duration::from_secs(10)).await;
    let short = CallOptions {
        timeout: Duration::from_millis(300),
        idempotent: false,
    };
    let order = Order {
        id: 1,
        items: vec![],
        note: Some("n".into()),
        total: 0.0,
    };
    let err = client
        .service(&queue)
        .call_json_with::<_, Order>("echo", &order, short)
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    let err = client.call_with("echo", b"raw", short).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    let json = requests.next().await.unwrap().unwrap();
    assert_eq!(
        json.properties.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(
        json.properties.kind().as_ref().map(|s| s.as_str()),
        Some("echo")
    );
    assert_eq!(serde_json::from_slice::<Order>(&json.data).unwrap(), order);
    let raw = requests.next().await.unwrap().unwrap();
    assert_eq!(
        raw.properties.content_type().as_ref().map(|s| s.as_str()),
        None
    );
    assert_eq!(raw.data, b"raw");
    // A call that is never resent needs no name for its copies.
    assert_eq!(raw.properties.message_id(), &None);
    delete_queue(&queue).await;
}
