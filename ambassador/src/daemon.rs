//! The ambassador as a daemon: its flags (each with a `VIKING_*` env twin), their checks, and
//! the one start-up that the `ambassador` binary and `viking up` both call, so a default, a
//! check or a message lives in one place.
//!
//! [`AmbassadorArgs::check`] needs no etcd and binds nothing, so a caller can check every
//! flag before it starts anything; [`start`] binds the admin and DNS ports and spawns the
//! proxy. Every error is a [`StartError`]: refused before anything was served, exit 2.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use runtime::etcd::parse_duration;
use runtime::{CancellationToken, process};
use schema::{HostId, PortRange, Prefix};
use tracing::{Instrument, error, info, warn};

use crate::config::{Config, DEFAULT_LOCAL_CONGESTION, check_congestion};
use crate::relay::RelayConfig;
use crate::server::{Shared, ShutdownReport};

/// The ambassador's flags (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Ambassador")]
pub struct AmbassadorArgs {
    /// Address the service listeners bind (default: the docker0 bridge address)
    #[arg(long, env = "VIKING_BIND")]
    pub bind: Option<IpAddr>,

    /// Admin server: /metrics, /healthz, /state
    #[arg(long, env = "VIKING_ADMIN", default_value = "127.0.0.1:9100")]
    pub admin: SocketAddr,

    /// Time limit for connecting to a backend
    #[arg(long, env = "VIKING_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Close connections idle for this long
    #[arg(long, env = "VIKING_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Time open connections get to finish after SIGTERM
    #[arg(long, env = "VIKING_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub grace: Duration,

    /// Prefer backends on this host while one is healthy
    #[arg(long, env = "VIKING_PREFER_LOCAL")]
    pub prefer_local: bool,

    /// Most connections open at once, in all
    #[arg(long, env = "VIKING_MAX_CONNECTIONS", default_value_t = 65_536)]
    pub max_connections: usize,

    /// Most connections open at once per listener
    #[arg(
        long,
        env = "VIKING_MAX_CONNECTIONS_PER_LISTENER",
        default_value_t = 16_384
    )]
    pub max_connections_per_listener: usize,

    /// Threads that accept and relay connections (default: one per core). Each has its own
    /// listening socket per port and keeps the connections it accepts; new connections go to
    /// as few threads as carry the load, the first alone while it has room
    #[arg(long, env = "VIKING_THREADS")]
    pub threads: Option<usize>,

    /// TCP congestion control for hops that stay on this host (clients, and backends on
    /// this host), or `default` for the host's own (net.ipv4.tcp_congestion_control). A
    /// pacing one (BBR) slows a hop that has no queue to protect
    #[arg(long, env = "VIKING_LOCAL_CONGESTION", default_value = DEFAULT_LOCAL_CONGESTION)]
    pub local_congestion: String,

    /// Pipe size for splice, bytes
    #[arg(long, env = "VIKING_PIPE_SIZE", default_value_t = RelayConfig::default().pipe_size)]
    pub pipe_size: usize,

    /// Bytes a direction copies in back-to-back full buffers (bulk) before it switches to
    /// splice (0: splice at once)
    #[arg(long, env = "VIKING_SPLICE_AFTER", default_value_t = RelayConfig::default().splice_after)]
    pub splice_after: u64,

    /// End a UDP session (a client address and its backend) idle for this long
    #[arg(long, env = "VIKING_UDP_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub udp_idle_timeout: Duration,

    /// Most UDP sessions at once, in all; datagrams of new clients beyond it are dropped
    #[arg(long, env = "VIKING_MAX_UDP_SESSIONS", default_value_t = 65_536)]
    pub max_udp_sessions: usize,

    /// Link-scoped access: `enforced` accepts a connection from a container of this host only
    /// to a service its job links to (or its `viking.links` label names); `open` accepts all
    #[arg(long, env = "VIKING_LINKS", value_enum, default_value = "enforced")]
    pub links: crate::access::LinksMode,

    /// How long a connection from an address not known yet (a container that just started)
    /// waits for the registrator to publish it before it is refused
    #[arg(long, env = "VIKING_UNKNOWN_SOURCE_WAIT", default_value = "1s", value_parser = parse_duration)]
    pub unknown_source_wait: Duration,

    /// Forward the bytes of a connected pair inside the kernel (a sockhash with an eBPF verdict
    /// program), so this process is not woken per message; `off` relays in user space. When
    /// the kernel refuses the map or the program, the log says why and user space relays
    #[arg(long, env = "VIKING_KERNEL_FORWARD", value_enum, default_value = "on")]
    pub kernel_forward: crate::config::KernelForward,

    /// Reads a connection relays in user space (request/response sized, no bulk) before the
    /// kernel takes it; 0: at once. Short connections and bulk streams stay in user space,
    /// where they cost less
    #[arg(long, env = "VIKING_KERNEL_FORWARD_AFTER", default_value_t = RelayConfig::default().kernel_after)]
    pub kernel_forward_after: u32,

    /// UDP service ports balanced by the kernel as a socket sends (cgroup eBPF programs), so
    /// datagrams go straight to a backend: `host` for every process of this host (the cgroup
    /// v2 root), a cgroup v2 directory for the processes in it, or `off`. With `--links
    /// enforced` containers still go through this process and its link check
    #[arg(long, env = "VIKING_UDP_KERNEL", default_value = "off")]
    pub udp_kernel: String,

    /// With the kernel path on: when a joined connection's client and backend both run on
    /// this host, each of them forwards in its own send, straight into this process's socket
    /// towards the other (cgroup sockops and sk_msg programs), instead of through a kernel
    /// worker: `host` for every process of this host (the cgroup v2 root), a cgroup v2
    /// directory for the processes in it, or `off`. Their sockets then read through the
    /// kernel's sockmap code, where a blocking read can fail with EAGAIN (docs/contract.md):
    /// for clients that read on non-blocking sockets
    #[arg(long, env = "VIKING_KERNEL_SENDERS", default_value = "off")]
    pub kernel_senders: String,

    /// Service DNS: ADDR:PORT for UDP and TCP, or `off` (default: <bind>:53)
    #[arg(long, env = "VIKING_DNS")]
    pub dns: Option<String>,

    /// The zone DNS answers for
    #[arg(long, env = "VIKING_DNS_ZONE", default_value = crate::dns::DEFAULT_ZONE)]
    pub dns_zone: String,

    /// TTL of DNS answers
    #[arg(long, env = "VIKING_DNS_TTL", default_value = "5s", value_parser = parse_duration)]
    pub dns_ttl: Duration,
}

