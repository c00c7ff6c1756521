//! HTTP/1.1 between clients and backends without hyper: the path almost every request takes.
//!
//! The request head is parsed once (`httparse`) and the head for the backend written straight
//! from it into one buffer; bodies pass through as they come, a chunked one as chunked (both
//! sides speak HTTP/1.1), scanned only to find its end; backend connections are plain sockets
//! in a pool. What hyper did per request besides (a header map built and taken apart, the
//! hand-over to a task per backend connection, its buffers kept for the connection's life)
//! was a third of the router's CPU per request and most of its memory per idle connection
//! (docs/performance.md, "The router"). An idle connection here holds no buffer at all.
//!
//! The rules are those of [`crate::proxy`] (routes, the router's own answers, forwarding
//! headers, retries, counters, the access log). What this path leaves to hyper, for the rest
//! of the connection with the bytes read so far: HTTP/1.0 clients, `Expect`, `Upgrade`
//! (WebSocket), `CONNECT`, and transfer codings other than `chunked`.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use http::{Method, StatusCode, Version};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use crate::metrics::RouteCounters;
use crate::pool;
use crate::proxy::{Attempts, ConnInfo, Entry, HOP, InFlight, https_location, idempotent, says};
use crate::server::Serving;
use crate::stall::within;
use crate::table::{Route, host_name};

/// A client connection this path can serve: plain TCP or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Waits until a read would find something, with no buffer: an idle keep-alive
    /// connection then holds none.
    fn ready(&mut self) -> impl Future<Output = io::Result<()>> + Send;

    /// Ends the connection cleanly before it is dropped.
    fn finish(&mut self) -> impl Future<Output = ()> + Send;

    /// Is in the reactor (its readiness is watched at no cost).
    fn watched(&self) -> bool;

    /// Turns Nagle's algorithm off (`TCP_NODELAY`).
    fn no_delay(&self);

    /// Reads what has arrived already, without waiting for the reactor to say so
    /// (`WouldBlock` when nothing has).
    fn read_now(&self, buf: &mut [u8]) -> io::Result<usize>;

    /// After [`Stream::ready`]: reads what came into `buf` (room made for a head),
    /// `WouldBlock` (the readiness was stale, and is forgotten) when nothing did; `None` when
    /// the stream cannot read without waiting (and `buf` is left alone).
    fn read_ready(&self, buf: &mut Vec<u8>) -> Option<io::Result<usize>>;
}

impl Stream for Box<tokio_rustls::server::TlsStream<TcpStream>> {
    /// rustls may hold decrypted bytes that the socket's readiness does not show: read at
    /// once.
    fn ready(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }

    /// TLS's close_notify (and the FIN), within a second.
    fn finish(&mut self) -> impl Future<Output = ()> + Send {
        let limit = std::time::Duration::from_secs(1);
        async move {
            let _ = tokio::time::timeout(limit, self.shutdown()).await;
        }
    }

    fn watched(&self) -> bool {
        true
    }

    /// On from the start (`server`): the handshake's flights.
    fn no_delay(&self) {}

    fn read_now(&self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn read_ready(&self, _: &mut Vec<u8>) -> Option<io::Result<usize>> {
        None
    }
}

/// While a backend has not answered, a client's close is watched for (the request is then
/// given up); over a socket not in the reactor yet, from this long after the request went.
const WATCH_GONE_AFTER: std::time::Duration = std::time::Duration::from_millis(10);

/// How a connection's time with this path ended.
pub enum Ended<S> {
    Closed,
    /// hyper serves the rest: the connection and the bytes read from it, not yet used.
    Hyper(S, Vec<u8>),
    /// Answered, and idle for the linger: to be parked, its head due by the deadline.
    Idle(S, tokio::time::Instant),
}

/// How a message's body ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Framing {
    None,
    Length(u64),
    Chunked,
    /// A response without length: to the end of the backend's connection.
    Close,
}

/// A request head, and the head the backend gets.
struct Head {
    /// Bytes of the head in the client's buffer.
    len: usize,
    method: Method,
    /// The request target in origin form (an absolute-form target's path and query): what the
    /// backend gets, a redirect keeps and the access log shows.
    target: String,
    host: String,
    out: Vec<u8>,
    body: Framing,
    /// The client asked to close after this request.
    close: bool,
}

