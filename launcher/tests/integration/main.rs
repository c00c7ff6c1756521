//! The launcher binary against a real etcd and the real Docker daemon: it is alone, so it is
//! the scheduler too. Job specs and run requests are written to etcd as `viking deploy` and
//! `viking run` write them; every test has its own etcd, host id and stack name, and the
//! launcher touches only containers labelled with its host id.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use schema::records::{InstanceState, StatusRecord};
use schema::{CommandSpec, JobKind, JobName, JobSpec, StackName};
use testkit::docker::{self, IMAGE};
use testkit::{Daemon, Etcd};

/// One test's world: etcd, a launcher with a host id of its own, a stack name of its own.
struct World {
    etcd: Etcd,
    client: Client,
    launcher: Daemon,
    host: String,
    stack: String,
    /// The launcher's admin server.
    admin: String,
    /// Its Docker daemon (`None`: the shared one).
    docker: Option<String>,
}

impl World {
    async fn start() -> World {
        World::start_on(None, &[]).await
    }

    /// With the Docker daemon at `docker` (a private one the test stops and starts) and more
    /// flags.
    async fn start_on(docker: Option<String>, extra: &[&str]) -> World {
        docker::require(docker.as_deref());
        let etcd = Etcd::start().await;
        let client = etcd.client().await;
        let host = format!("t{:08x}", fastrand_u32());
        let admin = format!("127.0.0.1:{}", testkit::free_ports(1)[0]);
        let endpoint = etcd.endpoint();
        let mut args = vec![
            "--admin",
            &admin,
            "--etcd",
            &endpoint,
            "--host",
            &host,
            "--cpus",
            "2",
            "--memory",
            "1G",
            "--ttl",
            "2s",
            // httpd as PID 1 ignores SIGTERM: removals would wait the default 10 s.
            "--stop-timeout",
            "1s",
        ];
        if let Some(d) = &docker {
            args.extend(["--docker", d.as_str()]);
        }
        args.extend(extra);
        let launcher = Daemon::spawn(env!("CARGO_BIN_EXE_launcher"), &args);
        World {
            etcd,
            client,
            launcher,
            stack: format!("s{:08x}", fastrand_u32()),
            host,
            admin,
            docker,
        }
    }

    fn spec(&self, job: &str, scale: u32) -> JobSpec {
        let mut spec = JobSpec::new(
            StackName::new(&self.stack).unwrap(),
            JobName::new(job).unwrap(),
            IMAGE,
        );
        spec.scale = scale;
        // testkit removes what carries its label, also after a failed test.
        spec.labels
            .insert(docker::TEST_LABEL.to_owned(), "1".to_owned());
        spec
    }

    async fn deploy(&self, spec: &JobSpec) {
        let mut kv = self.client.kv_client();
        kv.put(
            format!("/viking/stacks/{}/jobs/{}", self.stack, spec.job),
            serde_json::to_string(spec).unwrap(),
            None,
        )
        .await
        .unwrap();
    }

    async fn run(&self) {
        let mut kv = self.client.kv_client();
        kv.put(
            format!("/viking/grid/run/{}", self.stack),
            "{\"v\":1}",
            None,
        )
        .await
        .unwrap();
    }

    async fn stop(&self) {
        let mut kv = self.client.kv_client();
        kv.delete(format!("/viking/grid/run/{}", self.stack), None)
            .await
            .unwrap();
    }

    /// `job/instance` -> status, of this stack on this host.
    async fn statuses(&self) -> BTreeMap<String, StatusRecord> {
        let prefix = format!("/viking/grid/status/{}/{}/", self.host, self.stack);
        let mut kv = self.client.kv_client();
        let Ok(resp) = kv
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
        else {
            return BTreeMap::new();
        };
        resp.kvs()
            .iter()
            .map(|kv| {
                (
                    kv.key_str().unwrap()[prefix.len()..].to_owned(),
                    serde_json::from_slice(kv.value()).unwrap(),
                )
            })
            .collect()
    }

