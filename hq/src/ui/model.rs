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
    /// Records the sums of `stats` at time `t` (seconds), keeping [`HISTORY`] samples.
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

/// The page's whole model.
pub fn build(
    prefix: &Prefix,
    kvs: &BTreeMap<String, Kv>,
    traffic: &Traffic,
    etcd_answers: bool,
) -> Value {
    let mut hosts: BTreeMap<String, HostRecord> = BTreeMap::new();
    let mut alive: BTreeMap<String, AliveRecord> = BTreeMap::new();
    let mut nodes: BTreeMap<String, NodeRecord> = BTreeMap::new();
    let mut stats: BTreeMap<String, StatsRecord> = BTreeMap::new();
    let mut firewalls: BTreeMap<String, FirewallRecord> = BTreeMap::new();
    let mut specs: BTreeMap<String, JobSpec> = BTreeMap::new();
    let mut deployed_at: BTreeMap<String, String> = BTreeMap::new();
    let mut allocs: BTreeMap<String, u16> = BTreeMap::new();
    let mut endpoints: BTreeMap<String, Vec<(String, EndpointRecord)>> = BTreeMap::new();
    let mut assigns: Vec<(schema::Slot, AssignRecord)> = Vec::new();
    let mut statuses: BTreeMap<(String, String, u32), (String, StatusRecord)> = BTreeMap::new();
    let mut routes: Vec<(String, RouteRecord)> = Vec::new();
    let mut running: BTreeSet<String> = BTreeSet::new();
    let mut lost: BTreeSet<String> = BTreeSet::new();
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

    // Instances: one per assignment (a moving instance has two: the one `leaving` and its
    // new place), with the launcher's status where there is one.
    let mut by_host: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut by_job: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut reserved: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (slot, assign) in &assigns {
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
                    "ambassador": stats.get(name).map(|s| json!({"since": s.since, "at": s.at})),
                    "locknet": firewalls.get(name).map(|f| json!({"since": f.since, "at": f.at})),
                },
                "cpus_milli": node.map(|n| n.cpus_milli),
                "memory": node.map(|n| n.memory),
                "cpus_reserved": cpus_reserved,
                "memory_reserved": memory_reserved,
                "instances": by_host.get(name).cloned().unwrap_or_default(),
            })
        })
        .collect();

    // Stacks and jobs.
    let mut stacks: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut edges = Vec::new();
    for (id, spec) in &specs {
        let ports: Vec<Value> = spec
            .ports
            .iter()
            .map(|p| {
                let sp = format!("{id}:{}/{}", p.port, p.proto);
                json!({"port": p.port, "proto": p.proto.to_string(), "ambassador": allocs.get(&sp)})
            })
            .collect();
        for link in &spec.links {
            let target = link.service.to_string();
            let ambassador: Vec<String> = allocs
                .iter()
                .filter(|(sp, _)| sp.split(':').next() == Some(target.as_str()))
                .map(|(sp, port)| format!("{}→{port}", sp.rsplit(':').next().unwrap_or("")))
                .collect();
            edges.push(json!({"from": id, "to": target, "label": ambassador.join(" ")}));
        }
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
    let nodes_json: Vec<Value> = specs.keys().map(|id| json!({"id": id})).collect();

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

    json!({
        "etcd": etcd_answers,
        "at": runtime::host::rfc3339_now(),
        "hosts": hosts_json,
        "stacks": stacks_json,
        "links": {"nodes": nodes_json, "edges": edges},
        "traffic": traffic_json,
        "routes": routes.iter().map(|(d, r)| json!({"domain": d, "job": format!("{}/{}", r.stack, r.job), "port": r.port})).collect::<Vec<_>>(),
        "firewall": firewalls.iter().map(|(h, f)| json!({
            "host": h, "table": f.table, "members": f.members,
            "dropped_packets": f.dropped_packets, "dropped_bytes": f.dropped_bytes, "at": f.at,
        })).collect::<Vec<_>>(),
    })
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
    }
}
