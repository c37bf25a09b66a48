//! A private RabbitMQ node per test, for the faults the shared broker must never suffer:
//! `stop_app`/`start_app`, SIGKILL of the node's VM, and a restart on the same ports and data.
//! Several can boot at once and be joined into a cluster (see [`super::cluster`]).
//!
//! The node gets its own name, AMQP and distribution ports on 127.0.0.1, and a temp dir holding
//! its config, data and logs, so nothing is read from `/etc/rabbitmq` (whose config binds 5672,
//! the shared node's port) and nothing is written where the shared node keeps its state. It
//! reuses the shared Erlang cookie (read-only), so `rabbitmqctl` reaches it as it is.
//!
//! With `AMQP_RPC_TEST_RABBITMQ_ROOT` naming a folder holding another RabbitMQ (made and
//! prepared by `deploy/local/rabbitmq4.sh`: RabbitMQ 4.3 from Debian testing, its own Erlang),
//! the nodes boot inside it instead, with chroot(1) as that folder's `rabbitmq` user: their
//! directories are `ROOT/tmp/amqprpc-<id>` (`/tmp/amqprpc-<id>` to the node), they register
//! with the folder's own epmd (`AMQP_RPC_TEST_RABBITMQ_EPMD_PORT`, default 4374; the host's
//! belongs to the host's node), use the folder's cookie, and [`cli`](PrivateBroker::cli) runs the
//! folder's CLI tools. Unset, the host's RabbitMQ runs them, as above.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};

/// The real server script, not `/usr/sbin/rabbitmq-server`: that wrapper runs it through
/// `su` (so the VM would not be our child) after `cd`-ing into the shared node's home.
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// As root this wrapper drops to the `rabbitmq` user, whose home holds the cookie.
pub const CTL: &str = "/usr/sbin/rabbitmqctl";
/// Quorum queue status, same wrapper and cookie.
pub const QUEUES: &str = "/usr/sbin/rabbitmq-queues";
/// The `rabbitmq` user's home: its owner is the user the node runs as, and its
/// `.erlang.cookie` is the one `rabbitmqctl` uses.
const RABBITMQ_HOME: &str = "/var/lib/rabbitmq";
/// The folder's CLI tools, by the name of the host's wrapper ([`CTL`], [`QUEUES`]). Run as the
/// folder's `rabbitmq` user directly, so no `su` is needed in there.
const FOLDER_BIN: &str = "/usr/lib/rabbitmq/bin";
/// chroot(1) `exec`s its command, as `env` does: the process spawned stays the node's VM.
const CHROOT: &str = "/usr/sbin/chroot";
/// The epmd of the nodes in a folder, unless `AMQP_RPC_TEST_RABBITMQ_EPMD_PORT` says otherwise
/// (the same default as deploy/local/rabbitmq4.sh).
const FOLDER_EPMD_PORT: u16 = 4374;
/// A cold boot takes 5-15 s; allow for a loaded machine.
const BOOT_LIMIT: Duration = Duration::from_secs(60);
/// A CLI command against a live node answers in about a second; one against a dead or booting
/// node gives up by itself, but nothing may hang a test.
const CLI_LIMIT: Duration = Duration::from_secs(60);

/// A folder holding another RabbitMQ, which the nodes run chrooted in.
struct Folder {
    root: PathBuf,
    /// The folder's `rabbitmq` user, whom the nodes run as (its uid is someone else's on the
    /// host).
    uid: u32,
    gid: u32,
    /// The folder's epmd (the host's belongs to the host's node).
    epmd_port: u16,
}

/// The folder named by `AMQP_RPC_TEST_RABBITMQ_ROOT`, read once; `None`: the host's RabbitMQ.
fn folder() -> Option<&'static Folder> {
    static FOLDER: OnceLock<Option<Folder>> = OnceLock::new();
    FOLDER
        .get_or_init(|| {
            let root = std::env::var_os("AMQP_RPC_TEST_RABBITMQ_ROOT").filter(|r| !r.is_empty())?;
            let root = PathBuf::from(root);
            assert!(
                running_as_root(),
                "AMQP_RPC_TEST_RABBITMQ_ROOT={} needs root (chroot)",
                root.display()
            );
            // What deploy/local/rabbitmq4.sh's prepare step provides; without it nodes fail in
            // obscure ways (no /proc: no memory detection; no hosts: no `@localhost`).
            for needed in [
                "proc/self",
                "etc/hosts",
                "dev/urandom",
                "var/lib/rabbitmq/.erlang.cookie",
            ] {
                assert!(
                    root.join(needed).exists(),
                    "{} has no {needed}: run `deploy/local/rabbitmq4.sh prepare` (or start)",
                    root.display()
                );
            }
            let passwd =
                std::fs::read_to_string(root.join("etc/passwd")).expect("the folder's passwd");
            let entry: Vec<&str> = passwd
                .lines()
                .find(|l| l.starts_with("rabbitmq:"))
                .expect("a rabbitmq user in the folder")
                .split(':')
                .collect();
            let epmd_port = match std::env::var("AMQP_RPC_TEST_RABBITMQ_EPMD_PORT") {
                Ok(p) => p
                    .parse()
                    .expect("AMQP_RPC_TEST_RABBITMQ_EPMD_PORT is a port"),
                Err(_) => FOLDER_EPMD_PORT,
            };
            Some(Folder {
                root,
                uid: entry[2].parse().expect("rabbitmq's uid"),
                gid: entry[3].parse().expect("rabbitmq's gid"),
                epmd_port,
            })
        })
        .as_ref()
}

