use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use schema::{HostId, JobName, JobSpec, StackName};

use super::*;

fn host(name: &str, cpus: u64, memory_mb: u64, labels: &[(&str, &str)]) -> Host {
    Host {
        host: HostId::new(name).unwrap(),
        cpus_milli: cpus * 1000,
        memory: memory_mb << 20,
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        state: HostState::Ready,
    }
}

fn job(name: &str, scale: u32) -> JobSpec {
    let (stack, job) = name.split_once('/').unwrap();
    let mut j = JobSpec::new(
        StackName::new(stack).unwrap(),
        JobName::new(job).unwrap(),
        "busybox",
    );
    j.scale = scale;
    j
}

fn per_host(plan: &Plan) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for h in plan.placed.values() {
        *out.entry(h.to_string()).or_default() += 1;
    }
    out
}

fn three() -> Vec<Host> {
    vec![
        host("node-1", 4, 4096, &[]),
        host("node-2", 4, 4096, &[]),
        host("node-3", 4, 4096, &[("role", "db")]),
    ]
}

#[test]
fn five_instances_spread_two_two_one() {
    let web = job("shared/web", 5);
    let plan = place(&[&web], &three(), &BTreeMap::new());
    assert!(plan.pending.is_empty());
    let mut counts: Vec<usize> = per_host(&plan).into_values().collect();
    counts.sort_unstable();
    assert_eq!(counts, [1, 2, 2]);
}

#[test]
fn labels_and_max_per_host_constrain_and_the_rest_is_pending_with_reasons() {
    let mut db = job("shared/db", 2);
    db.placement.labels.insert("role".into(), "db".into());
    let mut one_each = job("shared/cache", 4);
    one_each.placement.max_per_host = Some(1);
    let plan = place(&[&db, &one_each], &three(), &BTreeMap::new());
    for i in 0..2 {
        assert_eq!(
            plan.placed[&(db.service(), i)].as_str(),
            "node-3",
            "db runs only where role=db"
        );
    }
    assert_eq!(
        plan.placed
            .keys()
            .filter(|(s, _)| *s == one_each.service())
            .count(),
        3
    );
    let pending = &plan.pending[&one_each.service()];
    assert_eq!(pending.instances, [3]);
    assert!(
        pending
            .reasons
            .iter()
            .all(|(_, r)| r == "runs 1 of this job already (placement.max_per_host 1)"),
        "{pending:?}"
    );
    // A fourth host takes it.
    let mut four = three();
    four.push(host("node-4", 4, 4096, &[]));
    let again = place(&[&db, &one_each], &four, &plan.placed);
    assert!(again.pending.is_empty());
    assert_eq!(again.placed[&(one_each.service(), 3)].as_str(), "node-4");
}

#[test]
fn capacity_is_never_exceeded_and_the_reason_says_what_is_short() {
    let mut big = job("app/big", 3);
    big.resources.memory = 3 << 30;
    let hosts = vec![host("node-1", 4, 4096, &[]), host("node-2", 4, 2048, &[])];
    let plan = place(&[&big], &hosts, &BTreeMap::new());
    assert_eq!(per_host(&plan), BTreeMap::from([("node-1".into(), 1)]));
    let pending = &plan.pending[&big.service()];
    assert_eq!(pending.instances, [1, 2]);
    assert_eq!(
        pending.reasons,
        [
            (
                HostId::new("node-1").unwrap(),
                "memory 1G free, needs 3G".to_owned()
            ),
            (
                HostId::new("node-2").unwrap(),
                "memory 2G free, needs 3G".to_owned()
            ),
        ]
    );
}

#[test]
fn nothing_moves_when_a_host_joins_or_another_job_scales() {
    let web = job("shared/web", 4);
    let two = vec![host("node-1", 4, 4096, &[]), host("node-2", 4, 4096, &[])];
    let first = place(&[&web], &two, &BTreeMap::new());
    let mut more = two.clone();
    more.push(host("node-3", 4, 4096, &[]));
    let api = job("app/api", 6);
    let second = place(&[&web, &api], &more, &first.placed);
    for (id, h) in &first.placed {
        assert_eq!(&second.placed[id], h, "{id:?} moved");
    }
    // The new job spreads by its own count first, then goes to the emptier host on a tie.
    let api_on = |name: &str| {
        second
            .placed
            .iter()
            .filter(|((s, _), h)| *s == api.service() && h.as_str() == name)
            .count()
    };
    assert_eq!(
        [api_on("node-1"), api_on("node-2"), api_on("node-3")],
        [2, 2, 2]
    );
    assert_eq!(second.placed[&(api.service(), 0)].as_str(), "node-3");
}

