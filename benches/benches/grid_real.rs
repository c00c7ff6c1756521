//! The grid on real Docker: three hosts, each a network namespace with its own dockerd and
//! launcher (as the many-hosts tests build them), one etcd; `viking run` of 30 instances
//! (busybox `sleep`) until all run, and, in the same run as the reference, the time Docker
//! itself takes to start the same 30 containers (`docker run -d`, ten per host, the hosts in
//! parallel). Then a rolling update of the 30 (3 at a time, `min_healthy: 1s`) against the
//! sum of its `min_healthy` waits. Then one host's launcher killed (SIGKILL): the time until
//! its instances run elsewhere, split into lease expiry (`--ttl 3s`), the scheduler's delay
//! (`--reschedule-after 5s`, and its own work beyond that) and Docker start time. Needs root
//! (namespaces) and the release binaries: `make bench-grid`.

use std::process::Command;
use std::time::{Duration, Instant};

use testkit::docker::{self, Dockerd, IMAGE};
use testkit::net::Lan;
use testkit::{Daemon, Etcd};

const HOSTS: [&str; 3] = ["a", "b", "c"];
const INSTANCES: usize = 30;
/// The rolling update's `max_parallel`.
const PARALLEL: usize = 3;
/// The launchers' `--reschedule-after`.
const RESCHEDULE_AFTER: Duration = Duration::from_secs(5);

fn viking(etcd: &str, args: &[&str]) -> std::process::Output {
    Command::new(testkit::workspace_bin("viking"))
        .env_remove("VIKING_ETCD")
        .args(["--etcd", etcd])
        .args(args)
        .output()
        .expect("viking")
}