enum Parsed {
    Head(Head),
    /// More bytes are needed.
    Partial,
    Hyper,
    Refused(StatusCode, &'static str),
}

/// The forwarding fields the router writes itself (the client's are replaced).
const OURS: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

fn is(name: &str, set: &[&str]) -> bool {
    set.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// A field `Connection` may not take away: what frames the message, and the host. (Taken away,
/// the body would go on framed by a field the other side no longer sees.)
pub(crate) fn framing_field(name: &str) -> bool {
    is(name, &["content-length", "transfer-encoding", "host"])
}

pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(value)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Parses the head at the start of `buf` and writes the backend's head.
fn parse(buf: &[u8], max_headers: usize, info: &ConnInfo) -> Parsed {
    // Left uninitialized: zeroing 100 fields (3.2 KB) for every request, and again for every
    // read of a head that came in parts, is work for nothing.
    use std::mem::MaybeUninit;
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 100];
    let mut heap;
    let fields: &mut [MaybeUninit<httparse::Header<'_>>] = if max_headers <= stack.len() {
        &mut stack[..max_headers]
    } else {
        heap = vec![MaybeUninit::uninit(); max_headers];
        &mut heap
    };
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, fields) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Refused(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "The request has more header fields than this router takes.",
            );
        }
        Err(_) => return Parsed::Refused(StatusCode::BAD_REQUEST, "The request is not HTTP."),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Parsed::Refused(StatusCode::BAD_REQUEST, "The request is not HTTP.");
    };
    if minor == 0 || method == "CONNECT" {
        return Parsed::Hyper;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Refused(StatusCode::BAD_REQUEST, "The method is not a token.");
    };
    let fields = &*req.headers;

    // What the fields say.
    let mut close = false;
    let mut upgrade_token = false;
    let mut named: Vec<&str> = Vec::new();
    let (mut host_field, mut xff, mut forwarded) = (None, None, None);
    let mut length: Option<u64> = None;
    let mut coding: Option<&[u8]> = None;
    let mut upgrade = false;
    for f in fields {
        let n = f.name;
        if n.eq_ignore_ascii_case("connection") {
            for t in tokens(f.value) {
                if t.eq_ignore_ascii_case("close") {
                    close = true;
                } else if t.eq_ignore_ascii_case("upgrade") {
                    upgrade_token = true;
                } else if !t.eq_ignore_ascii_case("keep-alive") && !framing_field(t) {
                    named.push(t);
                }
            }
        } else if n.eq_ignore_ascii_case("host") {
            if host_field.is_some() {
                return Parsed::Refused(StatusCode::BAD_REQUEST, "The request has two Hosts.");
            }
            host_field = Some(f.value);
        } else if n.eq_ignore_ascii_case("content-length") {
            let parsed = std::str::from_utf8(f.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse().ok());
            match (parsed, length) {
                (Some(v), None) => length = Some(v),
                (Some(v), Some(before)) if v == before => {}
                _ => {
                    return Parsed::Refused(
                        StatusCode::BAD_REQUEST,
                        "The request's Content-Length is not one number.",
                    );
                }
            }
        } else if n.eq_ignore_ascii_case("transfer-encoding") {
            if coding.is_some() {
                return Parsed::Hyper;
            }
            coding = Some(f.value);
        } else if n.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        } else if n.eq_ignore_ascii_case("expect") {
            return Parsed::Hyper;
        } else if n.eq_ignore_ascii_case("x-forwarded-for") {
            xff = xff.or(Some(f.value));
        } else if n.eq_ignore_ascii_case("forwarded") {
            forwarded = forwarded.or(Some(f.value));
        }
    }
    if upgrade && upgrade_token {
        return Parsed::Hyper;
    }
    let body = match (coding, length) {
        (Some(c), None) if c.trim_ascii().eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
        (Some(_), None) => return Parsed::Hyper,
        (Some(_), Some(_)) => {
            return Parsed::Refused(
                StatusCode::BAD_REQUEST,
                "The request has both Content-Length and Transfer-Encoding.",
            );
        }
        (None, Some(0) | None) => Framing::None,
        (None, Some(n)) => Framing::Length(n),
    };

    // The target: origin form, or absolute form whose authority names the host.
    let (path, authority) = if target.starts_with('/') || target == "*" {
        (target, None)
    } else {
        match target.parse::<http::Uri>() {
            Ok(uri) if uri.scheme().is_some() && uri.authority().is_some() => {
                let start = target.len() - uri.path_and_query().map_or(0, |p| p.as_str().len());
                let path = if start < target.len() {
                    &target[start..]
                } else {
                    "/"
                };
                (path, uri.authority().map(|a| a.as_str().to_owned()))
            }
            _ => return Parsed::Refused(StatusCode::BAD_REQUEST, "The request target is bad."),
        }
    };
    let host_text = match (&authority, host_field) {
        (Some(a), _) => a.as_str(),
        (None, Some(h)) => match std::str::from_utf8(h) {
            Ok(h) => h,
            Err(_) => return Parsed::Refused(StatusCode::BAD_REQUEST, "The Host is not text."),
        },
        (None, None) => {
            return Parsed::Refused(StatusCode::BAD_REQUEST, says::NO_HOST);
        }
    };
    let Some(host) = host_name(host_text) else {
        return Parsed::Refused(StatusCode::BAD_REQUEST, says::NO_HOST);
    };

    // The Host as sent; from the authority when there was none.
    let out = backend_head(
        &Forward {
            method: method.as_str(),
            target: path,
            host: host_field.unwrap_or(host_text.as_bytes()),
            host_missing: host_field.is_none(),
            xff,
            forwarded,
            named: &named,
            chunked: body == Framing::Chunked,
        },
        fields.iter().map(|f| (f.name, f.value)),
        info,
        len + 160,
    );
    Parsed::Head(Head {
        len,
        method,
        target: path.to_owned(),
        host,
        out,
        body,
        close,
    })
}

/// What the head a backend gets is written from, besides the client's fields.
pub(crate) struct Forward<'a> {
    pub method: &'a str,
    /// Origin form.
    pub target: &'a str,
    /// The client's `Host`, or the authority when it sent none (`host_missing`).
    pub host: &'a [u8],
    pub host_missing: bool,
    /// The client's first `X-Forwarded-For` and `Forwarded`, which the router's extend.
    pub xff: Option<&'a [u8]>,
    pub forwarded: Option<&'a [u8]>,
    /// The fields the client's `Connection` names (hop-by-hop for this request).
    pub named: &'a [&'a str],
    pub chunked: bool,
}

