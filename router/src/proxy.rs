//! One request through hyper (HTTP/2, and what [`crate::h1`] hands over: HTTP/1.0, `Expect`,
//! `Upgrade`): find the route by host, choose a backend, send the request over a pooled
//! connection (a plain one, [`crate::plain`], when the request has no body and is no
//! upgrade; hyper's client otherwise), and stream the response back; or answer itself (404
//! no route, 503 no live backend, 502 backend failed, 504 backend too slow, 308 to HTTPS, 413
//! body too large).
//! `h1` keeps the same rules (`Attempts` is both paths' retry logic).
//!
//! Retries: a request that could not be sent (connect failed, or a pooled connection the
//! backend had closed) goes to another backend, whatever its method: nothing of it left the
//! router. An idempotent request without a body (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) that
//! failed after it was sent but before any response byte is sent once more, to another
//! backend. Nothing else is retried: a POST whose backend died gets a 502.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use tracing::debug;

use crate::h1;
use crate::metrics::RouteCounters;
use crate::pool::{self, Conn};
use crate::state::State;
use crate::table::{Route, request_host};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// What the router sends to a backend.
pub type ReqBody = UnsyncBoxBody<Bytes, BoxError>;
/// What the router sends to a client.
pub type RespBody = http_body_util::Either<Full<Bytes>, Tracked>;

/// An upgraded connection's two ends joined (a WebSocket), to run to its end.
pub type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What the accept loop knows of a client connection, with the forwarding values made once
/// for all its requests, and what its requests tell the connection's task.
pub struct ConnInfo {
    /// The client: the peer, or the address a trusted PROXY header gave.
    pub client: SocketAddr,
    /// It came over TLS (the `--https` listener).
    pub tls: bool,
    /// The client's address as `X-Forwarded-For` writes it.
    pub(crate) client_ip: HeaderValue,
    /// `for=<client>;proto=<proto>` of `Forwarded`.
    pub(crate) forwarded_for: String,
    /// A request has come on this connection (a stop waits for the first: `server`).
    pub asked: AtomicBool,
    /// The tunnel of an upgraded connection, which the connection's task runs once hyper has
    /// handed the connection over: a WebSocket keeps the connection's permit
    /// (`--max-connections`), its place in the drain and in `connections_active`.
    pub tunnel: std::sync::Mutex<Option<Tunnel>>,
}

impl ConnInfo {
    pub fn new(client: SocketAddr, tls: bool) -> Self {
        let ip = client.ip().to_string();
        let node = match client.ip() {
            std::net::IpAddr::V4(_) => ip.clone(),
            std::net::IpAddr::V6(a) => format!("\"[{a}]\""),
        };
        let proto = if tls { "https" } else { "http" };
        Self {
            client,
            tls,
            client_ip: HeaderValue::from_str(&ip).unwrap_or(HeaderValue::from_static("unknown")),
            forwarded_for: format!("for={node};proto={proto}"),
            asked: AtomicBool::new(false),
            tunnel: std::sync::Mutex::new(None),
        }
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that belong to one hop (RFC 9110 7.6.1), never forwarded (both paths).
pub(crate) const HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers (and those `Connection` names); keeps `Upgrade` and
/// `Connection: upgrade` when `upgrade` is set.
fn strip_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && *n == header::UPGRADE))
        .collect();
    let upgrade_value = headers.get(header::UPGRADE).cloned();
    for h in HOP {
        headers.remove(h);
    }
    for h in &named {
        headers.remove(h);
    }
    if upgrade && let Some(v) = upgrade_value {
        headers.insert(header::UPGRADE, v);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// A request asks to switch protocols (WebSocket): `Connection: upgrade` and `Upgrade`.
fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

pub(crate) fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// What the router's own answers say, the same on both paths (this module's and `h1`'s).
pub(crate) mod says {
    use http::StatusCode;

    pub const NO_HOST: &str = "The request names no host (Host header or authority).";

    pub fn no_route(host: &str) -> String {
        format!("No site is served for {host} here.")
    }

    pub fn no_instance(service: &impl std::fmt::Display) -> String {
        format!("No instance of {service} is running right now.")
    }

    pub fn too_large(max: usize) -> String {
        format!("The request body is larger than this router takes ({max} bytes).")
    }

    pub fn body_stalled(limit: std::time::Duration) -> String {
        format!(
            "The request body stopped coming for {} s (--body-timeout).",
            limit.as_secs()
        )
    }

    pub fn redirect(location: &str) -> String {
        format!("This site is served over HTTPS: {location}")
    }

    /// No backend answered: 504 when the last one was too slow, else 502.
    pub fn failed(status: StatusCode) -> &'static str {
        match status {
            StatusCode::GATEWAY_TIMEOUT => "The site did not answer in time.",
            _ => "The site failed to answer.",
        }
    }

    /// The page of an answer: its status, then `text`.
    pub fn page(status: StatusCode, text: &str) -> String {
        let reason = status.canonical_reason().unwrap_or("");
        format!("{} {reason}\n{text}\n", status.as_u16())
    }
}

