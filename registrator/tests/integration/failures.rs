//! Losing the registrator, etcd or Docker: nothing stale stays, nothing live is lost.

use std::time::Duration;

use testkit::docker::{Container, Dockerd, IMAGE};

use crate::{Registrator, setup, stack, wait_endpoints, web};

#[tokio::test]
async fn a_killed_registrator_loses_its_keys_after_the_ttl_and_corrects_them_at_start() {
    let (etcd, client) = setup().await;
    let mut reg = Registrator::start(&etcd.endpoint(), &[]);
    let stack = stack();
    let first = web(&stack, "web", &[]);
    let first_key = format!("web/8080-tcp/node-a:{}:8080", first.short_id());
    wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(2),
        &reg,
        "first",
        |e| e.contains_key(&first_key),
    )
    .await;

    // Down for less than the TTL while the containers change: the restarted registrator
    // removes the stale key and adds the new one.
    reg.kill();
    drop(first);
    let second = web(&stack, "web", &[]);
    let second_key = format!("web/8080-tcp/node-a:{}:8080", second.short_id());
    reg.restart();
    wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(2),
        &reg,
        "corrected at start",
        |e| e.keys().eq([&second_key]),
    )
    .await;
    assert!(
        reg.log().contains("no running container matches it"),
        "{}",
        reg.log()
    );

    // Down for longer: the lease (2 s) takes the keys, a restart brings them back.
    reg.kill();
    let gone = wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(5),
        &reg,
        "expired",
        |e| e.is_empty(),
    )
    .await;
    eprintln!("keys expired {gone:?} after SIGKILL (ttl 2 s)");
    reg.restart();
    wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(2),
        &reg,
        "back after restart",
        |e| e.keys().eq([&second_key]),
    )
    .await;
}

#[tokio::test]
async fn an_etcd_outage_is_caught_up_after_etcd_returns() {
    let (mut etcd, client) = setup().await;
    let reg = Registrator::start(&etcd.endpoint(), &[]);
    let stack = stack();
    let before = web(&stack, "web", &[]);
    let before_key = format!("web/8080-tcp/node-a:{}:8080", before.short_id());
    wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(2),
        &reg,
        "before",
        |e| e.contains_key(&before_key),
    )
    .await;

    etcd.stop();
    drop(before);
    let during = web(&stack, "web", &[]);
    let during_key = format!("web/8080-tcp/node-a:{}:8080", during.short_id());
    tokio::time::sleep(Duration::from_secs(5)).await;
    etcd.restart().await;
    let took = wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(3),
        &reg,
        "caught up",
        |e| e.keys().eq([&during_key]),
    )
    .await;
    eprintln!("caught up {took:?} after etcd answered again");
}

#[tokio::test]
async fn a_restarted_docker_daemon_is_reconnected_and_reconciled() {
    let (etcd, client) = setup().await;
    let mut dockerd = Dockerd::start(
        &format!("vkt-reg-{:04x}", fastrand::u16(..)),
        "10.213.7.1/24",
    );
    let host = dockerd.host();
    let reg = Registrator::start(&etcd.endpoint(), &["--docker", &host]);
    let stack = stack();
    let label_stack = format!("viking.stack={stack}");
    let c = Container::run(
        Some(&host),
        &[
            "-l",
            &label_stack,
            "-l",
            "viking.job=web",
            "-p",
            "8080",
            "--restart",
            "unless-stopped",
            IMAGE,
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            "/www",
        ],
    );
    let key = format!("web/8080-tcp/node-a:{}:8080", c.short_id());
    wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(2),
        &reg,
        "on the private daemon",
        |e| e.contains_key(&key),
    )
    .await;

    // The daemon stops its containers on the way down and starts them again (restart policy)
    // on the way up, on new host ports.
    dockerd.stop();
    wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(5),
        &reg,
        "gone with the daemon",
        |e| e.is_empty(),
    )
    .await;
    dockerd.restart();
    let port = c.host_port("8080/tcp");
    wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(10),
        &reg,
        "back with the daemon",
        |e| e.get(&key).is_some_and(|r| r.port == port),
    )
    .await;
    assert!(reg.log().contains("Docker is back"), "{}", reg.log());
}
