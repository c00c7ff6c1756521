//! `ambassador --upgrade`: the running process hands its listening sockets to the new one
//! (issue 20). Real binaries, a real etcd, real sockets on loopback.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use testkit::{Daemon, Etcd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::binary::{Echo, loopback_args, refs};
use crate::{Backend, put_alloc, put_endpoint};

const BIN: &str = env!("CARGO_BIN_EXE_ambassador");
const LIMIT: Duration = Duration::from_secs(30);

/// A new connection every 2 ms, each reading the backend's greeting: how many were made and
/// how many failed (refused, reset or no greeting within 5 s). Bounded: at most 60 s.
struct Traffic {
    stop: Arc<AtomicBool>,
    made: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(addr: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let (made, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let thread = {
            let (stop, made, failed) = (stop.clone(), made.clone(), failed.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                    let ok = greeting(addr).is_ok();
                    made.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        Traffic {
            stop,
            made,
            failed,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.made.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn greeting(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while !got.ends_with(b"\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..n]);
    }
    s.write_all(b"bye\n")
}

/// A connection through the proxy whose greeting has been read.
async fn open(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut greeting = [0u8; 14];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut greeting))
        .await
        .expect("greeting in time")
        .expect("greeting");
    assert_eq!(&greeting, b"hello from b0\n");
    s
}

/// `n` bytes through an open connection and back, equal.
async fn echo(s: &mut TcpStream, n: usize, seed: u8) {
    let data: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&data).await.expect("write");
    };
    let mut back = vec![0u8; n];
    let read = async {
        r.read_exact(&mut back).await.expect("echo back");
    };
    tokio::time::timeout(LIMIT, async { tokio::join!(write, read) })
        .await
        .expect("echo in time");
    assert!(back == data, "the echo differs");
}

/// etcd, a greeting echo backend behind `shared/echo:7`, and the first ambassador serving it.
struct World {
    _etcd: Etcd,
    _backend: Backend,
    run: tempfile::TempDir,
    args: Vec<String>,
    addr: SocketAddr,
    first: Daemon,
}

impl World {
    async fn start() -> World {
        World::start_with(&[]).await
    }

    /// [`World::start`] with `env` set for the first ambassador.
    async fn start_with(env: &[(&str, &str)]) -> World {
        let Echo {
            etcd,
            backend,
            port,
            admin,
            run,
            ..
        } = Echo::start().await;
        let args = loopback_args(&etcd, &admin, &run, &["--grace", "30s", "--threads", "2"]);
        let mut command = Command::new(BIN);
        command.args(&args).envs(env.iter().copied());
        let mut first = Daemon::spawn_command("ambassador", command);
        first.wait_log(&format!("listening on addr=127.0.0.1:{port}"), LIMIT);
        World {
            _etcd: etcd,
            _backend: backend,
            run,
            args,
            addr: ([127, 0, 0, 1], port).into(),
            first,
        }
    }

    /// The flags of a successor: the same, `--upgrade`, then `extra`.
    fn upgrade_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args = self.args.clone();
        args.push("--upgrade".into());
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    }

    /// Runs a successor that must fail: its exit code and stderr.
    fn failing_upgrade(&self, args: &[String]) -> (Option<i32>, String) {
        let out = Command::new(BIN)
            .args(args)
            .output()
            .expect("run the ambassador");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_upgrades_under_traffic_fail_no_connect_and_open_connections_finish_on_the_first() {
    let mut world = World::start().await;
    // Long-lived connections, opened on the first process.
    let mut long = Vec::new();
    for _ in 0..3 {
        long.push(open(world.addr).await);
    }
    let traffic = Traffic::start(world.addr);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut previous: Option<Daemon> = None;
    let mut done = Vec::new();
    for round in 0..10u8 {
        let mut next = Daemon::spawn(BIN, &refs(&world.upgrade_args(&[])));
        next.wait_log("took over; the previous process drains", LIMIT);
        let old = previous.as_mut().unwrap_or(&mut world.first);
        old.wait_log("handed over to the new process", LIMIT);
        for s in &mut long {
            echo(s, 1000, round).await;
        }
        // Let the new one carry traffic alone for a while before the next round.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(p) = previous.replace(next) {
            done.push(p);
        }
    }
    let (made, failed) = traffic.stop();
    eprintln!("10 upgrades under traffic: {failed} failed of {made} new connections");
    assert_eq!(failed, 0, "connections failed during the upgrades");
    assert!(made >= 500, "only {made} connections made");
    // The long-lived ones still run on the first process: 4 MiB each way each, equal.
    for s in &mut long {
        echo(s, 4 << 20, 7).await;
    }
    for mut s in long {
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
    }
    let line = world.first.wait_log("shut down", LIMIT);
    assert!(line.contains("cut=0"), "{line}");
    assert!(world.first.wait_exit(LIMIT).success());
    for mut d in done {
        assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    }
    // The last one serves.
    greeting(world.addr).expect("the last ambassador serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_waiting_in_the_accept_queue_at_the_upgrade_are_served() {
    let mut world = World::start().await;
    // The first process stops accepting; connections pile up in the kernel's queue.
    world.first.signal(nix::sys::signal::Signal::SIGSTOP);
    let mut queued = Vec::new();
    for _ in 0..40 {
        queued.push(
            TcpStream::connect(world.addr)
                .await
                .expect("queued connect"),
        );
    }
    let mut next = Daemon::spawn(BIN, &refs(&world.upgrade_args(&[])));
    tokio::time::sleep(Duration::from_millis(300)).await;
    world.first.signal(nix::sys::signal::Signal::SIGCONT);
    next.wait_log("took over", LIMIT);
    for (i, s) in queued.iter_mut().enumerate() {
        let mut greeting = [0u8; 14];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut greeting))
            .await
            .unwrap_or_else(|_| panic!("queued connection {i} was not served"))
            .unwrap_or_else(|e| panic!("queued connection {i}: {e}"));
        assert_eq!(&greeting, b"hello from b0\n");
    }
    drop(queued);
    assert!(world.first.wait_exit(LIMIT).success());
    greeting(world.addr).expect("the new ambassador serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_fails_or_is_not_allowed_changes_nothing() {
    let mut world = World::start().await;
    let traffic = Traffic::start(world.addr);
    let socket = world.run.path().join(format!(
        "{}.upgrade.sock",
        ambassador::lock::name("127.0.0.1".parse().unwrap())
    ));
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the upgrade socket is for its user only");

    // A bad flag: refused before anything is taken.
    let mut args = world.upgrade_args(&[]);
    let at = args.iter().position(|a| a == "--threads").unwrap();
    args[at + 1] = "3".into();
    let (code, err) = world.failing_upgrade(&args);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--threads 3 differs from the running ambassador's 2"),
        "{err}"
    );

    // etcd unreachable: it gives up, the running one never stopped accepting.
    let mut args = world.upgrade_args(&["--upgrade-timeout", "2s"]);
    let dead = format!("http://127.0.0.1:{}", testkit::free_ports(1)[0]);
    let at = args.iter().position(|a| a == "--etcd").unwrap();
    args[at + 1] = dead;
    let (code, err) = world.failing_upgrade(&args);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the routes were not read from etcd")
            && err.contains("not taking over: the running process keeps serving"),
        "{err}"
    );
    world.first.wait_log("upgrade abandoned, serving on", LIMIT);

