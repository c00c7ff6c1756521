//! Many hosts, each a network namespace on one bridge with its own dockerd, registrator,
//! ambassador and launcher (and locknet), sharing one etcd that the test runs in its own
//! namespace. The grid places the examples' instances on the hosts; a client on host `a`
//! reaches the backends on every host through `a`'s ambassador.
//!
//! Every host's Docker bridge is 172.17.0.1, as on real hosts: the env vars HQ writes hold
//! wherever a container runs.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use testkit::docker::{self, Dockerd};
use testkit::net::Lan;
use testkit::{Daemon, Etcd};

/// One of the workspace's binaries inside `host`, killed on Drop.
fn spawn(lan: &Lan, host: &str, bin: &str, args: &[&str]) -> Daemon {
    spawn_program(lan, host, &testkit::workspace_bin(bin), args)
}

/// A program inside `host`, killed on Drop.
fn spawn_program(lan: &Lan, host: &str, program: &Path, args: &[&str]) -> Daemon {
    let mut command = lan.ns(host).command(program.to_str().expect("utf-8 path"));
    command.args(args);
    let name = program
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    Daemon::spawn_command(&format!("{name} on {host}"), command)
}

struct Host {
    name: &'static str,
    // Processes before the daemon: they stop first.
    procs: Vec<Daemon>,
    dockerd: Dockerd,
}

struct Cluster {
    // Hosts first (their daemons and containers), then etcd, then the namespaces.
    hosts: Vec<Host>,
    /// Extra flags of every launcher.
    launcher_args: Vec<&'static str>,
    /// Comma-separated client URLs.
    endpoints: String,
    /// One etcd in the test's own namespace, or one member per host.
    _etcd: Option<Etcd>,
    members: Vec<(String, Option<Daemon>)>,
    etcd_dir: tempfile::TempDir,
    lan: Lan,
    /// The test's own address on the LAN: where its `viking` commands come from.
    root: std::net::Ipv4Addr,
}

impl Cluster {
    /// Hosts `names` and the outsider; one etcd in the test's namespace.
    async fn start(names: &[&'static str]) -> Cluster {
        Self::start_with(names, false).await
    }

    /// With `etcd_on_hosts`, a member of a 3-member etcd cluster runs on each host instead.
    async fn start_with(names: &[&'static str], etcd_on_hosts: bool) -> Cluster {
        Self::start_full(names, etcd_on_hosts, &[]).await
    }

    /// With extra flags for every launcher (e.g. a short `--reschedule-after`).
    async fn start_full(
        names: &[&'static str],
        etcd_on_hosts: bool,
        launcher_args: &[&'static str],
    ) -> Cluster {
        docker::require(None);
        let mut all: Vec<&str> = names.to_vec();
        all.push("out");
        let mut lan = Lan::new(&all);
        let root = lan.join_root();
        let etcd_dir = tempfile::tempdir().expect("etcd dir");
        let mut members = Vec::new();
        let (etcd, endpoint) = if etcd_on_hosts {
            for &name in names {
                members.push((
                    name.to_owned(),
                    Some(etcd_member(&lan, names, name, etcd_dir.path(), "new")),
                ));
            }
            let urls: Vec<String> = names
                .iter()
                .map(|n| format!("http://{}:2379", lan.addr(n)))
                .collect();
            wait_etcd(&urls).await;
            (None, urls.join(","))
        } else {
            let etcd = Etcd::start_on(&root.to_string()).await;
            let endpoint = etcd.endpoint();
            (Some(etcd), endpoint)
        };
        let mut hosts = Vec::new();
        for &name in names {
            let dockerd = Dockerd::start_in(lan.ns(name), "172.17.0.1/16");
            let addr = lan.addr(name).to_string();
            let sock = dockerd.host();
            let procs = agents(&lan, name, &endpoint, &addr, &sock, launcher_args);
            hosts.push(Host {
                name,
                procs,
                dockerd,
            });
        }
        let cluster = Cluster {
            hosts,
            launcher_args: launcher_args.to_vec(),
            endpoints: endpoint,
            _etcd: etcd,
            members,
            etcd_dir,
            lan,
            root,
        };
        for &name in names {
            let addr = cluster.lan.addr(name).to_string();
            cluster.viking(None, &["host", "add", name, &addr]);
        }
        cluster
    }

    /// Starts a host's registrator and ambassador (again).
    fn restart_agents(&mut self, name: &'static str) {
        let endpoint = self.endpoints.clone();
        let addr = self.lan.addr(name).to_string();
        let i = self
            .hosts
            .iter()
            .position(|h| h.name == name)
            .expect("host");
        let sock = self.hosts[i].dockerd.host();
        let procs = agents(
            &self.lan,
            name,
            &endpoint,
            &addr,
            &sock,
            &self.launcher_args,
        );
        self.hosts[i].procs = procs;
    }

    /// The name of the etcd member that leads now.
    async fn leader(&self) -> String {
        let start = Instant::now();
        loop {
            for (name, proc) in &self.members {
                if proc.is_none() {
                    continue;
                }
                let url = format!("http://{}:2379", self.lan.addr(name));
                let status = async {
                    let mut c = etcd_client::Client::connect([url.as_str()], None)
                        .await
                        .ok()?;
                    c.status().await.ok()
                };
                if let Ok(Some(s)) = tokio::time::timeout(Duration::from_secs(2), status).await {
                    if s.header().map(|h| h.member_id()) == Some(s.leader()) {
                        return name.clone();
                    }
                }
            }
            assert!(start.elapsed() < Duration::from_secs(30), "no etcd leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the etcd member on `name` (SIGKILL), or starts it again on its data.
    async fn etcd_member(&mut self, name: &str, up: bool) {
        let names: Vec<String> = self.members.iter().map(|(n, _)| n.clone()).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let i = names.iter().position(|n| n == name).expect("member");
        if up {
            let proc = etcd_member(&self.lan, &refs, name, self.etcd_dir.path(), "existing");
            self.members[i].1 = Some(proc);
            wait_etcd(&[format!("http://{}:2379", self.lan.addr(name))]).await;
        } else if let Some(mut p) = self.members[i].1.take() {
            p.kill();
        }
    }

    /// This stack's endpoint keys in etcd, read through the first member that answers.
    async fn endpoint_keys(&self, stack: &str) -> Vec<String> {
        let prefix = format!("/viking/services/{stack}/");
        for url in self.endpoints.split(',') {
            let read = async {
                let mut c = etcd_client::Client::connect([url], None).await.ok()?;
                c.get(
                    prefix.as_str(),
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_keys_only(),
                    ),
                )
                .await
                .ok()
            };
            if let Ok(Some(resp)) = tokio::time::timeout(Duration::from_secs(2), read).await {
                return resp
                    .kvs()
                    .iter()
                    .map(|kv| kv.key_str().unwrap_or("").to_owned())
                    .collect();
            }
        }
        Vec::new()
    }

    fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).expect("host")
    }

    fn host_mut(&mut self, name: &str) -> &mut Host {
        self.hosts
            .iter_mut()
            .find(|h| h.name == name)
            .expect("host")
    }

    /// Kills a host's agents (SIGKILL: their leases run out); its containers keep running.
    fn kill_agents(&mut self, name: &str) {
        for p in &mut self.host_mut(name).procs {
            p.kill();
        }
    }

    /// Cuts a host's link to the others (`up: false`) or joins it again.
    fn link(&self, name: &str, up: bool) {
        self.lan
            .ns(name)
            .exec(&["ip", "link", "set", "eth0", if up { "up" } else { "down" }]);
    }

    /// `viking <args>` against the cluster's etcd, whatever its exit status.
    fn viking_out(&self, args: &[&str]) -> Output {
        Command::new(testkit::workspace_bin("viking"))
            .env_remove("VIKING_ETCD")
            .args(["--etcd", &self.endpoints])
            .args(args)
            .output()
            .expect("viking")
    }

    /// `viking <args>` against the cluster's etcd, with DOCKER_HOST set to `on`'s daemon.
    fn viking(&self, on: Option<&str>, args: &[&str]) -> String {
        let mut cmd = Command::new(testkit::workspace_bin("viking"));
        cmd.env_remove("VIKING_ETCD")
            .args(["--etcd", &self.endpoints])
            .args(args);
        if let Some(h) = on {
            cmd.env("DOCKER_HOST", self.host(h).dockerd.host());
        }
        let out: Output = cmd.output().expect("viking");
        assert!(
            out.status.success(),
            "viking {args:?} on {on:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for h in &self.hosts {
            for p in &h.procs {
                all.push_str(&format!("--- {}:\n{}\n", h.name, p.log()));
            }
        }
        all
    }

    /// Container ids (12 digits) of `stack` on host `on`.
    fn containers(&self, on: &str, stack: &str) -> BTreeSet<String> {
        let out = docker::docker_ok(
            Some(&self.host(on).dockerd.host()),
            &[
                "ps",
                "-q",
                "--filter",
                &format!("label=viking.stack={stack}"),
            ],
        );
        out.lines().map(str::to_owned).collect()
    }

    /// The COLOUR env of each running instance's container of `stack` on every host (a
    /// replacement being tried, `<stack>_<job>_<i>-next`, is not one yet), sorted.
    fn colours(&self, stack: &str) -> Vec<String> {
        let mut out = Vec::new();
        for h in &self.hosts {
            let host = h.dockerd.host();
            let named = docker::docker_ok(
                Some(&host),
                &[
                    "ps",
                    "--filter",
                    &format!("label=viking.stack={stack}"),
                    "--format",
                    "{{.ID}} {{.Names}}",
                ],
            );
            let ids = named
                .lines()
                .filter_map(|l| l.split_once(' '))
                .filter(|(_, name)| !name.ends_with("-next"))
                .map(|(id, _)| id.to_owned());
            for id in ids {
                // A container may go between the list and the inspect (a replacement).
                let env = docker::docker(
                    Some(&host),
                    &[
                        "inspect",
                        "-f",
                        "{{range .Config.Env}}{{println .}}{{end}}",
                        &id,
                    ],
                );
                let env = String::from_utf8_lossy(&env.stdout).into_owned();
                out.extend(
                    env.lines()
                        .filter_map(|l| l.strip_prefix("COLOUR="))
                        .map(str::to_owned),
                );
            }
        }
        out.sort();
        out
    }

    /// From a throwaway container on `on` with app/client's env: `n` fetches of
    /// `$SHARED_WEB_PORT_80`; returns (answers, failures).
    fn fetch(&self, on: &str, n: usize) -> (Vec<String>, usize) {
        let env = self.viking(None, &["env", "app/client"]);
        let host = self.host(on).dockerd.host();
        docker::fetch_with_env(
            Some(&host),
            &env,
            "SHARED_WEB_PORT_80",
            n,
            Some("shared/web"),
        )
    }

    /// Requests from a throwaway container on `on` with app/client's env to
    /// `$SHARED_WEB_PORT_80`, in batches of 25, until [`Traffic::stop`].
    fn traffic(&self, on: &str) -> Traffic {
        let env = self.viking(None, &["env", "app/client"]);
        let host = self.host(on).dockerd.host();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut made, mut failed) = (0, 0);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) || made < 200 {
                let (answers, failures) = docker::fetch_with_env(
                    Some(&host),
                    &env,
                    "SHARED_WEB_PORT_80",
                    25,
                    Some("shared/web"),
                );
                made += answers.len();
                failed += failures;
                assert!(made < 5000, "bounded");
            }
            (made, failed)
        });
        Traffic { stop, thread }
    }