#[test]
fn draining_hosts_lose_their_instances_and_lost_hosts_keep_them() {
    let web = job("shared/web", 2);
    let mut hosts = vec![host("node-1", 4, 4096, &[]), host("node-2", 4, 4096, &[])];
    let first = place(&[&web], &hosts, &BTreeMap::new());
    assert_eq!(per_host(&first).len(), 2);
    hosts[1].state = HostState::Lost;
    let lost = place(&[&web], &hosts, &first.placed);
    assert_eq!(
        lost.placed, first.placed,
        "a lost host's instances stay placed"
    );
    hosts[1].state = HostState::Draining;
    let drained = place(&[&web], &hosts, &first.placed);
    assert!(drained.placed.values().all(|h| h.as_str() == "node-1"));
}

#[test]
fn scaling_down_drops_the_highest_instances() {
    let mut web = job("shared/web", 4);
    let first = place(&[&web], &three(), &BTreeMap::new());
    web.scale = 2;
    let second = place(&[&web], &three(), &first.placed);
    assert_eq!(
        second.placed.keys().map(|(_, i)| *i).collect::<Vec<_>>(),
        [0, 1]
    );
    for id in second.placed.keys() {
        assert_eq!(second.placed[id], first.placed[id]);
    }
}

// Properties over random clusters.

fn arb_hosts() -> impl Strategy<Value = Vec<Host>> {
    prop::collection::vec(
        (
            0u64..8,
            0u64..8,
            any::<bool>(),
            prop_oneof![
                3 => Just(HostState::Ready),
                1 => Just(HostState::Draining),
                1 => Just(HostState::Lost)
            ],
        ),
        1..8,
    )
    .prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (cpus, mem, db, state))| {
                let mut h = host(
                    &format!("h{i}"),
                    cpus,
                    mem * 512,
                    if db { &[("role", "db")] } else { &[] },
                );
                h.state = state;
                h
            })
            .collect()
    })
}

fn arb_jobs() -> impl Strategy<Value = Vec<JobSpec>> {
    prop::collection::vec(
        (
            0u32..8,
            0u64..3,
            0u64..3,
            any::<bool>(),
            prop::option::of(1u32..3),
            any::<bool>(),
        ),
        1..5,
    )
    .prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (scale, cpu_half, mem_quarter, db, max, pinned))| {
                let mut j = job(&format!("s/j{i}"), scale);
                j.resources.cpus_milli = cpu_half * 500;
                j.resources.memory = mem_quarter * (256 << 20);
                if db {
                    j.placement.labels.insert("role".into(), "db".into());
                }
                j.placement.max_per_host = max;
                if pinned {
                    j.placement.hosts =
                        vec![HostId::new("h0").unwrap(), HostId::new("h1").unwrap()];
                }
                j
            })
            .collect()
    })
}

/// Checks every rule a plan must keep, for hosts that are not lost.
fn check_rules(jobs: &[JobSpec], hosts: &[Host], plan: &Plan) -> Result<(), TestCaseError> {
    let by_name: BTreeMap<&HostId, &Host> = hosts.iter().map(|h| (&h.host, h)).collect();
    let mut used: BTreeMap<&HostId, (u64, u64)> = BTreeMap::new();
    let mut count: BTreeMap<(&ServiceId, &HostId), u32> = BTreeMap::new();
    for ((service, i), h) in &plan.placed {
        let job = jobs.iter().find(|j| &j.service() == service).unwrap();
        prop_assert!(*i < job.scale);
        let host = by_name[h];
        prop_assert!(
            host.state != HostState::Draining,
            "placed on a draining host"
        );
        prop_assert!(
            allowed(job, host).is_ok(),
            "{service} on {h} breaks a constraint"
        );
        let u = used.entry(h).or_default();
        u.0 += job.resources.cpus_milli;
        u.1 += job.resources.memory;
        *count.entry((service, h)).or_default() += 1;
    }
    for (h, (cpus, mem)) in &used {
        let host = by_name[h];
        if host.state == HostState::Ready {
            prop_assert!(
                *cpus <= host.cpus_milli && *mem <= host.memory,
                "{h} over capacity"
            );
        }
    }
    for ((service, _), n) in &count {
        let job = jobs.iter().find(|j| &j.service() == *service).unwrap();
        if let Some(m) = job.placement.max_per_host {
            prop_assert!(*n <= m, "{service}: {n} on one host, max {m}");
        }
    }
    // Every instance is placed or pending, once.
    for job in jobs {
        let placed = plan
            .placed
            .keys()
            .filter(|(s, _)| *s == job.service())
            .count();
        let pending = plan
            .pending
            .get(&job.service())
            .map_or(0, |p| p.instances.len());
        prop_assert_eq!(placed + pending, job.scale as usize);
    }
    Ok(())
}