/// The head a backend gets (both paths: this one's and [`crate::plain`]'s): the request line
/// in HTTP/1.1, `Host` when the client sent none, the client's fields without the hop-by-hop
/// ones, those `Connection` names and the forwarding fields, which are written anew
/// (`X-Forwarded-For` and `Forwarded` extended).
pub(crate) fn backend_head<'f>(
    fwd: &Forward<'_>,
    fields: impl Iterator<Item = (&'f str, &'f [u8])>,
    info: &ConnInfo,
    capacity: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    out.extend_from_slice(fwd.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(fwd.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if fwd.host_missing {
        field(&mut out, "Host", &[fwd.host]);
    }
    for (name, value) in fields {
        if is(name, &HOP) || is(name, &OURS) || is(name, fwd.named) {
            continue;
        }
        field(&mut out, name, &[value]);
    }
    if fwd.chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    let ip = info.client_ip.as_bytes();
    match fwd.xff {
        Some(prior) => field(&mut out, "X-Forwarded-For", &[prior, b", ", ip]),
        None => field(&mut out, "X-Forwarded-For", &[ip]),
    }
    let proto: &[u8] = if info.tls { b"https" } else { b"http" };
    field(&mut out, "X-Forwarded-Proto", &[proto]);
    let ours = info.forwarded_for.as_bytes();
    let (q, h) = (&b";host=\""[..], fwd.host);
    match fwd.forwarded {
        Some(prior) => field(&mut out, "Forwarded", &[prior, b", ", ours, q, h, b"\""]),
        None => field(&mut out, "Forwarded", &[ours, q, h, b"\""]),
    }
    field(&mut out, "X-Forwarded-Host", &[fwd.host]);
    out.extend_from_slice(b"\r\n");
    out
}

fn field(out: &mut Vec<u8>, name: &str, value: &[&[u8]]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    for v in value {
        out.extend_from_slice(v);
    }
    out.extend_from_slice(b"\r\n");
}

/// A backend's response head, and the fields the client gets (`O`: see [`Fields`]).
pub(crate) struct Response<O = Vec<u8>> {
    pub len: usize,
    pub status: StatusCode,
    pub out: O,
    pub body: Framing,
    /// The backend keeps the connection open after it.
    pub keep: bool,
}

/// Where a backend's response fields go: an HTTP/1.1 head for this path's client, or a header
/// map for hyper's (HTTP/2).
pub(crate) trait Fields {
    /// The body goes on framed as the backend framed it (`Transfer-Encoding` kept).
    const PASSES_FRAMING: bool;
    fn start(status: StatusCode, reason: &str, capacity: usize) -> Self;
    fn field(&mut self, name: &str, value: &[u8]);
}

impl Fields for Vec<u8> {
    const PASSES_FRAMING: bool = true;

    fn start(status: StatusCode, reason: &str, capacity: usize) -> Self {
        let mut out = Vec::with_capacity(capacity + 32);
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        out
    }

    fn field(&mut self, name: &str, value: &[u8]) {
        field(self, name, &[value]);
    }
}

impl Fields for http::HeaderMap {
    const PASSES_FRAMING: bool = false;

    fn start(_: StatusCode, _: &str, _: usize) -> Self {
        http::HeaderMap::with_capacity(16)
    }

    /// A field that is not a valid header (httparse lets some bytes through that `http` does
    /// not) is left out.
    fn field(&mut self, name: &str, value: &[u8]) {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_bytes(value),
        ) {
            self.append(n, v);
        }
    }
}

/// Parses the response head at the start of `buf`: `None` while partial.
fn parse_response<O: Fields>(
    buf: &[u8],
    method: &Method,
) -> Result<Option<Response<O>>, &'static str> {
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("the backend's response is not HTTP"),
    };
    let (Some(code), Some(minor)) = (resp.code, resp.version) else {
        return Err("the backend's response is not HTTP");
    };
    let status = StatusCode::from_u16(code).map_err(|_| "the backend's status is bad")?;
    let mut keep = minor == 1;
    let mut named: Vec<&str> = Vec::new();
    let mut length: Option<u64> = None;
    let mut chunked = None;
    for f in &*resp.headers {
        if f.name.eq_ignore_ascii_case("connection") {
            for t in tokens(f.value) {
                if t.eq_ignore_ascii_case("close") {
                    keep = false;
                } else if t.eq_ignore_ascii_case("keep-alive") {
                    keep |= minor == 0;
                } else if !framing_field(t) {
                    named.push(t);
                }
            }
        } else if f.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(f.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or("the backend's Content-Length is bad")?;
            if length.is_some_and(|l| l != v) {
                return Err("the backend sent two Content-Lengths");
            }
            length = Some(v);
        } else if f.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked when it is the last coding (RFC 9112 6.3).
            let last = tokens(f.value).last().unwrap_or("");
            chunked = Some(last.eq_ignore_ascii_case("chunked"));
        }
    }
    let body = if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::None
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) | (None, None) => Framing::Close,
            (None, Some(n)) => Framing::Length(n),
        }
    };
    let mut out = O::start(status, resp.reason.unwrap_or(""), len);
    let mut dated = false;
    for f in &*resp.headers {
        // `Transfer-Encoding` stays when the body goes on as the backend framed it; a length
        // beside chunked (which wins, RFC 9112 6.3) does not.
        let framing = O::PASSES_FRAMING && f.name.eq_ignore_ascii_case("transfer-encoding");
        let hop = is(f.name, &HOP) && !framing;
        let stale = body == Framing::Chunked && f.name.eq_ignore_ascii_case("content-length");
        if hop || stale || is(f.name, &named) {
            continue;
        }
        dated |= f.name.eq_ignore_ascii_case("date");
        out.field(f.name, f.value);
    }
    // A response forwarded without a Date gets one (RFC 9110 6.6.1: a recipient with a clock
    // must add it); hyper's server did so for every response.
    if !dated && !status.is_informational() {
        let now = httpdate::fmt_http_date(std::time::SystemTime::now());
        out.field("Date", now.as_bytes());
    }
    Ok(Some(Response {
        len,
        status,
        out,
        body,
        keep: keep && body != Framing::Close,
    }))
}

