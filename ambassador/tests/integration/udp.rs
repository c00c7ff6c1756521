//! UDP service ports through the ambassador: real sockets on loopback, a real etcd, and
//! Debian's dnsmasq queried with dig.

use std::future::ready;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use testkit::{Etcd, eventually_async};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::{Amb, put_alloc, put_endpoint};

const SP: &str = "shared/echo:7/udp";

/// A UDP echo backend: each datagram comes back as `NAME|` and the datagram.
pub struct Echo {
    pub addr: SocketAddr,
    /// A datagram that starts with `hold` is answered only once this is notified.
    pub release: Arc<tokio::sync::Notify>,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    pub async fn start(name: &str) -> Echo {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = socket.local_addr().unwrap();
        let prefix = format!("{name}|").into_bytes();
        let release = Arc::new(tokio::sync::Notify::new());
        let released = release.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            // Held replies wait in tasks of their own, aborted with this one.
            let mut held = tokio::task::JoinSet::new();
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let mut reply = prefix.clone();
                reply.extend_from_slice(&buf[..n]);
                if buf[..n].starts_with(b"hold") {
                    let (socket, released) = (socket.clone(), released.clone());
                    held.spawn(async move {
                        released.notified().await;
                        let _ = socket.send_to(&reply, from).await;
                    });
                    continue;
                }
                let _ = socket.send_to(&reply, from).await;
            }
        });
        Echo {
            addr,
            release,
            task,
        }
    }

    /// Closes the socket: datagrams to it now draw ICMP port unreachable.
    async fn kill(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

/// Sends `datagram` and waits for the reply (or `None` after `wait`).
pub async fn ask(client: &UdpSocket, datagram: &[u8], wait: Duration) -> Option<Vec<u8>> {
    client.send(datagram).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    let n = tokio::time::timeout(wait, client.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    Some(buf)
}

pub async fn client(to: SocketAddr) -> UdpSocket {
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.connect(to).await.unwrap();
    c
}

/// etcd, `backends` echo backends registered for [`SP`] (b0, b1, ...) and an ambassador
/// (configured by `tweak`) with all of them in its routes: (etcd, backends, ambassador, the
/// UDP address to send to).
async fn world(
    backends: usize,
    tweak: impl FnOnce(&mut ambassador::Config),
) -> (Etcd, Vec<Echo>, Amb, SocketAddr) {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let port = put_alloc(&mut c, SP).await;
    let mut echoes = Vec::new();
    for i in 0..backends {
        let e = Echo::start(&format!("b{i}")).await;
        put_endpoint(&mut c, SP, "h0", i as u32, e.addr).await;
        echoes.push(e);
    }
    let amb = Amb::start(&etcd, tweak).await;
    let addr = eventually_async(Duration::from_secs(10), "a UDP socket on the port", || {
        let routes = amb.shared.routes();
        let ready_ = routes
            .udp_by_port
            .get(&port)
            .is_some_and(|s| s.backends.len() == backends);
        ready(
            amb.shared
                .udp_listening()
                .get(&port)
                .copied()
                .filter(|_| ready_),
        )
    })
    .await;
    (etcd, echoes, amb, addr)
}

/// The UDP service's `/state` entry.
fn state(amb: &Amb) -> serde_json::Value {
    amb.shared.state_json()["udp_services"][0].clone()
}

/// 10,000 datagrams from two clients at once, each answered, each client receiving only its
/// own; then a 60,000-byte datagram, whole; the counters add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_datagrams_from_two_clients_each_get_their_own_replies() {
    let (_etcd, _echoes, amb, addr) = world(1, |c| c.threads = 2).await;
    let clients: Vec<_> = (0..2u8)
        .map(|who| {
            tokio::spawn(async move {
                let c = client(addr).await;
                for seq in 0..5_000u32 {
                    let mut datagram = vec![who];
                    datagram.extend_from_slice(&seq.to_be_bytes());
                    // One lost on loopback would be a bug here: the exchange is in lockstep.
                    let reply = ask(&c, &datagram, Duration::from_secs(2))
                        .await
                        .unwrap_or_else(|| panic!("client {who}: no reply to {seq}"));
                    assert_eq!(&reply[..3], b"b0|");
                    assert_eq!(
                        &reply[3..],
                        &datagram[..],
                        "client {who} got another's reply"
                    );
                }
                c
            })
        })
        .collect();
    let mut sockets = Vec::new();
    for c in clients {
        sockets.push(c.await.unwrap());
    }
    let big: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    let reply = ask(&sockets[0], &big, Duration::from_secs(2))
        .await
        .expect("the 60,000-byte datagram answered");
    assert_eq!(reply.len(), 60_003);
    assert_eq!(&reply[3..], &big[..], "carried whole");
    let s = state(&amb);
    assert_eq!(s["datagrams_up"], 10_001, "{s}");
    assert_eq!(s["datagrams_down"], 10_001, "{s}");
    assert_eq!(s["sessions"], 2, "{s}");
    assert_eq!(s["sessions_active"], 2, "{s}");
    assert_eq!(s["bytes_up"], 10_000 * 5 + 60_000, "{s}");
    assert_eq!(amb.shared.state_json()["udp_sessions"], 2);
    let metrics = amb.shared.metrics_text();
    assert!(
        metrics.contains(
            "ambassador_udp_datagrams_total{service=\"shared/echo:7/udp\",direction=\"up\"} 10001"
        ),
        "{metrics}"
    );
}

/// The backend of a session goes away (its port answers ICMP port unreachable): counted as a
/// failed connect, and the session moves to the other backend; a session idle for
/// `--udp-idle-timeout` ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_when_its_backend_refuses_and_ends_when_idle() {
    let (_etcd, mut echoes, amb, addr) = world(2, |c| {
        c.udp_idle_timeout = Duration::from_millis(500);
    })
    .await;
    let c = client(addr).await;
    let first = ask(&c, b"one", Duration::from_secs(2))
        .await
        .expect("reply");
    let name = String::from_utf8_lossy(&first[..2]).into_owned();
    let (dead, other) = if name == "b0" { (0, "b1") } else { (1, "b0") };
    echoes[dead].kill().await;
    // The datagram that draws the ICMP error is lost; the client asks again, as UDP
    // clients do, and the session has moved.
    let mut answered_by = None;
    for attempt in 0..5 {
        if let Some(r) = ask(
            &c,
            format!("again {attempt}").as_bytes(),
            Duration::from_millis(300),
        )
        .await
        {
            answered_by = Some(String::from_utf8_lossy(&r[..2]).into_owned());
            break;
        }
    }
    assert_eq!(answered_by.as_deref(), Some(other), "{}", state(&amb));
    let s = state(&amb);
    let errors: u64 = s["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["connect_errors"].as_u64().unwrap())
        .sum();
    assert!(errors >= 1, "the refusal counted as a failed connect: {s}");
    assert_eq!(s["sessions_active"], 1);
    // Idle: ended within the timeout (and a little).
    eventually_async(Duration::from_secs(3), "the idle session ended", || {
        ready((state(&amb)["sessions_active"] == 0).then_some(()))
    })
    .await;
    assert_eq!(amb.shared.udp_sessions(), 0);
    // A new datagram makes a new session (which may pick the dead backend again, still
    // registered and not yet ejected: its datagram is lost and the client asks again, within
    // the idle timeout, so the moved session carries it: a client that waited longer would
    // start a new session each time, and each may pick the dead backend again).
    let mut back = None;
    for _ in 0..8 {
        back = ask(&c, b"back", Duration::from_millis(200)).await;
        if back.is_some() {
            break;
        }
    }
    assert_eq!(back.as_deref().map(|r| &r[..2]), Some(other.as_bytes()));
    assert!(state(&amb)["sessions"].as_u64().unwrap() >= 2);
}

/// At `--max-udp-sessions` a new client's datagrams are dropped and counted; the sessions
/// there keep working, and a slot freed by an idle session is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_limit_drops_new_clients_with_a_counter_not_a_crash() {
    let (_etcd, _echoes, amb, addr) = world(1, |c| {
        c.max_udp_sessions = 2;
        c.udp_idle_timeout = Duration::from_millis(800);
    })
    .await;
    let (a, b, extra) = (client(addr).await, client(addr).await, client(addr).await);
    assert!(ask(&a, b"a", Duration::from_secs(2)).await.is_some());
    assert!(ask(&b, b"b", Duration::from_secs(2)).await.is_some());
    assert!(
        ask(&extra, b"c", Duration::from_millis(300))
            .await
            .is_none()
    );
    let s = state(&amb);
    assert_eq!(s["drops"]["session limit"], 1, "{s}");
    assert!(ask(&a, b"a2", Duration::from_secs(2)).await.is_some());
    assert!(amb.shared.metrics_text().contains(
        "ambassador_udp_drops_total{service=\"shared/echo:7/udp\",reason=\"session limit\"} 1"
    ));
    // Once the two are idle, the third gets in.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(ask(&extra, b"c2", Duration::from_secs(2)).await.is_some());
}

