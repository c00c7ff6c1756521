//! `portalloc`: allocate, look up, release, list and repair ambassador ports by hand.
//!
//! Exit status: 0 on success, 1 when the work failed (etcd unreachable, range exhausted, not
//! allocated), 2 for bad input (nothing is written then).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use portalloc::{AllocError, Allocator, PortRange};
use runtime::EtcdArgs;
use schema::ServicePort;

/// Cluster-wide ambassador port allocator on etcd.
///
/// Every service port (stack/job:PORT[/tcp|/udp]) that someone links to gets one port, unique in
/// the whole cluster and stable until released.
#[derive(Debug, Parser)]
#[command(name = "portalloc", version, after_help = EXAMPLES)]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,

    /// Ports handed out, FIRST-LAST (keep below the ephemeral range 32768-60999)
    #[arg(
        long,
        env = "VIKING_PORT_RANGE",
        default_value = "20000-29999",
        global = true
    )]
    range: PortRange,

    /// etcd's --max-txn-ops; raise it with the server's to write big batches in one transaction
    #[arg(long, env = "VIKING_ETCD_MAX_TXN_OPS", default_value_t = portalloc::ETCD_DEFAULT_MAX_TXN_OPS, global = true)]
    max_txn_ops: usize,

    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "Examples:
  portalloc alloc shared/mongo:27017          # prints the port, e.g. 20000
  portalloc alloc shared/dns:53/udp app/web:80
  portalloc get shared/mongo:27017
  portalloc release shared/mongo:27017
  portalloc list --json
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
    /// List every allocation: PORT SERVICE_PORT [inconsistent]
    List {
        /// One JSON array of {service_port, port, consistent}
        #[arg(long)]
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
    let cli = Cli::parse();
    runtime::telemetry::init("warn");
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portalloc: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("portalloc: {e:#}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, AllocError> {
    let client = cli.etcd.connect_live().await?;
    let allocator = Allocator::new(&client, cli.etcd.prefix.clone(), cli.range)
        .with_max_txn_ops(cli.max_txn_ops)
        .with_retry_for(cli.etcd.timeout.max(Duration::from_secs(1)))
        .with_endpoints_label(cli.etcd.endpoints_display());
    match cli.command {
        Command::Alloc { service_ports } => {
            let ports = allocator.allocate_many(&service_ports).await?;
            for port in ports {
                println!("{port}");
            }
        }
        Command::Get { service_port } => match allocator.get(&service_port).await? {
            Some(port) => println!("{port}"),
            None => {
                eprintln!(
                    "portalloc: {service_port} has no port; allocate one with `portalloc alloc {service_port}`"
                );
                return Ok(ExitCode::from(1));
            }
        },
        Command::Release { service_port } => match allocator.release(&service_port).await? {
            Some(port) => println!("{port}"),
            None => eprintln!("portalloc: {service_port} had no port; nothing to release"),
        },
        Command::List { json } => {
            let list = allocator.list().await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).expect("allocations serialize")
                );
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
            if fixes.is_empty() {
                eprintln!("portalloc: allocation keys are consistent; nothing to repair");
            }
            for fix in &fixes {
                println!("{}{fix}", if dry_run { "would fix: " } else { "fixed: " });
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
