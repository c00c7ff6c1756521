//! The lease keeper: keeps a lease alive, keeps it across an etcd restart, re-grants a lost one.

use std::time::Duration;

use etcd_client::PutOptions;
use runtime::lease::{LeaseKeeper, LeaseOptions};
use testkit::Etcd;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn keeps_the_lease_across_restarts_and_regrants_a_lost_one() {
    let mut etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let options = LeaseOptions {
        ttl: Duration::from_secs(2),
        revoke_on_shutdown: true,
    };
    let mut keeper = LeaseKeeper::spawn(client.clone(), options, shutdown.clone());
    let first = keeper.granted().await.unwrap();
    assert_eq!(first.generation, 1);
    let id = first.id.unwrap();
    client
        .put("/alive/me", "x", Some(PutOptions::new().with_lease(id)))
        .await
        .unwrap();

    // Three TTLs later the key is still there: the keeper renews.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(client.get("/alive/me", None).await.unwrap().count(), 1);

    // A short etcd outage does not cost the lease.
    etcd.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.restart().await;
    let mut client = etcd.client().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(keeper.state(), first, "same lease after the restart");
    assert_eq!(client.get("/alive/me", None).await.unwrap().count(), 1);

    // Someone revokes it: the keeper grants a new one and says so.
    client.lease_revoke(id).await.unwrap();
    let mut rx = keeper.subscribe();
    let second = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.generation == 2))
        .await
        .expect("a new lease within 10 s")
        .map(|s| *s)
        .unwrap();
    assert_ne!(second.id, Some(id));
    assert_eq!(client.get("/alive/me", None).await.unwrap().count(), 0);

    // Shutdown revokes the lease, so its keys go at once.
    let new_id = second.id.unwrap();
    client
        .put("/alive/me", "y", Some(PutOptions::new().with_lease(new_id)))
        .await
        .unwrap();
    shutdown.cancel();
    keeper.join().await;
    assert_eq!(client.get("/alive/me", None).await.unwrap().count(), 0);
}
