//! One shutdown primitive for every process: a `CancellationToken`.
//!
//! The first SIGTERM or SIGINT cancels the token: accept loops stop, tasks drain within their
//! grace period and say what they cut off. A second signal exits at once with status 130, for
//! the operator who does not want to wait. An accept loop that stops takes what waits in its
//! listening socket's queue first ([`crate::accept::Listener::take_waiting`]): closing the
//! socket would reset it.

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
