//! What gets registered, how it is named and addressed, and how fast.

use std::time::Duration;

use testkit::docker::{Container, IMAGE, docker_ok};

use crate::{Scene, key};

#[tokio::test]
async fn a_published_port_is_registered_and_removed_within_a_second() {
    let mut s = Scene::start(&[]).await;
    let stack = s.stack.clone();
    let c = s.web("web", &[]);
    let key = key(&c);
    let host_port = c.host_port("8080/tcp");
    let took = s
        .until(Duration::from_secs(1), "registered", |e| {
            e.get(&key)
                .is_some_and(|r| r.addr == "127.0.0.1" && r.port == host_port)
        })
        .await;
    eprintln!("registered {took:?} after docker run returned");
    let record = &s.endpoints().await[&key];
    assert_eq!(record.container_id, c.id());
    assert_eq!(record.host.as_str(), "node-a");
    c.act("stop");
    s.until(Duration::from_secs(1), "removed", |e| e.is_empty())
        .await;
    // Each line is logged just after the write the waits above saw.
    let id = c.short_id();
    let registered =
        format!("registered {stack}/web:8080/tcp node-a:{id}:8080 at 127.0.0.1:{host_port}");
    s.reg.wait_log(&registered, Duration::from_secs(2));
    let removed = format!("removed {stack}/web:8080/tcp node-a:{id}:8080 (container");
    s.reg.wait_log(&removed, Duration::from_secs(2));
}

#[tokio::test]
async fn twenty_containers_started_at_once_become_twenty_keys() {
    let s = Scene::start(&[]).await;
    let containers: Vec<Container> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20).map(|_| scope.spawn(|| s.web("web", &[]))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("docker run"))
            .collect()
    });
    s.until(Duration::from_secs(10), "20 keys", |e| e.len() == 20)
        .await;
    let ids: Vec<String> = containers.iter().map(|c| c.id().to_owned()).collect();
    let mut args = vec!["rm", "-f"];
    args.extend(ids.iter().map(String::as_str));
    docker_ok(None, &args);
    s.until(Duration::from_secs(10), "all removed", |e| e.is_empty())
        .await;
}

#[tokio::test]
async fn service_conventions_name_ignore_and_udp() {
    let s = Scene::start(&[]).await;
    let stack = s.stack.clone();
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
    s.until(Duration::from_secs(2), "named by SERVICE_*", |e| {
        e.keys().eq(want.iter())
    })
    .await;
    let udp = &s.endpoints().await[&want[1]];
    assert_eq!(udp.port, c.host_port("5353/udp"));
    // The name was made valid, and the log says so (once, naming the container).
    let log = s.reg.log();
    let note = format!(
        "env SERVICE_NAME \"{stack}/Api_Server\" is not a valid name; registered as {stack}/api-server"
    );
    assert_eq!(log.matches(&note).count(), 1, "{log}");

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
    let now = s.endpoints().await;
    assert!(
        now.is_empty(),
        "ignored container {} registered: {now:?}",
        c.short_id()
    );
}

#[tokio::test]
async fn internal_registers_the_container_address() {
    let s = Scene::start(&["--internal"]).await;
    let stack = s.stack.clone();
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
    s.until(Duration::from_secs(2), "internal address", |e| {
        e.get(&key).is_some_and(|r| r.addr == ip && r.port == 5432)
    })
    .await;
}

#[tokio::test]
async fn health_and_pause_decide_whether_a_container_serves() {
    let s = Scene::start(&[]).await;
    let c = s.web(
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
        s.endpoints().await.is_empty(),
        "registered before its health check passed"
    );
    docker_ok(None, &["exec", c.id(), "touch", "/tmp/ok"]);
    s.until(Duration::from_secs(3), "healthy", |e| e.len() == 1)
        .await;
    docker_ok(None, &["exec", c.id(), "rm", "/tmp/ok"]);
    s.until(Duration::from_secs(3), "unhealthy", |e| e.is_empty())
        .await;
    docker_ok(None, &["exec", c.id(), "touch", "/tmp/ok"]);
    s.until(Duration::from_secs(3), "healthy again", |e| e.len() == 1)
        .await;
    c.act("pause");
    s.until(Duration::from_secs(1), "paused", |e| e.is_empty())
        .await;
    c.act("unpause");
    s.until(Duration::from_secs(3), "unpaused", |e| e.len() == 1)
        .await;
}

