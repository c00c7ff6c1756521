//! A request that hyper serves (HTTP/2; what [`crate::h1`] hands over) sent to the backend
//! over a plain connection of `h1`'s pool, when it has no body and is no upgrade: almost every
//! HTTP/2 request. The head goes out in one write, the response head is read with `h1`'s
//! parser into a header map, and the body is read and decoded by the task of the stream that
//! sends it on. hyper's client put a task and two channels between the stream and the backend
//! (the request handed to the connection's task, the head and each piece of the body handed
//! back): three wake-ups and as many hand-overs a request.
//!
//! A request with a body, and an upgrade (WebSocket), keep hyper's client (`proxy`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::debug;

use crate::h1::{self, Chunks, Failed, Framing};
use crate::pool;
use crate::proxy::{Attempts, InFlight};
use crate::stall::Stall;
use crate::state::State;
use crate::table::Route;

/// The backend's answer: its head (the fields as the client gets them), the connection, and
/// the body's bytes that came with the head.
pub(crate) struct Answer {
    pub head: h1::Response<HeaderMap>,
    pub conn: TcpStream,
    pub in_flight: InFlight,
    pub read: Vec<u8>,
}

/// Sends `head` (a request without body) to a backend, another one after a failure by the
/// rules of [`Attempts`], and reads the response head (1xx skipped); the status to answer
/// when none answered.
pub(crate) async fn exchange(
    state: &State,
    route: &Route,
    host: &str,
    head: &[u8],
    method: &Method,
) -> Result<Answer, StatusCode> {
    let settings = &state.settings;
    let mut attempts = Attempts::new(route, host, crate::proxy::idempotent(method));
    loop {
        let (i, backend) = attempts.next()?;
        let dial = pool::dial(backend.addr, settings.connect_timeout);
        let Some((mut conn, reused)) = attempts.connection(i, &state.pool.h1, dial).await else {
            continue;
        };
        let in_flight = InFlight::new(backend);
        if conn.write_all(head).await.is_err() {
            attempts.unsent(i, reused);
            continue;
        }
        let mut read = Vec::new();
        let deadline = tokio::time::Instant::now() + settings.response_timeout;
        let got = loop {
            let next = h1::response_head::<HeaderMap>(&mut conn, &mut read, method);
            match tokio::time::timeout_at(deadline, next).await {
                Err(_) => break Err(Failed::Timeout),
                Ok(Ok(r)) if r.status.is_informational() => {
                    // 100 Continue, 103 Early Hints: nothing hyper's server could pass on.
                    read.drain(..r.len);
                }
                Ok(r) => break r,
            }
        };
        match got {
            Ok(head) => {
                backend.connections.fetch_add(1, Ordering::Relaxed);
                return Ok(Answer {
                    head,
                    conn,
                    in_flight,
                    read,
                });
            }
            Err(Failed::Timeout) => {
                route.counters.timeouts.inc();
                return Err(StatusCode::GATEWAY_TIMEOUT);
            }
            Err(_) => {
                debug!(backend = %backend.addr, domain = %host, "request failed");
                if !attempts.sent_failed(i) {
                    return Err(attempts.last_error);
                }
            }
        }
    }
}

/// A response body read from its backend connection by the task that sends it on, decoded
/// from its HTTP/1.1 framing into data frames (and trailers).
pub struct Body {
    conn: Option<TcpStream>,
    addr: SocketAddr,
    /// Read and not yet given on.
    buf: Bytes,
    /// Where the next read goes: allocated when a read is due, not for each poll.
    spare: BytesMut,
    framing: Framing,
    /// Bytes left, for a length.
    left: u64,
    chunks: Chunks,
    /// The backend keeps the connection after the body.
    keep: bool,
    ended: bool,
    /// Boxed: rare, and the body lives as long as its response.
    trailers: Option<Box<HeaderMap>>,
    /// `--body-timeout`: how long a read may wait.
    stall: Stall,
}

/// How much a read asks for: a body with a length (at most what is left of it), and one
/// framed otherwise.
const READ: u64 = 64 * 1024;
const READ_UNFRAMED: usize = 16 * 1024;

