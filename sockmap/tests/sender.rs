//! Forwarding in the sender's system call, with real sockets: a client and a backend, both
//! Python processes in a cgroup of the test's own, talk through a small relay in this test
//! that arms the path after every write, as the ambassador does.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sockmap::sender::{Peer, SenderPath};
use testkit::cgroup::Cgroup;
use testkit::lines;

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("not IPv4: {a}"),
    }
}

/// Kills the child on Drop (a failed test leaves no process behind).
struct Reaped(Child);

impl Reaped {
    /// The port a server prints on its first line; the rest of its output stays to be read.
    fn port(&mut self) -> u16 {
        let mut out = self.0.stdout.take().unwrap();
        let mut line = String::new();
        let mut byte = [0u8; 1];
        while out.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            line.push(byte[0] as char);
        }
        self.0.stdout = Some(out);
        line.trim()
            .parse()
            .unwrap_or_else(|_| panic!("a port, not {line:?}"))
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One direction of the relay: reads, writes everything read and, from its `arm_after`th
/// read on, arms the path with the count (the peer forwards at its next send that finds all
/// its bytes relayed).
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    path: Arc<SenderPath>,
    peer: Peer,
    arm_after: u32,
) -> u64 {
    let mut reads = 0u32;
    let mut buf = vec![0u8; 64 * 1024];
    let mut relayed = 0u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n = match from.read(&mut buf) {
            // A read on a socket in a sockhash may come back empty-handed (EAGAIN) after a
            // wait, also a blocking one: as on a non-blocking socket, read again.
            Err(e)
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
                    && std::time::Instant::now() < deadline =>
            {
                continue;
            }
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return relayed;
            }
            Ok(n) => n,
        };
        to.write_all(&buf[..n]).unwrap();
        relayed += n as u64;
        reads += 1;
        if reads >= arm_after {
            path.arm(peer, relayed, std::os::fd::AsFd::as_fd(&to))
                .unwrap();
        }
    }
}

/// A client and a backend, Python processes in a cgroup of the test's own, joined by the
/// relay of this test (one thread each way), both watched by the sender path.
struct Rig {
    path: Arc<SenderPath>,
    backend: Reaped,
    client: Option<Child>,
    client_peer: Peer,
    backend_peer: Peer,
    up: Option<std::thread::JoinHandle<u64>>,
    down: Option<std::thread::JoinHandle<u64>>,
    // Last: the cgroup goes after the processes in it.
    _cgroup: Cgroup,
}

