//! What the ambassador will rely on: a daemon-style watcher (connected the way every daemon
//! connects, through `EtcdArgs`) sees every port portalloc hands out and takes back, in
//! order, across idle periods longer than the request timeout and across an etcd restart.

use std::collections::BTreeMap;
use std::time::Duration;

use portalloc::{Allocator, PortRange};
use runtime::EtcdArgs;
use runtime::watch::{self, Kv, WatchUpdate};
use schema::records::{self, PortAllocRecord};
use schema::{Dir, Key, Prefix, ServicePort};
use testkit::Etcd;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The allocations as the watcher's state shows them: service port -> ambassador port.
fn ports(prefix: &Prefix, state: &BTreeMap<String, Kv>) -> BTreeMap<String, u16> {
    state
        .values()
        .map(|kv| {
            let Ok(Key::PortAlloc(sp)) = prefix.parse(&kv.key) else {
                panic!("unexpected key {}", kv.key);
            };
            let rec: PortAllocRecord = records::decode(&kv.key, &kv.value).unwrap();
            (sp.to_string(), rec.port)
        })
        .collect()
}

async fn until(
    rx: &mut mpsc::Receiver<WatchUpdate>,
    state: &mut BTreeMap<String, Kv>,
    done: impl Fn(&BTreeMap<String, Kv>) -> bool,
) {
    while !done(state) {
        let update = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("watch update within 20 s")
            .expect("watcher running");
        watch::apply(state, update);
    }
}

#[tokio::test]
async fn a_watcher_follows_allocations_and_releases() {
    let mut etcd = Etcd::start().await;
    let mut args = EtcdArgs::local(etcd.endpoints());
    args.timeout = Duration::from_secs(1);
    let prefix = args.prefix.clone();
    let client = args.connect().await.unwrap();
    let alloc = Allocator::new(&client, prefix.clone(), PortRange::DEFAULT);

    let (tx, mut rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    tokio::spawn(watch::watch_prefix(
        client.clone(),
        prefix.dir(Dir::PortAllocs),
        tx,
        shutdown.clone(),
    ));
    let mut state = BTreeMap::new();

    let batch: Vec<ServicePort> = ["shared/mongo:27017", "shared/dns:53/udp", "app/web:80"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let handed = alloc.allocate_many(&batch).await.unwrap();
    let want: BTreeMap<String, u16> = batch.iter().map(ToString::to_string).zip(handed).collect();
    until(&mut rx, &mut state, |s| ports(&prefix, s) == want).await;

    // Idle for longer than the 1 s request timeout: the watch must stay up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    alloc.release(&batch[1]).await.unwrap();
    let mut want = want;
    want.remove("shared/dns:53/udp");
    until(&mut rx, &mut state, |s| ports(&prefix, s) == want).await;

    // etcd restarts; the next allocation reuses the released port and is seen.
    etcd.stop();
    etcd.restart().await;
    let reused = alloc
        .allocate(&"late/job:9000".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(reused, 20001, "the released port comes back first");
    want.insert("late/job:9000/tcp".into(), reused);
    until(&mut rx, &mut state, |s| ports(&prefix, s) == want).await;
}
