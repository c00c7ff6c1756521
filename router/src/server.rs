//! The public listeners: accept (a client in the queue, then a permit: `--max-connections`), read a PROXY header
//! when `--proxy-protocol` is on, complete TLS on the HTTPS listener, then serve HTTP/1.1, or
//! HTTP/2 when ALPN chose it.
//! On shutdown each connection finishes the request it is on and closes; after `--grace` the
//! rest are cut.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::client::Client;
use crate::park::{self, Parking};
use crate::proxy::{self, ConnInfo};
use crate::stall::Stall;
use crate::state::State;
use crate::{batch, h1, quiet};

/// Limits of a public port.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time to receive a request head, counted from when the router waits for it: also how
    /// long an idle keep-alive connection stays open (as HAProxy's `timeout http-request`).
    pub head_timeout: Duration,
    pub max_head_bytes: usize,
    pub max_headers: usize,
    /// Most concurrent HTTP/2 streams a client may open on one connection.
    pub max_streams: u32,
    pub proxy_protocol: bool,
}

/// The HTTP builders every connection uses: HTTP/1.1 in clear and over TLS unless ALPN
/// chose h2; HTTP/2 when it did.
pub struct Builders {
    pub http1: hyper::server::conn::http1::Builder,
    pub http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

pub fn builder(limits: &Limits) -> Builders {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_buf_size(limits.max_head_bytes.max(8192))
        .max_headers(limits.max_headers)
        .keep_alive(true);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX))
        // No keep-alive pings: what they found (a client gone while its streams were open) the
        // head timeout without streams (`quiet`), the write timeout (`batch`), the response
        // timeout and `drop_silent_clients` bound already; hyper's pinger took a lock and read
        // the clock on every poll of the connection (2.5-4% of the CPU per request under
        // h2load in a rig).
        .keep_alive_interval(None);
    Builders { http1, http2 }
}

/// Binds a public listener (backlog 4096, SO_REUSEADDR).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Sets `TCP_USER_TIMEOUT` on a public listener (its connections inherit it): the kernel
/// drops a connection whose client has acknowledged nothing sent to it for `limit` (twice the
/// body timeout), a client gone without a word while a response was on its way. A write that
/// waits for the client's window has its own timer (`stall`, the body timeout), which must
/// come first: the kernel's abort (it counts a zero window too) can surface in a read, where it
/// is no body timeout. This one covers bytes that left and were never acknowledged, where no
/// write waits.
pub fn drop_silent_clients(listener: &TcpListener, limit: Duration) -> std::io::Result<()> {
    socket2::SockRef::from(listener).set_tcp_user_timeout(Some(limit))
}

/// What every connection task shares.
pub struct Serving {
    pub state: Arc<State>,
    pub limits: Limits,
    pub builder: Builders,
    pub permits: Arc<Semaphore>,
    /// The accept loops: the stop waits for them (and their [`sweep`]) before it counts the
    /// connections to drain (`State::connections`).
    pub accepting: TaskTracker,
    /// Stop taking requests: finish the one in hand and close. (The end of the grace period
    /// is `State::cut`.)
    pub stop: CancellationToken,
    /// Idle keep-alive connections held without a task.
    pub parking: Parking,
}

/// What a client connection holds from its accept to its close, in a task or parked: its
/// place under `--max-connections` and its count in `connections_active`.
pub struct Held {
    _permit: OwnedSemaphorePermit,
    active: Gauge,
}