/// Why the ambassador did not start. Each is refused before anything is served: exit 2.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "no --bind given and interface docker0 has no IPv4 address; pass --bind with the \
         address containers reach this host on (e.g. --bind 172.17.0.1)"
    )]
    NoBind,
    #[error(
        "--local-congestion {name}: the kernel does not offer it ({error}); offered here: \
         {offered}; pass one of those, or `default` for the host's own"
    )]
    Congestion {
        name: String,
        error: std::io::Error,
        offered: String,
    },
    #[error("--threads 0: at least one thread must accept connections; pass --threads 1 or more")]
    NoThreads,
    /// A bad `--udp-kernel` or `--kernel-senders`; the text names the value and what to pass.
    #[error("{0}")]
    Cgroup(String),
    /// A bad `--dns` or `--dns-zone`; the text names the flag and the expected form.
    #[error("{0}")]
    Dns(String),
    #[error("cannot listen on --admin {addr}: {error}; pick another address")]
    Admin {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot serve DNS on {addr}: {error}; pass --dns ADDR:PORT or --dns off")]
    DnsListen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error(
        "{holder} already serves --bind {bind} (lock {}); two ambassadors on one address would \
         share each other's ports and send connections to the wrong cluster: stop that one, or \
         pass another --bind",
        path.display()
    )]
    BindTaken {
        bind: IpAddr,
        holder: String,
        path: PathBuf,
    },
    #[error("cannot use --run-dir {}: {error}; pass --run-dir with a directory this user may write", dir.display())]
    RunDir { dir: PathBuf, error: std::io::Error },
}

impl runtime::Fatal for StartError {
    fn exit_code(&self) -> u8 {
        process::USAGE
    }
}

/// Flags that passed their checks, ready for [`start`].
#[derive(Debug, Clone)]
pub struct Checked {
    pub config: Config,
    pub admin: SocketAddr,
    pub run_dir: PathBuf,
    /// Where DNS listens; `None`: `--dns off`.
    pub dns: Option<SocketAddr>,
}