/// Where a 308 sends a request for `host` (`path_and_query` in origin form).
pub(crate) fn https_location(state: &State, host: &str, path_and_query: &str) -> String {
    match state.settings.https_port {
        443 | 0 => format!("https://{host}{path_and_query}"),
        p => format!("https://{host}:{p}{path_and_query}"),
    }
}

/// One of the router's own answers: a short plain page.
fn answer(status: StatusCode, text: &str) -> Response<RespBody> {
    let page = says::page(status, text);
    let mut resp = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(page))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The request as it goes to a backend: origin-form target, HTTP/1.1, hop-by-hop headers
/// removed, `Host` kept (set from the authority for HTTP/2), forwarding headers added.
struct Outgoing {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Outgoing {
    /// Takes the request's headers (nothing after this reads them from the request).
    fn new(req: &mut Request<Incoming>, host: &str, info: &ConnInfo, upgrade: bool) -> Self {
        let mut headers = std::mem::take(req.headers_mut());
        strip_hop(&mut headers, upgrade);
        if let Some(v) = joined_cookies(&headers).and_then(|c| HeaderValue::from_bytes(&c).ok()) {
            headers.insert(header::COOKIE, v);
        }
        if !headers.contains_key(header::HOST) {
            let authority = req.uri().authority().map(|a| a.as_str()).unwrap_or(host);
            if let Ok(v) = HeaderValue::from_str(authority) {
                headers.insert(header::HOST, v);
            }
        }
        let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prior) => HeaderValue::from_str(&format!("{prior}, {}", info.client.ip()))
                .unwrap_or_else(|_| info.client_ip.clone()),
            None => info.client_ip.clone(),
        };
        headers.insert(X_FORWARDED_FOR, xff);
        headers.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if info.tls { "https" } else { "http" }),
        );
        let original_host = headers.get(header::HOST).cloned();
        let host_text = original_host
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or(host);
        let forwarded = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
            Some(prior) => format!("{prior}, {};host=\"{host_text}\"", info.forwarded_for),
            None => format!("{};host=\"{host_text}\"", info.forwarded_for),
        };
        if let Ok(v) = HeaderValue::from_str(&forwarded) {
            headers.insert(header::FORWARDED, v);
        }
        if let Some(h) = original_host {
            headers.insert(X_FORWARDED_HOST, h);
        }
        let uri = req
            .uri()
            .path_and_query()
            .map(|pq| Uri::from(pq.clone()))
            .unwrap_or_else(|| Uri::from_static("/"));
        Self {
            method: req.method().clone(),
            uri,
            headers,
        }
    }

    /// The request, its headers moved (a request that did not leave hands them back).
    fn request(&mut self, body: ReqBody) -> Request<ReqBody> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = Version::HTTP_11;
        *r.headers_mut() = std::mem::take(&mut self.headers);
        r
    }
}

