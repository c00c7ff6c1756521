//! The pure placement: 10,000 instances of 100 jobs onto 1,000 hosts with labels and
//! reservations, from nothing and again from its own result (the scheduler's steady state,
//! where every instance stays). The goal: at most 100 ms (100,000 placements/s).
//!
//! `cargo bench -p viking-benches --bench placement`.

use std::collections::BTreeMap;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use grid::{Host, HostState, place};
use schema::{HostId, JobName, JobSpec, StackName};

fn cluster() -> (Vec<JobSpec>, Vec<Host>) {
    let hosts = (0..1000)
        .map(|i| Host {
            host: HostId::new(format!("node-{i:04}")).unwrap(),
            cpus_milli: 16_000,
            memory: 64 << 30,
            labels: BTreeMap::from([
                ("zone".to_owned(), format!("z{}", i % 4)),
                (
                    "role".to_owned(),
                    if i % 5 == 0 { "db" } else { "app" }.to_owned(),
                ),
            ]),
            state: HostState::Ready,
        })
        .collect();
    let jobs = (0..100)
        .map(|j| {
            let mut spec = JobSpec::new(
                StackName::new(format!("s{}", j / 10)).unwrap(),
                JobName::new(format!("j{j}")).unwrap(),
                "busybox",
            );
            spec.scale = 100;
            spec.resources.cpus_milli = 100 + (j % 4) * 100;
            spec.resources.memory = (128 + (j % 8) * 64) << 20;
            match j % 10 {
                0 => {
                    spec.placement.labels.insert("role".into(), "db".into());
                }
                1 => {
                    spec.placement.labels.insert("zone".into(), "z1".into());
                    spec.placement.max_per_host = Some(1);
                }
                _ => {}
            }
            spec
        })
        .collect();
    (jobs, hosts)
}

fn bench(c: &mut Criterion) {
    let (jobs, hosts) = cluster();
    let refs: Vec<&JobSpec> = jobs.iter().collect();
    let first = place(&refs, &hosts, &BTreeMap::new());
    assert_eq!(
        first.placed.len(),
        10_000,
        "every instance fits: {:?}",
        first.pending.keys()
    );
    let mut group = c.benchmark_group("placement");
    group.throughput(Throughput::Elements(10_000));
    group.sample_size(20);
    group.bench_function("10k instances on 1k hosts, from nothing", |b| {
        b.iter(|| place(&refs, &hosts, &BTreeMap::new()));
    });
    group.bench_function("10k instances on 1k hosts, all staying", |b| {
        b.iter(|| place(&refs, &hosts, &first.placed));
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
