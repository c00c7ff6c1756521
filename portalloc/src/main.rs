//! `portalloc`: allocate, look up, release, list and repair ambassador ports by hand.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use portalloc::{Allocator, Fix};
use runtime::output::{self, Format};
use runtime::{EtcdArgs, Failure, OutputArgs, RangeArgs, TxnArgs};
use schema::ServicePort;

/// Cluster-wide ambassador port allocator on etcd.
///
/// Every service port (stack/job:PORT[/tcp|/udp]) that someone links to gets one port, unique in
/// the whole cluster and stable until released.
#[derive(Debug, Parser)]
#[command(name = "portalloc", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,

    #[command(flatten)]
    range: RangeArgs,

    #[command(flatten)]
    txn: TxnArgs,

    #[command(flatten)]
    output: OutputArgs,

    #[command(subcommand)]
    command: Command,
}

const AFTER_HELP: &str =
    "Exit status: 0 done; 1 failed (etcd unreachable, range exhausted, not allocated; the cause \
     is printed); 2 bad usage, nothing written.\n\nExamples:
  portalloc alloc shared/mongo:27017          # prints the port, e.g. 20000
  portalloc alloc shared/dns:53/udp app/web:80
  portalloc get shared/mongo:27017
  portalloc release shared/mongo:27017
  portalloc list --output json
  portalloc repair --dry-run";

#[derive(Debug, Subcommand)]
enum Command {
    /// Allocate (or look up) the port of each service port; prints one port per line
    Alloc {
        #[arg(required = true, value_name = "SERVICE_PORT")]
        service_ports: Vec<ServicePort>,
    },
    /// Print the port of a service port; exit 1 if it has none
    Get {
        #[arg(value_name = "SERVICE_PORT")]
        service_port: ServicePort,
    },
    /// Release the port of a service port; the port is reused before the counter grows
    Release {
        #[arg(value_name = "SERVICE_PORT")]
        service_port: ServicePort,
    },
    /// List every allocation: PORT SERVICE_PORT [inconsistent]; with --output json one
    /// array of {service_port, port, consistent}
    List {
        /// The same as --output json (kept for scripts written before it)
        #[arg(long, hide = true)]
        json: bool,
    },
    /// Find alloc/owner keys that disagree and fix them, printing each fix
    Repair {
        /// Print the fixes without writing them
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    runtime::process::man_page::<Cli>();
    let cli = Cli::parse();
    runtime::process::main("portalloc", "warn", run(cli))
}

/// One service port and its ambassador port, for `--output json`.
#[derive(serde::Serialize)]
struct PortRow<'a> {
    service_port: &'a ServicePort,
    port: Option<u16>,
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let range = cli.range.for_allocation()?;
    let client = cli.etcd.connect_live().await?;
    let allocator = Allocator::new(&client, cli.etcd.prefix.clone(), range)
        .with_max_txn_ops(cli.txn.max_txn_ops)
        .with_retry_for(cli.etcd.timeout.max(Duration::from_secs(1)))
        .with_endpoints_label(cli.etcd.endpoints_display());
    let json = cli.output.output == Format::Json;
    let show = |service_port: &ServicePort, port: Option<u16>| {
        if json {
            print!("{}", output::json(&PortRow { service_port, port }));
        } else if let Some(port) = port {
            println!("{port}");
        }
    };
    match cli.command {
        Command::Alloc { service_ports } => {
            let ports = allocator.allocate_many(&service_ports).await?;
            if json {
                let rows: Vec<PortRow<'_>> = service_ports
                    .iter()
                    .zip(&ports)
                    .map(|(service_port, port)| PortRow {
                        service_port,
                        port: Some(*port),
                    })
                    .collect();
                print!("{}", output::json(&rows));
            } else {
                ports.iter().for_each(|port| println!("{port}"));
            }
        }
        Command::Get { service_port } => {
            let port = allocator.get(&service_port).await?;
            show(&service_port, port);
            if port.is_none() {
                return Err(Failure::failed(format!(
                    "{service_port} has no port; allocate one with `portalloc alloc {service_port}`"
                )));
            }
        }
        Command::Release { service_port } => {
            let port = allocator.release(&service_port).await?;
            show(&service_port, port);
            if port.is_none() {
                eprintln!("portalloc: {service_port} had no port; nothing to release");
            }
        }
        Command::List { json: legacy } => {
            let list = allocator.list().await?;
            if json || legacy {
                print!("{}", output::json(&list));
            } else {
                for a in &list {
                    let note = if a.consistent {
                        ""
                    } else {
                        "  inconsistent: run portalloc repair"
                    };
                    println!("{}\t{}{note}", a.port, a.service_port);
                }
            }
        }
        Command::Repair { dry_run } => {
            let fixes = allocator.repair(dry_run).await?;
            if json {
                let fixes: Vec<String> = fixes.iter().map(ToString::to_string).collect();
                let report = serde_json::json!({ "dry_run": dry_run, "fixes": fixes });
                print!("{}", output::json(&report));
                return Ok(());
            }
            if fixes.is_empty() {
                eprintln!("portalloc: allocation keys are consistent; nothing to repair");
            }
            let unfixable = |f: &&Fix| matches!(f, Fix::Unfixable { .. });
            for fix in fixes.iter().filter(|f| !unfixable(f)) {
                println!("{}{fix}", if dry_run { "would fix: " } else { "fixed: " });
            }
            let left: Vec<&Fix> = fixes.iter().filter(unfixable).collect();
            for fix in &left {
                println!("{fix}");
            }
            if !left.is_empty() {
                return Err(Failure::failed(format!(
                    "{} problem(s) left that repair cannot fix (printed above)",
                    left.len()
                )));
            }
        }
    }
    Ok(())
}
