//! Service DNS against a real etcd: answered by `dig` (Debian's dnsutils) and by hickory's
//! own message code over plain sockets, over UDP and TCP.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use ambassador::dns::{self, DnsSettings};
use hickory_server::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::{Name, RecordType};
use testkit::Etcd;

use crate::{Amb, put_alloc, put_endpoint};

/// An ambassador with DNS on a free loopback port below the ephemeral range (`steady_ports`):
/// DNS binds UDP and TCP, and a port from the ephemeral range can be taken meanwhile by any
/// test's outgoing connection or unbound UDP socket (the TCP test here holds 257 of them).
async fn start(etcd: &Etcd) -> (Amb, SocketAddr) {
    let listen: SocketAddr = format!("127.0.0.1:{}", testkit::steady_ports(1)[0])
        .parse()
        .unwrap();
    let amb = Amb::start(etcd, |c| {
        c.dns = Some(DnsSettings {
            zone: Name::from_ascii("viking.internal.").unwrap(),
            addr: c.bind,
            ttl: 5,
        });
    })
    .await;
    dns::serve(
        amb.shared.zone(),
        listen,
        amb.stop.clone(),
        &runtime::handover::Sockets::default(),
    )
    .await
    .expect("bind DNS");
    (amb, listen)
}

/// `dig @server <args>`; fails the test if dig is missing or fails.
pub fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig not found: run `make test` (it installs dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sorted_lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s.lines().map(str::to_owned).collect();
    v.sort();
    v
}

