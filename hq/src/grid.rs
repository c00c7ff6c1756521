//! HQ's side of the grid: `viking run`, `stop`, `ps`, `grid` and `host ls` read and write
//! what the scheduler and the launchers share in etcd.
//!
//! `run` writes `grid/run/<stack>` (the scheduler places the stack's jobs, each host's
//! launcher starts its instances) and follows the instances' statuses until all run;
//! `stop` deletes it. What is placed nowhere is shown with the placement's own reasons:
//! HQ computes [`grid::place`] from the same etcd state the scheduler reads.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use grid::{Host, place};
use schema::records::{
    self, AliveRecord, AssignRecord, HostRecord, InstanceState, LostRecord, NodeRecord,
    RECORD_VERSION, RunRecord, StatusRecord,
};
use schema::{Dir, HostId, JobSpec, Key, ServiceId, Slot, StackName};
use serde::Serialize;

use crate::output::Row;
use crate::store::{HqError, Store};

/// Everything the grid keeps, read at one revision.
#[derive(Debug, Default)]
pub struct GridState {
    pub jobs: BTreeMap<ServiceId, JobSpec>,
    pub runs: BTreeSet<StackName>,
    pub nodes: BTreeMap<HostId, NodeRecord>,
    pub hosts: BTreeMap<HostId, HostRecord>,
    pub alive: BTreeMap<HostId, Vec<String>>,
    pub assign: BTreeMap<Slot, AssignRecord>,
    pub status: BTreeMap<Slot, StatusRecord>,
    pub lost: BTreeMap<HostId, LostRecord>,
}

