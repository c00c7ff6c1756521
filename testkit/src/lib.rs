//! Test support: real etcd servers for tests and benches, and Docker (see [`docker`]).
//!
//! [`Etcd`] starts one `etcd` on free loopback ports with its own temporary data dir and waits
//! until it answers; [`EtcdCluster`] starts three members that can be stopped and restarted one
//! by one. Both kill their processes and remove their data in `Drop`, also when a test panics.
//!
//! A missing `etcd` binary is a test failure, never a skip: `make test` installs it.
//!
//! [`process`]: [`Daemon`], the one way a test runs a program, and [`eventually`];
//! [`snapshot`]: [`assert_snapshot`].

pub mod certs;
pub mod cgroup;
pub mod docker;
pub mod lines;
pub mod net;
pub mod process;
pub mod snapshot;

pub use process::{Daemon, eventually, eventually_async};
pub use snapshot::assert_snapshot;

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::Client;
use tempfile::TempDir;

/// How long a member may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Finds `etcd`, or fails the test saying how to get it.
pub fn etcd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VIKING_TEST_ETCD") {
        return PathBuf::from(path);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
    {
        let candidate = dir.join("etcd");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "etcd not found in PATH: these tests need a real etcd. Run `make test` (it installs \
         Debian's etcd-server) or `apt-get install etcd-server`, or set VIKING_TEST_ETCD"
    );
}

/// `n` distinct free loopback ports. They are free when this returns; the caller binds them
/// soon after, and retries on the rare collision with another test.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// `n` free loopback ports below the kernel's ephemeral range (12000-19999), for servers a
/// test stops and starts again on the same port (etcd): an ephemeral port freed by a stop can
/// be taken meanwhile by any outgoing connection of any test, and the restart then fails to
/// bind (seen in CI: `bind: address already in use` on etcd's restart).
pub fn steady_ports(n: usize) -> Vec<u16> {
    let mut held: Vec<TcpListener> = Vec::new();
    while held.len() < n {
        let port = fastrand::u16(12_000..20_000);
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    held.iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// One etcd member process.
struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn spawn(&mut self, initial_cluster: &str, extra_args: &[String]) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open etcd log");
        let child = Command::new(etcd_binary())
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.client_url])
            .args(["--advertise-client-urls", &self.client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", initial_cluster])
            .args(["--initial-cluster-token", "viking-test"])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process has exited (e.g. its port was taken).
    fn exited(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().map(|s| s.is_some()).unwrap_or(true),
            None => true,
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A single-member etcd for one test.
pub struct Etcd {
    member: Member,
    _dir: TempDir,
}

impl Etcd {
    /// Starts etcd with its default settings (notably `--max-txn-ops 128`).
    pub async fn start() -> Etcd {
        Self::start_with(&[]).await
    }

    /// Starts etcd with extra flags, e.g. `["--max-txn-ops", "1024"]`.
    pub async fn start_with(extra_args: &[&str]) -> Etcd {
        Self::start_on_with("127.0.0.1", extra_args).await
    }

    /// Starts etcd listening on `ip` (an address of this namespace other than loopback, for
    /// clients in other network namespaces).
    pub async fn start_on(ip: &str) -> Etcd {
        Self::start_on_with(ip, &[]).await
    }

    async fn start_on_with(ip: &str, extra_args: &[&str]) -> Etcd {
        let extra: Vec<String> = extra_args.iter().map(|s| (*s).to_owned()).collect();
        let mut last_log = String::new();
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("viking-etcd-")
                .tempdir()
                .expect("temp dir");
            let ports = steady_ports(2);
            let mut member = new_member(dir.path(), "etcd0", ip, ports[0], ports[1]);
            let initial = format!("{}={}", member.name, member.peer_url);
            member.spawn(&initial, &extra);
            if wait_ready(&mut [&mut member]).await {
                return Etcd { member, _dir: dir };
            }
            last_log = member.log_tail();
        }
        panic!("etcd did not start in 3 tries; its log ends with:\n{last_log}");
    }

    /// The client URL, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        self.member.client_url.clone()
    }

    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.endpoints(), None)
            .await
            .expect("connect to test etcd")
    }

    /// Kills etcd (SIGKILL: the harshest restart) and keeps its data.
    pub fn stop(&mut self) {
        self.member.kill();
    }

    /// Kills etcd, deletes its data and starts it again on the same ports, with the same
    /// flags: an etcd restored from nothing (its revision starts again at 1).
    pub async fn restart_empty(&mut self) {
        self.member.kill();
        std::fs::remove_dir_all(&self.member.data_dir).expect("remove etcd's data");
        self.restart().await;
    }

    /// Starts it again on the same ports and data, and waits until it answers.
    pub async fn restart(&mut self) {
        self.member.kill();
        let initial = format!("{}={}", self.member.name, self.member.peer_url);
        self.member.spawn(&initial, &[]);
        assert!(
            wait_ready(&mut [&mut self.member]).await,
            "etcd did not come back; its log ends with:\n{}",
            self.member.log_tail()
        );
    }
}

