//! The `ambassador` binary: flags, admin server, SIGTERM.

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use testkit::{Daemon, Etcd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Backend, put_alloc, put_endpoint, who};

pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_admin_keeps_a_light_load_on_one_thread_and_drains_on_sigterm() {
    let Echo {
        etcd,
        backend,
        port,
        admin,
        run,
        ..
    } = Echo::start().await;
    let mut args = loopback_args(&etcd, &admin, &run, &["--grace", "10s", "--threads", "2"]);
    let dns: std::net::SocketAddr = ([127, 0, 0, 1], testkit::steady_ports(1)[0]).into();
    let at = args.iter().position(|a| a == "--dns").unwrap();
    args[at + 1] = dns.to_string();
    let mut amb = Daemon::spawn(env!("CARGO_BIN_EXE_ambassador"), &refs(&args));
    let limit = Duration::from_secs(20);
    let mut wait_line = |needle: &str| amb.wait_log(needle, limit);
    // Routes are published (synced) before the listener for them is opened.
    wait_line("routes synced from etcd");
    wait_line(&format!("listening on addr=127.0.0.1:{port}"));
    let (status, body) = http_get(&admin, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    // A light load on two threads stays on the first (`ambassador::steer`): the start-up's
    // work is over after a few of its 100 ms readings, then 30 short connections 10 ms apart.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..30 {
        assert_eq!(who(([127, 0, 0, 1], port).into()).await.unwrap(), "b0");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, state) = http_get(&admin, "/state");
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(
        state["accepted_per_thread"],
        serde_json::json!([30, 0]),
        "the second thread took connections the first had room for: {state}"
    );
    assert_eq!(state["threads_taking_new_connections"], 1, "{state}");

    // A connection open when SIGTERM arrives finishes; new ones are refused.
    let mut open = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut greeting = [0u8; 14];
    open.read_exact(&mut greeting).await.unwrap();
    let (_, metrics) = http_get(&admin, "/metrics");
    assert!(
        metrics.contains("ambassador_connections_active{service=\"shared/echo:7/tcp\"} 1"),
        "{metrics}"
    );
    let (_, state) = http_get(&admin, "/state");
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(
        state["services"][0]["backends"][0]["addr"],
        backend.addr.to_string()
    );

    amb.signal(nix::sys::signal::Signal::SIGTERM);
    amb.wait_log("stopped accepting; waiting for open connections", limit);
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
    // DNS stopped with the signal, and its ports are closed, not left to queue what nobody
    // reads: a resolver is refused at once and asks its next server.
    // (The UDP loop looks at the stop every 200 ms.)
    testkit::eventually(Duration::from_secs(3), "the DNS ports refuse", || {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.connect(dns).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let query = [0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1];
        let refused = |r: std::io::Result<usize>| {
            r.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        };
        let udp_refused = refused(udp.send(&query)) || refused(udp.recv(&mut [0u8; 512]));
        (udp_refused && std::net::TcpStream::connect(dns).is_err()).then_some(())
    });
    open.write_all(b"after sigterm\n").await.unwrap();
    let mut back = [0u8; 14];
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"after sigterm\n");
    open.shutdown().await.unwrap();
    let line = amb.wait_log("shut down", limit);
    assert!(
        line.contains("drained=1") && line.contains("cut=0"),
        "{line}"
    );
    let status = amb.wait_exit(limit);
    assert!(status.success(), "{status}");
}

