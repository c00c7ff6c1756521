//! The registrator binary against the real Docker daemon and a real etcd.
//!
//! Every test uses its own etcd and its own stack name; the Docker daemon is shared, so each
//! test looks only at its own stack's keys (other tests' containers are registered too, in
//! their own stacks).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use schema::records::EndpointRecord;
use testkit::docker::{self, Container, IMAGE};
use testkit::{Daemon, Etcd};

mod behaviour;
mod failures;

/// `registrator --etcd <etcd> --host node-a --addr 127.0.0.1 --ttl 2s <extra>`,
/// killed on Drop.
pub fn registrator(etcd: &str, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--etcd",
        etcd,
        "--host",
        "node-a",
        "--addr",
        "127.0.0.1",
        "--ttl",
        "2s",
    ];
    args.extend_from_slice(extra);
    Daemon::spawn(env!("CARGO_BIN_EXE_registrator"), &args)
}

/// One test's world: its own etcd, a registrator on it, and a stack name of its own.
pub struct Scene {
    pub etcd: Etcd,
    pub client: Client,
    pub reg: Daemon,
    pub stack: String,
}

impl Scene {
    /// A fresh etcd and a registrator with `extra` flags.
    pub async fn start(extra: &[&str]) -> Scene {
        docker::require(None);
        let etcd = Etcd::start().await;
        let client = etcd.client().await;
        let reg = registrator(&etcd.endpoint(), extra);
        Scene {
            etcd,
            client,
            reg,
            stack: format!("t{:08x}", fastrand::u32(..)),
        }
    }

    /// This stack's endpoints: `<job>/<port>-<proto>/<instance>` -> record.
    pub async fn endpoints(&self) -> BTreeMap<String, EndpointRecord> {
        let prefix = format!("/viking/services/{}/", self.stack);
        let mut kv = self.client.kv_client();
        let Ok(resp) = kv
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
        else {
            return BTreeMap::new();
        };
        resp.kvs()
            .iter()
            .map(|kv| {
                let key = kv.key_str().expect("utf-8 key");
                (
                    key[prefix.len()..].to_owned(),
                    serde_json::from_slice(kv.value()).expect("endpoint record"),
                )
            })
            .collect()
    }

    /// Polls `check` on this stack's endpoints until it holds; fails after `limit` with
    /// what was there and the registrator's log. Returns how long it took.
    pub async fn until(
        &self,
        limit: Duration,
        what: &str,
        check: impl Fn(&BTreeMap<String, EndpointRecord>) -> bool,
    ) -> Duration {
        let start = Instant::now();
        testkit::eventually_async(limit, what, || async {
            let now = self.endpoints().await;
            if check(&now) {
                return Ok(());
            }
            let keys: Vec<&String> = now.keys().collect();
            let log = self.reg.log();
            Err(format!(
                "endpoints of {}: {keys:#?}\nregistrator log:\n{log}",
                self.stack
            ))
        })
        .await;
        start.elapsed()
    }

    /// A busybox httpd labelled as `<stack>/<job>`, publishing 8080, on the shared daemon.
    pub fn web(&self, job: &str, extra: &[&str]) -> Container {
        self.web_on(None, job, extra)
    }

    /// The same on the daemon at `host`.
    pub fn web_on(&self, host: Option<&str>, job: &str, extra: &[&str]) -> Container {
        let stack_label = format!("viking.stack={}", self.stack);
        let job_label = format!("viking.job={job}");
        let mut args = vec!["-l", &stack_label, "-l", &job_label, "-p", "8080"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, "httpd", "-f", "-p", "8080", "-h", "/www"]);
        Container::run(host, &args)
    }
}

/// The endpoint key (below the stack) of a `web` container's port 8080 on `node-a`.
pub fn key(c: &Container) -> String {
    format!("web/8080-tcp/node-a:{}:8080", c.short_id())
}