    /// Polls the statuses until `check` holds; fails with them and the launcher's log.
    async fn until(&self, what: &str, check: impl Fn(&BTreeMap<String, StatusRecord>) -> bool) {
        testkit::eventually_async(Duration::from_secs(20), what, || async {
            let now = self.statuses().await;
            if check(&now) {
                Ok(())
            } else {
                Err(format!("{now:#?}\nlauncher log:\n{}", self.launcher.log()))
            }
        })
        .await;
    }

    /// Polls until `instance` runs `spec` in a container `which` accepts (by its short id),
    /// and that container, named `name`, is the only one left.
    async fn until_only(
        &self,
        instance: &str,
        name: &str,
        spec: &JobSpec,
        which: impl Fn(&str) -> bool,
    ) {
        let digest = spec.digest();
        self.until("the new spec running", |s| {
            s.get(instance).is_some_and(|r| {
                r.state == InstanceState::Running
                    && r.spec_digest == digest
                    && which(&r.container_id)
            })
        })
        .await;
        testkit::eventually(Duration::from_secs(15), "one container, named", || {
            let now = self.containers();
            (now.len() == 1 && now.contains_key(name))
                .then_some(())
                .ok_or_else(|| format!("{now:?}"))
        });
    }

    /// This host's containers of this stack: name -> state.
    fn containers(&self) -> BTreeMap<String, String> {
        let out = docker::docker_ok(
            self.docker.as_deref(),
            &[
                "ps",
                "-a",
                "--filter",
                &format!("label=viking.host={}", self.host),
                "--format",
                "{{.Names}} {{.State}}",
            ],
        );
        out.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(n, s)| (n.to_owned(), s.to_owned()))
            .collect()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // The launcher first (it would start them again), then its containers.
        self.launcher.kill();
        let ids = docker::docker_ok(
            self.docker.as_deref(),
            &[
                "ps",
                "-aq",
                "--filter",
                &format!("label=viking.host={}", self.host),
            ],
        );
        for id in ids.lines() {
            let _ = docker::docker(self.docker.as_deref(), &["rm", "-f", id]);
        }
        let _ = &self.etcd;
    }
}

fn fastrand_u32() -> u32 {
    // A process-unique, time-salted id; no extra dependency for two random names.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    t ^ std::process::id().rotate_left(16)
}

/// Seconds since the epoch, as `docker events --since/--until` take them.
fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Docker's own record of this host's containers from `since` until now: where in it
/// `action` of container `id` is. `order` says which of two came first.
struct Events(String);

impl Events {
    fn since(w: &World, since: f64) -> Events {
        Events(docker::docker_ok(
            w.docker.as_deref(),
            &[
                "events",
                "--since",
                &format!("{since:.3}"),
                "--until",
                &format!("{:.3}", epoch_now()),
                "--filter",
                &format!("label=viking.host={}", w.host),
                "--format",
                "{{.Action}} {{.Actor.ID}}",
            ],
        ))
    }

    /// Fails unless `first` (action, container) happened before `then`.
    fn in_order(&self, first: (&str, &str), then: (&str, &str)) {
        assert!(
            self.at(first.0, first.1) < self.at(then.0, then.1),
            "{} {} came after {} {}:\n{}",
            first.0,
            first.1,
            then.0,
            then.1,
            self.0
        );
    }

    fn at(&self, action: &str, id: &str) -> usize {
        self.0
            .lines()
            .position(|l| l == format!("{action} {id}"))
            .unwrap_or_else(|| panic!("no {action} of {id} in\n{}", self.0))
    }
}

fn running(s: &BTreeMap<String, StatusRecord>, names: &[&str]) -> bool {
    s.len() == names.len()
        && names
            .iter()
            .all(|n| s.get(*n).is_some_and(|r| r.state == InstanceState::Running))
}

