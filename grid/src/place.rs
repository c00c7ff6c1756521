//! Placement: a pure function from the jobs, the hosts and where instances run now to where
//! every instance should run.
//!
//! Rules, in order:
//! 1. **Constraints**: a job's `placement.labels` (every one on the host), `placement.hosts`
//!    (one of them), `placement.max_per_host`.
//! 2. **Capacity**: the reservations on a host never add up to more than it offers.
//! 3. **Spread**: a new instance goes to the host with the fewest instances of its job, then
//!    the least reserved (CPU and memory, as shares of what the host offers), then the fewest
//!    instances in all, then the host name, so the same input always gives the same plan.
//! 4. **Stability**: an instance that runs where it may stay (the host is up and not
//!    draining, the constraints hold, it fits, it does not keep crashing there) stays: nothing
//!    is reshuffled when a host joins
//!    or another job scales. Every staying instance is counted before anything new is placed.
//!
//! What fits nowhere is pending, with each host's reason.
//!
//! Cost: per job, one heap of its eligible hosts; each instance pops the best and pushes it
//! back with its new score, so placing `n` instances on `h` hosts is O(h + n log h) per job.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use schema::{HostId, JobSpec, ServiceId};

/// One instance of a job: the service and its number `0..scale`.
pub type InstanceId = (ServiceId, u32);

/// What a host is to the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    /// Its launcher is alive and it is not draining: it takes new work.
    Ready,
    /// The operator drains it: what runs there moves, nothing new comes.
    Draining,
    /// Its launcher's lease expired: what was placed there stays placed (it may still run,
    /// cut off), nothing new comes. The scheduler leaves such a host out altogether once it
    /// has been lost long enough, and its instances are then placed elsewhere.
    Lost,
}

/// A host as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub host: HostId,
    /// Thousandths of a core offered.
    pub cpus_milli: u64,
    /// Bytes offered.
    pub memory: u64,
    pub labels: BTreeMap<String, String>,
    pub state: HostState,
}

impl Host {
    /// A host whose launcher is alive: what its node record offers, with the labels and the
    /// draining mark of its member record (`hosts/<host>`), if it has one.
    pub fn live(
        host: &HostId,
        node: &schema::records::NodeRecord,
        member: Option<&schema::records::HostRecord>,
    ) -> Host {
        Host {
            host: host.clone(),
            cpus_milli: node.cpus_milli,
            memory: node.memory,
            labels: member.map(|r| r.labels.clone()).unwrap_or_default(),
            state: if member.is_some_and(|r| r.draining) {
                HostState::Draining
            } else {
                HostState::Ready
            },
        }
    }

    /// A host whose launcher is gone but whose instances stay placed for now.
    pub fn lost(host: &HostId) -> Host {
        Host {
            host: host.clone(),
            cpus_milli: 0,
            memory: 0,
            labels: BTreeMap::new(),
            state: HostState::Lost,
        }
    }
}

/// Instances that fit nowhere, and why not, host by host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pending {
    pub instances: Vec<u32>,
    /// Every host with the reason it cannot take one more instance of the job.
    pub reasons: Vec<(HostId, String)>,
}

/// Where every instance should run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub placed: BTreeMap<InstanceId, HostId>,
    pub pending: BTreeMap<ServiceId, Pending>,
}

/// A host's rank for one more instance of a job, lowest first: avoided (the job keeps
/// crashing there), instances of the job, reserved share, instances in all, position by name.
type Score = (bool, u32, u64, u32, usize);

/// What is used of one host while placing.
struct Usage<'a> {
    host: &'a Host,
    cpus: u64,
    memory: u64,
    instances: u32,
}

impl Usage<'_> {
    fn fits(&self, job: &JobSpec) -> bool {
        self.cpus + job.resources.cpus_milli <= self.host.cpus_milli
            && self.memory + job.resources.memory <= self.host.memory
    }

    /// Reserved share of what the host offers, in millionths (CPU and memory added).
    fn reserved(&self) -> u64 {
        let share = |used: u64, total: u64| match total {
            0 => 0,
            t => used.saturating_mul(1_000_000) / t,
        };
        share(self.cpus, self.host.cpus_milli) + share(self.memory, self.host.memory)
    }

    fn take(&mut self, job: &JobSpec) {
        self.cpus += job.resources.cpus_milli;
        self.memory += job.resources.memory;
        self.instances += 1;
    }
}

