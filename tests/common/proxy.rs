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
    sent: Arc<Mutex<Vec<Tap>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listen on `listen` (port 0 for any) and forward to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(listen).await.expect("proxy binds");
        let addr = listener.local_addr().unwrap();
        let blackhole = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(Notify::new());
        let sent: Arc<Mutex<Vec<Tap>>> = Arc::default();
        let task = tokio::spawn({
            let (blackhole, cut, sent) = (blackhole.clone(), cut.clone(), sent.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let tap: Tap = Arc::default();
                    sent.lock().unwrap().push(tap.clone());
                    tokio::spawn(link(client, server, blackhole.clone(), cut.clone(), tap));
                }
            }
        });
        Proxy {
            addr,
            blackhole,
            cut,
            sent,
            task,
        }
    }

    /// What the `n`-th accepted connection has sent towards the broker so far.
    pub fn sent(&self, n: usize) -> Vec<u8> {
        self.sent.lock().unwrap()[n].lock().unwrap().clone()
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
    tap: Tap,
) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        _ = pump(cr, sw, blackhole.clone(), Some(tap)) => {}
        _ = pump(sr, cw, blackhole, None) => {}
        _ = cut.notified() => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blackhole: Arc<AtomicBool>,
    tap: Option<Tap>,
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
        if let Some(tap) = &tap {
            tap.lock().unwrap().extend_from_slice(&buf[..n]);
        }
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

/// AMQP 0-9-1 method frames in a byte stream a client sent (after the protocol header): each
/// `(class_id, method_id, arguments)`, in order. Content header and body frames are skipped.
pub fn method_frames(stream: &[u8]) -> Vec<(u16, u16, Vec<u8>)> {
    let mut rest = stream
        .strip_prefix(b"AMQP\x00\x00\x09\x01")
        .unwrap_or(stream);
    let mut methods = Vec::new();
    while rest.len() >= 7 {
        let kind = rest[0];
        let size = u32::from_be_bytes(rest[3..7].try_into().unwrap()) as usize;
        if rest.len() < 7 + size + 1 {
            break; // a frame still on its way
        }
        let payload = &rest[7..7 + size];
        if kind == 1 && size >= 4 {
            let class = u16::from_be_bytes([payload[0], payload[1]]);
            let method = u16::from_be_bytes([payload[2], payload[3]]);
            methods.push((class, method, payload[4..].to_vec()));
        }
        rest = &rest[7 + size + 1..];
    }
    methods
}
