//! The allocator library under concurrency, failure and exhaustion.

use std::collections::{BTreeMap, BTreeSet};

use portalloc::{AllocError, Allocator, PortRange};
use schema::{Prefix, ServicePort};
use testkit::{Etcd, EtcdCluster};

use crate::count_keys;

fn sp(s: &str) -> ServicePort {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_allocators_hand_out_6400_distinct_ports() {
    let etcd = Etcd::start().await;
    let mut tasks = tokio::task::JoinSet::new();
    for a in 0..32 {
        // Each allocator has its own connection, as separate processes would.
        let client = etcd.client().await;
        tasks.spawn(async move {
            let alloc = Allocator::new(&client, Prefix::default(), PortRange::DEFAULT);
            let mut got = Vec::new();
            for i in 0..200 {
                let s = sp(&format!("s{a}/job{i}:80"));
                got.push((s.to_string(), alloc.allocate(&s).await.expect("allocate")));
            }
            got
        });
    }
    let mut handed: BTreeMap<String, u16> = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        handed.extend(r.unwrap());
    }
    assert_eq!(handed.len(), 6400);
    let ports: BTreeSet<u16> = handed.values().copied().collect();
    assert_eq!(ports.len(), 6400, "a port was handed out twice");
    assert!(ports.iter().all(|p| PortRange::DEFAULT.contains(*p)));

    let alloc = Allocator::new(&etcd.client().await, Prefix::default(), PortRange::DEFAULT);
    let listed: BTreeMap<String, u16> = alloc
        .list()
        .await
        .unwrap()
        .into_iter()
        .inspect(|a| assert!(a.consistent, "{a:?}"))
        .map(|a| (a.service_port, a.port))
        .collect();
    assert_eq!(listed, handed);
    // Contention leaves few holes: ports stay dense.
    let highest = *ports.last().unwrap();
    assert!(highest < 20000 + 6400 + 512, "ports spread up to {highest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_service_port_sixteen_ways_gets_one_port() {
    let etcd = Etcd::start().await;
    let endpoint = etcd.endpoint();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let client = etcd.client().await;
        tasks.spawn(async move {
            let alloc = Allocator::new(&client, Prefix::default(), PortRange::DEFAULT);
            alloc.allocate(&sp("shared/mongo:27017")).await.unwrap()
        });
    }
    for _ in 0..8 {
        let endpoint = endpoint.clone();
        tasks.spawn_blocking(move || {
            let out = crate::portalloc(&endpoint, &["alloc", "shared/mongo:27017"]);
            assert!(out.status.success(), "{}", crate::stderr(&out));
            crate::stdout(&out).trim().parse::<u16>().unwrap()
        });
    }
    let mut ports = BTreeSet::new();
    while let Some(r) = tasks.join_next().await {
        ports.insert(r.unwrap());
    }
    assert_eq!(
        ports.len(),
        1,
        "16 allocations of one service port gave {ports:?}"
    );
    let mut client = etcd.client().await;
    // One alloc key, one owner key, and the counter.
    assert_eq!(count_keys(&mut client, "/viking/ports/").await, 3);
}

#[tokio::test]
async fn released_ports_come_back_before_the_counter_grows() {
    let etcd = Etcd::start().await;
    let client = etcd.client().await;
    let alloc = Allocator::new(&client, Prefix::default(), PortRange::DEFAULT);
    let a = alloc.allocate(&sp("s/a:1")).await.unwrap();
    let b = alloc.allocate(&sp("s/b:1")).await.unwrap();
    let c = alloc.allocate(&sp("s/c:1")).await.unwrap();
    assert_eq!((a, b, c), (20000, 20001, 20002));
    assert_eq!(alloc.release(&sp("s/b:1")).await.unwrap(), Some(b));
    assert_eq!(
        alloc.release(&sp("s/b:1")).await.unwrap(),
        None,
        "release is idempotent"
    );
    assert_eq!(alloc.get(&sp("s/b:1")).await.unwrap(), None);
    assert_eq!(
        alloc.allocate(&sp("s/new:1")).await.unwrap(),
        b,
        "released port reused"
    );
    assert_eq!(alloc.allocate(&sp("s/next:1")).await.unwrap(), 20003);
    // Idempotent, also for a fresh allocator.
    let again = Allocator::new(&etcd.client().await, Prefix::default(), PortRange::DEFAULT);
    assert_eq!(again.allocate(&sp("s/a:1")).await.unwrap(), a);
}

