//! UDP balanced by the kernel, with real sockets: child processes in a cgroup of the test's
//! own send to a service address; the backend answers them, from the address they sent to.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::process::Output;

use sockmap::balance::{self, Balancer, Senders};
use testkit::cgroup::Cgroup;

/// A UDP echo on loopback that answers `n` datagrams, prefixed with `name`.
fn echo(name: &'static str, n: usize) -> (SocketAddrV4, std::thread::JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let SocketAddr::V4(addr) = socket.local_addr().unwrap() else {
        unreachable!()
    };
    let thread = std::thread::spawn(move || {
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 256];
        for _ in 0..n {
            let Ok((len, from)) = socket.recv_from(&mut buf) else {
                return;
            };
            let reply = [name.as_bytes(), b"|", &buf[..len]].concat();
            socket.send_to(&reply, from).unwrap();
        }
    });
    (addr, thread)
}

/// Python in `cgroup` (in a network namespace of its own with `unshare`): sends to `to`
/// unconnected, then connected, and prints each answer and where it came from.
fn client(cgroup: &Cgroup, to: SocketAddrV4, own_netns: bool) -> Output {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(3)\n\
         s.sendto(b'one', ('{ip}', {port}))\n\
         data, src = s.recvfrom(64)\n\
         print(data.decode(), '%s:%d' % src)\n\
         c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         c.settimeout(3)\n\
         c.connect(('{ip}', {port}))\n\
         c.send(b'two')\n\
         print(c.recv(64).decode(), '%s:%d' % c.getpeername())\n",
        ip = to.ip(),
        port = to.port()
    );
    let mut command = if own_netns {
        let mut c = cgroup.command("unshare");
        c.args([
            "--net",
            "sh",
            "-c",
            "ip link set lo up && exec python3 -c \"$0\"",
        ]);
        c.arg(script);
        c
    } else {
        let mut c = cgroup.command("python3");
        c.arg("-c").arg(script);
        c
    };
    command.output().unwrap()
}

fn text(out: &Output) -> String {
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Datagrams to a service address reach its backend, sent and connected alike; the answers
/// come from the service's address (`recvfrom` and `getpeername`); every send is counted;
/// a service taken out is no longer rewritten.
#[test]
fn a_datagram_to_a_service_goes_to_its_backend_and_the_answer_comes_from_the_service() {
    let cgroup = Cgroup::new("balance");
    let balancer = Balancer::attach(cgroup.path(), 16).expect("attach");
    let (backend, echoed) = echo("b0", 2);
    // The service: an address nothing listens on.
    let service: SocketAddrV4 = format!("127.0.0.1:{}", testkit::free_ports(1)[0])
        .parse()
        .unwrap();
    let senders = Senders::Namespace(balance::own_netns_cookie().unwrap());
    balancer.set(service, senders, &[backend]).unwrap();
    let out = text(&client(&cgroup, service, false));
    echoed.join().unwrap();
    assert_eq!(
        out,
        format!("b0|one {service}\nb0|two {service}\n"),
        "answered by the backend, from the service's address"
    );
    assert_eq!(balancer.sent(service, senders).unwrap(), 2);
    // Taken out: nothing listens at the service's address, so no answer.
    balancer.remove(service, senders).unwrap();
    let out = client(&cgroup, service, false);
    assert!(!out.status.success(), "answered after removal");
    assert_eq!(balancer.sent(service, senders).unwrap(), 0);
}

/// A service balanced for this namespace's senders leaves a process of another namespace
/// alone; one balanced for any sender rewrites its datagrams too (counted: in its own
/// namespace nothing answers at the backend's loopback address).
#[test]
fn only_the_senders_named_are_balanced() {
    let cgroup = Cgroup::new("senders");
    let balancer = Balancer::attach(cgroup.path(), 16).expect("attach");
    let backend: SocketAddrV4 = "127.0.0.1:9".parse().unwrap();
    let service: SocketAddrV4 = "127.0.0.1:1".parse().unwrap();
    let here = Senders::Namespace(balance::own_netns_cookie().unwrap());
    balancer.set(service, here, &[backend]).unwrap();
    let _ = client(&cgroup, service, true);
    assert_eq!(
        balancer.sent(service, here).unwrap(),
        0,
        "another namespace's send was balanced"
    );
    balancer.remove(service, here).unwrap();
    balancer.set(service, Senders::Any, &[backend]).unwrap();
    let _ = client(&cgroup, service, true);
    assert!(
        balancer.sent(service, Senders::Any).unwrap() >= 1,
        "not balanced for any sender"
    );
}

/// Two backends: each socket keeps one (by its cookie), and over many sockets both are used.
#[test]
fn sockets_are_spread_over_the_backends() {
    let cgroup = Cgroup::new("spread");
    let balancer = Balancer::attach(cgroup.path(), 16).expect("attach");
    let (b0, t0) = echo("b0", 40);
    let (b1, t1) = echo("b1", 40);
    let service: SocketAddrV4 = "127.0.0.1:1".parse().unwrap();
    let here = Senders::Namespace(balance::own_netns_cookie().unwrap());
    balancer.set(service, here, &[b0, b1]).unwrap();
    let script = "import socket\n\
         for i in range(20):\n    \
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    \
             s.settimeout(3)\n    \
             got = set()\n    \
             for j in range(2):\n        \
                 s.sendto(b'x', ('127.0.0.1', 1))\n        \
                 got.add(s.recvfrom(64)[0].decode().split('|')[0])\n    \
             print(','.join(sorted(got)))\n";
    let out = text(
        &cgroup
            .command("python3")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap(),
    );
    drop((t0, t1));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 20, "{out}");
    assert!(
        lines.iter().all(|l| *l == "b0" || *l == "b1"),
        "a socket changed backend: {out}"
    );
    assert!(
        lines.contains(&"b0") && lines.contains(&"b1"),
        "one backend took all: {out}"
    );
}
