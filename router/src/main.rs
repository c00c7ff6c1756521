//! `router`: HTTP and HTTPS from the internet to web jobs, by domain.
//!
//! SIGTERM or SIGINT: stop accepting, let open requests finish for `--grace`, then close the
//! rest and log how many; a second signal exits at once.

use std::process::ExitCode;

use clap::Parser;
use router::RouterArgs;
use runtime::EtcdArgs;

/// viking's router: requests for each job's domains to its live instances.
#[derive(Debug, Parser)]
#[command(name = "router", version, after_help = runtime::process::EXIT_STATUS_HELP)]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,

    #[command(flatten)]
    router: RouterArgs,
}

fn main() -> ExitCode {
    runtime::process::man_page::<Cli>();
    let cli = Cli::parse();
    let threads = cli.router.thread_count();
    runtime::process::main_on("router", "info", threads, async move {
        let checked = cli.router.check()?;
        let shutdown = runtime::shutdown::on_signals();
        let client = cli.etcd.connect_daemon(&shutdown).await?;
        tracing::info!(etcd = %cli.etcd.endpoints_display(), "router starting");
        router::daemon::start(checked, cli.etcd.prefix.clone(), client, shutdown)
            .await?
            .wait()
            .await;
        Ok(())
    })
}
