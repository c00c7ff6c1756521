//! `locknet`: the nftables host firewall that admits only the cluster.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use locknet::policy::{self, Options, Policy};
use locknet::watch::WatchConfig;
use locknet::{Outcome, nft, render};
use runtime::etcd::parse_duration;
use runtime::output::{self, Format};
use runtime::{EtcdArgs, Failure, OutputArgs};
use serde_json::json;
use tracing::{info, warn};

/// viking's host firewall: only the cluster's hosts may talk to this one (plus SSH, and HTTP
/// on the router). Only its own table (inet locknet) is ever touched.
#[derive(Debug, Parser)]
#[command(name = "locknet", version, after_help = AFTER_HELP)]
struct Cli {
    /// Member host addresses (IPv4 or IPv6)
    #[arg(value_name = "ADDR")]
    members: Vec<String>,

    /// Read member addresses from a file (white-space separated, # comments)
    #[arg(long, env = "VIKING_HOSTS_FILE", value_name = "FILE")]
    hosts_file: Option<String>,

    /// Follow the members under /viking/hosts/ in etcd
    #[arg(long, env = "VIKING_WATCH")]
    watch: bool,

    /// With --watch: this host, whose status (members, drops) goes to firewall/<host> every 5 s
    #[command(flatten)]
    host: runtime::HostArgs,

    /// This is the router: also open 80 and 443 to everyone
    #[arg(long, env = "VIKING_ROUTER")]
    router: bool,

    /// Open a port to everyone: PORT or PORT/tcp or PORT/udp (repeatable)
    #[arg(
        long = "allow-port",
        env = "VIKING_ALLOW_PORT",
        value_delimiter = ',',
        value_name = "PORT[/PROTO]"
    )]
    allow_port: Vec<String>,

    /// Filter only these interfaces (repeatable; default: all but lo and Docker bridges). Each
    /// must exist (a name ending in `*` must match one) unless --iface-may-appear
    #[arg(
        long = "iface",
        env = "VIKING_IFACE",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    iface: Vec<String>,

    /// An --iface that does not exist yet will come later: warn instead of refusing
    #[arg(long, env = "VIKING_IFACE_MAY_APPEAR")]
    iface_may_appear: bool,

    /// Do not keep SSH (22) open; refused unless --i-have-console is given too
    #[arg(long, env = "VIKING_NO_SSH")]
    no_ssh: bool,

    /// Confirms that losing SSH cannot lock you out (you have a console)
    #[arg(long, env = "VIKING_I_HAVE_CONSOLE")]
    i_have_console: bool,

    /// Print the ruleset and change nothing
    #[arg(long, env = "VIKING_DRY_RUN")]
    dry_run: bool,

    /// Show what is applied now
    #[arg(long, env = "VIKING_STATUS", conflicts_with_all = ["dry_run", "flush", "watch"])]
    status: bool,

    /// Remove locknet's table (and nothing else)
    #[arg(long, env = "VIKING_FLUSH", conflicts_with_all = ["dry_run", "watch"])]
    flush: bool,

    /// With --watch: how long etcd may take to answer after a change before it is rolled back
    /// (0s: no time at all, so every change is rolled back; for trying the roll-back)
    #[arg(long, env = "VIKING_CHECK_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    check_timeout: Duration,

    /// With --watch: how often the kernel's table is compared with what was applied, and
    /// applied again if it was flushed or changed
    #[arg(long, env = "VIKING_RESYNC", default_value = "30s", value_parser = parse_duration)]
    resync: Duration,

    #[command(flatten)]
    output: OutputArgs,

    #[command(flatten)]
    etcd: EtcdArgs,
}

const AFTER_HELP: &str = "Exit status: 0 applied (or nothing to do); 1 nft or etcd failed, the \
previous rules still hold; 2 bad usage, nothing changed; 130 a second SIGTERM/SIGINT.";

