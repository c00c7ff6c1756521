//! locknet with 10,000 members, in network namespaces (needs root).
//!
//! `make bench-locknet` (or `cargo bench -p viking-benches --bench locknet`). Measures, inside
//! a host namespace `a` of a two-host LAN:
//! * applying the whole table with 10,000 members (one `nft -f`, the table replaced);
//! * adding one member to, and removing one from, 10,000 (element add/delete), as `--watch`
//!   does it (the table as last applied is known);
//! * TCP connections per second from member `b` to `a` (connect, read the greeting, close)
//!   through the firewall with 10,000 members, against no firewall, alternating, same run.
//!
//! Goals: < 200 ms, < 10 ms, >= 0.95x.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use locknet::policy::{Options, Policy};
use locknet::{Outcome, nft};
use testkit::net::Lan;

const MEMBERS: u32 = 10_000;
const ROUNDS: usize = 15;
const RATE_WINDOW: Duration = Duration::from_secs(2);

fn main() {
    let lan = Lan::new(&["a", "b"]);
    let a = lan.ns("a");
    let b = lan.ns("b");
    let target = SocketAddr::from((lan.addr("a"), 9999));
    let _server = a.serve(target, "a");

    let mut members: BTreeSet<IpAddr> = (0..MEMBERS - 1)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a64_0000 + i)))
        .collect();
    members.insert(IpAddr::V4(lan.addr("b")));
    let policy = Policy::new(members.clone(), &Options::default());

    let mut full = Vec::new();
    for _ in 0..ROUNDS {
        let p = policy.clone();
        full.push(a.run(move || {
            nft::flush().expect("flush");
            let start = Instant::now();
            assert_eq!(locknet::apply(&p).expect("apply"), Outcome::Replaced);
            start.elapsed()
        }));
    }

    let mut add = Vec::new();
    let mut remove = Vec::new();
    for i in 0..ROUNDS as u32 {
        let extra = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1 + i as u8));
        let mut bigger = members.clone();
        bigger.insert(extra);
        let grown = Policy::new(bigger, &Options::default());
        let same = policy.clone();
        let (t_add, t_remove) = a.run(move || {
            // As `--watch` does: the table as last applied is known, not read back.
            let mut fw = locknet::Firewall::default();
            fw.apply(&same).expect("known state");
            let start = Instant::now();
            let o = fw.apply(&grown).expect("add");
            let t_add = start.elapsed();
            assert_eq!(
                o,
                Outcome::Members {
                    added: 1,
                    removed: 0
                }
            );
            let start = Instant::now();
            let o = fw.apply(&same).expect("remove");
            assert_eq!(
                o,
                Outcome::Members {
                    added: 0,
                    removed: 1
                }
            );
            (t_add, start.elapsed())
        });
        add.push(t_add);
        remove.push(t_remove);
    }

    let mut with = Vec::new();
    let mut without = Vec::new();
    for _ in 0..3 {
        let p = policy.clone();
        a.run(move || locknet::apply(&p).expect("apply"));
        with.push(b.run(move || rate(target)));
        a.run(|| nft::flush().expect("flush"));
        without.push(b.run(move || rate(target)));
    }
    a.run(|| nft::flush().expect("flush"));

    println!(
        "apply {MEMBERS} members (table replaced): {}",
        ms(&mut full)
    );
    println!("add one member of {MEMBERS}: {}", ms(&mut add));
    println!("remove one member of {MEMBERS}: {}", ms(&mut remove));
    with.sort_by(f64::total_cmp);
    without.sort_by(f64::total_cmp);
    println!(
        "TCP connections/s member -> host: with firewall {:.0}, without {:.0} (medians of 3): {:.3}x",
        with[1],
        without[1],
        with[1] / without[1]
    );
}

/// Connections per second over [`RATE_WINDOW`], each a full connect, read, close.
fn rate(target: SocketAddr) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    let mut buf = Vec::new();
    while start.elapsed() < RATE_WINDOW {
        let mut conn =
            TcpStream::connect_timeout(&target, Duration::from_secs(1)).expect("connect");
        buf.clear();
        conn.read_to_end(&mut buf).expect("read");
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn ms(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    format!(
        "median {:.2} ms, max {:.2} ms (n={})",
        at(0.5).as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3,
        samples.len()
    )
}
