//! The registrator binary against the real Docker daemon and a real etcd.
//!
//! Every test uses its own etcd and its own stack name; the Docker daemon is shared, so each
//! test looks only at its own stack's keys (other tests' containers are registered too, in
//! their own stacks).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use schema::records::EndpointRecord;
use tempfile::TempDir;
use testkit::Etcd;
use testkit::docker::{self, Container, IMAGE};

mod behaviour;
mod failures;

/// A registrator process, SIGKILLed on Drop.
pub struct Registrator {
    child: Option<Child>,
    args: Vec<String>,
    dir: TempDir,
    runs: usize,
}

impl Registrator {
    /// `registrator --etcd <etcd> --host node-a --addr 127.0.0.1 --ttl 2s <extra>`.
    pub fn start(etcd: &str, extra: &[&str]) -> Registrator {
        let mut args: Vec<String> = [
            "--etcd",
            etcd,
            "--host",
            "node-a",
            "--addr",
            "127.0.0.1",
            "--ttl",
            "2s",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut r = Registrator {
            child: None,
            args,
            dir: tempfile::tempdir().expect("temp dir"),
            runs: 0,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        self.runs += 1;
        let log = std::fs::File::create(self.log_path()).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_registrator"))
            .args(&self.args)
            .env("VIKING_LOG_FORMAT", "plain")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start registrator");
        self.child = Some(child);
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("run{}.log", self.runs))
    }

    /// The log of the current run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILL: no chance to clean up, as when a host dies.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Registrator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One test's world: its own etcd, a registrator on it, and a stack name of its own.
pub struct Scene {
    pub etcd: Etcd,
    pub client: Client,
    pub reg: Registrator,
    pub stack: String,
}

impl Scene {
    /// A fresh etcd and a registrator with `extra` flags.
    pub async fn start(extra: &[&str]) -> Scene {
        docker::require(None);
        let etcd = Etcd::start().await;
        let client = etcd.client().await;
        let reg = Registrator::start(&etcd.endpoint(), extra);
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

    /// Polls `check` on this stack's endpoints every 20 ms until it holds; fails after
    /// `limit` with what was there and the registrator's log. Returns how long it took.
    pub async fn until(
        &self,
        limit: Duration,
        what: &str,
        check: impl Fn(&BTreeMap<String, EndpointRecord>) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let now = self.endpoints().await;
            if check(&now) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{what}: not within {limit:?}; endpoints of {}: {:#?}\nregistrator log:\n{}",
                self.stack,
                now.keys().collect::<Vec<_>>(),
                self.reg.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
