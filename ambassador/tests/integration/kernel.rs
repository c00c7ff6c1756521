//! The kernel path (`--kernel-forward on`): a joined pair forwarded by the kernel's sockhash
//! and verdict program, with end of stream, resets and the counts kept in user space. Each
//! test checks that the connection did go through the kernel (the counter), since a pair the
//! kernel refuses would pass the same checks in user space.

use std::time::Duration;

use ambassador::config::KernelForward;
use testkit::eventually_async;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proxy::{OneBackend, Sum, echo_each_way};
use crate::{Amb, put_alloc, put_endpoint};

const SP: &str = "s/web:80";

fn at_once(c: &mut ambassador::Config) {
    c.kernel_forward = KernelForward::On;
    c.relay.kernel_after = 0;
}

/// etcd, `backend` registered for [`SP`], and an ambassador (configured by `tweak`) with it in
/// its routes: the ambassador port's address.
async fn serving(
    backend: std::net::SocketAddr,
    tweak: impl FnOnce(&mut ambassador::Config),
) -> (testkit::Etcd, Amb, std::net::SocketAddr) {
    let etcd = testkit::Etcd::start().await;
    let mut c = etcd.client().await;
    let port = put_alloc(&mut c, SP).await;
    put_endpoint(&mut c, SP, "h0", 0, backend).await;
    let amb = Amb::start(&etcd, tweak).await;
    let addr = amb.listening(port).await;
    amb.wait_backends(port, 1, Duration::from_secs(5)).await;
    (etcd, amb, addr)
}

/// Connections of the (one) service handed to the kernel path, from `/state`.
fn kernel_forwarded(amb: &Amb) -> u64 {
    amb.shared.state_json()["services"][0]["kernel_forwarded"]
        .as_u64()
        .unwrap()
}

