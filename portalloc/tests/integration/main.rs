//! portalloc against a real etcd: the library and the `portalloc` binary.

mod cli;
mod library;

use std::process::Output;

use etcd_client::{Client, GetOptions};

/// Runs the `portalloc` binary against `endpoint`, isolated from the caller's VIKING_* env.
pub fn portalloc(endpoint: &str, args: &[&str]) -> Output {
    testkit::run_cli(env!("CARGO_BIN_EXE_portalloc"), endpoint, args)
}

pub use testkit::{stderr, stdout};

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
