//! What gets registered, how it is named and addressed, and how fast.

use std::time::Duration;

use testkit::docker::{Container, IMAGE, docker_ok};

use crate::{Registrator, setup, stack, wait_endpoints, web};

#[tokio::test]
async fn a_published_port_is_registered_and_removed_within_a_second() {
    let (etcd, client) = setup().await;
    let reg = Registrator::start(&etcd.endpoint(), &[]);
    let stack = stack();
    let c = web(&stack, "web", &[]);
    let key = format!("web/8080-tcp/node-a:{}:8080", c.short_id());
    let host_port = c.host_port("8080/tcp");
    let took = wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(1),
        &reg,
        "registered",
        |e| {
            e.get(&key)
                .is_some_and(|r| r.addr == "127.0.0.1" && r.port == host_port)
        },
    )
    .await;
    eprintln!("registered {took:?} after docker run returned");
    let record = &crate::endpoints(&client, &stack).await[&key];
    assert_eq!(record.container_id, c.id());
    assert_eq!(record.host.as_str(), "node-a");
    c.act("stop");
    wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(1),
        &reg,
        "removed",
        |e| e.is_empty(),
    )
    .await;
    let log = reg.log();
    assert!(
        log.contains(&format!(
            "registered {stack}/web:8080/tcp node-a:{}:8080 at 127.0.0.1:{host_port}",
            c.short_id()
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "removed {stack}/web:8080/tcp node-a:{}:8080 (container",
            c.short_id()
        )),
        "{log}"
    );
}

#[tokio::test]
async fn twenty_containers_started_at_once_become_twenty_keys() {
    let (etcd, client) = setup().await;
    let reg = Registrator::start(&etcd.endpoint(), &[]);
    let stack = stack();
    let containers: Vec<Container> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|_| s.spawn(|| web(&stack, "web", &[])))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("docker run"))
            .collect()
    });
    wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(10),
        &reg,
        "20 keys",
        |e| e.len() == 20,
    )
    .await;
    let ids: Vec<String> = containers.iter().map(|c| c.id().to_owned()).collect();
    let mut args = vec!["rm", "-f"];
    args.extend(ids.iter().map(String::as_str));
    docker_ok(None, &args);
    wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(10),
        &reg,
        "all removed",
        |e| e.is_empty(),
    )
    .await;
}

#[tokio::test]
async fn service_conventions_name_ignore_and_udp() {
    let (etcd, client) = setup().await;
    let reg = Registrator::start(&etcd.endpoint(), &[]);
    let stack = stack();
    let name = format!("SERVICE_NAME={stack}/Api_Server");
    let env_admin = format!("SERVICE_9000_NAME={stack}/from-env");
    let label_admin = format!("SERVICE_9000_NAME={stack}/admin");
    let c = Container::run(
        None,
        &[
            "-e",
            &name,
            "-e",
            &env_admin,
            "-l",
            &label_admin,
            "-e",
            "SERVICE_7000_IGNORE=true",
            "-p",
            "8080",
            "-p",
            "9000",
            "-p",
            "7000",
            "-p",
            "5353/udp",
            IMAGE,
            "httpd",
            "-f",
            "-p",
            "8080",
        ],
    );
    let id = c.short_id().to_owned();
    let want = [
        format!("admin/9000-tcp/node-a:{id}:9000"),
        format!("api-server/5353-udp/node-a:{id}:5353"),
        format!("api-server/8080-tcp/node-a:{id}:8080"),
    ];
    wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(2),
        &reg,
        "named by SERVICE_*",
        |e| e.keys().eq(want.iter()),
    )
    .await;
    let udp = &crate::endpoints(&client, &stack).await[&want[1]];
    assert_eq!(udp.port, c.host_port("5353/udp"));

    // Ignoring the whole container removes what it had.
    drop(c);
    let c = Container::run(
        None,
        &[
            "-e",
            &name,
            "-l",
            "SERVICE_IGNORE=1",
            "-p",
            "8080",
            IMAGE,
            "httpd",
            "-f",
            "-p",
            "8080",
        ],
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = crate::endpoints(&client, &stack).await;
    assert!(
        now.is_empty(),
        "ignored container {} registered: {now:?}",
        c.short_id()
    );
}

#[tokio::test]
async fn internal_registers_the_container_address() {
    let (etcd, client) = setup().await;
    let reg = Registrator::start(&etcd.endpoint(), &["--internal"]);
    let stack = stack();
    // Not even published: --internal does not need it.
    let label_stack = format!("viking.stack={stack}");
    let c = Container::run(
        None,
        &[
            "-l",
            &label_stack,
            "-l",
            "viking.job=db",
            "--expose",
            "5432",
            IMAGE,
            "sleep",
            "60",
        ],
    );
    let ip = c.ip();
    let key = format!("db/5432-tcp/node-a:{}:5432", c.short_id());
    wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(2),
        &reg,
        "internal address",
        |e| e.get(&key).is_some_and(|r| r.addr == ip && r.port == 5432),
    )
    .await;
}

#[tokio::test]
async fn health_and_pause_decide_whether_a_container_serves() {
    let (etcd, client) = setup().await;
    let reg = Registrator::start(&etcd.endpoint(), &[]);
    let stack = stack();
    let c = web(
        &stack,
        "web",
        &[
            "--health-cmd",
            "test -f /tmp/ok",
            "--health-interval",
            "300ms",
            "--health-retries",
            "1",
        ],
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        crate::endpoints(&client, &stack).await.is_empty(),
        "registered before its health check passed"
    );
    docker_ok(None, &["exec", c.id(), "touch", "/tmp/ok"]);
    wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(3),
        &reg,
        "healthy",
        |e| e.len() == 1,
    )
    .await;
    docker_ok(None, &["exec", c.id(), "rm", "/tmp/ok"]);
    wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(3),
        &reg,
        "unhealthy",
        |e| e.is_empty(),
    )
    .await;
    docker_ok(None, &["exec", c.id(), "touch", "/tmp/ok"]);
    wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(3),
        &reg,
        "healthy again",
        |e| e.len() == 1,
    )
    .await;
    c.act("pause");
    wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(1),
        &reg,
        "paused",
        |e| e.is_empty(),
    )
    .await;
    c.act("unpause");
    wait_endpoints(
        &client,
        &stack,
        Duration::from_secs(3),
        &reg,
        "unpaused",
        |e| e.len() == 1,
    )
    .await;
}

#[tokio::test]
async fn dry_run_prints_and_once_writes_then_exits() {
    let (etcd, client) = setup().await;
    let stack = stack();
    let c = web(&stack, "web", &[]);
    let endpoint = etcd.endpoint();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--etcd",
            &endpoint,
            "--host",
            "node-a",
            "--addr",
            "127.0.0.1",
        ];
        args.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_registrator"))
            .args(args)
            .output()
            .expect("run registrator")
    };
    let key = format!(
        "/viking/services/{stack}/web/8080-tcp/node-a:{}:8080",
        c.short_id()
    );
    let out = run(&["--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with(&format!("put {key} {{"))),
        "{stdout}"
    );
    assert!(
        crate::endpoints(&client, &stack).await.is_empty(),
        "--dry-run wrote"
    );

    let out = run(&["--once"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(crate::endpoints(&client, &stack).await.len(), 1);

    let out = run(&["--ttl", "0s"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ttl"),
        "{out:?}"
    );
}
