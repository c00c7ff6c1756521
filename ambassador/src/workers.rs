//! The threads that accept and relay connections, each a single-threaded tokio runtime.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The threads that accept and relay: the calling runtime, and one more single-threaded
/// runtime on a thread of its own per extra thread. A connection lives on the thread whose
/// socket accepted it, so no connection's wake-ups cross threads (tokio's multi-threaded
/// scheduler measured dearer per connection on 2 cores); the threads' sockets share each port
/// (SO_REUSEPORT) and `steer` picks which of them take new connections.
pub(crate) struct Workers {
    pub(crate) handles: Vec<tokio::runtime::Handle>,
    /// Where each thread's CPU time is read (`steer`); the calling runtime's thread first.
    pub(crate) cpu: Vec<Option<std::path::PathBuf>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Workers {
    pub(crate) fn start(count: usize) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut workers = Workers {
            handles: vec![tokio::runtime::Handle::current()],
            cpu: vec![crate::steer::this_thread()],
            threads: Vec::new(),
            stop: stop.clone(),
        };
        for i in 1..count.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.handles.push(rt.handle().clone());
            let stop = stop.clone();
            let (cpu_tx, cpu_rx) = std::sync::mpsc::sync_channel(1);
            let thread = std::thread::Builder::new()
                .name(format!("ambassador-{i}"))
                .spawn(move || {
                    let _ = cpu_tx.send(crate::steer::this_thread());
                    rt.block_on(stop.cancelled());
                })?;
            workers.cpu.push(cpu_rx.recv().ok().flatten());
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// Ends the extra threads (their connections have ended or been cut by now).
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// Keeps a timer due sooner than any connect deadline. tokio wakes its I/O driver (a write to
/// an eventfd) whenever a new timer is due before the driver's next planned wake-up, which
/// every connection's connect timeout would otherwise be: one system call per connection,
/// measured with strace, traded for two wake-ups a second.
pub(crate) async fn keep_timer_due(connect_timeout: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval((connect_timeout / 2).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
    }
}