#[tokio::test]
async fn a_launcher_runs_what_it_is_assigned_scales_it_and_stops_it() {
    let w = World::start().await;
    // No ports: no registrator runs here, and a replacement of a job with ports waits for
    // its endpoint (the many-hosts suite replaces those).
    let mut web = w.spec("web", 2);
    web.command = Some(CommandSpec::Exec(
        ["httpd", "-f", "-p", "8080"].map(String::from).to_vec(),
    ));
    w.deploy(&web).await;
    // Deployed but not asked to run: nothing starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(w.containers().is_empty(), "{:?}", w.containers());
    w.run().await;
    w.until("two web instances running", |s| {
        running(s, &["web/0", "web/1"])
    })
    .await;
    let names = w.containers();
    let web0 = format!("{}_web_0", w.stack);
    assert_eq!(
        names.get(&web0).map(String::as_str),
        Some("running"),
        "{names:?}"
    );
    let node = {
        let mut kv = w.client.kv_client();
        let resp = kv
            .get(format!("/viking/grid/nodes/{}", w.host), None)
            .await
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(resp.kvs()[0].value()).unwrap()
    };
    assert_eq!(node["cpus_milli"], 2000);
    assert_eq!(node["memory"], 1u64 << 30);

    // Its admin server says the same.
    let admin = |path: &str| {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "5",
                &format!("http://{}{path}", w.admin),
            ])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(admin("/healthz"), "ok\n");
    let metrics = admin("/metrics");
    assert!(
        metrics.contains("launcher_instances{state=\"running\"} 2"),
        "{metrics}"
    );
    let state: serde_json::Value = serde_json::from_str(&admin("/state")).unwrap();
    assert_eq!(state["instances_by_state"]["running"], 2, "{state}");

    // Scale down: instance 1 goes, instance 0 is the same container.
    let id0 = w.statuses().await["web/0"].container_id.clone();
    web.scale = 1;
    w.deploy(&web).await;
    w.until("one web instance", |s| running(s, &["web/0"]))
        .await;
    assert_eq!(
        w.statuses().await["web/0"].container_id,
        id0,
        "instance 0 was replaced"
    );
    testkit::eventually(Duration::from_secs(10), "web_1 removed", || {
        (w.containers().len() == 1).then_some(())
    });

    // A changed spec replaces the container.
    web.env.insert("COLOUR".into(), "blue".into());
    w.deploy(&web).await;
    w.until("replaced", |s| {
        s.get("web/0")
            .is_some_and(|r| r.state == InstanceState::Running && r.container_id != id0)
    })
    .await;

    // A spec broken by hand stops nothing: the scheduler keeps its assignment, the launcher
    // its container.
    let running_id = w.statuses().await["web/0"].container_id.clone();
    let mut kv = w.client.kv_client();
    kv.put(
        format!("/viking/stacks/{}/jobs/web", w.stack),
        "garbage",
        None,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(w.containers().len(), 1, "{}", w.launcher.log());
    assert_eq!(w.statuses().await["web/0"].container_id, running_id);
    w.deploy(&web).await;

    w.stop().await;
    w.until("no instance", BTreeMap::is_empty).await;
    testkit::eventually(Duration::from_secs(10), "containers removed", || {
        w.containers().is_empty().then_some(())
    });
}

#[tokio::test]
async fn tasks_report_their_exit_code_and_a_missing_image_fails_with_its_reason() {
    let w = World::start().await;
    let mut ok = w.spec("ok", 1);
    ok.kind = JobKind::Task;
    ok.command = Some(CommandSpec::Shell("exit 0".into()));
    let mut bad = w.spec("bad", 1);
    bad.kind = JobKind::Task;
    bad.command = Some(CommandSpec::Shell("echo migration failed; exit 3".into()));
    let mut missing = w.spec("missing", 1);
    missing.image = "viking/no-such-image:1".into();
    for spec in [&ok, &bad, &missing] {
        w.deploy(spec).await;
    }
    w.run().await;
    w.until("the three report", |s| {
        s.get("ok/0")
            .is_some_and(|r| r.state == InstanceState::Exited)
            && s.get("bad/0")
                .is_some_and(|r| r.state == InstanceState::Failed)
            && s.get("missing/0")
                .is_some_and(|r| r.state == InstanceState::Failed)
    })
    .await;
    let s = w.statuses().await;
    assert_eq!(s["ok/0"].exit_code, Some(0));
    assert_eq!(s["bad/0"].exit_code, Some(3));
    assert!(
        s["bad/0"].reason.contains("exited with code 3")
            && s["bad/0"].reason.contains("migration failed"),
        "{:?}",
        s["bad/0"].reason
    );
    assert!(
        s["missing/0"].reason.contains("viking/no-such-image:1"),
        "{:?}",
        s["missing/0"].reason
    );
    // A task that finished is not started again.
    let before = w.containers();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(w.statuses().await["ok/0"].restarts, 0);
    assert_eq!(w.containers(), before);
}

