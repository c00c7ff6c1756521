//! A client's socket in clear, in tokio's reactor only once it has to wait.
//!
//! A client that sends its request with its connection (most do, and every `Connection: close`
//! client) is most often read, answered and closed without a wait. In the reactor from its
//! accept (as a tokio `TcpStream` is) it cost an `epoll_ctl` to add it and another to remove
//! it at the close: two of the eight system calls of such a request. HAProxy reads and writes
//! before it registers a connection, and makes neither. [`Client`] is the bare socket until a
//! read or a write would block (or `h1` waits for readiness); then it joins the reactor for
//! the rest of its life (until it is parked: `park`).

use std::io::{self, IoSlice, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::h1;

pub enum Client {
    /// Not in the reactor: every read and write so far was done at once.
    Socket(std::net::TcpStream),
    Watched(TcpStream),
    /// The reactor refused it (the error was returned).
    Gone,
}

impl Client {
    /// The socket in the reactor (from now on).
    fn watched(&mut self) -> io::Result<&mut TcpStream> {
        if let Client::Socket(_) = self
            && let Client::Socket(socket) = std::mem::replace(self, Client::Gone)
        {
            *self = Client::Watched(TcpStream::from_std(socket)?);
        }
        match self {
            Client::Watched(stream) => Ok(stream),
            _ => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// The socket, out of the reactor (to be parked).
    pub fn into_std(self) -> io::Result<std::net::TcpStream> {
        match self {
            Client::Socket(socket) => Ok(socket),
            Client::Watched(stream) => stream.into_std(),
            Client::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    fn sock_ref(&self) -> Option<socket2::SockRef<'_>> {
        match self {
            Client::Socket(socket) => Some(socket.into()),
            Client::Watched(stream) => Some(stream.into()),
            Client::Gone => None,
        }
    }

    /// Does `op` on the bare socket if it is one (`None`: it would block, or the socket is in
    /// the reactor already).
    fn at_once<T>(
        &mut self,
        mut op: impl FnMut(&std::net::TcpStream) -> io::Result<T>,
    ) -> Option<io::Result<T>> {
        let Client::Socket(socket) = self else {
            return None;
        };
        loop {
            match op(socket) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                done => return Some(done),
            }
        }
    }

    /// `poll` on the stream in the reactor (joined now if it was not).
    fn poll_watched<T>(
        &mut self,
        poll: impl FnOnce(Pin<&mut TcpStream>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match self.watched() {
            Ok(stream) => poll(Pin::new(stream)),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncRead for Client {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Client::Socket(_) = this {
            // The room zeroed first (the bare socket's reads are few: a head in parts, a
            // body on a new connection).
            let room = buf.initialize_unfilled();
            if let Some(read) = this.at_once(|mut socket| socket.read(room)) {
                return Poll::Ready(read.map(|n| buf.advance(n)));
            }
        }
        this.poll_watched(|stream| stream.poll_read(cx, buf))
    }
}

impl AsyncWrite for Client {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(written) = this.at_once(|mut socket| socket.write(buf)) {
            return Poll::Ready(written);
        }
        this.poll_watched(|stream| stream.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(written) = this.at_once(|mut socket| socket.write_vectored(bufs)) {
            return Poll::Ready(written);
        }
        this.poll_watched(|stream| stream.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Watched(stream) => Pin::new(stream).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Socket(socket) => Poll::Ready(socket.shutdown(std::net::Shutdown::Write)),
            Client::Watched(stream) => Pin::new(stream).poll_shutdown(cx),
            Client::Gone => Poll::Ready(Ok(())),
        }
    }
}

impl h1::Stream for Client {
    /// In the reactor now; then `poll_read_ready`: the reader's own waker slot, no waiter node
    /// (`readable()`'s future is 152 bytes, and an idle connection holds it).
    fn ready(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        std::future::poll_fn(|cx| self.poll_watched(|stream| stream.poll_read_ready(cx)))
    }

    /// Nothing: the close sends the FIN (a `shutdown` first was one system call more per
    /// connection, and changes nothing when the client sent bytes no one read: RST either way).
    fn finish(&mut self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }

    fn watched(&self) -> bool {
        matches!(self, Client::Watched(_))
    }

    fn no_delay(&self) {
        if let Some(socket) = self.sock_ref() {
            let _ = socket.set_tcp_nodelay(true);
        }
    }

    fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self.sock_ref() {
            Some(socket) => (&*socket).read(buf),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// A read that does not fill the room has emptied the socket: tokio is told (as its own
    /// reads do), so the next wait waits rather than find the readiness still set and read
    /// nothing (a system call per request). (`ready` put the socket in the reactor.)
    fn read_ready(&self, buf: &mut Vec<u8>) -> Option<io::Result<usize>> {
        let Client::Watched(stream) = self else {
            return None;
        };
        buf.reserve(4096);
        let room = buf.capacity() - buf.len();
        let mut read = None;
        let result = stream.try_io(tokio::io::Interest::READABLE, || {
            let n = stream.try_read_buf(buf)?;
            read = Some(n);
            if n > 0 && n < room {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        Some(read.map_or(result, Ok))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::h1::Stream;

    /// A bare socket and its peer.
    async fn pair(listener: &std::net::TcpListener) -> (Client, TcpStream) {
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (socket, _) = listener.accept().unwrap();
        socket.set_nonblocking(true).unwrap();
        (Client::Socket(socket), peer)
    }

    /// Reads and writes that can be done at once leave the socket out of the reactor; one
    /// that has to wait puts it there, and is woken when it can go on.
    #[tokio::test]
    async fn a_bare_socket_joins_the_reactor_only_when_it_has_to_wait() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut client, mut peer) = pair(&listener).await;
        peer.write_all(b"GET").await.unwrap();
        let mut got = [0; 16];
        // What has come is read at once (the peer's bytes are there within the millisecond).
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(client.read(&mut got).await.unwrap(), 3);
        client.write_all(b"answer").await.unwrap();
        assert!(
            !client.watched(),
            "a read and a write that did not wait joined the reactor"
        );
        // Nothing to read: it waits in the reactor, and the peer's bytes wake it.
        let (read, ()) = tokio::join!(client.read(&mut got), async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            peer.write_all(b"more").await.unwrap();
        });
        assert_eq!(&got[..read.unwrap()], b"more");
        assert!(client.watched());
        let mut answer = [0; 6];
        peer.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"answer");

        // A write larger than the socket takes: it waits in the reactor for the peer to read.
        let (mut client, mut peer) = pair(&listener).await;
        let big = vec![7u8; 16 << 20];
        let mut back = vec![0u8; big.len()];
        let (wrote, read) = tokio::join!(
            async {
                client.write_all(&big).await?;
                client.shutdown().await
            },
            peer.read_exact(&mut back)
        );
        wrote.unwrap();
        read.unwrap();
        assert!(back == big);
        assert!(client.watched());
        assert_eq!(peer.read(&mut got).await.unwrap(), 0, "the shutdown's FIN");

        // Shut down while bare: the peer sees the end.
        let (mut client, mut peer) = pair(&listener).await;
        client.shutdown().await.unwrap();
        assert_eq!(peer.read(&mut got).await.unwrap(), 0);
        assert!(!client.watched());
    }
}
