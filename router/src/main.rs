//! `router`: HTTP and HTTPS from the internet to web jobs, by domain.
//!
//! SIGTERM or SIGINT: stop accepting, let open requests finish for `--grace`, then close the
//! rest and log how many; a second signal exits at once. SIGUSR2 (or `router --upgrade`
//! started by hand): a new process takes the listening sockets over and this one drains
//! (docs/operations.md, "Upgrading a host").

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use router::RouterArgs;
use runtime::etcd::parse_duration;
use runtime::handover;
use runtime::{EtcdArgs, RunDirArgs};

/// jemalloc: every request allocates and frees many small blocks (hyper's header maps and
/// buffers, the task of a connection); glibc's malloc spent 9% of the router's CPU on them.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// viking's router: requests for each job's domains to its live instances.
#[derive(Debug, Parser)]
#[command(name = "router", version, after_help = runtime::process::EXIT_STATUS_HELP)]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,

    #[command(flatten)]
    run_dir: RunDirArgs,

    #[command(flatten)]
    router: RouterArgs,

    /// Take over from the router running with these listeners: receive its listening
    /// sockets, read routes and certificates from etcd, then tell it to stop accepting (it
    /// drains for its --grace). If this process fails first, the running one serves on
    #[arg(long, help_heading = "Upgrade")]
    upgrade: bool,

    /// How long --upgrade waits for etcd's routes before it gives up (exit 1)
    #[arg(long, env = "VIKING_UPGRADE_TIMEOUT", default_value = "30s", value_parser = parse_duration, help_heading = "Upgrade")]
    upgrade_timeout: Duration,
}

fn main() -> ExitCode {
    runtime::process::man_page::<Cli>();
    let cli = Cli::parse();
    let threads = cli.router.thread_count();
    runtime::process::main_on("router", "info", threads, async move {
        let checked = cli.router.check()?;
        let socket = handover::socket_path(&cli.run_dir.dir(), &checked.name());
        let taken = if cli.upgrade {
            let taken = handover::take_async(&socket).await?;
            tracing::info!(
                sockets = taken.fds.len(),
                "received the running router's sockets"
            );
            Some(taken)
        } else {
            None
        };
        let shutdown = runtime::shutdown::on_signals();
        let client = cli.etcd.connect_daemon(&shutdown).await?;
        tracing::info!(etcd = %cli.etcd.endpoints_display(), "router starting");
        let (taken, inherited) = handover::split(taken);
        let running = router::daemon::start_inheriting(
            checked,
            cli.etcd.prefix.clone(),
            client,
            shutdown.clone(),
            inherited,
        )
        .await?;
        if let Some(taken) = taken {
            let state = running.state.clone();
            let why_not = format!(
                "the routes were not read from etcd ({})",
                cli.etcd.endpoints_display()
            );
            handover::complete(taken, || state.is_synced(), cli.upgrade_timeout, &why_not).await?;
        }
        let sockets = running.sockets();
        let offer = handover::serve_upgrades(
            "router",
            &socket,
            std::sync::Arc::new(move || handover::Listing {
                meta: serde_json::json!({}),
                fds: sockets.listing(),
            }),
            shutdown.clone(),
            cli.upgrade,
        );
        running.wait().await;
        drop(offer);
        Ok(())
    })
}