    // One upgrade at a time: while one holds the sockets, a second is refused.
    let path = socket.clone();
    let held = tokio::task::spawn_blocking(move || runtime::handover::take(&path))
        .await
        .unwrap()
        .expect("the first hand-over");
    assert!(
        held.fds.keys().any(|n| n.starts_with("tcp/")),
        "{:?}",
        held.fds.keys()
    );
    let (code, err) = world.failing_upgrade(&world.upgrade_args(&[]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("an upgrade is in progress"), "{err}");
    drop(held);

    // Another user cannot reach the socket (the run dir opened to all: only the socket's own
    // mode refuses; `default` congestion control, which needs no privilege to keep).
    std::fs::set_permissions(world.run.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args(world.upgrade_args(&["--local-congestion", "default"]))
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot reach a running process to upgrade")
            && err.contains("ermission denied"),
        "{err}"
    );

    let (made, failed) = traffic.stop();
    eprintln!("failed upgrades under traffic: {failed} failed of {made}");
    assert_eq!(failed, 0, "connections failed while upgrades failed");
    assert!(made > 100, "{made}");
    assert!(
        !world.first.log().contains("handed over"),
        "{}",
        world.first.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_and_dns_answer_across_an_upgrade() {
    use crate::udp::{Echo, ask, client};
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let echo = Echo::start("e").await;
    let port = put_alloc(&mut c, "shared/echo:7/udp").await;
    put_endpoint(&mut c, "shared/echo:7/udp", "h0", 0, echo.addr).await;
    let admin = format!("127.0.0.1:{}", testkit::free_ports(1)[0]);
    let dns: SocketAddr = ([127, 0, 0, 1], testkit::steady_ports(1)[0]).into();
    let run = tempfile::tempdir().unwrap();
    let mut args = loopback_args(&etcd, &admin, &run, &["--threads", "2"]);
    let at = args.iter().position(|a| a == "--dns").unwrap();
    args[at + 1] = dns.to_string();
    let mut first = Daemon::spawn(BIN, &refs(&args));
    first.wait_log("listening on (UDP)", LIMIT);
    let udp = client(([127, 0, 0, 1], port).into()).await;
    let answer = |what: &'static str| {
        let udp = &udp;
        async move {
            for _ in 0..10 {
                if let Some(reply) = ask(udp, what.as_bytes(), Duration::from_millis(300)).await {
                    return String::from_utf8_lossy(&reply).into_owned();
                }
            }
            panic!("no UDP answer to {what}");
        }
    };
    assert_eq!(answer("before").await, "e|before");
    let name = format!("echo.shared.{}", ambassador::dns::DEFAULT_ZONE);
    let a = crate::dns::dig(dns, &["+short", &name, "A"]);
    assert_eq!(a.trim(), "127.0.0.1", "{a}");

    // The host's stats record, for the UI: written once the routes are read, every 5 s.
    let stats_key =
        schema::Prefix::default().key(&schema::Key::Stats(schema::HostId::new("h0").unwrap()));
    let stats_there = {
        let kv = etcd.client().await;
        move || {
            let (mut kv, key) = (kv.clone(), stats_key.clone());
            async move { kv.get(key, None).await.unwrap().count() == 1 }
        }
    };
    let started = Instant::now();
    while !stats_there().await {
        assert!(started.elapsed() < LIMIT, "no stats record");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A question whose answer is on its way during the hand-over (the backend holds it until
    // the old process has handed over): it still reaches the client, through the old
    // process's session, which lingers for that.
    udp.send(b"hold").await.unwrap();
    args.push("--upgrade".into());
    let mut next = Daemon::spawn(BIN, &refs(&args));
    next.wait_log("took over", LIMIT);
    first.wait_log("handed over to the new process", LIMIT);
    echo.release.notify_one();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), udp.recv(&mut buf))
        .await
        .expect("the answer on its way at the hand-over was lost")
        .unwrap();
    assert_eq!(&buf[..n], b"e|hold");
    // The same client, the same session address: answered by the new process.
    assert_eq!(answer("after").await, "e|after");
    let a = crate::dns::dig(dns, &["+short", &name, "A"]);
    assert_eq!(a.trim(), "127.0.0.1", "{a}");
    let a = crate::dns::dig(dns, &["+tcp", "+short", &name, "A"]);
    assert_eq!(a.trim(), "127.0.0.1", "over TCP: {a}");
    assert!(first.wait_exit(LIMIT).success(), "{}", first.log());
    // The old process left its stats record to the successor (which writes it at its next
    // tick) rather than revoke it: the host does not drop out of the UI meanwhile.
    assert!(
        stats_there().await,
        "the stats record went with the old process"
    );
    assert_eq!(answer("later").await, "e|later");
}

/// Kills a process the test did not spawn itself (the successor SIGUSR2 starts), also when
/// the test fails.
struct Orphan(Option<i32>);

impl Drop for Orphan {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_starts_the_successor_from_the_same_binary_with_the_same_flags() {
    // systemd's notification socket, as a Type=notify unit has it.
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let next_notice = || {
        let mut buf = [0u8; 512];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut world = World::start_with(&[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]).await;
    let first_notice = next_notice();
    assert!(first_notice.contains("READY=1"), "{first_notice:?}");
    assert!(!first_notice.contains("MAINPID"), "{first_notice:?}");
    let traffic = Traffic::start(world.addr);
    let lock = world.run.path().join(format!(
        "{}.lock",
        ambassador::lock::name("127.0.0.1".parse().unwrap())
    ));
    let first_pid = world.first.pid();
    world.first.signal(nix::sys::signal::Signal::SIGUSR2);
    // The successor logs to the same stderr (inherited).
    world
        .first
        .wait_log("took over; the previous process drains", LIMIT);
    // It holds the lock now and says so in the lock file.
    let holder = std::fs::read_to_string(&lock).unwrap();
    let pid: i32 = holder
        .split_whitespace()
        .skip_while(|w| *w != "pid")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {holder:?}"));
    let _orphan = Orphan(Some(pid));
    assert_ne!(pid as u32, first_pid, "{holder}");
    // The successor is the unit's main process now, and ready.
    let notice = next_notice();
    assert!(
        notice.contains(&format!("MAINPID={pid}")) && notice.contains("READY=1"),
        "{notice:?}"
    );
    assert!(world.first.wait_exit(LIMIT).success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (made, failed) = traffic.stop();
    assert_eq!(failed, 0, "of {made}");
    greeting(world.addr).expect("the successor serves");
}
