//! `registrator`: this host's running containers become leased endpoint records in etcd.
//!
//! Exit codes: 0 done (or stopped by SIGTERM/SIGINT), 1 a runtime failure of `--once` or
//! `--dry-run`, 2 bad usage.

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use registrator::{Config, Settings};
use runtime::EtcdArgs;
use runtime::etcd::parse_duration;
use tracing::info;

/// viking's registrator: Docker containers become etcd endpoints, with leases and
/// reconciliation.
#[derive(Debug, Parser)]
#[command(name = "registrator", version)]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,

    /// This host's id (default: the hostname, lower-cased)
    #[arg(long, env = "VIKING_HOST")]
    host: Option<String>,

    /// Docker endpoint: unix:///var/run/docker.sock, a socket path, or tcp://host:2375
    /// (default: DOCKER_HOST, else the local socket)
    #[arg(long, env = "VIKING_DOCKER")]
    docker: Option<String>,

    /// Address other hosts reach this one on (default: the address of the interface that
    /// holds the default route)
    #[arg(long, env = "VIKING_ADDR")]
    addr: Option<IpAddr>,

    /// Register containers' own addresses and ports instead of their published ports
    #[arg(long, env = "VIKING_INTERNAL")]
    internal: bool,

    /// Lease time to live: a lost host's endpoints vanish after this long
    #[arg(long, env = "VIKING_TTL", default_value = "10s", value_parser = parse_duration)]
    ttl: Duration,

    /// Full reconciliation period
    #[arg(long, env = "VIKING_RESYNC", default_value = "30s", value_parser = parse_duration)]
    resync: Duration,

    /// Reconcile once and exit
    #[arg(long)]
    once: bool,

    /// Print what one reconciliation would write, write nothing, and exit
    #[arg(long)]
    dry_run: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    runtime::telemetry::init("info");
    let usage = |msg: String| {
        eprintln!("registrator: {msg}");
        ExitCode::from(2)
    };
    let host = match runtime::host::host_id(cli.host.as_deref()) {
        Ok(h) => h,
        Err(e) => return usage(e),
    };
    let Some(addr) = cli.addr.or_else(runtime::host::default_route_addr) else {
        return usage(
            "this host has no default route to take its address from; pass --addr with the \
             address other hosts reach it on (e.g. --addr 10.0.0.5)"
                .to_owned(),
        );
    };
    if cli.ttl < Duration::from_secs(1) {
        return usage(format!(
            "--ttl {:?} is too short: etcd leases count whole seconds; use at least 1s",
            cli.ttl
        ));
    }
    if cli.resync.is_zero() {
        return usage("--resync must be longer than 0s (e.g. 30s)".to_owned());
    }
    let config = Config {
        prefix: cli.etcd.prefix.clone(),
        settings: Settings {
            host,
            addr,
            internal: cli.internal,
        },
        ttl: cli.ttl,
        resync: cli.resync,
        docker: cli.docker.clone(),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("registrator: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        if cli.once || cli.dry_run {
            let client = match cli.etcd.connect_live().await {
                Ok(c) => c,
                Err(e) => return usage(e.to_string()),
            };
            return match registrator::once(&config, &client, cli.dry_run).await {
                Ok(ops) => {
                    for op in &ops {
                        match (cli.dry_run, op) {
                            (true, registrator::sync::Op::Put { key, value, .. }) => {
                                println!("put {key} {value}");
                            }
                            (true, registrator::sync::Op::Delete { key }) => {
                                println!("delete {key}");
                            }
                            (false, op) => info!(key = op.key(), "reconciled"),
                        }
                    }
                    if !cli.dry_run {
                        info!(changes = ops.len(), "reconciled once");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("registrator: {e:#}");
                    ExitCode::from(1)
                }
            };
        }
        let shutdown = runtime::shutdown::on_signals();
        let client = match cli.etcd.connect_daemon(&shutdown).await {
            Ok(c) => c,
            Err(e) => return usage(e.to_string()),
        };
        info!(
            host = %config.settings.host,
            addr = %config.settings.addr,
            etcd = %cli.etcd.endpoints_display(),
            docker = %registrator::docker::describe(config.docker.as_deref()),
            ttl = ?config.ttl,
            "registrator starting"
        );
        registrator::run(config, client, shutdown).await;
        info!("registrator stopped");
        ExitCode::SUCCESS
    })
}
