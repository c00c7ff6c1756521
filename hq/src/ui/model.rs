//! What the page shows, built from one view of every key under the prefix (as watched) and
//! the traffic history the server keeps. Pure: keys in, JSON out, so it is tested without a
//! browser. Certificates and env values never go into it (env values come one job at a time,
//! on request: `/api/env`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use runtime::watch::Kv;
use schema::records::{
    AliveRecord, AssignRecord, EndpointRecord, FirewallRecord, HostRecord, NodeRecord,
    PortAllocRecord, RouteRecord, ServiceStats, StatsRecord, StatusRecord,
};
use schema::{JobSpec, Key, Prefix};
use serde_json::{Value, json};

/// Samples of the summed counters kept per service port: 5 minutes at one per 5 s.
pub const HISTORY: usize = 60;

/// Seconds without a report after which a service port leaves the traffic table.
pub const FORGET_AFTER: f64 = 60.0;

/// One reading of the counters summed over every host.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Seconds since the UI started.
    pub t: f64,
    pub sum: ServiceStats,
}

/// The traffic history per service port, fed with each new set of `stats/` records.
#[derive(Debug, Default)]
pub struct Traffic {
    pub by_service: BTreeMap<String, VecDeque<Sample>>,
}

impl Traffic {
    /// Records the sums of `stats` at time `t` (seconds), keeping [`HISTORY`] samples. A
    /// service port no ambassador has reported for [`FORGET_AFTER`] seconds (its port
    /// released) leaves the table; a shorter gap (an ambassador restarting, whose record goes
    /// with its lease until the new one writes) keeps its history.
    pub fn record(&mut self, t: f64, stats: &BTreeMap<String, StatsRecord>) {
        let mut sums: BTreeMap<String, ServiceStats> = BTreeMap::new();
        for record in stats.values() {
            for (service, s) in &record.services {
                let sum = sums.entry(service.clone()).or_default();
                sum.active += s.active;
                sum.connections += s.connections;
                sum.failed += s.failed;
                sum.bytes_up += s.bytes_up;
                sum.bytes_down += s.bytes_down;
            }
        }
        for (service, sum) in sums {
            let history = self.by_service.entry(service).or_default();
            history.push_back(Sample { t, sum });
            while history.len() > HISTORY {
                history.pop_front();
            }
        }
        self.by_service
            .retain(|_, history| history.back().is_some_and(|s| t - s.t < FORGET_AFTER));
    }
}

/// Per-second rates between two samples (a counter that went back, a restarted ambassador,
/// counts from zero).
fn rates(a: &Sample, b: &Sample) -> (f64, f64, f64, f64) {
    let dt = (b.t - a.t).max(0.001);
    let d = |x: u64, y: u64| {
        if y >= x {
            (y - x) as f64 / dt
        } else {
            y as f64 / dt
        }
    };
    (
        d(a.sum.connections, b.sum.connections),
        d(a.sum.bytes_up, b.sum.bytes_up),
        d(a.sum.bytes_down, b.sum.bytes_down),
        d(a.sum.failed, b.sum.failed),
    )
}

fn decode<T: serde::de::DeserializeOwned>(kv: &Kv) -> Option<T> {
    serde_json::from_slice(&kv.value).ok()
}

/// The page's whole model, every section.
pub fn build(
    prefix: &Prefix,
    kvs: &BTreeMap<String, Kv>,
    traffic: &Traffic,
    etcd_answers: bool,
) -> Value {
    let mut model = json!({"etcd": etcd_answers, "at": runtime::host::rfc3339_now()});
    for (section, value) in sections(prefix, kvs, traffic, Sections::ALL) {
        model[section.name()] = value;
    }
    model
}

/// The parts of the page's model, each rebuilt only when keys it reads change (a stats or
/// firewall record is rewritten every 5 s by every host: at 1,000 hosts that is 400 puts a
/// second, which must not rebuild the hosts and stacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Section {
    Hosts,
    Stacks,
    Links,
    Traffic,
    Routes,
    Firewall,
}

impl Section {
    pub const ALL: [Section; 6] = [
        Section::Hosts,
        Section::Stacks,
        Section::Links,
        Section::Traffic,
        Section::Routes,
        Section::Firewall,
    ];