/// One query through hickory's message code over UDP, retried every 200 ms up to 5 times as
/// a stub resolver would: (rcode, answer count, authority count).
fn ask(server: SocketAddr, name: &str, rtype: RecordType) -> (ResponseCode, usize, usize) {
    let mut msg = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Query);
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = (0..5)
        .find_map(|_| {
            sock.send_to(&msg.to_vec().unwrap(), server).unwrap();
            sock.recv(&mut buf).ok()
        })
        .expect("no DNS answer in 5 tries");
    let resp = Message::from_vec(&buf[..n]).unwrap();
    (
        resp.metadata.response_code,
        resp.answers.len(),
        resp.authorities.len(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_kind_over_udp_and_tcp_with_dig() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    let (amb, server) = start(&etcd).await;
    let port = put_alloc(&mut client, "shared/mongo:27017").await;
    put_endpoint(
        &mut client,
        "shared/mongo:27017",
        "node-a",
        1,
        "10.0.0.1:32768".parse().unwrap(),
    )
    .await;
    put_endpoint(
        &mut client,
        "shared/mongo:27017",
        "node-b",
        2,
        "10.0.0.2:32769".parse().unwrap(),
    )
    .await;
    amb.wait_backends(port, 2, Duration::from_secs(5)).await;

    for transport in ["+notcp", "+tcp"] {
        let a = dig(
            server,
            &[transport, "+short", "mongo.shared.viking.internal", "A"],
        );
        assert_eq!(a.trim(), "127.0.0.1", "{transport}");
        let srv = dig(
            server,
            &[
                transport,
                "+short",
                "_27017._tcp.mongo.shared.viking.internal",
                "SRV",
            ],
        );
        assert_eq!(
            srv.trim(),
            format!("0 0 {port} mongo.shared.viking.internal."),
            "{transport}"
        );
        let ep = dig(
            server,
            &[
                transport,
                "+short",
                "mongo.shared.endpoints.viking.internal",
                "A",
            ],
        );
        assert_eq!(sorted_lines(&ep), ["10.0.0.1", "10.0.0.2"], "{transport}");
        let ep_srv = dig(
            server,
            &[
                transport,
                "+short",
                "_27017._tcp.mongo.shared.endpoints.viking.internal",
                "SRV",
            ],
        );
        assert_eq!(
            sorted_lines(&ep_srv),
            [
                "0 0 32768 000000000001-27017.node-a.endpoints.viking.internal.",
                "0 0 32769 000000000002-27017.node-b.endpoints.viking.internal."
            ],
            "{transport}"
        );
        // Case-insensitive, authoritative, TTL 5, EDNS echoed.
        let full = dig(
            server,
            &[transport, "+edns=0", "MONGO.Shared.VIKING.internal", "A"],
        );
        assert!(full.contains("status: NOERROR"), "{full}");
        assert!(full.contains(" aa"), "not authoritative: {full}");
        assert!(
            full.contains("OPT PSEUDOSECTION"),
            "EDNS not echoed: {full}"
        );
        let answer = ["mongo.shared.viking.internal.", "5", "IN", "A", "127.0.0.1"];
        assert!(
            full.lines().any(|l| l.split_whitespace().eq(answer)),
            "{full}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_answers_carry_the_soa_and_foreign_names_are_refused() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    let (amb, server) = start(&etcd).await;
    let port = put_alloc(&mut client, "shared/web:80").await;
    amb.listening(port).await;
    for transport in ["+notcp", "+tcp"] {
        let nx = dig(server, &[transport, "nope.shared.viking.internal", "A"]);
        assert!(nx.contains("status: NXDOMAIN"), "{nx}");
        assert!(nx.contains("AUTHORITY: 1") && nx.contains("SOA"), "{nx}");
        let nodata = dig(server, &[transport, "web.shared.viking.internal", "MX"]);
        assert!(
            nodata.contains("status: NOERROR") && nodata.contains("ANSWER: 0"),
            "{nodata}"
        );
        assert!(nodata.contains("AUTHORITY: 1"), "{nodata}");
        let refused = dig(server, &[transport, "example.com", "A"]);
        assert!(refused.contains("status: REFUSED"), "{refused}");
        assert!(!refused.contains(" ra"), "claims recursion: {refused}");
    }
    assert_eq!(
        ask(server, "nope.viking.internal.", RecordType::A),
        (ResponseCode::NXDomain, 0, 1)
    );
    assert_eq!(
        ask(server, "shared.viking.internal.", RecordType::A),
        (ResponseCode::NoError, 0, 1)
    );
    assert_eq!(
        ask(server, "web.shared.viking.internal.", RecordType::A),
        (ResponseCode::NoError, 1, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_in_etcd_are_answered_within_100_ms() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    let (amb, server) = start(&etcd).await;
    let port = put_alloc(&mut client, "shared/db:5432").await;
    amb.listening(port).await;
    let name = "db.shared.endpoints.viking.internal.";
    assert_eq!(ask(server, name, RecordType::A).0, ResponseCode::NXDomain);
    let written = Instant::now();
    let key = put_endpoint(
        &mut client,
        "shared/db:5432",
        "node-a",
        7,
        "10.1.0.7:30000".parse().unwrap(),
    )
    .await;
    while ask(server, name, RecordType::A).1 != 1 {
        assert!(
            written.elapsed() < Duration::from_millis(100),
            "not answered within 100 ms"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let added = written.elapsed();
    let deleted = Instant::now();
    client.delete(key, None).await.unwrap();
    while ask(server, name, RecordType::A).0 != ResponseCode::NXDomain {
        assert!(
            deleted.elapsed() < Duration::from_millis(100),
            "removal not answered within 100 ms"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    eprintln!(
        "added after {added:?}, removed after {:?}",
        deleted.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_are_truncated_over_udp_and_complete_over_tcp() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    let (amb, server) = start(&etcd).await;
    let port = put_alloc(&mut client, "shared/big:80").await;
    for n in 1..=60u32 {
        let addr = format!("10.2.{}.{}:31000", n / 250, n % 250 + 1);
        put_endpoint(
            &mut client,
            "shared/big:80",
            "node-a",
            n,
            addr.parse().unwrap(),
        )
        .await;
    }
    amb.wait_backends(port, 60, Duration::from_secs(5)).await;
    let udp = dig(
        server,
        &[
            "+ignore",
            "+noedns",
            "_80._tcp.big.shared.endpoints.viking.internal",
            "SRV",
        ],
    );
    assert!(udp.contains(" tc"), "not truncated: {udp}");
    let tcp = dig(
        server,
        &[
            "+tcp",
            "+short",
            "_80._tcp.big.shared.endpoints.viking.internal",
            "SRV",
        ],
    );
    assert_eq!(tcp.lines().count(), 60, "{tcp}");
    // dig falls back to TCP by itself when the UDP answer is truncated.
    let fallback = dig(
        server,
        &[
            "+noedns",
            "+short",
            "_80._tcp.big.shared.endpoints.viking.internal",
            "SRV",
        ],
    );
    assert_eq!(fallback.lines().count(), 60, "{fallback}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_neither_crash_nor_stall_the_server() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    let (amb, server) = start(&etcd).await;
    let port = put_alloc(&mut client, "shared/web:80").await;
    amb.listening(port).await;
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut valid = Message::new(1, MessageType::Query, OpCode::Query);
    valid.add_query(Query::query(
        Name::from_ascii("web.shared.viking.internal.").unwrap(),
        RecordType::A,
    ));
    let valid = valid.to_vec().unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut packets: Vec<Vec<u8>> = vec![
        vec![],
        vec![0; 3],
        valid[..valid.len() / 2].to_vec(),
        // Header claiming 65535 of every section, with no records.
        vec![0, 1, 1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        // A compression pointer to itself.
        [&valid[..12], &[0xc0, 0x0c, 0, 1, 0, 1][..]].concat(),
    ];
    for _ in 0..500 {
        let len = rng.usize(0..600);
        packets.push((0..len).map(|_| rng.u8(..)).collect());
    }
    for p in &packets {
        sock.send_to(p, server).unwrap();
    }
    // TCP: a length prefix promising more than arrives, then a close.
    {
        use std::io::Write;
        let mut tcp = std::net::TcpStream::connect(server).unwrap();
        let _ = tcp.write_all(&[0xff, 0xff, 1, 2, 3]);
    }
    let start = Instant::now();
    assert_eq!(
        ask(server, "web.shared.viking.internal.", RecordType::A),
        (ResponseCode::NoError, 1, 0)
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "stalled: {:?}",
        start.elapsed()
    );
    let tcp = dig(
        server,
        &["+tcp", "+short", "web.shared.viking.internal", "A"],
    );
    assert_eq!(tcp.trim(), "127.0.0.1");
}

/// A UDP service port answers its `_PORT._udp` SRV name with its ambassador port, beside the
/// ambassador's UDP socket on that port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_service_port_has_its_udp_srv_name() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    let (amb, server) = start(&etcd).await;
    let port = put_alloc(&mut client, "shared/dns:53/udp").await;
    put_endpoint(
        &mut client,
        "shared/dns:53/udp",
        "node-a",
        1,
        "10.0.0.1:32768".parse().unwrap(),
    )
    .await;
    testkit::eventually_async(Duration::from_secs(10), "the UDP socket", || {
        std::future::ready(amb.shared.udp_listening().contains_key(&port).then_some(()))
    })
    .await;
    let srv = testkit::eventually(Duration::from_secs(5), "the SRV answer", || {
        let srv = dig(
            server,
            &["+short", "_53._udp.dns.shared.viking.internal", "SRV"],
        );
        (!srv.trim().is_empty()).then_some(srv)
    });
    assert_eq!(
        srv.trim(),
        format!("0 0 {port} dns.shared.viking.internal.")
    );
    let tcp = dig(
        server,
        &["+short", "_53._tcp.dns.shared.viking.internal", "SRV"],
    );
    assert_eq!(tcp.trim(), "", "no TCP name for a UDP port");
}

/// One query over an open TCP connection, framed with its length.
fn tcp_frame(id: u16, name: &str) -> Vec<u8> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let body = msg.to_vec().unwrap();
    [&(body.len() as u16).to_be_bytes()[..], &body].concat()
}

/// The next length-framed message from `tcp`: (id, answer count).
fn tcp_answer(tcp: &mut std::net::TcpStream) -> std::io::Result<(u16, usize)> {
    use std::io::Read;
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len)?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    tcp.read_exact(&mut body)?;
    let resp = Message::from_vec(&body).unwrap();
    Ok((resp.metadata.id, resp.answers.len()))
}

/// DNS over TCP answers queries sent back to back on one connection in order, and keeps to
/// its connection limit: with `TCP_MAX_CONNECTIONS` connections open, one more client waits
/// in the kernel's queue (while UDP keeps answering) until a place frees, and a connection
/// that sends nothing is closed after `TCP_IDLE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_over_tcp_keeps_to_its_connection_limit() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    let (amb, server) = start(&etcd).await;
    let port = put_alloc(&mut client, "shared/web:80").await;
    amb.listening(port).await;
    let name = "web.shared.viking.internal.";
    tokio::task::spawn_blocking(move || {
        let mut tcp = TcpStream::connect(server).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        tcp.write_all(&[tcp_frame(1, name), tcp_frame(2, name)].concat())
            .unwrap();
        assert_eq!(tcp_answer(&mut tcp).unwrap(), (1, 1));
        assert_eq!(tcp_answer(&mut tcp).unwrap(), (2, 1));
        drop(tcp);

        let opened = Instant::now();
        let mut held: Vec<TcpStream> = (0..dns::TCP_MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(server).unwrap())
            .collect();
        // The kernel completes the handshake of a client the server has not accepted.
        let mut waiting = TcpStream::connect(server).unwrap();
        waiting.write_all(&tcp_frame(3, name)).unwrap();
        waiting
            .set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let early = tcp_answer(&mut waiting);
        assert!(
            early.is_err(),
            "answered beyond the limit of {}: {early:?}",
            dns::TCP_MAX_CONNECTIONS
        );
        assert_eq!(
            ask(server, name, RecordType::A),
            (ResponseCode::NoError, 1, 0)
        );
        drop(held.pop());
        waiting
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        assert_eq!(tcp_answer(&mut waiting).unwrap(), (3, 1));
        // The held connections sent nothing: each is closed once it has waited TCP_IDLE.
        let first = &mut held[0];
        first
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(first.read(&mut [0u8; 16]).unwrap(), 0, "not closed");
        let waited = opened.elapsed();
        assert!(
            waited >= dns::TCP_IDLE - Duration::from_millis(500),
            "closed after {waited:?}, before the idle timeout"
        );
    })
    .await
    .unwrap();
}
