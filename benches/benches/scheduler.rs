//! The grid against a real single-member etcd, two measurements (`make bench-grid`):
//!
//! 1. **Scheduler**: 10,000 instances (100 jobs of 100) onto 1,000 hosts. The elected
//!    scheduler, alone, from `viking run` (the run keys written) until every assignment is in
//!    etcd. Goal: at least 5,000 assignments written per second.
//! 2. **Simulation** (clearly a simulation: the launchers are tasks of this process, and their
//!    "containers" are a stand-in engine that reports running 50 ms after a start): 1,000
//!    launchers, each with its own watches and lease on the one etcd, one of them elected; from
//!    `viking run` of 10,000 instances until all 10,000 statuses say running. Goal: 10 s.
//!    Then 100 of the launchers stop (as if killed: their leases expire): from then until
//!    their instances run on the others, split into lease expiry and the rest, against
//!    `--reschedule-after` + 5 s; and the CPU the scheduler's thread used for it (the
//!    scheduler runs on a thread of its own so that its CPU can be read apart).
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
        reschedule_after: RESCHEDULE_AFTER,
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
                health: Default::default(),
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
    let sched = SchedulerThread::start(
        etcd.endpoint(),
        scheduler_config(&prefix, &HostId::new("node-0000").unwrap()),
        shutdown.clone(),
    );
    let mut tasks = Vec::new();
    let mut stops = Vec::new();
    for i in 0..hosts {
        let host = HostId::new(format!("node-{i:04}")).unwrap();
        let config = launcher::Config {
            prefix: prefix.clone(),
            host: host.clone(),
            ttl: LAUNCHER_TTL,
            resync: Duration::from_secs(30),
            docker: None,
            cpus_milli: 16_000,
            memory: 64 << 30,
            // One candidate is enough to measure (on its own thread, above); every launcher
            // campaigning adds only keys.
            scheduler: None,
            stop_after: None,
            stop_timeout: Duration::from_secs(10),
            shutdown_delay: Duration::from_secs(1),
            view: Default::default(),
        };
        let engine = Arc::new(StandIn {
            host: host.to_string(),
            delay: Duration::from_millis(50),
            containers: Mutex::default(),
        });
        let (_wake_tx, wake_rx) = tokio::sync::mpsc::channel(1);
        let client = client.clone();
        let stop = shutdown.child_token();
        stops.push(stop.clone());
        tasks.push(tokio::spawn(async move {
            launcher::agent::run_with(config, client, engine, wake_rx, stop).await;
            drop(_wake_tx);
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
        let running = running(&client, &statuses).await;
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

    // Hosts lost: the last `lost` launchers stop renewing their leases.
    let lost = env("GRID_LOST", hosts / 10).min(hosts - 1);
    let lost_hosts: Vec<String> = (hosts - lost..hosts)
        .map(|i| format!("node-{i:04}"))
        .collect();
    let cpu_before = sched.cpu();
    let start = Instant::now();
    for stop in &stops[hosts - lost..] {
        stop.cancel();
    }
    let assign = prefix.dir(schema::Dir::Assignments);
    let (mut first, mut expired) = (None, None);
    loop {
        let now = start.elapsed();
        if expired.is_none() {
            let left = count(&client, nodes.clone()).await as usize;
            if first.is_none() && left < hosts {
                first = Some(now);
            }
            if left == hosts - lost {
                expired = Some(now);
            }
        }
        if expired.is_some() {
            let mut kv = client.kv_client();
            let on_lost = kv
                .get(
                    assign.clone(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await
                .unwrap()
                .kvs()
                .iter()
                .filter(|kv| {
                    let key = kv.key_str().unwrap_or_default();
                    lost_hosts
                        .iter()
                        .any(|h| key.starts_with(&format!("{assign}{h}/")))
                })
                .count();
            if on_lost == 0 && running(&client, &statuses).await >= total {
                break;
            }
        }
        assert!(
            now < Duration::from_secs(180),
            "instances of the lost hosts not running elsewhere after 180 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = start.elapsed();
    let (first, expired) = (first.expect("set"), expired.expect("set"));
    let cpu = sched.cpu() - cpu_before;
    println!(
        "simulation: {lost} of {hosts} hosts lost at once: their instances running elsewhere \
         {:.2} s after the first of their leases expired, {:.2} s after the last ({:.2} s after \
         they stopped; --reschedule-after {} s, goal {} s); the scheduler's thread used {:.2} s \
         of CPU meanwhile",
        (took - first).as_secs_f64(),
        (took - expired).as_secs_f64(),
        took.as_secs_f64(),
        RESCHEDULE_AFTER.as_secs(),
        RESCHEDULE_AFTER.as_secs() + 5,
        cpu.as_secs_f64()
    );
    shutdown.cancel();
    for t in tasks {
        let _ = t.await;
    }
    sched.join();
}

/// The simulated launchers' lease: a lost one is noticed this long after it stops.
const LAUNCHER_TTL: Duration = Duration::from_secs(10);
/// The simulated grid's `--reschedule-after`.
const RESCHEDULE_AFTER: Duration = Duration::from_secs(5);

/// How many statuses under `dir` say running.
async fn running(client: &Client, dir: &str) -> usize {
    let mut kv = client.kv_client();
    let resp = kv
        .get(dir, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .filter(|kv| {
            let pattern = b"\"state\":\"running\"";
            kv.value().windows(pattern.len()).any(|w| w == pattern)
        })
        .count()
}

/// The scheduler on a thread (and runtime, and etcd connection) of its own, so that the CPU
/// it uses can be read apart from the simulated launchers'.
struct SchedulerThread {
    tid: u64,
    thread: std::thread::JoinHandle<()>,
}

impl SchedulerThread {
    fn start(
        endpoint: String,
        config: grid::scheduler::Config,
        shutdown: CancellationToken,
    ) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            // `/proc/thread-self` links to `<pid>/task/<tid>`.
            let tid = std::fs::read_link("/proc/thread-self")
                .ok()
                .and_then(|p| p.file_name()?.to_str()?.parse().ok())
                .expect("this thread's id");
            tx.send(tid).expect("send");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = Client::connect([endpoint], None).await.expect("etcd");
                grid::scheduler::run(client, config, shutdown).await;
            });
        });
        let tid = rx.recv().expect("thread id");
        SchedulerThread { tid, thread }
    }

    /// CPU time (user and system) used by the thread so far.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{}/stat", self.tid))
            .expect("thread stat");
        // Fields 14 and 15 (utime, stime), counted after the command name's closing paren.
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // USER_HZ is 100 on Linux.
        Duration::from_millis(ticks * 10)
    }

    fn join(self) {
        self.thread.join().expect("scheduler thread");
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
