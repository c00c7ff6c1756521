//! An HTTP/2 connection's writes, gathered over one turn of its task and written at its end.
//!
//! h2 writes a DATA frame of 256 bytes or more apart from the frames before it and flushes in
//! between (its encoder keeps such a payload aside rather than copying it), so over TLS every
//! response of a busy connection was a write of its own: a TLS record, a system call and a
//! segment each, and an ACK back (`strace`: one `writev` to the client per backend response,
//! under h2load with 10 streams per connection; HAProxy's HTTP/2 sends what one turn of its
//! event loop produced in one write). Here a write only copies into the connection's buffer
//! and a flush does nothing; [`flushing`], which drives the connection, writes the
//! buffer out after each poll of it. So the frames of every stream that answered in the same
//! turn go out in one write.
//!
//! What is gathered is bounded: past [`LIMIT`] a write first waits for the buffer to go out
//! (the client's TCP window is the back-pressure, as before). The buffer is released when it
//! has gone out: an idle connection holds none. A write out that waits `--body-timeout` for the
//! client to take it fails the connection ([`Stall`]), as a write to an HTTP/1.x client does.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::stall::Stall;

/// Most bytes gathered before a write waits for them to go out.
pub const LIMIT: usize = 64 * 1024;

/// The connection's stream, shared by the side hyper writes to ([`Batched`]) and the future
/// that writes the gathered bytes out ([`flushing`]); both run in the connection's one task,
/// so the lock is never contended.
struct Shared<S> {
    io: S,
    out: Vec<u8>,
    /// How much of `out` went out already (a partial write).
    sent: usize,
    /// Writing out failed: what every later write and flush says.
    failed: Option<io::ErrorKind>,
    /// How long a write out may wait for the client; a wait that lasted it is counted here.
    stall: Stall,
    stalled: Counter,
}

impl<S: AsyncWrite + Unpin> Shared<S> {
    /// Writes out what was gathered, then flushes the stream.
    fn write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(kind) = self.failed {
            return Poll::Ready(Err(kind.into()));
        }
        while self.sent < self.out.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.out[self.sent..]) {
                Poll::Pending => return self.stalled(cx),
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(self.fail(io::ErrorKind::WriteZero))),
                Poll::Ready(Ok(n)) => {
                    self.sent += n;
                    self.stall.reset();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(self.fail(e.kind()))),
            }
        }
        // Gone out: released (it was as large as the largest turn's output).
        self.out = Vec::new();
        self.sent = 0;
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Pending => self.stalled(cx),
            Poll::Ready(r) => {
                self.stall.reset();
                Poll::Ready(r.map_err(|e| self.fail(e.kind())))
            }
        }
    }

    /// A write out waits for the client: failed once it has waited the limit.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let e = ready!(self.stall.poll(cx));
        Poll::Ready(Err(self.fail(e.kind())))
    }

    /// Writing out failed: the gathered bytes go (no one will take them), and every later
    /// write and flush says so.
    /// A timeout (the stall's, or the kernel's `TCP_USER_TIMEOUT`) is counted.
    fn fail(&mut self, kind: io::ErrorKind) -> io::Error {
        if kind == io::ErrorKind::TimedOut {
            self.stalled.inc();
        }
        self.failed = Some(kind);
        self.out = Vec::new();
        self.sent = 0;
        kind.into()
    }
}

fn lock<S>(shared: &Mutex<Shared<S>>) -> MutexGuard<'_, Shared<S>> {
    // A panic while the lock was held leaves nothing half-done that matters here.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// The stream as hyper sees it: reads pass through, writes are gathered.
pub struct Batched<S>(Arc<Mutex<Shared<S>>>);

/// Wraps `io`: the stream to give hyper, and the handle [`flushing`] writes out with. A write
/// out that waits `stall` fails, counted in `stalled`.
pub fn batched<S>(io: S, stall: Stall, stalled: Counter) -> (Batched<S>, Writer<S>) {
    let shared = Arc::new(Mutex::new(Shared {
        io,
        out: Vec::new(),
        sent: 0,
        failed: None,
        stall,
        stalled,
    }));
    (Batched(shared.clone()), Writer(shared))
}

impl<S: AsyncRead + Unpin> AsyncRead for Batched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.0).io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Batched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut shared = lock(&self.0);
        if let Some(kind) = shared.failed {
            return Poll::Ready(Err(kind.into()));
        }
        if shared.out.len() >= LIMIT {
            ready!(shared.write_out(cx))?;
        }
        if shared.out.capacity() == 0 {
            // A turn's frames at once, rather than growing by doubling from the first one.
            shared.out.reserve(16 * 1024);
        }
        let room = LIMIT - shared.out.len();
        let mut taken = 0;
        for b in bufs {
            let n = b.len().min(room - taken);
            shared.out.extend_from_slice(&b[..n]);
            taken += n;
            if taken == room {
                break;
            }
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Nothing: [`flushing`] writes out after the connection's turn.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match lock(&self.0).failed {
            Some(kind) => Poll::Ready(Err(kind.into())),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.0);
        ready!(shared.write_out(cx))?;
        Pin::new(&mut shared.io).poll_shutdown(cx)
    }
}

