//! Service DNS: an authoritative server for one zone (default `viking.internal.`), answered
//! from the ambassador's own view of etcd (the same two watches that feed the routes).
//!
//! Names (all case-insensitive, TTL `--dns-ttl`):
//! * `<job>.<stack>.<zone>` A/AAAA -> this ambassador's address;
//! * `_<port>._<proto>.<job>.<stack>.<zone>` SRV -> `<job>.<stack>.<zone>`, the allocated
//!   ambassador port;
//! * `<job>.<stack>.endpoints.<zone>` A/AAAA -> every live endpoint's address;
//! * `_<port>._<proto>.<job>.<stack>.endpoints.<zone>` SRV -> one target per endpoint,
//!   `<id12>-<port>.<host>.endpoints.<zone>`, whose A/AAAA is that endpoint's address (also in
//!   the additional section).
//!
//! Unknown names in the zone: NXDOMAIN; a known name (or an empty non-terminal such as
//! `<stack>.<zone>`) and another type: NOERROR without answers; both with the zone's SOA in the
//! authority section. Names outside the zone: REFUSED (not a resolver). EDNS is echoed; UDP
//! answers that do not fit are truncated by the server, and the client retries over TCP.
//!
//! [`Zone`] is pure (built from the watched keys, looked up by name and type) and rebuilt on
//! every change; the servers (UDP on a thread of its own, TCP a task per connection under
//! [`TCP_MAX_CONNECTIONS`]) only read the current one. hickory gives the message code; its
//! server is not used (no connection limit; a task and a channel per UDP query).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::{Name, Record};
use hickory_server::proto::serialize::binary::{BinDecoder, BinEncodable, BinEncoder};
use hickory_server::server::Request;
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};
use tokio::sync::watch;
use tracing::debug;

mod zone;

pub use zone::{Lookup, Zone};

/// What the zone answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// The zone, fully qualified (`viking.internal.`).
    pub zone: Name,
    /// The ambassador's address: the answer for service names.
    pub addr: IpAddr,
    pub ttl: u32,
}

/// The default zone.
pub const DEFAULT_ZONE: &str = "viking.internal.";

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            zone: Name::from_ascii(DEFAULT_ZONE).expect("valid zone"),
            addr: IpAddr::from([127, 0, 0, 1]),
            ttl: 5,
        }
    }
}

/// Reads the DNS flags: `dns` is `off`, `ADDR:PORT`, or unset for `<bind>:53`; `zone` gets
/// its final dot if missing; the TTL is whole seconds. `None` when DNS is off.
pub fn settings(
    dns: Option<&str>,
    zone: &str,
    ttl: std::time::Duration,
    bind: IpAddr,
) -> Result<Option<(std::net::SocketAddr, DnsSettings)>, String> {
    let listen = match dns {
        Some("off") => return Ok(None),
        Some(s) => s
            .parse()
            .map_err(|_| format!("--dns {s:?}: expected ADDR:PORT (e.g. 172.17.0.1:53) or off"))?,
        None => std::net::SocketAddr::new(bind, 53),
    };
    let fqdn = if zone.ends_with('.') {
        zone.to_owned()
    } else {
        format!("{zone}.")
    };
    let zone = Name::from_ascii(&fqdn)
        .ok()
        .filter(|n| n.num_labels() > 0)
        .ok_or_else(|| format!("--dns-zone {zone:?}: expected a domain such as viking.internal"))?;
    let ttl = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX);
    Ok(Some((
        listen,
        DnsSettings {
            zone,
            addr: bind,
            ttl,
        },
    )))
}

