//! `ambassador`: the per-host TCP proxy daemon.
//!
//! SIGTERM or SIGINT: stop accepting, let open connections finish for `--grace`, then close
//! the rest and log how many; a second signal exits at once. SIGUSR2 (or `ambassador
//! --upgrade` started by hand): a new process takes the listening sockets over and this one
//! drains (docs/operations.md, "Upgrading a host").

use std::process::ExitCode;
use std::time::Duration;

use ambassador::AmbassadorArgs;
use clap::Parser;
use runtime::etcd::parse_duration;
use runtime::handover;
use runtime::{EtcdArgs, Failure, HostArgs, RangeArgs, RunDirArgs};

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

    /// Take over from the ambassador running on this --bind: receive its listening sockets,
    /// read the routes from etcd, then tell it to stop accepting (it drains for its --grace).
    /// If this process fails first, the running one serves on as if nothing happened
    #[arg(long, help_heading = "Upgrade")]
    upgrade: bool,

    /// How long --upgrade waits for etcd's routes before it gives up (exit 1)
    #[arg(long, env = "VIKING_UPGRADE_TIMEOUT", default_value = "30s", value_parser = parse_duration, help_heading = "Upgrade")]
    upgrade_timeout: Duration,
}

fn main() -> ExitCode {
    runtime::process::man_page::<Cli>();
    let cli = Cli::parse();
    runtime::process::main("ambassador", "info", async move {
        let host = cli.host.id()?;
        let checked =
            cli.ambassador
                .check(&cli.etcd.prefix, &host, cli.range.range, cli.run_dir.dir())?;
        let threads = checked.config.threads;
        let socket = handover::socket_path(
            &checked.run_dir,
            &ambassador::lock::name(checked.config.bind),
        );
        let taken = if cli.upgrade {
            let taken = handover::take_async(&socket).await?;
            let theirs = taken.meta["threads"].as_u64().unwrap_or(0);
            if theirs != threads as u64 {
                return Err(Failure::usage(format!(
                    "--threads {threads} differs from the running ambassador's {theirs}: an \
                     upgrade keeps the sockets, one per thread; pass --threads {theirs}, or \
                     restart instead of upgrading"
                )));
            }
            tracing::info!(
                sockets = taken.fds.len(),
                "received the running ambassador's sockets"
            );
            Some(taken)
        } else {
            None
        };
        let shutdown = runtime::shutdown::on_signals();
        let client = cli.etcd.connect_daemon(&shutdown).await?;
        tracing::info!(etcd = %cli.etcd.endpoints_display(), host = %host, "ambassador starting");
        let (taken, inherited) = handover::split(taken);
        let running =
            ambassador::daemon::start_inheriting(checked, client, shutdown.clone(), inherited)
                .await?;
        if let Some(taken) = taken {
            let shared = running.shared.clone();
            let why_not = format!(
                "the routes were not read from etcd ({})",
                cli.etcd.endpoints_display()
            );
            handover::complete(
                taken,
                || serves_every_route(&shared),
                cli.upgrade_timeout,
                &why_not,
            )
            .await?;
        }
        // A hand-over stops this process as SIGTERM does, and says so first (its UDP sessions
        // linger for the replies on their way); a stop refuses upgrades from then on.
        let handing = runtime::CancellationToken::new();
        {
            let (handing, shutdown, shared) =
                (handing.clone(), shutdown.clone(), running.shared.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = handing.cancelled() => {
                        shared.handed_over.store(true, std::sync::atomic::Ordering::Release);
                        shutdown.cancel();
                    }
                    () = shutdown.cancelled() => handing.cancel(),
                }
            });
        }
        let shared = running.shared.clone();
        let offer = handover::serve_upgrades(
            "ambassador",
            &socket,
            std::sync::Arc::new(move || handover::Listing {
                meta: serde_json::json!({ "threads": threads }),
                fds: shared.sockets.listing(),
            }),
            handing,
            cli.upgrade,
        );
        running.wait().await;
        drop(offer);
        Ok(())
    })
}

/// Routes read, and a socket for every service port of them.
fn serves_every_route(shared: &ambassador::Shared) -> bool {
    if !shared.is_synced() {
        return false;
    }
    let routes = shared.routes();
    let (tcp, udp) = (shared.listening(), shared.udp_listening());
    routes.by_port.keys().all(|p| tcp.contains_key(p))
        && routes.udp_by_port.keys().all(|p| udp.contains_key(p))
}