impl Held {
    fn new(s: &Serving, permit: OwnedSemaphorePermit) -> Self {
        let active = s.state.metrics.connections_active.clone();
        s.state.metrics.connections.inc();
        active.inc();
        Self {
            _permit: permit,
            active,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.active.dec();
    }
}

/// Accepts on `listener` until `serving.stop`, then [`sweep`]s its queue. A client in the
/// queue first, then a permit, then accept: at the limit, clients wait in the kernel's queue,
/// and a listener nobody uses holds no place of the limit.
pub async fn accept_loop(
    serving: Arc<Serving>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let listener = match runtime::accept::Listener::from_tokio(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot watch the listening socket");
            return;
        }
    };
    let permit = || async { serving.permits.clone().acquire_owned().await.ok() };
    loop {
        let accepted = tokio::select! {
            a = listener.accept(permit) => a,
            () = serving.stop.cancelled() => return sweep(&serving, &listener, &tls),
        };
        match accepted {
            Ok(Some((permit, stream, peer))) => {
                spawn_connection(&serving, permit, stream, peer, tls.clone());
            }
            Ok(None) => return,
            Err(e) => {
                // Out of descriptors and the like: wait a little rather than spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// At the stop, before the listening socket closes: accepts the connections waiting in its
/// queue, as many as there are permits for. Their clients have connected and sent their
/// requests; closing the socket would reset them. Each gets its first request answered, and
/// is closed after it.
fn sweep(
    serving: &Arc<Serving>,
    listener: &runtime::accept::Listener,
    tls: &Option<tokio_rustls::TlsAcceptor>,
) {
    let mut swept = 0;
    while let Ok(permit) = serving.permits.clone().try_acquire_owned() {
        let Some((stream, peer)) = listener.take_waiting() else {
            break;
        };
        spawn_connection(serving, permit, stream, peer, tls.clone());
        swept += 1;
    }
    if swept > 0 {
        debug!(swept, "accepted the connections waiting at the stop");
    }
}

fn spawn_connection(
    serving: &Arc<Serving>,
    permit: OwnedSemaphorePermit,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let held = Held::new(serving, permit);
    if tls.is_none() && !serving.limits.proxy_protocol {
        // HTTP/1.1 at once: the task holds `plain` alone, not `connection` around it.
        return spawn_plain(serving, held, Client::Socket(stream), peer, None);
    }
    let s = serving.clone();
    serving.state.connections.spawn(async move {
        // Boxed: the task holds a pointer, so spawning and finishing it copy a few words
        // rather than the connection future. (The connection future inline made the task's
        // cell, which tokio aligns to 128 bytes, a size class larger than the two
        // allocations: 2.05 against 1.58 KiB per idle connection.)
        let Ok(stream) = TcpStream::from_std(stream) else {
            return;
        };
        Box::pin(connection(&s, held, stream, peer, tls)).await;
    });
}

/// A task for an HTTP/1.1 connection in clear ([`plain`]): a new one, or (with the linger
/// that applies to it) a parked one whose client sent something or closed.
pub(crate) fn spawn_plain(
    serving: &Arc<Serving>,
    held: Held,
    stream: Client,
    client: SocketAddr,
    woken: Option<Duration>,
) {
    let s = serving.clone();
    serving.state.connections.spawn(async move {
        // Boxed, as in `spawn_connection`.
        Box::pin(plain(&s, held, stream, client, woken)).await;
    });
}

async fn connection(
    s: &Arc<Serving>,
    held: Held,
    mut stream: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    // (Without the PROXY protocol and TLS, `spawn_connection` starts `plain` itself.)
    // Plain HTTP turns Nagle off once a connection is kept alive (`h1`); TLS at once.
    let mut client = peer;
    if s.limits.proxy_protocol {
        // Boxed: a timer and a PROXY header's parse inline would make every connection's
        // task larger, with the PROXY protocol on or not.
        let limit = s.limits.head_timeout;
        match Box::pin(tokio::time::timeout(limit, read_proxy_header(&mut stream))).await {
            Ok(Ok(Some(addr))) => client = addr,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                debug!(%peer, "refused: {e}");
                s.state.metrics.connections_refused.inc();
                return;
            }
            Err(_) => {
                s.state.metrics.connections_refused.inc();
                return;
            }
        }
    }
    match tls {
        None => plain(s, held, Client::Watched(stream), client, None).await,
        // Boxed: the handshake, rustls's state and a TLS connection's serving inline would
        // make every connection's task that much larger, TLS or not.
        Some(acceptor) => {
            let _held = held;
            Box::pin(https(s, stream, client, peer, acceptor)).await;
        }
    }
}

/// HTTP/1.1 in clear, from the accept or from the parking (`woken`, with its linger: it was
/// answered before): parked when it stays idle for the linger ([`park::LINGER`] for a new
/// connection) after an answer, while the parking takes connections. (As [`http1`], with the
/// parking; `h1::serve` called here, not through `http1`: each layer of futures keeps its own
/// copy of the stream and the connection's information.)
async fn plain(
    s: &Arc<Serving>,
    held: Held,
    io: Client,
    client: SocketAddr,
    woken: Option<Duration>,
) {
    let info = ConnInfo::new(client, false);
    info.asked.store(woken.is_some(), Ordering::Relaxed);
    let linger = s.parking.taking().then(|| woken.unwrap_or(park::LINGER));
    match h1::serve(s, io, &info, linger).await {
        h1::Ended::Closed => {}
        h1::Ended::Idle(io, deadline) => s.parking.park(s, io, client, held, deadline.into_std()),
        h1::Ended::Hyper(io, read) => Box::pin(hyper_http1(s, io, read, info)).await,
    }
}

/// A connection to the HTTPS listener: the handshake, then HTTP/2 when ALPN chose it, else
/// HTTP/1.1.
async fn https(
    s: &Serving,
    stream: TcpStream,
    client: SocketAddr,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
) {
    let limit = s.limits.head_timeout;
    let _ = stream.set_nodelay(true);
    let accepted = tokio::time::timeout(limit, acceptor.accept(stream)).await;
    match accepted.map(|r| r.map(Box::new)) {
        Ok(Ok(tls_stream)) => {
            s.state.metrics.tls_handshakes.inc();
            let info = ConnInfo::new(client, true);
            if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                // What the streams answer in one turn goes out in one write.
                let stall = Stall::new(s.state.settings.body_timeout);
                let stalled = s.state.metrics.body_timeouts.clone();
                let (io, writer) = batch::batched(tls_stream, stall, stalled);
                let conn = serve_h2(s, TokioIo::new(io), Arc::new(info));
                Box::pin(batch::flushing(writer, conn)).await;
            } else {
                // Boxed: the handshake's state is not kept beside it.
                Box::pin(http1(s, tls_stream, info)).await;
            }
        }
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "TLS handshake failed");
            s.state.metrics.tls_failures.inc();
        }
        Err(_) => {
            s.state.metrics.tls_failures.inc();
        }
    }
}

