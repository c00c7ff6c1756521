//! `ambassador`: the per-host TCP proxy daemon.
//!
//! SIGTERM or SIGINT: stop accepting, let open connections finish for `--grace`, then close
//! the rest and log how many; a second signal exits at once.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use ambassador::{Config, RelayConfig, Shared};
use clap::Parser;
use runtime::EtcdArgs;
use runtime::etcd::parse_duration;
use tracing::{error, info};

/// viking's per-host TCP proxy: one cluster-wide port per linked service port.
#[derive(Debug, Parser)]
#[command(name = "ambassador", version)]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,

    /// This host's id (default: the hostname, lower-cased)
    #[arg(long, env = "VIKING_HOST")]
    host: Option<String>,

    /// Address the service listeners bind (default: the docker0 bridge address)
    #[arg(long, env = "VIKING_BIND")]
    bind: Option<IpAddr>,

    /// Admin server: /metrics, /healthz, /state
    #[arg(long, env = "VIKING_ADMIN", default_value = "127.0.0.1:9100")]
    admin: SocketAddr,

    /// Time limit for connecting to a backend
    #[arg(long, env = "VIKING_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    connect_timeout: Duration,

    /// Close connections idle for this long
    #[arg(long, env = "VIKING_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    idle_timeout: Duration,

    /// Time open connections get to finish after SIGTERM
    #[arg(long, env = "VIKING_GRACE", default_value = "30s", value_parser = parse_duration)]
    grace: Duration,

    /// Prefer backends on this host while one is healthy
    #[arg(long, env = "VIKING_PREFER_LOCAL")]
    prefer_local: bool,

    /// Most connections open at once, in all
    #[arg(long, env = "VIKING_MAX_CONNECTIONS", default_value_t = 65_536)]
    max_connections: usize,

    /// Most connections open at once per listener
    #[arg(
        long,
        env = "VIKING_MAX_CONNECTIONS_PER_LISTENER",
        default_value_t = 16_384
    )]
    max_connections_per_listener: usize,

    /// Threads that accept and relay connections (default: one per core). Each has its own
    /// listening socket per port and keeps the connections it accepts; new connections go to
    /// as few threads as carry the load, the first alone while it has room
    #[arg(long, env = "VIKING_THREADS")]
    threads: Option<usize>,

    /// TCP congestion control for hops that stay on this host (clients, and backends on
    /// this host), or `default` for the host's own (net.ipv4.tcp_congestion_control). A
    /// pacing one (BBR) slows a hop that has no queue to protect
    #[arg(long, env = "VIKING_LOCAL_CONGESTION", default_value = ambassador::server::DEFAULT_LOCAL_CONGESTION)]
    local_congestion: String,

    /// Pipe size for splice, bytes
    #[arg(long, env = "VIKING_PIPE_SIZE", default_value_t = RelayConfig::default().pipe_size)]
    pipe_size: usize,

    /// Service DNS: ADDR:PORT for UDP and TCP, or `off` (default: <bind>:53)
    #[arg(long, env = "VIKING_DNS")]
    dns: Option<String>,

    /// The zone DNS answers for
    #[arg(long, env = "VIKING_DNS_ZONE", default_value = ambassador::dns::DEFAULT_ZONE)]
    dns_zone: String,

    /// TTL of DNS answers
    #[arg(long, env = "VIKING_DNS_TTL", default_value = "5s", value_parser = parse_duration)]
    dns_ttl: Duration,

    /// Bytes a direction copies in back-to-back full buffers (bulk) before it switches to
    /// splice (0: splice at once)
    #[arg(long, env = "VIKING_SPLICE_AFTER", default_value_t = 65_536)]
    splice_after: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    runtime::telemetry::init("info");
    let host = match runtime::host::host_id(cli.host.as_deref()) {
        Ok(h) => h.to_string(),
        Err(e) => {
            eprintln!("ambassador: {e}");
            return ExitCode::from(2);
        }
    };
    let bind = match cli
        .bind
        .or_else(|| runtime::host::interface_addr("docker0"))
    {
        Some(b) => b,
        None => {
            eprintln!(
                "ambassador: no --bind given and interface docker0 has no IPv4 address; \
                 pass --bind with the address containers reach this host on (e.g. --bind 172.17.0.1)"
            );
            return ExitCode::from(2);
        }
    };
    let local_congestion =
        (cli.local_congestion != "default").then(|| cli.local_congestion.clone());
    if let Some(name) = &local_congestion {
        if let Err(e) = ambassador::server::check_congestion(name) {
            let offered =
                std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
                    .unwrap_or_default();
            eprintln!(
                "ambassador: --local-congestion {name}: the kernel does not offer it ({e}); \
                 offered here: {}; pass one of those, or `default` for the host's own",
                offered.trim()
            );
            return ExitCode::from(2);
        }
    }
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    if threads == 0 {
        eprintln!(
            "ambassador: --threads 0: at least one thread must accept connections; pass --threads 1 or more"
        );
        return ExitCode::from(2);
    }
    // Every thread runs the single-threaded scheduler, which has no cross-thread queues to
    // pay for; this one also follows etcd and serves the admin port (server::Workers).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ambassador: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let shutdown = runtime::shutdown::on_signals();
        let client = match cli.etcd.connect_daemon(&shutdown).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ambassador: {e}");
                return ExitCode::from(2);
            }
        };
        let admin = match tokio::net::TcpListener::bind(cli.admin).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("ambassador: cannot listen on --admin {}: {e}; pick another address", cli.admin);
                return ExitCode::from(1);
            }
        };
        let mut config = Config::new(cli.etcd.prefix.clone(), host, bind);
        config.prefer_local = cli.prefer_local;
        config.connect_timeout = cli.connect_timeout;
        config.grace = cli.grace;
        config.max_connections = cli.max_connections;
        config.max_connections_per_listener = cli.max_connections_per_listener;
        config.threads = threads;
        config.local_congestion = local_congestion;
        config.relay = RelayConfig {
            idle_timeout: cli.idle_timeout,
            splice_after: cli.splice_after,
            pipe_size: cli.pipe_size,
            ..RelayConfig::default()
        };
        let dns_listen = match ambassador::dns::settings(cli.dns.as_deref(), &cli.dns_zone, cli.dns_ttl, bind) {
            Ok(Some((listen, settings))) => {
                config.dns = Some(settings);
                Some(listen)
            }
            Ok(None) => None,
            Err(e) => {
                eprintln!("ambassador: {e}");
                return ExitCode::from(2);
            }
        };
        let shared = Shared::new(config);
        if let Some(listen) = dns_listen {
            match ambassador::dns::serve(shared.zone(), listen, shutdown.clone()).await {
                Ok(_) => info!(dns = %listen, zone = %cli.dns_zone, "DNS listening (UDP and TCP)"),
                Err(e) => {
                    eprintln!(
                        "ambassador: cannot serve DNS on {listen}: {e}; pass --dns ADDR:PORT or --dns off"
                    );
                    return ExitCode::from(1);
                }
            }
        }
        info!(admin = %admin.local_addr().unwrap_or(cli.admin), bind = %bind, etcd = %cli.etcd.endpoints_display(), "admin listening on");
        let admin_stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(ambassador::admin::serve(admin, shared.clone(), admin_stop.clone()));
        let report = ambassador::run(shared, client, shutdown).await;
        admin_stop.cancel();
        if report.cut > 0 {
            error!(cut = report.cut, "connections closed at the end of the grace period");
        }
        ExitCode::SUCCESS
    })
}
