//! The prefix watcher: list, follow, resume, re-list.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, CompactionOptions, Txn, TxnOp};
use runtime::watch::{self, Change, Kv, WatchUpdate};
use testkit::Etcd;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Stops the watcher task when the test ends, also on panic.
struct Stop(CancellationToken);
impl Drop for Stop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn next(rx: &mut mpsc::Receiver<WatchUpdate>) -> WatchUpdate {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("a watch update within 20 s")
        .expect("watcher running")
}

async fn etcd_state(client: &mut Client, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    client
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            )
        })
        .collect()
}

fn values(state: &BTreeMap<String, Kv>) -> BTreeMap<String, Vec<u8>> {
    state
        .iter()
        .map(|(k, kv)| (k.clone(), kv.value.clone()))
        .collect()
}

#[tokio::test]
async fn lists_then_follows_changes_one_transaction_at_a_time() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    client.put("/p/a", "1", None).await.unwrap();
    client.put("/p/b", "2", None).await.unwrap();
    client.put("/other", "x", None).await.unwrap();

    let (tx, mut rx) = mpsc::channel(16);
    let stop = Stop(CancellationToken::new());
    tokio::spawn(watch::watch_prefix(
        client.clone(),
        "/p/".into(),
        tx,
        stop.0.clone(),
    ));

    let WatchUpdate::Snapshot { kvs, .. } = next(&mut rx).await else {
        panic!("first update must be a snapshot");
    };
    assert_eq!(
        kvs.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
        ["/p/a", "/p/b"]
    );

    client
        .txn(Txn::new().and_then([TxnOp::put("/p/c", "3", None), TxnOp::delete("/p/a", None)]))
        .await
        .unwrap();
    let WatchUpdate::Changes { changes, .. } = next(&mut rx).await else {
        panic!("expected changes");
    };
    assert_eq!(changes.len(), 2, "one transaction, one update: {changes:?}");
    assert!(matches!(&changes[0], Change::Put(kv) if kv.key == "/p/c" && kv.value == b"3"));
    assert!(matches!(&changes[1], Change::Delete { key, .. } if key == "/p/a"));
}

#[tokio::test]
async fn resumes_after_an_etcd_restart_without_missing_or_repeating() {
    let mut etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    for i in 0..5 {
        client
            .put(format!("/p/k{i}"), "before", None)
            .await
            .unwrap();
    }
    let (tx, mut rx) = mpsc::channel(64);
    let stop = Stop(CancellationToken::new());
    tokio::spawn(watch::watch_prefix(
        etcd.client().await,
        "/p/".into(),
        tx,
        stop.0.clone(),
    ));
    let mut state = BTreeMap::new();
    let mut last_revision = 0;
    let first = next(&mut rx).await;
    assert!(matches!(first, WatchUpdate::Snapshot { .. }));
    watch::apply(&mut state, first);

    etcd.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.restart().await;
    // Written while the watcher is still reconnecting: must be replayed, once.
    let mut client = etcd.client().await;
    client.put("/p/k1", "after", None).await.unwrap();
    client.delete("/p/k2", None).await.unwrap();
    client.put("/p/new", "after", None).await.unwrap();
    let want = etcd_state(&mut client, "/p/").await;

    let mut snapshots = 0;
    while values(&state) != want {
        let update = next(&mut rx).await;
        match &update {
            WatchUpdate::Snapshot { .. } => snapshots += 1,
            WatchUpdate::Changes { revision, changes } => {
                for c in changes {
                    let r = match c {
                        Change::Put(kv) => kv.mod_revision,
                        Change::Delete { mod_revision, .. } => *mod_revision,
                    };
                    assert!(r > last_revision, "revision {r} repeated or out of order");
                    last_revision = r;
                }
                assert_eq!(*revision, last_revision);
            }
        }
        watch::apply(&mut state, update);
    }
    assert_eq!(
        snapshots, 0,
        "resumed from its revision instead of listing again"
    );
}

