//! `viking up` and `viking run` end to end: real Docker, a real local etcd started by
//! `viking up`, its registrator and ambassador, the `examples/hello` stacks.
//!
//! One test, because the scenarios share one expensive set-up and one Docker host: the
//! examples' container names (`shared_web_0`, ...) are fixed.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::docker::{self, docker_ok};

use crate::{stderr, stdout, viking};

const ETCD: &str = "http://127.0.0.1:2379";

/// `viking up` as a child; stopped with SIGINT and checked on Drop.
struct Up {
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

impl Up {
    fn start(data: &Path, admin: &str) -> Up {
        let log = tempfile::NamedTempFile::new().expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_viking"))
            .args([
                "up", "--host", "e2e", "--admin", admin, "--grace", "1s", "--data",
            ])
            .arg(data)
            .env_remove("VIKING_ETCD")
            .env("VIKING_LOG_FORMAT", "plain")
            .stdin(Stdio::null())
            .stdout(log.reopen().expect("log"))
            .stderr(log.reopen().expect("log"))
            .spawn()
            .expect("start viking up");
        let up = Up {
            child: Some(child),
            log,
        };
        up.wait_log("viking is up", Duration::from_secs(30));
        up
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn wait_log(&self, what: &str, limit: Duration) {
        let start = Instant::now();
        while !self.log().contains(what) {
            assert!(
                start.elapsed() < limit,
                "no {what:?} in viking up's log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGINT, then waits for a clean exit.
    fn stop(&mut self) -> std::process::ExitStatus {
        let Some(mut child) = self.child.take() else {
            panic!("viking up is not running");
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("viking up did not stop in 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // Containers first, while etcd is there; then viking up (and its etcd) gently.
        for stack in ["app", "shared"] {
            let _ = viking(ETCD, &["stop", stack]);
        }
        if self.child.is_some() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.stop()));
        }
    }
}

fn ok(args: &[&str]) -> String {
    let out = viking(ETCD, args);
    assert!(out.status.success(), "viking {args:?}: {}", stderr(&out));
    stdout(&out)
}

/// `n` fetches of `$SHARED_WEB_PORT_80` from a throwaway container with app/client's env.
fn fetch_through_ambassador(n: usize) -> (Vec<String>, usize) {
    docker::fetch_with_env(None, &ok(&["env", "app/client"]), "SHARED_WEB_PORT_80", n)
}

fn web_hostnames() -> BTreeSet<String> {
    let ids = docker_ok(None, &["ps", "-q", "--filter", "label=viking.stack=shared"]);
    ids.lines().map(str::to_owned).collect()
}

#[test]
fn up_run_scale_kill_and_stop_the_examples() {
    docker::require(None);
    let probe = TcpListener::bind("127.0.0.1:2379");
    assert!(
        probe.is_ok(),
        "something already listens on 127.0.0.1:2379 (a `make up`?); this test starts its own \
         etcd there through `viking up`"
    );
    drop(probe);
    let data = tempfile::tempdir().expect("data dir");
    let admin_port = testkit::free_ports(1)[0];
    let admin = format!("127.0.0.1:{admin_port}");
    let mut up = Up::start(data.path(), &admin);

    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello");
    ok(&[
        "deploy",
        examples.join("shared").to_str().expect("utf-8"),
        examples.join("app").to_str().expect("utf-8"),
    ]);
    let started = ok(&["run", "shared"]);
    assert!(
        started.contains("started shared_web_0") && started.contains("started shared_web_1"),
        "{started}"
    );
    ok(&["run", "app"]);
    // Converging again changes nothing.
    assert_eq!(ok(&["run", "app"]).trim(), "unchanged app_client_0");

    // The client container reaches a backend through $SHARED_WEB_PORT_80.
    let start = Instant::now();
    loop {
        let logs = ok(&["logs", "app/client", "--tail", "3"]);
        let answered = web_hostnames()
            .iter()
            .any(|h| logs.contains(&format!("shared/web answered {h}")));
        if answered {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "client logs:\n{logs}\nviking up:\n{}",
            up.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The same services by name, from viking up's DNS on the bridge address.
    let dig = |args: &[&str]| {
        let out = Command::new("dig")
            .args(["@172.17.0.1", "+short", "+time=2", "+tries=2"])
            .args(args)
            .output()
            .expect("dig (make test installs dnsutils)");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(dig(&["web.shared.viking.internal"]), "172.17.0.1");
    let port = ok(&["env", "app/client"])
        .lines()
        .find_map(|l| l.strip_prefix("SHARED_WEB_PORT_80_TCP_PORT="))
        .expect("port var")
        .to_owned();
    assert_eq!(
        dig(&["_80._tcp.web.shared.viking.internal", "SRV"]),
        format!("0 0 {port} web.shared.viking.internal.")
    );
    // Both backends run on this host: one address, two SRV targets.
    let srv = dig(&["_80._tcp.web.shared.endpoints.viking.internal", "SRV"]);
    assert_eq!(srv.lines().count(), 2, "{srv}\n{}", ok(&["ps", "shared"]));

    // Scaled to 3: new connections spread over all 3.
    let scaled = ok(&["scale", "shared/web", "3"]);
    assert!(scaled.contains("started shared_web_2"), "{scaled}");
    let hosts = web_hostnames();
    assert_eq!(hosts.len(), 3);
    let start = Instant::now();
    let seen = loop {
        let (answers, failures) = fetch_through_ambassador(30);
        assert_eq!(failures, 0, "{answers:?}");
        let seen: BTreeSet<String> = answers.into_iter().collect();
        if seen == hosts || start.elapsed() > Duration::from_secs(10) {
            break seen;
        }
    };
    assert_eq!(seen, hosts, "30 requests did not reach all 3 backends");

    // One backend killed: clients keep succeeding.
    docker_ok(None, &["kill", "shared_web_1"]);
    let (answers, failures) = fetch_through_ambassador(30);
    assert_eq!(
        failures,
        0,
        "requests failed after a backend died: {answers:?}\n{}",
        up.log()
    );

    // Stopped: containers and endpoints gone, the listener stays for the next run.
    ok(&["stop", "app"]);
    let stopped = ok(&["stop", "shared"]);
    assert_eq!(stopped.lines().count(), 3, "{stopped}");
    assert!(web_hostnames().is_empty());
    let start = Instant::now();
    while !ok(&["ps", "shared"]).contains("\t3\t0\t") {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "endpoints stayed: {}",
            ok(&["ps", "shared"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let state = Command::new("curl")
        .args(["-fs", &format!("http://{admin}/state")])
        .output()
        .expect("curl");
    let state = String::from_utf8_lossy(&state.stdout);
    assert!(
        state.contains("\"service_port\": \"shared/web:80/tcp\""),
        "{state}"
    );
    assert!(state.contains("\"listening\": true"), "{state}");

    // viking up stops cleanly and takes its etcd with it.
    let status = up.stop();
    assert!(status.success(), "{status:?}\n{}", up.log());
    assert!(up.log().contains("stopped the local etcd"), "{}", up.log());
    assert!(
        TcpListener::bind("127.0.0.1:2379").is_ok(),
        "etcd still listens on 2379"
    );
}
