//! Accepting under a connection limit.
//!
//! A daemon limits its open connections with permits taken before `accept`, so that at the
//! limit new clients wait in the kernel's queue rather than in the process. An accept loop
//! that took its permit and then waited for a client held that permit while its queue was
//! empty: every idle loop (a listener nobody uses, one socket per thread and port) kept one
//! place of the limit, and with more loops than places none was left for the busy ones.
//! [`Listener::accept`] waits for a client in the queue first, then for the permit, then
//! takes the client: an idle loop holds nothing.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::SocketFlags;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;

/// A listening TCP socket watched by the runtime of the thread that made it.
pub struct Listener(AsyncFd<OwnedFd>);

impl Listener {
    /// Watches `socket` (made non-blocking) from the calling thread's runtime.
    pub fn new(socket: std::net::TcpListener) -> io::Result<Listener> {
        socket.set_nonblocking(true)?;
        // tokio's registration is `unsafe` (the descriptor must stay open while registered);
        // the workspace's one module with `unsafe` does it.
        sockmap::register_readable(OwnedFd::from(socket)).map(Listener)
    }

    /// The same, for a socket the runtime already watches.
    pub fn from_tokio(socket: tokio::net::TcpListener) -> io::Result<Listener> {
        Listener::new(socket.into_std()?)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        let addr = rustix::net::getsockname(self.0.get_ref())?;
        SocketAddr::try_from(addr).map_err(|_| io::Error::other("not an IP socket"))
    }

    /// Waits until a client waits in the queue, then for a permit (`None` from `permit`:
    /// there will be none, and this returns `Ok(None)`), then takes the client. Cancel-safe:
    /// a client is taken only in the last step, which does not wait.
    pub async fn accept<P, F, S: Accepted>(
        &self,
        mut permit: impl FnMut() -> F,
    ) -> io::Result<Option<(P, S, SocketAddr)>>
    where
        F: Future<Output = Option<P>>,
    {
        loop {
            let mut ready = self.0.readable().await?;
            let Some(p) = permit().await else {
                return Ok(None);
            };
            // Another taker (a sweep, a socket group's peer) may have had it: wait again,
            // the permit given back.
            if let Ok(taken) = ready.try_io(|socket| take(socket.get_ref())) {
                let (stream, peer) = taken?;
                return Ok(Some((p, stream, peer)));
            }
        }
    }

    /// At a stop, before the socket closes: the next client waiting in its queue, taken
    /// without waiting (`None` once the kernel says the queue is empty, or when accept
    /// fails). Those clients have connected and may have sent their first bytes; closing the
    /// socket would reset them.
    pub fn take_waiting<S: Accepted>(&self) -> Option<(S, SocketAddr)> {
        match take(self.0.get_ref()) {
            Ok(taken) => Some(taken),
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    tracing::debug!(error = %e, "accept failed while stopping");
                }
                None
            }
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.get_ref().as_fd()
    }
}

/// What an accepted client becomes: a tokio stream, in the reactor at once, or the socket
/// itself (non-blocking), for a caller that may serve it without waiting (the router).
pub trait Accepted: Sized {
    fn accepted(socket: std::net::TcpStream) -> io::Result<Self>;
}

impl Accepted for TcpStream {
    fn accepted(socket: std::net::TcpStream) -> io::Result<Self> {
        TcpStream::from_std(socket)
    }
}

impl Accepted for std::net::TcpStream {
    fn accepted(socket: std::net::TcpStream) -> io::Result<Self> {
        Ok(socket)
    }
}

/// One `accept4` (non-blocking, close-on-exec), the peer's address with it.
fn take<S: Accepted>(socket: &OwnedFd) -> io::Result<(S, SocketAddr)> {
    let (fd, peer) =
        rustix::net::acceptfrom_with(socket, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)?;
    let peer = peer
        .and_then(|p| SocketAddr::try_from(p).ok())
        .ok_or_else(|| io::Error::other("accept gave no peer address"))?;
    Ok((S::accepted(std::net::TcpStream::from(fd))?, peer))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::Semaphore;

    use super::*;

    /// Whether `f` is still pending 50 ms on.
    async fn still_waits(f: &mut (impl Future + Unpin)) -> bool {
        tokio::time::timeout(Duration::from_millis(50), f)
            .await
            .is_err()
    }

    fn listener() -> Listener {
        Listener::new(std::net::TcpListener::bind("127.0.0.1:0").unwrap()).unwrap()
    }

    /// Two listeners share a limit of one: the idle one holds no place, so the busy one
    /// serves a client, and its next client waits for the first one's permit.
    #[tokio::test]
    async fn an_idle_listener_holds_no_place_of_the_limit() {
        let permits = Arc::new(Semaphore::new(1));
        let take = || {
            let p = permits.clone();
            async move { p.acquire_owned().await.ok() }
        };
        let (idle, busy) = (listener(), listener());
        let idle_loop = idle.accept::<_, _, TcpStream>(take);
        tokio::pin!(idle_loop);
        // The idle one waits for a client, not for the permit: it holds none.
        assert!(still_waits(&mut idle_loop).await);
        assert_eq!(permits.available_permits(), 1);
        let addr = busy.local_addr().unwrap();
        let _first = std::net::TcpStream::connect(addr).unwrap();
        let (permit, _stream, _): (_, TcpStream, _) = busy.accept(take).await.unwrap().unwrap();
        assert_eq!(permits.available_permits(), 0);
        // The next client waits in the queue until the permit comes back.
        let _second = std::net::TcpStream::connect(addr).unwrap();
        let next = busy.accept::<_, _, TcpStream>(take);
        tokio::pin!(next);
        assert!(still_waits(&mut next).await);
        drop(permit);
        let (_p, _s, peer) = next.await.unwrap().unwrap();
        assert_eq!(peer.ip(), addr.ip());
        // A closed semaphore ends the loop.
        permits.close();
        let _third = std::net::TcpStream::connect(addr).unwrap();
        assert!(
            busy.accept::<_, _, TcpStream>(take)
                .await
                .unwrap()
                .is_none()
        );
    }
}
