//! `launcher`: runs what the grid assigned to this host and reports back; one launcher,
//! elected through etcd, is the scheduler.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use launcher::LauncherArgs;
use runtime::etcd::parse_duration;
use runtime::{EtcdArgs, Failure, HostArgs, TxnArgs};
use tracing::info;

/// viking's launcher: the grid's work on this host's Docker.
#[derive(Debug, Parser)]
#[command(name = "launcher", version, after_help = runtime::process::EXIT_STATUS_HELP)]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,

    #[command(flatten)]
    host: HostArgs,

    #[command(flatten)]
    txn: TxnArgs,

    #[command(flatten)]
    launcher: LauncherArgs,

    /// Docker endpoint: unix:///var/run/docker.sock, a socket path, or tcp://host:2375
    /// (default: DOCKER_HOST, else the local socket)
    #[arg(long, env = "VIKING_DOCKER")]
    docker: Option<String>,

    /// Lease time to live: the scheduler counts this host lost this long after it stops
    #[arg(long, env = "VIKING_TTL", default_value = "10s", value_parser = parse_duration)]
    ttl: Duration,

    /// Admin server: /metrics, /healthz, /state
    #[arg(long, env = "VIKING_LAUNCHER_ADMIN", default_value = "127.0.0.1:9101")]
    admin: std::net::SocketAddr,
}

fn main() -> ExitCode {
    runtime::process::man_page::<Cli>();
    let cli = Cli::parse();
    runtime::process::main("launcher", "info", async move {
        let host = cli.host.id()?;
        let config = cli.launcher.check(
            &cli.etcd.prefix,
            &host,
            cli.ttl,
            cli.docker.clone(),
            cli.txn.max_txn_ops,
        )?;
        let admin = tokio::net::TcpListener::bind(cli.admin)
            .await
            .map_err(|e| {
                Failure::usage(format!(
                    "cannot listen on --admin {}: {e}; pick another address",
                    cli.admin
                ))
            })?;
        let shutdown = runtime::shutdown::on_signals();
        let client = cli.etcd.connect_daemon(&shutdown).await?;
        info!(etcd = %cli.etcd.endpoints_display(), admin = %cli.admin, "following the grid");
        tokio::spawn(launcher::daemon::serve_admin(
            admin,
            config.view.clone(),
            shutdown.clone(),
        ));
        launcher::daemon::start(config, client, shutdown)
            .wait()
            .await;
        Ok(())
    })
}
