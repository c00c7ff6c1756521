//! The admin server: `/metrics` (Prometheus text), `/healthz` (200 once routes were read from
//! etcd), `/state` (JSON: listeners, backends, counters), on the daemons' shared server
//! (`runtime::admin`, hyper's HTTP/1.1).

use std::sync::Arc;

use runtime::admin::Answer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::Shared;

/// Serves until `shutdown` fires.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let answer = move |path: &str| match path {
        "/metrics" => Answer::metrics(shared.metrics_text()),
        "/healthz" => Answer::health(
            shared.is_synced(),
            "not synced: routes not yet read from etcd",
        ),
        "/state" => Answer::json(&shared.state_json()),
        _ => Answer::not_found(),
    };
    runtime::admin::serve(listener, answer, shutdown).await;
}