fn empty() -> ReqBody {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Handles one request; never fails (every failure is an answer).
pub async fn handle(
    state: Arc<State>,
    info: Arc<ConnInfo>,
    mut req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let start = Instant::now();
    let Some(host) = request_host(&req) else {
        let resp = answer(StatusCode::BAD_REQUEST, says::NO_HOST);
        state.metrics.unknown.count(resp.status());
        return Ok(resp);
    };
    let table = state.table();
    let Some(route) = table.lookup(&host).cloned() else {
        let resp = answer(StatusCode::NOT_FOUND, &says::no_route(&host));
        finish_own(
            &state,
            &state.metrics.unknown,
            asked(&req),
            &host,
            &info,
            &resp,
            start,
        );
        return Ok(resp);
    };
    drop(table);
    let counters = &route.counters;
    if !info.tls && route.record.https_redirect {
        let resp = redirect(&state, &req, &host);
        finish_own(&state, counters, asked(&req), &host, &info, &resp, start);
        return Ok(resp);
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.settings.max_body as u64) {
        let text = says::too_large(state.settings.max_body);
        let resp = answer(StatusCode::PAYLOAD_TOO_LARGE, &text);
        finish_own(&state, counters, asked(&req), &host, &info, &resp, start);
        return Ok(resp);
    }
    if route.backends.is_empty() {
        let text = says::no_instance(&route.service_port.service);
        let mut resp = answer(StatusCode::SERVICE_UNAVAILABLE, &text);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        finish_own(&state, counters, asked(&req), &host, &info, &resp, start);
        return Ok(resp);
    }
    let upgrade = wants_upgrade(&req);
    let no_body = req.body().is_end_stream();
    if no_body && !upgrade {
        return Ok(plain(&state, &info, &route, &req, host, start).await);
    }
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let mut out = Outgoing::new(&mut req, &host, &info, upgrade);
    let method = req.method().clone();
    // The URI's parts are shared bytes: a clone copies no text.
    let uri = req.uri().clone();
    let version = req.version();
    let mut body: Option<ReqBody> = Some(if no_body {
        empty()
    } else {
        let sent = counters.bytes_in.clone();
        Limited::new(req.into_body(), state.settings.max_body)
            .map_frame(move |frame| {
                if let Some(data) = frame.data_ref() {
                    sent.inc_by(data.len() as u64);
                }
                frame
            })
            .boxed_unsync()
    });
    // A request here has a body or asks for an upgrade (one without either took `plain`): it
    // goes again only if it never left the router.
    let mut attempts = Attempts::new(&route, &host, false);
    let result = loop {
        let (i, backend) = match attempts.next() {
            Ok(b) => b,
            Err(status) => break Err(status),
        };
        let dial = async {
            let c = pool::connect(backend.addr, state.settings.connect_timeout).await;
            c.map(|c| c.sender)
        };
        let Some((sender, reused)) = attempts.connection(i, &state.pool.hyper, dial).await else {
            continue;
        };
        let mut conn = Conn {
            addr: backend.addr,
            sender,
            reused,
        };
        let Some(b) = body.take() else {
            break Err(attempts.last_error);
        };
        let request = out.request(b);
        let in_flight = InFlight::new(backend);
        let sent = tokio::time::timeout(
            state.settings.response_timeout,
            conn.sender.try_send_request(request),
        )
        .await;
        match sent {
            Ok(Ok(resp)) => {
                backend.connections.fetch_add(1, Ordering::Relaxed);
                break Ok((resp, conn, in_flight));
            }
            Ok(Err(mut e)) => {
                drop(in_flight);
                if let Some(r) = e.take_message() {
                    // Never left the router: a pooled connection the backend had closed.
                    let (parts, b) = r.into_parts();
                    out.headers = parts.headers;
                    body = Some(b);
                    attempts.unsent(i, conn.reused);
                    continue;
                }
                debug!(backend = %backend.addr, domain = %host, error = %e.error(), "request failed");
                let again = attempts.sent_failed(i);
                debug_assert!(!again, "sent twice");
                break Err(attempts.last_error);
            }
            Err(_) => {
                drop(in_flight);
                counters.timeouts.inc();
                break Err(StatusCode::GATEWAY_TIMEOUT);
            }
        }
    };
    let (mut resp, conn, in_flight) = match result {
        Ok(r) => r,
        Err(status) => {
            let resp = answer(status, says::failed(status));
            let asked = Asked {
                method: &method,
                path: uri.path(),
                version,
            };
            finish_own(&state, counters, asked, &host, &info, &resp, start);
            return Ok(resp);
        }
    };
    let backend_addr = in_flight.0.addr;
    let status = resp.status();
    counters.count(status);
    counters.duration.observe(start.elapsed().as_secs_f64());
    if status == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client) = client_upgrade
    {
        let server = hyper::upgrade::on(&mut resp);
        let addr = backend_addr;
        let (up, down) = (counters.bytes_in.clone(), counters.bytes_out.clone());
        // Run by the client connection's task, after hyper hands the connection over; the
        // end of the grace period cuts it, and so does a quiet of --tunnel-timeout.
        let (cut, idle) = (state.cut.clone(), state.settings.tunnel_timeout);
        let timeouts = state.metrics.tunnel_timeouts.clone();
        let tunnel = async move {
            match tokio::try_join!(client, server) {
                Ok((c, s)) => {
                    // The bytes each way count as request and response bytes, as they pass,
                    // and keep the tunnel open.
                    let traffic = Arc::new(crate::quiet::Streams::default());
                    let count = |n: Counter| {
                        let traffic = traffic.clone();
                        move |b: &[u8]| {
                            n.inc_by(b.len() as u64);
                            traffic.stir();
                        }
                    };
                    let c = hyper_util::rt::TokioIo::new(c);
                    let s = hyper_util::rt::TokioIo::new(s);
                    let mut c = tokio_util::io::InspectReader::new(c, count(up));
                    let mut s = tokio_util::io::InspectReader::new(s, count(down));
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut c, &mut s) => {}
                        () = crate::quiet::quiet(&traffic, idle) => {
                            timeouts.inc();
                        }
                        () = cut.cancelled() => {}
                    }
                }
                Err(e) => debug!(backend = %addr, error = %e, "upgrade failed"),
            }
            drop(in_flight);
        };
        *info.tunnel.lock().expect("tunnel lock") = Some(Box::pin(tunnel));
        let (parts, _) = resp.into_parts();
        let empty = http_body_util::Either::Left(Full::new(Bytes::new()));
        return Ok(Response::from_parts(parts, empty));
    }
    strip_hop(resp.headers_mut(), false);
    // The client's version, not the backend's (an HTTP/1.0 backend must not downgrade it).
    *resp.version_mut() = version;
    let (parts, incoming) = resp.into_parts();
    let log = state.access_log.as_ref().map(|_| LogLine {
        client: info.client,
        method,
        host,
        uri,
        version,
        status,
        start,
        backend: backend_addr,
    });
    let body = Tracked {
        inner: Source::Hyper(incoming, Some(conn)),
        state: Arc::clone(&state),
        route: Arc::clone(&route),
        _in_flight: in_flight,
        bytes: 0,
        log,
    };
    Ok(Response::from_parts(
        parts,
        http_body_util::Either::Right(body),
    ))
}

