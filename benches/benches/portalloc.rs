//! Allocation rate against a real single-member etcd, side by side with bare etcd puts in the
//! same run: one raft commit (a disk sync) is the floor of one allocation.
//!
//! `make bench` (or `cargo bench -p viking-benches --bench portalloc`). Reports, per group,
//! elements per second for 1 and 16 concurrent clients, and the request count of
//! `allocate_many` for 100 service ports.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use etcd_client::Client;
use portalloc::{Allocator, PortRange};
use schema::{Prefix, ServicePort};
use testkit::Etcd;
use tokio::runtime::Runtime;

/// Wide, so that warm-up and samples never exhaust it.
const RANGE: PortRange = PortRange {
    start: 1024,
    end: 65535,
};
const CONCURRENCY: [usize; 2] = [1, 16];

struct Bench {
    rt: Runtime,
    _etcd: Etcd,
    clients: Vec<Client>,
    /// Makes every key and service port of the run distinct.
    serial: Arc<AtomicU64>,
}

fn setup() -> Bench {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let etcd = rt.block_on(Etcd::start());
    // One connection per concurrent client, as separate processes would have.
    let clients = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..16 {
            v.push(etcd.client().await);
        }
        v
    });
    Bench {
        rt,
        _etcd: etcd,
        clients,
        serial: Arc::default(),
    }
}

/// Runs `total` operations split over `workers` tasks and returns the elapsed time.
fn run<F, Fut>(b: &Bench, workers: usize, total: u64, op: F) -> Duration
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    b.rt.block_on(async {
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..workers {
            let share = total / workers as u64 + u64::from((w as u64) < total % workers as u64);
            let op = op.clone();
            let serial = b.serial.clone();
            tasks.spawn(async move {
                for _ in 0..share {
                    op(w, serial.fetch_add(1, Ordering::Relaxed)).await;
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        start.elapsed()
    })
}

fn service_port(n: u64) -> ServicePort {
    format!("bench/job{n}:80").parse().unwrap()
}

fn bench(c: &mut Criterion) {
    let b = setup();
    let mut group = c.benchmark_group("etcd");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));

    for workers in CONCURRENCY {
        let clients = b.clients.clone();
        group.bench_function(format!("put/{workers}"), |bench| {
            bench.iter_custom(|n| {
                let clients = clients.clone();
                run(&b, workers, n, move |w, i| {
                    let mut client = clients[w].clone();
                    async move {
                        client
                            .put(format!("/bench/put/{i}"), "x", None)
                            .await
                            .unwrap();
                    }
                })
            });
        });

        let allocators: Vec<Allocator> = b
            .clients
            .iter()
            .map(|c| {
                Allocator::new(
                    c,
                    Prefix::new(&format!("/bench/a{workers}")).unwrap(),
                    RANGE,
                )
            })
            .collect();
        let probe = allocators.clone();
        group.bench_function(format!("allocate/{workers}"), |bench| {
            bench.iter_custom(|n| {
                let allocators = allocators.clone();
                run(&b, workers, n, move |w, i| {
                    let alloc = allocators[w].clone();
                    async move {
                        alloc.allocate(&service_port(i)).await.unwrap();
                    }
                })
            });
        });
        let (trips, conflicts) = probe
            .iter()
            .fold((0, 0), |(t, c), a| (t + a.round_trips(), c + a.conflicts()));
        eprintln!("allocate/{workers}: {trips} requests, {conflicts} write conflicts in all");
    }
    group.finish();

    let mut group = c.benchmark_group("allocate_many");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(100));
    let serial = b.serial.clone();
    let client = b.clients[0].clone();
    group.bench_function("100", |bench| {
        bench.iter_custom(|n| {
            // A fresh prefix per sample, so that samples never fill the range.
            let prefix = format!("/bench/many{}", serial.fetch_add(1, Ordering::Relaxed));
            let alloc = Allocator::new(&client, Prefix::new(&prefix).unwrap(), RANGE);
            let serial = serial.clone();
            b.rt.block_on(async move {
                let start = Instant::now();
                for _ in 0..n {
                    let batch: Vec<ServicePort> = (0..100)
                        .map(|_| service_port(serial.fetch_add(1, Ordering::Relaxed)))
                        .collect();
                    alloc.allocate_many(&batch).await.unwrap();
                }
                start.elapsed()
            })
        });
    });
    group.finish();
    let alloc = Allocator::new(&b.clients[0], Prefix::new("/bench/trips").unwrap(), RANGE);
    let before = alloc.round_trips();
    let batch: Vec<ServicePort> = (0..100)
        .map(|_| service_port(b.serial.fetch_add(1, Ordering::Relaxed)))
        .collect();
    b.rt.block_on(alloc.allocate_many(&batch)).unwrap();
    eprintln!(
        "allocate_many of 100 service ports: {} requests (1 read + writes of <= 62 each at etcd's default --max-txn-ops 128)",
        alloc.round_trips() - before
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
