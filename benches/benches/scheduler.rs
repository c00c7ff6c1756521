//! The grid against a real single-member etcd, two measurements (`make bench-grid`):
//!
//! 1. **Scheduler**: 10,000 instances (100 jobs of 100) onto 1,000 hosts. The elected
//!    scheduler, alone, from `viking run` (the run keys written) until every assignment is in
//!    etcd. Goal: at least 5,000 assignments written per second.
//! 2. **Simulation** (clearly a simulation: the launchers are tasks of this process, and their
//!    "containers" are a stand-in engine that reports running 50 ms after a start): 1,000
//!    launchers, each with its own watches and lease on the one etcd, one of them elected; from
//!    `viking run` of 10,000 instances until all 10,000 statuses say running. Goal: 10 s.
//!
//! Each reports the time, the rate, and etcd's write count (its revision) per placement.
//! Sizes can be cut for a quick look: `GRID_HOSTS=100 GRID_JOBS=10 cargo bench ... scheduler`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{Client, GetOptions, PutOptions};
use launcher::engine::{Engine, EngineError, Existing, RunState};
use runtime::CancellationToken;
use schema::records::{self, NodeRecord, RECORD_VERSION};
use schema::{HostId, JobName, JobSpec, Key, Prefix, StackName};
use testkit::Etcd;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `jobs` jobs of `per_job` instances in stacks of ten, each reserving a little.
fn jobs(jobs: usize, per_job: u32) -> Vec<JobSpec> {
    (0..jobs)
        .map(|j| {
            let mut spec = JobSpec::new(
                StackName::new(format!("s{}", j / 10)).unwrap(),
                JobName::new(format!("j{j}")).unwrap(),
                "busybox",
            );
            spec.scale = per_job;
            spec.resources.cpus_milli = 100;
            spec.resources.memory = 64 << 20;
            spec
        })
        .collect()
}

async fn deploy(client: &Client, prefix: &Prefix, specs: &[JobSpec]) {
    let mut kv = client.kv_client();
    for spec in specs {
        kv.put(
            prefix.key(&Key::StackJob(spec.stack.clone(), spec.job.clone())),
            records::encode(spec),
            None,
        )
        .await
        .unwrap();
    }
}

async fn run_all(client: &Client, prefix: &Prefix, specs: &[JobSpec]) {
    let mut kv = client.kv_client();
    let stacks: std::collections::BTreeSet<&StackName> = specs.iter().map(|s| &s.stack).collect();
    for stack in stacks {
        kv.put(prefix.key(&Key::Run(stack.clone())), "{\"v\":1}", None)
            .await
            .unwrap();
    }
}

async fn count(client: &Client, dir: String) -> i64 {
    let mut kv = client.kv_client();
    kv.get(dir, Some(GetOptions::new().with_prefix().with_count_only()))
        .await
        .map_or(0, |r| r.count())
}

async fn revision(client: &Client) -> i64 {
    let mut kv = client.kv_client();
    kv.get("/", Some(GetOptions::new().with_count_only()))
        .await
        .ok()
        .and_then(|r| r.header().map(|h| h.revision()))
        .unwrap_or(0)
}

fn scheduler_config(prefix: &Prefix, host: &HostId) -> grid::scheduler::Config {
    grid::scheduler::Config {
        prefix: prefix.clone(),
        host: host.clone(),
        ttl: Duration::from_secs(10),
        reschedule_after: Duration::from_secs(30),
        max_txn_ops: schema::MAX_TXN_OPS,
    }
}