/// A request without body and no upgrade, over a plain backend connection ([`crate::plain`]).
async fn plain(
    state: &Arc<State>,
    info: &ConnInfo,
    route: &Arc<Route>,
    req: &Request<Incoming>,
    host: String,
    start: Instant,
) -> Response<RespBody> {
    let counters = &route.counters;
    let head = plain_head(req, &host, info);
    let answer = match crate::plain::exchange(state, route, &host, &head, req.method()).await {
        Ok(a) => a,
        Err(status) => {
            let resp = answer(status, says::failed(status));
            finish_own(state, counters, asked(req), &host, info, &resp, start);
            return resp;
        }
    };
    let version = req.version();
    let crate::plain::Answer {
        mut head,
        conn,
        in_flight,
        read,
    } = answer;
    counters.count(head.status);
    counters.duration.observe(start.elapsed().as_secs_f64());
    let backend = in_flight.0.addr;
    let body = crate::plain::Body::new(&head, conn, read, backend, state.settings.body_timeout);
    let mut resp = Response::new(http_body_util::Either::Right(Tracked {
        inner: Source::Plain(body),
        state: Arc::clone(state),
        route: Arc::clone(route),
        _in_flight: in_flight,
        bytes: 0,
        log: state.access_log.as_ref().map(|_| LogLine {
            client: info.client,
            method: req.method().clone(),
            host,
            uri: req.uri().clone(),
            version,
            status: head.status,
            start,
            backend,
        }),
    }));
    *resp.status_mut() = head.status;
    *resp.version_mut() = version;
    *resp.headers_mut() = std::mem::take(&mut head.out);
    resp
}