/// The user the nodes run as (when we are root): the folder's `rabbitmq`, or whoever owns the
/// host's `rabbitmq` home.
fn rabbitmq_user() -> (u32, u32) {
    match folder() {
        Some(f) => (f.uid, f.gid),
        None => {
            let owner = std::fs::metadata(RABBITMQ_HOME).expect("rabbitmq home");
            (owner.uid(), owner.gid())
        }
    }
}

/// A RabbitMQ node of our own; dropped, its VM is killed and its temp dir removed.
pub struct PrivateBroker {
    node: String,
    port: u16,
    dist_port: u16,
    /// The node's directory, where we write and read its files.
    dir: PathBuf,
    /// The same directory as the node sees it (differs when it runs in a folder).
    node_dir: PathBuf,
    /// The node's VM itself: with `RABBITMQ_ALLOW_INPUT` the script `exec`s into `erl`, which
    /// `exec`s `beam.smp` (in a folder, `chroot` and `env` before them `exec` too), so this
    /// handle is exactly this node's VM (checked at each boot).
    /// `None` after [`kill9`](Self::kill9).
    beam: Option<Child>,
    /// How long the last boot (start or restart) took until the AMQP handshake succeeded.
    pub boot_time: Duration,
}

impl PrivateBroker {
    /// Boot a fresh node and wait until it accepts AMQP connections.
    pub async fn start() -> PrivateBroker {
        Self::start_with("", &[]).await
    }

    /// Like [`start`](Self::start), with more `rabbitmq.conf` lines and files in the node's
    /// directory (`{dir}` in the lines is replaced by that directory, as the node sees it),
    /// e.g. a TLS listener.
    pub async fn start_with(extra_conf: &str, extra_files: &[(&str, String)]) -> PrivateBroker {
        let ports = free_ports(2);
        let mut broker = Self::prepare(ports[0], ports[1], extra_conf, extra_files);
        broker.boot().await;
        broker
    }

    /// `n` fresh, unclustered nodes booted at once: a boot is mostly the VM waiting on itself,
    /// so in parallel they take little longer than one.
    pub async fn start_many(n: usize) -> Vec<PrivateBroker> {
        let ports = free_ports(2 * n);
        let mut nodes: Vec<_> = ports
            .chunks(2)
            .map(|p| Self::prepare(p[0], p[1], "", &[]))
            .collect();
        futures_util::future::join_all(nodes.iter_mut().map(|node| node.boot())).await;
        nodes
    }

