//! A lease that stays alive as long as its process does.
//!
//! The keeper grants a lease, renews it every TTL/3, and when etcd says the lease is gone
//! (expired while this process was cut off, or revoked by someone) grants a new one and bumps
//! [`LeaseState::generation`]: the owner then writes its leased keys again. While etcd is
//! unreachable the keeper keeps the old id and keeps trying: etcd refreshes all leases when a
//! leader comes back, so a short outage must not cost the owner its keys.

use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;

/// The keeper's view of its lease, published through a `watch` channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseState {
    /// The lease id, `None` until the first grant succeeds.
    pub id: Option<i64>,
    /// Bumped on every new lease: keys written under an older generation are gone.
    pub generation: u64,
}

/// Options of a [`LeaseKeeper`].
#[derive(Debug, Clone, Copy)]
pub struct LeaseOptions {
    /// Time to live; a process that stops renewing loses its keys after this long.
    pub ttl: Duration,
    /// Revoke on shutdown, so the keys vanish at once instead of after `ttl`. Off for agents
    /// that restart in place and re-own their keys.
    pub revoke_on_shutdown: bool,
}

pub struct LeaseKeeper {
    state: watch::Receiver<LeaseState>,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    /// Starts keeping a lease; runs until `shutdown` fires.
    pub fn spawn(client: Client, options: LeaseOptions, shutdown: CancellationToken) -> Self {
        let (tx, state) = watch::channel(LeaseState::default());
        let task = tokio::spawn(keep(client, options, tx, shutdown));
        Self { state, task }
    }

    /// A receiver that sees every new lease.
    pub fn subscribe(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// The current state without waiting.
    pub fn state(&self) -> LeaseState {
        *self.state.borrow()
    }

    /// Waits until a lease exists and returns its state; `None` if the keeper stopped.
    pub async fn granted(&mut self) -> Option<LeaseState> {
        self.state
            .wait_for(|s| s.id.is_some())
            .await
            .ok()
            .map(|s| *s)
    }

    /// Waits for the keeper to finish (after shutdown), including the optional revoke.
    pub async fn join(self) {
        let _ = self.task.await;
    }

    /// Stops keeping the lease without revoking it: it runs out within its TTL, and what is
    /// attached to it stays until then.
    pub fn abandon(self) {
        self.task.abort();
    }
}

async fn keep(
    mut client: Client,
    options: LeaseOptions,
    tx: watch::Sender<LeaseState>,
    shutdown: CancellationToken,
) {
    let ttl_secs = i64::try_from(options.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
    let interval = (options.ttl / 3).max(Duration::from_millis(100));
    let mut backoff = Backoff::default();
    let mut generation = 0u64;
    'grant: loop {
        let id = loop {
            let granted = tokio::select! {
                r = client.lease_grant(ttl_secs, None) => r,
                () = shutdown.cancelled() => return,
            };
            match granted {
                Ok(resp) => break resp.id(),
                Err(e) => {
                    warn!(error = %e, "etcd lease grant failed; retrying");
                    if !backoff.wait(&shutdown).await {
                        return;
                    }
                }
            }
        };
        generation += 1;
        info!(lease = id, generation, ttl_secs, "lease granted");
        tx.send_replace(LeaseState {
            id: Some(id),
            generation,
        });
        backoff.reset();

        loop {
            // Opening waits for etcd's first answer, which no request timeout covers: a member
            // that takes the stream but cannot reach a leader would hold the keeper for good.
            let opened = tokio::select! {
                r = tokio::time::timeout(options.ttl.max(Duration::from_secs(1)), client.lease_keep_alive(id)) => r,
                () = shutdown.cancelled() => break 'grant,
            };
            let Ok(opened) = opened else {
                warn!(
                    lease = id,
                    "no answer to the keep-alive stream in time; reconnecting"
                );
                if !backoff.wait(&shutdown).await {
                    break 'grant;
                }
                continue;
            };
            match opened {
                Ok((mut keeper, mut stream)) => loop {
                    if let Err(e) = keeper.keep_alive().await {
                        warn!(lease = id, error = %e, "lease keep-alive send failed; reconnecting");
                        break;
                    }
                    let answered = tokio::select! {
                        r = tokio::time::timeout(interval.max(Duration::from_secs(1)), stream.message()) => r,
                        () = shutdown.cancelled() => break 'grant,
                    };
                    match answered {
                        Ok(Ok(Some(resp))) if resp.ttl() <= 0 => {
                            warn!(lease = id, "lease expired in etcd; granting a new one");
                            continue 'grant;
                        }
                        Ok(Ok(Some(resp))) => {
                            debug!(lease = id, ttl = resp.ttl(), "lease renewed");
                            backoff.reset();
                        }
                        Ok(Ok(None)) => {
                            warn!(
                                lease = id,
                                "etcd closed the keep-alive stream; reconnecting"
                            );
                            break;
                        }
                        Ok(Err(e)) => {
                            if is_lease_not_found(&e) {
                                warn!(lease = id, "lease not found in etcd; granting a new one");
                                continue 'grant;
                            }
                            warn!(lease = id, error = %e, "lease keep-alive failed; reconnecting");
                            break;
                        }
                        Err(_) => {
                            warn!(lease = id, "no keep-alive answer in time; reconnecting");
                            break;
                        }
                    }
                    tokio::select! {
                        () = tokio::time::sleep(interval) => {}
                        () = shutdown.cancelled() => break 'grant,
                    }
                },
                Err(e) if is_lease_not_found(&e) => {
                    warn!(lease = id, "lease not found in etcd; granting a new one");
                    continue 'grant;
                }
                Err(e) => warn!(lease = id, error = %e, "lease keep-alive failed to start"),
            }
            if !backoff.wait(&shutdown).await {
                break 'grant;
            }
        }
    }
    // Shutdown with a lease in hand.
    if options.revoke_on_shutdown {
        let current = tx.borrow().id;
        if let Some(id) = current {
            match tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(id)).await {
                Ok(Ok(_)) => info!(lease = id, "lease revoked"),
                // An expired lease answers "lease not found": nothing left to revoke.
                Ok(Err(e)) if is_lease_not_found(&e) => {}
                Ok(Err(e)) => {
                    warn!(lease = id, error = %e, "lease revoke failed; keys expire with the TTL")
                }
                Err(_) => warn!(
                    lease = id,
                    "lease revoke timed out; keys expire with the TTL"
                ),
            }
        }
    }
}

fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::NotFound || s.message().contains("lease not found")
        }
        other => other.to_string().contains("lease not found"),
    }
}

/// One key kept under a lease of its own and rewritten by its owner now and then (a status
/// record such as `stats/<host>`): gone within the TTL if the process dies, at once when
/// [`LeasedKey::end`] revokes the lease.
pub struct LeasedKey {
    key: String,
    client: Client,
    keeper: LeaseKeeper,
    state: watch::Receiver<LeaseState>,
    stop: CancellationToken,
}

impl LeasedKey {
    /// Starts keeping a lease of `ttl` for `key`; nothing is written until [`LeasedKey::put`].
    pub fn start(client: Client, key: String, ttl: Duration) -> LeasedKey {
        let stop = CancellationToken::new();
        let keeper = LeaseKeeper::spawn(
            client.clone(),
            LeaseOptions {
                ttl,
                revoke_on_shutdown: true,
            },
            stop.clone(),
        );
        let state = keeper.subscribe();
        LeasedKey {
            key,
            client,
            keeper,
            state,
            stop,
        }
    }

    /// Writes `value` under the lease; `Ok(false)` while no lease is granted yet.
    pub async fn put(&self, value: String) -> Result<bool, etcd_client::Error> {
        let Some(id) = self.state.borrow().id else {
            return Ok(false);
        };
        self.client
            .kv_client()
            .put(
                self.key.clone(),
                value,
                Some(etcd_client::PutOptions::new().with_lease(id)),
            )
            .await?;
        Ok(true)
    }

    /// Revokes the lease (the key goes with it) and waits for the keeper.
    pub async fn end(self) {
        self.stop.cancel();
        self.keeper.join().await;
    }

    /// Leaves the key to a successor that writes it under a lease of its own: the lease is
    /// not revoked, so the key stays (for at most the TTL) until the successor's first write
    /// moves it to the successor's lease.
    pub fn hand_over(self) {
        self.keeper.abandon();
    }
}
