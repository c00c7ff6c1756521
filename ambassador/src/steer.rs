//! Which threads take a port's new connections: as few as can carry the load.
//!
//! Each thread has a listening socket of its own per port (SO_REUSEPORT), and by default the
//! kernel picks one by a hash of the connection's addresses: two threads then split even a
//! light load, and both sleep and wake for it. On 2 cores that cost keep-alive traffic more
//! than the second thread gained (context switches per request 0.99 with two threads, 0.44
//! with one). A classic BPF program on the port's socket group picks instead: new connections
//! go to the first `k` threads' sockets (`ret #0` for one, else a random one of the first `k`:
//! sockets are numbered in the order they were bound, the threads' order). `k` starts at one,
//! grows by one when those `k` threads are busy ([`BUSY`] of a core each over the last
//! [`TICK`]), and shrinks by one when all threads together would fit in `k - 1` with room to
//! spare ([`LIGHT`] of a core each). A connection stays on the thread that accepted it; the
//! program only decides where the next ones go, and an index past the group's sockets falls
//! back to the kernel's hash.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::libc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How often the threads' CPU time is read.
pub const TICK: Duration = Duration::from_millis(100);
/// One more thread takes new connections once those taking them are on a CPU this share of a
/// tick each.
pub const BUSY: f64 = 0.8;
/// One thread fewer once all threads together use less than this share of a core per thread
/// that would remain.
pub const LIGHT: f64 = 0.5;

/// The next number of threads taking new connections, from `taking` and every thread's CPU
/// share over the last tick (the first thread first).
pub fn decide(taking: usize, busy: &[f64]) -> usize {
    let threads = busy.len().max(1);
    let k = taking.clamp(1, threads);
    let active: f64 = busy.iter().take(k).sum();
    let total: f64 = busy.iter().sum();
    if k < threads && active >= BUSY * k as f64 {
        k + 1
    } else if k > 1 && total < LIGHT * (k - 1) as f64 {
        k - 1
    } else {
        k
    }
}

/// The program that sends new connections to the first `taking` sockets of the group.
pub fn program(taking: u32) -> Vec<libc::sock_filter> {
    let op = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    if taking <= 1 {
        return vec![op(libc::BPF_RET | libc::BPF_K, 0)];
    }
    vec![
        // A = a random u32 (an ancillary load: the kernel's prandom, not packet data).
        op(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32,
        ),
        op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, taking),
        op(libc::BPF_RET | libc::BPF_A, 0),
    ]
}

/// Puts the program for `taking` threads on the socket group `socket` belongs to.
pub fn attach(socket: &impl AsFd, taking: usize) -> nix::Result<()> {
    let mut filter = program(u32::try_from(taking).unwrap_or(u32::MAX));
    let fprog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // The kernel copies the program during the call; `filter` outlives it.
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::AttachReusePortCbpf,
        &fprog,
    )
}

/// Where a thread's CPU time is read: `/proc/self/task/TID/schedstat` of the calling thread.
pub fn this_thread() -> Option<std::path::PathBuf> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    Some(std::path::Path::new("/proc").join(link).join("schedstat"))
}

