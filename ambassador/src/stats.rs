//! `stats/<host>`: this ambassador's counters per service port, written every 5 s under a
//! lease of its own, for the UI (`viking ui` sums the hosts). The lease is revoked on a clean
//! stop; after a hand-over (`--upgrade`) it is left to run out, so the key stays until the
//! successor writes it under its own lease.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use runtime::lease::LeasedKey;
use schema::records::{self, RECORD_VERSION, ServiceStats, StatsRecord};
use schema::{HostId, Key};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::server::Shared;

/// How often the record is written.
pub const EVERY: Duration = Duration::from_secs(5);

/// The record now: every TCP and UDP service port this ambassador serves.
pub fn record(shared: &Shared, since: &str) -> StatsRecord {
    let routes = shared.routes();
    let mut services = BTreeMap::new();
    for s in routes.by_port.values() {
        services.insert(
            s.service_port.to_string(),
            ServiceStats {
                active: u64::try_from(s.stats.active.get()).unwrap_or(0),
                connections: s.stats.connections.get(),
                failed: s.stats.failed.get(),
                bytes_up: s.stats.bytes_up.get(),
                bytes_down: s.stats.bytes_down.get(),
            },
        );
    }
    for s in routes.udp_by_port.values() {
        services.insert(
            s.service_port.to_string(),
            ServiceStats {
                active: u64::try_from(s.stats.sessions_active.get()).unwrap_or(0),
                connections: s.stats.sessions.get(),
                failed: s.stats.udp_drop_no_backend.get()
                    + s.stats.udp_drop_limit.get()
                    + s.stats.udp_drop_send.get(),
                bytes_up: s.stats.bytes_up.get(),
                bytes_down: s.stats.bytes_down.get(),
            },
        );
    }
    StatsRecord {
        v: RECORD_VERSION,
        since: since.to_owned(),
        at: runtime::host::rfc3339_now(),
        services,
    }
}

/// Writes the record every [`EVERY`] until `stop`; failures are retried at the next tick.
pub async fn publish(shared: Arc<Shared>, client: Client, stop: CancellationToken) {
    let host = match HostId::new(shared.config.host.as_str()) {
        Ok(h) => h,
        Err(e) => {
            warn!(host = %shared.config.host, "{e}: no stats record is published");
            return;
        }
    };
    let key = shared.config.prefix.key(&Key::Stats(host));
    let since = runtime::host::rfc3339_now();
    let record_key = LeasedKey::start(client, key, EVERY * 3);
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        if !shared.is_synced() {
            continue;
        }
        let value = records::encode(&record(&shared, &since));
        if let Err(e) = record_key.put(value).await {
            debug!("cannot write the stats record: {e}");
        }
    }
    // After a hand-over the successor writes the record (once synced, at its next tick);
    // revoking would take the host's record out of the UI until then.
    if shared
        .handed_over
        .load(std::sync::atomic::Ordering::Acquire)
    {
        record_key.hand_over();
    } else {
        record_key.end().await;
    }
}
