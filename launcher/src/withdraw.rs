//! Taking a container out of service before it is stopped.
//!
//! A server that gets SIGTERM while the ambassadors still send it new connections drops them,
//! and one killed at once drops the requests in flight too. So before it stops a container
//! with endpoints, the launcher writes `grid/stopping/<host>/<id12>` under its lease; the
//! host's registrator, which watches that directory, deletes the container's endpoints; the
//! launcher waits until they are gone from etcd (the ambassadors and routers follow the same
//! keys), then `--shutdown-delay` for the requests in flight, and only then sends the signal.

use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions};
use schema::records::{self, RECORD_VERSION, StoppingRecord};
use schema::{Dir, HostId, Key, Prefix, ServiceId};
use tokio::time::Instant;
use tracing::{debug, warn};

/// How long the registrator gets to take the endpoints out; past it the stop goes ahead (a
/// registrator that is away would not take them out at all).
const DEREGISTER_WAIT: Duration = Duration::from_secs(5);

/// What a withdrawal needs; cheap to clone into a stopping task.
#[derive(Clone)]
pub struct Withdraw {
    pub client: Client,
    pub prefix: Prefix,
    pub host: HostId,
    /// The launcher's lease: the mark goes with the launcher.
    pub lease: Option<i64>,
    pub delay: Duration,
}

impl Withdraw {
    /// Takes container `id` (named `name`) of `service` out of service and waits as above.
    /// Returns the mark to remove once the container is gone ([`Withdraw::done`]); `None`
    /// when nothing was written (no lease: etcd is away, and nothing is stopped then anyway).
    pub async fn before_stop(&self, service: &ServiceId, id: &str, name: &str) -> Option<String> {
        let lease = self.lease?;
        let short: String = id.chars().take(12).collect();
        let key = self.prefix.key(&Key::Stopping(self.host.clone(), short));
        let value = records::encode(&StoppingRecord {
            v: RECORD_VERSION,
            name: name.to_owned(),
            since: runtime::host::rfc3339_now(),
        });
        // Asked before the mark is written: the registrator may take the endpoint out
        // before a read after it would see it.
        let was_registered = registered(&self.client, &self.prefix, service, id)
            .await
            .unwrap_or(true);
        let mut kv = self.client.kv_client();
        if let Err(e) = kv
            .put(
                key.clone(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
        {
            warn!("cannot mark {name} as stopping: {e}; stopping it without a withdrawal");
            return None;
        }
        let started = Instant::now();
        loop {
            match registered(&self.client, &self.prefix, service, id).await {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => debug!("cannot read the endpoints of {service}: {e}"),
            }
            if started.elapsed() >= DEREGISTER_WAIT {
                warn!(
                    "{name} is still registered {DEREGISTER_WAIT:?} after it was marked as \
                     stopping (is this host's registrator running?); stopping it anyway"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if was_registered && !self.delay.is_zero() {
            debug!(
                "{name} deregistered after {:?}; SIGTERM in {:?}",
                started.elapsed(),
                self.delay
            );
            tokio::time::sleep(self.delay).await;
        }
        Some(key)
    }

    /// Removes the mark of a container that is gone (best effort: it is under the lease).
    pub async fn done(&self, key: Option<String>) {
        if let Some(key) = key {
            if let Err(e) = self.client.kv_client().delete(key.clone(), None).await {
                debug!("cannot delete {key}: {e}; it goes with the lease");
            }
        }
    }
}

/// Whether container `id` is a registered endpoint of `service` (any of its ports).
pub async fn registered(
    client: &Client,
    prefix: &Prefix,
    service: &ServiceId,
    id: &str,
) -> Result<bool, etcd_client::Error> {
    let dir = format!("{}{service}/", prefix.dir(Dir::Services));
    let short: String = id.chars().take(12).collect();
    let needle = format!(":{short}:");
    let r = client
        .kv_client()
        .get(dir, Some(GetOptions::new().with_prefix().with_keys_only()))
        .await?;
    Ok(r.kvs()
        .iter()
        .any(|kv| String::from_utf8_lossy(kv.key()).contains(&needle)))
}
