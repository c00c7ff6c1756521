//! Losing the registrator, etcd or Docker: nothing stale stays, nothing live is lost.

use std::time::Duration;

use testkit::docker::Dockerd;

use crate::{Scene, key};

#[tokio::test]
async fn a_killed_registrator_loses_its_keys_after_the_ttl_and_corrects_them_at_start() {
    let mut s = Scene::start(&[]).await;
    let first = s.web("web", &[]);
    let first_key = key(&first);
    s.until(Duration::from_secs(2), "first", |e| {
        e.contains_key(&first_key)
    })
    .await;

    let second = s.web("web", &[]);
    let second_key = key(&second);
    s.until(Duration::from_secs(2), "both", |e| e.len() == 2)
        .await;

    // Down for less than the TTL (2 s) while a container goes: the restarted registrator
    // removes the stale key. (Only the removal happens while it is down: starting a container
    // too took longer than the TTL on a loaded machine, and the lease took the key first.)
    s.reg.kill();
    let first_instance = format!("node-a:{}:8080", first.short_id());
    drop(first);
    s.reg.restart();
    s.until(Duration::from_secs(2), "corrected at start", |e| {
        e.keys().eq([&second_key])
    })
    .await;
    // The reason is the replayed `destroy` event if it comes before the first list, else
    // "no running container matches it": either way one line says what was removed.
    // Logged just after the write that the wait above saw: wait for the line too.
    let removed = format!("removed {}/web:8080/tcp {first_instance} (", s.stack);
    s.reg.wait_log(&removed, Duration::from_secs(2));

    // Down for longer: the lease (2 s) takes the keys, a restart brings them back.
    s.reg.kill();
    let gone = s
        .until(Duration::from_secs(5), "expired", |e| e.is_empty())
        .await;
    eprintln!("keys expired {gone:?} after SIGKILL (ttl 2 s)");
    s.reg.restart();
    s.until(Duration::from_secs(2), "back after restart", |e| {
        e.keys().eq([&second_key])
    })
    .await;
}

#[tokio::test]
async fn an_etcd_outage_is_caught_up_after_etcd_returns() {
    let mut s = Scene::start(&[]).await;
    let before = s.web("web", &[]);
    let before_key = key(&before);
    s.until(Duration::from_secs(2), "before", |e| {
        e.contains_key(&before_key)
    })
    .await;

    s.etcd.stop();
    drop(before);
    let during = s.web("web", &[]);
    let during_key = key(&during);
    tokio::time::sleep(Duration::from_secs(5)).await;
    s.etcd.restart().await;
    // Retries back off up to 5 s (runtime::Backoff's default), so after a 5 s outage the next
    // try may come 5 s after etcd is back: the budget is that plus the re-registration.
    let took = s
        .until(Duration::from_secs(8), "caught up", |e| {
            e.keys().eq([&during_key])
        })
        .await;
    eprintln!("caught up {took:?} after etcd answered again");
}

#[tokio::test]
async fn a_restarted_docker_daemon_is_reconnected_and_reconciled() {
    let mut dockerd = Dockerd::start(
        &format!("vkt-reg-{:04x}", fastrand::u16(..)),
        "10.213.7.1/24",
    );
    let host = dockerd.host();
    let s = Scene::start(&["--docker", &host]).await;
    let c = s.web_on(Some(&host), "web", &["--restart", "unless-stopped"]);
    let key = key(&c);
    s.until(Duration::from_secs(2), "on the private daemon", |e| {
        e.contains_key(&key)
    })
    .await;

    // The daemon stops its containers on the way down and starts them again (restart policy)
    // on the way up, on new host ports.
    dockerd.stop();
    s.until(Duration::from_secs(5), "gone with the daemon", |e| {
        e.is_empty()
    })
    .await;
    dockerd.restart();
    let port = c.host_port("8080/tcp");
    s.until(Duration::from_secs(10), "back with the daemon", |e| {
        e.get(&key).is_some_and(|r| r.port == port)
    })
    .await;
    assert!(s.reg.log().contains("Docker is back"), "{}", s.reg.log());
}
