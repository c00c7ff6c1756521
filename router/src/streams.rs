//! An HTTP/2 connection's streams run in the connection's own task.
//!
//! hyper's HTTP/2 server hands each stream (the request's service future and its response's
//! way out) to an executor. With tokio's that is a task per request, and a wake-up of the
//! connection's task from another one for every response it sends (and one of the stream's for
//! every window update). HAProxy and nginx serve a connection's streams in its own turn. Here
//! [`Streams`] is the executor: it queues the streams, and [`driving`] polls them in the
//! connection's task beside the connection, which is polled again after them so that what
//! they answered is framed in the same turn (and, with `batch`, written in the same write).
//! A connection's streams share its thread, as they do in HAProxy and nginx.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use futures_util::task::AtomicWaker;

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor of one connection's streams (cloned into hyper's builder).
#[derive(Clone, Default)]
pub struct Streams(Arc<Queue>);

#[derive(Default)]
struct Queue {
    new: Mutex<Vec<Stream>>,
    /// The connection's task, to poll what came.
    task: AtomicWaker,
}

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        self.0
            .new
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::pin(stream));
        self.0.task.wake();
    }
}

/// Drives `conn` and the streams it hands to `streams`, in the calling task; ends with `conn`
/// (streams still running then are dropped: their connection is gone).
pub async fn driving<F: Future>(streams: Streams, conn: F) -> F::Output {
    let mut conn = std::pin::pin!(conn);
    let mut running = FuturesUnordered::<Stream>::new();
    std::future::poll_fn(|cx| {
        streams.0.task.register(cx.waker());
        if let Poll::Ready(out) = conn.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        let new = std::mem::take(&mut *streams.0.new.lock().unwrap_or_else(|p| p.into_inner()));
        running.extend(new);
        if running.is_empty() {
            return Poll::Pending;
        }
        while let Poll::Ready(Some(())) = running.poll_next_unpin(cx) {}
        // What the streams answered, framed now rather than in another turn.
        conn.as_mut().poll(cx)
    })
    .await
}

#[cfg(test)]
mod tests {
    use hyper::rt::Executor;

    use super::*;

    /// Streams handed over while the connection runs are polled in its task (nothing else
    /// polls them: no task is spawned), again when they wake, and what they do reaches the
    /// connection.
    #[tokio::test]
    async fn streams_run_in_the_connections_task_and_the_connection_sees_their_work() {
        let streams = Streams::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let exec = streams.clone();
        let mut started = false;
        let mut got = Vec::new();
        // The "connection": starts two streams, and ends once both have answered.
        let conn = std::future::poll_fn(|cx| {
            if !std::mem::replace(&mut started, true) {
                for n in 0..2 {
                    let tx = tx.clone();
                    exec.execute(async move {
                        tokio::task::yield_now().await;
                        let _ = tx.send(n);
                    });
                }
            }
            while let Poll::Ready(Some(n)) = rx.poll_recv(cx) {
                got.push(n);
            }
            if got.len() == 2 {
                Poll::Ready(std::mem::take(&mut got))
            } else {
                Poll::Pending
            }
        });
        let limit = std::time::Duration::from_secs(5);
        let mut ended = tokio::time::timeout(limit, driving(streams, conn))
            .await
            .expect("the streams ran and the connection ended");
        ended.sort_unstable();
        assert_eq!(ended, vec![0, 1]);
    }
}