/// Releases [`SP`]'s port (its allocation deleted, as `viking rm` does) and waits until the
/// ambassador has closed its socket.
async fn release(etcd: &Etcd, amb: &Amb) {
    etcd.client()
        .await
        .delete(
            schema::Prefix::default().key(&schema::Key::PortAlloc(SP.parse().unwrap())),
            None,
        )
        .await
        .unwrap();
    eventually_async(Duration::from_secs(5), "the UDP socket closed", || {
        ready(amb.shared.udp_listening().is_empty().then_some(()))
    })
    .await;
}

/// A service with no live endpoint: datagrams are dropped and counted (`no backend`); a
/// released port's socket closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_is_a_counted_drop_and_a_released_port_closes() {
    let (etcd, _echoes, amb, addr) = world(0, |_| {}).await;
    let c = client(addr).await;
    assert!(
        ask(&c, b"anyone?", Duration::from_millis(300))
            .await
            .is_none()
    );
    assert_eq!(state(&amb)["drops"]["no backend"], 1);
    release(&etcd, &amb).await;
    // The port is free again: this process can bind it.
    eventually_async(Duration::from_secs(5), "the port free", || {
        ready(std::net::UdpSocket::bind(addr).ok().map(|_| ()))
    })
    .await;
}

/// A released port's sessions end and give their places back under `--max-udp-sessions`.
/// (They were dropped uncounted: every released port kept its sessions' places until the
/// limit turned every new client away.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_port_gives_its_sessions_places_back() {
    let (etcd, echoes, amb, addr) = world(1, |c| c.max_udp_sessions = 2).await;
    let (a, b) = (client(addr).await, client(addr).await);
    assert!(ask(&a, b"a", Duration::from_secs(2)).await.is_some());
    assert!(ask(&b, b"b", Duration::from_secs(2)).await.is_some());
    let active = |n: u32| format!("ambassador_udp_sessions_active{{service=\"{SP}\"}} {n}\n");
    assert!(amb.shared.metrics_text().contains(&active(2)));
    release(&etcd, &amb).await;
    let mut kv = etcd.client().await;
    // (The service's series go with it.)
    let metrics = amb.shared.metrics_text();
    assert!(!metrics.contains(&format!("service=\"{SP}\"")), "{metrics}");
    // Another service's port: two new clients get in.
    let other = "shared/other:9/udp";
    let port = put_alloc(&mut kv, other).await;
    put_endpoint(&mut kv, other, "h0", 0, echoes[0].addr).await;
    let addr = eventually_async(Duration::from_secs(10), "the other UDP port", || {
        let served = amb
            .shared
            .routes()
            .udp_by_port
            .get(&port)
            .is_some_and(|s| !s.backends.is_empty());
        ready(
            amb.shared
                .udp_listening()
                .get(&port)
                .copied()
                .filter(|_| served),
        )
    })
    .await;
    for name in [&b"c"[..], b"d"] {
        let c = client(addr).await;
        assert!(
            ask(&c, name, Duration::from_secs(2)).await.is_some(),
            "{} refused: the released port's sessions still count",
            String::from_utf8_lossy(name)
        );
    }
}