/// Drives one HTTP/1.1 connection hyper serves (`$conn`) until it ends, or shuts it down
/// gracefully on `stop` and cuts it on `cut`; the result of the connection. The connection is
/// boxed: inline it would make every connection's task as large. (HTTP/2's own stop and idle
/// close are `serve_h2`'s.)
///
/// `$asked` says whether the client has sent a request yet. hyper's graceful shutdown closes
/// an HTTP/1.1 connection that has read nothing, and so would cut a client that connected just
/// before the stop with its first request on the way (HTTP/1.1 has no way to tell it that the
/// request went unread; HTTP/2's GOAWAY does): such a connection first
/// waits for its request (hyper's head timeout still applies), which is then answered with
/// `Connection: close`.
macro_rules! until_stopped {
    ($s:expr, $conn:ident, $asked:expr) => {{
        let mut $conn = Box::pin($conn);
        tokio::select! {
            r = $conn.as_mut() => r,
            () = $s.stop.cancelled() => {
                let first = std::future::poll_fn(|cx| match $conn.as_mut().poll(cx) {
                    std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
                    std::task::Poll::Pending if $asked => std::task::Poll::Ready(None),
                    std::task::Poll::Pending => std::task::Poll::Pending,
                });
                let ended = tokio::select! {
                    r = first => r,
                    () = $s.state.cut.cancelled() => Some(Ok(())),
                };
                match ended {
                    Some(r) => r,
                    None => {
                        $conn.as_mut().graceful_shutdown();
                        tokio::select! {
                            r = $conn.as_mut() => r,
                            () = $s.state.cut.cancelled() => Ok(()),
                        }
                    }
                }
            }
        }
    }};
}