impl Body {
    /// The body of `head`, read from `conn`, with what of it came in `read`; a read that
    /// waits longer than `idle` (`--body-timeout`) fails it (`TimedOut`).
    pub(crate) fn new(
        head: &h1::Response<HeaderMap>,
        conn: TcpStream,
        read: Vec<u8>,
        addr: SocketAddr,
        idle: Duration,
    ) -> Self {
        let mut buf = Bytes::from(read);
        buf.advance(head.len);
        let left = match head.body {
            Framing::Length(n) => n,
            _ => 0,
        };
        Self {
            conn: Some(conn),
            addr,
            buf,
            spare: BytesMut::new(),
            framing: head.body,
            left,
            chunks: Chunks::keeping_trailers(),
            keep: head.keep,
            ended: head.body == Framing::None || head.body == Framing::Length(0),
            trailers: None,
            stall: Stall::new(idle),
        }
    }

    /// The connection, when the body was read to its end and nothing followed it: the pool's.
    pub(crate) fn reusable(&mut self) -> Option<(SocketAddr, TcpStream)> {
        if self.ended && self.keep && self.buf.is_empty() {
            return self.conn.take().map(|c| (self.addr, c));
        }
        None
    }

    /// The next data frame in `buf`, if any; `ended` set when the body ends with it.
    fn data(&mut self) -> io::Result<Option<Bytes>> {
        let bad = |e: &'static str| io::Error::new(io::ErrorKind::InvalidData, e);
        if self.ended {
            return Ok(None);
        }
        match self.framing {
            Framing::None => {
                self.ended = true;
                Ok(None)
            }
            Framing::Length(_) | Framing::Close if self.buf.is_empty() => Ok(None),
            Framing::Length(_) => {
                let n = self.left.min(self.buf.len() as u64);
                self.left -= n;
                self.ended = self.left == 0;
                Ok(Some(self.buf.split_to(n as usize)))
            }
            Framing::Close => Ok(Some(std::mem::take(&mut self.buf))),
            Framing::Chunked => {
                let (n, done) = self.chunks.framing(&self.buf).map_err(bad)?;
                self.buf.advance(n);
                if done {
                    self.end_chunks()?;
                    return Ok(None);
                }
                let take = self.chunks.data_left().min(self.buf.len() as u64);
                if take == 0 {
                    return Ok(None);
                }
                let data = self.buf.split_to(take as usize);
                self.chunks.take_data(take);
                // The framing after it: the end is known with the last data.
                let (n, done) = self.chunks.framing(&self.buf).map_err(bad)?;
                self.buf.advance(n);
                if done {
                    self.end_chunks()?;
                }
                Ok(Some(data))
            }
        }
    }

    /// A chunked body ended: its trailers, when it had any, are the last frame.
    fn end_chunks(&mut self) -> io::Result<()> {
        self.ended = true;
        let section = self.chunks.trailers.take().unwrap_or_default();
        if section.is_empty() {
            return Ok(());
        }
        let mut text = section;
        text.extend_from_slice(b"\r\n");
        let mut fields = [httparse::EMPTY_HEADER; 64];
        match httparse::parse_headers(&text, &mut fields) {
            Ok(httparse::Status::Complete((_, fields))) => {
                let mut map = HeaderMap::new();
                for f in fields {
                    h1::Fields::field(&mut map, f.name, f.value);
                }
                self.trailers = Some(Box::new(map));
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the backend's trailers are bad",
            )),
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(data) = this.data()? {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if this.ended {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(*t))));
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(Some(Err(io::ErrorKind::NotConnected.into())));
            };
            if this.spare.capacity() == 0 {
                this.spare.reserve(match this.framing {
                    Framing::Length(_) => this.left.min(READ) as usize,
                    _ => READ_UNFRAMED,
                });
            }
            let next = &mut this.spare;
            let n = match tokio_util::io::poll_read_buf(Pin::new(conn), cx, next) {
                Poll::Ready(r) => {
                    this.stall.reset();
                    r?
                }
                Poll::Pending => return this.stall.poll(cx).map(|e| Some(Err(e))),
            };
            if n == 0 {
                if this.framing == Framing::Close {
                    this.ended = true;
                    this.keep = false;
                    continue;
                }
                return Poll::Ready(Some(Err(io::ErrorKind::UnexpectedEof.into())));
            }
            // What was read; the rest of the allocation stays for the next read.
            this.buf = this.spare.split().freeze();
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::None => SizeHint::with_exact(0),
            Framing::Length(_) => SizeHint::with_exact(self.left),
            _ => SizeHint::default(),
        }
    }
}
