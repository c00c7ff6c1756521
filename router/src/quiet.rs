//! An HTTP/2 connection that has no stream open for the head timeout is closed, as an idle
//! HTTP/1.1 keep-alive connection is: without it a client that finished its handshake and
//! then sent nothing (or went away without a word) kept its connection, and its permit under
//! `--max-connections`, for as long as the router ran. hyper's HTTP/2 server has no idle
//! timeout, and its keep-alive pings go out only while streams are open.
//!
//! A stream counts as open from its request to the end (or drop) of its response body
//! ([`Open`], carried by [`Counted`]). [`quiet`] looks once a head timeout: a connection with
//! no stream open and none begun or ended since it last looked is quiet, so it is closed
//! between one and two head timeouts after its last stream ended (or after its handshake).
//! Per stream that costs two atomic additions and two stores; per connection one timer, reset
//! once a head timeout.
//!
//! An upgraded connection (a WebSocket, `proxy`'s tunnel) is watched the same way, stirred by
//! every read either way and quiet after `--tunnel-timeout` without one: a client or a backend
//! gone without a word kept it, its permit and its backend connection.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};

/// The streams of one HTTP/2 connection.
#[derive(Debug, Default)]
pub struct Streams {
    open: AtomicU32,
    /// A stream began or ended since [`quiet`] last looked.
    stirred: AtomicBool,
}

/// A stream, open until dropped.
pub struct Open(Arc<Streams>);

impl Streams {
    /// Something happened (for a tunnel: bytes passed): not quiet for another period.
    pub fn stir(&self) {
        self.stirred.store(true, Ordering::Relaxed);
    }
}

impl Open {
    pub fn new(streams: &Arc<Streams>) -> Self {
        streams.open.fetch_add(1, Ordering::Relaxed);
        streams.stirred.store(true, Ordering::Relaxed);
        Self(streams.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.stirred.store(true, Ordering::Relaxed);
    }
}

/// Returns once the connection has had no stream open for at least `period` (at most twice
/// that).
pub async fn quiet(streams: &Streams, period: Duration) {
    let mut timer = std::pin::pin!(tokio::time::sleep(period));
    loop {
        timer.as_mut().await;
        let stirred = streams.stirred.swap(false, Ordering::Relaxed);
        if !stirred && streams.open.load(Ordering::Relaxed) == 0 {
            return;
        }
        timer.as_mut().reset(tokio::time::Instant::now() + period);
    }
}

/// A response body that keeps its stream open until it ends or is dropped.
pub struct Counted<B> {
    inner: B,
    _open: Open,
}

impl<B> Counted<B> {
    pub fn new(inner: B, open: Open) -> Self {
        Self { inner, _open: open }
    }
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Quiet only once a whole period has passed with no stream open and none begun or ended.
    #[tokio::test]
    async fn a_connection_is_quiet_a_period_after_its_last_stream() {
        let period = Duration::from_millis(50);
        let streams = Arc::new(Streams::default());
        let start = Instant::now();
        quiet(&streams, period).await;
        let waited = start.elapsed();
        assert!(waited >= period, "no stream at all: {waited:?}");

        // A stream open across two periods and a half.
        let open = Open::new(&streams);
        let watch = tokio::spawn({
            let streams = streams.clone();
            async move { quiet(&streams, period).await }
        });
        tokio::time::sleep(period * 5 / 2).await;
        assert!(!watch.is_finished(), "quiet with a stream open");
        let ended = Instant::now();
        drop(open);
        watch.await.unwrap();
        let waited = ended.elapsed();
        assert!(waited >= period, "quiet {waited:?} after the stream ended");
        assert!(
            waited < Duration::from_secs(2),
            "still not quiet after {waited:?}"
        );
    }
}