/// Finds where a chunked body ends, as its bytes pass; or decodes it ([`Chunks::framing`]).
#[derive(Debug, Default)]
pub struct Chunks {
    state: ChunkState,
    /// The size being read, then the data bytes left in the chunk.
    left: u64,
    /// Data bytes passed (what the body carries, without the chunks' framing).
    pub data: u64,
    /// The trailer section's bytes, when kept ([`Chunks::keeping_trailers`]).
    pub trailers: Option<Vec<u8>>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum ChunkState {
    #[default]
    Size,
    SizeDigits,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunks {
    /// A decoder that keeps the trailer section's bytes (in `trailers`).
    pub fn keeping_trailers() -> Self {
        Self {
            trailers: Some(Vec::new()),
            ..Self::default()
        }
    }

    /// Takes the next bytes of the body: `Ok(Some(n))` when it ended after `n` of them.
    ///
    /// Strict: every line ends with CRLF (a bare LF, which RFC 9112 lets a recipient accept,
    /// is refused): the bytes go on to the backend as they are, and a backend that reads a
    /// bare LF otherwise than the router would see another message boundary.
    pub fn scan(&mut self, data: &[u8]) -> Result<Option<usize>, &'static str> {
        let mut i = 0;
        loop {
            let (n, done) = self.framing(&data[i..])?;
            i += n;
            if done {
                return Ok(Some(i));
            }
            if i == data.len() {
                return Ok(None);
            }
            let take = self.data_left().min((data.len() - i) as u64);
            self.take_data(take);
            i += take as usize;
        }
    }

    /// Data bytes that come next, before more framing (0 while framing is being read).
    pub fn data_left(&self) -> u64 {
        if self.state == ChunkState::Data {
            self.left
        } else {
            0
        }
    }

    /// `n` (at most [`Chunks::data_left`]) data bytes passed.
    pub fn take_data(&mut self, n: u64) {
        self.left -= n;
        self.data += n;
        if self.left == 0 && self.state == ChunkState::Data {
            self.state = ChunkState::DataCr;
        }
    }

    /// Takes framing bytes (sizes, extensions, line ends, trailers) from the start of `data`
    /// until chunk data comes, the body ends or `data` runs out: how many it took, and whether
    /// the body ended.
    pub fn framing(&mut self, data: &[u8]) -> Result<(usize, bool), &'static str> {
        use ChunkState::*;
        for (i, &b) in data.iter().enumerate() {
            let before = self.state;
            self.state = match (before, b) {
                (Data, _) => return Ok((i, false)),
                (Size | SizeDigits, _) if b.is_ascii_hexdigit() => {
                    let d = u64::from((b as char).to_digit(16).unwrap_or(0));
                    self.left = self
                        .left
                        .checked_mul(16)
                        .and_then(|v| v.checked_add(d))
                        .ok_or("chunk size too large")?;
                    SizeDigits
                }
                (SizeDigits, b';' | b' ' | b'\t') => Extension,
                (SizeDigits | Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err("bare LF in a chunk extension"),
                (Extension, _) => Extension,
                (SizeLf, b'\n') if self.left == 0 => TrailerStart,
                (SizeLf, b'\n') => Data,
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Size,
                (DataCr | DataLf, _) => return Err("chunk data longer than its size"),
                (TrailerStart, b'\r') => EndLf,
                (TrailerStart | Trailer, b'\n') => return Err("bare LF in a trailer"),
                (Trailer, b'\r') => TrailerLf,
                (TrailerStart | Trailer, _) => Trailer,
                (TrailerLf, b'\n') => TrailerStart,
                (EndLf, b'\n') => {
                    self.state = Done;
                    return Ok((i + 1, true));
                }
                (Done, _) => return Ok((i, true)),
                (Size | SizeDigits | SizeLf | TrailerLf | EndLf, _) => {
                    return Err("bad chunk framing");
                }
            };
            let trailer = |s| matches!(s, TrailerStart | Trailer | TrailerLf);
            if let Some(t) = &mut self.trailers
                && trailer(before)
                && trailer(self.state)
            {
                t.push(b);
            }
        }
        Ok((data.len(), self.state == Done))
    }
}

/// A body on its way: how it is framed and how much of it is left.
struct Body {
    framing: Framing,
    /// Bytes left, for a length.
    left: u64,
    chunks: Chunks,
    /// What the body carried so far (without a chunked body's framing): what is counted.
    payload: u64,
}

impl Body {
    fn new(framing: Framing) -> Self {
        let left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        Self {
            framing,
            left,
            chunks: Chunks::default(),
            payload: 0,
        }
    }

    /// How much of `data` belongs to the body, whether the body ends within it, and the
    /// payload bytes among them.
    fn take(&mut self, data: &[u8]) -> io::Result<(usize, bool, u64)> {
        let (n, done) = match self.framing {
            Framing::None => (0, true),
            Framing::Length(_) => {
                let n = self.left.min(data.len() as u64) as usize;
                self.left -= n as u64;
                (n, self.left == 0)
            }
            Framing::Chunked => match self.chunks.scan(data) {
                Ok(Some(n)) => (n, true),
                Ok(None) => (data.len(), false),
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            },
            Framing::Close => (data.len(), false),
        };
        let payload = match self.framing {
            Framing::Chunked => self.chunks.data - self.payload,
            _ => n as u64,
        };
        self.payload += payload;
        Ok((n, done, payload))
    }

    /// Copies the rest of the body from `from` to `to`, beginning with the bytes of it
    /// already in `buf` (which keeps what follows the body), its payload counted as it
    /// passes: `Ok(false)` when the payload in all would exceed `limit`. A failure says which
    /// side failed: the one it came from (`From`: cut short, badly framed, or nothing more
    /// within `idle`: `TimedOut`) or the one it went to (`To`: gone, or a write not taken
    /// within `idle`: `TimedOut`).
    async fn pass<R, W>(
        &mut self,
        from: &mut R,
        to: &mut W,
        buf: &mut Vec<u8>,
        count: &Counter,
        limit: u64,
        idle: std::time::Duration,
    ) -> Result<bool, Side>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if !buf.is_empty() || self.framing == Framing::None {
                let (n, done, payload) = self.take(buf).map_err(Side::From)?;
                if self.payload > limit {
                    return Ok(false);
                }
                within(idle, to.write_all(&buf[..n]))
                    .await
                    .map_err(Side::To)?;
                count.inc_by(payload);
                buf.drain(..n);
                if done {
                    return Ok(true);
                }
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(16384);
            }
            let read = tokio::time::timeout(idle, from.read_buf(buf)).await;
            let read = read.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
            if read.map_err(Side::From)? == 0 {
                return match self.framing {
                    Framing::Close => Ok(true),
                    _ => Err(Side::From(io::ErrorKind::UnexpectedEof.into())),
                };
            }
        }
    }
}