/// Serves the zone on `listen` over UDP and TCP until `shutdown`. Binding happens before this
/// returns, so a taken port is the caller's error to report.
pub async fn serve(
    zone: watch::Receiver<Arc<Zone>>,
    listen: std::net::SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
    sockets: &runtime::handover::Sockets,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    // The sockets a predecessor handed over, or new ones.
    let udp = match sockets.inherit("dns/udp") {
        Some(fd) => std::net::UdpSocket::from(fd),
        None => std::net::UdpSocket::bind(listen)?,
    };
    udp.set_read_timeout(Some(std::time::Duration::from_millis(200)))?;
    let tcp = match sockets.inherit("dns/tcp") {
        Some(fd) => {
            let tcp = std::net::TcpListener::from(fd);
            tcp.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(tcp)?
        }
        None => tokio::net::TcpListener::bind(listen).await?,
    };
    sockets.offer("dns/udp".to_owned(), &udp);
    sockets.offer("dns/tcp".to_owned(), &tcp);
    // UDP: one blocking loop on its own thread, one packet in and one out, no task or channel
    // per query (through hickory's server UDP measured 0.64x dnsmasq's rate; see
    // ARCHITECTURE.md). TCP: a task per connection, under a limit. Both answer through
    // `reply`.
    {
        let (zone, shutdown) = (zone.clone(), shutdown.clone());
        std::thread::Builder::new()
            .name("dns-udp".into())
            .spawn(move || serve_udp(udp, zone, shutdown))?;
    }
    let tcp = runtime::accept::Listener::from_tokio(tcp)?;
    Ok(tokio::spawn(serve_tcp(tcp, zone, shutdown)))
}

/// DNS over TCP: connections open at once. More clients wait in the kernel's queue until one
/// closes (a client that sends nothing is closed after [`TCP_IDLE`]): the sockets the
/// ambassador may open are shared with its proxied connections, and clients that hold
/// connections open must not take them all.
pub const TCP_MAX_CONNECTIONS: usize = 256;