    /// Name the node and write its directory; nothing runs yet.
    fn prepare(
        port: u16,
        dist_port: u16,
        extra_conf: &str,
        extra_files: &[(&str, String)],
    ) -> PrivateBroker {
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let name = format!("amqprpc-{id}");
        let (dir, node_dir) = match folder() {
            None => (
                std::env::temp_dir().join(&name),
                std::env::temp_dir().join(&name),
            ),
            // Inside the folder, where the node can see it.
            Some(f) => (
                f.root.join("tmp").join(&name),
                Path::new("/tmp").join(&name),
            ),
        };
        std::fs::create_dir_all(&dir).expect("broker temp dir");
        let extra_conf = extra_conf.replace("{dir}", node_dir.to_str().expect("UTF-8 temp dir"));
        let mut files = vec![
            // An explicit listener, so the node never reads the shared one's 5672 config.
            (
                "rabbitmq.conf",
                format!(
                    "listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users.guest = true\n{extra_conf}"
                ),
            ),
            // The default path is /etc/rabbitmq's; an empty file is a parse error, `[].` is not.
            ("advanced.config", "[].\n".into()),
            // No plugins: faster boot, and no management listener to clash on 15672.
            ("enabled_plugins", String::new()),
            // Replaces /etc/rabbitmq/rabbitmq-env.conf, which names the shared node.
            ("rabbitmq-env.conf", String::new()),
        ];
        files.extend(extra_files.iter().map(|(n, t)| (*n, t.clone())));
        for (name, text) in &files {
            std::fs::write(dir.join(name), text).expect("broker config file");
        }
        // The node runs as the `rabbitmq` user, which must own its data and log dirs.
        if running_as_root() {
            let (uid, gid) = rabbitmq_user();
            for path in std::iter::once(dir.clone()).chain(files.iter().map(|f| dir.join(f.0))) {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown to rabbitmq");
            }
        }
        PrivateBroker {
            node: format!("{name}@localhost"),
            port,
            dist_port,
            dir,
            node_dir,
            beam: None,
            boot_time: Duration::ZERO,
        }
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f` (guest may log in over loopback).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Stop the RabbitMQ application (the VM stays up): every connection is closed by the
    /// broker and the listener goes away. Returns once `rabbitmqctl` says it is done.
    pub async fn stop_app(&self) {
        self.ctl(&["stop_app"]).await;
    }

    /// Start the application again; returns once it accepts AMQP connections.
    pub async fn start_app(&mut self) {
        let t0 = Instant::now();
        self.ctl(&["start_app"]).await;
        self.wait_up(t0).await;
    }

    /// Make this freshly booted node a member of `seed`'s cluster (its own empty state is
    /// reset by the join); returns once it accepts AMQP connections again.
    pub async fn join(&mut self, seed: &str) {
        self.ctl(&["stop_app"]).await;
        self.ctl(&["join_cluster", seed]).await;
        self.start_app().await;
    }

    /// Whether the node's VM runs (false between [`kill9`](Self::kill9) and a restart).
    pub fn is_running(&self) -> bool {
        self.beam.is_some()
    }

    /// SIGKILL the node's VM: no connection.close, sockets just die, non-durable queues are
    /// gone. Waits until the process has exited.
    pub fn kill9(&mut self) {
        let mut beam = self.beam.take().expect("node running");
        beam.kill().expect("SIGKILL the node's beam");
        beam.wait().expect("reap the node's beam");
    }

    /// Boot the node again on the same ports and data dir (after [`kill9`](Self::kill9)).
    pub async fn restart(&mut self) {
        assert!(self.beam.is_none(), "restart() follows kill9()");
        self.boot().await;
    }

    /// Start the VM and wait for the broker to accept connections.
    async fn boot(&mut self) {
        let t0 = Instant::now();
        // Paths as the node sees them, for its environment.
        let node_dir = self.node_dir.clone();
        let at = |name: &str| node_dir.join(name);
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("console.log"))
            .expect("console log");
        let mut cmd = match folder() {
            None => {
                let mut cmd = Command::new(SERVER);
                cmd.current_dir(&self.dir); // crash dumps land here, not in the shared node's home
                if running_as_root() {
                    // As the server wrapper would, without its `su`: the node must not run as root.
                    let (uid, gid) = rabbitmq_user();
                    cmd.uid(uid).gid(gid);
                }
                cmd
            }
            // chroot(1) drops to the folder's user itself (our `uid()` would apply before it,
            // and only root may chroot), then `env` moves into the node's directory, for the
            // same crash dumps; both `exec`, so the child is still the VM.
            Some(f) => {
                let mut cmd = Command::new(CHROOT);
                cmd.arg(format!("--userspec={}:{}", f.uid, f.gid))
                    .arg(format!("--groups={}", f.gid))
                    .arg(&f.root)
                    .arg("/usr/bin/env")
                    .arg(format!("--chdir={}", node_dir.display()))
                    .arg(SERVER);
                cmd
            }
        };
        cmd.env_clear() // nothing of ours (RABBITMQ_*, ERL_*) leaks into the node
            .env("PATH", "/usr/sbin:/usr/bin:/bin")
            .env("HOME", RABBITMQ_HOME) // the shared (or the folder's) cookie, read-only
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONF_ENV_FILE", at("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", at("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", at("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", at("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", at("mnesia"))
            .env("RABBITMQ_LOG_BASE", at("log"))
            .env("RABBITMQ_PID_FILE", at("pid"))
            // Makes the script `exec` the VM instead of running it as a child of a signal
            // proxy shell, so the process we spawn is `beam.smp` itself.
            .env("RABBITMQ_ALLOW_INPUT", "1")
            // ... which also drops `-noinput`, so put it back; and keep distribution on
            // loopback, like the shared node.
            .env(
                "RABBITMQ_SERVER_START_ARGS",
                "-noinput -noshell -kernel inet_dist_use_interface {127,0,0,1}",
            )
            // Only used if no epmd runs yet: then the one the VM starts stays on loopback.
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console);
        if let Some(f) = folder() {
            // The folder's epmd, never the host's (which the host's node uses), and a UTF-8
            // locale the folder's Erlang finds.
            cmd.env("ERL_EPMD_PORT", f.epmd_port.to_string())
                .env("LC_ALL", "C.UTF-8");
        }
        self.beam = Some(cmd.spawn().expect("rabbitmq-server runs"));
        self.wait_up(t0).await;
        let pid = self.beam.as_ref().unwrap().id();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_eq!(comm.trim(), "beam.smp", "pid {pid} is the node's VM");
        let pid_file = std::fs::read_to_string(self.dir.join("pid")).unwrap_or_default();
        assert_eq!(pid_file.trim(), pid.to_string(), "the node's own pid file");
    }

    /// Wait until an AMQP handshake succeeds (the listener opens last in the boot), failing
    /// fast if the VM exits. Records the time since `t0` as the boot time.
    async fn wait_up(&mut self, t0: Instant) {
        loop {
            if let Some(beam) = self.beam.as_mut() {
                if let Some(status) = beam.try_wait().expect("try_wait") {
                    panic!(
                        "{} exited ({status}) while booting:\n{}",
                        self.node,
                        self.log()
                    );
                }
            }
            let url = self.url();
            let attempt = Connection::connect(&url, ConnectionProperties::default());
            if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
                let _ = conn.close(200, "probe".into()).await;
                self.boot_time = t0.elapsed();
                return;
            }
            assert!(
                t0.elapsed() < BOOT_LIMIT,
                "{} not up within {BOOT_LIMIT:?}:\n{}",
                self.node,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `rabbitmqctl -n NODE args...`, which must succeed.
    pub async fn ctl(&self, args: &[&str]) {
        if let Err(e) = self.cli(CTL, args).await {
            panic!("{e}");
        }
    }

    /// `TOOL -n NODE args...` ([`CTL`] or [`QUEUES`]): its stdout, or what went wrong. With
    /// the nodes in a folder, the folder's tool of that name runs there, as its `rabbitmq`
    /// user (whose home holds the cookie the nodes use) and with the nodes' epmd.
    pub async fn cli(&self, tool: &str, args: &[&str]) -> Result<String, String> {
        let mut cmd = match folder() {
            None => tokio::process::Command::new(tool),
            Some(f) => {
                let name = Path::new(tool).file_name().expect("a tool's name");
                let mut cmd = tokio::process::Command::new(CHROOT);
                cmd.arg(format!("--userspec={}:{}", f.uid, f.gid))
                    .arg(format!("--groups={}", f.gid))
                    .arg(&f.root)
                    .arg(Path::new(FOLDER_BIN).join(name))
                    .env_clear()
                    .env("PATH", "/usr/sbin:/usr/bin:/bin")
                    .env("HOME", RABBITMQ_HOME)
                    .env("LC_ALL", "C.UTF-8")
                    .env("ERL_EPMD_PORT", f.epmd_port.to_string());
                cmd
            }
        };
        let run = cmd
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(CLI_LIMIT, run)
            .await
            .map_err(|_| {
                format!(
                    "{tool} {args:?} on {}: no answer in {CLI_LIMIT:?}",
                    self.node
                )
            })?
            .expect("the RabbitMQ CLI runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{tool} {args:?} on {}: {stdout}{}",
                self.node,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// The end of the node's console output, for failure messages.
    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let lines: Vec<_> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        // Only our own VM: epmd is shared with every other node and stays (in a folder,
        // deploy/local/rabbitmq4.sh's stop ends it with everything else running there).
        if let Some(mut beam) = self.beam.take() {
            let _ = beam.kill();
            let _ = beam.wait();
        }
        // KEEP_BROKER_DIRS=1 keeps the node's logs for a post-mortem (the path is in the
        // node's name: $TMPDIR/amqprpc-<id>).
        if std::env::var_os("KEEP_BROKER_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `n` distinct free ports: all bound at once, so no two are the same (released together just
/// before use, like any free-port probe).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

fn running_as_root() -> bool {
    // Without libc: /proc/self belongs to the process's effective user.
    Path::new("/proc/self")
        .metadata()
        .is_ok_and(|m| m.uid() == 0)
}