/// Which side of a copy failed.
#[derive(Debug)]
enum Side {
    From(io::Error),
    To(io::Error),
}

/// Serves HTTP/1.1 requests on `io` until the client closes, a stop (the end of the grace
/// period cuts it), or a request that is hyper's to serve. With `linger`, a connection that
/// has been answered and stays idle that long is handed back ([`Ended::Idle`]) to be parked
/// (`park`).
///
/// Between requests a connection holds only this function's small state: the stream, the
/// wait for its next bytes (the head timeout, the stop). What a request needs (its head's
/// parse, the backend exchange, the answers) is [`busy`]'s, boxed and freed when the
/// connection goes idle again. (Over TLS readiness cannot be told apart from what rustls holds
/// decrypted, so an idle TLS connection waits inside `busy`.)
pub async fn serve<S: Stream>(
    s: &Serving,
    io: S,
    info: &ConnInfo,
    linger: Option<std::time::Duration>,
) -> Ended<S> {
    // One that comes back from the parking was answered before, and kept alive.
    let no_delay = info.asked.load(Ordering::Relaxed);
    let mut conn = Conn {
        io,
        buf: Vec::new(),
        no_delay,
    };
    // The head, within the head timeout (also how long an idle connection stays open).
    let mut deadline = tokio::time::Instant::now() + s.limits.head_timeout;
    // A new client has most often sent its request by the time it is accepted (and a parked
    // one has when it is woken): read it at once, as HAProxy does, rather than wait a round
    // of the reactor to be told.
    let mut fresh = true;
    loop {
        if std::mem::take(&mut fresh) {
            match conn.read_now() {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => break,
            }
        } else {
            // After a request, a stop closes a connection waiting for its next; one that has
            // not asked yet gets its first request answered (it was accepted before the stop).
            // The grace period's end cuts every connection and comes after the stop: one wait
            // for whichever applies.
            let asked = info.asked.load(Ordering::Relaxed);
            let end = if asked { &s.stop } else { &s.state.cut };
            let until = match linger {
                Some(linger) if asked => deadline.min(tokio::time::Instant::now() + linger),
                _ => deadline,
            };
            let waited = tokio::select! {
                r = tokio::time::timeout_at(until, conn.io.ready()) => r,
                () = end.cancelled() => break,
            };
            match waited {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_) if until < deadline => return Ended::Idle(conn.io, deadline),
                Err(_) => {
                    s.state.metrics.head_timeouts.inc();
                    break;
                }
            }
            // What the wait saw (readiness can be left from a read that emptied the socket:
            // then nothing, and the wait again, now for real).
            match conn.read_ready() {
                Some(Ok(0)) => break,
                Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Some(Err(_)) => break,
                Some(Ok(_)) | None => {}
            }
        }
        let turn = tokio::select! {
            t = Box::pin(busy(s, &mut conn, info, deadline)) => t,
            () = s.state.cut.cancelled() => return Ended::Closed,
        };
        match turn {
            Turn::Idle => deadline = tokio::time::Instant::now() + s.limits.head_timeout,
            Turn::Close => break,
            Turn::Hyper => return Ended::Hyper(conn.io, conn.buf),
        }
    }
    if !s.state.cut.is_cancelled() {
        conn.io.finish().await;
    }
    Ended::Closed
}

/// A client connection between requests.
struct Conn<S> {
    io: S,
    /// What was read of the next request (pipelined, or a head in parts): none while idle.
    buf: Vec<u8>,
    /// `TCP_NODELAY` is on.
    no_delay: bool,
}

impl<S: Stream> Conn<S> {
    /// Reads what a new client sent already (`WouldBlock`: nothing yet; the buffer is then
    /// released).
    fn read_now(&mut self) -> io::Result<usize> {
        self.buf.resize(4096, 0);
        let now = self.io.read_now(&mut self.buf);
        self.buf.truncate(*now.as_ref().unwrap_or(&0));
        if self.buf.is_empty() {
            self.buf = Vec::new();
        }
        now
    }

    /// Reads what the wait for the next request saw (`None`: the stream cannot tell without
    /// waiting, [`busy`] reads; the buffer is released when nothing came).
    fn read_ready(&mut self) -> Option<io::Result<usize>> {
        let read = self.io.read_ready(&mut self.buf);
        if self.buf.is_empty() {
            self.buf = Vec::new();
        }
        read
    }
}

/// What a connection does after [`busy`].
enum Turn {
    /// Waits for its next request, nothing buffered.
    Idle,
    Close,
    /// The request in the buffer is hyper's.
    Hyper,
}