/// How long a DNS connection may take to send its next whole query, and to take an answer.
pub const TCP_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// The TCP accept loop: a permit per connection, taken before the client is accepted
/// (`runtime::accept`), a task per connection. Ends at `shutdown`; connections end at their
/// next wait for a query.
async fn serve_tcp(
    listener: runtime::accept::Listener,
    zone: watch::Receiver<Arc<Zone>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let places = Arc::new(tokio::sync::Semaphore::new(TCP_MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept(|| {
                let places = places.clone();
                async move { places.acquire_owned().await.ok() }
            }) => accepted,
        };
        match accepted {
            Ok(Some((permit, stream, peer))) => {
                let (zone, shutdown) = (zone.clone(), shutdown.clone());
                tokio::spawn(async move {
                    serve_tcp_connection(stream, peer, zone, shutdown).await;
                    drop(permit);
                });
            }
            Ok(None) => return,
            Err(e) => {
                // Out of descriptors or memory: the client stays queued; try again shortly.
                debug!("DNS over TCP: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

/// One DNS connection: length-prefixed queries (RFC 1035 4.2.2), answered in order, until
/// the client closes, sends something that is not a query, or waits longer than
/// [`TCP_IDLE`].
async fn serve_tcp_connection(
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
    zone: watch::Receiver<Arc<Zone>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut query = Vec::new();
    let mut out = Vec::with_capacity(512);
    let mut frame = Vec::with_capacity(514);
    loop {
        let read = async {
            let len = stream.read_u16().await?;
            query.resize(usize::from(len), 0);
            stream.read_exact(&mut query).await.map(drop)
        };
        let read = tokio::select! {
            () = shutdown.cancelled() => return,
            read = tokio::time::timeout(TCP_IDLE, read) => read,
        };
        if !matches!(read, Ok(Ok(()))) {
            return;
        }
        let answered = {
            let zone = zone.borrow();
            answer_tcp(&zone, &query, peer, &mut out)
        };
        if !answered {
            return;
        }
        // The encoder caps an answer at 65,535 bytes, which the length prefix can say.
        let len = u16::try_from(out.len()).unwrap_or(u16::MAX);
        frame.clear();
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&out);
        debug!(%peer, "dns query over TCP");
        let write = tokio::time::timeout(TCP_IDLE, stream.write_all(&frame)).await;
        if !matches!(write, Ok(Ok(()))) {
            return;
        }
    }
}

/// The UDP loop, on a thread of its own with blocking calls: no reactor round trip per
/// packet, and a DNS flood cannot take the proxy's thread.
fn serve_udp(
    socket: std::net::UdpSocket,
    zone: watch::Receiver<Arc<Zone>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut buf = vec![0u8; 65_535];
    let mut out = Vec::with_capacity(4096);
    while !shutdown.is_cancelled() {
        // The read timeout bounds how long a stop waits.
        let Ok((n, src)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let answered = {
            let zone = zone.borrow();
            answer_udp(&zone, &buf[..n], src, &mut out)
        };
        if answered {
            let _ = socket.send_to(&out, src);
        }
    }
}

/// Answers one UDP packet into `out`: at most the client's EDNS payload size (512 without
/// EDNS; larger answers are truncated with TC set). False when it deserves no answer (a
/// response, or too short to carry an id).
pub fn answer_udp(zone: &Zone, packet: &[u8], src: SocketAddr, out: &mut Vec<u8>) -> bool {
    out.clear();
    answer(zone, packet, src, Protocol::Udp, out)
}

/// Answers one query that came over TCP into `out` (without the length prefix): up to a
/// message's 65,535 bytes. False when it deserves no answer.
pub fn answer_tcp(zone: &Zone, packet: &[u8], src: SocketAddr, out: &mut Vec<u8>) -> bool {
    out.clear();
    answer(zone, packet, src, Protocol::Tcp, out)
}

/// Writes the answer to one query into `out` (empty): over UDP at most the client's EDNS payload size
/// (512 without EDNS; larger answers are truncated with TC set), over TCP up to a message's
/// 65,535 bytes. False when it deserves no answer (a response, or too short to carry an id).
fn answer(
    zone: &Zone,
    packet: &[u8],
    src: SocketAddr,
    protocol: Protocol,
    out: &mut Vec<u8>,
) -> bool {
    let request = match Request::from_bytes(packet.to_vec(), src, protocol) {
        Ok(r) => r,
        Err(_) => {
            // A header that can be read gets FORMERR; anything less, silence.
            if packet.len() < 12 || packet[2] & 0x80 != 0 {
                return false;
            }
            let id = u16::from_be_bytes([packet[0], packet[1]]);
            let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
            metadata.response_code = ResponseCode::FormErr;
            let header = Header {
                metadata,
                counts: HeaderCounts::default(),
            };
            return header.emit(&mut BinEncoder::new(out)).is_ok();
        }
    };
    if request.metadata.message_type != MessageType::Query {
        return false;
    }
    let edns = echo_edns(&request);
    let none = no_queries();
    let response = response(zone, &request, edns.as_ref(), &none);
    let mut encoder = BinEncoder::new(out);
    encoder.set_max_size(match protocol {
        Protocol::Udp => edns.as_ref().map_or(512, Edns::max_payload),
        _ => u16::MAX,
    });
    response.destructive_emit(&mut encoder).is_ok()
}

/// Whether a raw question's name uses a compression pointer.
fn compressed_question(raw: &[u8]) -> bool {
    let mut at = 0;
    while let Some(&len) = raw.get(at) {
        if len == 0 {
            return false;
        }
        if len & 0xC0 != 0 {
            return true;
        }
        at += usize::from(len) + 1;
    }
    false
}

/// An empty question section, for answers that echo none.
fn no_queries() -> Queries {
    Queries::read(&mut BinDecoder::new(&[]), 0).expect("zero questions decode from nothing")
}

/// The EDNS of a response: echoed when the request had one (version 0, payload >= 512).
fn echo_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|req| {
        let mut e = Edns::new();
        e.set_max_payload(req.max_payload().max(512));
        e.set_version(0);
        e
    })
}

/// A response whose records are borrowed from the zone.
type Response<'q, 'z> = MessageResponse<
    'q,
    'z,
    std::vec::IntoIter<&'z Record>,
    std::vec::IntoIter<&'z Record>,
    std::vec::IntoIter<&'z Record>,
    std::vec::IntoIter<&'z Record>,
>;

/// The whole response to `request`, for UDP and TCP alike; `none` stands in for the
/// question when it must not be echoed.
fn response<'q, 'z>(
    zone: &'z Zone,
    request: &'q Request,
    edns: Option<&'q Edns>,
    none: &'q Queries,
) -> Response<'q, 'z> {
    let reply = reply(zone, request);
    let queries = if reply.echo_queries {
        &request.queries
    } else {
        none
    };
    MessageResponseBuilder::new(queries, edns).build(
        reply.metadata,
        reply.answers,
        reply.authorities,
        Vec::new(),
        reply.additionals,
    )
}

/// A response's header and records, borrowed from the zone.
pub struct Reply<'z> {
    pub metadata: Metadata,
    /// Whether the question goes back in the response (not for a malformed one).
    pub echo_queries: bool,
    pub answers: Vec<&'z Record>,
    pub authorities: Vec<&'z Record>,
    pub additionals: Vec<&'z Record>,
}

/// What to answer `request` with, for UDP and TCP alike.
pub fn reply<'z>(zone: &'z Zone, request: &Request) -> Reply<'z> {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.authoritative = true;
    metadata.recursion_available = false;
    let mut reply = Reply {
        metadata,
        echo_queries: true,
        answers: Vec::new(),
        authorities: Vec::new(),
        additionals: Vec::new(),
    };
    if request.queries.len() != 1 || compressed_question(request.queries.as_bytes()) {
        // The question goes back as the client sent it: many of them can overflow the answer
        // mid-question, and a compression pointer (nothing precedes a question that it could
        // rightly point to) would point into our header. Neither is a real client's query.
        reply.metadata.response_code = ResponseCode::FormErr;
        reply.echo_queries = false;
        return reply;
    }
    if request.metadata.op_code != OpCode::Query {
        reply.metadata.response_code = ResponseCode::NotImp;
        return reply;
    }
    let Ok(info) = request.request_info() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return reply;
    };
    match zone.lookup(info.query.name(), info.query.query_type()) {
        Lookup::Refused => {
            reply.metadata.authoritative = false;
            reply.metadata.response_code = ResponseCode::Refused;
        }
        Lookup::NxDomain => {
            reply.metadata.response_code = ResponseCode::NXDomain;
            reply.authorities.push(zone.soa());
        }
        Lookup::NoData => reply.authorities.push(zone.soa()),
        Lookup::Found {
            answers,
            additionals,
        } => {
            reply.answers = answers;
            reply.additionals = additionals;
        }
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use hickory_server::proto::rr::{LowerName, RecordType};
    use runtime::watch::Kv;
    use schema::Prefix;

    fn kv(key: &str, value: &str) -> (String, Kv) {
        (
            key.to_owned(),
            Kv {
                key: key.to_owned(),
                value: value.as_bytes().to_vec(),
                mod_revision: 1,
                lease: 0,
            },
        )
    }

    fn zone() -> Zone {
        let settings = DnsSettings {
            zone: Name::from_ascii("viking.internal.").unwrap(),
            addr: "172.17.0.1".parse().unwrap(),
            ttl: 5,
        };
        let allocs = BTreeMap::from([kv(
            "/viking/ports/alloc/shared/mongo/27017-tcp",
            r#"{"v":1,"port":20000}"#,
        )]);
        let services = BTreeMap::from([
            kv(
                "/viking/services/shared/mongo/27017-tcp/node-a:0123456789ab:27017",
                r#"{"v":1,"host":"node-a","addr":"10.0.0.1","port":32768,"container_id":"0123456789ab"}"#,
            ),
            kv(
                "/viking/services/shared/mongo/27017-tcp/node-b:ba9876543210:27017",
                r#"{"v":1,"host":"node-b","addr":"10.0.0.2","port":32769,"container_id":"ba9876543210"}"#,
            ),
        ]);
        Zone::build(
            &settings,
            &Prefix::new("/viking").unwrap(),
            schema::PortRange::DEFAULT,
            &allocs,
            &services,
            7,
        )
    }

    fn q(name: &str) -> LowerName {
        LowerName::from(Name::from_ascii(name).unwrap())
    }

    fn rdata(l: &Lookup<'_>) -> Vec<String> {
        let Lookup::Found { answers, .. } = l else {
            return vec![format!("{l:?}")];
        };
        let mut v: Vec<String> = answers.iter().map(|r| r.data.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn service_names_point_at_the_ambassador() {
        let z = zone();
        assert_eq!(
            rdata(&z.lookup(&q("mongo.shared.viking.internal."), RecordType::A)),
            ["172.17.0.1"]
        );
        assert_eq!(
            rdata(&z.lookup(&q("MONGO.Shared.VIKING.internal."), RecordType::A)),
            ["172.17.0.1"]
        );
        let srv = z.lookup(
            &q("_27017._tcp.mongo.shared.viking.internal."),
            RecordType::SRV,
        );
        assert_eq!(rdata(&srv), ["0 0 20000 mongo.shared.viking.internal."]);
        let Lookup::Found { additionals, .. } = srv else {
            panic!()
        };
        assert_eq!(additionals.len(), 1);
    }

    #[test]
    fn endpoint_names_point_at_the_backends() {
        let z = zone();
        assert_eq!(
            rdata(&z.lookup(&q("mongo.shared.endpoints.viking.internal."), RecordType::A)),
            ["10.0.0.1", "10.0.0.2"]
        );
        let srv = z.lookup(
            &q("_27017._tcp.mongo.shared.endpoints.viking.internal."),
            RecordType::SRV,
        );
        assert_eq!(
            rdata(&srv),
            [
                "0 0 32768 0123456789ab-27017.node-a.endpoints.viking.internal.",
                "0 0 32769 ba9876543210-27017.node-b.endpoints.viking.internal."
            ]
        );
        let Lookup::Found { additionals, .. } = srv else {
            panic!()
        };
        assert_eq!(additionals.len(), 2);
    }

    /// Found by the `dns_query` fuzz target: a question whose name points into the header,
    /// and a packet of two questions. Both get FORMERR without the question, and parse back.
    #[test]
    fn malformed_questions_get_formerr_without_the_question() {
        let pointer_into_header: &[u8] = &[
            0x02, 0x80, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x2c, 0xde, 0, 0, 0, 0x40, 0, 0, 0x26, 0,
            0x27, 0, 0x08, 0, 0, 1, 0, 0x18, 0, 0, 4, 0, 0x23, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0,
            0, 0x29, 0, 0x31, 0x26, 0x33, 0, 0, 0x18, 0x59, 2, 2, 2, 2, 0x1b, 2, 0xc0, 2, 0, 1, 0,
            0, 0, 0, 0,
        ];
        let mut two = vec![0x12, 0x34, 1, 0, 0, 2, 0, 0, 0, 0, 0, 0];
        for _ in 0..2 {
            two.extend_from_slice(&[5, b'm', b'o', b'n', b'g', b'o', 0, 0, 1, 0, 1]);
        }
        let z = zone();
        for packet in [pointer_into_header, &two] {
            let mut out = Vec::new();
            assert!(answer_udp(
                &z,
                packet,
                "127.0.0.1:53".parse().unwrap(),
                &mut out
            ));
            let m = hickory_server::proto::op::Message::from_vec(&out).expect("parses");
            assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
            assert!(m.queries.is_empty());
        }
    }

    #[test]
    fn negative_answers() {
        let z = zone();
        assert_eq!(
            z.lookup(&q("nope.shared.viking.internal."), RecordType::A),
            Lookup::NxDomain
        );
        assert_eq!(
            z.lookup(&q("mongo.shared.viking.internal."), RecordType::MX),
            Lookup::NoData
        );
        assert_eq!(
            z.lookup(&q("mongo.shared.viking.internal."), RecordType::AAAA),
            Lookup::NoData
        );
        // Empty non-terminals exist.
        assert_eq!(
            z.lookup(&q("shared.viking.internal."), RecordType::A),
            Lookup::NoData
        );
        assert_eq!(
            z.lookup(&q("endpoints.viking.internal."), RecordType::A),
            Lookup::NoData
        );
        assert_eq!(z.lookup(&q("example.com."), RecordType::A), Lookup::Refused);
        assert_eq!(z.lookup(&q("internal."), RecordType::A), Lookup::Refused);
        assert_eq!(
            rdata(&z.lookup(&q("viking.internal."), RecordType::SOA)).len(),
            1
        );
    }
}
