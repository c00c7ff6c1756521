//! Follow everything under a key prefix: list once, then watch from the listed revision.
//!
//! The watcher hands its owner a [`WatchUpdate::Snapshot`] (the whole state under the prefix)
//! and then [`WatchUpdate::Changes`]. After a disconnect it resumes from the last revision it
//! delivered, so nothing is missed or repeated; when that revision was compacted away it lists
//! again and sends a fresh snapshot, which replaces all earlier state. While etcd is away the
//! owner simply hears nothing and keeps serving what it has.

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;

pub use schema::Kv;

/// A change to one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(Kv),
    Delete { key: String, mod_revision: i64 },
}

/// What the watcher tells its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchUpdate {
    /// Everything under the prefix at `revision`. Replaces all state the owner held.
    Snapshot { revision: i64, kvs: Vec<Kv> },
    /// Changes of one watch response, in revision order (one etcd transaction is never split).
    Changes { revision: i64, changes: Vec<Change> },
}

/// Why the watcher stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum WatchEnd {
    Shutdown,
    /// The owner dropped its receiver.
    ReceiverGone,
}

/// Keys per page of a list: a prefix larger than a gRPC message (4 MiB) is read in pages,
/// all at the first page's revision.
const LIST_PAGE: i64 = 1000;

/// Everything under `prefix` at one revision, in pages of [`LIST_PAGE`], and the first
/// page's header.
async fn list(
    client: &mut Client,
    prefix: &str,
) -> Result<(Option<etcd_client::ResponseHeader>, Vec<Kv>), etcd_client::Error> {
    let end = prefix_end(prefix.as_bytes());
    let first = client
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_limit(LIST_PAGE)),
        )
        .await?;
    let header = first.header().cloned();
    let revision = header.as_ref().map_or(0, |h| h.revision());
    let mut kvs: Vec<Kv> = first.kvs().iter().map(to_kv).collect();
    let mut more = first.more();
    while more {
        let Some(last) = kvs.last() else { break };
        let mut from = last.key.as_bytes().to_vec();
        from.push(0);
        let page = client
            .get(
                from,
                Some(
                    GetOptions::new()
                        .with_range(end.clone())
                        .with_limit(LIST_PAGE)
                        .with_revision(revision),
                ),
            )
            .await?;
        kvs.extend(page.kvs().iter().map(to_kv));
        more = page.more() && !page.kvs().is_empty();
    }
    Ok((header, kvs))
}

/// The end of the key range that holds every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

/// Lists and watches `prefix` until `shutdown` fires or `tx` is dropped. Never gives up on
/// etcd: errors are logged and retried with backoff.
///
/// `tx` is bounded: a slow owner slows the watcher, and etcd buffers (and eventually cancels a
/// watcher that falls too far behind, which this resumes from).
pub async fn watch_prefix(
    client: Client,
    prefix: String,
    tx: mpsc::Sender<WatchUpdate>,
    shutdown: CancellationToken,
) -> WatchEnd {
    watch_prefix_from(client, prefix, None, tx, shutdown).await
}