/// Serves the connection's requests while they come (pipelined ones one after the other),
/// the first head due by `deadline`.
async fn busy<S: Stream>(
    s: &Serving,
    conn: &mut Conn<S>,
    info: &ConnInfo,
    mut deadline: tokio::time::Instant,
) -> Turn {
    let (io, buf) = (&mut conn.io, &mut conn.buf);
    loop {
        let head = match tokio::time::timeout_at(deadline, read_head(s, io, buf, info)).await {
            Err(_) => {
                s.state.metrics.head_timeouts.inc();
                return Turn::Close;
            }
            Ok(Err(_)) => return Turn::Close,
            Ok(Ok(Parsed::Head(h))) => h,
            Ok(Ok(Parsed::Hyper)) => return Turn::Hyper,
            Ok(Ok(Parsed::Partial)) => {
                let text = "The request head is larger than this router takes.";
                refuse(s, io, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, text).await;
                return Turn::Close;
            }
            Ok(Ok(Parsed::Refused(status, text))) => {
                refuse(s, io, status, text).await;
                return Turn::Close;
            }
        };
        info.asked.store(true, Ordering::Relaxed);
        buf.drain(..head.len);
        // Boxed: the head timeout's timer and the head's parse are not kept for the time a
        // request takes.
        match Box::pin(request(s, io, buf, info, head)).await {
            Ok(true) => {}
            Ok(false) | Err(_) => return Turn::Close,
        }
        // Kept alive: from now on a response's last small segment must not wait for the
        // client's ACK of the one before (as nginx's `tcp_nodelay`). A connection that closes
        // after one response written at once never needs it: one system call less.
        if !std::mem::replace(&mut conn.no_delay, true) {
            io.no_delay();
        }
        if buf.is_empty() {
            // Nothing pipelined: the buffer goes while the connection waits.
            *buf = Vec::new();
            return Turn::Idle;
        }
        deadline = tokio::time::Instant::now() + s.limits.head_timeout;
    }
}

