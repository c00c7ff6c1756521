//! The ambassador's settings as the library takes them ([`crate::daemon`] builds them from
//! the flags), and the congestion-control check.

use std::net::IpAddr;
use std::time::Duration;

use schema::{PortRange, Prefix};

use crate::relay::RelayConfig;

/// Settings of one ambassador.
#[derive(Debug, Clone)]
pub struct Config {
    pub prefix: Prefix,
    /// This host's id, for the same-host preference.
    pub host: String,
    /// Address every listener binds (the Docker bridge gateway in production).
    pub bind: IpAddr,
    /// Prefer backends on this host while one is healthy.
    pub prefer_local: bool,
    pub connect_timeout: Duration,
    /// Backends tried per connection before the client is closed.
    pub connect_attempts: usize,
    pub relay: RelayConfig,
    /// How long open connections may finish after SIGTERM.
    pub grace: Duration,
    pub max_connections: usize,
    pub max_connections_per_listener: usize,
    /// Threads that accept and relay connections, each with its own listening socket per
    /// port (SO_REUSEPORT) and its own single-threaded runtime: the calling runtime is the
    /// first of them.
    pub threads: usize,
    /// TCP congestion control for the hops that stay on this host: every client (containers
    /// here reach the ambassador over the bridge) and backends on this host. `None`: the
    /// host's default. See [`DEFAULT_LOCAL_CONGESTION`].
    pub local_congestion: Option<String>,
    /// Service DNS, built from the same watches as the routes; `None`: no DNS.
    pub dns: Option<crate::dns::DnsSettings>,
    /// Ambassador ports outside it are not served (a stray value in etcd).
    pub range: PortRange,
    /// A UDP session idle this long ends.
    pub udp_idle_timeout: Duration,
    /// The most UDP sessions at once, in all.
    pub max_udp_sessions: usize,
    /// Link-scoped access (`--links`).
    pub links: crate::access::LinksMode,
    /// How long a connection from an address not known yet waits for the registrator to
    /// publish it before it is refused.
    pub unknown_source_wait: Duration,
    /// Forward in the kernel once a backend is connected (`--kernel-forward`).
    pub kernel_forward: KernelForward,
    /// UDP service ports balanced by the kernel for the processes of this cgroup (v2)
    /// directory (`--udp-kernel`); `None`: every datagram through this process.
    pub udp_kernel: Option<std::path::PathBuf>,
    /// Joined connections whose peers are in this cgroup (v2) directory forward in the
    /// peers' own sends (`--kernel-senders`); `None`: through the kernel path's worker.
    pub kernel_senders: Option<std::path::PathBuf>,
}

/// `--kernel-forward`: whether connected pairs are forwarded inside the kernel (a sockhash
/// and an eBPF verdict program, see `crate::kernel`) or relayed in user space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelForward {
    /// In the kernel when it accepts the map and the program (else in user space, said once
    /// in the log), per connection in user space when a pair cannot be joined.
    On,
    /// Always in user space: copies, and splice for bulk.
    Off,
}

impl Config {
    pub fn new(prefix: Prefix, host: String, bind: IpAddr) -> Self {
        Self {
            prefix,
            host,
            bind,
            prefer_local: false,
            connect_timeout: Duration::from_secs(1),
            connect_attempts: 3,
            relay: RelayConfig::default(),
            grace: Duration::from_secs(30),
            max_connections: 65_536,
            max_connections_per_listener: 16_384,
            threads: 1,
            local_congestion: None,
            dns: None,
            range: PortRange::DEFAULT,
            udp_idle_timeout: Duration::from_secs(60),
            max_udp_sessions: 65_536,
            links: crate::access::LinksMode::Enforced,
            unknown_source_wait: Duration::from_secs(1),
            kernel_forward: KernelForward::On,
            udp_kernel: None,
            kernel_senders: None,
        }
    }
}

/// Congestion control for hops on this host. A pacing one such as BBR (a common host
/// default) spaces out segments by timer on a veth or loopback hop that has no queue to
/// protect; measured on loopback with BBR as the default, the proxy's bulk stream went from
/// 0.63-0.75 of direct to 0.90-0.94 with its sending hop on cubic, which does not pace.
pub const DEFAULT_LOCAL_CONGESTION: &str = "cubic";

/// Checks that the kernel offers `name` as a congestion control for this process.
pub fn check_congestion(name: &str) -> std::io::Result<()> {
    let socket = std::net::TcpListener::bind("127.0.0.1:0")?;
    socket2::SockRef::from(&socket).set_tcp_congestion(name.as_bytes())
}