/// The handle that writes out what a turn gathered.
pub struct Writer<S>(Arc<Mutex<Shared<S>>>);

/// Drives `conn` (the future serving a [`Batched`] stream) and writes out what each poll of it
/// gathered.
pub async fn flushing<S, F>(writer: Writer<S>, conn: F) -> F::Output
where
    S: AsyncWrite + Unpin,
    F: Future,
{
    let mut conn = std::pin::pin!(conn);
    let mut ended = None;
    std::future::poll_fn(|cx| {
        if ended.is_none()
            && let Poll::Ready(out) = conn.as_mut().poll(cx)
        {
            ended = Some(out);
        }
        let mut shared = lock(&writer.0);
        let written = if shared.sent < shared.out.len() {
            shared.write_out(cx)
        } else {
            Poll::Ready(Ok(()))
        };
        match (ended.take(), written) {
            // What it gathered last goes out before it ends (a failure ends it anyway).
            (Some(out), Poll::Ready(_)) => Poll::Ready(out),
            (Some(out), Poll::Pending) => {
                ended = Some(out);
                Poll::Pending
            }
            (None, Poll::Ready(Err(_))) => {
                // The connection sees the failure at its next write or flush: it runs again
                // now to get there, rather than when the client next sends something.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            (None, _) => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// [`batched`] with a limit no test here reaches.
    fn batched_for_test(
        io: tokio::io::DuplexStream,
    ) -> (
        Batched<tokio::io::DuplexStream>,
        Writer<tokio::io::DuplexStream>,
    ) {
        let stall = Stall::new(std::time::Duration::from_secs(5));
        batched(io, stall, Counter::default())
    }

    /// Polls `far` for what has arrived, without waiting.
    fn arrived(far: &mut tokio::io::DuplexStream) -> usize {
        let mut buf = [0u8; 64];
        let mut rb = ReadBuf::new(&mut buf);
        let waker = std::task::Waker::noop();
        match Pin::new(far).poll_read(&mut Context::from_waker(waker), &mut rb) {
            Poll::Ready(Ok(())) => rb.filled().len(),
            _ => 0,
        }
    }

    #[tokio::test]
    async fn a_turns_writes_go_out_together_at_its_end() {
        let (near, mut far) = tokio::io::duplex(LIMIT * 4);
        let (mut io, writer) = batched_for_test(near);
        let mut far = flushing(writer, async move {
            io.write_all(b"one ").await.unwrap();
            io.flush().await.unwrap();
            io.write_all(b"two").await.unwrap();
            io.flush().await.unwrap();
            assert_eq!(arrived(&mut far), 0, "bytes went out before the turn ended");
            // The turn ends here; what it wrote goes out.
            tokio::task::yield_now().await;
            let mut buf = [0u8; 7];
            far.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"one two");
            io.write_all(b"!").await.unwrap();
            far
        })
        .await;
        // The last turn's bytes go out before `flushing` ends.
        let mut buf = [0u8; 1];
        far.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"!");
    }

    #[tokio::test]
    async fn past_the_limit_a_write_waits_for_a_slow_reader() {
        // A pipe of 1 KiB: every write out is partial and waits for the reader.
        let (near, mut far) = tokio::io::duplex(1024);
        let (mut io, writer) = batched_for_test(near);
        let sent: Vec<u8> = (0..LIMIT * 3 + 17).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.unwrap();
            got
        });
        flushing(writer, async move {
            for piece in sent.chunks(5000) {
                io.write_all(piece).await.unwrap();
            }
            io.shutdown().await.unwrap();
        })
        .await;
        assert_eq!(reader.await.unwrap(), expected);
    }

    /// A client that takes nothing: the write out fails after the limit, counted, and so does
    /// the connection's next write.
    #[tokio::test]
    async fn a_write_out_the_client_does_not_take_fails_after_the_limit() {
        let (near, _far) = tokio::io::duplex(1024);
        let stalled = Counter::default();
        let limit = std::time::Duration::from_millis(100);
        let (mut io, writer) = batched(near, Stall::new(limit), stalled.clone());
        let start = std::time::Instant::now();
        let written = flushing(writer, async move {
            let first = io.write_all(&[7u8; LIMIT * 2]).await;
            (first, io.write_all(b"next").await)
        });
        let (first, next) = tokio::time::timeout(std::time::Duration::from_secs(5), written)
            .await
            .expect("given up within 5 s");
        assert_eq!(first.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(next.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= limit, "{:?}", start.elapsed());
        assert_eq!(stalled.get(), 1);
    }

    #[tokio::test]
    async fn a_failed_write_out_fails_the_next_write() {
        let (near, far) = tokio::io::duplex(1024);
        let (mut io, writer) = batched_for_test(near);
        drop(far);
        let second = flushing(writer, async move {
            io.write_all(b"lost").await.unwrap();
            tokio::task::yield_now().await;
            io.write_all(b"again").await
        })
        .await;
        assert_eq!(second.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }
}