impl GridState {
    /// Reads it all in one transaction.
    pub async fn read(store: &Store) -> Result<GridState, HqError> {
        let dirs = [Dir::Stacks, Dir::Grid, Dir::Hosts, Dir::Alive];
        let maps = store.read_dirs(&dirs).await?;
        let prefix = &store.prefix;
        let mut s = GridState::default();
        for map in maps {
            for (k, kv) in &map {
                match prefix.parse(k) {
                    Ok(Key::StackJob(..)) => {
                        if let Ok(spec) = records::decode::<JobSpec>(k, &kv.value) {
                            if spec.check().is_ok() {
                                s.jobs.insert(spec.service(), spec);
                            }
                        }
                    }
                    Ok(Key::Run(stack)) => {
                        s.runs.insert(stack);
                    }
                    Ok(Key::Node(host)) => {
                        if let Ok(n) = records::decode::<NodeRecord>(k, &kv.value) {
                            s.nodes.insert(host, n);
                        }
                    }
                    Ok(Key::Host(host)) => {
                        if let Ok(h) = records::decode::<HostRecord>(k, &kv.value) {
                            s.hosts.insert(host, h);
                        }
                    }
                    Ok(Key::Alive(host)) => {
                        if let Ok(a) = records::decode::<AliveRecord>(k, &kv.value) {
                            s.alive.entry(host).or_default().push(a.agent);
                        }
                    }
                    Ok(Key::Assign(slot)) => {
                        if let Ok(a) = records::decode::<AssignRecord>(k, &kv.value) {
                            s.assign.insert(slot, a);
                        }
                    }
                    Ok(Key::Status(slot)) => {
                        if let Ok(st) = records::decode::<StatusRecord>(k, &kv.value) {
                            s.status.insert(slot, st);
                        }
                    }
                    Ok(Key::Lost(host)) => {
                        if let Ok(l) = records::decode::<LostRecord>(k, &kv.value) {
                            s.lost.insert(host, l);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(s)
    }

    /// The hosts as the scheduler sees them (lost ones with their assignments kept).
    fn grid_hosts(&self) -> Vec<Host> {
        let mut out: Vec<Host> = self
            .nodes
            .iter()
            .map(|(host, n)| Host::live(host, n, self.hosts.get(host)))
            .collect();
        // Lost hosts keep their instances until their deadline (as the scheduler does).
        let now = SystemTime::now();
        let lost: BTreeSet<&HostId> = self
            .assign
            .keys()
            .map(|s| &s.host)
            .filter(|h| !self.nodes.contains_key(*h))
            .filter(|h| {
                self.lost
                    .get(*h)
                    .and_then(grid::lost::deadline)
                    .is_none_or(|d| d > now)
            })
            .collect();
        out.extend(lost.into_iter().map(Host::lost));
        out
    }

    /// Every instance of the running jobs (of `only`, if given): assigned ones with their
    /// status, the others pending with the placement's reasons.
    pub fn instances(&self, only: Option<&BTreeSet<StackName>>) -> Vec<InstanceRow> {
        let running: Vec<&JobSpec> = self
            .jobs
            .values()
            .filter(|j| self.runs.contains(&j.stack))
            .collect();
        // Where each instance is, as the scheduler sees it (a moving one where it goes).
        let current = grid::assign::current(&self.assign);
        let leaving = grid::assign::leaving(&self.assign);
        let plan = place(&running, &self.grid_hosts(), &current);
        let now = SystemTime::now();
        let slots: BTreeMap<(&ServiceId, u32), Slot> = current
            .iter()
            .map(|((service, i), host)| {
                (
                    (service, *i),
                    Slot {
                        host: host.clone(),
                        service: service.clone(),
                        instance: *i,
                    },
                )
            })
            .collect();
        let mut rows = Vec::new();
        for job in running {
            if only.is_some_and(|o| !o.contains(&job.stack)) {
                continue;
            }
            let service = job.service();
            for i in 0..job.scale {
                let assigned = slots.get(&(&service, i));
                let row = match assigned {
                    Some(slot) => {
                        let status = self.status.get(slot);
                        let lost = !self.nodes.contains_key(&slot.host);
                        InstanceRow {
                            service: service.to_string(),
                            instance: i,
                            host: slot.host.to_string(),
                            state: match (lost, status) {
                                (true, _) => "lost".to_owned(),
                                (false, Some(s)) => s.state.to_string(),
                                (false, None) => "assigned".to_owned(),
                            },
                            container: status.map(|s| s.container_id.clone()).unwrap_or_default(),
                            since: status.map(|s| s.since.clone()).unwrap_or_default(),
                            uptime: status
                                .filter(|s| s.state == InstanceState::Running)
                                .and_then(|s| runtime::host::parse_rfc3339(&s.since))
                                .and_then(|t| now.duration_since(t).ok())
                                .map(runtime::host::human_duration)
                                .unwrap_or_default(),
                            restarts: status.map_or(0, |s| s.restarts),
                            exit_code: status.and_then(|s| s.exit_code),
                            reason: if lost {
                                self.lost_reason(&slot.host, now)
                            } else {
                                let reason = status.map(|s| s.reason.clone()).unwrap_or_default();
                                match leaving.get(&(service.clone(), i)) {
                                    Some(from) => format!(
                                        "moving from {from}, where it keeps serving until this \
                                         copy is healthy{}{reason}",
                                        if reason.is_empty() { "" } else { "; " }
                                    ),
                                    None => reason,
                                }
                            },
                        }
                    }
                    None => InstanceRow {
                        service: service.to_string(),
                        instance: i,
                        host: String::new(),
                        state: "pending".to_owned(),
                        container: String::new(),
                        since: String::new(),
                        uptime: String::new(),
                        restarts: 0,
                        exit_code: None,
                        reason: plan
                            .pending
                            .get(&service)
                            .filter(|p| p.instances.contains(&i))
                            .map(|p| {
                                p.reasons
                                    .iter()
                                    .map(|(h, r)| format!("{h}: {r}"))
                                    .collect::<Vec<_>>()
                                    .join("; ")
                            })
                            .map_or_else(
                                || "not placed yet".to_owned(),
                                |r| {
                                    if r.is_empty() {
                                        "no host has a live launcher".to_owned()
                                    } else {
                                        r
                                    }
                                },
                            ),
                    },
                };
                rows.push(row);
            }
        }
        rows
    }
}

impl GridState {
    /// Why an instance on a lost host is shown there: since when, and the time left.
    fn lost_reason(&self, host: &HostId, now: SystemTime) -> String {
        let Some(record) = self.lost.get(host) else {
            return "its host's launcher is gone; the scheduler has not seen it yet".to_owned();
        };
        let left = grid::lost::deadline(record)
            .and_then(|d| d.duration_since(now).ok())
            .map_or_else(
                || "moving now".to_owned(),
                |d| format!("moves elsewhere in {}", runtime::host::human_duration(d)),
            );
        let flaps = if record.losses > 1 {
            format!(" (lost {} times in a row)", record.losses)
        } else {
            String::new()
        };
        format!(
            "its host's launcher is gone since {}; {left} unless it comes back{flaps}",
            record.since
        )
    }
}

/// `viking ps`: one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceRow {
    /// `stack/job`.
    pub service: String,
    pub instance: u32,
    /// Empty while pending.
    pub host: String,
    /// `pending`, `assigned`, `starting`, `running`, `failed`, `exited`, or `lost`.
    pub state: String,
    /// The first 12 digits of its container id.
    pub container: String,
    /// When it entered its state (RFC 3339).
    pub since: String,
    /// How long it has been running.
    pub uptime: String,
    pub restarts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    pub reason: String,
}

impl InstanceRow {
    /// Whether it is where `viking run` wants it: running, or a task that ran to completion.
    fn done(&self) -> bool {
        self.state == "running" || (self.state == "exited" && self.exit_code == Some(0))
    }

    fn describe(&self) -> String {
        let at = if self.host.is_empty() {
            String::new()
        } else {
            format!(" on {}", self.host)
        };
        let why = if self.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", self.reason)
        };
        format!(
            "{}/{}{at}: {}{why}",
            self.service, self.instance, self.state
        )
    }
}

impl Row for InstanceRow {
    const HEADER: &'static [&'static str] = &[
        "INSTANCE",
        "HOST",
        "STATE",
        "CONTAINER",
        "UPTIME",
        "RESTARTS",
        "REASON",
    ];
    fn cells(&self) -> Vec<String> {
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                s.to_owned()
            }
        };
        vec![
            format!("{}/{}", self.service, self.instance),
            dash(&self.host),
            self.state.clone(),
            dash(&self.container),
            dash(&self.uptime),
            self.restarts.to_string(),
            dash(&self.reason),
        ]
    }
}

