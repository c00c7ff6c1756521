//! Registration latency against the real Docker daemon and a real etcd.
//!
//! `make bench-registrator` (or `cargo bench -p viking-benches --bench registrator`). Runs the
//! registrator in-process, watches etcd like any consumer would, and for 50 containers
//! measures:
//! * start: from `docker start` returning to the endpoint's PUT arriving through the watch
//!   (negative when the key was there before the command returned), and from the start time
//!   Docker records (`State.StartedAt`, same clock) to the PUT;
//! * death: from the death time Docker records (`State.FinishedAt`) to the DELETE arriving
//!   through the watch (`docker kill`).
//!
//! Prints p50, p99 and max of each. Goal: p99 <= 100 ms.

use std::time::{Duration, SystemTime};

use etcd_client::{EventType, WatchOptions};
use registrator::{Config, Settings};
use schema::{HostId, Prefix};
use testkit::Etcd;
use testkit::docker::{self, Container, IMAGE, docker_ok};
use tokio_util::sync::CancellationToken;

const CONTAINERS: usize = 50;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    docker::require(None);
    let etcd = Etcd::start().await;
    let client = etcd.client().await;
    let stack = format!("bench{:06x}", fastrand::u32(..0xff_ffff));
    let config = Config {
        prefix: Prefix::new("/viking").expect("prefix"),
        settings: Settings {
            host: HostId::new("bench").expect("host"),
            addr: "127.0.0.1".parse().expect("addr"),
            internal: false,
        },
        ttl: Duration::from_secs(10),
        resync: Duration::from_secs(30),
        docker: None,
    };
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(registrator::run(config, client.clone(), shutdown.clone()));

    let prefix = format!("/viking/services/{stack}/");
    let mut stream = client
        .watch_client()
        .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch");
    // Events are stamped where they arrive, in a task of their own, so the blocking docker
    // CLI calls below cannot delay the stamp.
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(resp)) = stream.message().await {
            let at = SystemTime::now();
            for e in resp.events() {
                let key = e
                    .kv()
                    .and_then(|kv| kv.key_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let _ = tx.send((e.event_type(), key, at));
            }
        }
    });

    let label = format!("viking.stack={stack}");
    let mut cli_ms = Vec::new();
    let mut start_ms = Vec::new();
    let mut death_ms = Vec::new();
    for _ in 0..CONTAINERS {
        let container = Container::create(
            None,
            &[
                "-l",
                &label,
                "-l",
                "viking.job=web",
                "-p",
                "8080",
                IMAGE,
                "httpd",
                "-f",
                "-p",
                "8080",
            ],
        );
        let id = container.id().to_owned();
        container.act("start");
        let returned = SystemTime::now();
        let (kind, key, at) = events.recv().await.expect("watch");
        assert!(
            kind == EventType::Put && key.contains(&id[..12]),
            "{kind:?} {key}"
        );
        cli_ms.push(signed_ms(returned, at));
        let started = docker_ok(None, &["inspect", "--format", "{{.State.StartedAt}}", &id]);
        start_ms.push(ms_since(&started, at));

        docker_ok(None, &["kill", &id]);
        let (kind, key, at) = events.recv().await.expect("watch");
        assert!(
            kind == EventType::Delete && key.contains(&id[..12]),
            "{kind:?} {key}"
        );
        let finished = docker_ok(None, &["inspect", "--format", "{{.State.FinishedAt}}", &id]);
        death_ms.push(ms_since(&finished, at));
        drop(container);
    }
    shutdown.cancel();
    let _ = agent.await;
    report(
        "docker start returned -> PUT seen (negative: before it returned)",
        &mut cli_ms,
    );
    report(
        "container started (State.StartedAt) -> PUT seen",
        &mut start_ms,
    );
    report(
        "container died (State.FinishedAt) -> DELETE seen",
        &mut death_ms,
    );
}

/// Milliseconds from Docker's RFC 3339 time `t` (UTC, nanoseconds) to `until`.
fn ms_since(t: &str, until: SystemTime) -> f64 {
    // 2026-11-22T11:10:11.123456789Z: only the time of day matters within one run.
    let time = t
        .split('T')
        .nth(1)
        .expect("RFC 3339 time")
        .trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next().and_then(|s| s.parse().ok()).expect("hour");
    let m: f64 = parts.next().and_then(|s| s.parse().ok()).expect("minute");
    let s: f64 = parts.next().and_then(|s| s.parse().ok()).expect("second");
    let of_day = h * 3600.0 + m * 60.0 + s;
    let now = until
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
        % 86_400.0;
    (now - of_day) * 1e3
}

/// Milliseconds from `from` to `to`, negative if `to` came first.
fn signed_ms(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}

fn report(what: &str, samples: &mut [f64]) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{what}: n={} p50={:.1} ms p99={:.1} ms max={:.1} ms",
        samples.len(),
        at(0.5),
        at(0.99),
        samples[samples.len() - 1]
    );
}