/// Whether `job` may ever run on `host` (labels and the host list; not capacity).
fn allowed(job: &JobSpec, host: &Host) -> Result<(), String> {
    if !job.placement.hosts.is_empty() && !job.placement.hosts.contains(&host.host) {
        return Err(format!(
            "not in placement.hosts ({})",
            job.placement
                .hosts
                .iter()
                .map(HostId::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for (k, v) in &job.placement.labels {
        if host.labels.get(k) != Some(v) {
            return Err(format!("lacks label {k}={v}"));
        }
    }
    Ok(())
}

/// Places every instance of `jobs` on `hosts`, keeping what `current` runs where it may stay.
///
/// `jobs` are the jobs asked to run (any order; each `stack/job` once), `hosts` every host
/// the scheduler knows, `current` where instances are assigned now (instances of jobs not in
/// `jobs`, or at or above their scale, are simply not in the plan).
pub fn place(jobs: &[&JobSpec], hosts: &[Host], current: &BTreeMap<InstanceId, HostId>) -> Plan {
    place_avoiding(jobs, hosts, current, &BTreeSet::new())
}

/// [`place`], where each `(service, host)` in `avoid` (a job that keeps crashing there) may
/// not stay on that host and ranks it last for new instances of that job.
pub fn place_avoiding(
    jobs: &[&JobSpec],
    hosts: &[Host],
    current: &BTreeMap<InstanceId, HostId>,
    avoid: &BTreeSet<(ServiceId, HostId)>,
) -> Plan {
    let mut jobs: Vec<&JobSpec> = jobs.to_vec();
    jobs.sort_by(|a, b| (&a.stack, &a.job).cmp(&(&b.stack, &b.job)));
    let mut hosts: Vec<&Host> = hosts.iter().collect();
    hosts.sort_by(|a, b| a.host.cmp(&b.host));
    let index: HashMap<&HostId, usize> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (&h.host, i))
        .collect();
    let mut usage: Vec<Usage<'_>> = hosts
        .iter()
        .map(|h| Usage {
            host: h,
            cpus: 0,
            memory: 0,
            instances: 0,
        })
        .collect();
    // Instances of each job per host, by job position.
    let mut per_job: Vec<HashMap<usize, u32>> = vec![HashMap::new(); jobs.len()];
    let mut plan = Plan::default();

    // Stability first: every instance that may stay is counted before anything moves in.
    let mut unplaced: Vec<Vec<u32>> = vec![Vec::new(); jobs.len()];
    for (j, job) in jobs.iter().enumerate() {
        let service = job.service();
        for i in 0..job.scale {
            let id = (service.clone(), i);
            let stay = current
                .get(&id)
                .and_then(|h| index.get(h))
                .copied()
                .filter(|&n| {
                    let u = &usage[n];
                    u.host.state != HostState::Draining
                    && !avoid.contains(&(service.clone(), u.host.host.clone()))
                    && allowed(job, u.host).is_ok()
                    && job
                        .placement
                        .max_per_host
                        .is_none_or(|m| per_job[j].get(&n).copied().unwrap_or(0) < m)
                    // A lost host's instances stay placed whatever it offered: it is not
                    // there to say.
                    && (u.host.state == HostState::Lost || u.fits(job))
                });
            match stay {
                Some(n) => {
                    usage[n].take(job);
                    *per_job[j].entry(n).or_default() += 1;
                    plan.placed.insert(id, usage[n].host.host.clone());
                }
                None => unplaced[j].push(i),
            }
        }
    }

    // Then the rest, job by job, each instance to the best host for it.
    for (j, job) in jobs.iter().enumerate() {
        if unplaced[j].is_empty() {
            continue;
        }
        let service = job.service();
        let avoided = |u: &Usage<'_>| avoid.contains(&(service.clone(), u.host.host.clone()));
        let score = |u: &Usage<'_>, n: usize, mine: u32| {
            Reverse((avoided(u), mine, u.reserved(), u.instances, n))
        };
        let mut heap: BinaryHeap<Reverse<Score>> = usage
            .iter()
            .enumerate()
            .filter(|(_, u)| u.host.state == HostState::Ready && allowed(job, u.host).is_ok())
            .map(|(n, u)| score(u, n, per_job[j].get(&n).copied().unwrap_or(0)))
            .collect();
        let mut left = Vec::new();
        for &i in &unplaced[j] {
            let mut chosen = None;
            while let Some(Reverse((_, mine, _, _, n))) = heap.pop() {
                let u = &usage[n];
                // Usage only grows while this job is placed: a host that cannot take one
                // more now never will in this round.
                if job.placement.max_per_host.is_some_and(|m| mine >= m) || !u.fits(job) {
                    continue;
                }
                chosen = Some(n);
                break;
            }
            let Some(n) = chosen else {
                left.push(i);
                continue;
            };
            usage[n].take(job);
            let mine = per_job[j].entry(n).or_default();
            *mine += 1;
            heap.push(score(&usage[n], n, *mine));
            plan.placed
                .insert((service.clone(), i), usage[n].host.host.clone());
        }
        if !left.is_empty() {
            let reasons = usage
                .iter()
                .enumerate()
                .map(|(n, u)| {
                    (
                        u.host.host.clone(),
                        reason(job, u, per_job[j].get(&n).copied().unwrap_or(0)),
                    )
                })
                .collect();
            plan.pending.insert(
                service,
                Pending {
                    instances: left,
                    reasons,
                },
            );
        }
    }
    plan
}

/// Why `host` cannot take one more instance of `job`.
fn reason(job: &JobSpec, u: &Usage<'_>, mine: u32) -> String {
    match u.host.state {
        HostState::Draining => return "draining".to_owned(),
        HostState::Lost => return "its launcher is not alive".to_owned(),
        HostState::Ready => {}
    }
    if let Err(why) = allowed(job, u.host) {
        return why;
    }
    if let Some(m) = job.placement.max_per_host {
        if mine >= m {
            return format!("runs {mine} of this job already (placement.max_per_host {m})");
        }
    }
    let mut short = Vec::new();
    let need = job.resources;
    if u.cpus + need.cpus_milli > u.host.cpus_milli {
        short.push(format!(
            "cpus {} free, needs {}",
            cores(u.host.cpus_milli.saturating_sub(u.cpus)),
            cores(need.cpus_milli)
        ));
    }
    if u.memory + need.memory > u.host.memory {
        short.push(format!(
            "memory {} free, needs {}",
            schema::format_memory(u.host.memory.saturating_sub(u.memory)),
            schema::format_memory(need.memory)
        ));
    }
    if short.is_empty() {
        "room".to_owned()
    } else {
        short.join(", ")
    }
}

/// Thousandths of a core as cores: `0.5`, `2`.
pub fn cores(milli: u64) -> String {
    if milli % 1000 == 0 {
        (milli / 1000).to_string()
    } else {
        format!("{}", milli as f64 / 1000.0)
    }
}

#[cfg(test)]
#[path = "place_tests.rs"]
mod tests;
