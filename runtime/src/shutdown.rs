//! One shutdown primitive for every process: a `CancellationToken`.
//!
//! The first SIGTERM or SIGINT cancels the token: accept loops stop, tasks drain within their
//! grace period and say what they cut off. A second signal exits at once with status 130, for
//! the operator who does not want to wait. An accept loop that stops takes what waits in its
//! listening socket's queue first ([`take_waiting`]): closing the socket would reset it.

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A token cancelled by the first SIGTERM or SIGINT. Needs a running tokio runtime.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let which = wait_for_signal().await;
        info!(
            signal = which,
            "shutting down; send it again to exit at once"
        );
        cancel.cancel();
        let again = wait_for_signal().await;
        warn!(signal = again, "second signal: exiting now");
        std::process::exit(i32::from(crate::process::INTERRUPTED));
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can only be killed; never resolve.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "ctrl-c"
}

/// At a stop, before a listening socket closes: the next connection waiting in its queue,
/// taken without waiting for readiness (`None` once the kernel says the queue is empty, or
/// when accept fails). The clients of those have connected and may have sent their first
/// bytes; closing the socket would reset them.
pub fn take_waiting(
    listener: &tokio::net::TcpListener,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    use rustix::net::SocketFlags;
    let taken = rustix::net::accept_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)
        .map_err(std::io::Error::from)
        .and_then(|fd| {
            let stream = std::net::TcpStream::from(fd);
            let peer = stream.peer_addr()?;
            Ok((tokio::net::TcpStream::from_std(stream)?, peer))
        });
    match taken {
        Ok(taken) => Some(taken),
        Err(e) => {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                tracing::debug!(error = %e, "accept failed while stopping");
            }
            None
        }
    }
}