/// An HTTP/1.1 connection over TLS: served by [`h1`] (which the grace period's end cuts); by
/// hyper from the request `h1` hands over on (with the bytes read so far), boxed.
async fn http1<S: h1::Stream>(s: &Serving, io: S, info: ConnInfo) {
    // Inline: idle, `h1::serve` holds a few hundred bytes (a request's state is boxed inside).
    // Never parked (rustls's state is the connection's): never handed back idle.
    if let h1::Ended::Hyper(io, read) = h1::serve(s, io, &info, None).await {
        Box::pin(hyper_http1(s, io, read, info)).await;
    }
}

/// The rest of a connection that `h1` hands over, with the bytes it read.
async fn hyper_http1<S: h1::Stream>(s: &Serving, io: S, read: Vec<u8>, info: ConnInfo) {
    // A WebSocket's small messages must not wait for ACKs.
    io.no_delay();
    let io = TokioIo::new(Prefixed {
        read,
        at: 0,
        io,
        stall: Stall::new(s.state.settings.body_timeout),
        stalled: s.state.metrics.body_timeouts.clone(),
    });
    serve(s, io, Arc::new(info)).await;
}

/// A connection whose first bytes were read already: they come first.
struct Prefixed<S> {
    read: Vec<u8>,
    at: usize,
    io: S,
    /// `--body-timeout` for a write the client does not take (`stall`), counted in
    /// `body_timeouts`.
    stall: Stall,
    stalled: Counter,
}

