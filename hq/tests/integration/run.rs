//! `viking up` and `viking run` end to end: real Docker, a real local etcd started by
//! `viking up`, its registrator and ambassador, the `examples/hello` stacks.
//!
//! One test, because the scenarios share one expensive set-up. Nothing it uses is what a
//! running `make up` uses: etcd on free loopback ports, DNS on a free loopback port,
//! ambassador ports from a probed free range outside the default 20000-29999, and the
//! examples' stacks under names of this run (so their containers are named apart).

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::docker::{self, docker_ok};
use testkit::{Daemon, eventually};

use crate::{stderr, stdout, viking};

/// One run's world: `viking up` and the names and ports it was given.
struct World {
    up: Daemon,
    etcd: String,
    /// `--range` of every deploy.
    range: String,
    dns: u16,
    admin: String,
    launcher_admin: String,
    /// The examples' stacks as named in this run.
    shared: String,
    app: String,
    dir: tempfile::TempDir,
}

/// A loopback port whose next port is free too (etcd's client and peer ports).
fn free_port_pair() -> u16 {
    eventually(Duration::from_secs(5), "two free ports in a row", || {
        let port = testkit::free_ports(1)[0];
        let next = port.checked_add(1)?;
        TcpListener::bind(("127.0.0.1", next)).ok().map(|_| port)
    })
}

/// Eight ports free on the bridge address, below the ephemeral range and above the range a
/// `make up` hands out.
fn free_range() -> String {
    eventually(
        Duration::from_secs(5),
        "eight free ports above 30000",
        || {
            let first = 30_000 + fastrand::u16(0..2_700);
            let free = (first..first + 8).all(|p| {
                TcpListener::bind(("172.17.0.1", p)).is_ok()
                    && TcpListener::bind(("127.0.0.1", p)).is_ok()
            });
            free.then(|| format!("{first}-{}", first + 7))
        },
    )
}

impl World {
    fn start() -> World {
        let dir = tempfile::tempdir().expect("temp dir");
        let id = std::process::id();
        let (shared, app) = (format!("shared{id}"), format!("app{id}"));
        // The examples, with this run's stack names (and so env var names) in them.
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello");
        for (from, to) in [("shared", &shared), ("app", &app)] {
            let text = std::fs::read_to_string(examples.join(from).join("stack.yml")).unwrap();
            let text = text
                .replace("shared/web", &format!("{shared}/web"))
                .replace("SHARED_WEB", &format!("{}_WEB", shared.to_uppercase()));
            std::fs::create_dir_all(dir.path().join(to)).unwrap();
            std::fs::write(dir.path().join(to).join("stack.yml"), text).unwrap();
        }
        let etcd = format!("http://127.0.0.1:{}", free_port_pair());
        let [admin, dns, launcher_admin] = testkit::free_ports(3)[..] else {
            unreachable!()
        };
        let launcher_admin = format!("127.0.0.1:{launcher_admin}");
        let data = dir.path().join("data");
        let range = free_range();
        let admin = format!("127.0.0.1:{admin}");
        let mut up = Daemon::spawn(
            env!("CARGO_BIN_EXE_viking"),
            &[
                "--etcd",
                &etcd,
                "up",
                "--host",
                "e2e",
                "--admin",
                &admin,
                "--launcher-admin",
                &launcher_admin,
                "--dns",
                &format!("127.0.0.1:{dns}"),
                "--grace",
                "1s",
                "--data",
                data.to_str().expect("utf-8"),
                // Its own lock dir: a `make up` here holds the bridge address's lock, and this
                // run's ports (a range of their own) do not meet its ports.
                "--run-dir",
                dir.path().join("run").to_str().expect("utf-8"),
                // The ambassador serves only the range its deploys allocate from.
                "--range",
                &range,
            ],
        );
        up.wait_log("viking is up", Duration::from_secs(30));
        World {
            up,
            etcd,
            range,
            dns,
            admin,
            launcher_admin,
            shared,
            app,
            dir,
        }
    }

    /// `viking <args>` against this run's etcd and range, which must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let mut all = vec!["--range", &self.range];
        all.extend_from_slice(args);
        let out = viking(&self.etcd, &all);
        assert!(out.status.success(), "viking {args:?}: {}", stderr(&out));
        stdout(&out)
    }

    /// `n` fetches of the web's URL from a throwaway container with the client's env.
    fn fetch_through_ambassador(&self, n: usize) -> (Vec<String>, usize) {
        let env = self.ok(&["env", &format!("{}/client", self.app)]);
        let var = format!("{}_WEB_PORT_80", self.shared.to_uppercase());
        let links = format!("{}/web", self.shared);
        docker::fetch_with_env(None, &env, &var, n, Some(&links))
    }

    fn web_hostnames(&self) -> BTreeSet<String> {
        let label = format!("label=viking.stack={}", self.shared);
        let ids = docker_ok(None, &["ps", "-q", "--filter", &label]);
        ids.lines().map(str::to_owned).collect()
    }

    fn dig(&self, args: &[&str]) -> String {
        let out = Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &self.dns.to_string(),
                "+short",
                "+time=2",
                "+tries=2",
            ])
            .args(args)
            .output()
            .expect("dig (make test installs dnsutils)");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Containers first, while etcd is there; then viking up (and its etcd) gently.
        for stack in [&self.app, &self.shared] {
            let _ = viking(&self.etcd, &["stop", stack]);
        }
        if self.up.exited().is_none() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.up.terminate(Duration::from_secs(20))
            }));
        }
        let _ = &self.dir;
    }
}