/// HTTP/2 may split `Cookie` into one field per pair; HTTP/1.1 gets them joined in one (RFC
/// 9113 8.2.3): the joined value, when there was more than one.
fn joined_cookies(fields: &HeaderMap) -> Option<Vec<u8>> {
    let cookies = fields.get_all(header::COOKIE);
    (cookies.iter().count() > 1).then(|| {
        let pairs: Vec<&[u8]> = cookies.iter().map(HeaderValue::as_bytes).collect();
        pairs.join(&b"; "[..])
    })
}

/// The HTTP/1.1 head of a request hyper read, for a backend (the same as `h1` writes).
fn plain_head(req: &Request<Incoming>, host: &str, info: &ConnInfo) -> Vec<u8> {
    let fields = req.headers();
    let named: Vec<&str> = fields
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| h1::tokens(v.as_bytes()))
        .filter(|t| !h1::framing_field(t))
        .collect();
    let host_field = fields.get(header::HOST).map(HeaderValue::as_bytes);
    let authority = req.uri().authority().map_or(host, |a| a.as_str());
    let first = |name| fields.get(name).map(HeaderValue::as_bytes);
    let forward = h1::Forward {
        method: req.method().as_str(),
        target: req.uri().path_and_query().map_or("/", |pq| pq.as_str()),
        host: host_field.unwrap_or(authority.as_bytes()),
        host_missing: host_field.is_none(),
        xff: first(X_FORWARDED_FOR),
        forwarded: first(header::FORWARDED),
        named: &named,
        chunked: false,
    };
    let joined = joined_cookies(fields);
    let split = joined.is_some();
    let fields = fields
        .iter()
        .filter(|(n, _)| !(split && *n == header::COOKIE))
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .chain(joined.as_deref().map(|c| ("cookie", c)));
    h1::backend_head(&forward, fields, info, 512)
}

/// The retry rules of both paths (this module's and `h1`'s; see the module's head): which
/// backend next, what each failure allows, and the status to answer when none is left.
pub(crate) struct Attempts<'r> {
    route: &'r Route,
    host: &'r str,
    tried: Vec<usize>,
    retry_after_send: bool,
    resent: bool,
    /// What to answer when no backend is left: 502, or 504 after a connect timed out.
    pub last_error: StatusCode,
    rng: fastrand::Rng,
    /// Each backend at most twice (a stale pooled connection, then a new one).
    left: usize,
    first: bool,
}

impl<'r> Attempts<'r> {
    /// `retry_after_send`: the request may go again after it was sent (idempotent, no body).
    pub(crate) fn new(route: &'r Route, host: &'r str, retry_after_send: bool) -> Self {
        Self {
            route,
            host,
            tried: Vec::new(),
            retry_after_send,
            resent: false,
            last_error: StatusCode::BAD_GATEWAY,
            rng: fastrand::Rng::new(),
            left: route.backends.len() * 2 + 1,
            first: true,
        }
    }

    /// The next backend to try (each after the first counted as a retry), or the status to
    /// answer.
    pub(crate) fn next(
        &mut self,
    ) -> Result<(usize, &'r Arc<ambassador::routes::Backend>), StatusCode> {
        if self.left == 0 {
            return Err(self.last_error);
        }
        self.left -= 1;
        if !std::mem::take(&mut self.first) {
            self.route.counters.retries.inc();
        }
        let backends = &self.route.backends;
        let now = Instant::now();
        match ambassador::routes::pick(backends, &self.tried, None, now, &mut self.rng) {
            Some(i) => Ok((i, &backends[i])),
            None => Err(self.last_error),
        }
    }