/// Reads until `buf` starts with a whole head (`Partial`: larger than the limit).
async fn read_head<S: Stream>(
    s: &Serving,
    io: &mut S,
    buf: &mut Vec<u8>,
    info: &ConnInfo,
) -> io::Result<Parsed> {
    loop {
        if !buf.is_empty() {
            match parse(buf, s.limits.max_headers, info) {
                Parsed::Partial if buf.len() >= s.limits.max_head_bytes => {
                    return Ok(Parsed::Partial);
                }
                Parsed::Partial => {}
                done => return Ok(done),
            }
        } else {
            io.ready().await?;
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        if io.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// The router's own answer to a head it refused (400, 431), counted under no route; the
/// connection closes after it.
async fn refuse<S: Stream>(s: &Serving, io: &mut S, status: StatusCode, text: &str) {
    let _ = write_own(s, io, status, text, &[], true, false).await;
    s.state.metrics.unknown.count(status);
}

/// Writes one of the router's own answers: a short plain page; the bytes of its body. A
/// client that does not take it within the body timeout is left ([`to_client`]).
async fn write_own<S: Stream>(
    s: &Serving,
    io: &mut S,
    status: StatusCode,
    text: &str,
    extra: &[(&str, &str)],
    close: bool,
    head_only: bool,
) -> io::Result<u64> {
    use std::fmt::Write;
    let reason = status.canonical_reason().unwrap_or("");
    let body = says::page(status, text);
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\ndate: {}\r\n",
        status.as_u16(),
        body.len(),
        httpdate::fmt_http_date(std::time::SystemTime::now()),
    );
    for (k, v) in extra {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    if close {
        out.push_str("connection: close\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&body);
    }
    to_client(s, io.write_all(out.as_bytes())).await?;
    to_client(s, io.flush()).await?;
    Ok(if head_only { 0 } else { body.len() as u64 })
}

/// Where a request's counts go: its route's counters (`None`: no route, the `unknown` ones).
struct Counted<'a> {
    s: &'a Serving,
    info: &'a ConnInfo,
    head: &'a Head,
    route: Option<&'a Route>,
    start: Instant,
}

impl Counted<'_> {
    fn counters(&self) -> &RouteCounters {
        self.route
            .map_or(&self.s.state.metrics.unknown, |r| &r.counters)
    }

    /// The status and the time to the response head.
    fn answered(&self, status: StatusCode) {
        self.counters().count(status);
        self.counters()
            .duration
            .observe(self.start.elapsed().as_secs_f64());
    }

    /// The access log's line, when the response has ended.
    fn log(&self, status: StatusCode, bytes: u64, backend: Option<SocketAddr>) {
        let Some(out) = &self.s.state.access_log else {
            return;
        };
        let head = self.head;
        out.entry(&Entry {
            client: self.info.client,
            method: head.method.as_str(),
            host: &head.host,
            path: head.target.split('?').next().unwrap_or("/"),
            version: Version::HTTP_11,
            status: status.as_u16(),
            bytes,
            start: self.start,
            backend,
            route: backend.and(self.route.map(|r| r.domain.as_str())),
        });
    }

    /// The router's own answer, counted and logged: whether the connection goes on (not
    /// when the request's body was left unread, nor at a stop).
    async fn own<S: Stream>(
        &self,
        io: &mut S,
        status: StatusCode,
        text: &str,
        extra: &[(&str, &str)],
    ) -> io::Result<bool> {
        let head = self.head;
        let keep = !head.close && head.body == Framing::None && !self.s.stop.is_cancelled();
        let head_only = head.method == Method::HEAD;
        let bytes = write_own(self.s, io, status, text, extra, !keep, head_only).await?;
        self.answered(status);
        self.log(status, bytes, None);
        Ok(keep)
    }
}

/// Serves one request whose head is `head` (its body, if any, starts `buf`): `Ok(true)` when
/// the connection can take the next one.
async fn request<S: Stream>(
    s: &Serving,
    io: &mut S,
    buf: &mut Vec<u8>,
    info: &ConnInfo,
    head: Head,
) -> io::Result<bool> {
    let state = &s.state;
    let route = state.table().lookup(&head.host).cloned();
    let c = Counted {
        s,
        info,
        head: &head,
        route: route.as_deref(),
        start: Instant::now(),
    };
    let Some(route) = &route else {
        let text = says::no_route(&head.host);
        return c.own(io, StatusCode::NOT_FOUND, &text, &[]).await;
    };
    if !info.tls && route.record.https_redirect {
        let location = https_location(state, &head.host, &head.target);
        let text = says::redirect(&location);
        let extra = [("location", location.as_str())];
        return c
            .own(io, StatusCode::PERMANENT_REDIRECT, &text, &extra)
            .await;
    }
    if let Framing::Length(n) = head.body
        && n > state.settings.max_body as u64
    {
        let text = says::too_large(state.settings.max_body);
        return c.own(io, StatusCode::PAYLOAD_TOO_LARGE, &text, &[]).await;
    }
    if route.backends.is_empty() {
        let text = says::no_instance(&route.service_port.service);
        let extra = [("retry-after", "1")];
        return c
            .own(io, StatusCode::SERVICE_UNAVAILABLE, &text, &extra)
            .await;
    }
    proxied(&c, io, buf, route).await
}

/// Why an attempt at a backend failed.
pub(crate) enum Failed {
    /// Nothing of the request left the router: another backend may take it, whatever it is.
    Unsent,
    /// Sent (or part of it), no answer: only a request without body that may be repeated
    /// goes again.
    Sent,
    /// The response timeout.
    Timeout,
    /// The client went away (or broke its body) while the router sent or waited.
    ClientGone,
    /// The client's body was larger than the limit.
    TooLarge,
    /// The client's body stopped coming for `--body-timeout`.
    BodyStalled,
}

/// Sends the request to a backend (another one after a failure, by the rules of
/// [`crate::proxy`]) and the response back.
async fn proxied<S: Stream>(
    c: &Counted<'_>,
    io: &mut S,
    buf: &mut Vec<u8>,
    route: &Route,
) -> io::Result<bool> {
    let (s, head) = (c.s, c.head);
    let state = &s.state;
    let counters = &route.counters;
    let settings = &state.settings;
    let retry_after_send = idempotent(&head.method) && head.body == Framing::None;
    let mut attempts = Attempts::new(route, &head.host, retry_after_send);
    let mut rbuf: Vec<u8> = Vec::new();
    let outcome = loop {
        let (i, backend) = match attempts.next() {
            Ok(b) => b,
            Err(status) => break Err(status),
        };
        let dial = pool::dial(backend.addr, settings.connect_timeout);
        let Some((mut conn, reused)) = attempts.connection(i, &state.pool.h1, dial).await else {
            continue;
        };
        let in_flight = InFlight::new(backend);
        rbuf.clear();
        match exchange(s, io, buf, &mut conn, &mut rbuf, head, counters).await {
            Ok(resp) => {
                backend.connections.fetch_add(1, Ordering::Relaxed);
                break Ok((resp, conn, in_flight));
            }
            Err(Failed::Unsent) => attempts.unsent(i, reused),
            Err(Failed::Sent) => {
                debug!(backend = %backend.addr, domain = %head.host, "request failed");
                if !attempts.sent_failed(i) {
                    break Err(attempts.last_error);
                }
            }
            Err(Failed::Timeout) => {
                counters.timeouts.inc();
                break Err(StatusCode::GATEWAY_TIMEOUT);
            }
            Err(Failed::ClientGone) => return Ok(false),
            Err(Failed::TooLarge) => {
                let text = says::too_large(settings.max_body);
                c.own(io, StatusCode::PAYLOAD_TOO_LARGE, &text, &[]).await?;
                return Ok(false);
            }
            Err(Failed::BodyStalled) => {
                state.metrics.body_timeouts.inc();
                let text = says::body_stalled(settings.body_timeout);
                c.own(io, StatusCode::REQUEST_TIMEOUT, &text, &[]).await?;
                return Ok(false);
            }
        }
    };
    let (resp, mut conn, in_flight) = match outcome {
        Ok(r) => r,
        Err(status) => {
            return c.own(io, status, says::failed(status), &[]).await;
        }
    };
    let backend = in_flight.0.addr;
    c.answered(resp.status);
    let keep = !head.close && !s.stop.is_cancelled() && resp.body != Framing::Close;
    let mut out = resp.out;
    if !keep {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    // The head, with as much of the body as came with it, in one write.
    rbuf.drain(..resp.len);
    let mut body = Body::new(resp.body);
    let (n, done, payload) = match body.take(&rbuf) {
        Ok(t) => t,
        Err(e) => {
            counters.response_errors.inc();
            return Err(e);
        }
    };
    out.extend_from_slice(&rbuf[..n]);
    to_client(s, io.write_all(&out)).await?;
    counters.bytes_out.inc_by(payload);
    rbuf.drain(..n);
    let idle = settings.body_timeout;
    let complete = done
        || {
            // The rest as it comes, counted as it passes; the last piece not held back for the
            // client's ACK.
            io.no_delay();
            match body
                .pass(
                    &mut conn,
                    io,
                    &mut rbuf,
                    &counters.bytes_out,
                    u64::MAX,
                    idle,
                )
                .await
            {
                Ok(_) => true,
                Err(Side::From(e)) => {
                    debug!(%backend, domain = %head.host, error = %e, "response failed");
                    if e.kind() == io::ErrorKind::TimedOut {
                        state.metrics.body_timeouts.inc();
                    }
                    counters.response_errors.inc();
                    false
                }
                // The client went away during the response (or stopped taking it): not the
                // backend's failure.
                Err(Side::To(e)) => {
                    debug!(%backend, domain = %head.host, error = %e, "client left during the response");
                    stalled(s, e);
                    false
                }
            }
        };
    to_client(s, io.flush()).await?;
    if complete && resp.keep && rbuf.is_empty() {
        state.pool.h1.checkin(backend, conn);
    }
    drop(in_flight);
    c.log(resp.status, body.payload, Some(backend));
    Ok(complete && keep)
}

/// One attempt: the head and body to `conn`, then the response head (1xx heads passed to the
/// client on the way), within the response timeout.
async fn exchange<S: Stream>(
    s: &Serving,
    io: &mut S,
    buf: &mut Vec<u8>,
    conn: &mut TcpStream,
    rbuf: &mut Vec<u8>,
    head: &Head,
    counters: &RouteCounters,
) -> Result<Response, Failed> {
    if head.body == Framing::None {
        conn.write_all(&head.out)
            .await
            .map_err(|_| Failed::Unsent)?;
    } else {
        // The head and what of the body came with it, in one write; the rest as it comes.
        let mut body = Body::new(head.body);
        let (n, done, payload) = body.take(buf).map_err(|_| Failed::ClientGone)?;
        let limit = s.state.settings.max_body as u64;
        if body.payload > limit {
            return Err(Failed::TooLarge);
        }
        let mut first = Vec::with_capacity(head.out.len() + n);
        first.extend_from_slice(&head.out);
        first.extend_from_slice(&buf[..n]);
        conn.write_all(&first).await.map_err(|_| Failed::Unsent)?;
        counters.bytes_in.inc_by(payload);
        buf.drain(..n);
        if !done {
            let idle = s.state.settings.body_timeout;
            match body
                .pass(io, conn, buf, &counters.bytes_in, limit, idle)
                .await
            {
                Ok(true) => {}
                Ok(false) => return Err(Failed::TooLarge),
                Err(Side::From(e)) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(Failed::BodyStalled);
                }
                Err(Side::From(_)) => return Err(Failed::ClientGone),
                // The backend closed while the body went to it (it may have answered early):
                // the body is spent, so no other backend can have it.
                Err(Side::To(_)) => return Err(Failed::Sent),
            }
        }
    }
    let deadline = tokio::time::Instant::now() + s.state.settings.response_timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, response_head(conn, rbuf, &head.method));
        let resp = tokio::select! {
            r = next => r.map_err(|_| Failed::Timeout)??,
            () = client_gone(s, io, buf) => return Err(Failed::ClientGone),
        };
        if !resp.status.is_informational() {
            return Ok(resp);
        }
        // 100 Continue, 103 Early Hints: the client's to see.
        let mut out = resp.out;
        out.extend_from_slice(b"\r\n");
        let written = to_client(s, io.write_all(&out)).await;
        written.map_err(|_| Failed::ClientGone)?;
        rbuf.drain(..resp.len);
    }
}

