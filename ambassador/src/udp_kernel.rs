//! `--udp-kernel`: UDP service ports balanced by the kernel as a socket sends
//! ([`sockmap::balance`]). A datagram a process of the chosen cgroup sends to a service's
//! ambassador address (`<bind>:<port>`) leaves for one of the service's backends instead,
//! and the backend's answer is seen as coming from the ambassador address: no hop through
//! this process, no session of its own. What user space keeps is the list: each UDP
//! service's backends, written into the kernel's map on every change of the routes.
//!
//! Who is balanced: with `--links enforced`, only processes of this host's own network
//! namespace (operators, host daemons), which the link check accepts anyway; a container
//! has a namespace of its own, its datagrams reach the ambassador's socket and the check
//! (`crate::udp`). With `--links open`, every process in the cgroup, containers included.
//!
//! What this path does not do, which the socket path does: sessions and their idle timeout
//! and limit, per-datagram byte counts (only sends are counted), and the move of a client
//! whose backend answers "port unreachable" (a connected client gets the error itself; the
//! list changes when the registrator withdraws the backend). The choice among the backends
//! is by socket (its cookie), not by load.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use sockmap::balance::{Balancer, Senders};
use tracing::{info, warn};

use crate::routes::Routes;

/// The balancer and what it was last given, by ambassador port.
pub struct KernelUdp {
    balancer: Balancer,
    senders: Senders,
    bind: Ipv4Addr,
    pub cgroup: PathBuf,
    installed: Mutex<BTreeMap<u16, Vec<SocketAddrV4>>>,
}

/// Services the maps hold at most (UDP service ports of this cluster).
const SERVICES: u32 = 16_384;

impl KernelUdp {
    /// Attaches to `cgroup`; `None` (with one warning saying why) when the kernel refuses,
    /// and the socket path serves every datagram.
    pub fn start(cgroup: &Path, bind: IpAddr, links: crate::access::LinksMode) -> Option<Self> {
        let IpAddr::V4(bind) = bind else {
            warn!(
                %bind,
                "--udp-kernel needs an IPv4 --bind address; UDP goes through this process"
            );
            return None;
        };
        let senders = match links {
            crate::access::LinksMode::Open => Senders::Any,
            crate::access::LinksMode::Enforced => match sockmap::balance::own_netns_cookie() {
                Ok(cookie) => Senders::Namespace(cookie),
                Err(e) => {
                    warn!(
                        "--udp-kernel: cannot read this network namespace's cookie ({e}); UDP goes through this process"
                    );
                    return None;
                }
            },
        };
        match Balancer::attach(cgroup, SERVICES) {
            Ok(balancer) => {
                info!(
                    cgroup = %cgroup.display(),
                    containers = senders == Senders::Any,
                    "UDP service ports balanced by the kernel as sockets send"
                );
                Some(KernelUdp {
                    balancer,
                    senders,
                    bind,
                    cgroup: cgroup.to_owned(),
                    installed: Mutex::default(),
                })
            }
            Err(why) => {
                warn!(
                    "--udp-kernel unavailable, UDP goes through this process: {why} (needs \
                     CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN, Linux 5.8 or later, and a cgroup \
                     v2 directory)"
                );
                None
            }
        }
    }

    /// Writes each UDP service's backends into the kernel's map, as the socket path would
    /// choose among them (healthy ones, this host's first with `local`), IPv4 only; a
    /// service with none, or gone, is taken out (its datagrams reach this process's socket).
    pub fn sync(&self, routes: &Routes, local: Option<&str>) {
        let now = Instant::now();
        let mut installed = self.installed.lock().expect("kernel UDP lock");
        let mut wanted: BTreeMap<u16, Vec<SocketAddrV4>> = BTreeMap::new();
        for (port, service) in &routes.udp_by_port {
            let v4 = |b: &&std::sync::Arc<crate::routes::Backend>| match b.addr {
                SocketAddr::V4(a) => Some(a),
                SocketAddr::V6(_) => None,
            };
            let healthy: Vec<_> = service
                .backends
                .iter()
                .filter(|b| !b.is_ejected(now))
                .collect();
            let pool = match local {
                Some(host) if healthy.iter().any(|b| b.host == host) => {
                    healthy.into_iter().filter(|b| b.host == host).collect()
                }
                _ if healthy.is_empty() => service.backends.iter().collect(),
                _ => healthy,
            };
            let mut addrs: Vec<SocketAddrV4> = pool.iter().filter_map(v4).collect();
            addrs.sort();
            if !addrs.is_empty() {
                wanted.insert(*port, addrs);
            }
        }
        for port in installed.keys().copied().collect::<Vec<_>>() {
            if !wanted.contains_key(&port) {
                if let Err(e) = self.balancer.remove(self.service(port), self.senders) {
                    warn!(
                        port,
                        "--udp-kernel: cannot take a service out of the kernel's map: {e}"
                    );
                }
                installed.remove(&port);
            }
        }
        for (port, addrs) in wanted {
            if installed.get(&port) == Some(&addrs) {
                continue;
            }
            match self.balancer.set(self.service(port), self.senders, &addrs) {
                Ok(()) => {
                    installed.insert(port, addrs);
                }
                Err(e) => warn!(
                    port,
                    "--udp-kernel: cannot write a service into the kernel's map: {e}"
                ),
            }
        }
    }

    fn service(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.bind, port)
    }

    /// Datagrams (and UDP connects) sent to the service on `port` that the kernel balanced.
    pub fn sends(&self, port: u16) -> u64 {
        self.balancer
            .sent(self.service(port), self.senders)
            .unwrap_or(0)
    }
}
