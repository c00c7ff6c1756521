//! `registrator`: this host's running containers become leased endpoint records in etcd.

use std::process::ExitCode;

use clap::Parser;
use registrator::RegistratorArgs;
use registrator::sync::Op;
use runtime::{EtcdArgs, Failure, HostArgs};
use tracing::info;

/// viking's registrator: Docker containers become etcd endpoints, with leases and
/// reconciliation.
#[derive(Debug, Parser)]
#[command(name = "registrator", version, after_help = runtime::process::EXIT_STATUS_HELP)]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,

    #[command(flatten)]
    host: HostArgs,

    #[command(flatten)]
    registrator: RegistratorArgs,

    /// Reconcile once and exit
    #[arg(long, env = "VIKING_ONCE")]
    once: bool,

    /// Print what one reconciliation would write, write nothing, and exit
    #[arg(long, env = "VIKING_DRY_RUN")]
    dry_run: bool,
}

fn main() -> ExitCode {
    runtime::process::man_page::<Cli>();
    let cli = Cli::parse();
    runtime::process::main("registrator", "info", async move {
        let host = cli.host.id()?;
        let config = cli.registrator.check(&cli.etcd.prefix, &host)?;
        if cli.once || cli.dry_run {
            return once(&cli, &config).await;
        }
        let shutdown = runtime::shutdown::on_signals();
        let client = cli.etcd.connect_daemon(&shutdown).await?;
        info!(etcd = %cli.etcd.endpoints_display(), "following Docker");
        registrator::daemon::start(config, client, shutdown)
            .wait()
            .await;
        Ok(())
    })
}

/// `--once` and `--dry-run`: one reconciliation, its operations logged or printed.
async fn once(cli: &Cli, config: &registrator::Config) -> Result<(), Failure> {
    let client = cli.etcd.connect_live().await?;
    let ops = registrator::once(config, &client, cli.dry_run).await?;
    for op in &ops {
        match (cli.dry_run, op) {
            (true, Op::Put { key, value, .. }) => println!("put {key} {value}"),
            (true, Op::Delete { key }) => println!("delete {key}"),
            (false, op) => info!(key = op.key(), "reconciled"),
        }
    }
    if !cli.dry_run {
        info!(changes = ops.len(), "reconciled once");
    }
    Ok(())
}