proptest! {
    #[test]
    fn plans_keep_every_rule_and_are_deterministic(jobs in arb_jobs(), hosts in arb_hosts()) {
        let refs: Vec<&JobSpec> = jobs.iter().collect();
        let plan = place(&refs, &hosts, &BTreeMap::new());
        check_rules(&jobs, &hosts, &plan)?;
        let mut reversed = refs.clone();
        reversed.reverse();
        let mut shuffled_hosts = hosts.clone();
        shuffled_hosts.reverse();
        prop_assert_eq!(&place(&reversed, &shuffled_hosts, &BTreeMap::new()), &plan);
    }

    #[test]
    fn a_valid_placement_stays_as_it_is(jobs in arb_jobs(), hosts in arb_hosts(), grow in 0u32..3) {
        let refs: Vec<&JobSpec> = jobs.iter().collect();
        let first = place(&refs, &hosts, &BTreeMap::new());
        // Scale every job up: what ran stays where it was, and the rules still hold.
        let grown: Vec<JobSpec> = jobs.iter().cloned().map(|mut j| { j.scale += grow; j }).collect();
        let grown_refs: Vec<&JobSpec> = grown.iter().collect();
        let second = place(&grown_refs, &hosts, &first.placed);
        for (id, h) in &first.placed {
            prop_assert_eq!(second.placed.get(id), Some(h), "{:?} moved", id);
        }
        check_rules(&grown, &hosts, &second)?;
        // Placing again from its own result changes nothing.
        let third = place(&grown_refs, &hosts, &second.placed);
        prop_assert_eq!(third.placed, second.placed);
    }
}

#[test]
fn rules_hold_for_an_arbitrary_current_too() {
    // A current assignment written by hand onto a draining host and over capacity.
    let mut big = job("s/big", 2);
    big.resources.memory = 3 << 30;
    let mut hosts = vec![host("h0", 4, 4096, &[]), host("h1", 4, 4096, &[])];
    hosts[1].state = HostState::Draining;
    let current: BTreeMap<InstanceId, HostId> = [
        ((big.service(), 0), HostId::new("h0").unwrap()),
        ((big.service(), 1), HostId::new("h0").unwrap()),
    ]
    .into();
    let plan = place(&[&big], &hosts, &current);
    assert_eq!(plan.placed.len(), 1);
    assert_eq!(plan.pending[&big.service()].instances, [1]);
    let hosts_used: BTreeSet<&HostId> = plan.placed.values().collect();
    assert_eq!(hosts_used.len(), 1);
}

#[test]
fn a_job_that_keeps_crashing_on_a_host_moves_and_ranks_that_host_last() {
    let web = job("shared/web", 1);
    let hosts = vec![host("node-1", 4, 4096, &[]), host("node-2", 4, 4096, &[])];
    let first = place(&[&web], &hosts, &BTreeMap::new());
    let on = first.placed[&(web.service(), 0)].clone();
    let avoid = BTreeSet::from([(web.service(), on.clone())]);
    let second = place_avoiding(&[&web], &hosts, &first.placed, &avoid);
    assert_ne!(second.placed[&(web.service(), 0)], on, "it moved");
    // With nowhere else to go, it stays placed (on the host it crashes on) rather than pending.
    let alone = vec![hosts.iter().find(|h| h.host == on).unwrap().clone()];
    let third = place_avoiding(&[&web], &alone, &first.placed, &avoid);
    assert_eq!(third.placed[&(web.service(), 0)], on);
}
