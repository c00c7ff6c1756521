//! The admin server: `/metrics` (Prometheus text), `/healthz` (200 once the routes were read
//! from etcd), `/state` (JSON: routes, backends, certificates), on the daemons' shared server (`runtime::admin`, hyper's HTTP/1.1).

use std::sync::Arc;

use runtime::admin::Answer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::state::State;

/// Serves until `stop`.
pub async fn serve(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    let answer = move |path: &str| match path {
        "/metrics" => Answer::metrics(state.metrics.text()),
        "/healthz" => Answer::health(state.is_synced(), "routes not read from etcd yet"),
        "/state" => Answer::json(&state.state_json()),
        _ => Answer::not_found(),
    };
    runtime::admin::serve(listener, answer, stop).await;
}