/// Nanoseconds on a CPU, the first field of a schedstat file.
fn cpu_ns(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Reads the threads' CPU time every tick and publishes how many take new connections, until
/// `stop`.
pub async fn control(
    threads: Vec<std::path::PathBuf>,
    taking: &watch::Sender<usize>,
    stop: CancellationToken,
) {
    let read = |paths: &[std::path::PathBuf]| -> Vec<u64> {
        paths.iter().map(|p| cpu_ns(p).unwrap_or(0)).collect()
    };
    let mut last = read(&threads);
    let mut at = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let now = read(&threads);
        let elapsed = at.elapsed().as_nanos().max(1) as f64;
        at = Instant::now();
        let busy: Vec<f64> = now
            .iter()
            .zip(&last)
            .map(|(n, l)| n.saturating_sub(*l) as f64 / elapsed)
            .collect();
        last = now;
        let current = *taking.borrow();
        let next = decide(current, &busy);
        if next != current {
            debug!(threads = next, ?busy, "threads taking new connections");
            taking.send_replace(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_more_thread_when_those_taking_are_busy_one_fewer_when_the_rest_would_do() {
        assert_eq!(decide(1, &[0.3, 0.0]), 1);
        assert_eq!(decide(1, &[0.79, 0.0]), 1);
        assert_eq!(decide(1, &[0.85, 0.1]), 2);
        // Both halfway busy: the load would not fit in one thread.
        assert_eq!(decide(2, &[0.45, 0.45]), 2);
        assert_eq!(decide(2, &[0.3, 0.1]), 1);
        // Never more than there are, never fewer than one.
        assert_eq!(decide(2, &[0.95, 0.95]), 2);
        assert_eq!(decide(1, &[]), 1);
        assert_eq!(decide(0, &[0.0, 0.0]), 1);
        // Four threads: grow one at a time, shrink when the rest would carry it.
        assert_eq!(decide(2, &[0.9, 0.85, 0.0, 0.0]), 3);
        assert_eq!(decide(2, &[0.9, 0.6, 0.0, 0.0]), 2);
        assert_eq!(decide(3, &[0.5, 0.4, 0.3, 0.0]), 3);
        assert_eq!(decide(3, &[0.4, 0.3, 0.2, 0.0]), 2);
    }

    /// Two listening sockets sharing a loopback port, as two threads' would.
    fn group() -> (std::net::TcpListener, std::net::TcpListener) {
        let socket = |port: u16| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            s.set_reuse_port(true).expect("SO_REUSEPORT");
            s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
                .expect("bind");
            s.listen(1024).expect("listen");
            s.set_nonblocking(true).expect("non-blocking");
            std::net::TcpListener::from(s)
        };
        let first = socket(0);
        let port = first.local_addr().expect("addr").port();
        (first, socket(port))
    }

    /// Connects `n` times and counts what each socket's queue got.
    fn spread_of(
        n: usize,
        sockets: &(std::net::TcpListener, std::net::TcpListener),
    ) -> (usize, usize) {
        let addr = sockets.0.local_addr().expect("addr");
        // Kept open until counted: the handshake completes in the kernel, no accept needed.
        let clients: Vec<_> = (0..n)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        let count = |l: &std::net::TcpListener| std::iter::from_fn(|| l.accept().ok()).count();
        let counted = (count(&sockets.0), count(&sockets.1));
        drop(clients);
        counted
    }

    #[test]
    fn the_kernel_follows_the_programs_on_real_sockets() {
        let sockets = group();
        attach(&sockets.0, 1).expect("attach");
        assert_eq!(
            spread_of(50, &sockets),
            (50, 0),
            "one thread takes them all"
        );
        // Attached through either socket, the program is the group's.
        attach(&sockets.1, 2).expect("attach");
        let (first, second) = spread_of(200, &sockets);
        assert_eq!(first + second, 200);
        assert!(
            first > 0 && second > 0,
            "spreading left a socket out: {first} / {second}"
        );
        attach(&sockets.0, 1).expect("attach");
        assert_eq!(spread_of(50, &sockets), (50, 0), "one again");
    }

    #[test]
    fn the_programs_return_the_first_socket_or_a_random_one_of_the_first_k() {
        let one = program(1);
        assert_eq!(one.len(), 1);
        assert_eq!(
            (u32::from(one[0].code), one[0].k),
            (libc::BPF_RET | libc::BPF_K, 0)
        );
        let three = program(3);
        assert_eq!(three.len(), 3);
        assert_eq!(three[1].k, 3);
        assert_eq!(u32::from(three[2].code), libc::BPF_RET | libc::BPF_A);
    }
}