/// An image with a health check (`test -f /tmp/ok`, every second), made offline from the
/// test image under `tag` (one per test: the guard removes it); removed on drop.
fn healthy_image(tag: &'static str) -> ImageGuard {
    let guard = ImageGuard(tag);
    let base = docker::docker_ok(None, &["create", IMAGE, "true"]);
    let base = base.trim();
    docker::docker_ok(
        None,
        &[
            "commit",
            "--change",
            "HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD test -f /tmp/ok",
            base,
            tag,
        ],
    );
    docker::docker_ok(None, &["rm", base]);
    guard
}

/// Removes a test image, also when the test fails.
struct ImageGuard(&'static str);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = docker::docker(None, &["rmi", "-f", self.0]);
    }
}

/// A container whose image has a health check is `starting`, with the reason, until the
/// check passes; only then `running` (what a rolling update and a move wait for).
#[tokio::test]
async fn a_container_with_a_health_check_is_running_only_once_it_passes() {
    let w = World::start().await;
    const HEALTHY: &str = "viking/busybox-healthcheck:test";
    let _image = healthy_image(HEALTHY);
    let mut job = w.spec("checked", 1);
    job.image = HEALTHY.to_owned();
    job.command = Some(CommandSpec::Shell(
        "sleep 3; touch /tmp/ok; exec sleep 600".into(),
    ));
    w.deploy(&job).await;
    w.run().await;
    w.until("starting, waiting for its health check", |s| {
        s.get("checked/0").is_some_and(|r| {
            r.state == InstanceState::Starting && r.reason.contains("health check has not passed")
        })
    })
    .await;
    w.until("running once the check passes", |s| {
        running(s, &["checked/0"])
    })
    .await;
}

/// A launcher stopped in the middle of a replacement (after the old container went, before
/// the new one took the instance's name) finishes it when it comes back: the container gets
/// the instance's name; and a replacement of a container still under `-next` starts beside
/// it rather than removing it first (which cut the instance off while the new one started).
#[tokio::test]
async fn a_replacement_its_launcher_did_not_finish_is_finished_after_a_restart() {
    let mut w = World::start().await;
    let mut web = w.spec("web", 1);
    web.command = Some(CommandSpec::Exec(
        ["httpd", "-f", "-p", "8080"].map(String::from).to_vec(),
    ));
    w.deploy(&web).await;
    w.run().await;
    w.until("web running", |s| running(s, &["web/0"])).await;
    let name = format!("{}_web_0", w.stack);
    let next = format!("{name}-next");
    let id_of = |n: &str| docker::docker_ok(None, &["inspect", "--format", "{{.Id}}", n]);
    let id0 = id_of(&name).trim().to_owned();
    let half_way = |w: &mut World| {
        w.launcher.kill();
        docker::docker_ok(None, &["rename", &name, &next]);
    };

    half_way(&mut w);
    w.launcher.start();
    testkit::eventually(
        Duration::from_secs(15),
        "the instance's name given back",
        || {
            let now = w.containers();
            (now.len() == 1 && now.get(&name).map(String::as_str) == Some("running"))
                .then_some(())
                .ok_or_else(|| format!("{now:?}\n{}", w.launcher.log()))
        },
    );
    assert_eq!(id_of(&name).trim(), id0, "renamed, not replaced");

    // Half-way again, and the spec changed meanwhile.
    half_way(&mut w);
    web.env.insert("COLOUR".into(), "blue".into());
    w.deploy(&web).await;
    let since = epoch_now();
    w.launcher.start();
    w.until_only("web/0", &name, &web, |id| !id0.starts_with(id))
        .await;
    let new = id_of(&name).trim().to_owned();
    // Docker's own record of what happened: the new container started before the old one
    // was stopped.
    Events::since(&w, since).in_order(("start", &new), ("die", &id0));
}

