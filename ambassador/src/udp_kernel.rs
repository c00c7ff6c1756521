//! `--udp-kernel`: UDP service ports balanced by the kernel as a socket sends
//! ([`sockmap::balance`]). A datagram a process of the chosen cgroup sends to a service's
//! ambassador address (`<bind>:<port>`) leaves for one of the service's backends instead,
//! and the backend's answer is seen as coming from the ambassador address: no hop through
//! this process, no session of its own. What user space keeps is the list: each UDP
//! service's backends and who may send to it, written into the kernel's map on every change
//! of the routes and of the access table.
//!
//! Who is balanced, by the sender's network namespace: with `--links enforced`, this host's
//! own (operators, host daemons: the link check accepts them anyway) and each container's
//! whose links allow the service (the registrator publishes the namespace's cookie in the
//! container's record; the access table has it). Any other container's datagrams still reach
//! the ambassador's socket and its check (`crate::udp`). With `--links open`, every process
//! in the cgroup.
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

/// The balancer and what it was last given, by ambassador port and senders.
pub struct KernelUdp {
    balancer: Balancer,
    /// This process's network namespace: the host's own processes.
    own_netns: u64,
    bind: Ipv4Addr,
    pub cgroup: PathBuf,
    installed: Mutex<BTreeMap<(u16, Senders), Installed>>,
}

/// One entry of the kernel's map as this process wrote it.
#[derive(Debug, PartialEq, Eq)]
struct Installed {
    backends: Vec<SocketAddrV4>,
    /// Its sends already added to the service's counter.
    counted: u64,
}

/// Entries the maps hold at most: a UDP service port for each sender namespace that may
/// reach it.
const ENTRIES: u32 = 65_536;

impl KernelUdp {
    /// Attaches to `cgroup`; `None` (with one warning saying why) when the kernel refuses,
    /// and the socket path serves every datagram.
    pub fn start(cgroup: &Path, bind: IpAddr) -> Option<Self> {
        let IpAddr::V4(bind) = bind else {
            warn!(
                %bind,
                "--udp-kernel needs an IPv4 --bind address; UDP goes through this process"
            );
            return None;
        };
        let own_netns = match sockmap::balance::own_netns_cookie() {
            Ok(cookie) => cookie,
            Err(e) => {
                warn!(
                    "--udp-kernel unavailable, UDP goes through this process: cannot read this network namespace's cookie: {e} (needs Linux 5.14 or later)"
                );
                return None;
            }
        };
        match Balancer::attach(cgroup, ENTRIES) {
            Ok(balancer) => {
                info!(
                    cgroup = %cgroup.display(),
                    "UDP service ports balanced by the kernel as sockets send"
                );
                Some(KernelUdp {
                    balancer,
                    own_netns,
                    bind,
                    cgroup: cgroup.to_owned(),
                    installed: Mutex::default(),
                })
            }
            Err(why) => {
                warn!(
                    "--udp-kernel unavailable, UDP goes through this process: {why} (needs \
                     CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN, Linux 5.14 or later, and a \
                     cgroup v2 directory)"
                );
                None
            }
        }
    }

