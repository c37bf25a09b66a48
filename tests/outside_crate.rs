//! amqp-rpc as a dependency of a crate outside this workspace (issue 15): Cargo applies this
//! repository's `[patch.crates-io] lapin = vendor/lapin` only here, so a dependent builds
//! against crates.io's lapin, which lacks `with_io_loop_on_runtime`. `build.rs` detects which
//! lapin it got, and the library must compile and work with either.
//!
//! The test writes a crate (manifest below, program `tests/outside/src/main.rs`) that depends on
//! amqp-rpc by path and says nothing about lapin, builds it with `cargo build`, and runs it
//! against the test broker: it starts a daemon in-process, calls fib(30) through the client,
//! and reports the socket loop's mode. A build failure fails the test.
//!
//! Cost: the crate lives in `target/tmp/outside-crate` and builds into this workspace's own
//! target directory, from a copy of `Cargo.lock`, so every dependency but lapin and amqp-rpc is
//! the artifact `cargo build` already made here. The first run fetches crates.io's lapin (once)
//! and compiles it, amqp-rpc and the program; later runs find them fresh.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

/// The program's binary name (not one of this package's binaries: they share `target/debug`).
const BIN: &str = "amqp-rpc-outside";

/// The dependent's manifest: amqp-rpc by path and what the program uses, nothing about lapin.
/// `[workspace]` keeps it its own workspace root wherever it sits. `{repo}` is replaced.
///
/// tokio's features and proptest are this workspace's `[dev-dependencies]`: with them every
/// shared crate resolves to the features it has in the build that made this test binary, so
/// that build's artifacts serve (the program needs only tokio's `macros` and `rt-multi-thread`;
/// a mismatch costs a longer first build, not a wrong result).
const MANIFEST: &str = r#"[package]
name = "amqp-rpc-outside"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
amqp-rpc = { path = "{repo}" }
tokio = { version = "1", features = ["full", "test-util"] }
tokio-util = "0.7"
prometheus = "0.14"
proptest = "1"
serde = { version = "1", features = ["derive"] }
tracing-subscriber = { version = "0.3", features = ["env-filter"] }

[workspace]
"#;

/// Write `contents` to `path` unless it already holds exactly that (an unchanged mtime keeps
/// the build fresh).
fn write_if_changed(path: &Path, contents: &[u8]) {
    if std::fs::read(path).ok().as_deref() != Some(contents) {
        std::fs::write(path, contents).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

/// Lay out the crate in `dir`; the lock file is reseeded from this workspace's whenever that
/// one changed, so the same versions (and so the same compiled artifacts) are used.
fn write_crate(dir: &Path, repo: &Path) {
    std::fs::create_dir_all(dir.join("src")).expect("crate dir");
    let repo = repo.to_str().expect("repository path is UTF-8");
    assert!(!repo.contains('"') && !repo.contains('\\'), "{repo}");
    write_if_changed(
        &dir.join("Cargo.toml"),
        MANIFEST.replace("{repo}", repo).as_bytes(),
    );
    let program = std::fs::read(Path::new(repo).join("tests/outside/src/main.rs"))
        .expect("tests/outside/src/main.rs");
    write_if_changed(&dir.join("src/main.rs"), &program);
    let lock = std::fs::read(Path::new(repo).join("Cargo.lock")).expect("Cargo.lock");
    let seed = dir.join("Cargo.lock.seed");
    if std::fs::read(&seed).ok() != Some(lock.clone()) || !dir.join("Cargo.lock").exists() {
        std::fs::write(dir.join("Cargo.lock"), &lock).expect("Cargo.lock");
        std::fs::write(&seed, &lock).expect("Cargo.lock.seed");
    }
}

/// stdout and stderr of a finished process, for failure messages.
fn shown(output: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn a_dependent_crate_builds_against_crates_io_lapin_and_falls_back_to_its_thread() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let target = tmp.parent().expect("CARGO_TARGET_TMPDIR is <target>/tmp");
    let dir = tmp.join("outside-crate");
    write_crate(&dir, &repo);

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    let build = tokio::process::Command::new(&cargo)
        .arg("build")
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", target)
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .kill_on_drop(true)
        .output();
    let build = tokio::time::timeout(Duration::from_secs(600), build)
        .await
        .expect("cargo build of the outside crate finishes within 10 minutes")
        .expect("cargo runs");
    eprintln!("outside crate: cargo build took {:?}", started.elapsed());
    assert!(
        build.status.success(),
        "the outside crate does not build:\n{}",
        shown(&build)
    );

    let queue = unique_queue("outside");
    let run = tokio::process::Command::new(target.join("debug").join(BIN))
        .arg(&queue)
        .env("AMQP_URL", amqp_url())
        .env("RUST_LOG", "info,lapin::channel=off")
        .kill_on_drop(true)
        .output();
    let run = tokio::time::timeout(Duration::from_secs(60), run).await;
    delete_queue(&queue).await;
    let run = run
        .expect("the outside program ends within 60 s")
        .expect("the outside program starts");
    let out = shown(&run);
    assert!(run.status.success(), "the outside program failed:\n{out}");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let value = |key: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key}= line:\n{out}"))
            .to_owned()
    };
    // Its own async, typed method: an answer, an application error code with its message,
    // and a deadline the method cannot meet.
    assert_eq!(value("add"), "6", "{out}");
    assert_eq!(value("add_error"), "failed_precondition: 7 is odd", "{out}");
    assert_eq!(value("slow"), "timeout", "{out}");
    assert_eq!(
        value("io_loop_on_runtime_available"),
        "false",
        "crates.io's lapin has no option, yet the build says it has:\n{out}"
    );
    let threads: usize = value("lapin_io_threads").parse().expect("a count");
    assert!(
        threads >= 2,
        "the daemon's and the client's connections each run lapin's I/O thread, saw {threads}:\n{out}"
    );
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("crates.io's lapin"),
        "the fallback is logged, with why:\n{out}"
    );
}
