//! Connections through the ambassador.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use std::future::ready;

use testkit::{Etcd, eventually_async};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Amb, Backend, put_alloc, put_endpoint, who};

const SP: &str = "shared/echo:7/tcp";

/// FNV-1a over a stream, to compare what went in with what came out.
#[derive(Clone, Copy)]
pub(crate) struct Sum(pub(crate) u64);
impl Sum {
    pub(crate) fn new() -> Self {
        Sum(0xcbf2_9ce4_8422_2325)
    }
    pub(crate) fn add(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// One etcd, one greeting echo backend ("b0", host h0) registered for [`SP`], and an
/// ambassador (configured by `tweak`) listening for it with the backend in its routes.
pub(crate) struct OneBackend {
    pub(crate) etcd: Etcd,
    backend: Backend,
    pub(crate) amb: Amb,
    port: u16,
    pub(crate) addr: std::net::SocketAddr,
}

impl OneBackend {
    pub(crate) async fn start(tweak: impl FnOnce(&mut ambassador::Config)) -> OneBackend {
        let etcd = Etcd::start().await;
        let mut c = etcd.client().await;
        let backend = Backend::start("b0").await;
        let port = put_alloc(&mut c, SP).await;
        put_endpoint(&mut c, SP, "h0", 0, backend.addr).await;
        let amb = Amb::start(&etcd, tweak).await;
        let addr = amb.listening(port).await;
        amb.wait_backends(port, 1, Duration::from_secs(5)).await;
        OneBackend {
            etcd,
            backend,
            amb,
            port,
            addr,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_256_mib_each_way_with_server_first_and_half_close() {
    echo_each_way(256 << 20, |_| {}).await;
}

/// The copying path alone: with small reads, writes the backend cannot take at once are
/// held and flushed before the next read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_64_mib_each_way_copying_only() {
    echo_each_way(64 << 20, |c| {
        c.kernel_forward = ambassador::config::KernelForward::Off;
        c.relay.splice_after = u64::MAX;
        c.relay.buffer = 1500;
    })
    .await;
}

/// Splicing from the first byte through the smallest pipe: the pipe fills (its slots run out
/// before its bytes do) while the destination drains it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_64_mib_each_way_splicing_through_a_small_pipe() {
    echo_each_way(64 << 20, |c| {
        c.kernel_forward = ambassador::config::KernelForward::Off;
        c.relay.splice_after = 0;
        c.relay.pipe_size = 4096;
    })
    .await;
}

/// Echoes `total` bytes each way with checksums, the client half-closing and reading the
/// rest, and checks the byte counts; gives the set-up back for more checks.
pub(crate) async fn echo_each_way(
    total: usize,
    tweak: impl FnOnce(&mut ambassador::Config),
) -> OneBackend {
    let one = OneBackend::start(tweak).await;
    let (amb, addr) = (&one.amb, one.addr);

    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server speaks first; the client has sent nothing.
    let mut greeting = [0u8; 14];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"hello from b0\n");

    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut rng = fastrand::Rng::with_seed(42);
        let mut sum = Sum::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            rng.fill(&mut chunk);
            sum.add(&chunk);
            w.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        // Half-close: the backend sees EOF, closes its side, and we read EOF.
        w.shutdown().await.unwrap();
        sum.0
    });
    let mut sum = Sum::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), r.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        sum.add(&buf[..n]);
        got += n;
    }
    assert_eq!(got, total, "bytes back");
    assert_eq!(sum.0, writer.await.unwrap(), "checksum of what came back");
    // The client sees the end when the relay closes the sockets; the counts are added just
    // after, so wait for them rather than race that.
    let counted = |key: &str, want: u64| {
        let state = amb.shared.state_json();
        let have = &state["services"][0][key];
        if *have == want {
            Ok(())
        } else {
            Err(format!("{key} is {have}, not {want}"))
        }
    };
    let limit = Duration::from_secs(5);
    eventually_async(limit, "bytes up counted", || {
        ready(counted("bytes_up", total as u64))
    })
    .await;
    let down = total as u64 + 14;
    eventually_async(limit, "bytes down counted", || {
        ready(counted("bytes_down", down))
    })
    .await;
    one
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_through_one_listener_on_two_threads() {
    raise_fd_limit();
    let one = OneBackend::start(|c| c.threads = 2).await;
    let (amb, addr, port) = (&one.amb, one.addr, one.port);

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000u32 {
        let barrier = barrier.clone();
        tasks.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut greeting = [0u8; 14];
            s.read_exact(&mut greeting).await.unwrap();
            // All 1,000 are open at once before any sends.
            barrier.wait().await;
            let msg = format!("message {i:05}\n");
            s.write_all(msg.as_bytes()).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg.as_bytes());
        });
    }
    let all = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    });
    if all.await.is_err() {
        panic!(
            "1,000 connections not done within 20 s; accepted {:?}, state {}",
            amb.shared.accepted(),
            amb.shared.state_json()
        );
    }
    assert_eq!(
        amb.shared.routes().by_port[&port].stats.connections.get(),
        1000
    );
    // How they were spread over the threads depends on how busy the first one was
    // (`ambassador::steer`, tested on its own).
    let accepted = amb.shared.accepted();
    assert_eq!(accepted.iter().sum::<u64>(), 1000, "{accepted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_changes_reach_new_connections_within_100_ms_and_spare_open_ones() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let (b0, b1) = (Backend::start("b0").await, Backend::start("b1").await);
    let port = put_alloc(&mut c, SP).await;
    let k0 = put_endpoint(&mut c, SP, "h0", 0, b0.addr).await;
    let amb = Amb::start(&etcd, |c| c.threads = 2).await;
    let addr = amb.listening(port).await;
    amb.wait_backends(port, 1, Duration::from_secs(5)).await;
    assert_eq!(who(addr).await.unwrap(), "b0");
    // An open connection to b0.
    let mut open = TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; 14];
    open.read_exact(&mut greeting).await.unwrap();

    // Swap b0 for b1 in one etcd transaction.
    let k1 = {
        let sp: schema::ServicePort = SP.parse().unwrap();
        let inst =
            schema::Instance::new(schema::HostId::new("h1").unwrap(), "000000000001", 7).unwrap();
        schema::Prefix::default().key(&schema::Key::Endpoint {
            service_port: sp,
            instance: inst,
        })
    };
    let rec = format!(
        r#"{{"v":1,"host":"h1","addr":"127.0.0.1","port":{},"container_id":"000000000001"}}"#,
        b1.addr.port()
    );
    c.txn(etcd_client::Txn::new().and_then([
        etcd_client::TxnOp::put(k1.as_str(), rec, None),
        etcd_client::TxnOp::delete(k0.as_str(), None),
    ]))
    .await
    .unwrap();
    let written = Instant::now();
    loop {
        if who(addr).await.unwrap() == "b1" {
            break;
        }
        assert!(
            written.elapsed() < Duration::from_millis(100),
            "still routed to b0 100 ms after the etcd write"
        );
    }
    let took = written.elapsed();
    for _ in 0..20 {
        assert_eq!(who(addr).await.unwrap(), "b1");
    }
    // The open connection still reaches b0.
    open.write_all(b"still here\n").await.unwrap();
    let mut back = [0u8; 11];
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here\n");
    eprintln!("endpoint change applied to new connections after {took:?}");

    // Removing the allocation closes the listener; the open connection drains untouched.
    c.delete(
        schema::Prefix::default().key(&schema::Key::PortAlloc(SP.parse().unwrap())),
        None,
    )
    .await
    .unwrap();
    eventually_async(
        Duration::from_secs(5),
        "the released port's listener closed",
        || ready((!amb.shared.listening().contains_key(&port)).then_some(())),
    )
    .await;
    // Each connect comes from a new source port, so the kernel's hash sends them to both
    // threads' sockets: none may be left open.
    for _ in 0..20 {
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "released port still accepts"
        );
    }
    open.write_all(b"and still\n").await.unwrap();
    let mut back = [0u8; 10];
    open.read_exact(&mut back).await.unwrap();
    let _ = k1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_backends_killed_200_new_connections_all_succeed() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let (mut b0, b1) = (Backend::start("b0").await, Backend::start("b1").await);
    let port = put_alloc(&mut c, SP).await;
    let dead_key = put_endpoint(&mut c, SP, "h0", 0, b0.addr).await;
    put_endpoint(&mut c, SP, "h1", 1, b1.addr).await;
    let amb = Amb::start(&etcd, |_| {}).await;
    let addr = amb.listening(port).await;
    amb.wait_backends(port, 2, Duration::from_secs(5)).await;
    let mut seen = BTreeMap::new();
    for _ in 0..50 {
        *seen.entry(who(addr).await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both backends serve: {seen:?}");
    b0.kill().await;
    // Its endpoint stays in etcd (as when a host dies before its lease runs out).
    for i in 0..200 {
        let w = who(addr)
            .await
            .unwrap_or_else(|e| panic!("connection {i} failed: {e}"));
        assert_eq!(w, "b1");
    }
    let state = amb.shared.state_json();
    let backends = state["services"][0]["backends"].as_array().unwrap().clone();
    let dead = backends
        .iter()
        .find(|b| b["addr"] == b0.addr.to_string())
        .unwrap();
    assert!(dead["ejections"].as_u64().unwrap() >= 1, "{dead}");
    let metrics = amb.shared.metrics_text();
    let dead_series = format!(
        "ambassador_backend_ejections_total{{service=\"shared/echo:7/tcp\",backend=\"{}\"}}",
        b0.addr
    );
    assert!(metrics.contains(&dead_series), "{metrics}");
    // Its endpoint goes (its lease ran out): so do its series, which would otherwise stay in
    // every scrape for the process's life, one more for every container ever seen.
    c.delete(dead_key, None).await.unwrap();
    amb.wait_backends(port, 1, Duration::from_secs(5)).await;
    let metrics = amb.shared.metrics_text();
    assert!(
        !metrics.contains(&format!("backend=\"{}\"", b0.addr)),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("backend=\"{}\"", b1.addr)),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_away_existing_routes_keep_working() {
    let mut one = OneBackend::start(|_| {}).await;
    let addr = one.addr;
    one.etcd.stop();
    for _ in 0..50 {
        assert_eq!(who(addr).await.unwrap(), "b0");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(who(addr).await.unwrap(), "b0");
    // etcd back, a new backend registered: the watch resumes and sees it.
    one.etcd.restart().await;
    let b1 = Backend::start("b1").await;
    let mut c = one.etcd.client().await;
    put_endpoint(&mut c, SP, "h1", 1, b1.addr).await;
    one.amb
        .wait_backends(one.port, 2, Duration::from_secs(10))
        .await;
}

/// The backend connection's handshake ACK is held back to ride on the client's first bytes.
/// A client that sends nothing must not leave a backend that speaks first waiting for the
/// kernel's delayed-ACK timer (200 ms): the backend cannot even accept before that ACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_speaks_first_is_not_held_up_by_the_held_back_ack() {
    let one = OneBackend::start(|_| {}).await;
    let addr = one.addr;
    let mut took = Vec::new();
    for _ in 0..21 {
        let start = Instant::now();
        assert_eq!(who(addr).await.unwrap(), "b0");
        took.push(start.elapsed());
    }
    took.sort();
    // The median, so one slow moment of a busy machine does not decide; a held ACK would
    // put every greeting at 200 ms or more.
    assert!(
        took[10] < Duration::from_millis(100),
        "greetings took {took:?}"
    );
}

/// Both hops of a connection to a backend on this host use the configured congestion
/// control rather than the host's default (read back with `ss`): the client's inherited from
/// the listening socket, the backend's set before its SYN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hops_on_this_host_use_the_local_congestion_control() {
    let default = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").unwrap();
    let default = default.trim();
    // reno is always built in; cubic if reno is the host's default.
    let chosen = if default == "reno" { "cubic" } else { "reno" };
    let one = OneBackend::start(|c| c.local_congestion = Some(chosen.to_owned())).await;
    let (backend, port, addr) = (&one.backend, one.port, one.addr);
    let mut open = TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; 14];
    open.read_exact(&mut greeting).await.unwrap();
    let ss = |filter: String| {
        let out = std::process::Command::new("ss")
            .args(["-tni", "state", "established", &filter])
            .output()
            .expect("ss (iproute2) runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let uses = |out: &str, cc: &str| out.lines().any(|l| l.contains(&format!(" {cc} ")));
    // The ambassador's side of the client's connection: its local port is the listener's.
    let client_hop = || ss(format!("( sport = :{port} )"));
    // The ambassador's side of the backend connection: the only one to the backend's port.
    let backend_hop = || ss(format!("( dport = :{} )", backend.addr.port()));
    let out = client_hop();
    assert!(uses(&out, chosen), "client hop not on {chosen}: {out}");
    let out = backend_hop();
    assert!(uses(&out, chosen), "backend hop not on {chosen}: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_open_connections_finish_then_cuts_the_rest() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let backend = Backend::start("b0").await;
    let port = put_alloc(&mut c, SP).await;
    put_endpoint(&mut c, SP, "h0", 0, backend.addr).await;
    let mut amb = Amb::start(&etcd, |cfg| {
        cfg.grace = Duration::from_secs(3);
        cfg.threads = 2;
    })
    .await;
    let addr = amb.listening(port).await;
    amb.wait_backends(port, 1, Duration::from_secs(5)).await;
    let mut open = TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; 14];
    open.read_exact(&mut greeting).await.unwrap();

    amb.stop.cancel();
    eventually_async(Duration::from_secs(5), "every listener closed", || {
        ready(amb.shared.listening().is_empty().then_some(()))
    })
    .await;
    for _ in 0..20 {
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "still accepting after shutdown began"
        );
    }
    // The open connection keeps working during the grace period, then finishes by itself.
    open.write_all(b"during grace\n").await.unwrap();
    let mut back = [0u8; 13];
    open.read_exact(&mut back).await.unwrap();
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.unwrap();
    let report = amb.task.take().unwrap().await.unwrap();
    assert_eq!(report, ambassador::ShutdownReport { drained: 1, cut: 0 });

    // With a connection that never finishes, the grace period ends it.
    let amb = Amb::start(&etcd, |cfg| cfg.grace = Duration::from_millis(300)).await;
    let addr = amb.listening(port).await;
    amb.wait_backends(port, 1, Duration::from_secs(5)).await;
    let mut stuck = TcpStream::connect(addr).await.unwrap();
    stuck.read_exact(&mut greeting).await.unwrap();
    let mut amb = amb;
    amb.stop.cancel();
    let report = tokio::time::timeout(Duration::from_secs(5), amb.task.take().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report, ambassador::ShutdownReport { drained: 0, cut: 1 });
    let mut rest = Vec::new();
    let _ = stuck.read_to_end(&mut rest).await;
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < 8192 {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(65_536), hard);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_of_port_0_or_outside_the_range_are_not_served() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let backend = Backend::start("b0").await;
    // The one port in range is the one a good allocation holds.
    let good = put_alloc(&mut c, SP).await;
    put_endpoint(&mut c, SP, "h0", 0, backend.addr).await;
    let stray = |port: u16, job: &str| {
        let key = schema::Prefix::default().key(&schema::Key::PortAlloc(
            format!("shared/{job}:7").parse().unwrap(),
        ));
        (
            key,
            schema::records::encode(&schema::records::PortAllocRecord::new(port)),
        )
    };
    let outside = testkit::free_ports(1)[0];
    for (key, value) in [stray(0, "zero"), stray(outside, "outside")] {
        c.put(key, value, None).await.unwrap();
    }
    let amb = Amb::start(&etcd, |c| {
        c.range = schema::PortRange::new(good, good).unwrap()
    })
    .await;
    amb.listening(good).await;
    let routes = amb.shared.routes();
    let ports: Vec<u16> = routes.by_port.keys().copied().collect();
    assert_eq!(ports, [good], "only the allocation in range is served");
    assert_eq!(
        amb.shared.listening().len(),
        1,
        "{:?}",
        amb.shared.listening()
    );
    assert!(TcpStream::connect(("127.0.0.1", outside)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_synced_gauge_drops_while_etcd_is_away_and_healthz_stays_ok() {
    let mut one = OneBackend::start(|_| {}).await;
    let amb = &one.amb;
    assert!(amb.shared.is_current());
    assert!(
        amb.shared
            .metrics_text()
            .contains("ambassador_etcd_synced 1")
    );
    one.etcd.stop();
    eventually_async(Duration::from_secs(5), "the synced gauge at 0", || {
        ready((!one.amb.shared.is_current()).then_some(()))
    })
    .await;
    let amb = &one.amb;
    assert!(
        amb.shared
            .metrics_text()
            .contains("ambassador_etcd_synced 0")
    );
    assert!(
        amb.shared.is_synced(),
        "the routes are still known (/healthz 200)"
    );
    assert_eq!(amb.shared.state_json()["synced"], false);
    assert_eq!(who(one.addr).await.unwrap(), "b0", "still served");
    one.etcd.restart().await;
    eventually_async(
        Duration::from_secs(10),
        "the synced gauge back at 1",
        || ready(one.amb.shared.is_current().then_some(())),
    )
    .await;
    assert!(
        one.amb
            .shared
            .metrics_text()
            .contains("ambassador_etcd_synced 1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_resets_resets_the_client_too() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    // A backend that reads a request, then resets the connection instead of answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 16];
        let _ = s.read(&mut buf).await;
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    });
    let port = put_alloc(&mut c, SP).await;
    put_endpoint(&mut c, SP, "h0", 0, backend).await;
    let amb = Amb::start(&etcd, |_| {}).await;
    let addr = amb.listening(port).await;
    amb.wait_backends(port, 1, Duration::from_secs(5)).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(b"GET /\n").await.unwrap();
    let mut buf = [0u8; 16];
    let got = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
        .await
        .expect("an answer or an error within 5 s");
    server.await.unwrap();
    match got {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("the client saw a clean end of stream ({n} bytes), as if answered"),
    }
}

/// `--max-connections` counts connections, not listening sockets: with a limit of 2 and
/// sixteen sockets of eight idle ports on two threads, the busy port still serves two
/// clients (a socket takes a place only once a client waits in its queue), and a third
/// waits in the kernel's queue until one of them closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_counts_connections_not_listening_sockets() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let backend = Backend::start("b0").await;
    for i in 0..8 {
        let idle = format!("shared/idle{i}:7/tcp");
        put_alloc(&mut c, &idle).await;
        put_endpoint(&mut c, &idle, "h0", 0, backend.addr).await;
    }
    let port = put_alloc(&mut c, SP).await;
    put_endpoint(&mut c, SP, "h0", 0, backend.addr).await;
    let amb = Amb::start(&etcd, |c| {
        c.threads = 2;
        c.max_connections = 2;
    })
    .await;
    let addr = amb.listening(port).await;
    amb.wait_backends(port, 1, Duration::from_secs(5)).await;
    // Whether `s` is served: its backend's greeting within a second.
    async fn greeted(s: &mut TcpStream) -> bool {
        let mut greeting = [0u8; 14];
        let read = tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut greeting)).await;
        matches!(read, Ok(Ok(_))) && &greeting == b"hello from b0\n"
    }
    let mut first = TcpStream::connect(addr).await.unwrap();
    let mut second = TcpStream::connect(addr).await.unwrap();
    assert!(
        greeted(&mut first).await && greeted(&mut second).await,
        "two clients within the limit were not served"
    );
    let mut third = TcpStream::connect(addr).await.unwrap();
    assert!(
        !greeted(&mut third).await,
        "served beyond --max-connections 2"
    );
    drop(first);
    assert!(
        greeted(&mut third).await,
        "the waiting client did not take the place given back"
    );
    drop(second);
}
