//! Link-scoped access on the connection path: the ambassador's admission of a new
//! connection (`Shared::admit`: the table's current `Arc`, one hash lookup) from a container
//! in a table of 1,000 containers of 100 jobs, against `--links open` (no lookup). Set beside
//! the proxy's CPU per new connection (36.9 µs, `make bench-proxy`, docs/performance.md) it
//! gives the cost of enforcing links on new connections.
//!
//! `cargo bench -p viking-benches --bench access`.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use ambassador::access::{Access, LinksMode};
use criterion::{Criterion, criterion_group, criterion_main};
use runtime::watch::Kv;
use schema::records::{self, ContainerRecord};
use schema::{JobName, JobSpec, LinkSpec, Prefix, ServiceId, StackName};

fn table() -> (Access, IpAddr, ServiceId) {
    let prefix = Prefix::default();
    let kv = |key: String, value: String| {
        (
            key.clone(),
            Kv {
                key,
                value: value.into_bytes(),
                ..Kv::default()
            },
        )
    };
    let target: ServiceId = "shared/db".parse().unwrap();
    let mut stacks = BTreeMap::new();
    for j in 0..100 {
        let mut spec = JobSpec::new(
            StackName::new("app").unwrap(),
            JobName::new(format!("j{j}")).unwrap(),
            "x",
        );
        for l in 0..5 {
            spec.links.push(LinkSpec {
                alias: format!("shared/s{l}"),
                service: format!("shared/s{l}").parse().unwrap(),
                prefix: format!("SHARED_S{l}"),
                ports: Vec::new(),
            });
        }
        spec.links.push(LinkSpec {
            alias: "shared/db".into(),
            service: target.clone(),
            prefix: "SHARED_DB".into(),
            ports: Vec::new(),
        });
        stacks.insert(
            format!("/viking/stacks/app/jobs/j{j}"),
            kv(
                format!("/viking/stacks/app/jobs/j{j}"),
                records::encode(&spec),
            )
            .1,
        );
    }
    let mut containers = BTreeMap::new();
    for c in 0..1000u32 {
        let record = ContainerRecord {
            v: 1,
            stack: "app".into(),
            job: format!("j{}", c % 100),
            addrs: vec![format!("172.17.{}.{}", c / 250, 2 + c % 250)],
            links_label: Vec::new(),
            name: format!("app_j{}_{}", c % 100, c / 100),
            netns_cookie: None,
        };
        let (k, v) = kv(
            format!("/viking/containers/h/{c:012x}"),
            records::encode(&record),
        );
        containers.insert(k, v);
    }
    let access = Access::build(&prefix, &containers, &stacks, HashSet::new());
    (access, "172.17.1.77".parse().unwrap(), target)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (access, from, service) = table();
    assert_eq!(access.len(), 1000);
    let shared = |links| {
        let mut config =
            ambassador::Config::new(Prefix::default(), "h".into(), "127.0.0.1".parse().unwrap());
        config.links = links;
        let shared = ambassador::Shared::new(config);
        shared.set_access(access_clone(&access));
        shared
    };
    let enforced = shared(LinksMode::Enforced);
    let open = shared(LinksMode::Open);
    assert_eq!(
        rt.block_on(enforced.admit(from, &service)),
        ambassador::access::Decision::Accept
    );
    let mut group = c.benchmark_group("admit a new connection");
    group.bench_function("links enforced, 1,000 containers", |b| {
        b.iter(|| rt.block_on(enforced.admit(from, &service)));
    });
    group.bench_function("links open", |b| {
        b.iter(|| rt.block_on(open.admit(from, &service)));
    });
    group.finish();
}

/// The same table again (a table is built once and shared by `Arc` in the ambassador).
fn access_clone(_: &Access) -> Access {
    table().0
}

criterion_group!(benches, bench);
criterion_main!(benches);
