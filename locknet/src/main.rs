//! `locknet`: the nftables host firewall that admits only the cluster.
//!
//! Exit codes: 0 applied (or nothing to do), 1 nft or etcd failed (the previous rules still
//! hold), 2 bad usage (nothing was changed).

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use locknet::policy::{self, Options, Policy};
use locknet::watch::WatchConfig;
use locknet::{Outcome, nft, render};
use runtime::EtcdArgs;
use runtime::etcd::parse_duration;
use tracing::info;

/// viking's host firewall: only the cluster's hosts may talk to this one (plus SSH, and HTTP
/// on the router). Only its own table (inet locknet) is ever touched.
#[derive(Debug, Parser)]
#[command(name = "locknet", version)]
struct Cli {
    /// Member host addresses (IPv4 or IPv6)
    #[arg(value_name = "ADDR")]
    members: Vec<String>,

    /// Read member addresses from a file (white-space separated, # comments)
    #[arg(long, value_name = "FILE")]
    hosts_file: Option<String>,

    /// Follow the members under /viking/hosts/ in etcd
    #[arg(long)]
    watch: bool,

    /// This is the router: also open 80 and 443 to everyone
    #[arg(long)]
    router: bool,

    /// Open a port to everyone: PORT or PORT/tcp or PORT/udp (repeatable)
    #[arg(long = "allow-port", value_name = "PORT[/PROTO]")]
    allow_port: Vec<String>,

    /// Filter only these interfaces (repeatable; default: all but lo and Docker bridges)
    #[arg(long = "iface", value_name = "NAME")]
    iface: Vec<String>,

    /// Do not keep SSH (22) open; refused unless --i-have-console is given too
    #[arg(long)]
    no_ssh: bool,

    /// Confirms that losing SSH cannot lock you out (you have a console)
    #[arg(long)]
    i_have_console: bool,

    /// Print the ruleset and change nothing
    #[arg(long)]
    dry_run: bool,

    /// Show what is applied now
    #[arg(long, conflicts_with_all = ["dry_run", "flush", "watch"])]
    status: bool,

    /// Remove locknet's table (and nothing else)
    #[arg(long, conflicts_with_all = ["dry_run", "watch"])]
    flush: bool,

    /// With --watch: how long etcd may take to answer after a change before it is rolled back
    /// (0s: no time at all, so every change is rolled back; for trying the roll-back)
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    check_timeout: Duration,

    #[command(flatten)]
    etcd: EtcdArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    runtime::telemetry::init("info");
    let usage = |msg: &str| {
        eprintln!("locknet: {msg}");
        ExitCode::from(2)
    };
    let failed = |msg: &str| {
        eprintln!("locknet: {msg}");
        ExitCode::from(1)
    };
    if cli.status {
        return match nft::read() {
            Ok(Some(a)) => {
                println!("locknet: active (table inet {})", render::TABLE);
                let members: Vec<String> = a.members.iter().map(ToString::to_string).collect();
                println!("members: {} ({})", members.len(), members.join(", "));
                println!("rules: {} ({})", a.rules, a.drop_comment);
                println!(
                    "dropped: {} packets, {} bytes since the table was applied",
                    a.dropped_packets, a.dropped_bytes
                );
                ExitCode::SUCCESS
            }
            Ok(None) => {
                println!("locknet: not active (no table inet {})", render::TABLE);
                ExitCode::SUCCESS
            }
            Err(e) => failed(&e.to_string()),
        };
    }
    if cli.flush {
        return match nft::flush() {
            Ok(true) => {
                info!("removed table inet {}", render::TABLE);
                ExitCode::SUCCESS
            }
            Ok(false) => {
                info!("no table inet {} to remove", render::TABLE);
                ExitCode::SUCCESS
            }
            Err(e) => failed(&e.to_string()),
        };
    }
    if cli.no_ssh && !cli.i_have_console {
        return usage(
            "--no-ssh closes SSH (22) to everyone who is not a member, which can lock you out; \
             add --i-have-console if you have another way in",
        );
    }
    let options = match options(&cli) {
        Ok(o) => o,
        Err(e) => return usage(&e.to_string()),
    };
    let mut members =
        match policy::parse_members(cli.members.iter().map(String::as_str), "the command line") {
            Ok(m) => m,
            Err(e) => return usage(&e.to_string()),
        };
    if let Some(path) = &cli.hosts_file {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => return usage(&format!("cannot read --hosts-file {path}: {e}")),
        };
        match policy::parse_hosts_file(&text, path) {
            Ok(m) => members.extend(m),
            Err(e) => return usage(&e.to_string()),
        }
    }
    if cli.watch {
        return watch(cli, members, options);
    }
    if members.is_empty() {
        return usage(
            "no members: give the cluster hosts' addresses (locknet 10.0.0.1 10.0.0.2 ...), \
             --hosts-file FILE, or --watch to follow etcd",
        );
    }
    let policy = Policy::new(members, &options);
    if cli.dry_run {
        print!("{}", render::render(&policy));
        return ExitCode::SUCCESS;
    }
    match locknet::apply(&policy) {
        Ok(outcome) => {
            let what = match outcome {
                Outcome::Unchanged => "unchanged".to_owned(),
                Outcome::Members { added, removed } => {
                    format!("members updated (+{added} -{removed})")
                }
                Outcome::Replaced => "ruleset applied".to_owned(),
            };
            info!(
                members = policy.members.len(),
                open = ?policy.open.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "{what}"
            );
            ExitCode::SUCCESS
        }
        Err(e) => failed(&e.to_string()),
    }
}

fn options(cli: &Cli) -> Result<Options, policy::PolicyError> {
    Ok(Options {
        router: cli.router,
        no_ssh: cli.no_ssh,
        allow: cli
            .allow_port
            .iter()
            .map(|p| policy::parse_open_port(p))
            .collect::<Result<_, _>>()?,
        ifaces: cli
            .iface
            .iter()
            .map(|i| policy::parse_iface(i))
            .collect::<Result<_, _>>()?,
    })
}

fn watch(cli: Cli, static_members: BTreeSet<std::net::IpAddr>, options: Options) -> ExitCode {
    if cli.dry_run {
        eprintln!("locknet: --dry-run prints one ruleset; it does not combine with --watch");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("locknet: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let shutdown = runtime::shutdown::on_signals();
        let client = match cli.etcd.connect_daemon(&shutdown).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("locknet: {e}");
                return ExitCode::from(2);
            }
        };
        info!(etcd = %cli.etcd.endpoints_display(), "following the cluster's hosts");
        let config = WatchConfig {
            prefix: cli.etcd.prefix.clone(),
            static_members,
            options,
            check_timeout: cli.check_timeout,
        };
        locknet::watch::run(config, client, shutdown).await;
        info!("stopped; the rules stay in place (locknet --flush removes them)");
        ExitCode::SUCCESS
    })
}
