//! HQ against a real etcd (and Docker for `viking up` and `run`); the pure compile is unit-tested
//! in the library (`src/compile_tests.rs`).

mod cli;
mod run;
mod ui;

use std::path::{Path, PathBuf};
use std::process::Output;

/// The design notes' example stacks, copied exactly (tab-indented).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/design-notes")
}

/// Runs the `viking` binary against `endpoint`, isolated from the caller's VIKING_* env.
pub fn viking(endpoint: &str, args: &[&str]) -> Output {
    testkit::run_cli(env!("CARGO_BIN_EXE_viking"), endpoint, args)
}

pub use testkit::{stderr, stdout};