#[test]
fn without_docker0_and_bind_it_says_to_pass_bind() {
    if let Some(addr) = runtime::host::interface_addr("docker0") {
        // With Docker installed the default applies: it must be the bridge's IPv4 address.
        assert!(addr.is_ipv4(), "{addr}");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ambassador"))
        .args(["--etcd", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interface docker0 has no IPv4 address; pass --bind"),
        "{err}"
    );
}

/// `--udp-kernel` and `--kernel-senders` with a directory that is not a cgroup: exit 2, the
/// flag, the value and what to pass.
#[test]
fn a_cgroup_flag_outside_a_cgroup_is_refused_with_what_to_pass() {
    for flag in ["--udp-kernel", "--kernel-senders"] {
        let out = Command::new(env!("CARGO_BIN_EXE_ambassador"))
            .args(["--etcd", "http://127.0.0.1:1", "--bind", "127.0.0.1"])
            .args([flag, "/tmp"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("{flag} \"/tmp\": not a cgroup directory"))
                && err.contains("pass host, a directory of the cgroup v2 hierarchy, or off"),
            "{err}"
        );
    }
}

/// `--kernel-senders` with the kernel path off: exit 2, both flags named and what to pass.
#[test]
fn kernel_senders_without_the_kernel_path_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_ambassador"))
        .args(["--etcd", "http://127.0.0.1:1", "--bind", "127.0.0.1"])
        .args(["--kernel-senders", "host", "--kernel-forward", "off"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--kernel-senders host")
            && err.contains("--kernel-forward is off")
            && err.contains("pass --kernel-forward on or --kernel-senders off"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_is_not_blamed_on_the_backend() {
    let echo = Echo::start().await;
    let (port, admin) = (echo.port, echo.admin.clone());
    // The ambassador raises its soft limit to the hard one at start: 65, lowered to 64 below
    // (and raised once more later; a hard limit cannot be raised without CAP_SYS_RESOURCE).
    let mut amb = echo.spawn_under("prlimit", &["--nofile=65:65"], &["--threads", "1"]);
    let limit = Duration::from_secs(20);
    amb.wait_log(&format!("listening on addr=127.0.0.1:{port}"), limit);
    let warned = amb.wait_log("file descriptors", limit);
    assert!(warned.contains("LimitNOFILE"), "{warned}");
    let pid = amb.pid().to_string();
    let set_soft = |soft: u32| {
        let set = Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={soft}:65")])
            .status()
            .unwrap();
        assert!(
            set.success(),
            "prlimit --pid {pid} --nofile={soft}:65 failed"
        );
    };
    set_soft(64);

    // More connections than 64 descriptors carry (two each, client and backend), held open.
    let mut held = Vec::new();
    for _ in 0..40 {
        let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_secs(2),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        else {
            break;
        };
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // It ran out at a backend connect, or (by the parity of what it opened at start) at an
    // accept with not one descriptor left; CI's run had the latter, and the test showed
    // nothing. One descriptor more: the next accept of a waiting client takes it, and that
    // connection's backend connect finds none.
    set_soft(65);
    amb.wait_log("out of file descriptors: raise", limit);
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (_, state) = http_get(&admin, "/state");
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let service = &state["services"][0];
    assert!(
        service["local_connect_errors"].as_u64().unwrap_or(0) > 0,
        "it never ran out, so this test shows nothing: {state}"
    );
    assert_eq!(service["backends"][0]["ejections"], 0, "{state}");
    assert_eq!(service["backends"][0]["connect_errors"], 0, "{state}");
    assert!(!amb.log().contains("backend ejected"), "{}", amb.log());
    // And the backend still serves.
    assert_eq!(who(([127, 0, 0, 1], port).into()).await.unwrap(), "b0");
}

/// `--max-udp-sessions` reached: one clear log line naming the flag, the datagram dropped and
/// counted in `/metrics`, and the ambassador serving on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_udp_session_limit_is_a_log_line_and_a_counter() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    let echo_task = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    let sp = "shared/echo:7/udp";
    let port = put_alloc(&mut c, sp).await;
    put_endpoint(&mut c, sp, "h0", 0, echo_addr).await;
    let admin = format!("127.0.0.1:{}", testkit::free_ports(1)[0]);
    let run = tempfile::tempdir().unwrap();
    let args = loopback_args(
        &etcd,
        &admin,
        &run,
        &["--max-udp-sessions", "1", "--udp-idle-timeout", "30s"],
    );
    let mut amb = Daemon::spawn(env!("CARGO_BIN_EXE_ambassador"), &refs(&args));
    amb.wait_log(
        &format!("listening on (UDP) addr=127.0.0.1:{port}"),
        Duration::from_secs(20),
    );
    let ask = |payload: &'static [u8]| async move {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.connect(("127.0.0.1", port)).await.unwrap();
        s.send(payload).await.unwrap();
        let mut buf = [0u8; 64];
        let got = tokio::time::timeout(Duration::from_millis(500), s.recv(&mut buf)).await;
        (s, got.ok().and_then(Result::ok))
    };
    let (_first, answered) = ask(b"one").await;
    assert_eq!(answered, Some(3));
    let (_second, answered) = ask(b"two").await;
    assert_eq!(answered, None, "past the limit, dropped");
    let line = amb.wait_log("--max-udp-sessions 1 reached", Duration::from_secs(5));
    assert!(line.contains("raise --max-udp-sessions"), "{line}");
    let (_, metrics) = http_get(&admin, "/metrics");
    assert!(
        metrics.contains(&format!(
            "ambassador_udp_drops_total{{service=\"{sp}\",reason=\"session limit\"}} 1"
        )),
        "{metrics}"
    );
    let (_, state) = http_get(&admin, "/state");
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["udp_sessions"], 1, "{state}");
    amb.kill();
    echo_task.abort();
}

/// The ambassador binary's flags for these tests: host h0 on loopback, admin at `admin`, no
/// DNS, every port in range, its own run dir; then `extra`.
pub fn loopback_args(
    etcd: &Etcd,
    admin: &str,
    run: &tempfile::TempDir,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--etcd".into(),
        etcd.endpoint(),
        "--host".into(),
        "h0".into(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--admin".into(),
        admin.into(),
        "--dns".into(),
        "off".into(),
        "--range".into(),
        "1-65535".into(),
        "--run-dir".into(),
        run.path().to_str().expect("utf-8").into(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args
}

pub fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// What an ambassador binary test starts from: etcd, `shared/echo:7` allocated (`port`) and
/// served by the greeting echo backend `b0` of host h0, a free admin address, a run dir.
pub struct Echo {
    pub etcd: Etcd,
    pub c: etcd_client::Client,
    pub backend: Backend,
    pub port: u16,
    pub admin: String,
    pub run: tempfile::TempDir,
}

impl Echo {
    pub async fn start() -> Echo {
        let etcd = Etcd::start().await;
        let mut c = etcd.client().await;
        let backend = Backend::start("b0").await;
        let port = put_alloc(&mut c, "shared/echo:7").await;
        put_endpoint(&mut c, "shared/echo:7", "h0", 0, backend.addr).await;
        Echo {
            etcd,
            c,
            backend,
            port,
            admin: format!("127.0.0.1:{}", testkit::free_ports(1)[0]),
            run: tempfile::tempdir().unwrap(),
        }
    }

    /// The ambassador binary on loopback with `extra` flags, run by `wrapper` with its own
    /// `flags` (`prlimit`, `setpriv`: limits and rights the test takes away).
    pub fn spawn_under(&self, wrapper: &str, flags: &[&str], extra: &[&str]) -> Daemon {
        let mut args: Vec<String> = flags.iter().map(|f| (*f).to_owned()).collect();
        args.push("--".into());
        args.push(env!("CARGO_BIN_EXE_ambassador").into());
        args.extend(loopback_args(&self.etcd, &self.admin, &self.run, extra));
        Daemon::spawn(wrapper, &refs(&args))
    }
}

/// `stats/<host>`: the counters per service port, rewritten every 5 s under a lease of its own
/// and gone at once on a clean stop (issue 21; `viking ui` sums the hosts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stats_record_is_leased_and_rewritten_every_5_s() {
    let Echo {
        etcd,
        mut c,
        port,
        admin,
        run,
        backend: _backend,
    } = Echo::start().await;
    let args = loopback_args(&etcd, &admin, &run, &[]);
    let mut amb = Daemon::spawn(env!("CARGO_BIN_EXE_ambassador"), &refs(&args));
    amb.wait_log(
        &format!("listening on addr=127.0.0.1:{port}"),
        Duration::from_secs(20),
    );
    for _ in 0..3 {
        assert_eq!(who(([127, 0, 0, 1], port).into()).await.unwrap(), "b0");
    }
    let read = |c: &mut etcd_client::Client| {
        let mut c = c.clone();
        async move {
            let r = c.get("/viking/stats/h0", None).await.unwrap();
            r.kvs().first().map(|kv| {
                let v: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
                (kv.lease(), v)
            })
        }
    };
    let (lease, first) = testkit::eventually_async(Duration::from_secs(15), "stats/h0", || {
        let read = read(&mut c);
        async move {
            read.await
                .filter(|(_, v)| v["services"]["shared/echo:7/tcp"]["connections"] == 3)
        }
    })
    .await;
    assert_ne!(lease, 0, "not under a lease: {first}");
    let (_, second) =
        testkit::eventually_async(Duration::from_secs(8), "the record rewritten", || {
            let read = read(&mut c);
            let at = first["at"].clone();
            async move { read.await.filter(|(_, v)| v["at"] != at) }
        })
        .await;
    assert_eq!(second["since"], first["since"], "{second}");
    amb.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(amb.wait_exit(Duration::from_secs(20)).success());
    assert!(
        read(&mut c).await.is_none(),
        "the record outlived a clean stop"
    );
}

/// The kernel paths' fallback: an ambassador without the capabilities `bpf()` needs (root with
/// CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN taken out of its bounding set by `setpriv`) says
/// once why it relays in user space (and why UDP is not balanced by the kernel), shows it in
/// `/metrics`, and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_bpf_rights_it_says_why_once_and_relays_in_user_space() {
    let echo = Echo::start().await;
    let (port, admin) = (echo.port, echo.admin.clone());
    let mut amb = echo.spawn_under(
        "setpriv",
        &[
            "--bounding-set=-bpf,-net_admin,-sys_admin",
            "--inh-caps=-all",
        ],
        &[
            "--threads",
            "1",
            "--local-congestion",
            "default",
            "--kernel-forward-after",
            "0",
            "--udp-kernel",
            "host",
        ],
    );
    let limit = Duration::from_secs(20);
    let line = amb.wait_log("kernel forwarding unavailable", limit);
    assert!(
        line.contains("relaying in user space") && line.contains("Operation not permitted"),
        "{line}"
    );
    let line = amb.wait_log("--udp-kernel unavailable", limit);
    assert!(
        line.contains("UDP goes through this process") && line.contains("Operation not permitted"),
        "{line}"
    );
    amb.wait_log(&format!("listening on addr=127.0.0.1:{port}"), limit);
    for _ in 0..3 {
        assert_eq!(who(([127, 0, 0, 1], port).into()).await.unwrap(), "b0");
    }
    let (_, metrics) = http_get(&admin, "/metrics");
    assert!(
        metrics.contains("ambassador_kernel_forwarding 0")
            && metrics.contains("ambassador_udp_kernel_balancing 0"),
        "{metrics}"
    );
    let forwarded: Vec<_> = metrics
        .lines()
        .filter(|l| l.starts_with("ambassador_kernel_forwarded_connections_total{"))
        .collect();
    assert!(
        !forwarded.is_empty() && forwarded.iter().all(|l| l.ends_with(" 0")),
        "{metrics}"
    );
    assert_eq!(
        amb.log().matches("kernel forwarding unavailable").count(),
        1,
        "said once: {}",
        amb.log()
    );
}