#[tokio::test]
async fn a_range_of_ten_runs_out_cleanly() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    let range = PortRange::new(31000, 31009).unwrap();
    let alloc = Allocator::new(&client, Prefix::default(), range);
    let first: Vec<ServicePort> = (0..8).map(|i| sp(&format!("s/j{i}:80"))).collect();
    alloc.allocate_many(&first).await.unwrap();
    let before = count_keys(&mut client, "/viking/").await;

    // Three more do not fit in the two left: none is written.
    let more: Vec<ServicePort> = (8..11).map(|i| sp(&format!("s/j{i}:80"))).collect();
    match alloc.allocate_many(&more).await {
        Err(AllocError::Exhausted {
            range: r,
            needed: 3,
            available: 2,
        }) => assert_eq!(r, range),
        other => panic!("expected exhaustion, got {other:?}"),
    }
    assert_eq!(
        count_keys(&mut client, "/viking/").await,
        before,
        "nothing half-written"
    );

    // Two still fit, then the range is full and says so.
    alloc.allocate_many(&more[..2]).await.unwrap();
    let err = alloc.allocate(&more[2]).await.unwrap_err().to_string();
    assert!(
        err.contains("no free ambassador port left in range 31000-31009"),
        "{err}"
    );
    // A release makes room again.
    alloc.release(&first[3]).await.unwrap();
    assert_eq!(alloc.allocate(&more[2]).await.unwrap(), 31003);
}

#[tokio::test]
async fn allocate_many_of_100_costs_three_round_trips_or_two_with_bigger_txns() {
    let batch: Vec<ServicePort> = (0..100).map(|i| sp(&format!("big/job{i}:8080"))).collect();

    let etcd = Etcd::start().await;
    let alloc = Allocator::new(&etcd.client().await, Prefix::default(), PortRange::DEFAULT);
    let ports = alloc.allocate_many(&batch).await.unwrap();
    assert_eq!(ports.iter().collect::<BTreeSet<_>>().len(), 100);
    // One read, and two writes: etcd's default --max-txn-ops 128 holds 63 service ports.
    assert_eq!(alloc.round_trips(), 3);
    // Allocated already: one read.
    assert_eq!(alloc.allocate_many(&batch).await.unwrap(), ports);
    assert_eq!(alloc.round_trips(), 4);

    let big = Etcd::start_with(&["--max-txn-ops", "1024"]).await;
    let alloc = Allocator::new(&big.client().await, Prefix::default(), PortRange::DEFAULT)
        .with_max_txn_ops(1024);
    alloc.allocate_many(&batch).await.unwrap();
    assert_eq!(alloc.round_trips(), 2, "one read and one write");
}

#[tokio::test]
async fn allocations_survive_an_etcd_restart() {
    let mut etcd = Etcd::start().await;
    let alloc = Allocator::new(&etcd.client().await, Prefix::default(), PortRange::DEFAULT);
    let port = alloc.allocate(&sp("s/db:5432")).await.unwrap();
    etcd.stop();
    etcd.restart().await;
    // The same client reconnects on its own.
    assert_eq!(alloc.allocate(&sp("s/db:5432")).await.unwrap(), port);
    assert_eq!(alloc.allocate(&sp("s/other:5432")).await.unwrap(), port + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_loss_during_2000_allocations_completes_without_duplicates() {
    let mut cluster = EtcdCluster::start().await;
    let client = cluster.client().await;
    let alloc = Allocator::new(&client, Prefix::default(), PortRange::DEFAULT);
    let mut tasks = tokio::task::JoinSet::new();
    // 2,000 allocations from 40 concurrent workers of 50 each.
    for w in 0..40 {
        let alloc = alloc.clone();
        tasks.spawn(async move {
            let mut got = Vec::new();
            for i in 0..50 {
                let s = sp(&format!("w{w}/j{i}:80"));
                got.push((s.to_string(), alloc.allocate(&s).await.expect("allocate")));
            }
            got
        });
    }
    // Let them get going, then kill the leader.
    while alloc.round_trips() < 400 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let leader = cluster.leader().await;
    cluster.stop(leader);
    let mut handed = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        handed.extend(r.unwrap());
    }
    assert_eq!(handed.len(), 2000);
    let ports: BTreeSet<u16> = handed.values().copied().collect();
    assert_eq!(ports.len(), 2000, "duplicate ports after leader loss");
    let listed = alloc.list().await.unwrap();
    assert_eq!(listed.len(), 2000);
    assert!(
        listed
            .iter()
            .all(|a| a.consistent && handed[&a.service_port] == a.port)
    );
    cluster.restart(leader).await;
}