impl AmbassadorArgs {
    /// Checks every flag and builds the settings; binds nothing and needs no etcd. `range` and
    /// `run_dir` are `--range` and `--run-dir` ([`runtime::RangeArgs`], [`runtime::RunDirArgs`],
    /// which `viking` takes for all its commands).
    pub fn check(
        &self,
        prefix: &Prefix,
        host: &HostId,
        range: PortRange,
        run_dir: PathBuf,
    ) -> Result<Checked, StartError> {
        let bind = self
            .bind
            .or_else(|| runtime::host::interface_addr("docker0"))
            .ok_or(StartError::NoBind)?;
        let local_congestion =
            (self.local_congestion != "default").then(|| self.local_congestion.clone());
        if let Some(name) = &local_congestion {
            check_congestion(name).map_err(|error| StartError::Congestion {
                name: name.clone(),
                error,
                offered: offered_congestion(),
            })?;
        }
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
        if threads == 0 {
            return Err(StartError::NoThreads);
        }
        let mut config = Config::new(prefix.clone(), host.to_string(), bind);
        config.prefer_local = self.prefer_local;
        config.connect_timeout = self.connect_timeout;
        config.grace = self.grace;
        config.max_connections = self.max_connections;
        config.max_connections_per_listener = self.max_connections_per_listener;
        config.threads = threads;
        config.local_congestion = local_congestion;
        config.range = range;
        config.udp_idle_timeout = self.udp_idle_timeout;
        config.max_udp_sessions = self.max_udp_sessions;
        config.links = self.links;
        config.unknown_source_wait = self.unknown_source_wait;
        config.kernel_forward = self.kernel_forward;
        config.udp_kernel =
            cgroup_flag("--udp-kernel", &self.udp_kernel).map_err(StartError::Cgroup)?;
        config.kernel_senders =
            cgroup_flag("--kernel-senders", &self.kernel_senders).map_err(StartError::Cgroup)?;
        if config.kernel_senders.is_some()
            && self.kernel_forward == crate::config::KernelForward::Off
        {
            return Err(StartError::Cgroup(format!(
                "--kernel-senders {}: it forwards connections the kernel path takes, and \
                 --kernel-forward is off; pass --kernel-forward on or --kernel-senders off",
                self.kernel_senders
            )));
        }
        config.relay = RelayConfig {
            idle_timeout: self.idle_timeout,
            splice_after: self.splice_after,
            pipe_size: self.pipe_size,
            kernel_after: self.kernel_forward_after,
            ..RelayConfig::default()
        };
        let dns = crate::dns::settings(self.dns.as_deref(), &self.dns_zone, self.dns_ttl, bind)
            .map_err(StartError::Dns)?;
        let listen = dns.as_ref().map(|(listen, _)| *listen);
        config.dns = dns.map(|(_, settings)| settings);
        Ok(Checked {
            config,
            admin: self.admin,
            run_dir,
            dns: listen,
        })
    }
}

/// `--udp-kernel` and `--kernel-senders` (`flag`): `off`, `host` (the cgroup v2 root), or
/// a cgroup v2 directory.
fn cgroup_flag(flag: &str, value: &str) -> Result<Option<PathBuf>, String> {
    match value {
        "off" => Ok(None),
        "host" => sockmap::balance::cgroup2_mount().map(Some).ok_or_else(|| {
            format!(
                "{flag} host: this host has no cgroup v2 hierarchy mounted (none in \
                 /proc/self/mounts); mount one, or pass {flag} off"
            )
        }),
        path => {
            let path = PathBuf::from(path);
            if path.join("cgroup.procs").is_file() {
                Ok(Some(path))
            } else {
                Err(format!(
                    "{flag} {value:?}: not a cgroup directory (it has no cgroup.procs); \
                     pass host, a directory of the cgroup v2 hierarchy, or off"
                ))
            }
        }
    }
}

/// What the kernel offers, for the error that names a congestion control it does not.
fn offered_congestion() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "(cannot read net.ipv4.tcp_available_congestion_control)".into())
}

/// Raises the soft limit of open files to the hard one (as most servers do: the soft default
/// of 1024 is for programs that do not expect many), and warns when `--max-connections` does
/// not fit: each connection holds two descriptors, a client's and a backend's.
/// With the kernel path on, a joined connection holds a third: its epoll instance.
fn raise_nofile(max_connections: usize, kernel_forward: crate::config::KernelForward) {
    let Some(limit) = runtime::process::raise_nofile() else {
        return;
    };
    let per_connection = match kernel_forward {
        crate::config::KernelForward::On => 3,
        crate::config::KernelForward::Off => 2,
    };
    let needed = (max_connections as u64)
        .saturating_mul(per_connection)
        .saturating_add(256);
    if needed > limit {
        warn!(
            limit,
            max_connections,
            "--max-connections {max_connections} needs about {needed} file descriptors and this \
             process may open {limit}: raise its nofile limit (LimitNOFILE= in the systemd unit) \
             or lower --max-connections; connects that find none are retried and counted as \
             ambassador_local_connect_errors, never blamed on a backend"
        );
    }
}