    /// A pooled connection to backend `i`, or a new one from `dial` (`true`: pooled). A failed
    /// connect is counted and ejects the backend, as the ambassador does; `None` then.
    pub(crate) async fn connection<T: pool::Pooled>(
        &mut self,
        i: usize,
        pool: &pool::Pool<T>,
        dial: impl Future<Output = Result<T, pool::ConnectError>>,
    ) -> Option<(T, bool)> {
        let backend = &self.route.backends[i];
        if let Some(conn) = pool.checkout(backend.addr) {
            return Some((conn, true));
        }
        match dial.await {
            Ok(conn) => {
                backend.connected();
                Some((conn, false))
            }
            Err(e) => {
                debug!(backend = %backend.addr, domain = %self.host, error = %e, "connect failed");
                self.route.counters.connect_errors.inc();
                backend.failed(Instant::now());
                self.tried.push(i);
                self.last_error = if matches!(e, pool::ConnectError::Timeout) {
                    StatusCode::GATEWAY_TIMEOUT
                } else {
                    StatusCode::BAD_GATEWAY
                };
                None
            }
        }
    }

    /// Nothing of the request left the router (a pooled connection the backend had closed):
    /// it goes again, to backend `i` again only if that connection was pooled.
    pub(crate) fn unsent(&mut self, i: usize, reused: bool) {
        if !reused {
            self.tried.push(i);
        }
    }

    /// The request failed after it was sent, before any response byte: counted; whether it
    /// goes again (once, to another backend).
    pub(crate) fn sent_failed(&mut self, i: usize) -> bool {
        self.route.counters.response_errors.inc();
        self.last_error = StatusCode::BAD_GATEWAY;
        if self.may_resend() {
            self.resent = true;
            self.tried.push(i);
            return true;
        }
        false
    }

    /// A failure after sending would send it again.
    pub(crate) fn may_resend(&self) -> bool {
        self.retry_after_send && !self.resent
    }
}

/// 308 to the same URL over HTTPS.
fn redirect(state: &State, req: &Request<Incoming>, host: &str) -> Response<RespBody> {
    let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = https_location(state, host, pq);
    let mut resp = answer(StatusCode::PERMANENT_REDIRECT, &says::redirect(&location));
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// What the access log says of the request.
#[derive(Clone, Copy)]
struct Asked<'a> {
    method: &'a Method,
    path: &'a str,
    version: Version,
}

fn asked<B>(req: &Request<B>) -> Asked<'_> {
    Asked {
        method: req.method(),
        path: req.uri().path(),
        version: req.version(),
    }
}

/// Counts and logs one of the router's own answers.
fn finish_own(
    state: &State,
    counters: &RouteCounters,
    req: Asked<'_>,
    host: &str,
    info: &ConnInfo,
    resp: &Response<RespBody>,
    start: Instant,
) {
    counters.count(resp.status());
    counters.duration.observe(start.elapsed().as_secs_f64());
    if let Some(log) = &state.access_log {
        log.entry(&Entry {
            client: info.client,
            method: req.method.as_str(),
            host,
            path: req.path,
            version: req.version,
            status: resp.status().as_u16(),
            bytes: resp.body().size_hint().exact().unwrap_or(0),
            start,
            backend: None,
            route: None,
        });
    }
}

/// What the access log says of a proxied request, written when its response ends.
struct LogLine {
    client: SocketAddr,
    method: Method,
    host: String,
    uri: Uri,
    version: Version,
    status: StatusCode,
    start: Instant,
    backend: SocketAddr,
}

/// A request to a backend, counted in the backend's `active` (which the backend choice
/// reads) for as long as this lives: until its response body or tunnel ends, or until its
/// future is dropped because the client went away before the answer came.
pub(crate) struct InFlight(pub(crate) Arc<ambassador::routes::Backend>);

