//! Helpers for tests that run `amqp-rpcd` as a child process: where signals, crashes or the
//! real binary's wiring are the point.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use super::{amqp_url, wait_until_async};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal HTTP/1.0 GET: (status, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        buf.split("\r\n\r\n").nth(1).unwrap_or("").to_owned(),
    ))
}

/// Run `amqp-rpcd` on `queue` with metrics on `port`; its log goes to the test's stderr.
pub async fn spawn_daemon(queue: &str, port: u16, extra_env: &[(&str, &str)]) -> Child {
    spawn_daemon_with(queue, port, extra_env, Stdio::inherit()).await
}

/// Like [`spawn_daemon`], choosing where the log goes (a pipe must be read, or the daemon
/// blocks once it is full).
pub async fn spawn_daemon_with(
    queue: &str,
    port: u16,
    extra_env: &[(&str, &str)],
    stderr: Stdio,
) -> Child {
    // Through `sh -c 'exec'` so the daemon keeps the shell's pid, which is how systemd's
    // WATCHDOG_PID (set to that pid here) names the process it watches.
    Command::new("sh")
        .args([
            "-c",
            "WATCHDOG_PID=$$ exec \"$0\"",
            env!("CARGO_BIN_EXE_amqp-rpcd"),
        ])
        .env("AMQP_RPC__AMQP__URL", amqp_url())
        .env("AMQP_RPC__SERVICE__QUEUE", queue)
        .env("AMQP_RPC__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .envs(extra_env.iter().copied())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("amqp-rpcd runs")
}

pub fn signal(child: &Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    assert!(std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap()
        .success());
}

/// Wait until the child's `/readyz` answers 200.
pub async fn wait_ready(port: u16) {
    wait_until_async(Duration::from_secs(20), "daemon ready", || async move {
        matches!(http_get(port, "/readyz").await, Some((200, _)))
    })
    .await;
}

/// A counter or gauge value from the child's `/metrics` (0 when absent).
pub async fn metric(port: u16, name: &str) -> f64 {
    let Some((_, body)) = http_get(port, "/metrics").await else {
        return 0.0;
    };
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