/// Reads the backend's next response head.
pub(crate) async fn response_head<O: Fields>(
    conn: &mut TcpStream,
    rbuf: &mut Vec<u8>,
    method: &Method,
) -> Result<Response<O>, Failed> {
    loop {
        if !rbuf.is_empty() {
            match parse_response(rbuf, method) {
                Ok(Some(r)) if r.status == StatusCode::SWITCHING_PROTOCOLS => {
                    return Err(Failed::Sent);
                }
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(e) => {
                    debug!(error = e, "bad response head");
                    return Err(Failed::Sent);
                }
            }
        }
        if rbuf.capacity() - rbuf.len() < 2048 {
            rbuf.reserve(16384);
        }
        match conn.read_buf(rbuf).await {
            Ok(0) | Err(_) => return Err(Failed::Sent),
            Ok(_) => {}
        }
    }
}

/// A write to the client (or its flush), within the body timeout; one that timed out counted.
async fn to_client<T>(s: &Serving, write: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    let idle = s.state.settings.body_timeout;
    within(idle, write).await.map_err(|e| stalled(s, e))
}

/// Counts a write to a client that timed out (`--body-timeout`); the error.
fn stalled(s: &Serving, e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::TimedOut {
        s.state.metrics.body_timeouts.inc();
    }
    e
}

/// Returns when the client closes its connection (its request then leaves the backend's
/// count at once). What it sends meanwhile is its next request: kept in `buf`, up to a head's
/// worth.
async fn client_gone<S: Stream>(s: &Serving, io: &mut S, buf: &mut Vec<u8>) {
    if !io.watched() {
        // Not before a backend that answers at once has answered: the watch would put the
        // socket in the reactor, two system calls, for a client that closes after one answer.
        tokio::time::sleep(WATCH_GONE_AFTER).await;
    }
    loop {
        if buf.len() > s.limits.max_head_bytes || io.ready().await.is_err() {
            return std::future::pending().await;
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        match io.read_buf(buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunked_body_ends_where_its_last_chunk_and_trailers_end() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\nGET /next";
        // Whole, and a byte at a time.
        let mut c = Chunks::default();
        assert_eq!(c.scan(body), Ok(Some(body.len() - 9)));
        let mut c = Chunks::default();
        let mut end = None;
        for (i, b) in body.iter().enumerate() {
            if let Some(n) = c.scan(std::slice::from_ref(b)).unwrap() {
                end = Some(i + n);
                break;
            }
        }
        assert_eq!(end, Some(body.len() - 9));
        assert_eq!(Chunks::default().scan(b"0\r\n\r\n"), Ok(Some(5)));
        assert!(Chunks::default().scan(b"zz\r\n").is_err());
        assert!(Chunks::default().scan(b"2\r\nabc\r\n").is_err());
        // Bare LFs, a missing size, an extension without a size: refused.
        for bad in [
            &b"2\nab\r\n"[..],
            b"2\r\nab\n",
            b"0\r\nX: 1\n\r\n",
            b"0\r\n\n",
            b";x\r\n",
        ] {
            assert!(
                Chunks::default().scan(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(Chunks::default().scan(b"10\r\n0123456789"), Ok(None));

        // Decoded: the data between the framing, and the trailers kept.
        let mut c = Chunks::keeping_trailers();
        let (mut at, mut data) = (0, Vec::new());
        loop {
            let (n, done) = c.framing(&body[at..]).unwrap();
            at += n;
            if done {
                break;
            }
            let take = c.data_left() as usize;
            data.extend_from_slice(&body[at..at + take]);
            c.take_data(take as u64);
            at += take;
        }
        assert_eq!((at, &data[..]), (body.len() - 9, &b"hello world"[..]));
        assert_eq!(c.trailers.as_deref(), Some(&b"X-T: 1\r\n"[..]));
    }
}