#[tokio::test]
async fn dry_run_prints_and_once_writes_then_exits() {
    // The one-shot modes on their own: no daemon writes beside them.
    let mut s = Scene::start(&[]).await;
    s.reg.kill();
    let stack = s.stack.clone();
    let c = s.web("web", &[]);
    let endpoint = s.etcd.endpoint();
    let run = |extra: &[&str]| {
        let mut args = vec!["--host", "node-a", "--addr", "127.0.0.1"];
        args.extend_from_slice(extra);
        testkit::run_cli(env!("CARGO_BIN_EXE_registrator"), &endpoint, &args)
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
    assert!(s.endpoints().await.is_empty(), "--dry-run wrote");

    let out = run(&["--once"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(s.endpoints().await.len(), 1);

    let out = run(&["--ttl", "0s"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ttl"),
        "{out:?}"
    );
}

/// A container may not join a service that viking deployed by naming it with `SERVICE_NAME`:
/// the deployed stack's names belong to the containers viking launches (its labels).
#[tokio::test]
async fn a_service_name_claim_on_a_deployed_service_is_refused_with_a_warning() {
    let mut s = Scene::start(&[]).await;
    let stack = s.stack.clone();
    let mut kv = s.client.kv_client();
    kv.put(format!("/viking/stacks/{stack}/jobs/web"), "{}", None)
        .await
        .unwrap();
    let launched = s.web("web", &[]);
    let claim = format!("SERVICE_NAME={stack}/web");
    let name = format!("{stack}-impostor");
    let _impostor = Container::run(
        None,
        &[
            "--name", &name, "-e", &claim, "-p", "8080", IMAGE, "httpd", "-f", "-p", "8080",
        ],
    );
    let want = [key(&launched)];
    s.until(Duration::from_secs(3), "only the launched container", |e| {
        e.keys().eq(want.iter())
    })
    .await;
    let warning = format!(
        "not registered: container {name} port 8080/tcp: it claims {stack}/web through env \
         SERVICE_NAME, but stack {stack} is deployed by viking"
    );
    s.reg.wait_log(&warning, Duration::from_secs(3));
    // Undeployed, the same claim is the registrator convention again.
    kv.delete(format!("/viking/stacks/{stack}/jobs/web"), None)
        .await
        .unwrap();
    s.until(Duration::from_secs(3), "both once undeployed", |e| {
        e.len() == 2
    })
    .await;
}

/// A running container's record (`containers/<host>/<id12>`, link-scoped access) carries its
/// addresses and its network namespace's cookie, the one its sockets have (the ambassador's
/// UDP balanced by the kernel tells its sends by it).
#[tokio::test]
async fn a_container_record_carries_its_network_namespace() {
    let s = Scene::start(&[]).await;
    let c = s.web("web", &[]);
    let pid: u32 = docker_ok(None, &["inspect", "-f", "{{.State.Pid}}", c.id()])
        .parse()
        .expect("pid");
    let expected = sockmap::balance::netns_cookie_of(pid).expect("the container's namespace");
    assert_ne!(
        expected,
        sockmap::balance::own_netns_cookie().unwrap(),
        "the container has a namespace of its own"
    );
    let key = format!("/viking/containers/node-a/{}", c.short_id());
    let kv = s.client.kv_client();
    let record: schema::records::ContainerRecord =
        testkit::eventually_async(Duration::from_secs(5), "the container record", || {
            let (mut kv, key) = (kv.clone(), key.clone());
            async move {
                let resp = kv.get(key.as_str(), None).await.ok()?;
                let value = resp.kvs().first()?.value().to_vec();
                serde_json::from_slice(&value).ok()
            }
        })
        .await;
    assert_eq!(record.netns_cookie, Some(expected), "{record:?}");
    assert_eq!(record.addrs, vec![c.ip()], "{record:?}");
}
