//! HQ: the design notes' stacks compiled (snapshot) and deployed against a real etcd.

mod cli;
mod snapshot;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The design notes' example stacks, copied exactly (tab-indented).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/design-notes")
}

/// Runs `viking` against `endpoint`, isolated from the caller's VIKING_* env.
pub fn viking(endpoint: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_viking"));
    for (k, _) in std::env::vars() {
        if k.starts_with("VIKING_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(["--etcd", endpoint])
        .args(args)
        .output()
        .expect("run viking")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
