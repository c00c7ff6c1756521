//! portalloc against a real etcd: the library and the `portalloc` binary.

mod cli;
mod library;

use std::process::{Command, Output};

use etcd_client::{Client, GetOptions};

/// Runs the `portalloc` binary against `endpoint`, isolated from the caller's VIKING_* env.
pub fn portalloc(endpoint: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portalloc"));
    for (k, _) in std::env::vars() {
        if k.starts_with("VIKING_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(["--etcd", endpoint])
        .args(args)
        .output()
        .expect("run portalloc")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// How many keys exist under `prefix`.
pub async fn count_keys(client: &mut Client, prefix: &str) -> i64 {
    client
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("count keys")
        .count()
}