/// dnsmasq on a free loopback port, answering `viking.test` from its own config.
struct Dnsmasq(std::process::Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dnsmasq_bin() -> &'static str {
    if std::path::Path::new("/usr/sbin/dnsmasq").exists() {
        "/usr/sbin/dnsmasq"
    } else {
        "dnsmasq"
    }
}

/// `dig` through the ambassador to Debian's dnsmasq registered as a UDP endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_through_the_ambassador_to_dnsmasq() {
    let port = testkit::free_ports(1)[0];
    let child = std::process::Command::new(dnsmasq_bin())
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-dhcp-interface=",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--user=root",
            "--pid-file=",
            "--address=/viking.test/10.1.2.3",
            &format!("--port={port}"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let child = match child {
        Ok(c) => Dnsmasq(c),
        Err(e) => panic!(
            "cannot run dnsmasq ({e}): this test needs Debian's dnsmasq-base; run `make test` \
             (scripts/setup.sh installs it)"
        ),
    };
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let sp = "shared/dns:53/udp";
    let amb_port = put_alloc(&mut c, sp).await;
    put_endpoint(
        &mut c,
        sp,
        "h0",
        0,
        SocketAddr::from(([127, 0, 0, 1], port)),
    )
    .await;
    let amb = Amb::start(&etcd, |_| {}).await;
    eventually_async(Duration::from_secs(10), "a UDP socket on the port", || {
        let has = amb.shared.udp_listening().contains_key(&amb_port)
            && amb
                .shared
                .routes()
                .udp_by_port
                .get(&amb_port)
                .is_some_and(|s| s.backends.len() == 1);
        ready(has.then_some(()))
    })
    .await;
    let answer = eventually_async(Duration::from_secs(10), "dig answered", || {
        let out = std::process::Command::new("dig")
            .args([
                "+short",
                "+tries=1",
                "+time=1",
                "-p",
                &amb_port.to_string(),
                "@127.0.0.1",
                "viking.test",
                "A",
            ])
            .output()
            .expect("dig");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        ready((text == "10.1.2.3").then_some(text))
    })
    .await;
    assert_eq!(answer, "10.1.2.3");
    drop(child);
}