/// A three-member etcd cluster on loopback.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    _dir: TempDir,
}

impl EtcdCluster {
    pub async fn start() -> EtcdCluster {
        let mut last_log = String::new();
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("viking-etcd-cluster-")
                .tempdir()
                .expect("temp dir");
            let ports = steady_ports(6);
            let mut members: Vec<Member> = (0..3)
                .map(|i| {
                    new_member(
                        dir.path(),
                        &format!("etcd{i}"),
                        "127.0.0.1",
                        ports[2 * i],
                        ports[2 * i + 1],
                    )
                })
                .collect();
            let initial_cluster = members
                .iter()
                .map(|m| format!("{}={}", m.name, m.peer_url))
                .collect::<Vec<_>>()
                .join(",");
            for m in &mut members {
                m.spawn(&initial_cluster, &[]);
            }
            let mut refs: Vec<&mut Member> = members.iter_mut().collect();
            if wait_ready(&mut refs).await {
                return EtcdCluster {
                    members,
                    initial_cluster,
                    _dir: dir,
                };
            }
            last_log = members
                .iter()
                .map(Member::log_tail)
                .collect::<Vec<_>>()
                .join("\n--\n");
        }
        panic!("etcd cluster did not start in 3 tries; logs end with:\n{last_log}");
    }

    /// Client URLs of all members.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.endpoints(), None)
            .await
            .expect("connect to test etcd cluster")
    }

    /// The index of the current leader: the running member whose status names itself.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_none() {
                    continue;
                }
                let status = async {
                    let mut c = Client::connect([m.client_url.as_str()], None).await.ok()?;
                    c.status().await.ok()
                };
                if let Ok(Some(s)) = tokio::time::timeout(Duration::from_secs(2), status).await {
                    if s.header().map(|h| h.member_id()) == Some(s.leader()) {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "etcd cluster has no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills member `i` (SIGKILL).
    pub fn stop(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Starts member `i` again on its data dir and waits until it answers.
    pub async fn restart(&mut self, i: usize) {
        let initial = self.initial_cluster.clone();
        let member = &mut self.members[i];
        member.kill();
        member.spawn(&initial, &[]);
        assert!(
            wait_ready(&mut [member]).await,
            "etcd member {i} did not come back; its log ends with:\n{}",
            self.members[i].log_tail()
        );
    }
}

fn new_member(dir: &Path, name: &str, ip: &str, client_port: u16, peer_port: u16) -> Member {
    Member {
        name: name.to_owned(),
        client_url: format!("http://{ip}:{client_port}"),
        peer_url: format!("http://{ip}:{peer_port}"),
        data_dir: dir.join(format!("{name}.data")),
        log_path: dir.join(format!("{name}.log")),
        child: None,
    }
}

/// Waits until every member answers a linearizable read (so a leader exists), or one died.
async fn wait_ready(members: &mut [&mut Member]) -> bool {
    let deadline = Instant::now() + START_TIMEOUT;
    for m in members.iter_mut() {
        loop {
            if m.exited() {
                return false;
            }
            let ok = async {
                let mut c = Client::connect([m.client_url.as_str()], None).await.ok()?;
                c.get("/health-probe", None).await.ok()
            };
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(2), ok).await {
                break;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    true
}

/// A binary of another package of this workspace (`registrator`, `ambassador`, ...), next to
/// the running test's own directory: `cargo test --workspace` builds every package's binaries
/// before it runs any test.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace first (`cargo test --workspace` or `make test` do)",
        bin.display()
    );
    bin
}

/// Runs one of the project's binaries against the etcd at `endpoint`, with the caller's
/// `VIKING_*` environment removed so the test sees only the flags it passes.
pub fn run_cli(binary: &str, endpoint: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(binary);
    for (k, _) in std::env::vars() {
        if k.starts_with("VIKING_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(["--etcd", endpoint])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {binary}: {e}"))
}

/// A command's stdout as text.
pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A command's stderr as text.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