impl<S> Prefixed<S> {
    /// What a write returned: a wait for the client (`TimedOut` once it has lasted the
    /// limit), or done waiting. A timeout (the stall's, or the kernel's `TCP_USER_TIMEOUT`) is
    /// counted.
    fn waited<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        let r = match r {
            Poll::Pending => self.stall.poll(cx).map(Err),
            done => {
                self.stall.reset();
                done
            }
        };
        if let Poll::Ready(Err(e)) = &r
            && e.kind() == std::io::ErrorKind::TimedOut
        {
            self.stalled.inc();
        }
        r
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.at < this.read.len() {
            let n = buf.remaining().min(this.read.len() - this.at);
            buf.put_slice(&this.read[this.at..this.at + n]);
            this.at += n;
            if this.at == this.read.len() {
                this.read = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        self.waited(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.waited(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.waited(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A connection that hyper serves over HTTP/1.1 (what `h1` handed over).
async fn serve<I>(s: &Serving, io: I, info: Arc<ConnInfo>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let state = s.state.clone();
    let client = info.client;
    let this = info.clone();
    // Each request's future boxed on its own: hyper keeps the space for the service's future
    // for the connection's whole life, and this one is 1.5 KB; an idle connection then holds
    // a pointer instead.
    let service = hyper::service::service_fn(move |req| {
        info.asked.store(true, Ordering::Relaxed);
        Box::pin(proxy::handle(state.clone(), info.clone(), req))
    });
    let conn = s
        .builder
        .http1
        .serve_connection(io, service)
        .with_upgrades();
    let result = until_stopped!(s, conn, this.asked.load(Ordering::Relaxed));
    ended(s, client, result);
    let tunnel = this.tunnel.lock().expect("tunnel lock").take();
    if let Some(tunnel) = tunnel {
        tunnel.await;
    }
}

/// An HTTP/2 connection: as [`serve`], and closed (GOAWAY) once it has had no stream open for
/// the head timeout ([`quiet`]); given that long again to finish before it is cut.
async fn serve_h2<I>(s: &Serving, io: I, info: Arc<ConnInfo>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let state = s.state.clone();
    let client = info.client;
    let streams = Arc::new(quiet::Streams::default());
    let counted = streams.clone();
    let service = hyper::service::service_fn(move |req| {
        let open = quiet::Open::new(&counted);
        let (state, info) = (state.clone(), info.clone());
        // Boxed, as in `serve`; `handle`'s future made in the box, not moved into it.
        Box::pin(async move {
            let resp = proxy::handle(state, info, req).await;
            resp.map(|resp| resp.map(|body| quiet::Counted::new(body, open)))
        })
    });
    let conn = s.builder.http2.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let limit = s.limits.head_timeout;
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = quiet::quiet(&streams, limit) => {
            s.state.metrics.head_timeouts.inc();
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                () = tokio::time::sleep(limit) => Ok(()),
                () = s.state.cut.cancelled() => Ok(()),
            }
        }
        // HTTP/2's GOAWAY tells the client which of its requests went unread (see
        // `until_stopped`).
        () = s.stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                () = s.state.cut.cancelled() => Ok(()),
            }
        }
    };
    ended(s, client, result);
}

/// What a connection hyper served ended with.
fn ended(s: &Serving, client: SocketAddr, result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        if e.is_timeout() {
            s.state.metrics.head_timeouts.inc();
        }
        debug!(%client, error = %e, "connection ended");
    }
}

/// Reads a PROXY protocol v1 or v2 header off the front of `stream`: the client's address,
/// `None` for a `LOCAL`/`UNKNOWN` header (the balancer's own health check).
async fn read_proxy_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, String> {
    use ppp::{HeaderResult, PartialResult};
    let mut buf = vec![0u8; 536];
    loop {
        let n = stream.peek(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before a PROXY header".into());
        }
        let parsed = HeaderResult::parse(&buf[..n]);
        if parsed.is_incomplete() {
            if n == buf.len() {
                return Err("PROXY header longer than 536 bytes".into());
            }
            // More is on its way: peek returns at once while data waits, so pause.
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        let (len, addr) = match parsed {
            HeaderResult::V1(Ok(h)) => {
                let addr = match h.addresses {
                    ppp::v1::Addresses::Tcp4(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    ppp::v1::Addresses::Tcp6(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    ppp::v1::Addresses::Unknown => None,
                };
                (h.header.len(), addr)
            }
            HeaderResult::V2(Ok(h)) => {
                let addr = match h.addresses {
                    ppp::v2::Addresses::IPv4(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    ppp::v2::Addresses::IPv6(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    _ => None,
                };
                (h.len(), addr)
            }
            HeaderResult::V1(Err(e)) => return Err(format!("not a PROXY header: {e:?}")),
            HeaderResult::V2(Err(e)) => return Err(format!("not a PROXY header: {e:?}")),
        };
        let mut consumed = vec![0u8; len];
        stream
            .read_exact(&mut consumed)
            .await
            .map_err(|e| e.to_string())?;
        return Ok(addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// What a connection needs, with no routes read (every request gets the router's own
    /// answer) and `permits` connections allowed.
    fn serving(permits: usize) -> Serving {
        let state = State::new(
            schema::Prefix::default(),
            proxy::Settings {
                connect_timeout: Duration::from_secs(1),
                response_timeout: Duration::from_secs(1),
                body_timeout: Duration::from_secs(1),
                tunnel_timeout: Duration::from_secs(1),
                max_body: 1024,
                https_port: 443,
            },
            None,
            crate::pool::Pools::new(1, Duration::from_secs(1)),
        );
        let limits = Limits {
            head_timeout: Duration::from_secs(1),
            max_head_bytes: 8192,
            max_headers: 10,
            max_streams: 10,
            proxy_protocol: false,
        };
        Serving {
            state,
            builder: builder(&limits),
            limits,
            permits: Arc::new(Semaphore::new(permits)),
            accepting: TaskTracker::new(),
            stop: CancellationToken::new(),
            parking: Parking::new().unwrap(),
        }
    }

    /// Every connection's task holds one of these futures, busy or idle (until it parks): they
    /// must stay small. `plain` (HTTP/1.1 in clear) holds `h1::serve` inline (idle, that is the
    /// stream and the wait for the next request; a request's state is boxed inside);
    /// `connection` (TLS, the PROXY header) holds `plain` and a box for the rest. Inline
    /// everything was 8,688 bytes; now (debug build) 832 and 1,064, `h1::serve` 432.
    #[tokio::test]
    async fn a_connection_future_stays_small() {
        let serving = Arc::new(serving(2));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = || {
            Held::new(
                &serving,
                serving.permits.clone().try_acquire_owned().unwrap(),
            )
        };
        let stream = TcpStream::connect(addr).await.unwrap();
        let size = std::mem::size_of_val(&plain(
            &serving,
            held(),
            Client::Watched(stream),
            addr,
            None,
        ));
        assert!(
            size <= 840,
            "plain's future is {size} bytes: box what made it grow (see `plain`)"
        );
        let stream = TcpStream::connect(addr).await.unwrap();
        let size = std::mem::size_of_val(&connection(&serving, held(), stream, addr, None));
        assert!(
            size <= 1100,
            "a connection's future is {size} bytes: box what made it grow (see `connection`)"
        );
        // Of it, the HTTP/1.1 path's: a request's way to the backend is boxed (it was 1,912
        // bytes inline), and so is its head's read (with it, 704).
        let stream = TcpStream::connect(addr).await.unwrap();
        let info = ConnInfo::new(addr, false);
        let size = std::mem::size_of_val(&h1::serve(
            &serving,
            Client::Watched(stream),
            &info,
            Some(park::LINGER),
        ));
        assert!(
            size <= 440,
            "h1::serve's future is {size} bytes: box what made it grow"
        );
    }

    /// A public listener's connections carry its `TCP_USER_TIMEOUT` (the kernel copies it to
    /// each accepted socket).
    #[tokio::test]
    async fn a_public_listeners_connections_carry_its_tcp_user_timeout() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        drop_silent_clients(&listener, Duration::from_millis(2500)).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let got = socket2::SockRef::from(&accepted)
            .tcp_user_timeout()
            .unwrap();
        assert_eq!(got, Some(Duration::from_millis(2500)));
    }

    /// When the parking takes no connections (its set could not be watched), an answered
    /// connection waits in its task for the next request, past the linger, rather than being
    /// closed.
    #[tokio::test]
    async fn an_idle_connection_waits_in_its_task_when_the_parking_takes_none() {
        let serving = Arc::new(serving(2));
        serving.parking.close(&serving);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepting = tokio::spawn(accept_loop(serving.clone(), listener, None));
        let mut c = TcpStream::connect(addr).await.unwrap();
        for round in 0..3 {
            c.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
                .await
                .unwrap();
            let answer = tokio::time::timeout(Duration::from_secs(5), read_answer(&mut c))
                .await
                .expect("an answer within 5 s");
            assert!(
                answer.starts_with("HTTP/1.1 404"),
                "round {round}: {answer}"
            );
            tokio::time::sleep(park::LINGER * 5).await;
        }
        serving.stop.cancel();
        accepting.await.unwrap();
    }

    /// One whole answer (head and its `Content-Length` of body) off `c`.
    async fn read_answer(c: &mut TcpStream) -> String {
        let mut buf = Vec::new();
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    return text;
                }
            }
            let mut chunk = [0u8; 4096];
            let n = c.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed after {text:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Clients whose connections wait in the listener's queue when the stop comes (connected,
    /// requests sent, not accepted yet) are accepted and answered before the socket closes,
    /// as many as there are permits for; closing the socket would have reset them all.
    #[tokio::test]
    async fn the_stop_answers_the_connections_waiting_in_the_queue() {
        let serving = Arc::new(serving(3));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..4 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
                .await
                .unwrap();
            clients.push(c);
        }
        serving.stop.cancel();
        accept_loop(serving.clone(), listener, None).await;
        let mut answered = 0;
        for mut c in clients {
            let mut answer = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut answer));
            let _ = read.await.expect("an answer or the close, within 5 s");
            let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
            if answer.starts_with("http/1.1 404") {
                answered += 1;
            }
        }
        assert_eq!(answered, 3, "one answer per permit");
    }
}