    /// Samples the running containers of `stack` on `hosts` every 100 ms until `done` holds
    /// (failing with `viking ps` after `limit`): the fewest and the most seen at once.
    async fn count_until(
        &self,
        hosts: &[&str],
        stack: &str,
        limit: Duration,
        mut done: impl FnMut() -> bool,
    ) -> (usize, usize) {
        let started = Instant::now();
        let (mut fewest, mut most) = (usize::MAX, 0);
        loop {
            let running: usize = hosts.iter().map(|h| self.containers(h, stack).len()).sum();
            fewest = fewest.min(running);
            most = most.max(running);
            if done() {
                return (fewest, most);
            }
            assert!(
                started.elapsed() < limit,
                "not done within {limit:?}\n{}",
                self.viking(None, &["ps", stack])
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `viking ps --output json STACK`'s instances: (job, instance, host, container, state).
    fn instances(&self, stack: &str) -> Vec<(String, u64, String, String, String)> {
        let ps = self.viking(None, &["--output", "json", "ps", stack]);
        let rows: serde_json::Value = serde_json::from_str(&ps).expect("ps json");
        let mut out = Vec::new();
        for job in rows.as_array().expect("rows") {
            for i in job["instances"].as_array().expect("instances") {
                out.push((
                    i["service"].as_str().unwrap_or_default().to_owned(),
                    i["instance"].as_u64().unwrap_or_default(),
                    i["host"].as_str().unwrap_or_default().to_owned(),
                    i["container"].as_str().unwrap_or_default().to_owned(),
                    i["state"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
        out
    }

    /// The host running instance `i` of `service` (waits until one runs).
    fn host_of(&self, service: &str, i: u64) -> String {
        let stack = service.split('/').next().expect("stack");
        testkit::eventually(Duration::from_secs(20), "the instance running", || {
            self.instances(stack)
                .into_iter()
                .find(|(s, n, _, _, state)| s == service && *n == i && state == "running")
                .map(|(_, _, host, _, _)| host)
        })
    }
}

/// The etcd member of `name`, on its address, in a cluster of `names`.
/// Requests made in the background (at least 200, at most 5,000).
struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(usize, usize)>,
}

impl Traffic {
    /// Stops (once at least 200 requests were made): (made, failed).
    fn stop(self) -> (usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("traffic")
    }
}

fn etcd_member(lan: &Lan, names: &[&str], name: &str, dir: &Path, state: &str) -> Daemon {
    let ip = lan.addr(name);
    let cluster: Vec<String> = names
        .iter()
        .map(|n| format!("{n}=http://{}:2380", lan.addr(n)))
        .collect();
    let data = dir.join(name);
    let args = [
        "--name".to_owned(),
        name.to_owned(),
        "--data-dir".to_owned(),
        data.to_str().expect("utf-8").to_owned(),
        "--listen-client-urls".to_owned(),
        format!("http://{ip}:2379"),
        "--advertise-client-urls".to_owned(),
        format!("http://{ip}:2379"),
        "--listen-peer-urls".to_owned(),
        format!("http://{ip}:2380"),
        "--initial-advertise-peer-urls".to_owned(),
        format!("http://{ip}:2380"),
        "--initial-cluster".to_owned(),
        cluster.join(","),
        "--initial-cluster-state".to_owned(),
        state.to_owned(),
        "--initial-cluster-token".to_owned(),
        "viking-many-hosts".to_owned(),
        "--log-level".to_owned(),
        "warn".to_owned(),
        "--logger".to_owned(),
        "zap".to_owned(),
    ];
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_program(lan, name, &testkit::etcd_binary(), &refs)
}

/// Waits until every member answers a read.
async fn wait_etcd(urls: &[String]) {
    let start = Instant::now();
    for url in urls {
        loop {
            let ok = async {
                let mut c = etcd_client::Client::connect([url.as_str()], None)
                    .await
                    .ok()?;
                c.get("/probe", None).await.ok()
            };
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(2), ok).await {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "etcd at {url} did not answer"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A host's registrator (TTL 3 s), ambassador (on the bridge address, no DNS) and launcher
/// (TTL 3 s; 2 CPUs and 2 GiB offered).
fn agents(
    lan: &Lan,
    name: &str,
    etcd: &str,
    addr: &str,
    docker: &str,
    launcher_args: &[&str],
) -> Vec<Daemon> {
    let mut launcher = vec![
        "--etcd", etcd, "--host", name, "--docker", docker, "--ttl", "3s", "--cpus", "2",
        "--memory", "2G",
    ];
    launcher.extend_from_slice(launcher_args);
    vec![
        spawn(lan, name, "launcher", &launcher),
        spawn(
            lan,
            name,
            "registrator",
            &[
                "--etcd", etcd, "--host", name, "--addr", addr, "--docker", docker, "--ttl", "3s",
            ],
        ),
        spawn(lan, name, "ambassador", &ambassador_args(etcd, name, &[])),
    ]
}

/// A host's ambassador's flags (on the bridge address, no DNS), and `extra`.
fn ambassador_args<'a>(etcd: &'a str, name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--etcd",
        etcd,
        "--host",
        name,
        "--bind",
        "172.17.0.1",
        "--dns",
        "off",
        "--grace",
        "1s",
    ];
    args.extend_from_slice(extra);
    args
}

/// Another ambassador on `name` (its own was stopped), with `extra` flags.
fn ambassador(cluster: &Cluster, name: &str, extra: &[&str]) -> Daemon {
    let endpoint = cluster.endpoints.clone();
    spawn(
        &cluster.lan,
        name,
        "ambassador",
        &ambassador_args(&endpoint, name, extra),
    )
}

fn examples() -> (String, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello");
    (
        dir.join("shared").to_str().expect("utf-8").to_owned(),
        dir.join("app").to_str().expect("utf-8").to_owned(),
    )
}

/// Scenarios 1-3: the grid spreads shared/web (scale 5) 2/2/1 over `a`, `b` and `c`, each
/// instance on exactly one host as `viking ps` says; a client on `a` reaches backends on
/// every host through `a`'s ambassador; `b` is lost (processes killed, link cut) and comes
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linking_across_hosts_survives_losing_one() {
    let mut cluster = Cluster::start(&["a", "b", "c"]).await;
    let (shared, app) = examples();
    cluster.viking(None, &["deploy", &shared, &app]);
    cluster.viking(None, &["scale", "shared/web", "5"]);
    cluster.viking(None, &["scale", "app/client", "3"]);
    cluster.viking(None, &["run", "shared", "app"]);

    // 1. Spread 2/2/1, and what ps says is what each host's Docker runs.
    let instances = cluster.instances("shared");
    let mut per_host: Vec<usize> = ["a", "b", "c"]
        .iter()
        .map(|h| instances.iter().filter(|i| i.2 == *h).count())
        .collect();
    per_host.sort_unstable();
    assert_eq!(per_host, [1, 2, 2], "{instances:?}");
    let hosted = |h: &str| -> BTreeSet<String> {
        instances
            .iter()
            .filter(|i| i.2 == h)
            .map(|i| i.3.clone())
            .collect()
    };
    for h in ["a", "b", "c"] {
        assert_eq!(cluster.containers(h, "shared"), hosted(h), "host {h}");
    }
    let (on_b, on_c) = (hosted("b"), hosted("c"));
    let all: BTreeSet<String> = instances.iter().map(|i| i.3.clone()).collect();
    // Through a's ambassador to the backends on every host.
    let start = Instant::now();
    let mut seen = BTreeSet::new();
    while seen != all {
        let (answers, failures) = cluster.fetch("a", 20);
        assert_eq!(failures, 0, "{answers:?}\n{}", cluster.logs());
        seen.extend(answers);
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "reached {seen:?} of {all:?}"
        );
    }

    // 2. b is lost: its processes killed and its link cut. New connections keep succeeding.
    cluster.kill_agents("b");
    cluster.link("b", false);
    let lost = Instant::now();
    let (answers, failures) = cluster.fetch("a", 30);
    eprintln!("with b lost: {failures} failed of 30");
    assert_eq!(failures, 0, "{answers:?}\n{}", cluster.logs());
    assert!(answers.iter().all(|a| !on_b.contains(a)), "{answers:?}");
    // Its endpoints leave etcd within the lease TTL (3 s).
    while cluster
        .endpoint_keys("shared")
        .await
        .iter()
        .any(|k| k.contains("/b:"))
    {
        assert!(
            lost.elapsed() < Duration::from_secs(6),
            "b's endpoints stayed: {:?}",
            cluster.endpoint_keys("shared").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ps says its instances are lost, not yet moved (the reschedule delay is 30 s).
    testkit::eventually(Duration::from_secs(5), "b's instances shown lost", || {
        let on_b: Vec<_> = cluster
            .instances("shared")
            .into_iter()
            .filter(|i| i.2 == "b")
            .collect();
        if !on_b.is_empty() && on_b.iter().all(|i| i.4 == "lost") {
            Ok(())
        } else {
            Err(format!("{on_b:?}"))
        }
    });
    eprintln!("b's endpoints gone {:?} after it was lost", lost.elapsed());

    // 3. b comes back (link up, its agents restarted; its containers kept running): its
    // endpoints return and traffic spreads over b and c again.
    cluster.link("b", true);
    cluster.restart_agents("b");
    let back = Instant::now();
    loop {
        let (answers, failures) = cluster.fetch("a", 20);
        assert_eq!(failures, 0, "{answers:?}");
        if answers.iter().any(|a| on_b.contains(a)) && answers.iter().any(|a| on_c.contains(a)) {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "b never came back: {answers:?}\n{}",
            cluster.logs()
        );
    }
    eprintln!(
        "traffic reached b again {:?} after it came back",
        back.elapsed()
    );
}

/// Polls until `from` can (or cannot) connect to `to`; returns how long it took.
fn until_connects(lan: &Lan, from: &str, to: SocketAddr, can: bool, limit: Duration) -> Duration {
    let start = Instant::now();
    while lan.ns(from).connects(to, Duration::from_millis(200)) != can {
        assert!(
            start.elapsed() < limit,
            "{from} -> {to}: still {}",
            if can { "blocked" } else { "open" }
        );
    }
    start.elapsed()
}

/// Scenario 5: with `locknet --watch` on every host and a 3-member etcd across them, the
/// outsider reaches no ambassador port, no published container port and no etcd, members do,
/// SSH stays open; `viking host add` for the
/// outsider opens the host within 1 s and `viking host rm` closes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_firewall_admits_only_members() {
    // etcd runs on the hosts, so its peer and client traffic crosses the firewalls.
    let mut cluster = Cluster::start_with(&["a", "b", "c"], true).await;
    // The test is the operator's workstation: a member, or its `viking` commands would be
    // shut out of etcd along with the outsider.
    let root = cluster.root.to_string();
    cluster.viking(None, &["host", "add", "admin", &root]);
    let endpoint = cluster.endpoints.clone();
    for name in ["a", "b", "c"] {
        let fw = spawn(
            &cluster.lan,
            name,
            "locknet",
            &["--watch", "--etcd", &endpoint],
        );
        cluster.host_mut(name).procs.push(fw);
    }
    let (shared, app) = examples();
    cluster.viking(None, &["deploy", &shared, &app]);
    cluster.viking(None, &["run", "shared"]);
    // The host the grid put web/0 on is the one the outsider tries; the other two are members.
    let target = cluster.host_of("shared/web", 0);
    let members: Vec<&str> = ["a", "b", "c"]
        .into_iter()
        .filter(|h| *h != target)
        .collect();
    let a = cluster.lan.addr(&target);
    let published = docker::docker_ok(
        Some(&cluster.host(&target).dockerd.host()),
        &["port", "shared_web_0", "80/tcp"],
    );
    let port: u16 = published
        .lines()
        .find_map(|l| l.rsplit(':').next()?.trim().parse().ok())
        .expect("published port");
    let ambassador_port: u16 = cluster
        .viking(None, &["env", "app/client"])
        .lines()
        .find_map(|l| l.strip_prefix("SHARED_WEB_PORT_80_TCP_PORT=")?.parse().ok())
        .expect("ambassador port");
    // The outsider routes a's bridge through a, to try its ambassador directly (members have
    // a bridge of their own at that address: they use their own ambassador).
    cluster
        .lan
        .ns("out")
        .exec(&["ip", "route", "add", "172.17.0.0/16", "via", &a.to_string()]);
    let _ssh = cluster
        .lan
        .ns(&target)
        .serve(SocketAddr::from((a, 22)), "ssh");
    let published = SocketAddr::from((a, port));
    let ambassador = SocketAddr::from(([172, 17, 0, 1], ambassador_port));
    let limit = Duration::from_secs(5);

    // locknet has applied once the outsider is blocked.
    until_connects(&cluster.lan, "out", published, false, limit);
    until_connects(&cluster.lan, "out", ambassador, false, limit);
    until_connects(&cluster.lan, "out", SocketAddr::from((a, 22)), true, limit);
    until_connects(&cluster.lan, members[0], published, true, limit);
    let etcd = SocketAddr::from((a, 2379));
    until_connects(&cluster.lan, "out", etcd, false, limit);
    until_connects(&cluster.lan, members[1], etcd, true, limit);

    let out = cluster.lan.addr("out").to_string();
    cluster.viking(None, &["host", "add", "out", &out]);
    let opened = until_connects(&cluster.lan, "out", published, true, Duration::from_secs(1));
    // The same path to the ambassador was closed by the firewall, not by routing.
    until_connects(
        &cluster.lan,
        "out",
        ambassador,
        true,
        Duration::from_secs(1),
    );
    cluster.viking(None, &["host", "rm", "out"]);
    let closed = until_connects(
        &cluster.lan,
        "out",
        published,
        false,
        Duration::from_secs(1),
    );
    eprintln!("outsider admitted {opened:?} after host add, shut out {closed:?} after host rm");
}

/// Scenario 6: a deploy that links a new service while traffic flows: the new port listens on
/// every host's ambassador within 1 s, and a connection opened before it keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_while_traffic_flows_reaches_every_host() {
    let cluster = Cluster::start(&["a", "b"]).await;
    let (shared, app) = examples();
    cluster.viking(None, &["deploy", &shared, &app]);
    cluster.viking(None, &["run", "shared"]);
    let web_port: u16 = cluster
        .viking(None, &["env", "app/client"])
        .lines()
        .find_map(|l| l.strip_prefix("SHARED_WEB_PORT_80_TCP_PORT=")?.parse().ok())
        .expect("ambassador port");
    // A connection through a's ambassador, opened before the deploy and used after it.
    let web = SocketAddr::from(([172, 17, 0, 1], web_port));
    let start = Instant::now();
    let mut open = loop {
        let conn = cluster
            .lan
            .ns("a")
            .run(move || std::net::TcpStream::connect_timeout(&web, Duration::from_secs(1)));
        if let Ok(c) = conn {
            break c;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a's ambassador never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("stack.yml"),
        "db:\n\ttype: job\n\timage: viking/busybox\n\tports:\n\t\t- 5432\n\tcommand: sleep 3600\n\
         user:\n\ttype: job\n\timage: viking/busybox\n\tlink:\n\t\t- db\n\tcommand: sleep 3600\n",
    )
    .expect("write stack");
    let path = dir.path().to_str().expect("utf-8").to_owned();
    // Requests through a's ambassador run while the deploy happens.
    let traffic = {
        let env = cluster.viking(None, &["env", "app/client"]);
        let host = cluster.host("a").dockerd.host();
        std::thread::spawn(move || {
            docker::fetch_with_env(
                Some(&host),
                &env,
                "SHARED_WEB_PORT_80",
                30,
                Some("shared/web"),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    cluster.viking(None, &["deploy", &path, "--name", "extra"]);
    let deployed = Instant::now();
    let db_port: u16 = cluster
        .viking(None, &["env", "extra/user"])
        .lines()
        .find_map(|l| l.strip_prefix("DB_PORT_5432_TCP_PORT=")?.parse().ok())
        .expect("new ambassador port");
    for host in ["a", "b"] {
        let state = || {
            let out = cluster
                .lan
                .ns(host)
                .command("curl")
                .args(["-fs", "http://127.0.0.1:9100/state"])
                .output()
                .expect("curl");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        while !state().contains(&format!("\"port\": {db_port}")) {
            assert!(
                deployed.elapsed() < Duration::from_secs(1),
                "{host}'s ambassador does not listen on {db_port} 1 s after the deploy:\n{}",
                state()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    eprintln!(
        "new port on every host {:?} after the deploy",
        deployed.elapsed()
    );
    let (answers, failures) = traffic.join().expect("traffic");
    assert_eq!(
        failures, 0,
        "requests failed during the deploy: {answers:?}"
    );

    use std::io::{Read, Write};
    open.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .expect("write on the old connection");
    open.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut answer = String::new();
    open.read_to_string(&mut answer)
        .expect("read on the old connection");
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
}

/// Scenario 4: a 3-member etcd, one member per host. A follower, then the leader, is stopped:
/// no connection through the ambassadors fails and a registration made meanwhile is not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_an_etcd_member_loses_nothing() {
    let mut cluster = Cluster::start_with(&["a", "b", "c"], true).await;
    let (shared, app) = examples();
    cluster.viking(None, &["deploy", &shared, &app]);
    cluster.viking(None, &["run", "shared"]);
    let (answers, failures) = cluster.fetch("a", 10);
    assert_eq!(failures, 0, "{answers:?}\n{}", cluster.logs());

    for round in ["a follower", "the leader"] {
        let leader = cluster.leader().await;
        let victim = if round == "the leader" {
            leader
        } else {
            ["a", "b", "c"]
                .into_iter()
                .find(|n| *n != leader)
                .expect("follower")
                .to_owned()
        };
        cluster.etcd_member(&victim, false).await;
        let (answers, failures) = cluster.fetch("a", 30);
        eprintln!("{round} ({victim}) stopped: {failures} failed of 30");
        assert_eq!(failures, 0, "{answers:?}\n{}", cluster.logs());
        // A container started meanwhile on the stopped member's host is registered all the
        // same: its registrator turns to the other members.
        let sock = cluster.host(&victim).dockerd.host();
        let id = docker::docker_ok(
            Some(&sock),
            &[
                "run",
                "-d",
                "--label",
                "viking.test=1",
                "-l",
                "viking.stack=shared",
                "-l",
                "viking.job=web",
                "-p",
                "80",
                docker::IMAGE,
                "httpd",
                "-f",
                "-p",
                "80",
                "-h",
                "/www",
            ],
        );
        let start = Instant::now();
        while !cluster
            .endpoint_keys("shared")
            .await
            .iter()
            .any(|k| k.contains(&id[..12]))
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "registration lost with {round} down:\n{}",
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "registered {:?} after docker run with {round} down",
            start.elapsed()
        );
        cluster.etcd_member(&victim, true).await;
    }
}

/// The grid's rules on four hosts: labels and `max_per_host` constrain (what fits nowhere is
/// pending, with each host's reason, until a label makes room); memory reservations are never
/// exceeded (a job that fits nowhere makes `viking run` exit 1 naming every host's reason, and
/// disturbs nothing); labelling a host or scaling another job moves no running instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grid_keeps_constraints_capacity_and_stability() {
    let cluster = Cluster::start(&["a", "b", "c", "d"]).await;
    cluster.viking(None, &["host", "label", "a", "role=db", "tier=web"]);
    cluster.viking(None, &["host", "label", "b", "tier=web"]);
    cluster.viking(None, &["host", "label", "c", "tier=web"]);
    let dir = tempfile::tempdir().expect("dir");
    let sleep = "image: viking/busybox\n  command: sleep 3600";
    std::fs::write(
        dir.path().join("stack.yml"),
        format!(
            "db:\n  {sleep}\n  scale: 2\n  placement: {{labels: {{role: db}}}}\n\
             one:\n  {sleep}\n  scale: 4\n  placement: {{labels: {{tier: web}}, max_per_host: 1}}\n\
             big:\n  {sleep}\n  scale: 2\n  resources: {{memory: 1536M}}\n"
        ),
    )
    .expect("write");
    let path = dir.path().to_str().expect("utf-8").to_owned();
    cluster.viking(None, &["deploy", &path, "--name", "grid"]);
    // one/3 fits nowhere: run exits 1 naming it and each host's reason.
    let out = cluster.viking_out(&["run", "grid", "--timeout", "10s"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("1 of 8 instances not running"), "{err}");
    for reason in [
        "grid/one/3: pending",
        "d: lacks label tier=web",
        "a: runs 1 of this job already (placement.max_per_host 1)",
    ] {
        assert!(err.contains(reason), "{reason:?} not in:\n{err}");
    }
    let placed = |service: &str| -> Vec<(u64, String, String)> {
        cluster
            .instances("grid")
            .into_iter()
            .filter(|i| i.0 == service && i.4 == "running")
            .map(|i| (i.1, i.2, i.3))
            .collect()
    };
    assert!(
        placed("grid/db").iter().all(|(_, h, _)| h == "a"),
        "{:?}",
        placed("grid/db")
    );
    let one_hosts: BTreeSet<String> = placed("grid/one").into_iter().map(|i| i.1).collect();
    assert_eq!(one_hosts.len(), 3, "one per host: {one_hosts:?}");
    assert!(!one_hosts.contains("d"));
    let big_hosts: BTreeSet<String> = placed("grid/big").into_iter().map(|i| i.1).collect();
    assert_eq!(
        big_hosts.len(),
        2,
        "1.5G twice never fits one 2G host: {big_hosts:?}"
    );
    let running_before: BTreeSet<(String, u64, String, String)> = cluster
        .instances("grid")
        .into_iter()
        .filter(|i| i.4 == "running")
        .map(|i| (i.0, i.1, i.2, i.3))
        .collect();
    assert_eq!(running_before.len(), 7);

    // A job that fits nowhere: exit 1 with each host's reason; nothing else moves.
    std::fs::write(
        dir.path().join("stack.yml"),
        format!("huge:\n  {sleep}\n  resources: {{memory: 4G}}\n"),
    )
    .expect("write");
    cluster.viking(None, &["deploy", &path, "--name", "huge"]);
    let out = cluster.viking_out(&["run", "huge", "--timeout", "3s"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("huge/huge/0: pending"), "{err}");
    assert!(err.contains("needs 4G"), "{err}");
    cluster.viking(None, &["stop", "huge"]);

    // Labelling d places one/3 there; scaling db adds one on a; nothing that ran moved.
    cluster.viking(None, &["host", "label", "d", "tier=web"]);
    cluster.viking(None, &["scale", "grid/db", "3"]);
    testkit::eventually(Duration::from_secs(30), "one/3 on d and db/2 on a", || {
        let now = cluster.instances("grid");
        let ok = now
            .iter()
            .any(|i| i.0 == "grid/one" && i.1 == 3 && i.2 == "d" && i.4 == "running")
            && now
                .iter()
                .any(|i| i.0 == "grid/db" && i.1 == 2 && i.2 == "a" && i.4 == "running");
        if ok { Ok(()) } else { Err(format!("{now:?}")) }
    });
    let running_after: BTreeSet<(String, u64, String, String)> = cluster
        .instances("grid")
        .into_iter()
        .filter(|i| i.4 == "running")
        .map(|i| (i.0, i.1, i.2, i.3))
        .collect();
    for i in &running_before {
        assert!(
            running_after.contains(i),
            "{i:?} moved or was replaced:\n{running_after:?}"
        );
    }
    // Each host's Docker runs exactly what ps says.
    for h in ["a", "b", "c", "d"] {
        let said: BTreeSet<String> = running_after
            .iter()
            .filter(|i| i.2 == h)
            .map(|i| i.3.clone())
            .collect();
        assert_eq!(cluster.containers(h, "grid"), said, "host {h}");
    }
}

/// The grid under failure (issue 17, scenarios 1 and 2): a host lost (its agents killed, its
/// link cut) has its instances placed elsewhere once its lease and `--reschedule-after` have
/// run out, shown `lost` with the time left meanwhile; when it comes back its launcher removes
/// the old copies within 5 s, and from then on the job never runs more than `scale`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_host_is_replaced_and_its_old_copies_go_when_it_returns() {
    let mut cluster =
        Cluster::start_full(&["a", "b", "c"], false, &["--reschedule-after", "4s"]).await;
    let (shared, app) = examples();
    cluster.viking(None, &["deploy", &shared, &app]);
    cluster.viking(None, &["scale", "shared/web", "3"]);
    cluster.viking(None, &["run", "shared"]);
    let before = cluster.instances("shared");
    assert!(before.iter().any(|i| i.2 == "b"), "{before:?}");
    testkit::eventually(Duration::from_secs(20), "a's ambassador answers", || {
        let (_, failures) = cluster.fetch("a", 1);
        (failures == 0).then_some(())
    });
    // Traffic through a's ambassador while b is lost and re-placed.
    let traffic = cluster.traffic("a");
    std::thread::sleep(Duration::from_millis(500));

    cluster.kill_agents("b");
    cluster.link("b", false);
    let lost = Instant::now();
    // Shown lost, with the time left, before it moves.
    testkit::eventually(
        Duration::from_secs(10),
        "b's instance shown lost, with the time left",
        || {
            let ps = cluster.viking(None, &["ps", "shared"]);
            (ps.contains("lost")
                && (ps.contains("moves elsewhere in") || ps.contains("moving now")))
            .then_some(())
            .ok_or(ps)
        },
    );
    // Within ttl (3 s) + reschedule-after (4 s) + 10 s: all three run on a and c.
    testkit::eventually(Duration::from_secs(17), "web re-placed on a and c", || {
        let now = cluster.instances("shared");
        let ok = now.len() == 3 && now.iter().all(|i| i.2 != "b" && i.4 == "running");
        ok.then_some(()).ok_or(format!("{now:?}"))
    });
    eprintln!(
        "re-placed and running {:?} after b was lost",
        lost.elapsed()
    );
    // b still runs its old copy, cut off.
    assert_eq!(cluster.containers("b", "shared").len(), 1);
    let (made, failed) = traffic.stop();
    eprintln!(
        "while b was lost: {failed} of {made} requests failed (those sent to b before its \
         endpoint expired)"
    );
    // Once b's endpoint has gone with its lease, nothing fails.
    let traffic = cluster.traffic("a");

    // Back: its launcher finds nothing assigned to it and removes the old copy.
    cluster.link("b", true);
    cluster.restart_agents("b");
    let back = Instant::now();
    testkit::eventually(Duration::from_secs(5), "b's old copy removed", || {
        cluster.containers("b", "shared").is_empty().then_some(())
    });
    eprintln!(
        "b's old copy removed {:?} after it came back",
        back.elapsed()
    );
    let sampled = Instant::now();
    let mut samples = 0;
    while sampled.elapsed() < Duration::from_secs(20) {
        let running: usize = ["a", "b", "c"]
            .iter()
            .map(|h| cluster.containers(h, "shared").len())
            .sum();
        assert!(running <= 3, "{running} web containers run for scale 3");
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(samples > 50);
    let (made, failed) = traffic.stop();
    eprintln!("b back and its old copy removed: {failed} of {made} requests failed");
    assert_eq!(failed, 0, "requests failed after b's endpoint expired");
}

/// Issue 17, scenario 3: the scheduler's launcher killed: another takes over within the
/// election lease, a scale issued right after is applied, and a write guarded by the dead
/// leader's election key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_scheduler_is_replaced_and_the_old_one_cannot_write() {
    let mut cluster = Cluster::start(&["a", "b", "c"]).await;
    let (shared, app) = examples();
    cluster.viking(None, &["deploy", &shared, &app]);
    cluster.viking(None, &["run", "shared"]);
    let mut client = etcd_client::Client::connect([cluster.endpoints.as_str()], None)
        .await
        .expect("etcd");
    let leader = |resp: &etcd_client::GetResponse| -> Option<(String, Vec<u8>, i64)> {
        resp.kvs()
            .iter()
            .min_by_key(|kv| kv.create_revision())
            .map(|kv| {
                (
                    kv.value_str().unwrap_or("").to_owned(),
                    kv.key().to_vec(),
                    kv.create_revision(),
                )
            })
    };
    let opts = || Some(etcd_client::GetOptions::new().with_prefix());
    let (old, old_key, old_rev) =
        leader(&client.get("/viking/grid/leader/", opts()).await.unwrap()).expect("a leader");
    cluster.host_mut(&old).procs[0].kill(); // the launcher
    let killed = Instant::now();
    let new = loop {
        let resp = client.get("/viking/grid/leader/", opts()).await.unwrap();
        if let Some((h, _, _)) = leader(&resp).filter(|(h, _, _)| *h != old) {
            break h;
        }
        assert!(killed.elapsed() < Duration::from_secs(15), "no new leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "{new} leads {:?} after {old}'s launcher was killed",
        killed.elapsed()
    );
    cluster.viking(None, &["scale", "shared/web", "4"]);
    testkit::eventually(Duration::from_secs(20), "four webs running", || {
        let now = cluster.instances("shared");
        let running = now
            .iter()
            .filter(|i| i.4 == "running" || i.2 == old)
            .count();
        (now.len() == 4 && running == 4)
            .then_some(())
            .ok_or_else(|| {
                format!(
                    "{}\n{}",
                    cluster.viking(None, &["ps", "shared"]),
                    cluster.logs()
                )
            })
    });
    // The old leader's view is stale and its key gone: a write guarded by it fails.
    let stale = etcd_client::Txn::new()
        .when([etcd_client::Compare::create_revision(
            old_key,
            etcd_client::CompareOp::Equal,
            old_rev,
        )])
        .and_then([etcd_client::TxnOp::put(
            format!("/viking/grid/assign/{old}/shared/web/9"),
            "{\"v\":1,\"spec_digest\":\"stale\"}",
            None,
        )]);
    let resp = client.txn(stale).await.unwrap();
    assert!(!resp.succeeded(), "a deposed leader wrote an assignment");
    let left = client
        .get(format!("/viking/grid/assign/{old}/shared/web/9"), None)
        .await
        .unwrap();
    assert!(left.kvs().is_empty());
}

/// Issue 17, scenario 7: a host drained while traffic flows ends with no instances, `viking
/// host rm` refused before and accepted after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_host_ends_empty_and_only_then_can_be_removed() {
    let cluster = Cluster::start(&["a", "b"]).await;
    let (shared, app) = examples();
    cluster.viking(None, &["deploy", &shared, &app]);
    cluster.viking(None, &["run", "shared"]);
    assert_eq!(cluster.containers("b", "shared").len(), 1);
    let out = cluster.viking_out(&["host", "rm", "b"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("viking host drain b"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    testkit::eventually(Duration::from_secs(20), "a's ambassador answers", || {
        let (_, failures) = cluster.fetch("a", 1);
        (failures == 0).then_some(())
    });
    let traffic = cluster.traffic("a");
    std::thread::sleep(Duration::from_millis(500));
    cluster.viking(None, &["host", "drain", "b"]);
    // b's copy keeps serving until its replacement on a is healthy: never one fewer.
    let started = Instant::now();
    let (fewest, _) = cluster
        .count_until(&["a", "b"], "shared", Duration::from_secs(30), || {
            let rows: serde_json::Value =
                serde_json::from_str(&cluster.viking(None, &["--output", "json", "host", "ls"]))
                    .expect("host ls json");
            let drained = rows
                .as_array()
                .and_then(|r| r.iter().find(|r| r["host"] == "b"))
                .is_some_and(|b| b["state"] == "drained");
            drained && cluster.containers("b", "shared").is_empty()
        })
        .await;
    eprintln!("b drained in {:?}", started.elapsed());
    assert!(
        fewest >= 2,
        "only {fewest} web containers ran during the drain"
    );
    testkit::eventually(Duration::from_secs(20), "both on a, running", || {
        let now = cluster.instances("shared");
        now.iter()
            .all(|i| i.2 == "a" && i.4 == "running")
            .then_some(())
            .ok_or(format!("{now:?}"))
    });
    let (made, failed) = traffic.stop();
    eprintln!("drain under traffic: {failed} failed of {made}");
    assert_eq!(failed, 0, "requests failed during the drain");
    cluster.viking(None, &["host", "rm", "b"]);
}

/// A `shared/web` that serves its container's hostname and stops at once on SIGTERM, with the
/// rolling-update policy under test and `COLOUR` as the thing that changes.
fn rolling_web(dir: &Path, colour: &str, command: &str) {
    rolling_web_with(dir, colour, command, "timeout: 20s");
}

/// [`rolling_web`] with `update` settings of its own besides `max_parallel: 1, min_healthy:
/// 1s`.
fn rolling_web_with(dir: &Path, colour: &str, command: &str, update: &str) {
    std::fs::create_dir_all(dir.join("shared")).expect("dir");
    std::fs::write(
        dir.join("shared").join("stack.yml"),
        format!(
            "web:\n  image: viking/busybox\n  ports: [80]\n  scale: 4\n  env: {{COLOUR: {colour}}}\n  \
             update: {{max_parallel: 1, min_healthy: 1s, {update}}}\n  command: {command}\n"
        ),
    )
    .expect("write");
}

const SERVE: &str =
    "\"hostname > /www/index.html; httpd -f -p 80 -h /www & trap 'kill $!; exit 0' TERM; wait\"";

/// Waits until shared/web runs 4 instances, all `running`, none on an old spec.
fn four_healthy(cluster: &Cluster, what: &str) {
    testkit::eventually(Duration::from_secs(30), what, || {
        let now = cluster.instances("shared");
        let ps = cluster.viking(None, &["ps", "shared"]);
        (now.len() == 4 && now.iter().all(|i| i.4 == "running") && !ps.contains("old spec"))
            .then_some(())
            .ok_or(format!("{now:?}\n{ps}"))
    });
}

/// Issue 17, scenarios 5 and 6: a rolling update of 4 instances, `max_parallel: 1`, with
/// traffic through an ambassador: no request fails, never more than 5 instances run, and
/// the new spec is on all 4 at the end. Then an update to a command that exits at once: it
/// stops after the first instance, the other 3 keep the old spec and serve, `viking ps` says
/// why; deploying the good spec again brings back 4 healthy instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_loses_no_request_and_a_bad_one_stops_after_one() {
    let cluster = Cluster::start(&["a", "b"]).await;
    let dir = tempfile::tempdir().expect("dir");
    let (_, app) = examples();
    let shared = dir
        .path()
        .join("shared")
        .to_str()
        .expect("utf-8")
        .to_owned();
    rolling_web(dir.path(), "blue", SERVE);
    cluster.viking(None, &["deploy", &shared, &app]);
    cluster.viking(None, &["run", "shared"]);
    let colours = || cluster.colours("shared");
    assert_eq!(colours(), ["blue"; 4]);
    // a's ambassador serves the port before traffic starts.
    testkit::eventually(Duration::from_secs(20), "a's ambassador answers", || {
        let (_, failures) = cluster.fetch("a", 1);
        (failures == 0).then_some(())
    });

    // Traffic from a throughout.
    let traffic = cluster.traffic("a");
    std::thread::sleep(Duration::from_secs(1));
    rolling_web(dir.path(), "green", SERVE);
    cluster.viking(None, &["deploy", &shared]);
    let started = Instant::now();
    let (_, most) = cluster
        .count_until(&["a", "b"], "shared", Duration::from_secs(90), || {
            colours() == ["green"; 4]
        })
        .await;
    eprintln!(
        "rolling update of 4 done in {:?}; at most {most} instances ran",
        started.elapsed()
    );
    let (made, failed) = traffic.stop();
    eprintln!("rolling update under traffic: {failed} failed of {made}");
    assert!(made >= 200, "{made}");
    assert_eq!(failed, 0, "requests failed during the rolling update");
    assert!(
        most <= 5,
        "{most} instances ran at once for scale 4, max_parallel 1"
    );

    // An update whose containers exit at once stops after the first instance.
    rolling_web(dir.path(), "red", "\"exit 1\"");
    cluster.viking(None, &["deploy", &shared]);
    testkit::eventually(Duration::from_secs(30), "the failed update shown", || {
        let ps = cluster.viking(None, &["ps", "shared"]);
        ps.contains("keeps running its old spec")
            .then_some(())
            .ok_or(ps)
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(colours(), ["green"; 4], "the old spec keeps serving");
    let (answers, failures) = cluster.fetch("a", 20);
    assert_eq!(failures, 0, "{answers:?}");
    // Rolled back: four healthy instances of the good spec.
    let out = cluster.viking(None, &["rollback", "shared/web"]);
    assert!(out.contains("rolled back"), "{out}");
    four_healthy(&cluster, "four healthy again");
    assert_eq!(colours(), ["green"; 4]);

    // With update.auto_revert the scheduler rolls a stopped update back by itself.
    rolling_web_with(
        dir.path(),
        "red",
        "\"exit 1\"",
        "timeout: 4s, auto_revert: true",
    );
    cluster.viking(None, &["deploy", &shared]);
    let mut client = etcd_client::Client::connect([cluster.endpoints.as_str()], None)
        .await
        .expect("etcd");
    let colour = async |client: &mut etcd_client::Client| -> String {
        let spec = client
            .get("/viking/stacks/shared/jobs/web", None)
            .await
            .expect("get");
        let spec: serde_json::Value =
            serde_json::from_slice(spec.kvs()[0].value()).expect("spec json");
        spec["env"]["COLOUR"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(colour(&mut client).await, "red");
    let deployed = Instant::now();
    loop {
        if colour(&mut client).await == "green" {
            break;
        }
        assert!(
            deployed.elapsed() < Duration::from_secs(40),
            "not reverted\n{}\n{}",
            cluster.viking(None, &["ps", "shared"]),
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "auto_revert put the previous spec back {:?} after the deploy",
        deployed.elapsed()
    );
    four_healthy(&cluster, "four healthy after the revert");
    assert_eq!(colours(), ["green"; 4]);
    // Reverted once, not back and forth: the spec stays green.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(colour(&mut client).await, "green");

    // A container that leaves is out of service before it gets its signal: its endpoint
    // goes while it still runs (`--shutdown-delay`, 1 s), and it stops after.
    let before = cluster.endpoint_keys("shared").await;
    assert_eq!(before.len(), 4, "{before:?}");
    cluster.viking(None, &["scale", "shared/web", "3"]);
    let started = Instant::now();
    let gone = loop {
        let now = cluster.endpoint_keys("shared").await;
        if let Some(gone) = before.iter().find(|k| !now.contains(k)) {
            break gone.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no endpoint left\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // `.../80-tcp/<host>:<id12>:<port>`
    let instance = gone.rsplit('/').next().expect("instance");
    let mut parts = instance.split(':');
    let (host, id) = (parts.next().expect("host"), parts.next().expect("id"));
    let docker_host = cluster.host(host).dockerd.host();
    let state = docker::docker_ok(
        Some(&docker_host),
        &[
            "inspect",
            "-f",
            "{{.State.Running}} {{.State.FinishedAt}} {{.State.ExitCode}}",
            id,
        ],
    );
    eprintln!("endpoint gone after {:?}; {state}", started.elapsed());
    assert!(
        state.starts_with("true"),
        "{id} on {host} was stopped before its endpoint was withdrawn\n{}",
        cluster.logs()
    );
    testkit::eventually(
        Duration::from_secs(20),
        "the leaving container removed",
        || (!cluster.containers(host, "shared").contains(id)).then_some(()),
    );
}

/// Issue 17, scenario 4: with a 3-member etcd across the hosts, its leader stopped, then every
/// member stopped for 10 s: no container is started or stopped meanwhile (Docker's event log
/// says so), and afterwards everything runs as before, in the same containers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_away_or_changing_leader_starts_and_stops_nothing() {
    let mut cluster = Cluster::start_with(&["a", "b", "c"], true).await;
    let (shared, app) = examples();
    cluster.viking(None, &["deploy", &shared, &app]);
    cluster.viking(None, &["scale", "shared/web", "3"]);
    cluster.viking(None, &["run", "shared"]);
    let before: BTreeSet<String> = ["a", "b", "c"]
        .iter()
        .flat_map(|h| cluster.containers(h, "shared"))
        .collect();
    assert_eq!(before.len(), 3);
    // Docker's `--since` counts whole seconds: start in the next one, after every start above.
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 1;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let since = since.to_string();

    // The etcd leader stopped for 5 s, then every member for 10 s.
    let leader = cluster.leader().await;
    cluster.etcd_member(&leader, false).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.etcd_member(&leader, true).await;
    for name in ["a", "b", "c"] {
        cluster.etcd_member(name, false).await;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let restarts: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            let names = ["a", "b", "c"];
            let dir = cluster.etcd_dir.path().to_path_buf();
            etcd_member(&cluster.lan, &names, name, &dir, "existing")
        })
        .collect();
    for (i, proc) in restarts.into_iter().enumerate() {
        cluster.members[i].1 = Some(proc);
    }
    let urls: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| format!("http://{}:2379", cluster.lan.addr(n)))
        .collect();
    wait_etcd(&urls).await;
    // Everything converges, in the same containers.
    testkit::eventually(Duration::from_secs(30), "all running again", || {
        let now = cluster.instances("shared");
        (now.len() == 3 && now.iter().all(|i| i.4 == "running"))
            .then_some(())
            .ok_or(format!("{now:?}"))
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: BTreeSet<String> = ["a", "b", "c"]
        .iter()
        .flat_map(|h| cluster.containers(h, "shared"))
        .collect();
    assert_eq!(after, before, "a container was replaced");
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        .to_string();
    for h in ["a", "b", "c"] {
        let events = docker::docker_ok(
            Some(&cluster.host(h).dockerd.host()),
            &[
                "events",
                "--since",
                &since,
                "--until",
                &until,
                "--filter",
                "type=container",
                "--filter",
                "event=start",
                "--filter",
                "event=die",
                "--filter",
                "event=stop",
                "--filter",
                "event=destroy",
                "--format",
                "{{.Action}} {{.Actor.Attributes.name}}",
            ],
        );
        assert!(events.is_empty(), "host {h}: Docker saw {events}");
    }
}

/// Issue 17, scenario 8: a job whose container exits after a second on host `a` only (the
/// command checks `$VIKING_HOST`) is restarted there by Docker's policy, and after its fifth
/// failure the scheduler moves it to `b`, where it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_crashing_on_one_host_moves_to_another() {
    let cluster = Cluster::start(&["a", "b"]).await;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("stack.yml"),
        "flaky:\n  image: viking/busybox\n  command: \"if [ \\\"$VIKING_HOST\\\" = a ]; then sleep 1; exit 1; fi; exec sleep 3600\"\n",
    )
    .expect("write");
    let path = dir.path().to_str().expect("utf-8").to_owned();
    cluster.viking(None, &["deploy", &path, "--name", "crash"]);
    // Placed on a: b takes no work until the job is there.
    cluster.viking(None, &["host", "drain", "b"]);
    cluster.viking(None, &["run", "crash", "--detach"]);
    testkit::eventually(Duration::from_secs(20), "placed on a", || {
        let now = cluster.instances("crash");
        now.iter()
            .any(|i| i.2 == "a")
            .then_some(())
            .ok_or(format!("{now:?}"))
    });
    cluster.viking(None, &["host", "undrain", "b"]);
    let start = Instant::now();
    testkit::eventually(Duration::from_secs(60), "moved to b and running", || {
        let now = cluster.instances("crash");
        (now.len() == 1 && now[0].2 == "b" && now[0].4 == "running")
            .then_some(())
            .ok_or(format!(
                "{now:?}\n{}",
                cluster.viking(None, &["ps", "crash"])
            ))
    });
    eprintln!(
        "crash loop on a moved to b {:?} after b took work again",
        start.elapsed()
    );
    testkit::eventually(Duration::from_secs(10), "a's copy removed", || {
        cluster.containers("a", "crash").is_empty().then_some(())
    });
}

/// Issue 17, scenario 9: a host whose launcher is lost and back three times in a row waits
/// twice as long each time before its instances move (the deadline is in `grid/lost/<host>`,
/// and `viking ps` shows it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_host_waits_longer_each_time() {
    let mut cluster = Cluster::start_full(&["a", "b"], false, &["--reschedule-after", "8s"]).await;
    let (shared, app) = examples();
    cluster.viking(None, &["deploy", &shared, &app]);
    cluster.viking(None, &["run", "shared"]);
    assert_eq!(cluster.containers("b", "shared").len(), 1);
    let mut client = etcd_client::Client::connect([cluster.endpoints.as_str()], None)
        .await
        .expect("etcd");
    let mut waits = Vec::new();
    for round in 1..=3u64 {
        // b's agents go (their leases then run out); its container keeps running.
        cluster.kill_agents("b");
        let asked = Instant::now();
        let record = loop {
            assert!(
                asked.elapsed() < Duration::from_secs(30),
                "no lost record for b's loss {round}"
            );
            let resp = client.get("/viking/grid/lost/b", None).await.expect("get");
            let rec = resp
                .kvs()
                .first()
                .and_then(|kv| serde_json::from_slice::<serde_json::Value>(kv.value()).ok());
            if let Some(r) = rec.filter(|r| r["losses"] == round && r.get("back_since").is_none()) {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let at = |f: &str| runtime::host::parse_rfc3339(record[f].as_str().unwrap()).unwrap();
        waits.push(at("until").duration_since(at("since")).unwrap());
        if round == 3 {
            let ps = cluster.viking(None, &["ps", "shared"]);
            assert!(ps.contains("(lost 3 times in a row)"), "{ps}");
        }
        // Back before its deadline.
        cluster.restart_agents("b");
        testkit::eventually(Duration::from_secs(10), "b back", || {
            let ps = cluster.viking(None, &["ps", "shared"]);
            (!ps.contains("lost")).then_some(()).ok_or(ps)
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("waits before re-placing b's instances: {waits:?}");
    assert_eq!(waits, [8, 16, 32].map(Duration::from_secs));
    // Nothing moved: b kept its instance through all three.
    assert_eq!(cluster.containers("b", "shared").len(), 1);
}

/// Issue 18: a container on host a queries a UDP service (Debian's dnsmasq, run from the
/// host's own files in a busybox container) on host b through its link's
/// `$DNS_PORT_53_UDP_ADDR` and `_PORT`: the registrator registers the published UDP port,
/// a's ambassador carries the datagrams across.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_service_on_another_host_answers_through_the_link() {
    let dnsmasq = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("dnsmasq: scripts/setup.sh installs dnsmasq-base");
    let mut cluster = Cluster::start(&["a", "b"]).await;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::create_dir_all(dir.path().join("udp")).expect("dir");
    std::fs::write(
        dir.path().join("udp").join("stack.yml"),
        format!(
            "dns:\n  image: viking/busybox\n  ports: [53/udp]\n  \
             volume: [/usr:/usr:ro, /lib:/lib:ro, /lib64:/lib64:ro, /etc/passwd:/etc/passwd:ro, \
             /etc/group:/etc/group:ro]\n  \
             placement: {{hosts: [b]}}\n  \
             command: [{dnsmasq}, --keep-in-foreground, --no-resolv, --no-hosts, --user=root, --pid-file=, \
             --address=/viking.test/10.1.2.3]\n\
             client:\n  image: viking/busybox\n  link: [dns]\n  placement: {{hosts: [a]}}\n  \
             command: sleep 3600 & trap 'exit 0' TERM; wait\n"
        ),
    )
    .expect("write");
    let stack = dir.path().join("udp");
    cluster.viking(None, &["deploy", stack.to_str().expect("utf-8")]);
    cluster.viking(None, &["run", "udp"]);
    let client = testkit::eventually(Duration::from_secs(30), "the client on a", || {
        let ids = docker::docker_ok(
            Some(&cluster.host("a").dockerd.host()),
            &["ps", "-q", "--filter", "label=viking.job=client"],
        );
        ids.lines().next().map(str::to_owned)
    });
    // The client asks through its link's address (a's ambassador).
    let docker_a = cluster.host("a").dockerd.host();
    let client_asks = || {
        docker::docker(
            Some(&docker_a),
            &[
                "exec",
                &client,
                "sh",
                "-c",
                "nslookup viking.test $DNS_PORT_53_UDP_ADDR:$DNS_PORT_53_UDP_PORT",
            ],
        )
    };
    let answer = testkit::eventually(Duration::from_secs(20), "dnsmasq answers through a", || {
        let out = client_asks();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("10.1.2.3") {
            Ok(text)
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        }
    });
    eprintln!("{answer}");
    let env = docker::docker_ok(
        Some(&cluster.host("a").dockerd.host()),
        &["exec", &client, "sh", "-c", "echo $DNS_PORT_53_UDP"],
    );
    assert!(env.trim().starts_with("udp://172.17.0.1:"), "{env}");
    // A container that asks the moment it starts (the registrator has not published it yet)
    // is held for the access table, not refused: one query, answered.
    let port_a = env.trim().rsplit(':').next().expect("port");
    let fresh = docker::docker(
        Some(&cluster.host("a").dockerd.host()),
        &[
            "run",
            "--rm",
            "--label",
            "viking.test=1",
            "--label",
            "viking.links=udp/dns",
            docker::IMAGE,
            "nslookup",
            "viking.test",
            &format!("172.17.0.1:{port_a}"),
        ],
    );
    assert!(
        String::from_utf8_lossy(&fresh.stdout).contains("10.1.2.3"),
        "a container asking at once: {}{}",
        String::from_utf8_lossy(&fresh.stdout),
        String::from_utf8_lossy(&fresh.stderr)
    );
    // A UDP session obeys the links too: the dns container itself (its job does not link to
    // udp/dns) asking b's ambassador is refused, and counted.
    let port = env.trim().rsplit(':').next().expect("port").to_owned();
    let dns = container_of(&cluster.host("b").dockerd.host(), "dns");
    let out = docker::docker(
        Some(&cluster.host("b").dockerd.host()),
        &[
            "exec",
            &dns,
            "sh",
            "-c",
            &format!("timeout 5 busybox nslookup viking.test 172.17.0.1:{port}"),
        ],
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("10.1.2.3"),
        "a container that does not link got an answer"
    );

    assert_refused_udp_dns(&cluster, "b");

    // `--udp-kernel host` on a: the linked client's queries go straight to b (the kernel
    // rewrites them in the client's own namespace; a's ambassador counts them and carries
    // none); a container that does not link still meets a's socket and is refused there.
    cluster.host_mut("a").procs[2].kill();
    // Through nsenter, not `ip netns exec`: that mounts a sysfs of its own over /sys, which
    // hides the cgroup hierarchy the programs attach to.
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net={}", cluster.lan.ns("a").path().display()))
        .arg(testkit::workspace_bin("ambassador"))
        .args(ambassador_args(
            &cluster.endpoints,
            "a",
            &["--udp-kernel", "host"],
        ));
    let kernel = Daemon::spawn_command("ambassador on a", command);
    let dns_state = || -> Option<serde_json::Value> {
        // Fails while the ambassador starts: `None`, asked again.
        let out = cluster
            .lan
            .ns("a")
            .command("curl")
            .args(["-fs", "-m", "2", "http://127.0.0.1:9100/state"])
            .output()
            .ok()?;
        let state: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        state["udp_services"]
            .as_array()?
            .iter()
            .find(|s| s["service_port"] == "udp/dns:53/udp")
            .cloned()
    };
    let before = testkit::eventually(
        Duration::from_secs(20),
        "the host's and the client's namespaces in a's kernel map",
        || match dns_state() {
            Some(s) if s["kernel"]["senders"].as_u64() >= Some(2) => Ok(s),
            other => Err(format!(
                "a's state of udp/dns: {other:?}; its log:\n{}",
                kernel.log()
            )),
        },
    );
    let out = client_asks();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.contains("10.1.2.3"),
        "through the kernel: {out}\n{}\n{}",
        dns_state().map(|s| s.to_string()).unwrap_or_default(),
        kernel.log()
    );
    let after = dns_state().expect("a's state");
    assert!(
        after["kernel"]["sends"].as_u64() > before["kernel"]["sends"].as_u64(),
        "not balanced by the kernel: {before} -> {after}"
    );
    assert_eq!(
        after["datagrams_up"], before["datagrams_up"],
        "went through a's ambassador"
    );
    let unlinked = docker::docker(
        Some(&cluster.host("a").dockerd.host()),
        &[
            "run",
            "--rm",
            "--label",
            "viking.test=1",
            docker::IMAGE,
            "timeout",
            "5",
            "nslookup",
            "viking.test",
            &format!("172.17.0.1:{port_a}"),
        ],
    );
    assert!(
        !String::from_utf8_lossy(&unlinked.stdout).contains("10.1.2.3"),
        "a container that does not link got an answer on a"
    );
    assert_refused_udp_dns(&cluster, "a");
}

/// Fails unless `host`'s ambassador has refused a UDP session to `udp/dns` as not linked.
fn assert_refused_udp_dns(cluster: &Cluster, host: &str) {
    let metrics = cluster
        .lan
        .ns(host)
        .exec(&["curl", "-s", "http://127.0.0.1:9100/metrics"]);
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "ambassador_connections_refused_total{service=\"udp/dns:53/udp\",reason=\"not linked\"}"
        ) && !l.ends_with(" 0")),
        "{metrics}"
    );
}

/// `$SHARED_WEB_PORT_80` (`172.17.0.1:N`) from `viking env app/client`.
fn web_addr(env: &str) -> String {
    env.lines()
        .find_map(|l| l.strip_prefix("SHARED_WEB_PORT_80="))
        .map(|v| v.trim_start_matches("tcp://").to_owned())
        .expect("SHARED_WEB_PORT_80 in the env")
}

/// A fetch of `http://<addr>/` from inside container `id` on `host`: the answer, or `FAILED`.
fn fetch_in(host: &str, id: &str, addr: &str) -> String {
    let out = docker::docker(
        Some(host),
        &[
            "exec",
            id,
            "sh",
            "-c",
            &format!("timeout 3 wget -qO- http://{addr}/ || echo FAILED"),
        ],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// One of `host`'s running containers of `stack/job`.
fn container_of(host: &str, job: &str) -> String {
    testkit::eventually(Duration::from_secs(30), "a running container", || {
        let ids = docker::docker_ok(
            Some(host),
            &["ps", "-q", "--filter", &format!("label=viking.job={job}")],
        );
        ids.lines().next().map(str::to_owned)
    })
}

/// Issue 18, links are the access policy: on a host with its registrator and ambassador, a
/// container whose job links to shared/web gets in, and so does one whose `viking.links`
/// label names it, the instant it starts; a container of a job that does not link, and one
/// without labels, are refused (reset) and counted; the host's own address gets in; with etcd
/// stopped the last known table keeps deciding; `--links open` lets everything in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_containers_that_link_to_a_service_reach_it() {
    let mut cluster = Cluster::start(&["a"]).await;
    let (shared, app) = examples();
    cluster.viking(None, &["deploy", &shared, &app]);
    cluster.viking(None, &["run", "shared", "app"]);
    let env = cluster.viking(None, &["env", "app/client"]);
    let addr = web_addr(&env);
    let host = cluster.host("a").dockerd.host();
    let metrics = |cluster: &Cluster| {
        cluster
            .lan
            .ns("a")
            .exec(&["curl", "-s", "http://127.0.0.1:9100/metrics"])
    };
    let refused = |text: &str, reason: &str| -> u64 {
        let line = format!(
            "ambassador_connections_refused_total{{service=\"shared/web:80/tcp\",reason=\"{reason}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };

    // The label naming the service, connecting the moment it starts: in.
    testkit::eventually(Duration::from_secs(20), "the ambassador serves", || {
        let (_, failures) = docker::fetch_with_env(
            Some(&host),
            &env,
            "SHARED_WEB_PORT_80",
            1,
            Some("shared/web"),
        );
        (failures == 0).then_some(())
    });
    let (answers, failures) = docker::fetch_with_env(
        Some(&host),
        &env,
        "SHARED_WEB_PORT_80",
        3,
        Some("shared/web"),
    );
    assert_eq!(failures, 0, "{answers:?}");
    // The app/client job's own container: its job links to shared/web.
    let client = container_of(&host, "client");
    assert_ne!(fetch_in(&host, &client, &addr), "FAILED");
    // A shared/web container: its job does not link to shared/web.
    let web = container_of(&host, "web");
    assert_eq!(fetch_in(&host, &web, &addr), "FAILED");
    // No labels at all: refused.
    let (answers, failures) =
        docker::fetch_with_env(Some(&host), &env, "SHARED_WEB_PORT_80", 2, None);
    assert_eq!(failures, 2, "{answers:?}");
    // A label naming another service only: refused.
    let (_, failures) = docker::fetch_with_env(
        Some(&host),
        &env,
        "SHARED_WEB_PORT_80",
        1,
        Some("app/client"),
    );
    assert_eq!(failures, 1);
    let text = metrics(&cluster);
    assert!(refused(&text, "not linked") >= 4, "{text}");
    // The host itself (its address on the bridge) gets in.
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let answer = cluster.lan.ns("a").exec(&[
        "curl",
        "-s",
        "-m",
        "3",
        &format!("http://172.17.0.1:{port}/"),
    ]);
    assert!(!answer.trim().is_empty(), "the host was refused");

    // --links open: everything gets in.
    cluster.host_mut("a").procs[2].kill();
    let open = ambassador(&cluster, "a", &["--links", "open"]);
    testkit::eventually(
        Duration::from_secs(20),
        "unlabelled in with --links open",
        || {
            let (_, failures) =
                docker::fetch_with_env(Some(&host), &env, "SHARED_WEB_PORT_80", 1, None);
            (failures == 0).then_some(())
        },
    );
    drop(open);
    let restarted = ambassador(&cluster, "a", &[]);
    testkit::eventually(Duration::from_secs(20), "enforced again", || {
        (fetch_in(&host, &web, &addr) == "FAILED" && fetch_in(&host, &client, &addr) != "FAILED")
            .then_some(())
    });

    // etcd away: the last known table keeps deciding.
    cluster._etcd.as_mut().expect("one etcd").stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_ne!(
        fetch_in(&host, &client, &addr),
        "FAILED",
        "linked, etcd away"
    );
    assert_eq!(
        fetch_in(&host, &web, &addr),
        "FAILED",
        "not linked, etcd away"
    );
    drop(restarted);
}

/// Issue 19: a web job with a domain, 4 instances on `a` and `b`, rolled to a new spec one
/// instance at a time while `wrk` sends requests through the router on `a`: no response is
/// anything but 2xx, and no socket error. The instances stop and start under it; the router
/// stops sending to an endpoint as soon as it leaves, and sends a request that could not be
/// sent elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_behind_the_router_answers_every_request_with_2xx() {
    let cluster = Cluster::start(&["a", "b"]).await;
    let dir = tempfile::tempdir().expect("dir");
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).expect("dir");
    let write = |colour: &str| {
        std::fs::write(
            site.join("stack.yml"),
            format!(
                "web:\n  image: viking/busybox\n  ports: [80]\n  scale: 4\n  domains: [site.test]\n  \
                 env: {{COLOUR: {colour}}}\n  update: {{max_parallel: 1, min_healthy: 1s, timeout: 20s}}\n  \
                 command: {SERVE}\n"
            ),
        )
        .expect("write");
    };
    let site = site.to_str().expect("utf-8").to_owned();
    write("blue");
    cluster.viking(None, &["deploy", &site]);
    cluster.viking(None, &["run", "site"]);
    assert!(cluster.viking(None, &["routes"]).contains("site.test"));
    testkit::eventually(Duration::from_secs(30), "4 blue instances", || {
        (cluster.colours("site") == ["blue"; 4]).then_some(())
    });

    let ports = testkit::free_ports(2);
    let (http, admin) = (
        format!("127.0.0.1:{}", ports[0]),
        format!("127.0.0.1:{}", ports[1]),
    );
    let endpoints = cluster.endpoints.clone();
    let mut router = spawn(
        &cluster.lan,
        "a",
        "router",
        &[
            "--etcd", &endpoints, "--http", &http, "--https", "off", "--admin", &admin, "--grace",
            "1s",
        ],
    );
    router.wait_log("routes read from etcd; serving", Duration::from_secs(20));
    let curl = || {
        let out = cluster
            .lan
            .ns("a")
            .command("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "Host: site.test",
            ])
            .arg(format!("http://{http}/"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    testkit::eventually(Duration::from_secs(20), "the router answers", || {
        let code = curl();
        (code == "200").then_some(()).ok_or(code)
    });

    // wrk in a for at most 120 s, stopped with SIGINT once the update is done.
    let wrk = cluster
        .lan
        .ns("a")
        .command("wrk")
        .args(["-t1", "-c8", "-d120s", "-H", "Host: site.test"])
        .arg(format!("http://{http}/"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("wrk: run `make test`, which installs it");
    std::thread::sleep(Duration::from_secs(1));
    write("green");
    cluster.viking(None, &["deploy", &site]);
    let started = Instant::now();
    let (fewest, most) = cluster
        .count_until(&["a", "b"], "site", Duration::from_secs(90), || {
            cluster.colours("site") == ["green"; 4]
        })
        .await;
    let rolled = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let stopped = Command::new("kill")
        .args(["-INT", &wrk.id().to_string()])
        .status()
        .expect("kill");
    assert!(stopped.success(), "stop wrk");
    let out = wrk.wait_with_output().expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "rolling update behind the router, done in {rolled:?} ({fewest}-{most} instances):\n{text}"
    );
    let requests: u64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(requests >= 200, "wrk made {requests} requests:\n{text}");
    assert!(
        !text.contains("Non-2xx") && !text.contains("Socket errors"),
        "errors during the rolling update:\n{text}\n{}",
        router.log()
    );
    router.terminate(Duration::from_secs(10));
}
