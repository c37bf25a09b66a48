//! A small TCP proxy between a process under test and the broker, to inject network faults:
//! refuse (not listening yet), cut every connection, or blackhole (keep sockets open, forward
//! nothing, so only heartbeats can notice). It also keeps what each connection sent to the
//! broker, for tests of frame order.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// The bytes one connection sent towards the broker.
type Tap = Arc<Mutex<Vec<u8>>>;

/// A running proxy; dropped, it stops accepting (existing links end at the next cut).
pub struct Proxy {
    pub addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
    cut: Arc<Notify>,
    /// The bytes each accepted connection sent towards the broker, in accept order.
    taps: Arc<Mutex<Vec<(Tap, Tap)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listen on `listen` (port 0 for any) and forward to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(listen).await.expect("proxy binds");
        let addr = listener.local_addr().unwrap();
        let blackhole = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(Notify::new());
        let taps: Arc<Mutex<Vec<(Tap, Tap)>>> = Arc::default();
        let task = tokio::spawn({
            let (blackhole, cut, taps) = (blackhole.clone(), cut.clone(), taps.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let tap: (Tap, Tap) = Default::default();
                    taps.lock().unwrap().push(tap.clone());
                    tokio::spawn(link(client, server, blackhole.clone(), cut.clone(), tap));
                }
            }
        });
        Proxy {
            addr,
            blackhole,
            cut,
            taps,
            task,
        }
    }

    /// What the `n`-th accepted connection has sent towards the broker so far.
    pub fn sent(&self, n: usize) -> Vec<u8> {
        self.taps.lock().unwrap()[n].0.lock().unwrap().clone()
    }

    /// What the `n`-th accepted connection has received from the broker so far.
    pub fn received(&self, n: usize) -> Vec<u8> {
        self.taps.lock().unwrap()[n].1.lock().unwrap().clone()
    }

    /// Close every open link at once (like a network cut that resets connections).
    pub fn cut_all(&self) {
        self.cut.notify_waiters();
    }

    /// Stop (or resume) forwarding bytes while keeping the sockets open.
    pub fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::SeqCst);
    }

    /// An AMQP URL through this proxy, with `base`'s credentials and vhost.
    pub fn url(&self, base: &str) -> String {
        let mut uri: lapin::uri::AMQPUri = base.parse().expect("base URL parses");
        uri.authority.host = self.addr.ip().to_string();
        uri.authority.port = self.addr.port();
        let user = &uri.authority.userinfo;
        format!(
            "amqp://{}:{}@{}:{}/%2f",
            user.username, user.password, uri.authority.host, uri.authority.port
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut.notify_waiters();
    }
}

async fn link(
    client: TcpStream,
    server: TcpStream,
    blackhole: Arc<AtomicBool>,
    cut: Arc<Notify>,
    (sent, received): (Tap, Tap),
) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        _ = pump(cr, sw, blackhole.clone(), sent) => {}
        _ = pump(sr, cw, blackhole, received) => {}
        _ = cut.notified() => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blackhole: Arc<AtomicBool>,
    tap: Tap,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if blackhole.load(Ordering::SeqCst) {
            continue; // swallowed: the peer sees silence, not a close
        }
        tap.lock().unwrap().extend_from_slice(&buf[..n]);
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The broker's socket address from `AMQP_URL`.
pub fn broker_addr(url: &str) -> SocketAddr {
    let uri: lapin::uri::AMQPUri = url.split(',').next().unwrap().parse().expect("URL parses");
    let host = if uri.authority.host == "localhost" {
        "127.0.0.1".to_owned()
    } else {
        uri.authority.host
    };
    format!("{host}:{}", uri.authority.port)
        .parse()
        .expect("broker host is an IP or localhost")
}

/// One AMQP 0-9-1 method frame of a recorded stream.
pub struct Method {
    pub class: u16,
    pub method: u16,
    pub args: Vec<u8>,
    /// For a method with content (publish, deliver): the `correlation_id` of its content
    /// header, when it has one.
    pub correlation_id: Option<String>,
}

/// The method frames of a recorded stream (either direction), in order; the protocol header
/// and a frame still on its way at the end are skipped.
pub fn method_frames(stream: &[u8]) -> Vec<Method> {
    let mut rest = stream
        .strip_prefix(b"AMQP\x00\x00\x09\x01")
        .unwrap_or(stream);
    let mut methods: Vec<Method> = Vec::new();
    while rest.len() >= 7 {
        let kind = rest[0];
        let size = u32::from_be_bytes(rest[3..7].try_into().unwrap()) as usize;
        if rest.len() < 7 + size + 1 {
            break;
        }
        let payload = &rest[7..7 + size];
        match kind {
            1 => methods.push(Method {
                class: u16::from_be_bytes([payload[0], payload[1]]),
                method: u16::from_be_bytes([payload[2], payload[3]]),
                args: payload[4..].to_vec(),
                correlation_id: None,
            }),
            2 => {
                if let Some(last) = methods.last_mut() {
                    last.correlation_id = correlation_id(payload);
                }
            }
            _ => {}
        }
        rest = &rest[7 + size + 1..];
    }
    methods
}

/// The `correlation_id` of a content header frame's payload: class, weight, body size, then
/// the property flags and the properties in their fixed order (content-type, content-encoding,
/// headers, delivery-mode, priority, correlation-id).
fn correlation_id(header: &[u8]) -> Option<String> {
    let flags = u16::from_be_bytes([header[12], header[13]]);
    let mut at = 14;
    let short_str = |at: &mut usize| {
        let len = header[*at] as usize;
        let s = String::from_utf8_lossy(&header[*at + 1..*at + 1 + len]).into_owned();
        *at += 1 + len;
        s
    };
    if flags & (1 << 15) != 0 {
        short_str(&mut at);
    }
    if flags & (1 << 14) != 0 {
        short_str(&mut at);
    }
    if flags & (1 << 13) != 0 {
        at += 4 + u32::from_be_bytes(header[at..at + 4].try_into().unwrap()) as usize;
    }
    at += usize::from(flags & (1 << 12) != 0) + usize::from(flags & (1 << 11) != 0);
    (flags & (1 << 10) != 0).then(|| short_str(&mut at))
}
