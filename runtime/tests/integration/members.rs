//! A daemon's client sends no request to a stopped etcd member, and sends again once it is back.

use runtime::EtcdArgs;
use runtime::members::INTERVAL;
use testkit::EtcdCluster;
use tokio_util::sync::CancellationToken;

/// `n` reads in a row through `client`: how many failed, and which members answered the rest.
async fn reads(client: &mut etcd_client::Client, n: usize) -> (usize, Vec<u64>) {
    let mut failed = 0;
    let mut answered = Vec::new();
    for _ in 0..n {
        match client.get("/probe", None).await {
            Ok(r) => answered.push(r.header().map_or(0, |h| h.member_id())),
            Err(_) => failed += 1,
        }
    }
    (failed, answered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_avoid_a_stopped_member_and_return_to_it() {
    let mut cluster = EtcdCluster::start().await;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let args = EtcdArgs::local(cluster.endpoints());
    let mut client = args.connect_daemon(&shutdown).await.expect("connect");

    // A follower, so the others keep a leader and every read can succeed.
    let victim = (cluster.leader().await + 1) % 3;
    let url = cluster.endpoints()[victim].clone();
    let mut one = etcd_client::Client::connect([url.as_str()], None)
        .await
        .expect("connect to the member");
    let victim_id = one
        .status()
        .await
        .expect("status")
        .header()
        .expect("header")
        .member_id();

    let (failed, answered) = reads(&mut client, 60).await;
    assert_eq!(failed, 0, "reads failed with every member up");
    assert!(
        answered.contains(&victim_id),
        "60 reads never reached member {victim}: the client does not spread them"
    );

    cluster.stop(victim);
    // Two rounds of asking, plus the time a round may take.
    tokio::time::sleep(INTERVAL * 3).await;
    let (failed, answered) = reads(&mut client, 200).await;
    assert_eq!(
        failed, 0,
        "{failed} of 200 reads failed with member {victim} stopped: requests still go to it"
    );
    assert!(!answered.contains(&victim_id));

    cluster.restart(victim).await;
    tokio::time::sleep(INTERVAL * 3).await;
    let (failed, answered) = reads(&mut client, 60).await;
    assert_eq!(failed, 0, "reads failed after member {victim} came back");
    assert!(
        answered.contains(&victim_id),
        "60 reads after member {victim} came back never reached it: it was not put back"
    );
}