/// Like [`watch_prefix`], for an owner that has already seen everything up to `seen`: it
/// watches from `seen + 1` without listing first (and lists if `seen` was compacted away).
pub async fn watch_prefix_from(
    mut client: Client,
    prefix: String,
    mut seen: Option<i64>,
    tx: mpsc::Sender<WatchUpdate>,
    shutdown: CancellationToken,
) -> WatchEnd {
    let mut backoff = Backoff::default();
    // The cluster the listed state came from, to notice an etcd that is not it any more.
    let mut history = History::default();
    loop {
        if shutdown.is_cancelled() {
            return WatchEnd::Shutdown;
        }
        let revision = match seen {
            Some(revision) => revision,
            None => {
                let listed = tokio::select! {
                    r = list(&mut client, &prefix) => r,
                    () = shutdown.cancelled() => return WatchEnd::Shutdown,
                };
                match listed {
                    Ok((header, kvs)) => {
                        let revision = header.as_ref().map_or(0, |h| h.revision());
                        history = History::default();
                        history.saw(header.as_ref());
                        debug!(prefix, revision, "listed");
                        if tx
                            .send(WatchUpdate::Snapshot { revision, kvs })
                            .await
                            .is_err()
                        {
                            return WatchEnd::ReceiverGone;
                        }
                        seen = Some(revision);
                        revision
                    }
                    Err(e) => {
                        warn!(prefix, error = %e, "etcd list failed; retrying");
                        if !backoff.wait(&shutdown).await {
                            return WatchEnd::Shutdown;
                        }
                        continue;
                    }
                }
            }
        };

        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1)
            .with_progress_notify();
        let started = tokio::select! {
            r = client.watch(prefix.as_str(), Some(options)) => r,
            () = shutdown.cancelled() => return WatchEnd::Shutdown,
        };
        let mut stream = match started {
            Ok(stream) => stream,
            Err(e) => {
                warn!(prefix, error = %e, "etcd watch failed to start; retrying");
                if !backoff.wait(&shutdown).await {
                    return WatchEnd::Shutdown;
                }
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                () = shutdown.cancelled() => return WatchEnd::Shutdown,
            };
            let resp = match message {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    warn!(prefix, "etcd closed the watch; resuming");
                    break;
                }
                Err(e) => {
                    warn!(prefix, error = %e, "etcd watch broke; resuming");
                    break;
                }
            };
            if let Some(why) = history.broken(resp.header(), seen) {
                warn!(
                    prefix,
                    "{why}: etcd was restored or replaced (or this member is behind); listing everything again"
                );
                seen = None;
                break;
            }
            history.saw(resp.header());
            if resp.compact_revision() > 0 {
                info!(
                    prefix,
                    compacted = resp.compact_revision(),
                    "watch revision was compacted; listing again"
                );
                seen = None;
                break;
            }
            if resp.canceled() {
                warn!(
                    prefix,
                    reason = resp.cancel_reason(),
                    "etcd canceled the watch; resuming"
                );
                break;
            }
            if resp.created() {
                backoff.reset();
            }
            if resp.events().is_empty() {
                continue;
            }
            let mut changes = Vec::with_capacity(resp.events().len());
            let mut last = seen.unwrap_or(0);
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                last = last.max(kv.mod_revision());
                changes.push(match event.event_type() {
                    EventType::Put => Change::Put(to_kv(kv)),
                    EventType::Delete => Change::Delete {
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        mod_revision: kv.mod_revision(),
                    },
                });
            }
            if tx
                .send(WatchUpdate::Changes {
                    revision: last,
                    changes,
                })
                .await
                .is_err()
            {
                return WatchEnd::ReceiverGone;
            }
            seen = Some(last);
        }
        if !backoff.wait(&shutdown).await {
            return WatchEnd::Shutdown;
        }
    }
}

/// What the watcher knows of the etcd history it follows, from response headers: a cluster
/// whose id changed, whose revision went below what was seen, or whose raft term went back is
/// another history (an etcd wiped and started again, or restored from an old snapshot), and
/// what was seen of the old one must not be kept.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct History {
    cluster_id: Option<u64>,
    raft_term: u64,
}

impl History {
    fn saw(&mut self, header: Option<&etcd_client::ResponseHeader>) {
        if let Some(h) = header {
            self.cluster_id.get_or_insert(h.cluster_id());
            self.raft_term = self.raft_term.max(h.raft_term());
        }
    }

    /// Why `header` cannot belong to the history seen up to revision `seen`, if it cannot.
    fn broken(
        &self,
        header: Option<&etcd_client::ResponseHeader>,
        seen: Option<i64>,
    ) -> Option<String> {
        let h = header?;
        if let Some(id) = self.cluster_id.filter(|id| *id != h.cluster_id()) {
            return Some(format!(
                "the etcd cluster id changed ({id:x} -> {:x})",
                h.cluster_id()
            ));
        }
        if let Some(seen) = seen.filter(|s| h.revision() < *s) {
            return Some(format!(
                "etcd's revision went back from {seen} to {}",
                h.revision()
            ));
        }
        if h.raft_term() < self.raft_term {
            return Some(format!(
                "etcd's raft term went back from {} to {}",
                self.raft_term,
                h.raft_term()
            ));
        }
        None
    }
}

/// etcd's key-value as the one type every reader keeps.
pub fn to_kv(kv: &etcd_client::KeyValue) -> Kv {
    Kv {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

/// The keys of a range read, by key, as [`Kv`]s.
pub fn to_map(kvs: &[etcd_client::KeyValue]) -> std::collections::BTreeMap<String, Kv> {
    kvs.iter()
        .map(|kv| {
            let kv = to_kv(kv);
            (kv.key.clone(), kv)
        })
        .collect()
}

/// Applies updates to a plain map, the way most owners keep their state.
pub fn apply(state: &mut std::collections::BTreeMap<String, Kv>, update: WatchUpdate) {
    match update {
        WatchUpdate::Snapshot { kvs, .. } => {
            state.clear();
            state.extend(kvs.into_iter().map(|kv| (kv.key.clone(), kv)));
        }
        WatchUpdate::Changes { changes, .. } => {
            for change in changes {
                match change {
                    Change::Put(kv) => {
                        state.insert(kv.key.clone(), kv);
                    }
                    Change::Delete { key, .. } => {
                        state.remove(&key);
                    }
                }
            }
        }
    }
}