/// Waits until the kernel's map holds the UDP service with `n` backends.
async fn kernel_backends(amb: &Amb, n: u64) {
    eventually_async(
        Duration::from_secs(10),
        &format!("{n} backends in the kernel"),
        || ready((state(amb)["kernel"]["backends"].as_u64() == Some(n)).then_some(())),
    )
    .await;
}

/// Python in `cgroup`: 20 sockets, each sending 5 datagrams to `to` and reading the answers;
/// a line per socket: the backends that answered it and where the answers came from.
async fn kernel_clients(cgroup: &testkit::cgroup::Cgroup, to: SocketAddr) -> Vec<String> {
    let script = format!(
        "import socket\n\
         for i in range(20):\n    \
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    \
             s.settimeout(3)\n    \
             names, sources = set(), set()\n    \
             for j in range(5):\n        \
                 s.sendto(b'k%d' % j, ('{ip}', {port}))\n        \
                 data, src = s.recvfrom(64)\n        \
                 names.add(data.decode().split('|')[0])\n        \
                 sources.add('%s:%d' % src)\n    \
             print(','.join(sorted(names)), ','.join(sorted(sources)))\n",
        ip = to.ip(),
        port = to.port()
    );
    let mut command = cgroup.command("python3");
    command.arg("-c").arg(script);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `--udp-kernel`: a process in the cgroup sends straight to the backends (the kernel
/// rewrites its datagrams; each socket keeps one backend; the answers come from the
/// ambassador's address), counted in `/state` as kernel sends and not as datagrams through
/// this process; a process outside the cgroup still goes through the socket; an ejected
/// backend leaves the list until its ejection ends; a withdrawn backend is no longer chosen;
/// with etcd away the last list keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_kernel_balances_the_cgroup_and_follows_the_endpoints() {
    let cgroup = testkit::cgroup::Cgroup::new("amb-udp");
    let path = cgroup.path().to_owned();
    let (etcd, echoes, amb, addr) = world(2, move |c| c.udp_kernel = Some(path)).await;
    assert_eq!(
        amb.shared.state_json()["udp_kernel"],
        cgroup.path().display().to_string(),
        "the kernel did not take the programs (see the log)"
    );
    assert!(
        amb.shared
            .metrics_text()
            .contains("ambassador_udp_kernel_balancing 1")
    );
    kernel_backends(&amb, 2).await;
    let lines = kernel_clients(&cgroup, addr).await;
    assert_eq!(lines.len(), 20, "{lines:?}");
    for line in &lines {
        let (names, sources) = line.split_once(' ').unwrap();
        assert!(
            names == "b0" || names == "b1",
            "a socket changed backend: {line}"
        );
        assert_eq!(
            sources,
            addr.to_string(),
            "an answer not from the service: {line}"
        );
    }
    assert!(
        lines.iter().any(|l| l.starts_with("b0")) && lines.iter().any(|l| l.starts_with("b1")),
        "one backend took every socket: {lines:?}"
    );
    let s = state(&amb);
    assert_eq!(s["kernel"]["sends"], 100, "{s}");
    assert_eq!(
        s["kernel"]["senders"], 1,
        "this host's namespace alone: {s}"
    );
    assert_eq!(s["datagrams_up"], 0, "went through this process: {s}");
    let metrics = amb.shared.metrics_text();
    assert!(
        metrics.contains(&format!(
            "ambassador_udp_kernel_sends_total{{service=\"{SP}\"}} 100\n"
        )),
        "{metrics}"
    );

    // Outside the cgroup: through the ambassador's socket.
    let c = client(addr).await;
    assert!(ask(&c, b"outside", Duration::from_secs(2)).await.is_some());
    let s = state(&amb);
    assert_eq!(
        (s["datagrams_up"].as_u64(), s["kernel"]["sends"].as_u64()),
        (Some(1), Some(100))
    );

    // b0 ejected (as the socket path does after failed sends): out of the kernel's list
    // within a second, and back once its ejection ends.
    {
        let routes = amb.shared.routes();
        let b0 = routes.udp_by_port[&addr.port()]
            .backends
            .iter()
            .find(|b| b.addr == echoes[0].addr)
            .unwrap()
            .clone();
        let now = std::time::Instant::now();
        for _ in 0..ambassador::routes::EJECT_AFTER {
            b0.failed(now);
        }
        assert!(b0.is_ejected(now));
    }
    kernel_backends(&amb, 1).await;
    kernel_backends(&amb, 2).await;

    // b0 withdrawn: every socket goes to b1.
    let mut etcd_client = etcd.client().await;
    let key = put_endpoint(&mut etcd_client, SP, "h0", 0, echoes[0].addr).await;
    etcd_client.delete(key, None).await.unwrap();
    kernel_backends(&amb, 1).await;
    let lines = kernel_clients(&cgroup, addr).await;
    assert!(
        lines.iter().all(|l| l.starts_with("b1 ")),
        "a withdrawn backend chosen: {lines:?}"
    );

    // etcd away: the kernel keeps the last list.
    let mut etcd = etcd;
    etcd.stop();
    let lines = kernel_clients(&cgroup, addr).await;
    assert!(
        lines.len() == 20 && lines.iter().all(|l| l.starts_with("b1 ")),
        "with etcd away: {lines:?}"
    );
}