    /// Writes into the kernel's map, for each UDP service, its backends as the socket path
    /// would choose among them (healthy ones, this host's first with `--prefer-local`; IPv4
    /// only) under every sender that may reach it: this host's own namespace, and each
    /// container's namespace its links allow (`--links enforced`), or any namespace (`open`).
    /// Only what changed is written; what is no longer wanted is taken out, and its datagrams
    /// reach this process's socket (and its link check) again. Reads the current routes and
    /// access table, so calls from either's change leave the latest of both.
    pub fn sync(&self, shared: &crate::Shared) {
        let mut installed = self.installed.lock().expect("kernel UDP lock");
        let (routes, access) = (shared.routes(), shared.access());
        let config = &shared.config;
        let local = config.prefer_local.then_some(config.host.as_str());
        let namespaces = access.namespaces();
        let now = Instant::now();
        let mut wanted: BTreeMap<(u16, Senders), Vec<SocketAddrV4>> = BTreeMap::new();
        for (port, service) in &routes.udp_by_port {
            let addrs = kernel_backends(service, local, now);
            if addrs.is_empty() {
                continue;
            }
            let senders: Vec<Senders> = match config.links {
                crate::access::LinksMode::Open => vec![Senders::Any],
                crate::access::LinksMode::Enforced => {
                    let id = &service.service_port.service;
                    std::iter::once(self.own_netns)
                        .chain(
                            namespaces
                                .iter()
                                .filter(|(_, allowed)| allowed.contains(id))
                                .map(|(netns, _)| *netns),
                        )
                        .map(Senders::Namespace)
                        .collect()
                }
            };
            for s in senders {
                wanted.insert((*port, s), addrs.clone());
            }
        }
        installed.retain(|(port, senders), entry| {
            if wanted.contains_key(&(*port, *senders)) {
                return true;
            }
            // Its last sends, counted before the entry (and its count) goes.
            if let Some(service) = routes.udp_by_port.get(port) {
                self.count_entry(*port, *senders, entry, &service.stats);
            }
            if let Err(e) = self.balancer.remove(self.service(*port), *senders) {
                warn!(
                    port,
                    "--udp-kernel: cannot take a service out of the kernel's map: {e}"
                );
            }
            false
        });
        for (key, addrs) in wanted {
            let counted = match installed.get(&key) {
                Some(entry) if entry.backends == addrs => continue,
                Some(entry) => entry.counted,
                None => 0,
            };
            match self.balancer.set(self.service(key.0), key.1, &addrs) {
                Ok(()) => {
                    let backends = addrs;
                    installed.insert(key, Installed { backends, counted });
                }
                Err(e) => {
                    warn!(
                        port = key.0,
                        "--udp-kernel: cannot write a service into the kernel's map: {e}"
                    );
                }
            }
        }
    }

    fn service(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.bind, port)
    }

    /// Adds the sends the kernel counted since the last call to each UDP service's
    /// `udp_kernel_sends` (for `/metrics`).
    pub fn count(&self, routes: &crate::routes::Routes) {
        let mut installed = self.installed.lock().expect("kernel UDP lock");
        for ((port, senders), entry) in installed.iter_mut() {
            if let Some(service) = routes.udp_by_port.get(port) {
                self.count_entry(*port, *senders, entry, &service.stats);
            }
        }
    }

    fn count_entry(
        &self,
        port: u16,
        senders: Senders,
        entry: &mut Installed,
        stats: &crate::metrics::ServiceCounters,
    ) {
        if let Ok(sent) = self.balancer.sent(self.service(port), senders) {
            stats
                .udp_kernel_sends
                .inc_by(sent.saturating_sub(entry.counted));
            entry.counted = sent.max(entry.counted);
        }
    }

    /// For `/state`: the service on `port` as the kernel has it: (sends balanced, summed over
    /// its senders; backends; sender namespaces), or `None` when it is not in the map.
    pub fn service_state(&self, port: u16) -> Option<(u64, usize, usize)> {
        let installed = self.installed.lock().expect("kernel UDP lock");
        let mut found = None;
        for ((p, senders), entry) in installed.range((port, Senders::Namespace(0))..) {
            if *p != port {
                break;
            }
            let sends = self
                .balancer
                .sent(self.service(port), *senders)
                .unwrap_or(0);
            let (total, _, n) = found.unwrap_or((0, 0, 0));
            found = Some((total + sends, entry.backends.len(), n + 1));
        }
        found
    }
}

/// A service's backends for the kernel: the pool the socket path picks from (healthy ones,
/// this host's first when `local`), IPv4 only, in a stable order.
fn kernel_backends(
    service: &crate::routes::Service,
    local: Option<&str>,
    now: Instant,
) -> Vec<SocketAddrV4> {
    let healthy: Vec<_> = service
        .backends
        .iter()
        .filter(|b| !b.is_ejected(now))
        .collect();
    let pool: Vec<_> = match local {
        Some(host) if healthy.iter().any(|b| b.host == host) => {
            healthy.into_iter().filter(|b| b.host == host).collect()
        }
        _ if healthy.is_empty() => service.backends.iter().collect(),
        _ => healthy,
    };
    let mut addrs: Vec<SocketAddrV4> = pool
        .iter()
        .filter_map(|b| match b.addr {
            SocketAddr::V4(a) => Some(a),
            SocketAddr::V6(_) => None,
        })
        .collect();
    addrs.sort();
    addrs
}
