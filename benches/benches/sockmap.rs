//! The kernel path's set-up cost (crate `sockmap`, issue 22): what joining a connected pair
//! costs, what closing a joined pair costs beside closing a plain one, and whether two threads
//! joining at once are better served by one shared sockhash or by a map each (the ambassador
//! has one per process). Real loopback sockets; each thread joins 5,000 pairs, made in
//! batches of 500 (only the join and the close are timed). Needs CAP_BPF and CAP_NET_ADMIN.
//!
//! `cargo bench -p viking-benches --bench sockmap`.

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sockmap::KernelPath;

const PAIRS: usize = 5_000;
const BATCH: usize = 500;

/// `BATCH` chains client -> (accepted, connected) -> backend; the middle two are what a proxy
/// joins.
fn batch(listener: &TcpListener) -> Vec<[TcpStream; 4]> {
    let addr = listener.local_addr().unwrap();
    (0..BATCH)
        .map(|_| {
            let client = TcpStream::connect(addr).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            let connected = TcpStream::connect(addr).unwrap();
            let (backend, _) = listener.accept().unwrap();
            [client, accepted, connected, backend]
        })
        .collect()
}

/// Join (when `path` is given) and close `PAIRS` pairs; the time spent joining and closing.
fn run(path: Option<&KernelPath>) -> (Duration, Duration) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut joining, mut closing) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..PAIRS / BATCH {
        let chains = batch(&listener);
        if let Some(path) = path {
            let started = Instant::now();
            for [_, a, b, _] in &chains {
                path.join(a.as_fd(), b.as_fd()).unwrap();
            }
            joining += started.elapsed();
        }
        // The proxy's two sockets of each pair close, as a connection's end closes them.
        let (mut middles, mut ends) = (Vec::new(), Vec::new());
        for [client, a, b, backend] in chains {
            middles.push((a, b));
            ends.push((client, backend));
        }
        let started = Instant::now();
        drop(middles);
        closing += started.elapsed();
        drop(ends);
    }
    (joining, closing)
}

fn per(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6 / PAIRS as f64
}

fn main() {
    let shared = Arc::new(KernelPath::new(65_536).expect("the kernel path (run as root)"));

    let (_, plain_close) = run(None);
    let (join, joined_close) = run(Some(&shared));

    // Two threads at once: one shared map, then a map each.
    let two = |own: bool| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let own_path = own.then(|| KernelPath::new(65_536).unwrap());
                    let path = own_path.as_ref().unwrap_or(&shared);
                    run(Some(path)).0
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<Duration>>()
    };
    let shared_two = two(false);
    let own_two = two(true);

    println!();
    println!("sockmap: {PAIRS} pairs per thread, loopback, one machine (2 cores)");
    println!("| measure | µs per pair |");
    println!("| --- | --- |");
    println!(
        "| join (cookies, SO_RCVLOWAT x3, two map updates) | {:.2} |",
        per(join)
    );
    println!(
        "| close of a plain pair (both sockets) | {:.2} |",
        per(plain_close)
    );
    println!(
        "| close of a joined pair (both sockets, out of the map) | {:.2} |",
        per(joined_close)
    );
    println!(
        "| join, two threads at once, one shared map (each thread) | {:.2} / {:.2} |",
        per(shared_two[0]),
        per(shared_two[1])
    );
    println!(
        "| join, two threads at once, a map each (each thread) | {:.2} / {:.2} |",
        per(own_two[0]),
        per(own_two[1])
    );
}