#[tokio::test]
async fn lists_again_when_its_revision_was_compacted() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    let old = client
        .put("/p/a", "1", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client.put("/p/a", "2", None).await.unwrap();
    let now = client
        .put("/p/b", "3", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client
        .compact(now, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();

    let (tx, mut rx) = mpsc::channel(16);
    let stop = Stop(CancellationToken::new());
    tokio::spawn(watch::watch_prefix_from(
        client.clone(),
        "/p/".into(),
        Some(old),
        tx,
        stop.0.clone(),
    ));
    match next(&mut rx).await {
        WatchUpdate::Snapshot { revision, kvs } => {
            assert_eq!(revision, now);
            let got: Vec<(&str, &[u8])> = kvs
                .iter()
                .map(|kv| (kv.key.as_str(), kv.value.as_slice()))
                .collect();
            assert_eq!(got, [("/p/a", &b"2"[..]), ("/p/b", &b"3"[..])]);
        }
        other => panic!("expected a fresh snapshot, got {other:?}"),
    }
    client.put("/p/c", "4", None).await.unwrap();
    assert!(matches!(next(&mut rx).await, WatchUpdate::Changes { .. }));
}

#[tokio::test]
async fn an_etcd_restored_empty_is_listed_again_not_waited_for() {
    let mut etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    // The old history gets well past the revisions the new one will have.
    for i in 0..20 {
        client.put(format!("/w/old{i}"), "1", None).await.unwrap();
    }
    let (tx, mut rx) = mpsc::channel(16);
    let stop = Stop(CancellationToken::new());
    tokio::spawn(watch::watch_prefix(
        etcd.client().await,
        "/w/".into(),
        tx,
        stop.0.clone(),
    ));
    let mut state = BTreeMap::new();
    watch::apply(&mut state, next(&mut rx).await);
    assert_eq!(state.len(), 20);

    etcd.restart_empty().await;
    let mut fresh = etcd.client().await;
    fresh.put("/w/new", "2", None).await.unwrap();
    // Without noticing, the watcher would wait for revision 22 of a history that is gone and
    // keep the 20 old keys.
    let start = std::time::Instant::now();
    let mut relisted = false;
    while !(relisted && state.keys().map(String::as_str).eq(["/w/new"])) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "still {:?} (listed again: {relisted})",
            state.keys().collect::<Vec<_>>()
        );
        let update = next(&mut rx).await;
        relisted |= matches!(update, WatchUpdate::Snapshot { .. });
        watch::apply(&mut state, update);
    }
}

/// A prefix larger than one gRPC message (4 MiB) is listed in pages at one revision: 2,500
/// keys of 2 KiB (5 MiB), none from beside the prefix, and a write between the pages is not
/// in the snapshot but in the changes after it.
#[tokio::test]
async fn a_prefix_larger_than_a_message_is_listed_in_pages_at_one_revision() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    let value = "v".repeat(2048);
    for chunk in (0..2500).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|i| TxnOp::put(format!("/big/{i:05}"), value.as_str(), None))
            .collect();
        client.txn(Txn::new().and_then(ops)).await.unwrap();
    }
    client.put("/big0", "beside", None).await.unwrap();
    client.put("/bif/x", "before", None).await.unwrap();

    let (tx, mut rx) = mpsc::channel(16);
    let stop = Stop(CancellationToken::new());
    tokio::spawn(watch::watch_prefix(
        client.clone(),
        "/big/".into(),
        tx,
        stop.0.clone(),
    ));
    let WatchUpdate::Snapshot { kvs, revision } = next(&mut rx).await else {
        panic!("first update must be a snapshot");
    };
    assert_eq!(kvs.len(), 2500);
    assert!(kvs.iter().all(|kv| kv.key.starts_with("/big/")));
    assert!(
        kvs.windows(2).all(|w| w[0].key < w[1].key),
        "in key order, none twice"
    );
    assert!(kvs.iter().all(|kv| kv.mod_revision <= revision));
    client.put("/big/99999", "after", None).await.unwrap();
    let WatchUpdate::Changes { changes, .. } = next(&mut rx).await else {
        panic!("expected changes");
    };
    assert!(matches!(&changes[0], Change::Put(kv) if kv.key == "/big/99999"));
}
