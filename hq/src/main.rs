//! `viking`: the HQ command.
//!
//! Exit status: 0 done, 1 the cluster refused or etcd failed, 2 bad input (nothing written).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use hq::compile::{DEFAULT_AMBASSADOR_ADDR, JobSpec};
use hq::store::{HqError, Store};
use hq::{folder, launch, stackfile::StackFile};
use portalloc::{Allocator, PortRange};
use runtime::EtcdArgs;
use schema::records::HostRecord;
use schema::{HostId, ServiceId, StackName};

/// viking HQ: deploy stacks, inspect them, manage cluster membership.
#[derive(Debug, Parser)]
#[command(name = "viking", version, after_help = EXAMPLES)]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,

    /// Address containers reach the ambassador on (the Docker bridge gateway)
    #[arg(long, env = "VIKING_AMBASSADOR_ADDR", default_value = DEFAULT_AMBASSADOR_ADDR, global = true)]
    ambassador_addr: String,

    /// Ambassador ports handed out, FIRST-LAST
    #[arg(
        long,
        env = "VIKING_PORT_RANGE",
        default_value = "20000-29999",
        global = true
    )]
    range: PortRange,

    /// Output format of listings
    #[arg(long, value_enum, default_value = "text", global = true)]
    output: Output,

    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "Examples:
  viking deploy ./shared ./app             # two stacks, linked, in one transaction
  viking deploy . --name mystack
  viking env app/web --format docker
  viking ps app
  viking graph --dot | dot -Tsvg > links.svg
  viking export app ./deploy && viking apply ./deploy
  viking host add node-1 10.0.0.1 --role router
  viking up                                # etcd, ambassador, registrator on this host
  viking run shared && viking run app      # the stacks' containers on this host
  viking scale shared/web 3; viking logs app/client -f; viking stop app";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EnvFormat {
    /// KEY=VALUE lines
    Env,
    /// -e KEY=VALUE flags for docker run
    Docker,
    /// one JSON object
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Deploy stack files (or directories holding stack.yml) to etcd
    Deploy {
        #[arg(required = true, value_name = "DIR|FILE")]
        paths: Vec<PathBuf>,
        /// Stack name (only with one path); default: the directory's name
        #[arg(long)]
        name: Option<String>,
    },
    /// Write a deployed stack as <DIR>/<stack>/<job>.yaml, to edit by hand
    Export { stack: StackName, dir: PathBuf },
    /// Deploy a folder of <stack>/<job>.yaml files (as written by export)
    Apply { dir: PathBuf },
    /// The env of a job's containers: its own and its links'
    Env {
        #[arg(value_name = "STACK/JOB")]
        service: ServiceId,
        #[arg(long, value_enum, default_value = "env")]
        format: EnvFormat,
    },
    /// List deployed stacks
    Stacks,
    /// Jobs of one stack or all: scale, links, ambassador ports, live endpoints
    Ps { stack: Option<StackName> },
    /// Every allocated ambassador port
    Ports,
    /// The link graph as a tree, or as DOT with --dot
    Graph {
        stack: Option<StackName>,
        #[arg(long)]
        dot: bool,
    },
    /// Remove a stack and release its ports; refused while others link to it
    Rm {
        stack: StackName,
        #[arg(long)]
        force: bool,
    },
    /// Cluster membership (what locknet admits)
    #[command(subcommand)]
    Host(HostCommand),
    /// Start (or converge) a deployed stack's containers on this host's Docker
    Run {
        stack: StackName,
        /// How long to wait for a linked-to job's first live endpoint
        #[arg(long, default_value = "30s", value_parser = runtime::etcd::parse_duration)]
        wait: Duration,
    },
    /// Remove a stack's containers from this host (its config and ports stay)
    Stop { stack: StackName },
    /// Set a job's number of containers, and converge this host's
    Scale {
        #[arg(value_name = "STACK/JOB")]
        service: ServiceId,
        scale: u32,
    },
    /// Print the logs of a job's containers on this host
    Logs {
        #[arg(value_name = "STACK/JOB")]
        service: ServiceId,
        /// Keep printing new lines
        #[arg(short, long)]
        follow: bool,
        /// Lines from the end of each log
        #[arg(long, default_value_t = 100)]
        tail: u32,
    },
    /// The whole suite on this host: a local etcd (unless one answers), the ambassador and the
    /// registrator, in this process; Ctrl-C stops it
    Up {
        /// This host's id (default: the hostname, lower-cased)
        #[arg(long, env = "VIKING_HOST")]
        host: Option<String>,
        /// Where the local etcd keeps its data (default: ~/.local/share/viking)
        #[arg(long, env = "VIKING_DATA")]
        data: Option<PathBuf>,
        /// The ambassador's address (default: docker0's)
        #[arg(long, env = "VIKING_BIND")]
        bind: Option<std::net::IpAddr>,
        /// The ambassador's admin server
        #[arg(long, env = "VIKING_ADMIN", default_value = "127.0.0.1:9100")]
        admin: std::net::SocketAddr,
        /// The address endpoints are registered at (default: the default route's interface)
        #[arg(long, env = "VIKING_ADDR")]
        addr: Option<std::net::IpAddr>,
        /// How long open connections may finish when stopping
        #[arg(long, default_value = "5s", value_parser = runtime::etcd::parse_duration)]
        grace: Duration,
        /// Service DNS: ADDR:PORT, or off (default: the ambassador's address, port 53)
        #[arg(long, env = "VIKING_DNS")]
        dns: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum HostCommand {
    /// Add or update a member
    Add {
        host: HostId,
        addr: std::net::IpAddr,
        /// A role, e.g. router (repeatable)
        #[arg(long = "role")]
        roles: Vec<String>,
    },
    /// Remove a member
    Rm { host: HostId },
    /// List members and their live agents
    Ls,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `viking up` is a daemon and says what it does; the commands speak only when asked.
    runtime::telemetry::init(if matches!(cli.command, Command::Up { .. }) {
        "info"
    } else {
        "warn"
    });
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("viking: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("viking: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect("serializable")
}

/// Reads every path before touching etcd, so bad input writes nothing.
fn read_paths(paths: &[PathBuf], name: Option<&str>) -> Result<Vec<StackFile>, HqError> {
    if name.is_some() && paths.len() > 1 {
        return Err(HqError::Input(
            "--name names one stack; with several paths each stack is named after its directory"
                .into(),
        ));
    }
    paths
        .iter()
        .map(|p| {
            let (_, default) = folder::locate(p)?;
            folder::read_stack(p, name.unwrap_or(&default))
        })
        .collect()
}

async fn run(cli: Cli) -> Result<(), HqError> {
    if let Command::Up {
        host,
        data,
        bind,
        admin,
        addr,
        grace,
        dns,
    } = &cli.command
    {
        let host = runtime::host::host_id(host.as_deref()).map_err(HqError::Input)?;
        let config = hq::up::UpConfig {
            host,
            data: data.clone().unwrap_or_else(hq::up::default_data),
            bind: *bind,
            admin: *admin,
            addr: *addr,
            grace: *grace,
            dns: dns.clone(),
        };
        return hq::up::up(&cli.etcd, config, runtime::shutdown::on_signals()).await;
    }
    // Input first: nothing is read from or written to etcd before it is valid.
    let files = match &cli.command {
        Command::Deploy { paths, name } => Some(read_paths(paths, name.as_deref())?),
        Command::Apply { dir } => Some(folder::read_folder(dir)?),
        _ => None,
    };
    let client = cli.etcd.connect_live().await?;
    let allocator = Allocator::new(&client, cli.etcd.prefix.clone(), cli.range)
        .with_retry_for(cli.etcd.timeout.max(Duration::from_secs(1)))
        .with_endpoints_label(cli.etcd.endpoints_display());
    let store = Store::new(
        &client,
        cli.etcd.prefix.clone(),
        allocator,
        cli.etcd.endpoints_display(),
    );
    let out = cli.output;

    match cli.command {
        Command::Deploy { .. } | Command::Apply { .. } => {
            let files = files.expect("read above");
            let (_, report) = store.deploy(&files, &cli.ambassador_addr).await?;
            if out == Output::Json {
                println!("{}", json(&report));
            } else {
                for s in &report.stacks {
                    let mut parts = Vec::new();
                    for (what, jobs) in [
                        ("created", &s.created),
                        ("updated", &s.updated),
                        ("removed", &s.removed),
                        ("unchanged", &s.unchanged),
                    ] {
                        if !jobs.is_empty() {
                            parts.push(format!("{what} {}", jobs.join(", ")));
                        }
                    }
                    println!("{}: {}", s.stack, parts.join("; "));
                }
            }
        }
        Command::Export { stack, dir } => {
            let jobs = stack_jobs(&store, &stack).await?;
            for path in folder::export(&dir, &stack, &jobs)? {
                println!("{}", path.display());
            }
        }
        Command::Env { service, format } => {
            let jobs = stack_jobs(&store, &service.stack).await?;
            let job = jobs.iter().find(|j| j.job == service.job).ok_or_else(|| {
                HqError::Refused(format!(
                    "stack {} has no job {}",
                    service.stack, service.job
                ))
            })?;
            let env = job.container_env();
            match format {
                EnvFormat::Env => env.iter().for_each(|(k, v)| println!("{k}={v}")),
                EnvFormat::Docker => {
                    let flags: Vec<String> = env
                        .iter()
                        .map(|(k, v)| format!("-e {}", shell_quote(&format!("{k}={v}"))))
                        .collect();
                    println!("{}", flags.join(" "));
                }
                EnvFormat::Json => println!("{}", json(&env)),
            }
        }
        Command::Stacks => {
            let metas = store.stack_metas().await?;
            if out == Output::Json {
                println!("{}", json(&metas));
            } else {
                println!("STACK\tJOBS\tDEPLOYED");
                for m in metas {
                    println!("{}\t{}\t{}", m.name, m.order.join(","), m.deployed_at);
                }
            }
        }
        Command::Ps { stack } => {
            let (stacks, _) = store.load_stacks().await?;
            let mut rows = Vec::new();
            for (name, jobs) in &stacks {
                if stack.as_ref().is_some_and(|s| s != name) {
                    continue;
                }
                let mut jobs: Vec<&JobSpec> = jobs.values().collect();
                jobs.sort_by_key(|j| j.order);
                for job in jobs {
                    let endpoints = store.endpoints(name, &job.job).await?;
                    let live: usize = endpoints.values().map(Vec::len).sum();
                    let ports: Vec<String> = store_ports(&store, job).await?;
                    rows.push(serde_json::json!({
                        "service": format!("{name}/{}", job.job),
                        "image": job.image,
                        "scale": job.scale,
                        "links": job.links.iter().map(|l| l.alias.clone()).collect::<Vec<_>>(),
                        "ambassador_ports": ports,
                        "live_endpoints": live,
                    }));
                }
            }
            if let Some(s) = &stack {
                if !stacks.contains_key(s) {
                    return Err(HqError::Refused(format!(
                        "stack {s} is not deployed; `viking stacks` lists what is"
                    )));
                }
            }
            if out == Output::Json {
                println!("{}", json(&rows));
            } else {
                println!("SERVICE\tIMAGE\tSCALE\tLIVE\tPORTS\tLINKS");
                for r in rows {
                    let list = |v: &serde_json::Value| {
                        v.as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|x| x.as_str())
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
                            .unwrap_or_default()
                    };
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        r["service"].as_str().unwrap_or_default(),
                        r["image"].as_str().unwrap_or_default(),
                        r["scale"],
                        r["live_endpoints"],
                        list(&r["ambassador_ports"]),
                        list(&r["links"]),
                    );
                }
            }
        }
        Command::Ports => {
            let list = store.allocator.list().await?;
            if out == Output::Json {
                println!("{}", json(&list));
            } else {
                for a in list {
                    println!("{}\t{}", a.port, a.service_port);
                }
            }
        }
        Command::Graph { stack, dot } => {
            let (stacks, _) = store.load_stacks().await?;
            let mut edges: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, jobs) in &stacks {
                for job in jobs.values() {
                    let from = format!("{name}/{}", job.job);
                    let to: Vec<String> = job.links.iter().map(|l| l.service.clone()).collect();
                    let keep = stack.as_ref().is_none_or(|s| {
                        s == name || to.iter().any(|t| t.starts_with(&format!("{s}/")))
                    });
                    if keep {
                        edges.insert(from, to);
                    }
                }
            }
            if dot {
                println!("digraph viking {{");
                for (from, tos) in &edges {
                    println!("  \"{from}\";");
                    for to in tos {
                        println!("  \"{from}\" -> \"{to}\";");
                    }
                }
                println!("}}");
            } else if out == Output::Json {
                println!("{}", json(&edges));
            } else {
                for (from, tos) in &edges {
                    println!("{from}");
                    for (i, to) in tos.iter().enumerate() {
                        let branch = if i + 1 == tos.len() {
                            "└──"
                        } else {
                            "├──"
                        };
                        println!("{branch} {to}");
                    }
                }
            }
        }
        Command::Rm { stack, force } => {
            let released = store.remove_stack(&stack, force).await?;
            let ports: Vec<String> = released.iter().map(u16::to_string).collect();
            println!(
                "removed {stack}; released ports: {}",
                if ports.is_empty() {
                    "none".into()
                } else {
                    ports.join(", ")
                }
            );
        }
        Command::Up { .. } => unreachable!("handled above"),
        Command::Run { stack, wait } => {
            let docker = launch::docker().await?;
            for line in launch::run(&docker, &store, &stack, wait).await? {
                println!("{line}");
            }
        }
        Command::Stop { stack } => {
            let docker = launch::docker().await?;
            let removed = launch::stop(&docker, &stack).await?;
            if removed.is_empty() {
                println!("{stack}: no containers on this host");
            }
            for name in removed {
                println!("removed {name}");
            }
        }
        Command::Scale { service, scale } => {
            let before = store.set_scale(&service.stack, &service.job, scale).await?;
            println!("{service}: scale {before} -> {scale}");
            let docker = launch::docker().await?;
            for line in launch::run(&docker, &store, &service.stack, launch::DEFAULT_WAIT).await? {
                if !line.starts_with("unchanged") {
                    println!("{line}");
                }
            }
        }
        Command::Logs {
            service,
            follow,
            tail,
        } => {
            let docker = launch::docker().await?;
            launch::logs(&docker, &service.stack, &service.job, follow, tail).await?;
        }
        Command::Host(HostCommand::Add { host, addr, roles }) => {
            let record = HostRecord {
                v: schema::records::RECORD_VERSION,
                host: host.clone(),
                addr: addr.to_string(),
                roles,
                labels: BTreeMap::new(),
            };
            store.host_add(&record).await?;
            println!("{host} {addr}");
        }
        Command::Host(HostCommand::Rm { host }) => {
            if !store.host_rm(&host).await? {
                return Err(HqError::Refused(format!(
                    "{host} is not a member; `viking host ls` lists them"
                )));
            }
        }
        Command::Host(HostCommand::Ls) => {
            let hosts = store.hosts().await?;
            if out == Output::Json {
                let rows: Vec<_> = hosts
                    .iter()
                    .map(|(h, a)| serde_json::json!({"host": h.host, "addr": h.addr, "roles": h.roles, "alive": a.iter().map(|x| x.agent.clone()).collect::<Vec<_>>()}))
                    .collect();
                println!("{}", json(&rows));
            } else {
                println!("HOST\tADDR\tROLES\tALIVE");
                for (h, a) in hosts {
                    let agents: Vec<&str> = a.iter().map(|x| x.agent.as_str()).collect();
                    println!(
                        "{}\t{}\t{}\t{}",
                        h.host,
                        h.addr,
                        h.roles.join(","),
                        if agents.is_empty() {
                            "-".into()
                        } else {
                            agents.join(",")
                        }
                    );
                }
            }
        }
    }
    Ok(())
}

async fn stack_jobs(store: &Store, stack: &StackName) -> Result<Vec<JobSpec>, HqError> {
    let (stacks, _) = store.load_stacks().await?;
    let mut jobs: Vec<JobSpec> = stacks
        .get(stack)
        .ok_or_else(|| {
            HqError::Refused(format!(
                "stack {stack} is not deployed; `viking stacks` lists what is"
            ))
        })?
        .values()
        .cloned()
        .collect();
    jobs.sort_by_key(|j| j.order);
    Ok(jobs)
}

/// `port/proto=ambassador-port` for each allocated port of a job.
async fn store_ports(store: &Store, job: &JobSpec) -> Result<Vec<String>, HqError> {
    let mut out = Vec::new();
    for p in &job.ports {
        let sp = schema::ServicePort {
            service: job.service(),
            port: p.port,
            proto: p.proto,
        };
        if let Some(n) = store.allocator.get(&sp).await? {
            out.push(format!("{}={n}", p));
        }
    }
    Ok(out)
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-=./:,@".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