/// The launcher's Docker daemon restarts (an upgrade, a crash): it says so once, keeps its
/// statuses, and when the daemon is back its containers are the same ones (brought back by
/// their restart policy), neither doubled nor replaced.
#[tokio::test]
async fn a_docker_restart_keeps_the_same_containers_and_is_logged_once() {
    let mut dockerd = testkit::docker::Dockerd::start(
        &format!("vkt-lau-{:04x}", fastrand_u32() & 0xffff),
        "10.213.9.1/24",
    );
    let w = World::start_on(Some(dockerd.host()), &[]).await;
    let mut web = w.spec("web", 2);
    // Exits at once on SIGTERM, so the daemon's shutdown does not wait its timeout.
    web.command = Some(CommandSpec::Shell(
        "trap 'exit 0' TERM; while true; do sleep 0.2; done".into(),
    ));
    w.deploy(&web).await;
    w.run().await;
    w.until("two running", |s| running(s, &["web/0", "web/1"]))
        .await;
    let ids = |s: &BTreeMap<String, StatusRecord>| -> Vec<String> {
        s.values().map(|r| r.container_id.clone()).collect()
    };
    let before = ids(&w.statuses().await);

    dockerd.stop();
    // Several of its one-second retries while the daemon is away.
    tokio::time::sleep(Duration::from_secs(4)).await;
    dockerd.restart();
    w.until("the same two running again", |s| {
        running(s, &["web/0", "web/1"]) && ids(s) == before
    })
    .await;
    let names = w.containers();
    assert_eq!(names.len(), 2, "{names:?}");
    let log = w.launcher.log();
    assert_eq!(
        log.matches("keeping what runs and retrying").count(),
        1,
        "said once:\n{log}"
    );
    assert!(log.contains("the container engine answers again"), "{log}");
}

/// SIGTERM to a launcher whose replacement waits for the new container's health check: it
/// exits at once instead of after the wait, both containers keep running, and the next
/// launcher goes on with that replacement: the old container serves until the new one passes
/// its check, and no third container is made.
#[tokio::test]
async fn a_launcher_stopped_during_a_replacement_exits_at_once_and_the_next_goes_on_with_it() {
    let mut w = World::start().await;
    const HEALTHY: &str = "viking/busybox-healthcheck:resume";
    let _image = healthy_image(HEALTHY);
    let mut web = w.spec("web", 1);
    web.command = Some(CommandSpec::Shell(
        "trap 'exit 0' TERM; while true; do sleep 0.2; done".into(),
    ));
    w.deploy(&web).await;
    w.run().await;
    w.until("web running", |s| running(s, &["web/0"])).await;
    let name = format!("{}_web_0", w.stack);
    let next = format!("{name}-next");
    let id_of = |n: &str| {
        docker::docker_ok(None, &["inspect", "--format", "{{.Id}}", n])
            .trim()
            .to_owned()
    };
    let old = id_of(&name);

    // The new spec passes its health check 4 s after it starts.
    web.image = HEALTHY.to_owned();
    web.command = Some(CommandSpec::Shell(
        "trap 'exit 0' TERM; sleep 4; touch /tmp/ok; while true; do sleep 0.2; done".into(),
    ));
    w.deploy(&web).await;
    testkit::eventually(
        Duration::from_secs(15),
        "the new one started beside",
        || {
            let now = w.containers();
            (now.get(&next).map(String::as_str) == Some("running"))
                .then_some(())
                .ok_or_else(|| format!("{now:?}"))
        },
    );
    let new = id_of(&next);
    let since = epoch_now();
    let status = w.launcher.terminate(Duration::from_secs(2));
    assert!(status.success(), "{status}: {}", w.launcher.log());
    let both = w.containers();
    assert_eq!(
        (both.get(&name), both.get(&next)),
        (Some(&"running".to_owned()), Some(&"running".to_owned())),
        "{both:?}"
    );

    w.launcher.start();
    w.until_only("web/0", &name, &web, |id| new.starts_with(id))
        .await;
    assert_eq!(
        id_of(&name),
        new,
        "the replacement went on, no third container"
    );
    Events::since(&w, since).in_order(("health_status: healthy", &new), ("die", &old));
}

