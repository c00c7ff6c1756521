//! Network namespaces for tests: single namespaces, a LAN of "hosts" on one bridge, and code
//! run inside a namespace (servers and clients on real sockets, no helper programs).
//!
//! Everything is deleted on Drop; deleting a namespace deletes the veth ends inside it, and
//! with them their peers.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::docker::run_ok;

/// A network namespace, deleted on Drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `name` with its loopback up. Needs root.
    pub fn new(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run_ok("ip", &["netns", "add", name]);
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/<name>`, for `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Runs a command inside the namespace; fails the test if it fails.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        run_ok("ip", &full)
    }

    /// A command that runs inside the namespace (`ip netns exec <name> program`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a thread of its own that has entered the namespace. Sockets it creates
    /// stay in the namespace whichever thread uses them later.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("enter {}: {e}", path.display()));
            f()
        })
        .join()
        .expect("thread in namespace")
    }

    /// A TCP server inside the namespace on `addr` that writes `greeting` to every
    /// connection and closes it.
    pub fn serve(&self, addr: SocketAddr, greeting: &str) -> Server {
        let listener = self
            .run(move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", self.name));
        let handle = listener.try_clone().expect("clone listener");
        let stop = Arc::new(AtomicBool::new(false));
        let greeting = greeting.to_owned();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Ok(mut conn) = conn {
                        let _ = conn.write_all(greeting.as_bytes());
                    }
                }
            })
        };
        Server {
            stop,
            listener: handle,
            thread: Some(thread),
        }
    }

    /// Whether a TCP connection from inside the namespace to `addr` is accepted within
    /// `timeout` (dropped or refused: false).
    pub fn connects(&self, addr: SocketAddr, timeout: Duration) -> bool {
        self.run(move || TcpStream::connect_timeout(&addr, timeout).is_ok())
    }

    /// Connects from inside the namespace and reads what the server says; an error if the
    /// connection is refused, dropped (no answer within `timeout`) or says nothing.
    pub fn fetch(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
        self.run(move || {
            let mut conn = TcpStream::connect_timeout(&addr, timeout)?;
            conn.set_read_timeout(Some(timeout))?;
            let mut out = String::new();
            conn.read_to_string(&mut out)?;
            Ok(out)
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A TCP server started by [`Netns::serve`], stopped on Drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    listener: TcpListener,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the blocked accept (it fails with EINVAL), so the thread sees `stop`.
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.listener),
            nix::sys::socket::Shutdown::Read,
        );
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Hosts on one Ethernet segment: each host a namespace with `eth0` in `10.<a>.<b>.0/24`, all
/// linked by veth to a bridge in a namespace of its own. Host `i` (0-based, in the order
/// given) has address `.i+1`.
pub struct Lan {
    tag: String,
    subnet: [u8; 3],
    names: Vec<String>,
    // Hosts before the bridge: dropped first.
    hosts: Vec<Netns>,
    _bridge: Netns,
    root_link: Option<String>,
}

impl Lan {
    /// A LAN of `names` under a random short tag (namespace `<tag>-<name>`) and subnet.
    pub fn new(names: &[&str]) -> Lan {
        let tag = format!("vk{:04x}", fastrand::u16(..));
        let subnet = [10, fastrand::u8(200..250), fastrand::u8(1..255)];
        let bridge = Netns::new(&format!("{tag}-br"));
        bridge.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
        bridge.exec(&["ip", "link", "set", "br0", "up"]);
        let mut hosts = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let ns = Netns::new(&format!("{tag}-{name}"));
            let port = format!("p{i}");
            run_ok(
                "ip",
                &[
                    "link",
                    "add",
                    "eth0",
                    "netns",
                    ns.name(),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &port,
                    "netns",
                    bridge.name(),
                ],
            );
            bridge.exec(&["ip", "link", "set", &port, "master", "br0", "up"]);
            let addr = format!("{}.{}.{}.{}/24", subnet[0], subnet[1], subnet[2], i + 1);
            ns.exec(&["ip", "addr", "add", &addr, "dev", "eth0"]);
            ns.exec(&["ip", "link", "set", "eth0", "up"]);
            hosts.push(ns);
        }
        Lan {
            tag,
            subnet,
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            hosts,
            _bridge: bridge,
            root_link: None,
        }
    }

    /// The address of host `name`.
    pub fn addr(&self, name: &str) -> Ipv4Addr {
        let i = self.index(name);
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], i as u8 + 1)
    }

    pub fn ns(&self, name: &str) -> &Netns {
        &self.hosts[self.index(name)]
    }

    /// Links the test's own (root) namespace to the LAN at `.254` and returns that address,
    /// e.g. for an etcd the hosts reach. The link goes with the bridge namespace.
    pub fn join_root(&mut self) -> Ipv4Addr {
        let link = format!("{}-r", self.tag);
        run_ok(
            "ip",
            &[
                "link",
                "add",
                &link,
                "type",
                "veth",
                "peer",
                "name",
                "root",
                "netns",
                self._bridge.name(),
            ],
        );
        self._bridge
            .exec(&["ip", "link", "set", "root", "master", "br0", "up"]);
        let ip = Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], 254);
        run_ok("ip", &["addr", "add", &format!("{ip}/24"), "dev", &link]);
        run_ok("ip", &["link", "set", &link, "up"]);
        self.root_link = Some(link);
        ip
    }

    fn index(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no host {name} in this LAN"))
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        if let Some(link) = self.root_link.take() {
            let _ = Command::new("ip").args(["link", "del", &link]).output();
        }
    }
}