    /// Its name in the model.
    pub fn name(self) -> &'static str {
        match self {
            Section::Hosts => "hosts",
            Section::Stacks => "stacks",
            Section::Links => "links",
            Section::Traffic => "traffic",
            Section::Routes => "routes",
            Section::Firewall => "firewall",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of sections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sections(u8);

impl Sections {
    pub const NONE: Sections = Sections(0);
    pub const ALL: Sections = Sections(0b11_1111);

    pub fn of(sections: &[Section]) -> Sections {
        Sections(sections.iter().fold(0, |acc, s| acc | s.bit()))
    }
    pub fn add(&mut self, other: Sections) {
        self.0 |= other.0;
    }
    pub fn has(self, section: Section) -> bool {
        self.0 & section.bit() != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The sections a change of `key` (its value `before` and `after`, `None` when absent) shows
/// in. A stats or firewall record counts for the hosts only when it comes, goes or its agent
/// restarted (`since`): its other fields are shown by the traffic sample and the firewall table.
pub fn touched(prefix: &Prefix, key: &str, before: Option<&Kv>, after: Option<&Kv>) -> Sections {
    use Section::*;
    let Ok(parsed) = prefix.parse(key) else {
        return Sections::NONE;
    };
    let since = |kv: Option<&Kv>| {
        kv.and_then(|kv| serde_json::from_slice::<Value>(&kv.value).ok())
            .map(|v| v["since"].clone())
    };
    let agent_restarted = || since(before) != since(after);
    match parsed {
        Key::Host(_) | Key::Alive(_) | Key::Node(_) | Key::Lost(_) => Sections::of(&[Hosts]),
        Key::Stats(_) if agent_restarted() => Sections::of(&[Hosts]),
        Key::Stats(_) => Sections::NONE,
        Key::Firewall(_) if agent_restarted() => Sections::of(&[Firewall, Hosts]),
        Key::Firewall(_) => Sections::of(&[Firewall]),
        Key::StackJob(..) => Sections::of(&[Hosts, Stacks, Links]),
        Key::StackMeta(_) | Key::Endpoint { .. } | Key::Run(_) => Sections::of(&[Stacks]),
        Key::PortAlloc(_) => Sections::of(&[Stacks, Links]),
        Key::Assign(_) | Key::Status(_) => Sections::of(&[Hosts, Stacks]),
        Key::Route(_) => Sections::of(&[Stacks, Routes]),
        _ => Sections::NONE,
    }
}

/// The records the sections are built from.
#[derive(Default)]
struct Decoded {
    hosts: BTreeMap<String, HostRecord>,
    alive: BTreeMap<String, AliveRecord>,
    nodes: BTreeMap<String, NodeRecord>,
    stats: BTreeMap<String, StatsRecord>,
    firewalls: BTreeMap<String, FirewallRecord>,
    specs: BTreeMap<String, JobSpec>,
    deployed_at: BTreeMap<String, String>,
    allocs: BTreeMap<String, u16>,
    endpoints: BTreeMap<String, Vec<(String, EndpointRecord)>>,
    assigns: Vec<(schema::Slot, AssignRecord)>,
    statuses: BTreeMap<(String, String, u32), (String, StatusRecord)>,
    routes: Vec<(String, RouteRecord)>,
    running: BTreeSet<String>,
    lost: BTreeSet<String>,
}

/// The keys of `dir`.
fn under<'a>(
    prefix: &Prefix,
    kvs: &'a BTreeMap<String, Kv>,
    dir: schema::Dir<'_>,
) -> impl Iterator<Item = (&'a String, &'a Kv)> {
    let dir = prefix.dir(dir);
    kvs.range(dir.clone()..)
        .take_while(move |(k, _)| k.starts_with(&dir))
}

/// The sections in `which`, built: the hosts, stacks and links from every key; the routes and
/// the firewall table alone from their own directories.
pub fn sections(
    prefix: &Prefix,
    kvs: &BTreeMap<String, Kv>,
    traffic: &Traffic,
    which: Sections,
) -> Vec<(Section, Value)> {
    use Section::*;
    let all = which.has(Hosts) || which.has(Stacks) || which.has(Links);
    let mut d = Decoded::default();
    if all {
        d.fill(prefix, kvs.iter());
    } else {
        if which.has(Routes) {
            d.fill(prefix, under(prefix, kvs, schema::Dir::Routes));
        }
        if which.has(Firewall) {
            d.fill(prefix, under(prefix, kvs, schema::Dir::Firewalls));
        }
    }
    let instances = all.then(|| d.instances());
    let mut out = Vec::new();
    for section in Section::ALL {
        if !which.has(section) {
            continue;
        }
        let value = match section {
            Hosts => d.hosts_json(instances.as_ref().expect("built with all")),
            Stacks => d.stacks_json(instances.as_ref().expect("built with all")),
            Links => d.links_json(),
            Traffic => traffic_json(traffic),
            Routes => d.routes_json(),
            Firewall => d.firewall_json(),
        };
        out.push((section, value));
    }
    out
}

/// Instances by host and by job, and what each host has reserved.
struct Instances {
    by_host: BTreeMap<String, Vec<Value>>,
    by_job: BTreeMap<String, Vec<Value>>,
    reserved: BTreeMap<String, (u64, u64)>,
}

impl Decoded {
    fn fill<'a>(&mut self, prefix: &Prefix, kvs: impl Iterator<Item = (&'a String, &'a Kv)>) {
        let Decoded {
            hosts,
            alive,
            nodes,
            stats,
            firewalls,
            specs,
            deployed_at,
            allocs,
            endpoints,
            assigns,
            statuses,
            routes,
            running,
            lost,
        } = self;
        for (key, kv) in kvs {
            let Ok(parsed) = prefix.parse(key) else {
                continue;
            };
            match parsed {
                Key::Host(h) => {
                    if let Some(r) = decode(kv) {
                        hosts.insert(h.to_string(), r);
                    }
                }
                Key::Alive(h) => {
                    if let Some(r) = decode(kv) {
                        alive.insert(h.to_string(), r);
                    }
                }
                Key::Node(h) => {
                    if let Some(r) = decode(kv) {
                        nodes.insert(h.to_string(), r);
                    }
                }
                Key::Stats(h) => {
                    if let Some(r) = decode(kv) {
                        stats.insert(h.to_string(), r);
                    }
                }
                Key::Firewall(h) => {
                    if let Some(r) = decode(kv) {
                        firewalls.insert(h.to_string(), r);
                    }
                }
                Key::StackJob(s, j) => {
                    if let Some(r) = decode(kv) {
                        specs.insert(format!("{s}/{j}"), r);
                    }
                }
                Key::StackMeta(s) => {
                    let meta: Option<Value> = decode(kv);
                    let at = meta
                        .and_then(|m| m["deployed_at"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    deployed_at.insert(s.to_string(), at);
                }
                Key::PortAlloc(sp) => {
                    if let Some(r) = decode::<PortAllocRecord>(kv) {
                        allocs.insert(sp.to_string(), r.port);
                    }
                }
                Key::Endpoint {
                    service_port,
                    instance,
                } => {
                    if let Some(r) = decode(kv) {
                        endpoints
                            .entry(service_port.service.to_string())
                            .or_default()
                            .push((instance.to_string(), r));
                    }
                }
                Key::Assign(slot) => {
                    if let Some(r) = decode(kv) {
                        assigns.push((slot, r));
                    }
                }
                Key::Status(slot) => {
                    if let Some(r) = decode(kv) {
                        statuses.insert(
                            (
                                slot.service.to_string(),
                                slot.host.to_string(),
                                slot.instance,
                            ),
                            (slot.host.to_string(), r),
                        );
                    }
                }
                Key::Route(d) => {
                    if let Some(r) = decode(kv) {
                        routes.push((d.to_string(), r));
                    }
                }
                Key::Run(s) => {
                    running.insert(s.to_string());
                }
                Key::Lost(h) => {
                    lost.insert(h.to_string());
                }
                _ => {}
            }
        }
    }

    fn instances(&self) -> Instances {
        let Decoded {
            specs,
            assigns,
            statuses,
            ..
        } = self;
        // Instances: one per assignment (a moving instance has two: the one `leaving` and its
        // new place), with the launcher's status where there is one.
        let mut by_host: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        let mut by_job: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        let mut reserved: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (slot, assign) in assigns {
            let service = slot.service.to_string();
            let host = slot.host.to_string();
            let status = statuses.get(&(service.clone(), host.clone(), slot.instance));
            let (state, reason, restarts) = match status {
                Some((_, s)) => (
                    format!("{:?}", s.state).to_lowercase(),
                    s.reason.clone(),
                    s.restarts,
                ),
                None => ("assigned".to_owned(), String::new(), 0),
            };
            let instance = json!({
                "job": service,
                "instance": slot.instance,
                "host": host,
                "state": state,
                "reason": reason,
                "restarts": restarts,
                "leaving": assign.leaving,
            });
            by_host
                .entry(host.clone())
                .or_default()
                .push(instance.clone());
            by_job.entry(service.clone()).or_default().push(instance);
            if let Some(spec) = specs.get(&service) {
                let r = reserved.entry(host).or_default();
                r.0 += spec.resources.cpus_milli;
                r.1 += spec.resources.memory;
            }
        }
        Instances {
            by_host,
            by_job,
            reserved,
        }
    }

    fn hosts_json(&self, instances: &Instances) -> Value {
        let Decoded {
            hosts,
            alive,
            nodes,
            stats,
            firewalls,
            lost,
            ..
        } = self;
        let Instances {
            by_host, reserved, ..
        } = instances;
        let mut names: BTreeSet<String> = hosts.keys().cloned().collect();
        names.extend(nodes.keys().cloned());
        names.extend(alive.keys().cloned());
        names.extend(firewalls.keys().cloned());
        let hosts_json: Vec<Value> = names
        .iter()
        .map(|name| {
            let member = hosts.get(name);
            let node = nodes.get(name);
            let (cpus_reserved, memory_reserved) = reserved.get(name).copied().unwrap_or((0, 0));
            json!({
                "name": name,
                "member": member.is_some(),
                "addr": member.map(|m| m.addr.clone()).unwrap_or_default(),
                "roles": member.map(|m| m.roles.clone()).unwrap_or_default(),
                "labels": member.map(|m| m.labels.clone()).unwrap_or_default(),
                "draining": member.is_some_and(|m| m.draining),
                "lost": lost.contains(name),
                "agents": {
                    "registrator": alive.get(name).map(|a| json!({"since": a.since, "version": a.version})),
                    "launcher": node.map(|n| json!({"since": n.since, "version": n.launcher_version})),
                    "ambassador": stats.get(name).map(|s| json!({"since": s.since})),
                    "locknet": firewalls.get(name).map(|f| json!({"since": f.since})),
                },
                "cpus_milli": node.map(|n| n.cpus_milli),
                "memory": node.map(|n| n.memory),
                "cpus_reserved": cpus_reserved,
                "memory_reserved": memory_reserved,
                "instances": by_host.get(name).cloned().unwrap_or_default(),
            })
        })
        .collect();
        Value::Array(hosts_json)
    }

    fn links_json(&self) -> Value {
        let mut edges = Vec::new();
        for (id, spec) in &self.specs {
            for link in &spec.links {
                let target = link.service.to_string();
                let ambassador: Vec<String> = self
                    .allocs
                    .iter()
                    .filter(|(sp, _)| sp.split(':').next() == Some(target.as_str()))
                    .map(|(sp, port)| format!("{}→{port}", sp.rsplit(':').next().unwrap_or("")))
                    .collect();
                edges.push(json!({"from": id, "to": target, "label": ambassador.join(" ")}));
            }
        }
        let nodes: Vec<Value> = self.specs.keys().map(|id| json!({"id": id})).collect();
        json!({"nodes": nodes, "edges": edges})
    }

    fn stacks_json(&self, instances: &Instances) -> Value {
        let Decoded {
            specs,
            deployed_at,
            allocs,
            endpoints,
            routes,
            running,
            ..
        } = self;
        let by_job = &instances.by_job;
        // Stacks and jobs.
        let mut stacks: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for (id, spec) in specs {
            let ports: Vec<Value> = spec
            .ports
            .iter()
            .map(|p| {
                let sp = format!("{id}:{}/{}", p.port, p.proto);
                json!({"port": p.port, "proto": p.proto.to_string(), "ambassador": allocs.get(&sp)})
            })
            .collect();
            let live: Vec<Value> = endpoints
            .get(id)
            .map(|eps| {
                eps.iter()
                    .map(|(instance, e)| {
                        json!({"instance": instance, "host": e.host.to_string(), "addr": format!("{}:{}", e.addr, e.port)})
                    })
                    .collect()
            })
            .unwrap_or_default();
            let mut env_names: Vec<&String> = spec.env.keys().chain(spec.link_env.keys()).collect();
            env_names.sort();
            env_names.dedup();
            let domains: Vec<String> = routes
                .iter()
                .filter(|(_, r)| format!("{}/{}", r.stack, r.job) == *id)
                .map(|(d, _)| d.clone())
                .collect();
            stacks
                .entry(spec.stack.to_string())
                .or_default()
                .push(json!({
                    "id": id,
                    "name": spec.job.to_string(),
                    "image": spec.image,
                    "kind": format!("{:?}", spec.kind).to_lowercase(),
                    "scale": spec.scale,
                    "ports": ports,
                    "links": spec.links.iter().map(|l| l.service.to_string()).collect::<Vec<_>>(),
                    "domains": domains,
                    "instances": by_job.get(id).cloned().unwrap_or_default(),
                    "endpoints": live,
                    "env_names": env_names,
                }));
        }
        let stacks_json: Vec<Value> = stacks
            .into_iter()
            .map(|(name, jobs)| {
                json!({
                    "name": name,
                    "running": running.contains(&name),
                    "deployed_at": deployed_at.get(&name).cloned().unwrap_or_default(),
                    "jobs": jobs,
                })
            })
            .collect();
        Value::Array(stacks_json)
    }

    fn routes_json(&self) -> Value {
        self.routes
            .iter()
            .map(|(d, r)| json!({"domain": d, "job": format!("{}/{}", r.stack, r.job), "port": r.port}))
            .collect()
    }

    fn firewall_json(&self) -> Value {
        self.firewalls
            .iter()
            .map(|(h, f)| {
                json!({
                    "host": h, "table": f.table, "members": f.members,
                    "dropped_packets": f.dropped_packets, "dropped_bytes": f.dropped_bytes, "at": f.at,
                })
            })
            .collect()
    }
}

fn traffic_json(traffic: &Traffic) -> Value {
    // Traffic: the last sample and the rates over the last interval, with the history.
    let traffic_json: Vec<Value> = traffic
        .by_service
        .iter()
        .map(|(service, history)| {
            let last = history.back().copied().unwrap_or_default();
            let points: Vec<Value> = history
                .iter()
                .zip(history.iter().skip(1))
                .map(|(a, b)| {
                    let (c, up, down, f) = rates(a, b);
                    json!({"t": b.t, "conns": c, "bytes": up + down, "failed": f})
                })
                .collect();
            let (conns, up, down, failed) = if history.len() >= 2 {
                rates(&history[history.len() - 2], &history[history.len() - 1])
            } else {
                (0.0, 0.0, 0.0, 0.0)
            };
            json!({
                "service_port": service,
                "active": last.sum.active,
                "connections": last.sum.connections,
                "failed": last.sum.failed,
                "bytes_up": last.sum.bytes_up,
                "bytes_down": last.sum.bytes_down,
                "conns_per_s": conns,
                "up_per_s": up,
                "down_per_s": down,
                "failed_per_s": failed,
                "history": points,
            })
        })
        .collect();
    Value::Array(traffic_json)
}

/// The env of job `id` (its own and its links'), for `/api/env`; `None` if not deployed.
pub fn env(prefix: &Prefix, kvs: &BTreeMap<String, Kv>, id: &str) -> Option<Value> {
    let (stack, job) = id.split_once('/')?;
    let key = prefix.key(&Key::StackJob(
        schema::StackName::new(stack).ok()?,
        schema::JobName::new(job).ok()?,
    ));
    let spec: JobSpec = decode(kvs.get(&key)?)?;
    let mut env: BTreeMap<String, String> = spec.link_env.clone();
    env.extend(spec.env.clone());
    Some(json!(env))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(services: &[(&str, u64, u64)]) -> StatsRecord {
        StatsRecord {
            v: 1,
            since: String::new(),
            at: String::new(),
            services: services
                .iter()
                .map(|(s, c, b)| {
                    (
                        (*s).to_owned(),
                        ServiceStats {
                            active: 1,
                            connections: *c,
                            failed: 0,
                            bytes_up: *b,
                            bytes_down: 0,
                        },
                    )
                })
                .collect(),
        }
    }

    fn kv(key: &str, value: Value) -> Kv {
        Kv {
            key: key.to_owned(),
            value: value.to_string().into_bytes(),
            mod_revision: 1,
            lease: 0,
        }
    }

    #[test]
    fn a_stats_rewrite_rebuilds_nothing_and_an_agent_restart_rebuilds_the_hosts() {
        let p = Prefix::default();
        let key = "/viking/stats/h1";
        let old = kv(key, json!({"since": "t0", "at": "t1"}));
        let again = kv(key, json!({"since": "t0", "at": "t2"}));
        let restarted = kv(key, json!({"since": "t3", "at": "t3"}));
        assert!(touched(&p, key, Some(&old), Some(&again)).is_empty());
        assert_eq!(
            touched(&p, key, Some(&old), Some(&restarted)),
            Sections::of(&[Section::Hosts])
        );
        assert_eq!(
            touched(&p, key, None, Some(&old)),
            Sections::of(&[Section::Hosts])
        );
        let fw = "/viking/firewall/h1";
        assert_eq!(
            touched(&p, fw, Some(&old), Some(&again)),
            Sections::of(&[Section::Firewall])
        );
        let status = "/viking/grid/status/h1/s/web/0";
        assert_eq!(
            touched(&p, status, None, Some(&old)),
            Sections::of(&[Section::Hosts, Section::Stacks])
        );
        assert!(touched(&p, "/viking/containers/h1/0123456789ab", None, Some(&old)).is_empty());
    }

    #[test]
    fn traffic_sums_the_hosts_and_rates_come_from_the_last_two_samples() {
        let mut t = Traffic::default();
        let a = BTreeMap::from([
            ("a".to_owned(), stats(&[("s/web:80/tcp", 10, 1000)])),
            ("b".to_owned(), stats(&[("s/web:80/tcp", 5, 500)])),
        ]);
        t.record(0.0, &a);
        let b = BTreeMap::from([
            ("a".to_owned(), stats(&[("s/web:80/tcp", 20, 2000)])),
            ("b".to_owned(), stats(&[("s/web:80/tcp", 15, 1500)])),
        ]);
        t.record(5.0, &b);
        let model = build(&Prefix::default(), &BTreeMap::new(), &t, true);
        let row = &model["traffic"][0];
        assert_eq!(row["service_port"], "s/web:80/tcp");
        assert_eq!(row["connections"], 35);
        assert_eq!(row["active"], 2);
        assert_eq!(row["conns_per_s"], 4.0);
        assert_eq!(row["up_per_s"], 400.0);
        for i in 0..(HISTORY + 5) {
            t.record(10.0 + i as f64, &b);
        }
        assert_eq!(t.by_service["s/web:80/tcp"].len(), HISTORY);
        // Its stack removed, the service port is reported by no ambassador: a short gap keeps
        // its row, a minute without it takes it away (it stayed, frozen at its last
        // figures, for the UI's life).
        let last = 10.0 + (HISTORY + 4) as f64;
        let c = BTreeMap::from([("a".to_owned(), stats(&[("s/api:81/tcp", 1, 10)]))]);
        t.record(last + 5.0, &c);
        assert_eq!(t.by_service.len(), 2);
        t.record(last + FORGET_AFTER, &c);
        let model = build(&Prefix::default(), &BTreeMap::new(), &t, true);
        let rows = model["traffic"].as_array().unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0]["service_port"], "s/api:81/tcp");
    }
}
