//! `--watch`: membership from `/viking/hosts/` in etcd, applied within a second.

use std::time::Duration;

use testkit::Etcd;

use crate::{Site, spawn_watch};

async fn put_host(client: &etcd_client::Client, name: &str, addr: &str) {
    put_host_with_roles(client, name, addr, "").await;
}

/// `roles`: the JSON list's inside, e.g. `"router"`.
async fn put_host_with_roles(client: &etcd_client::Client, name: &str, addr: &str, roles: &str) {
    let value =
        format!(r#"{{"v":1,"host":"{name}","addr":"{addr}","roles":[{roles}],"labels":{{}}}}"#);
    client
        .kv_client()
        .put(format!("/viking/hosts/{name}"), value, None)
        .await
        .expect("put host");
}

#[tokio::test]
async fn hosts_added_and_removed_in_etcd_open_and_close_within_a_second() {
    let mut site = Site::start();
    let root = site.lan.join_root();
    let etcd = Etcd::start_on(&root.to_string()).await;
    let client = etcd.client().await;
    put_host(&client, "b", &site.lan.addr("b").to_string()).await;
    put_host(&client, "broken", "not-an-address").await;
    let watcher = spawn_watch(&site, &["--etcd", &etcd.endpoint(), "--host", "a"]);

    // Blocking polls are fine here: locknet and etcd are processes of their own.
    let wait = |from: &str, can: bool| site.until_reach(from, 9999, can, Duration::from_secs(5));
    wait("b", true);
    wait("out", false);
    assert!(
        watcher.log().contains("not-an-address"),
        "no warning about the bad host record:\n{}",
        watcher.log()
    );

    put_host(&client, "out", &site.lan.addr("out").to_string()).await;
    let opened = wait("out", true);
    client
        .kv_client()
        .delete("/viking/hosts/out", None)
        .await
        .expect("delete");
    let closed = wait("out", false);
    eprintln!("opened {opened:?}, closed {closed:?} after the etcd write");
    assert!(opened < Duration::from_secs(1), "opened after {opened:?}");
    assert!(closed < Duration::from_secs(1), "closed after {closed:?}");
    assert!(
        watcher.log().contains("membership applied"),
        "{}",
        watcher.log()
    );

    // Its status, for `viking ui`: the members admitted now (b) and what it dropped (the
    // outsider's tries), under a lease, every 5 s.
    let status = testkit::eventually_async(Duration::from_secs(15), "firewall/a", || {
        let mut kv = client.kv_client();
        async move {
            let r = kv.get("/viking/firewall/a", None).await.ok()?;
            let kv = r.kvs().first()?;
            let v: serde_json::Value = serde_json::from_slice(kv.value()).ok()?;
            (kv.lease() != 0 && v["members"] == 1 && v["table"] == true).then_some(v)
        }
    })
    .await;
    assert!(
        status["dropped_packets"].as_u64().unwrap_or(0) > 0,
        "{status}"
    );
}

#[tokio::test]
async fn a_change_after_which_etcd_does_not_answer_is_rolled_back() {
    let mut site = Site::start();
    let root = site.lan.join_root();
    let etcd = Etcd::start_on(&root.to_string()).await;
    let client = etcd.client().await;
    // Applied by hand first: members a and b, and the router's web ports.
    site.admit(&["a", "b"], &["--router"]);
    let before = site.table("inet", "locknet");

    // etcd now lists the outsider too, and the rules differ (no --router): a full replace.
    // A check timeout of zero means etcd never answers in time, so it must be undone.
    put_host(&client, "b", &site.lan.addr("b").to_string()).await;
    put_host(&client, "out", &site.lan.addr("out").to_string()).await;
    let watcher = spawn_watch(
        &site,
        &["--etcd", &etcd.endpoint(), "--check-timeout", "0s"],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !watcher.log().contains("rolled back") {
        assert!(
            std::time::Instant::now() < deadline,
            "no roll-back:\n{}",
            watcher.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(site.table("inet", "locknet"), before, "{}", watcher.log());
    assert_eq!(site.reach("out", "a", 9999), None);
    assert_eq!(site.reach("out", "a", 80).as_deref(), Some("a:80"));
}

#[tokio::test]
async fn a_table_flushed_behind_its_back_is_applied_again() {
    let mut site = Site::start();
    let root = site.lan.join_root();
    let etcd = Etcd::start_on(&root.to_string()).await;
    let client = etcd.client().await;
    put_host(&client, "b", &site.lan.addr("b").to_string()).await;
    let mut watcher = spawn_watch(&site, &["--etcd", &etcd.endpoint(), "--resync", "1s"]);
    watcher.wait_log("ruleset applied", Duration::from_secs(10));
    let wait = |from: &str, can: bool| site.until_reach(from, 9999, can, Duration::from_secs(5));
    wait("out", false);

    // Gone: the host would be open to everyone until the next membership change.
    let out = site
        .lan
        .ns("a")
        .command("nft")
        .args(["delete", "table", "inet", "locknet"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let line = watcher.wait_log("is gone or was changed", Duration::from_secs(5));
    assert!(line.contains("applying it again"), "{line}");
    wait("out", false);
    wait("b", true);

    // And a membership change after it is an ordinary one.
    put_host(&client, "out", &site.lan.addr("out").to_string()).await;
    wait("out", true);
}

#[tokio::test]
async fn a_membership_change_after_the_table_vanished_applies_the_whole_table() {
    let mut site = Site::start();
    let root = site.lan.join_root();
    let etcd = Etcd::start_on(&root.to_string()).await;
    let client = etcd.client().await;
    put_host(&client, "b", &site.lan.addr("b").to_string()).await;
    // No resync in the test's time: only the failed membership change can notice.
    let mut watcher = spawn_watch(&site, &["--etcd", &etcd.endpoint(), "--resync", "1h"]);
    watcher.wait_log("ruleset applied", Duration::from_secs(10));
    let out = site
        .lan
        .ns("a")
        .command("nft")
        .args(["delete", "table", "inet", "locknet"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    put_host(&client, "c", &site.lan.addr("c").to_string()).await;
    let line = watcher.wait_log("applied the whole policy again", Duration::from_secs(5));
    assert!(!line.contains("previous rules still hold"), "{line}");
    let wait = |from: &str, can: bool| site.until_reach(from, 9999, can, Duration::from_secs(5));
    wait("out", false);
    wait("c", true);
}

/// `viking host add a ADDR --role router`: locknet --watch on `a` opens 80 (and 443) to
/// everyone, as `--router` does, and closes them again when the role goes.
#[tokio::test]
async fn the_router_role_in_etcd_opens_the_web_ports() {
    let mut site = Site::start();
    let root = site.lan.join_root();
    let etcd = Etcd::start_on(&root.to_string()).await;
    let client = etcd.client().await;
    let a = site.lan.addr("a").to_string();
    put_host(&client, "a", &a).await;
    put_host(&client, "b", &site.lan.addr("b").to_string()).await;
    let watcher = spawn_watch(&site, &["--etcd", &etcd.endpoint(), "--host", "a"]);
    let wait = |from: &str, port: u16, can: bool| {
        site.until_reach(from, port, can, Duration::from_secs(5))
    };
    wait("b", 80, true);
    wait("out", 80, false);
    put_host_with_roles(&client, "a", &a, r#""router""#).await;
    wait("out", 80, true);
    wait("out", 9999, false);
    assert!(
        watcher.log().contains("role router in etcd"),
        "{}",
        watcher.log()
    );
    put_host(&client, "a", &a).await;
    wait("out", 80, false);
    wait("b", 80, true);
}