async fn scheduler(hosts: usize, specs: &[JobSpec]) {
    let etcd = Etcd::start().await;
    let client = etcd.client().await;
    let prefix = Prefix::default();
    let total: usize = specs.iter().map(|s| s.scale as usize).sum();
    // The hosts' node records, under one long lease (no launchers here).
    let lease = client.lease_client().grant(600, None).await.unwrap().id();
    let mut kv = client.kv_client();
    for i in 0..hosts {
        let host = HostId::new(format!("node-{i:04}")).unwrap();
        let node = NodeRecord {
            v: RECORD_VERSION,
            host: host.clone(),
            cpus_milli: 16_000,
            memory: 64 << 30,
            launcher_version: String::new(),
            since: String::new(),
        };
        kv.put(
            prefix.key(&Key::Node(host)),
            records::encode(&node),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    }
    deploy(&client, &prefix, specs).await;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(grid::scheduler::run(
        client.clone(),
        scheduler_config(&prefix, &HostId::new("bench").unwrap()),
        shutdown.clone(),
    ));
    // Elected before the clock starts: the run is what is measured.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = revision(&client).await;
    let start = Instant::now();
    run_all(&client, &prefix, specs).await;
    let assign = prefix.dir(schema::Dir::Assignments);
    while (count(&client, assign.clone()).await as usize) < total {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "scheduler too slow"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = start.elapsed();
    let writes = revision(&client).await - before;
    println!(
        "scheduler: {total} assignments on {hosts} hosts written in {:.3} s: {:.0} assignments/s; \
         {writes} etcd revisions ({:.3} per assignment)",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64(),
        writes as f64 / total as f64
    );
    shutdown.cancel();
    let _ = task.await;
}

/// A stand-in for Docker: a start reports running after `delay`.
struct StandIn {
    host: String,
    delay: Duration,
    containers: Mutex<BTreeMap<String, Existing>>,
}

#[async_trait]
impl Engine for StandIn {
    async fn list(&self) -> Result<Vec<Existing>, EngineError> {
        Ok(self.containers.lock().unwrap().values().cloned().collect())
    }
    async fn start(
        &self,
        spec: &JobSpec,
        instance: u32,
        host: &HostId,
        name: &str,
    ) -> Result<String, EngineError> {
        tokio::time::sleep(self.delay).await;
        let id = format!("{:012x}{:052x}", fastrand::u64(..) >> 16, 0);
        self.containers.lock().unwrap().insert(
            id.clone(),
            Existing {
                id: id.clone(),
                name: name.to_owned(),
                service: spec.service(),
                instance,
                spec: spec.digest(),
                state: RunState::Running,
                restarts: 0,
                host: Some(host.to_string()),
            },
        );
        let _ = &self.host;
        Ok(id)
    }
    async fn restart(&self, _id: &str) -> Result<(), EngineError> {
        Ok(())
    }
    async fn remove(&self, id: &str) -> Result<(), EngineError> {
        self.containers.lock().unwrap().remove(id);
        Ok(())
    }
    async fn stop(&self, _id: &str, _timeout: Duration) -> Result<(), EngineError> {
        Ok(())
    }
    async fn rename(&self, id: &str, name: &str) -> Result<(), EngineError> {
        if let Some(c) = self.containers.lock().unwrap().get_mut(id) {
            c.name = name.to_owned();
        }
        Ok(())
    }
    async fn last_logs(&self, _id: &str) -> String {
        String::new()
    }
}

async fn simulation(hosts: usize, specs: &[JobSpec]) {
    let etcd = Etcd::start().await;
    let client = etcd.client().await;
    let prefix = Prefix::default();
    let total: usize = specs.iter().map(|s| s.scale as usize).sum();
    deploy(&client, &prefix, specs).await;
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..hosts {
        let host = HostId::new(format!("node-{i:04}")).unwrap();
        let config = launcher::Config {
            prefix: prefix.clone(),
            host: host.clone(),
            ttl: Duration::from_secs(30),
            resync: Duration::from_secs(30),
            docker: None,
            cpus_milli: 16_000,
            memory: 64 << 30,
            // One candidate is enough to measure; every launcher campaigning adds only keys.
            scheduler: (i == 0).then(|| scheduler_config(&prefix, &host)),
            stop_after: None,
        };
        let engine = Arc::new(StandIn {
            host: host.to_string(),
            delay: Duration::from_millis(50),
            containers: Mutex::default(),
        });
        let (_wake_tx, wake_rx) = tokio::sync::mpsc::channel(1);
        let client = client.clone();
        let shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let scheduler = config
                .scheduler
                .clone()
                .map(|s| tokio::spawn(grid::scheduler::run(client.clone(), s, shutdown.clone())));
            launcher::agent::run_with(config, client, engine, wake_rx, shutdown).await;
            drop(_wake_tx);
            if let Some(s) = scheduler {
                let _ = s.await;
            }
        }));
    }
    let nodes = prefix.dir(schema::Dir::Nodes);
    let ready = Instant::now();
    while (count(&client, nodes.clone()).await as usize) < hosts {
        assert!(
            ready.elapsed() < Duration::from_secs(120),
            "launchers did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "simulation: {hosts} launchers up in {:.1} s",
        ready.elapsed().as_secs_f64()
    );
    let before = revision(&client).await;
    let start = Instant::now();
    run_all(&client, &prefix, specs).await;
    let statuses = prefix.dir(schema::Dir::Statuses);
    loop {
        let mut kv = client.kv_client();
        let resp = kv
            .get(statuses.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        let running = resp
            .kvs()
            .iter()
            .filter(|kv| {
                let pattern = b"\"state\":\"running\"";
                kv.value().windows(pattern.len()).any(|w| w == pattern)
            })
            .count();
        if running >= total {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "only {running} of {total} running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = start.elapsed();
    let writes = revision(&client).await - before;
    println!(
        "simulation: viking run of {total} instances on {hosts} launchers, all running in {:.2} s; \
         {writes} etcd revisions ({:.2} per instance)",
        took.as_secs_f64(),
        writes as f64 / total as f64
    );
    shutdown.cancel();
    for t in tasks {
        let _ = t.await;
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let hosts = env("GRID_HOSTS", 1000);
    let specs = jobs(env("GRID_JOBS", 100), env("GRID_PER_JOB", 100) as u32);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(scheduler(hosts, &specs));
    rt.block_on(simulation(hosts, &specs));
}
