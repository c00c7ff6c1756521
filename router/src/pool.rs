//! Keep-alive connections to backends, per backend address: HTTP/1.1 client connections
//! (hyper's), each back in the pool once the response it carried has been read to its end.
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
use tracing::debug;

use crate::proxy::ReqBody;

/// A connection to one backend, ready for a request.
pub struct Conn {
    pub addr: SocketAddr,
    pub sender: http1::SendRequest<ReqBody>,
    /// It carried a request before (a failure on it may be a stale keep-alive).
    pub reused: bool,
}

struct Idle {
    sender: http1::SendRequest<ReqBody>,
    since: Instant,
}

/// The pool. Each backend's idle connections are a stack: the one used last goes out first,
/// so under a steady load the same few stay warm and those at the bottom, unused for
/// `idle_timeout`, are closed by [`Pool::sweep`]: the pool follows demand as HAProxy's purge
/// does, and `max_idle` only caps it.
pub struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
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

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::default(),
            max_idle,
            idle_timeout,
        }
    }

    /// An idle connection to `addr` that is ready now, if there is one.
    pub fn checkout(&self, addr: SocketAddr) -> Option<Conn> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.get_mut(&addr)?;
        let now = Instant::now();
        let mut not_yet = Vec::new();
        let mut found = None;
        while let Some(mut i) = list.pop() {
            if self.stale(&i, now) {
                continue;
            }
            match i.sender.ready().now_or_never() {
                Some(Ok(())) => {
                    found = Some(i.sender);
                    break;
                }
                Some(Err(_)) => {}
                // Still finishing its last response: leave it for the next request.
                None => not_yet.push(i),
            }
        }
        list.extend(not_yet);
        found.map(|sender| Conn {
            addr,
            sender,
            reused: true,
        })
    }

    /// Puts a connection whose response was read to its end back.
    pub fn checkin(&self, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.entry(conn.addr).or_default();
        if list.len() < self.max_idle {
            list.push(Idle {
                sender: conn.sender,
                since: Instant::now(),
            });
        }
    }

    /// Idle for longer than `idle_timeout`, or closed by the backend: not to be used again.
    fn stale(&self, idle: &Idle, now: Instant) -> bool {
        now.duration_since(idle.since) > self.idle_timeout || idle.sender.is_closed()
    }

    /// Closes the connections idle for longer than `idle_timeout` and those the backend
    /// closed; run now and then, so that a pool no request touches shrinks too.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().expect("pool lock");
        for list in idle.values_mut() {
            list.retain(|i| !self.stale(i, now));
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

/// Opens a new connection to `addr` within `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, ConnectError> {
    let stream = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => return Err(ConnectError::Timeout),
        Ok(Err(e)) => return Err(ConnectError::Io(e)),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
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