/// `viking` that must succeed.
fn viking_ok(etcd: &str, args: &[&str]) {
    let out = viking(etcd, args);
    assert!(
        out.status.success(),
        "viking {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn main() {
    docker::require(None);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut lan = Lan::new(&HOSTS);
    let root = lan.join_root();
    let etcd = rt.block_on(Etcd::start_on(&root.to_string()));
    let ep = etcd.endpoint();
    let dockerds: Vec<Dockerd> = HOSTS
        .iter()
        .map(|h| Dockerd::start_in(lan.ns(h), "172.17.0.1/16"))
        .collect();
    for d in &dockerds {
        docker::require(Some(&d.host()));
    }

    // Docker's own start time: ten `docker run -d` per host, the hosts in parallel.
    let start = Instant::now();
    let threads: Vec<_> = dockerds
        .iter()
        .map(|d| {
            let host = d.host();
            std::thread::spawn(move || {
                for i in 0..INSTANCES / HOSTS.len() {
                    docker::docker_ok(
                        Some(&host),
                        &[
                            "run",
                            "-d",
                            "--name",
                            &format!("ref{i}"),
                            "--label",
                            "viking.test=1",
                            IMAGE,
                            "sleep",
                            "3600",
                        ],
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let docker_took = start.elapsed();
    for d in &dockerds {
        let ids = docker::docker_ok(Some(&d.host()), &["ps", "-aq"]);
        for id in ids.lines() {
            let _ = docker::docker(Some(&d.host()), &["rm", "-f", id]);
        }
    }

    let launchers: Vec<Daemon> = HOSTS
        .iter()
        .zip(&dockerds)
        .map(|(h, d)| {
            let mut cmd = lan
                .ns(h)
                .command(testkit::workspace_bin("launcher").to_str().unwrap());
            cmd.args([
                "--admin",
                "127.0.0.1:0",
                "--etcd",
                &ep,
                "--host",
                h,
                "--docker",
                &d.host(),
                "--ttl",
                "3s",
                "--reschedule-after",
                &format!("{}s", RESCHEDULE_AFTER.as_secs()),
            ]);
            Daemon::spawn_command(&format!("launcher on {h}"), cmd)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let stack = |colour: &str| {
        format!(
            "sleeper:\n  image: {IMAGE}\n  command: \"sleep 3600 & trap 'exit 0' TERM; wait\"\n  \
             scale: {INSTANCES}\n  env: {{COLOUR: {colour}}}\n  \
             update: {{max_parallel: {PARALLEL}, min_healthy: 1s}}\n"
        )
    };
    std::fs::write(dir.path().join("stack.yml"), stack("blue")).unwrap();
    viking_ok(
        &ep,
        &["deploy", dir.path().to_str().unwrap(), "--name", "bench"],
    );
    // Every launcher up (its node record written) before the clock starts.
    let up = Instant::now();
    loop {
        let out = viking(&ep, &["--output", "json", "host", "ls"]);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let ready = rows
            .as_array()
            .map_or(0, |r| r.iter().filter(|h| h["state"] == "ready").count());
        if ready == HOSTS.len() {
            break;
        }
        assert!(up.elapsed() < Duration::from_secs(30), "launchers not up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let start = Instant::now();
    let out = viking(&ep, &["run", "bench", "--timeout", "120s"]);
    let grid_took = start.elapsed();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        launchers
            .iter()
            .map(Daemon::log)
            .collect::<Vec<_>>()
            .join("\n")
    );
    println!(
        "grid on Docker: viking run of {INSTANCES} instances on {} hosts, all running in {:.2} s; \
         Docker alone starts them in {:.2} s (10 per host, hosts in parallel): the grid adds \
         {:.2} s ({:.2}x Docker's time)",
        HOSTS.len(),
        grid_took.as_secs_f64(),
        docker_took.as_secs_f64(),
        (grid_took.as_secs_f64() - docker_took.as_secs_f64()).max(0.0),
        grid_took.as_secs_f64() / docker_took.as_secs_f64()
    );
    // A rolling update of the 30, PARALLEL at a time, each batch held for min_healthy (1 s):
    // the floor is the sum of those waits.
    std::fs::write(dir.path().join("stack.yml"), stack("green")).unwrap();
    let start = Instant::now();
    viking_ok(
        &ep,
        &["deploy", dir.path().to_str().unwrap(), "--name", "bench"],
    );
    loop {
        let green: usize = dockerds
            .iter()
            .map(|d| {
                let ids = docker::docker_ok(
                    Some(&d.host()),
                    &["ps", "-q", "--filter", "label=viking.stack=bench"],
                );
                ids.lines()
                    .filter(|id| {
                        // It may go between the list and the inspect (a replaced one).
                        let out = docker::docker(
                            Some(&d.host()),
                            &[
                                "inspect",
                                "-f",
                                "{{range .Config.Env}}{{println .}}{{end}}",
                                id,
                            ],
                        );
                        String::from_utf8_lossy(&out.stdout).contains("COLOUR=green")
                    })
                    .count()
            })
            .sum();
        if green == INSTANCES {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "update not done: {green} green"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let rolled = start.elapsed();
    let floor = (INSTANCES / PARALLEL) as f64;
    println!(
        "rolling update of {INSTANCES} instances, {PARALLEL} at a time, min_healthy 1 s: {:.1} s \
         against a floor of {floor:.0} s ({:.2}x)",
        rolled.as_secs_f64(),
        rolled.as_secs_f64() / floor
    );
    let mut launchers = launchers;
    host_lost(&rt, &etcd, &mut launchers);
    viking_ok(&ep, &["stop", "bench"]);
    drop(launchers);
    drop(dockerds);
    drop(etcd);
    drop(lan);
}

/// Kills the launcher of a host that is not the scheduler and times the re-placement of its
/// instances: until its node record is gone (lease expiry), until no assignment is left on
/// it (the scheduler's delay), until every instance runs again on the other two (Docker).
fn host_lost(rt: &tokio::runtime::Runtime, etcd: &Etcd, launchers: &mut [Daemon]) {
    use etcd_client::GetOptions;
    let client = rt.block_on(etcd.client());
    let get = |key: &str, prefix: bool| {
        let mut kv = client.kv_client();
        let opts = prefix.then(|| GetOptions::new().with_prefix());
        rt.block_on(kv.get(key, opts)).expect("etcd get")
    };
    let leader = get("/viking/grid/leader/", true)
        .kvs()
        .iter()
        .min_by_key(|kv| kv.create_revision())
        .map(|kv| kv.value_str().unwrap_or_default().to_owned())
        .expect("a leader");
    let (i, lost) = HOSTS
        .iter()
        .enumerate()
        .find(|(_, h)| **h != leader)
        .expect("a host that does not lead");
    let moving = get(&format!("/viking/grid/assign/{lost}/"), true)
        .kvs()
        .len();
    let running_elsewhere = || {
        get("/viking/grid/status/", true)
            .kvs()
            .iter()
            .filter(|kv| {
                !kv.key_str()
                    .unwrap_or_default()
                    .starts_with(&format!("/viking/grid/status/{lost}/"))
            })
            .filter(|kv| {
                kv.value_str()
                    .unwrap_or_default()
                    .contains("\"state\":\"running\"")
            })
            .count()
    };
    let start = Instant::now();
    launchers[i].kill();
    let mut lease = None;
    let mut placed = None;
    loop {
        let now = start.elapsed();
        if lease.is_none()
            && get(&format!("/viking/grid/nodes/{lost}"), false)
                .kvs()
                .is_empty()
        {
            lease = Some(now);
        }
        if lease.is_some()
            && placed.is_none()
            && get(&format!("/viking/grid/assign/{lost}/"), true)
                .kvs()
                .is_empty()
        {
            placed = Some(now);
        }
        if placed.is_some() && running_elsewhere() == INSTANCES {
            break;
        }
        assert!(now < Duration::from_secs(60), "not re-placed within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let total = start.elapsed();
    let (lease, placed) = (lease.expect("set"), placed.expect("set"));
    let scheduler = placed - lease;
    println!(
        "host lost ({lost}, {moving} instances): running elsewhere {:.2} s after its launcher was \
         killed = lease expiry {:.2} s (--ttl 3s) + scheduler {:.2} s (--reschedule-after {} s, \
         its own work {:.2} s) + Docker start {:.2} s",
        total.as_secs_f64(),
        lease.as_secs_f64(),
        scheduler.as_secs_f64(),
        RESCHEDULE_AFTER.as_secs(),
        scheduler.saturating_sub(RESCHEDULE_AFTER).as_secs_f64(),
        (total - placed).as_secs_f64()
    );
}