/// Connections of the service in the kernel path now, from `/metrics`.
fn kernel_active(amb: &Amb) -> u64 {
    let text = amb.shared.metrics_text();
    text.lines()
        .filter(|l| l.starts_with("ambassador_kernel_connections_active{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_carries_256_mib_each_way_with_half_close_and_exact_counts() {
    // Server speaks first, the client half-closes and reads the rest; checksums and the
    // byte counts of /state are checked inside.
    let one = echo_each_way(256 << 20, at_once).await;
    assert!(one.amb.shared.kernel_forwarding(), "the kernel path is on");
    assert_eq!(
        kernel_forwarded(&one.amb),
        1,
        "the connection went through the kernel"
    );
}

/// The bytes of message `i` (1 to 512 of them, a pattern of `i`).
fn message(i: u32) -> Vec<u8> {
    let len = 1 + (i.wrapping_mul(2_654_435_761) % 512) as usize;
    (0..len).map(|k| (i as usize + k) as u8).collect()
}

/// 20,000 small messages written without waiting for their echoes, so both directions carry
/// bytes at once; what comes back must be exactly what went, in order. `after`: reads relayed
/// in user space before the hand-over (0: the kernel from the start; else the hand-over
/// happens with bytes in flight both ways). The writer pauses a millisecond every 32
/// messages: unpaced, the bytes pile up into full-buffer reads, which the relay takes for
/// bulk and keeps (as it should) rather than hand over.
async fn small_messages_both_ways(after: u32) {
    let one = OneBackend::start(|c| {
        c.kernel_forward = KernelForward::On;
        c.relay.kernel_after = after;
    })
    .await;
    let mut s = TcpStream::connect(one.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut greeting = [0u8; 14];
    s.read_exact(&mut greeting).await.unwrap();
    let (mut r, mut w) = s.into_split();
    const N: u32 = 20_000;
    let writer = tokio::spawn(async move {
        let mut sum = Sum::new();
        let mut sent = 0u64;
        for i in 0..N {
            let m = message(i);
            sum.add(&m);
            sent += m.len() as u64;
            w.write_all(&m).await.unwrap();
            if i % 32 == 31 {
                // The echoes interleave with the writes rather than trail them.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        w.shutdown().await.unwrap();
        (sum.0, sent)
    });
    // The expected stream, message by message, compared as it arrives.
    let mut expected = Vec::new();
    let mut next = 0u32;
    let mut at = 0usize;
    let mut got = 0u64;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), r.read(&mut buf))
            .await
            .expect("echoes keep coming")
            .unwrap();
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            while at == expected.len() {
                assert!(next < N, "more bytes came back than were sent");
                expected = message(next);
                next += 1;
                at = 0;
            }
            assert_eq!(
                b,
                expected[at],
                "byte {got} (message {}) differs: lost or out of order",
                next - 1
            );
            at += 1;
            got += 1;
        }
    }
    let (_, sent) = writer.await.unwrap();
    assert_eq!(got, sent, "every byte came back");
    assert_eq!(
        kernel_forwarded(&one.amb),
        1,
        "the connection went through the kernel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_messages_each_way_in_order_none_lost_in_the_kernel_from_the_start() {
    small_messages_both_ways(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_messages_each_way_in_order_none_lost_across_the_hand_over() {
    small_messages_both_ways(5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_resets_mid_stream_resets_the_client() {
    // Echoes ten lines, then resets the connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 6];
        for _ in 0..10 {
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        }
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    });
    let (_etcd, amb, addr) = serving(backend, |c| {
        c.kernel_forward = KernelForward::On;
        c.relay.kernel_after = 4;
    })
    .await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 6];
    for i in 0..10u8 {
        let line = [b'l', b'i', b'n', b'e', b'0' + i, b'\n'];
        client.write_all(&line).await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, line);
    }
    server.await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
        .await
        .expect("an error within 5 s");
    match got {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("the client saw a clean end of stream ({n} bytes), not the reset"),
    }
    assert_eq!(
        kernel_forwarded(&amb),
        1,
        "the connection went through the kernel"
    );
}

/// Half-close the other way: the backend says its piece and shuts its sending half; the
/// client reads to the end, then still sends, and the backend reads that before the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_half_closes_first_and_the_client_still_sends() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"server done\n").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let (_etcd, amb, addr) = serving(backend, at_once).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
        .await
        .expect("the backend's end of stream within 5 s")
        .unwrap();
    assert_eq!(got, b"server done\n");
    client.write_all(b"late request").await.unwrap();
    client.shutdown().await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the client's end of stream within 5 s")
        .unwrap();
    assert_eq!(
        read, b"late request",
        "what the client sent after the backend's FIN"
    );
    assert_eq!(
        kernel_forwarded(&amb),
        1,
        "the connection went through the kernel"
    );
}

/// An IPv6 backend behind an IPv4 ambassador port: the sockhash joins sockets of either
/// family, and the flush check (TCP_INFO, SIOCOUTQ) reads both alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_backend_is_joined_to_an_ipv4_client() {
    let listener = tokio::net::TcpListener::bind("[::1]:0")
        .await
        .expect("a socket on ::1: the test needs IPv6 on the loopback interface");
    let backend = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let (_etcd, amb, addr) = serving(backend, at_once).await;
    let (mut r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
    const CHUNKS: usize = 2048;
    let writer = tokio::spawn(async move {
        for i in 0..CHUNKS {
            w.write_all(&[(i % 251) as u8; 4096]).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut got))
        .await
        .expect("the echo and its end of stream within 30 s")
        .unwrap();
    writer.await.unwrap();
    server.await.unwrap();
    assert_eq!(got.len(), CHUNKS * 4096, "every byte came back");
    for (i, chunk) in got.chunks(4096).enumerate() {
        assert!(
            chunk.iter().all(|b| *b == (i % 251) as u8),
            "chunk {i} came back changed or out of order"
        );
    }
    assert_eq!(
        kernel_forwarded(&amb),
        1,
        "the connection went through the kernel"
    );
}

/// `bytes_up` and `bytes_down` of the service on `/state` (the counters `/metrics` shows).
fn counted(amb: &Amb) -> (u64, u64) {
    let state = amb.shared.state_json();
    let s = &state["services"][0];
    (
        s["bytes_up"].as_u64().unwrap(),
        s["bytes_down"].as_u64().unwrap(),
    )
}

/// A long-lived connection (a database pool's) shows its bytes while it lives, on either path,
/// and once it ends each byte is counted once.
async fn bytes_count_while_the_connection_lives(kernel: KernelForward) {
    let one = OneBackend::start(|c| c.kernel_forward = kernel).await;
    let mut s = TcpStream::connect(one.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut greeting = [0u8; 14];
    s.read_exact(&mut greeting).await.unwrap();
    // More exchanges than the reads before the hand-over, so the kernel path takes the pair.
    let mut sent = 0u64;
    for i in 0..40 {
        let m = message(i);
        s.write_all(&m).await.unwrap();
        let mut back = vec![0u8; m.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, m);
        sent += m.len() as u64;
    }
    let want = (sent, 14 + sent);
    // The kernel path reads its counts every 5 s.
    let limit = ambassador::KERNEL_COUNT_EVERY + Duration::from_secs(3);
    eventually_async(
        limit,
        "the bytes counted while the connection lives",
        || std::future::ready((counted(&one.amb) == want).then_some(())),
    )
    .await;
    let joined = u64::from(kernel == KernelForward::On);
    assert_eq!(kernel_forwarded(&one.amb), joined, "joined in the kernel");
    assert_eq!(kernel_active(&one.amb), joined, "in the kernel now");
    // The end adds nothing more: every byte was counted once.
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    eventually_async(Duration::from_secs(5), "the connection closed", || {
        let state = one.amb.shared.state_json();
        std::future::ready((state["services"][0]["active"] == 0).then_some(()))
    })
    .await;
    assert_eq!(counted(&one.amb), want, "counts after the end");
    assert_eq!(
        kernel_active(&one.amb),
        0,
        "none in the kernel after the end"
    );
    assert_eq!(kernel_forwarded(&one.amb), joined);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_count_while_a_kernel_forwarded_connection_lives() {
    bytes_count_while_the_connection_lives(KernelForward::On).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_count_while_a_relayed_connection_lives() {
    bytes_count_while_the_connection_lives(KernelForward::Off).await;
}