/// `viking run`: asks the grid to run `stacks`, then (unless `detach`) follows their
/// instances until every one runs, or `timeout`.
pub async fn run(
    store: &Store,
    stacks: &[StackName],
    timeout: Duration,
    detach: bool,
) -> Result<(), HqError> {
    let state = GridState::read(store).await?;
    let (deployed, raw) = store.load_stacks().await?;
    let asked: BTreeSet<&StackName> = stacks.iter().collect();
    for stack in stacks {
        let bad = crate::store::unreadable_jobs(&store.prefix, stack, deployed.get(stack), &raw);
        if !bad.is_empty() {
            return Err(HqError::Refused(format!(
                "stack {stack} has job specs that cannot be read ({}); deploy it again to \
                 replace them, or `viking rm {stack}`; nothing was started",
                bad.join(", ")
            )));
        }
        let Some(jobs) = deployed.get(stack) else {
            return Err(HqError::Refused(format!(
                "stack {stack} is not deployed; `viking deploy` its stack file first (`viking \
                 stacks` lists what is); nothing was started"
            )));
        };
        // Links to stacks that do not run would keep these jobs waiting for ever.
        for job in jobs.values() {
            for link in &job.links {
                let target = &link.service.stack;
                if !asked.contains(target) && !state.runs.contains(target) {
                    return Err(HqError::Refused(format!(
                        "{}/{} links to {}, whose stack {target} is not running; run it first \
                         (viking run {target}) or with this one (viking run {target} {stack}); \
                         nothing was started",
                        job.stack, job.job, link.service
                    )));
                }
            }
        }
    }
    let record = records::encode(&RunRecord {
        v: RECORD_VERSION,
        since: runtime::host::rfc3339_now(),
    });
    let ops: Vec<TxnOp> = stacks
        .iter()
        .filter(|s| !state.runs.contains(*s))
        .map(|s| {
            TxnOp::put(
                store.prefix.key(&Key::Run(s.clone())),
                record.as_str(),
                None,
            )
        })
        .collect();
    // Every asked stack must still be deployed when its run key is written.
    let compares: Vec<Compare> = stacks
        .iter()
        .map(|s| {
            Compare::create_revision(
                store.prefix.key(&Key::StackMeta(s.clone())),
                CompareOp::Greater,
                0,
            )
        })
        .collect();
    if !ops.is_empty() && !store.txn(Txn::new().when(compares).and_then(ops)).await? {
        return Err(HqError::Refused(
            "a stack was removed while asking to run it; deploy it again".into(),
        ));
    }
    if detach {
        println!("asked the grid to run {}", list(stacks));
        return Ok(());
    }
    let only: BTreeSet<StackName> = stacks.iter().cloned().collect();
    follow(store, &only, timeout).await
}