/// SIGTERM while the scheduler retries a write that etcd, stopped, does not take (a lost
/// host's instances to move): the launcher exits at once instead of waiting for etcd.
#[tokio::test]
async fn a_launcher_stops_at_once_while_its_scheduler_cannot_write() {
    let mut w = World::start_on(None, &["--reschedule-after", "1s"]).await;
    // A second host, as its launcher's node record under a lease of its own.
    let other = format!("{}b", w.host);
    let lease = w.client.lease_client().grant(30, None).await.unwrap().id();
    let node = serde_json::json!({
        "v": 1, "host": other, "cpus_milli": 2000, "memory": 1u64 << 30,
    });
    w.client
        .kv_client()
        .put(
            format!("/viking/grid/nodes/{other}"),
            node.to_string(),
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    let mut web = w.spec("web", 2);
    web.command = Some(CommandSpec::Shell(
        "trap 'exit 0' TERM; while true; do sleep 0.2; done".into(),
    ));
    w.deploy(&web).await;
    w.run().await;
    let on_other = format!("/viking/grid/assign/{other}/");
    let keys = |prefix: String| {
        let client = w.client.clone();
        async move {
            client
                .kv_client()
                .get(
                    prefix,
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
                .map_or(0, |r| r.count())
        }
    };
    testkit::eventually_async(
        Duration::from_secs(15),
        "an instance placed on the other host",
        || async { (keys(on_other.clone()).await > 0).then_some(()) },
    )
    .await;
    // The other host is lost: the scheduler records it, and moves its instance a second
    // later; etcd is stopped before it can write the move.
    w.client.lease_client().revoke(lease).await.unwrap();
    let lost = format!("/viking/grid/lost/{other}");
    testkit::eventually_async(
        Duration::from_secs(15),
        "the other host recorded lost",
        || async { (keys(lost.clone()).await > 0).then_some(()) },
    )
    .await;
    w.etcd.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = std::time::Instant::now();
    let status = w.launcher.terminate(Duration::from_secs(6));
    assert!(status.success(), "{status}: {}", w.launcher.log());
    eprintln!("stopped {:?} after SIGTERM", started.elapsed());
}

/// A replacement that waits for its new container's health check holds up none of the
/// host's other work: a job deployed meanwhile starts at once, and the instance being
/// replaced says so while its old container serves.
#[tokio::test]
async fn a_slow_replacement_holds_up_nothing_else_on_the_host() {
    let w = World::start().await;
    const HEALTHY: &str = "viking/busybox-healthcheck:slow";
    let _image = healthy_image(HEALTHY);
    let looping = || {
        Some(CommandSpec::Shell(
            "trap 'exit 0' TERM; while true; do sleep 0.2; done".into(),
        ))
    };
    let mut slow = w.spec("slow", 1);
    slow.command = looping();
    w.deploy(&slow).await;
    w.run().await;
    w.until("slow running", |s| running(s, &["slow/0"])).await;
    // Its new spec never passes its health check: the replacement waits a minute.
    slow.image = HEALTHY.to_owned();
    slow.update.timeout_ms = 60_000;
    w.deploy(&slow).await;
    let next = format!("{}_slow_0-next", w.stack);
    testkit::eventually(
        Duration::from_secs(15),
        "the new one started beside",
        || w.containers().contains_key(&next).then_some(()),
    );
    let mut other = w.spec("other", 1);
    other.command = looping();
    w.deploy(&other).await;
    w.until("the other job running while slow is replaced", |s| {
        s.get("other/0")
            .is_some_and(|r| r.state == InstanceState::Running)
            && s.get("slow/0").is_some_and(|r| {
                r.state == InstanceState::Running && r.reason.contains("being replaced")
            })
    })
    .await;
    assert!(
        w.containers().contains_key(&next),
        "the replacement is still under way: {:?}",
        w.containers()
    );
}