#[test]
fn up_run_scale_kill_and_stop_the_examples() {
    docker::require(None);
    let mut w = World::start();
    let (shared, app) = (w.shared.clone(), w.app.clone());
    let (client, web) = (format!("{app}/client"), format!("{shared}/web"));
    let dir = |name: &str| w.dir.path().join(name).to_str().expect("utf-8").to_owned();
    w.ok(&["deploy", &dir(&shared), &dir(&app)]);
    // Through the grid: viking up's launcher is the scheduler and runs them.
    let started = w.ok(&["run", &shared]);
    assert_eq!(started.trim(), format!("{shared}: 2 instances running"));
    assert_eq!(w.web_hostnames().len(), 2);
    w.ok(&["run", &app]);
    let client_id = || {
        docker_ok(
            None,
            &["ps", "-q", "--filter", &format!("name={app}_client_0")],
        )
    };
    let first = client_id();
    // Asking again changes nothing.
    assert_eq!(
        w.ok(&["run", &app]).trim(),
        format!("{app}: 1 instances running")
    );
    assert_eq!(client_id(), first);

    // The client container reaches a backend through $SHARED_WEB_PORT_80.
    eventually(Duration::from_secs(15), "the client reaches a web", || {
        let logs = w.ok(&["logs", &client, "--tail", "3"]);
        let answered = w
            .web_hostnames()
            .iter()
            .any(|h| logs.contains(&format!("{web} answered {h}")));
        if answered {
            Ok(())
        } else {
            Err(format!("client logs:\n{logs}\nviking up:\n{}", w.up.log()))
        }
    });

    // The same services by name, from viking up's DNS.
    let name = format!("web.{shared}.viking.internal");
    assert_eq!(w.dig(&[&name]), "172.17.0.1");
    let port_var = format!("{}_WEB_PORT_80_TCP_PORT=", shared.to_uppercase());
    let port = w
        .ok(&["env", &client])
        .lines()
        .find_map(|l| l.strip_prefix(&port_var).map(str::to_owned))
        .expect("port var");
    assert_eq!(
        w.dig(&[&format!("_80._tcp.{name}"), "SRV"]),
        format!("0 0 {port} {name}.")
    );
    // Both backends run on this host: one address, two SRV targets.
    let srv = w.dig(&[
        &format!("_80._tcp.web.{shared}.endpoints.viking.internal"),
        "SRV",
    ]);
    assert_eq!(srv.lines().count(), 2, "{srv}\n{}", w.ok(&["ps", &shared]));

    // Scaled to 3: new connections spread over all 3.
    let scaled = w.ok(&["scale", &web, "3"]);
    assert_eq!(scaled.trim(), format!("{web}: scale 2 -> 3"));
    let hosts = eventually(Duration::from_secs(15), "a third web", || {
        let hosts = w.web_hostnames();
        (hosts.len() == 3).then_some(hosts)
    });
    let start = Instant::now();
    let seen = loop {
        let (answers, failures) = w.fetch_through_ambassador(30);
        assert_eq!(failures, 0, "{answers:?}");
        let seen: BTreeSet<String> = answers.into_iter().collect();
        if seen == hosts || start.elapsed() > Duration::from_secs(10) {
            break seen;
        }
    };
    assert_eq!(seen, hosts, "30 requests did not reach all 3 backends");

    // One backend killed: clients keep succeeding.
    docker_ok(None, &["kill", &format!("{shared}_web_1")]);
    let (answers, failures) = w.fetch_through_ambassador(30);
    assert_eq!(
        failures,
        0,
        "requests failed after a backend died: {answers:?}\n{}",
        w.up.log()
    );

    // A name that is neither deployed nor running is said, not "stopped".
    let out = viking(&w.etcd, &["stop", "no-such-stack"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("stack no-such-stack is neither deployed nor running"),
        "{}",
        stderr(&out)
    );
    // Stopped: containers and endpoints gone, the listener stays for the next run.
    w.ok(&["stop", &app]);
    let stopped = w.ok(&["stop", &shared]);
    assert_eq!(stopped.trim(), format!("stopped {shared}"));
    assert!(w.web_hostnames().is_empty());
    eventually(
        Duration::from_secs(5),
        "the stopped webs' endpoints gone",
        || {
            let ps = w.ok(&["ps", &shared]);
            if ps.contains("\t0/3\t0\t") {
                Ok(())
            } else {
                Err(ps)
            }
        },
    );
    let state = Command::new("curl")
        .args(["-fs", &format!("http://{}/state", w.admin)])
        .output()
        .expect("curl");
    let state = String::from_utf8_lossy(&state.stdout);
    assert!(
        state.contains(&format!("\"service_port\": \"{web}:80/tcp\"")),
        "{state}"
    );
    assert!(state.contains("\"listening\": true"), "{state}");
    // The launcher's admin server, as `launcher --admin` has it: its instances' statuses.
    let launcher = Command::new("curl")
        .args(["-fs", &format!("http://{}/state", w.launcher_admin)])
        .output()
        .expect("curl");
    let launcher: serde_json::Value =
        serde_json::from_slice(&launcher.stdout).expect("the launcher's /state is JSON");
    assert_eq!(launcher["listed"], true, "{launcher}");
    assert!(
        launcher["keys"]
            .as_object()
            .is_some_and(|k| k.keys().any(|k| k.contains("/grid/nodes/e2e"))),
        "its node record: {launcher}"
    );

    // viking up stops cleanly (SIGINT, as Ctrl-C) and takes its etcd with it.
    w.up.signal(nix::sys::signal::Signal::SIGINT);
    let status = w.up.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", w.up.log());
    assert!(
        w.up.log().contains("stopped the local etcd"),
        "{}",
        w.up.log()
    );
    let etcd_port = w.etcd.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    assert!(
        TcpListener::bind(("127.0.0.1", etcd_port)).is_ok(),
        "etcd still listens on {etcd_port}"
    );
}

/// A launcher of its own (a host id of this test) against a test's etcd; on Drop it is
/// killed and the containers it made are removed.
struct Launcher {
    daemon: Daemon,
    host: String,
}

impl Launcher {
    fn start(etcd: &str) -> Launcher {
        let host = format!("h{}", std::process::id());
        let daemon = Daemon::spawn(
            testkit::workspace_bin("launcher"),
            &[
                "--etcd",
                etcd,
                "--host",
                &host,
                "--ttl",
                "2s",
                "--admin",
                "127.0.0.1:0",
            ],
        );
        Launcher { daemon, host }
    }

    /// Its containers: name -> state.
    fn containers(&self) -> BTreeSet<String> {
        let filter = format!("label=viking.host={}", self.host);
        let out = docker_ok(None, &["ps", "--filter", &filter, "--format", "{{.Names}}"]);
        out.lines().map(str::to_owned).collect()
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        self.daemon.kill();
        let filter = format!("label=viking.host={}", self.host);
        for id in docker_ok(None, &["ps", "-aq", "--filter", &filter]).lines() {
            let _ = docker::docker(None, &["rm", "-f", id]);
        }
    }
}

#[tokio::test]
async fn concurrent_runs_and_twenty_concurrent_scales_end_in_one_asked_state() {
    docker::require(None);
    let etcd = testkit::Etcd::start().await;
    let ep = etcd.endpoint();
    let launcher = Launcher::start(&ep);
    let dir = tempfile::tempdir().unwrap();
    let stack = format!("race{}", std::process::id());
    std::fs::create_dir_all(dir.path().join(&stack)).unwrap();
    std::fs::write(
        dir.path().join(&stack).join("stack.yml"),
        format!(
            "w:\n  image: {}\n  command: sleep 3600\n  scale: 3\n",
            testkit::docker::IMAGE
        ),
    )
    .unwrap();
    let out = viking(&ep, &["deploy", dir.path().join(&stack).to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Two runs at once: both see the same three instances run.
    let run = || {
        let (ep, stack) = (ep.clone(), stack.clone());
        std::thread::spawn(move || viking(&ep, &["run", &stack, "--timeout", "60s"]))
    };
    let (a, b) = (run(), run());
    for out in [a.join().unwrap(), b.join().unwrap()] {
        assert!(
            out.status.success(),
            "{}\n{}\n{}",
            stdout(&out),
            stderr(&out),
            launcher.daemon.log()
        );
        assert_eq!(stdout(&out).trim(), format!("{stack}: 3 instances running"));
    }
    assert_eq!(launcher.containers().len(), 3);

    // Twenty scales at once, 1 to 20: the last write wins, and exactly that many run.
    let service = format!("{stack}/w");
    let scales: Vec<_> = (1..=20u32)
        .map(|n| {
            let (ep, service) = (ep.clone(), service.clone());
            std::thread::spawn(move || viking(&ep, &["scale", &service, &n.to_string()]))
        })
        .collect();
    for s in scales {
        let out = s.join().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = viking(&ep, &["--output", "json", "ps", &stack]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let scale = rows[0]["scale"].as_u64().unwrap() as usize;
    assert!((1..=20).contains(&scale));
    eventually(
        Duration::from_secs(60),
        "as many containers as the scale",
        || {
            let names = launcher.containers();
            let want: BTreeSet<String> = (0..scale).map(|i| format!("{stack}_w_{i}")).collect();
            if names == want {
                Ok(())
            } else {
                Err(format!("scale {scale}, containers {names:?}"))
            }
        },
    );
    let out = viking(&ep, &["stop", &stack]);
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        launcher.daemon.log()
    );
    assert!(launcher.containers().is_empty());
}