impl InFlight {
    pub(crate) fn new(backend: &Arc<ambassador::routes::Backend>) -> Self {
        backend.active.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(backend))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A backend's response body on its way to the client: counts bytes, puts the backend
/// connection back in the pool when the body ended, and logs the request.
pub struct Tracked {
    inner: Source,
    state: Arc<State>,
    route: Arc<Route>,
    /// Until the body is dropped.
    _in_flight: InFlight,
    bytes: u64,
    log: Option<LogLine>,
}

/// Where a response body comes from: hyper's client (with the connection to return at its
/// end), or a plain backend connection that the body reads itself.
enum Source {
    Hyper(Incoming, Option<Conn>),
    Plain(crate::plain::Body),
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Source::Hyper(b, _) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            Source::Plain(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    // Counted as it passes: a long download or event stream shows meanwhile.
                    this.route.counters.bytes_out.inc_by(d.len() as u64);
                    this.bytes += d.len() as u64;
                }
                if this.is_end_stream() {
                    this.done();
                }
            }
            Poll::Ready(None) => this.done(),
            Poll::Ready(Some(Err(e))) => {
                if e.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
                {
                    this.state.metrics.body_timeouts.inc();
                }
                this.route.counters.response_errors.inc();
                if let Source::Hyper(_, conn) = &mut this.inner {
                    *conn = None;
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Source::Hyper(b, _) => b.is_end_stream(),
            Source::Plain(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Source::Hyper(b, _) => b.size_hint(),
            Source::Plain(b) => b.size_hint(),
        }
    }
}

impl Tracked {
    /// The body ended: its connection may carry the next request.
    fn done(&mut self) {
        match &mut self.inner {
            Source::Hyper(_, conn) => {
                if let Some(conn) = conn.take()
                    && !conn.sender.is_closed()
                {
                    self.state.pool.hyper.checkin(conn.addr, conn.sender);
                }
            }
            Source::Plain(b) => {
                if let Some((addr, conn)) = b.reusable() {
                    self.state.pool.h1.checkin(addr, conn);
                }
            }
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // A body that ended before it was polled (HEAD, 204, a length of 0: hyper sends the
        // head alone and never asks for the body) leaves its connection to the pool too. A
        // connection whose body was not read to its end is closed (dropped), not reused.
        if self.is_end_stream() {
            self.done();
        }
        if let (Some(log), Some(out)) = (&self.log, &self.state.access_log) {
            out.entry(&Entry {
                client: log.client,
                method: log.method.as_str(),
                host: &log.host,
                path: log.uri.path(),
                version: log.version,
                status: log.status.as_u16(),
                bytes: self.bytes,
                start: log.start,
                backend: Some(log.backend),
                route: Some(self.route.domain.as_str()),
            });
        }
    }
}

/// One request as the access log writes it.
pub(crate) struct Entry<'a> {
    pub client: SocketAddr,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub version: Version,
    pub status: u16,
    pub bytes: u64,
    pub start: Instant,
    /// `None`: the router's own answer.
    pub backend: Option<SocketAddr>,
    /// The route's domain (the pattern: `*.apps.test`), for a proxied request.
    pub route: Option<&'a str>,
}

/// `--access-log`: one JSON object a line, to a file or stdout (`-`).
pub struct AccessLog {
    out: std::sync::Mutex<Box<dyn std::io::Write + Send>>,
}

impl AccessLog {
    pub fn open(path: &str) -> std::io::Result<Self> {
        let out: Box<dyn std::io::Write + Send> = if path == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )
        };
        Ok(Self {
            out: std::sync::Mutex::new(out),
        })
    }

    /// Writes one request's line.
    pub(crate) fn entry(&self, e: &Entry<'_>) {
        let mut line = serde_json::json!({
            "time": runtime::host::rfc3339_now(),
            "client": e.client.to_string(),
            "method": e.method,
            "host": e.host,
            "path": e.path,
            "proto": format!("{:?}", e.version),
            "status": e.status,
            "bytes": e.bytes,
            "duration_ms": e.start.elapsed().as_secs_f64() * 1000.0,
            "backend": e.backend.map(|b| b.to_string()),
        });
        if let Some(route) = e.route {
            line["route"] = route.into();
        }
        self.write(&line);
    }

    fn write(&self, line: &serde_json::Value) {
        let mut text = line.to_string();
        text.push('\n');
        if let Ok(mut out) = self.out.lock() {
            let _ = out.write_all(text.as_bytes());
        }
    }
}

/// Settings a request needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// Longest wait for a body's next bytes, either way, once it has begun.
    pub body_timeout: Duration,
    /// An upgraded connection with no byte either way for this long is closed.
    pub tunnel_timeout: Duration,
    pub max_body: usize,
    /// The HTTPS port redirects name (443: none in the URL).
    pub https_port: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_upgrade_stays_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret, Upgrade"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let mut a = h.clone();
        strip_hop(&mut a, false);
        assert_eq!(a.len(), 1, "{a:?}");
        assert!(a.contains_key("x-kept"));
        strip_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert!(!h.contains_key("x-secret"));
    }
}
