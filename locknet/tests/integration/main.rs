//! locknet against real nftables, in network namespaces the tests create and remove.
//!
//! Topology per test: hosts `a`, `b`, `c` and an outsider `out` on one bridge; a "container"
//! namespace behind a Docker-like bridge and DNAT rule on `a` (`a:8080` -> container `:80`).
//! locknet runs inside `a`.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use testkit::Daemon;
use testkit::net::{Lan, Netns, Server};

mod apply;
mod watch;

/// How long a connection attempt may take before it counts as dropped.
pub const DROPPED_AFTER: Duration = Duration::from_millis(300);

pub struct Site {
    pub lan: Lan,
    pub container: Netns,
    _servers: Vec<Server>,
}

impl Site {
    /// The topology with servers: on `a` at 9999, 22 and 80; in the container at 80 (published
    /// as `a:8080`); on `out` at 7000. Each answers with its own name.
    pub fn start() -> Site {
        let lan = Lan::new(&["a", "b", "c", "out"]);
        let a = lan.ns("a");
        let container = Netns::new(&format!("{}-ctr", a.name()));
        // A Docker-like bridge on a, the container behind it, DNAT and masquerade.
        let [x, y, z, _] = lan.addr("a").octets();
        let ctr_net = format!("10.{}.{}", (x as u16 + y as u16) % 50 + 150, z);
        a.exec(&["ip", "link", "add", "docker0", "type", "bridge"]);
        a.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{ctr_net}.1/24"),
            "dev",
            "docker0",
        ]);
        a.exec(&["ip", "link", "set", "docker0", "up"]);
        a.exec(&[
            "ip",
            "link",
            "add",
            "vethc",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            container.name(),
        ]);
        a.exec(&["ip", "link", "set", "vethc", "master", "docker0", "up"]);
        container.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{ctr_net}.2/24"),
            "dev",
            "eth0",
        ]);
        container.exec(&["ip", "link", "set", "eth0", "up"]);
        container.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &format!("{ctr_net}.1"),
        ]);
        a.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        nft(
            a,
            &format!(
                "table ip testnat {{\n\
                 \tchain pre {{ type nat hook prerouting priority dstnat; tcp dport 8080 dnat to {ctr_net}.2:80; }}\n\
                 \tchain post {{ type nat hook postrouting priority srcnat; oifname \"eth0\" masquerade; }}\n\
                 }}\n"
            ),
        );
        let ctr_ip: Ipv4Addr = format!("{ctr_net}.2").parse().expect("ip");
        let servers = vec![
            a.serve(sock(lan.addr("a"), 9999), "a:9999"),
            a.serve(sock(lan.addr("a"), 22), "a:22"),
            a.serve(sock(lan.addr("a"), 80), "a:80"),
            container.serve(sock(ctr_ip, 80), "container:80"),
            lan.ns("out").serve(sock(lan.addr("out"), 7000), "out:7000"),
        ];
        Site {
            lan,
            container,
            _servers: servers,
        }
    }

    /// `from` connects to `to:port`: `Some(greeting)` or `None` when refused or dropped.
    pub fn reach(&self, from: &str, to: &str, port: u16) -> Option<String> {
        let ns = if from == "container" {
            &self.container
        } else {
            self.lan.ns(from)
        };
        ns.fetch(sock(self.lan.addr(to), port), DROPPED_AFTER).ok()
    }

    /// Runs `locknet <args>` inside `a`.
    pub fn locknet(&self, args: &[&str]) -> Output {
        self.lan
            .ns("a")
            .command(env!("CARGO_BIN_EXE_locknet"))
            .args(args)
            .env("VIKING_LOG_FORMAT", "plain")
            .output()
            .expect("run locknet")
    }

    /// The members as arguments.
    fn addrs(&self, names: &[&str]) -> Vec<String> {
        names.iter().map(|n| self.lan.addr(n).to_string()).collect()
    }

    /// `locknet <addresses of names> <extra>` inside `a`.
    pub fn members(&self, names: &[&str], extra: &[&str]) -> Output {
        let addrs = self.addrs(names);
        let mut args: Vec<&str> = addrs.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        self.locknet(&args)
    }

    /// The same, which must succeed; returns its output.
    pub fn admit(&self, names: &[&str], extra: &[&str]) -> String {
        let out = self.members(names, extra);
        assert!(
            out.status.success(),
            "locknet {names:?} {extra:?} failed: {out:?}"
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `nft -s list table <family> <name>` inside `a` (empty if there is no such table).
    pub fn table(&self, family: &str, name: &str) -> String {
        let out = self
            .lan
            .ns("a")
            .command("nft")
            .args(["-s", "list", "table", family, name])
            .output()
            .expect("nft");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls until `from` can (or cannot) reach `a:port`; returns how long it took.
    pub fn until_reach(&self, from: &str, port: u16, can: bool, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if self.reach(from, "a", port).is_some() == can {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{from} -> a:{port} still {} after {limit:?}",
                if can { "blocked" } else { "open" }
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// Applies an nft script inside `ns`.
pub fn nft(ns: &Netns, script: &str) {
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("write");
    assert!(
        child.wait().expect("nft").success(),
        "nft -f failed:\n{script}"
    );
}

/// `locknet --watch <args>` inside `a`, killed on Drop.
pub fn spawn_watch(site: &Site, args: &[&str]) -> Daemon {
    let mut command = site.lan.ns("a").command(env!("CARGO_BIN_EXE_locknet"));
    command.arg("--watch").args(args);
    Daemon::spawn_command("locknet --watch", command)
}