/// A started ambassador.
pub struct Running {
    pub shared: Arc<Shared>,
    /// The admin server's address (the port the kernel chose for `:0`).
    pub admin: SocketAddr,
    task: tokio::task::JoinHandle<ShutdownReport>,
    admin_stop: CancellationToken,
    /// Keeps a second ambassador off the bind address until this one has drained.
    _lock: crate::lock::BindLock,
}

/// Takes the bind address's lock, binds the admin (and DNS) ports, then runs the proxy until
/// `shutdown`. `client` may point at an etcd that is down: routes come when it answers. Tasks
/// run in the caller's span.
pub async fn start(
    checked: Checked,
    client: Client,
    shutdown: CancellationToken,
) -> Result<Running, StartError> {
    start_inheriting(checked, client, shutdown, BTreeMap::new()).await
}

/// [`start`] for a process that takes over from a running ambassador (`--upgrade`):
/// `inherited` are the sockets it handed over (`crate::handover`), used instead of binding.
/// The service ports are served on them once the routes are read from etcd; DNS and the admin
/// server start then too, so a successor that never syncs answers nothing.
pub async fn start_inheriting(
    checked: Checked,
    client: Client,
    shutdown: CancellationToken,
    inherited: BTreeMap<String, OwnedFd>,
) -> Result<Running, StartError> {
    let sockets = runtime::handover::Sockets::inheriting(inherited);
    let upgrading = sockets.is_inheriting();
    let lock = crate::lock::take_from(
        &checked.run_dir,
        checked.config.bind,
        checked.admin,
        sockets.inherit("lock").map(std::fs::File::from),
    )?;
    sockets.offer("lock".to_owned(), lock.file());
    raise_nofile(
        checked.config.max_connections,
        checked.config.kernel_forward,
    );
    let admin_listener = match sockets.inherit("admin") {
        Some(fd) => {
            let listener = std::net::TcpListener::from(fd);
            listener
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(listener))
        }
        None => tokio::net::TcpListener::bind(checked.admin).await,
    }
    .map_err(|error| StartError::Admin {
        addr: checked.admin,
        error,
    })?;
    sockets.offer("admin".to_owned(), &admin_listener);
    let admin = admin_listener.local_addr().unwrap_or(checked.admin);
    let zone = checked
        .config
        .dns
        .as_ref()
        .map(|s| s.zone.to_string())
        .unwrap_or_default();
    let bind = checked.config.bind;
    let shared = Shared::inheriting(checked.config, sockets);
    let span = tracing::Span::current();
    let admin_stop = CancellationToken::new();
    let front = {
        let (shared, shutdown, admin_stop) = (shared.clone(), shutdown.clone(), admin_stop.clone());
        async move {
            if upgrading {
                // Until the routes are read, the predecessor answers.
                while !shared.is_synced() {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(20)) => {}
                        () = shutdown.cancelled() => return Ok(()),
                    }
                }
            }
            if let Some(addr) = checked.dns {
                crate::dns::serve(shared.zone(), addr, shutdown.clone(), &shared.sockets)
                    .await
                    .map_err(|error| StartError::DnsListen { addr, error })?;
                info!(dns = %addr, zone = %zone, "DNS listening (UDP and TCP)");
            }
            info!(admin = %admin, bind = %bind, "admin listening on");
            tokio::spawn(
                crate::admin::serve(admin_listener, shared.clone(), admin_stop)
                    .instrument(tracing::Span::current()),
            );
            Ok::<(), StartError>(())
        }
        .instrument(span.clone())
    };
    if upgrading {
        tokio::spawn(async move {
            if let Err(e) = front.await {
                error!("{e}");
            }
        });
    } else {
        front.await?;
    }
    let task = tokio::spawn(crate::server::run(shared.clone(), client, shutdown).instrument(span));
    Ok(Running {
        shared,
        admin,
        task,
        admin_stop,
        _lock: lock,
    })
}

impl Running {
    /// Waits until the proxy has drained after `shutdown`, then stops the admin server; says
    /// how many connections the grace period cut.
    pub async fn wait(self) -> ShutdownReport {
        let report = self.task.await.unwrap_or_default();
        self.admin_stop.cancel();
        if report.cut > 0 {
            error!(
                cut = report.cut,
                "connections closed at the end of the grace period"
            );
        }
        report
    }
}
