//! `ambassador`: the per-host TCP proxy daemon.
//!
//! SIGTERM or SIGINT: stop accepting, let open connections finish for `--grace`, then close
//! the rest and log how many; a second signal exits at once.

use std::process::ExitCode;

use ambassador::AmbassadorArgs;
use clap::Parser;
use runtime::{EtcdArgs, HostArgs, RangeArgs, RunDirArgs};

/// viking's per-host TCP proxy: one cluster-wide port per linked service port.
#[derive(Debug, Parser)]
#[command(name = "ambassador", version, after_help = runtime::process::EXIT_STATUS_HELP)]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,

    #[command(flatten)]
    host: HostArgs,

    #[command(flatten)]
    range: RangeArgs,

    #[command(flatten)]
    run_dir: RunDirArgs,

    #[command(flatten)]
    ambassador: AmbassadorArgs,
}

fn main() -> ExitCode {
    runtime::process::man_page::<Cli>();
    let cli = Cli::parse();
    runtime::process::main("ambassador", "info", async move {
        let host = cli.host.id()?;
        let checked =
            cli.ambassador
                .check(&cli.etcd.prefix, &host, cli.range.range, cli.run_dir.dir())?;
        let shutdown = runtime::shutdown::on_signals();
        let client = cli.etcd.connect_daemon(&shutdown).await?;
        tracing::info!(etcd = %cli.etcd.endpoints_display(), host = %host, "ambassador starting");
        ambassador::daemon::start(checked, client, shutdown)
            .await?
            .wait()
            .await;
        Ok(())
    })
}
