//! How long a read or a write may wait for the other side: the timer behind `--body-timeout`
//! for a backend's response body (`plain::Body`), for a write to a client (`h1`, what hyper
//! serves over HTTP/1.x through `server::Prefixed`, an HTTP/2 connection's writes out in
//! `batch`). A client that stops reading
//! would otherwise hold its connection, and the backend connection of its response, for as long
//! as the router runs: the kernel keeps a zero window open indefinitely.
//!
//! The timer is made when a first wait begins and set again when a later one does; a read or
//! write that the socket takes at once reads no clock and touches no timer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// The timer of the waits of one stream, each at most `limit`.
pub struct Stall {
    limit: Duration,
    /// Boxed, made at the first wait: a stream that never waits holds a pointer's worth.
    timer: Option<Pin<Box<Sleep>>>,
    /// A wait is on: the timer runs for it.
    armed: bool,
}

impl Stall {
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            timer: None,
            armed: false,
        }
    }

    /// The wait is over (bytes moved): the next one has `limit` again.
    pub fn reset(&mut self) {
        self.armed = false;
    }

    /// For a read or write that returned `Pending`: `TimedOut` once the wait it belongs to
    /// has lasted `limit`.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let limit = self.limit;
        match &mut self.timer {
            None => self.timer = Some(Box::pin(tokio::time::sleep(limit))),
            Some(timer) if !self.armed => timer.as_mut().reset(Instant::now() + limit),
            Some(_) => {}
        }
        self.armed = true;
        if let Some(timer) = &mut self.timer {
            ready!(timer.as_mut().poll(cx));
        }
        Poll::Ready(io::ErrorKind::TimedOut.into())
    }
}

/// `io` (a write, or a flush), failed with `TimedOut` once it has waited `limit` in all.
pub async fn within<T>(limit: Duration, io: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    let mut io = std::pin::pin!(io);
    let mut stall = Stall::new(limit);
    std::future::poll_fn(|cx| match io.as_mut().poll(cx) {
        Poll::Ready(r) => Poll::Ready(r),
        Poll::Pending => stall.poll(cx).map(Err),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// A write the other side does not take fails after the limit; waits shorter than the
    /// limit, each with bytes taken between them, do not add up.
    #[tokio::test]
    async fn a_write_nobody_takes_fails_after_the_limit_and_short_waits_do_not_add_up() {
        let limit = Duration::from_millis(200);
        let (mut ours, mut theirs) = tokio::io::duplex(1024);
        let start = std::time::Instant::now();
        let e = within(limit, ours.write_all(&[0u8; 4096]))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= limit, "{:?}", start.elapsed());

        // Drained 1 KiB every 120 ms: each wait shorter than the limit, all of them longer.
        let mut sink = vec![0u8; 1024];
        theirs.read_exact(&mut sink).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut got = 0;
            while got < 8192 {
                tokio::time::sleep(Duration::from_millis(120)).await;
                got += theirs.read(&mut sink).await.unwrap();
            }
            got
        });
        let mut stall = Stall::new(limit);
        let data = [1u8; 8192];
        let mut left = data.len();
        while left > 0 {
            let n = std::future::poll_fn(|cx| {
                match Pin::new(&mut ours).poll_write(cx, &data[data.len() - left..]) {
                    Poll::Ready(r) => {
                        stall.reset();
                        Poll::Ready(r)
                    }
                    Poll::Pending => stall.poll(cx).map(Err),
                }
            })
            .await
            .expect("no wait as long as the limit");
            left -= n;
        }
        assert_eq!(reader.await.unwrap(), 8192);
    }
}
