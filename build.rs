//! Detects which lapin this build links, so the library compiles against either.
//!
//! This repository's workspace patches lapin (`[patch.crates-io]` → `vendor/lapin`, whose one
//! addition is `ConnectionProperties::with_io_loop_on_runtime`). Cargo applies `[patch]` only in
//! the top-level workspace, so a crate that depends on amqp-rpc by path, git or version gets
//! crates.io's lapin, which has no such method. The patched lapin declares
//! `links = "lapin_io_loop_on_runtime"` and its build script prints the metadata key
//! `io_loop_on_runtime=1`; Cargo hands that to this script (we depend on lapin directly) as
//! `DEP_LAPIN_IO_LOOP_ON_RUNTIME_IO_LOOP_ON_RUNTIME`. When it is there, the crate is built with
//! `--cfg lapin_io_loop_on_runtime` and `src/amqp.rs` uses the option; otherwise lapin's socket
//! loop stays on lapin's own thread (docs/LIBRARY.md).

/// Set by Cargo from the patched lapin's build script (`DEP_<links>_<key>`, upper-cased).
const DETECT: &str = "DEP_LAPIN_IO_LOOP_ON_RUNTIME_IO_LOOP_ON_RUNTIME";

/// The option revision this crate's code is written against (see `vendor/lapin/build.rs`).
const REVISION: &str = "1";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(lapin_io_loop_on_runtime)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed={DETECT}");
    match std::env::var(DETECT) {
        Ok(revision) if revision == REVISION => {
            println!("cargo::rustc-cfg=lapin_io_loop_on_runtime");
        }
        // A later vendored lapin whose option changed shape: build as against plain lapin
        // rather than fail, and say so.
        Ok(other) => println!(
            "cargo::warning=lapin's io_loop_on_runtime option is revision {other}, this \
             amqp-rpc knows revision {REVISION}: building with lapin's own I/O thread"
        ),
        Err(_) => {}
    }
}
