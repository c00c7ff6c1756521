//! Keep-alive connections to backends, per backend address, each back in the pool once the
//! response it carried has been read to its end: plain sockets for the HTTP/1.1 path
//! (`h1`), hyper's client connections for HTTP/2 clients and the requests `h1` hands to hyper.
//!
//! Written here rather than taken from `hyper-util`'s legacy client because the router must
//! see each step itself: which backend it connects to (to choose another and eject on a
//! failed connect, as the ambassador does), and whether a request left the router at all (a
//! pooled connection that the backend closed hands the request back untouched, so it can go
//! elsewhere whatever its method).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::proxy::ReqBody;

/// A connection to one backend, ready for a request.
pub struct Conn {
    pub addr: SocketAddr,
    pub sender: http1::SendRequest<ReqBody>,
    /// It carried a request before (a failure on it may be a stale keep-alive).
    pub reused: bool,
}

/// What an idle connection can do now.
pub enum Check {
    Ready,
    /// Still finishing its last response: left for a later request.
    NotYet,
    /// Closed by the backend, or failed: dropped.
    Dead,
}

/// A backend connection that can wait in a [`Pool`].
pub trait Pooled: Send {
    fn check(&mut self) -> Check;
}

/// hyper's HTTP/1.1 client connection (the HTTP/2 and fallback path).
impl Pooled for http1::SendRequest<ReqBody> {
    fn check(&mut self) -> Check {
        if self.is_closed() {
            return Check::Dead;
        }
        match self.ready().now_or_never() {
            Some(Ok(())) => Check::Ready,
            Some(Err(_)) => Check::Dead,
            None => Check::NotYet,
        }
    }
}

/// A plain socket (the HTTP/1.1 path, `h1`): alive while nothing is to be read on it. The
/// reactor's readiness says so without a system call; only a socket it marked readable (the
/// backend closed it, or sent what no request asked for) is read to tell.
impl Pooled for TcpStream {
    fn check(&mut self) -> Check {
        match self.readable().now_or_never() {
            None => Check::Ready,
            Some(Err(_)) => Check::Dead,
            Some(Ok(())) => match self.try_read(&mut [0u8; 1]) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Check::Ready,
                _ => Check::Dead,
            },
        }
    }
}

struct Idle<T> {
    conn: T,
    since: Instant,
}

/// The pool. Each backend's idle connections are a stack: the one used last goes out first,
/// so under a steady load the same few stay warm and those at the bottom, unused for
/// `idle_timeout`, are closed by [`Pool::sweep`]: the pool follows demand as HAProxy's purge
/// does, and `max_idle` only caps it.
pub struct Pool<T> {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle<T>>>>,
    /// Idle connections kept per backend.
    pub max_idle: usize,
    /// An idle connection older than this is closed rather than used (backends close theirs
    /// after a while; nginx after 75 s, Go after 90 s).
    pub idle_timeout: Duration,
}

/// Why a connection could not be had.
#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    Io(std::io::Error),
    Handshake(hyper::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Timeout => f.write_str("connect timed out"),
            ConnectError::Io(e) => write!(f, "{e}"),
            ConnectError::Handshake(e) => write!(f, "{e}"),
        }
    }
}

impl<T: Pooled> Pool<T> {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::default(),
            max_idle,
            idle_timeout,
        }
    }

    /// An idle connection to `addr` that is ready now, if there is one.
    pub fn checkout(&self, addr: SocketAddr) -> Option<T> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.get_mut(&addr)?;
        let now = Instant::now();
        let mut not_yet = Vec::new();
        let mut found = None;
        while let Some(mut i) = list.pop() {
            if now.duration_since(i.since) > self.idle_timeout {
                continue;
            }
            match i.conn.check() {
                Check::Ready => {
                    found = Some(i.conn);
                    break;
                }
                Check::Dead => {}
                Check::NotYet => not_yet.push(i),
            }
        }
        list.extend(not_yet);
        found
    }

    /// Puts a connection whose response was read to its end back.
    pub fn checkin(&self, addr: SocketAddr, conn: T) {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.entry(addr).or_default();
        if list.len() < self.max_idle {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Closes the connections idle for longer than `idle_timeout` and those the backend
    /// closed; run now and then, so that a pool no request touches shrinks too.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().expect("pool lock");
        for list in idle.values_mut() {
            list.retain_mut(|i| {
                now.duration_since(i.since) <= self.idle_timeout
                    && !matches!(i.conn.check(), Check::Dead)
            });
        }
        idle.retain(|_, list| !list.is_empty());
    }

    /// Drops the idle connections to backends not in `keep` (they left the routes).
    pub fn retain(&self, keep: &std::collections::HashSet<SocketAddr>) {
        self.idle
            .lock()
            .expect("pool lock")
            .retain(|addr, _| keep.contains(addr));
    }

    /// Idle connections now, in all.
    pub fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .expect("pool lock")
            .values()
            .map(Vec::len)
            .sum()
    }
}

/// The two pools, with the same limits.
pub struct Pools {
    pub h1: Pool<TcpStream>,
    pub hyper: Pool<http1::SendRequest<ReqBody>>,
}

impl Pools {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            h1: Pool::new(max_idle, idle_timeout),
            hyper: Pool::new(max_idle, idle_timeout),
        }
    }

    pub fn sweep(&self) {
        self.h1.sweep();
        self.hyper.sweep();
    }

    pub fn retain(&self, keep: &std::collections::HashSet<SocketAddr>) {
        self.h1.retain(keep);
        self.hyper.retain(keep);
    }

    pub fn idle_count(&self) -> usize {
        self.h1.idle_count() + self.hyper.idle_count()
    }
}

/// Connects to `addr` within `timeout` (`TCP_NODELAY` on).
pub async fn dial(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(ConnectError::Timeout),
        Ok(Err(e)) => Err(ConnectError::Io(e)),
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}

/// Opens a new connection to `addr` within `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, ConnectError> {
    let stream = dial(addr, timeout).await?;
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(ConnectError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(backend = %addr, error = %e, "backend connection ended");
        }
    });
    Ok(Conn {
        addr,
        sender,
        reused: false,
    })
}