/// Follows the instances of `only` until all are done, or `timeout` (exit 1 naming each).
async fn follow(
    store: &Store,
    only: &BTreeSet<StackName>,
    timeout: Duration,
) -> Result<(), HqError> {
    let deadline = Instant::now() + timeout;
    let tty = std::io::stderr().is_terminal();
    let mut said: BTreeMap<(String, u32), String> = BTreeMap::new();
    loop {
        let rows = GridState::read(store).await?.instances(Some(only));
        let done = rows.iter().filter(|r| r.done()).count();
        if tty {
            let width = 30;
            let filled = if rows.is_empty() {
                width
            } else {
                done * width / rows.len()
            };
            eprint!(
                "\r[{}{}] {done}/{} running",
                "#".repeat(filled),
                "-".repeat(width - filled),
                rows.len()
            );
        } else {
            for r in &rows {
                let line = r.describe();
                let key = (r.service.clone(), r.instance);
                if said.get(&key) != Some(&line) {
                    eprintln!("{line}");
                    said.insert(key, line);
                }
            }
        }
        if done == rows.len() {
            if tty {
                eprintln!();
            }
            println!("{}: {} instances running", list(only), rows.len());
            return Ok(());
        }
        if Instant::now() >= deadline {
            if tty {
                eprintln!();
            }
            let not: Vec<String> = rows
                .iter()
                .filter(|r| !r.done())
                .map(InstanceRow::describe)
                .collect();
            return Err(HqError::Refused(format!(
                "{} of {} instances not running after {timeout:?}:\n  {}",
                not.len(),
                rows.len(),
                not.join("\n  ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `viking stop`: no instance of `stacks` is assigned any more; waits until their containers
/// are gone on every host, or `timeout`.
pub async fn stop(store: &Store, stacks: &[StackName], timeout: Duration) -> Result<(), HqError> {
    // A name that means nothing here (a typo) is said, not "stopped".
    let before = GridState::read(store).await?;
    for stack in stacks {
        let known = before.runs.contains(stack)
            || before.jobs.keys().any(|s| &s.stack == stack)
            || before
                .assign
                .keys()
                .chain(before.status.keys())
                .any(|s| &s.service.stack == stack);
        if !known {
            return Err(HqError::Refused(format!(
                "stack {stack} is neither deployed nor running; `viking stacks` lists what is \
                 deployed; nothing was stopped"
            )));
        }
    }
    let ops: Vec<TxnOp> = stacks
        .iter()
        .map(|s| TxnOp::delete(store.prefix.key(&Key::Run(s.clone())), None))
        .collect();
    store.txn(Txn::new().and_then(ops)).await?;
    let only: BTreeSet<&StackName> = stacks.iter().collect();
    let deadline = Instant::now() + timeout;
    loop {
        let state = GridState::read(store).await?;
        let left: Vec<String> = state
            .status
            .keys()
            .chain(state.assign.keys())
            .filter(|s| only.contains(&s.service.stack))
            .map(|s| format!("{}/{} on {}", s.service, s.instance, s.host))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if left.is_empty() {
            println!("stopped {}", list(stacks));
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(HqError::Refused(format!(
                "asked to stop, but after {timeout:?} these still report: {}; their hosts' \
                 launchers remove them when they can reach etcd",
                left.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `viking grid`: one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostBlock {
    pub host: String,
    pub addr: String,
    pub labels: BTreeMap<String, String>,
    /// `ready`, `draining` or `lost`.
    pub state: String,
    pub cpus_milli: u64,
    pub cpus_reserved_milli: u64,
    pub memory: u64,
    pub memory_reserved: u64,
    pub agents: Vec<String>,
    pub instances: Vec<String>,
}

/// `viking grid`: the hosts with what they run, and what runs nowhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GridReport {
    pub hosts: Vec<HostBlock>,
    pub pending: Vec<InstanceRow>,
}

impl GridState {
    pub fn report(&self) -> GridReport {
        let rows = self.instances(None);
        let mut hosts: BTreeSet<&HostId> = self.nodes.keys().collect();
        hosts.extend(self.hosts.keys());
        hosts.extend(self.assign.keys().map(|s| &s.host));
        let blocks = hosts
            .into_iter()
            .map(|h| {
                let mine: Vec<&InstanceRow> =
                    rows.iter().filter(|r| r.host == h.as_str()).collect();
                let (mut cpus, mut mem) = (0, 0);
                for r in &mine {
                    if let Ok(service) = r.service.parse::<ServiceId>() {
                        if let Some(job) = self.jobs.get(&service) {
                            cpus += job.resources.cpus_milli;
                            mem += job.resources.memory;
                        }
                    }
                }
                let record = self.hosts.get(h);
                let node = self.nodes.get(h);
                let mut agents = self.alive.get(h).cloned().unwrap_or_default();
                if node.is_some() {
                    agents.push("launcher".to_owned());
                }
                HostBlock {
                    host: h.to_string(),
                    addr: record.map(|r| r.addr.clone()).unwrap_or_default(),
                    labels: record.map(|r| r.labels.clone()).unwrap_or_default(),
                    state: match (node, record.is_some_and(|r| r.draining)) {
                        (None, _) if mine.is_empty() => "no launcher".to_owned(),
                        (None, _) => "lost".to_owned(),
                        (Some(_), true) if mine.is_empty() => "drained".to_owned(),
                        (Some(_), true) => "draining".to_owned(),
                        (Some(_), false) => "ready".to_owned(),
                    },
                    cpus_milli: node.map_or(0, |n| n.cpus_milli),
                    cpus_reserved_milli: cpus,
                    memory: node.map_or(0, |n| n.memory),
                    memory_reserved: mem,
                    agents,
                    instances: mine
                        .iter()
                        .map(|r| format!("{}/{} {}", r.service, r.instance, r.state))
                        .collect(),
                }
            })
            .collect();
        GridReport {
            hosts: blocks,
            pending: rows.into_iter().filter(|r| r.state == "pending").collect(),
        }
    }
}

/// The grid as text: a block per host with CPU and memory bars.
pub fn render_grid(report: &GridReport) -> String {
    let bar = |used: u64, total: u64| {
        let width = 20u64;
        let filled = if total == 0 {
            0
        } else {
            (used * width).div_ceil(total).min(width)
        };
        format!(
            "[{}{}]",
            "#".repeat(filled as usize),
            ".".repeat((width - filled) as usize)
        )
    };
    let mut out = String::new();
    for h in &report.hosts {
        let labels: Vec<String> = h.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!(
            "{}  {}  {}  agents: {}{}\n",
            h.host,
            if h.addr.is_empty() { "-" } else { &h.addr },
            h.state,
            crate::output::list(&h.agents),
            if labels.is_empty() {
                String::new()
            } else {
                format!("  labels: {}", labels.join(","))
            }
        ));
        out.push_str(&format!(
            "  cpu    {} {} of {} reserved\n",
            bar(h.cpus_reserved_milli, h.cpus_milli),
            grid::place::cores(h.cpus_reserved_milli),
            grid::place::cores(h.cpus_milli)
        ));
        out.push_str(&format!(
            "  memory {} {} of {} reserved\n",
            bar(h.memory_reserved, h.memory),
            schema::format_memory(h.memory_reserved),
            schema::format_memory(h.memory)
        ));
        for i in &h.instances {
            out.push_str(&format!("  {i}\n"));
        }
    }
    if !report.pending.is_empty() {
        out.push_str("pending:\n");
        for p in &report.pending {
            out.push_str(&format!("  {}/{}: {}\n", p.service, p.instance, p.reason));
        }
    }
    out
}

fn list<'a>(stacks: impl IntoIterator<Item = &'a StackName>) -> String {
    stacks
        .into_iter()
        .map(StackName::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}