impl Rig {
    /// `backend` prints its port on its first line; `client` gets the relay's port as its
    /// argument. Each way arms the path from its `arm_after`th read on.
    fn new(name: &str, backend: &str, client: &str, arm_after: u32) -> Rig {
        let cgroup = Cgroup::new(name);
        let path =
            Arc::new(SenderPath::attach(cgroup.path(), 64).expect("attaching the sender path"));
        let mut command = cgroup.command("python3");
        command
            .arg("-c")
            .arg(backend)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut backend = Reaped(command.spawn().unwrap());
        let backend_port = backend.port();

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy_port = listener.local_addr().unwrap().port();
        path.watch_clients_of(v4(listener.local_addr().unwrap()))
            .unwrap();
        path.watch_servers_on(SocketAddrV4::new(
            std::net::Ipv4Addr::LOCALHOST,
            backend_port,
        ))
        .unwrap();

        let mut command = cgroup.command("python3");
        command
            .arg("-c")
            .arg(client)
            .arg(proxy_port.to_string())
            .arg("0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let client = command.spawn().unwrap();

        let (accepted, _) = listener.accept().unwrap();
        let upstream = TcpStream::connect(("127.0.0.1", backend_port)).unwrap();
        for s in [&accepted, &upstream] {
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        }
        let client_peer = Peer {
            local: v4(accepted.peer_addr().unwrap()),
            remote: v4(accepted.local_addr().unwrap()),
        };
        let backend_peer = Peer {
            local: v4(upstream.peer_addr().unwrap()),
            remote: v4(upstream.local_addr().unwrap()),
        };
        path.target(client_peer, std::os::fd::AsFd::as_fd(&upstream))
            .unwrap();
        path.target(backend_peer, std::os::fd::AsFd::as_fd(&accepted))
            .unwrap();
        let up = {
            let (from, to, path) = (
                accepted.try_clone().unwrap(),
                upstream.try_clone().unwrap(),
                path.clone(),
            );
            std::thread::spawn(move || pipe(from, to, path, client_peer, arm_after))
        };
        let down = {
            let (from, to, path) = (upstream, accepted, path.clone());
            std::thread::spawn(move || pipe(from, to, path, backend_peer, arm_after))
        };
        Rig {
            path,
            backend,
            client: Some(client),
            client_peer,
            backend_peer,
            up: Some(up),
            down: Some(down),
            _cgroup: cgroup,
        }
    }

    /// The client's output, once it ended; with the backend's errors when it failed.
    fn client_output(&mut self) -> std::process::Output {
        let output = self.client.take().unwrap().wait_with_output().unwrap();
        if !output.status.success() {
            let _ = self.backend.0.kill();
            let mut err = String::new();
            let _ = self
                .backend
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err);
            panic!(
                "client: {} {}; backend: {err}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        output
    }

    /// Bytes each way the relay moved, once both ways ended.
    fn relayed(&mut self) -> (u64, u64) {
        (
            self.up.take().unwrap().join().unwrap(),
            self.down.take().unwrap().join().unwrap(),
        )
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(mut client) = self.client.take() {
            let _ = client.kill();
            let _ = client.wait();
        }
        self.path.leave(self.client_peer);
        self.path.leave(self.backend_peer);
    }
}

/// Reads relayed before arming: past the 300 rounds, so the peers start to forward while
/// the client sends lines without waiting.
const ARM_AFTER: u32 = 310;

/// Request/answer rounds, then pipelined lines, arrive whole and in order both ways; after
/// the hand-over both peers forward in their own `sendmsg` (the relay moved only the first
/// bytes); a half-close still reaches the backend, and its last answer the client.
#[test]
fn a_pairs_peers_forward_in_their_own_sends_in_order_to_the_end() {
    let mut rig = Rig::new("sender", lines::REVERSER, lines::CLIENT, ARM_AFTER);
    let output = rig.client_output();
    assert_eq!(output.stdout, b"ok\n");
    let (up, down) = rig.relayed();
    // Every line the client sends, and the answers (as long, and "bye").
    let sent = lines::client_sends();
    eprintln!(
        "relayed in user space: up {up} of {sent}, down {down} of {}",
        sent + 4
    );
    // The relay moved the first rounds (about 46 KB) and what came while it lagged behind;
    // the peers' own sends at least the last rounds (as much again).
    for relayed in [up, down] {
        assert!(
            relayed > 40_000 && relayed < sent - 30_000,
            "up {up}, down {down} of {sent}"
        );
    }
}

/// The backend of the stalled test: reads a line, answers, then reads nothing for 3 s, then
/// reads to the end and prints how many bytes it got.
const SLOW_BACKEND: &str = r#"
import socket, sys, time
l = socket.socket()
l.bind(('127.0.0.1', 0))
l.listen(1)
print(l.getsockname()[1], flush=True)
c, _ = l.accept()
c.settimeout(30)
f = c.makefile('rb')
f.readline()
c.sendall(b'go\n')
time.sleep(3)
n = 0
while True:
    b = f.read(65536)
    if not b:
        break
    n += len(b)
print(n, flush=True)
"#;

/// The client of the stalled test: a line, then 64 MiB on a non-blocking socket, waiting in
/// select() whenever a send takes nothing; prints the CPU seconds and the seconds it took.
const EAGER_CLIENT: &str = r#"
import socket, sys, time, select, resource
c = socket.create_connection(('127.0.0.1', int(sys.argv[1])))
c.sendall(b'hi\n')
assert c.recv(3) == b'go\n'
c.setblocking(False)
chunk = b'y' * 65536
left = 64 << 20
t0 = time.time(); r0 = resource.getrusage(resource.RUSAGE_SELF)
while left:
    select.select([], [c], [], 30)
    try:
        left -= c.send(chunk[:min(left, len(chunk))])
    except BlockingIOError:
        pass
r1 = resource.getrusage(resource.RUSAGE_SELF)
print('%.2f %.2f' % (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, time.time() - t0))
c.shutdown(socket.SHUT_WR)
select.select([c], [], [], 30)
c.recv(1)
"#;

/// A peer that forwards into a socket whose send queue is full (its backend stopped reading)
/// waits for room as a plain TCP sender would, and every byte arrives.
#[test]
fn a_sender_whose_target_is_full_waits_and_loses_nothing() {
    let mut rig = Rig::new("sender-full", SLOW_BACKEND, EAGER_CLIENT, 1);
    let output = rig.client_output();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    eprintln!("client: {text}");
    let mut backend_out = String::new();
    let mut out = rig.backend.0.stdout.take().unwrap();
    let _ = out.read_to_string(&mut backend_out);
    eprintln!("backend: {backend_out}");
    assert_eq!(backend_out.trim(), (64u64 << 20).to_string());
    let (cpu, wall): (f64, f64) = {
        let mut it = text.split_whitespace().map(|f| f.parse::<f64>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    };
    assert!(
        wall > 2.0,
        "the client did not wait for the backend: {text}"
    );
    assert!(
        cpu < wall / 2.0,
        "the client spun while the backend did not read: {text}"
    );
}

/// A peer taken out of the path in the middle of a transfer (as the ambassador does when a
/// connection turns to bulk) goes on over plain TCP, through the relay, and loses nothing.
#[test]
fn a_peer_released_mid_stream_goes_on_over_plain_tcp() {
    let mut rig = Rig::new("sender-release", SLOW_BACKEND, EAGER_CLIENT, 1);
    // The backend reads nothing for 3 s: the client is mid-stream meanwhile.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(rig.path.holds(rig.client_peer), "the client is in the path");
    rig.path.release(rig.client_peer);
    assert!(
        !rig.path.holds(rig.client_peer),
        "the client is out of the path"
    );
    let output = rig.client_output();
    let mut backend_out = String::new();
    let mut out = rig.backend.0.stdout.take().unwrap();
    let _ = out.read_to_string(&mut backend_out);
    assert_eq!(
        backend_out.trim(),
        (64u64 << 20).to_string(),
        "client: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// A backend address watched, then no longer: the first connection accepted there is caught,
/// one accepted after `unwatch_servers_on` is not.
#[test]
fn an_address_no_longer_watched_catches_no_new_socket() {
    let cgroup = Cgroup::new("sender-unwatch");
    let path = SenderPath::attach(cgroup.path(), 8).expect("attaching the sender path");
    let mut server = cgroup.command("python3");
    server
        .arg("-c")
        .arg(
            "import socket, time\n\
             l = socket.socket()\n\
             l.bind(('127.0.0.1', 0))\n\
             l.listen(4)\n\
             print(l.getsockname()[1], flush=True)\n\
             held = [l.accept() for _ in range(2)]\n\
             time.sleep(10)\n",
        )
        .stdout(Stdio::piped());
    let mut server = Reaped(server.spawn().unwrap());
    let addr = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, server.port());
    let caught = |path: &SenderPath| {
        let s = TcpStream::connect(addr).unwrap();
        let peer = Peer {
            local: addr,
            remote: v4(s.local_addr().unwrap()),
        };
        // Caught when the server's side sees our ACK: a moment after connect returns.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !path.caught(peer) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        (path.caught(peer), s)
    };
    path.watch_servers_on(addr).unwrap();
    let (first, _s1) = caught(&path);
    assert!(first, "a socket accepted at a watched address is caught");
    path.unwatch_servers_on(addr);
    let (second, _s2) = caught(&path);
    assert!(!second, "a socket accepted after the unwatch is not");
}
