//! Docker for tests: the shared daemon, a tiny image built locally (no registry is reachable),
//! containers removed on Drop, and private daemons in network namespaces of their own.
//!
//! A daemon that does not answer is a test failure that says how to get one, never a skip:
//! `make test` installs `docker.io` and starts `dockerd`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::net::Netns;

/// The image every test container runs, and the examples too: Debian's static busybox and
/// its applets, built by `scripts/images.sh`.
pub const IMAGE: &str = "viking/busybox:latest";

/// A label on every container the tests start, so a crashed run's leftovers can be found:
/// `docker rm -f $(docker ps -aq --filter label=viking.test)`.
pub const TEST_LABEL: &str = "viking.test";

/// Runs `docker [-H host] args...` and returns its output, whatever the exit status.
pub fn docker(host: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new("docker");
    if let Some(h) = host {
        cmd.args(["-H", h]);
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run the docker client: {e}; run `make test` (it installs docker.io)")
        })
}

/// Runs `docker [-H host] args...`, fails the test if it fails, and returns trimmed stdout.
pub fn docker_ok(host: Option<&str>, args: &[&str]) -> String {
    let out = docker(host, args);
    assert!(
        out.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Fails the test unless a Docker daemon answers at `host` (default: `DOCKER_HOST` or the
/// local socket), and makes sure it has [`IMAGE`].
pub fn require(host: Option<&str>) {
    let out = docker(host, &["version", "--format", "{{.Server.Version}}"]);
    assert!(
        out.status.success(),
        "no Docker daemon answers ({}): these tests need a real one. Run `make test` (it \
         installs docker.io and starts dockerd) or start dockerd yourself",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    ensure_image(host);
}

static IMAGE_LOCK: Mutex<()> = Mutex::new(());

/// Builds [`IMAGE`] with `scripts/images.sh` unless the daemon has it (the script checks).
fn ensure_image(host: Option<&str>) {
    let _guard = IMAGE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/images.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script);
    if let Some(h) = host {
        cmd.env("DOCKER_HOST", h);
    }
    let out = cmd.output().expect("run scripts/images.sh");
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a throwaway container on `host` with `env` (`KEY=VALUE` lines, e.g. from `viking
/// env`) that fetches `http://$<url_var>/` `n` times with busybox wget (3 s each); returns the
/// answers, one per line, and how many fetches failed. `links` is its `viking.links` label:
/// the services link-scoped access lets it reach (`None`: no label, so none).
pub fn fetch_with_env(
    host: Option<&str>,
    env: &str,
    url_var: &str,
    n: usize,
    links: Option<&str>,
) -> (Vec<String>, usize) {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--rm".into(),
        "--label".into(),
        "viking.test=1".into(),
    ];
    if let Some(links) = links {
        args.extend(["--label".into(), format!("viking.links={links}")]);
    }
    for line in env.lines().filter(|l| !l.trim().is_empty()) {
        args.push("-e".into());
        args.push(line.to_owned());
    }
    args.push(IMAGE.into());
    args.extend([
        "sh".into(),
        "-c".into(),
        // busybox-static's `wget -T` crashes; `timeout` bounds each fetch instead.
        format!(
            "for i in $(seq {n}); do timeout 3 wget -qO- http://${url_var}/ || echo FAILED; done"
        ),
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = docker_ok(host, &refs);
    let answers: Vec<String> = out.lines().map(str::to_owned).collect();
    let failures = answers.iter().filter(|l| l.contains("FAILED")).count();
    (answers, failures)
}

/// A container, removed (with `rm -f`) on Drop.
pub struct Container {
    host: Option<String>,
    id: String,
}

impl Container {
    /// `docker run -d --label viking.test=1 <args>`; `args` holds the options, then the image
    /// and command (use [`IMAGE`]).
    pub fn run(host: Option<&str>, args: &[&str]) -> Container {
        let mut full = vec!["run", "-d", "--label", "viking.test=1"];
        full.extend_from_slice(args);
        let id = docker_ok(host, &full);
        Container {
            host: host.map(str::to_owned),
            id,
        }
    }

    /// `docker create --label viking.test=1 <args>`: created, not started (see [`Self::act`]).
    pub fn create(host: Option<&str>, args: &[&str]) -> Container {
        let mut full = vec!["create", "--label", "viking.test=1"];
        full.extend_from_slice(args);
        let id = docker_ok(host, &full);
        Container {
            host: host.map(str::to_owned),
            id,
        }
    }

    /// The full id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The first 12 digits, as `docker ps` and endpoint instances show them.
    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }

    /// `docker <verb> <id>`, e.g. `stop`, `start`, `kill`, `pause`.
    pub fn act(&self, verb: &str) {
        docker_ok(self.host.as_deref(), &[verb, &self.id]);
    }

    /// The host port Docker published `port` (`8080/tcp`) on.
    pub fn host_port(&self, port: &str) -> u16 {
        let out = docker_ok(self.host.as_deref(), &["port", &self.id, port]);
        out.lines()
            .find_map(|l| l.rsplit(':').next()?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no published port for {port}: {out:?}"))
    }

    /// The container's address on its network.
    pub fn ip(&self) -> String {
        docker_ok(
            self.host.as_deref(),
            &[
                "inspect",
                "--format",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                &self.id,
            ],
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(self.host.as_deref(), &["rm", "-f", "-v", &self.id]);
    }
}

pub(crate) fn run_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A private Docker daemon in its own network namespace, with its own socket, data root, exec
/// root and bridge, so the shared daemon is never touched. Stopped and removed on Drop.
pub struct Dockerd {
    dir: TempDir,
    /// The namespace it runs in, and the namespace itself when this daemon created it.
    netns_path: PathBuf,
    _own_netns: Option<Netns>,
    bip: String,
    child: Option<Child>,
}

impl Dockerd {
    /// Starts a daemon in a new namespace `netns`, its bridge on `bip` (e.g. `10.99.0.1/24`),
    /// and waits until it answers and has [`IMAGE`].
    pub fn start(netns: &str, bip: &str) -> Dockerd {
        let dir = tempfile::Builder::new()
            .prefix("viking-dockerd-")
            .tempdir()
            .expect("temp dir");
        let netns = Netns::new(netns);
        let mut d = Dockerd {
            dir,
            netns_path: netns.path(),
            _own_netns: Some(netns),
            bip: bip.to_owned(),
            child: None,
        };
        d.spawn();
        d
    }

    /// Starts a daemon in an existing namespace (a host of a [`crate::net::Lan`]).
    pub fn start_in(netns: &Netns, bip: &str) -> Dockerd {
        let dir = tempfile::Builder::new()
            .prefix("viking-dockerd-")
            .tempdir()
            .expect("temp dir");
        let mut d = Dockerd {
            dir,
            netns_path: netns.path(),
            _own_netns: None,
            bip: bip.to_owned(),
            child: None,
        };
        d.spawn();
        d
    }

    /// The endpoint to pass as `docker -H` or the registrator's `--docker`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.dir.path().join("docker.sock").display())
    }

    fn spawn(&mut self) {
        let p = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p.join("dockerd.log"))
            .expect("dockerd log");
        // `nsenter`, not `ip netns exec`: the latter remounts /sys and dockerd then finds no
        // cgroup mounts.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path.display()))
            .arg("dockerd")
            .args(["--data-root"])
            .arg(p.join("data"))
            .args(["--exec-root"])
            .arg(p.join("exec"))
            .args(["--pidfile"])
            .arg(p.join("dockerd.pid"))
            .args(["-H", &self.host(), "--bip", &self.bip])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let host = self.host();
        while !docker(Some(&host), &["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "private dockerd did not answer in 60 s; its log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        ensure_image(Some(&host));
    }

    /// Stops the daemon the way an operator does (SIGTERM, then waits).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops and starts the daemon; containers with a restart policy come back.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            let host = self.host();
            let ids = docker(Some(&host), &["ps", "-aq"]);
            for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
                let _ = docker(Some(&host), &["rm", "-f", "-v", id]);
            }
        }
        self.stop();
        // What dockerd left mounted under its roots must go before the files can.
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(self.dir.path().join("data"))
            .output();
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(self.dir.path().join("exec"))
            .output();
    }
}