fn main() -> ExitCode {
    runtime::process::man_page::<Cli>();
    let cli = Cli::parse();
    runtime::process::main("locknet", "info", run(cli))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let json = cli.output.output == Format::Json;
    if cli.status {
        return status(json);
    }
    if cli.flush {
        let removed = nft::flush()?;
        let what = if removed {
            "removed"
        } else {
            "no table to remove:"
        };
        info!("{what} table inet {}", render::TABLE);
        if json {
            print!("{}", output::json(&json!({ "removed": removed })));
        }
        return Ok(());
    }
    if cli.no_ssh && !cli.i_have_console {
        return Err(Failure::usage(
            "--no-ssh closes SSH (22) to everyone who is not a member, which can lock you out; \
             add --i-have-console if you have another way in",
        ));
    }
    let options = options(&cli)?;
    let absent = policy::check_ifaces(&options.ifaces, cli.iface_may_appear)?;
    if !absent.is_empty() {
        warn!(absent = ?absent, "--iface names no interface yet: nothing is filtered on it until it appears");
    }
    let members = members(&cli)?;
    if cli.watch {
        return watch(cli, members, options).await;
    }
    if members.is_empty() {
        return Err(Failure::usage(
            "no members: give the cluster hosts' addresses (locknet 10.0.0.1 10.0.0.2 ...), \
             --hosts-file FILE, or --watch to follow etcd",
        ));
    }
    let policy = Policy::new(members, &options);
    if cli.dry_run {
        let ruleset = render::render(&policy);
        if json {
            print!("{}", output::json(&json!({ "ruleset": ruleset })));
        } else {
            print!("{ruleset}");
        }
        return Ok(());
    }
    let outcome = locknet::apply(&policy)?;
    let what = match outcome {
        Outcome::Unchanged => "unchanged".to_owned(),
        Outcome::Members { added, removed } => format!("members updated (+{added} -{removed})"),
        Outcome::Replaced => "ruleset applied".to_owned(),
    };
    let open: Vec<String> = policy.open.iter().map(ToString::to_string).collect();
    info!(members = policy.members.len(), open = ?open, "{what}");
    if json {
        let (added, removed) = match outcome {
            Outcome::Members { added, removed } => (added, removed),
            _ => (0, 0),
        };
        let report = json!({
            "outcome": match outcome {
                Outcome::Unchanged => "unchanged",
                Outcome::Members { .. } => "members",
                Outcome::Replaced => "replaced",
            },
            "added": added,
            "removed": removed,
            "members": policy.members.len(),
            "open": open,
        });
        print!("{}", output::json(&report));
    }
    Ok(())
}

/// `--status`: what the kernel has now.
fn status(json: bool) -> Result<(), Failure> {
    let applied = nft::read()?;
    if json {
        let report = match &applied {
            Some(a) => json!({
                "active": true,
                "table": format!("inet {}", render::TABLE),
                "members": a.members.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "rules": a.rules,
                "drop_comment": a.drop_comment,
                "dropped_packets": a.dropped_packets,
                "dropped_bytes": a.dropped_bytes,
            }),
            None => json!({ "active": false, "table": format!("inet {}", render::TABLE) }),
        };
        print!("{}", output::json(&report));
        return Ok(());
    }
    let Some(a) = applied else {
        println!("locknet: not active (no table inet {})", render::TABLE);
        return Ok(());
    };
    println!("locknet: active (table inet {})", render::TABLE);
    let members: Vec<String> = a.members.iter().map(ToString::to_string).collect();
    println!("members: {} ({})", members.len(), members.join(", "));
    println!("rules: {} ({})", a.rules, a.drop_comment);
    println!(
        "dropped: {} packets, {} bytes since the table was applied",
        a.dropped_packets, a.dropped_bytes
    );
    Ok(())
}

/// The members given on the command line and in `--hosts-file`.
fn members(cli: &Cli) -> Result<BTreeSet<std::net::IpAddr>, Failure> {
    let mut members =
        policy::parse_members(cli.members.iter().map(String::as_str), "the command line")?;
    if let Some(path) = &cli.hosts_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::usage(format!("cannot read --hosts-file {path}: {e}")))?;
        members.extend(policy::parse_hosts_file(&text, path)?);
    }
    Ok(members)
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

async fn watch(
    cli: Cli,
    static_members: BTreeSet<std::net::IpAddr>,
    options: Options,
) -> Result<(), Failure> {
    if cli.dry_run {
        return Err(Failure::usage(
            "--dry-run prints one ruleset; it does not combine with --watch",
        ));
    }
    if cli.resync.is_zero() {
        return Err(Failure::usage("--resync must be longer than 0s (e.g. 30s)"));
    }
    let shutdown = runtime::shutdown::on_signals();
    let client = cli.etcd.connect_daemon(&shutdown).await?;
    info!(etcd = %cli.etcd.endpoints_display(), "following the cluster's hosts");
    let config = WatchConfig {
        prefix: cli.etcd.prefix.clone(),
        static_members,
        options,
        check_timeout: cli.check_timeout,
        iface_may_appear: cli.iface_may_appear,
        resync: cli.resync,
        host: Some(cli.host.id()?),
    };
    locknet::watch::run(config, client, shutdown).await;
    info!("stopped; the rules stay in place (locknet --flush removes them)");
    Ok(())
}
