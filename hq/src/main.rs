//! `viking`: the HQ command. Each subcommand is one function below; what they print is typed
//! rows in `hq::output`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use hq::compile::{DEFAULT_AMBASSADOR_ADDR, JobSpec};
use hq::output::{self, Format, HostRow, JobRow, StackRow};
use hq::store::{HqError, Store};
use hq::up::UpArgs;
use hq::{folder, launch, stackfile::StackFile};
use portalloc::Allocator;
use runtime::{EtcdArgs, Failure, OutputArgs, RangeArgs, RunDirArgs, TxnArgs};
use schema::records::HostRecord;
use schema::{HostId, ServiceId, StackName};

/// viking HQ: deploy stacks, inspect them, manage cluster membership.
#[derive(Debug, Parser)]
#[command(name = "viking", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,

    /// Address containers reach the ambassador on (the Docker bridge gateway)
    #[arg(long, env = "VIKING_AMBASSADOR_ADDR", default_value = DEFAULT_AMBASSADOR_ADDR, global = true)]
    ambassador_addr: String,

    #[command(flatten)]
    range: RangeArgs,

    #[command(flatten)]
    run_dir: RunDirArgs,

    #[command(flatten)]
    txn: TxnArgs,

    #[command(flatten)]
    output: OutputArgs,

    #[command(subcommand)]
    command: Command,
}

const AFTER_HELP: &str =
    "Exit status: 0 done (or stopped by SIGTERM/SIGINT); 1 failed while working (the cause is \
     printed); 2 bad usage or a setting this host cannot honour, nothing changed; 130 a second \
     SIGTERM/SIGINT.\n\nExamples:
  viking deploy ./shared ./app             # two stacks, linked, in one transaction
  viking deploy . --name mystack
  viking env app/web --format docker
  viking ps app
  viking graph --dot | dot -Tsvg > links.svg
  viking export app ./deploy && viking apply ./deploy
  viking host add node-1 10.0.0.1 --role router
  viking routes; viking cert add example.com chain.pem key.pem
  viking up                                # etcd, ambassador, registrator on this host
  viking run shared app                    # the grid places them on the cluster's hosts
  viking ps app; viking grid               # where each instance runs, and what is pending
  viking scale shared/web 3; viking logs app/client -f; viking stop app";

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
        #[arg(long, env = "VIKING_ENV_FORMAT", value_enum, default_value = "env")]
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
    /// Every domain the router serves: the job behind it and its live endpoints
    Routes,
    /// TLS certificates the routers serve, in etcd
    #[command(subcommand)]
    Cert(CertCommand),
    /// Ask the grid to run deployed stacks on the cluster's hosts, and follow them until
    /// every instance runs
    Run {
        #[arg(required = true, value_name = "STACK")]
        stacks: Vec<StackName>,
        /// How long to wait for every instance to run before exiting 1 with what does not
        #[arg(long, env = "VIKING_RUN_TIMEOUT", default_value = "2m", value_parser = runtime::etcd::parse_duration)]
        timeout: Duration,
        /// Return once the request is written
        #[arg(long)]
        detach: bool,
    },
    /// Stop stacks on every host (their config and ports stay)
    Stop {
        #[arg(required = true, value_name = "STACK")]
        stacks: Vec<StackName>,
        /// How long to wait for their containers to go
        #[arg(long, env = "VIKING_RUN_TIMEOUT", default_value = "2m", value_parser = runtime::etcd::parse_duration)]
        timeout: Duration,
    },
    /// Set a job's number of instances, cluster-wide
    Scale {
        #[arg(value_name = "STACK/JOB")]
        service: ServiceId,
        #[arg(value_parser = parse_scale)]
        scale: u32,
    },
    /// Each host with its CPU and memory reserved and free, what runs there, and what is
    /// pending and why
    Grid,
    /// Put back the spec a job had before its last deploy (rolled out like any update)
    Rollback {
        #[arg(value_name = "STACK/JOB")]
        service: ServiceId,
    },
    /// Print the logs of a job's containers on this host (and name the hosts of the others)
    Logs {
        #[arg(value_name = "STACK/JOB")]
        service: ServiceId,
        /// Keep printing new lines
        #[arg(short, long)]
        follow: bool,
        /// Lines from the end of each log
        #[arg(long, env = "VIKING_TAIL", default_value_t = 100)]
        tail: u32,
    },
    /// Shell completions for viking, to source or install (make install does)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The cluster on one live page in a browser: hosts, stacks, links, traffic, the grid
    Ui(hq::ui::UiArgs),
    /// The whole suite on this host: a local etcd (unless one answers), the ambassador, the
    /// registrator and the launcher, in this process, with their own flags; Ctrl-C stops it
    Up(Box<UpArgs>),
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Add or replace the certificate of a domain (checked first: the key fits, the chain
    /// names the domain); routers serve it to new connections at once
    Add {
        /// The domain, e.g. example.com or *.apps.example.com
        domain: schema::Domain,
        /// PEM chain: the leaf certificate first, then its intermediates
        chain: PathBuf,
        /// PEM private key of the leaf
        key: PathBuf,
    },
    /// List certificates with their expiry
    Ls,
    /// Remove a domain's certificate
    Rm { domain: schema::Domain },
}

#[derive(Debug, Subcommand)]
enum HostCommand {
    /// Add or update a member
    Add {
        host: HostId,
        #[arg(value_parser = runtime::host::parse_addr)]
        addr: std::net::IpAddr,
        /// A role (repeatable); `router`: locknet --watch on that host opens 80 and 443
        #[arg(long = "role", value_parser = parse_role)]
        roles: Vec<String>,
        /// A label jobs can be placed by, KEY=VALUE (repeatable)
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Set (KEY=VALUE) or remove (KEY-) a member's labels
    Label {
        host: HostId,
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        changes: Vec<String>,
    },
    /// Remove a member; refused while instances are assigned to it (drain it first)
    Rm { host: HostId },
    /// Take no new work and move this host's instances elsewhere
    Drain { host: HostId },
    /// Take work again
    Undrain { host: HostId },
    /// List members and their live agents
    Ls,
}

fn main() -> ExitCode {
    runtime::process::man_page::<Cli>();
    let cli = Cli::parse();
    // `viking up` is a daemon and says what it does; the commands speak only when asked.
    let filter = if matches!(cli.command, Command::Up(_) | Command::Ui(_)) {
        "info"
    } else {
        "warn"
    };
    runtime::process::main("viking", filter, async move {
        run(cli).await.map_err(Failure::from)
    })
}

async fn run(cli: Cli) -> Result<(), HqError> {
    if let Command::Completions { shell } = cli.command {
        use clap::CommandFactory;
        use std::io::Write;
        // Into a buffer first: clap_complete panics on a write error (a closed pipe).
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "viking", &mut script);
        let _ = std::io::stdout().write_all(&script);
        return Ok(());
    }
    if let Command::Ui(args) = cli.command {
        return hq::ui::serve(&cli.etcd, args, runtime::shutdown::on_signals()).await;
    }
    if let Command::Up(args) = cli.command {
        return hq::up::up(
            &cli.etcd,
            cli.range.range,
            cli.run_dir.dir(),
            cli.txn.max_txn_ops,
            *args,
            runtime::shutdown::on_signals(),
        )
        .await;
    }
    // Input first: nothing is read from or written to etcd before it is valid.
    let range = cli
        .range
        .for_allocation()
        .map_err(|f| HqError::Input(f.message()))?;
    let files = match &cli.command {
        Command::Deploy { paths, name } => Some(read_paths(paths, name.as_deref())?),
        Command::Apply { dir } => Some(folder::read_folder(dir)?),
        _ => None,
    };
    let client = cli.etcd.connect_live().await?;
    let allocator = Allocator::new(&client, cli.etcd.prefix.clone(), range)
        .with_max_txn_ops(cli.txn.max_txn_ops)
        .with_retry_for(cli.etcd.timeout.max(Duration::from_secs(1)))
        .with_endpoints_label(cli.etcd.endpoints_display());
    let store = Store::new(
        &client,
        cli.etcd.prefix.clone(),
        allocator,
        cli.etcd.endpoints_display(),
    );
    let out = cli.output.output;
    match cli.command {
        Command::Deploy { .. } | Command::Apply { .. } => {
            let files = files.expect("read above");
            deploy(&store, &files, &cli.ambassador_addr, out).await
        }
        Command::Export { stack, dir } => export(&store, &stack, &dir).await,
        Command::Env { service, format } => env(&store, &service, format).await,
        Command::Stacks => stacks(&store, out).await,
        Command::Ps { stack } => ps(&store, stack.as_ref(), out).await,
        Command::Ports => {
            print!("{}", output::render(&store.allocator.list().await?, out));
            Ok(())
        }
        Command::Graph { stack, dot } => graph(&store, stack.as_ref(), dot, out).await,
        Command::Rm { stack, force } => rm(&store, &stack, force).await,
        Command::Run {
            stacks,
            timeout,
            detach,
        } => hq::grid::run(&store, &stacks, timeout, detach).await,
        Command::Stop { stacks, timeout } => hq::grid::stop(&store, &stacks, timeout).await,
        Command::Scale { service, scale } => set_scale(&store, &service, scale).await,
        Command::Rollback { service } => {
            store.rollback(&service.stack, &service.job).await?;
            println!(
                "{service}: rolled back to the spec it had before its last deploy; the grid rolls it out"
            );
            Ok(())
        }
        Command::Grid => {
            let report = hq::grid::GridState::read(&store).await?.report();
            if out == Format::Json {
                print!("{}", output::json(&report));
            } else {
                print!("{}", hq::grid::render_grid(&report));
            }
            Ok(())
        }
        Command::Logs {
            service,
            follow,
            tail,
        } => logs(&store, &service, follow, tail).await,
        Command::Host(command) => host(&store, command, out).await,
        Command::Routes => {
            print!("{}", output::render(&hq::web::routes(&store).await?, out));
            Ok(())
        }
        Command::Cert(CertCommand::Add { domain, chain, key }) => {
            let row = hq::web::cert_add(&store, &domain, &chain, &key).await?;
            print!("{}", output::render(&[row], out));
            Ok(())
        }
        Command::Cert(CertCommand::Ls) => {
            print!("{}", output::render(&hq::web::cert_ls(&store).await?, out));
            Ok(())
        }
        Command::Cert(CertCommand::Rm { domain }) => {
            hq::web::cert_rm(&store, &domain).await?;
            println!("{domain}: certificate removed");
            Ok(())
        }
        Command::Up(_) | Command::Ui(_) | Command::Completions { .. } => {
            unreachable!("handled above")
        }
    }
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

async fn deploy(
    store: &Store,
    files: &[StackFile],
    ambassador_addr: &str,
    out: Format,
) -> Result<(), HqError> {
    let (_, report) = store.deploy(files, ambassador_addr).await?;
    if out == Format::Json {
        print!("{}", output::json(&report));
        return Ok(());
    }
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
    Ok(())
}

async fn export(store: &Store, stack: &StackName, dir: &std::path::Path) -> Result<(), HqError> {
    let jobs = stack_jobs(store, stack).await?;
    for path in folder::export(dir, stack, &jobs)? {
        println!("{}", path.display());
    }
    Ok(())
}

async fn env(store: &Store, service: &ServiceId, format: EnvFormat) -> Result<(), HqError> {
    let jobs = stack_jobs(store, &service.stack).await?;
    let job = jobs.iter().find(|j| j.job == service.job).ok_or_else(|| {
        HqError::Refused(format!(
            "stack {} has no job {}; `viking ps {}` lists its jobs",
            service.stack, service.job, service.stack
        ))
    })?;
    let env = job.container_env();
    match format {
        EnvFormat::Env => env.iter().for_each(|(k, v)| println!("{k}={v}")),
        EnvFormat::Docker => {
            let flags: Vec<String> = env
                .iter()
                .map(|(k, v)| format!("-e {}", output::shell_quote(&format!("{k}={v}"))))
                .collect();
            println!("{}", flags.join(" "));
        }
        EnvFormat::Json => print!("{}", output::json(&env)),
    }
    Ok(())
}

async fn stacks(store: &Store, out: Format) -> Result<(), HqError> {
    let rows: Vec<StackRow> = store
        .stack_metas()
        .await?
        .into_iter()
        .map(|m| StackRow {
            name: m.name,
            order: m.order,
            deployed_at: m.deployed_at,
            source_digest: m.source_digest,
        })
        .collect();
    print!("{}", output::render(&rows, out));
    Ok(())
}

async fn ps(store: &Store, stack: Option<&StackName>, out: Format) -> Result<(), HqError> {
    let (stacks, _) = store.load_stacks().await?;
    if let Some(s) = stack {
        if !stacks.contains_key(s) {
            return Err(not_deployed(s));
        }
    }
    let all_instances = hq::grid::GridState::read(store).await?.instances(None);
    let mut rows = Vec::new();
    for (name, jobs) in &stacks {
        if stack.is_some_and(|s| s != name) {
            continue;
        }
        let mut jobs: Vec<&JobSpec> = jobs.values().collect();
        jobs.sort_by_key(|j| j.order);
        for job in jobs {
            let endpoints = store.endpoints(name, &job.job).await?;
            let instances: Vec<hq::grid::InstanceRow> = all_instances
                .iter()
                .filter(|r| r.service == job.service().to_string())
                .cloned()
                .collect();
            rows.push(JobRow {
                running: instances.iter().filter(|r| r.state == "running").count(),
                instances,
                service: job.service().to_string(),
                image: job.image.clone(),
                scale: job.scale,
                links: job.links.iter().map(|l| l.alias.clone()).collect(),
                ambassador_ports: ambassador_ports(store, job).await?,
                live_endpoints: endpoints.values().map(Vec::len).sum(),
            });
        }
    }
    print!("{}", output::render(&rows, out));
    let instances: Vec<&hq::grid::InstanceRow> = rows.iter().flat_map(|r| &r.instances).collect();
    if out == Format::Text && !instances.is_empty() {
        let owned: Vec<hq::grid::InstanceRow> = instances.into_iter().cloned().collect();
        print!("\n{}", output::render(&owned, out));
    }
    Ok(())
}

async fn graph(
    store: &Store,
    stack: Option<&StackName>,
    dot: bool,
    out: Format,
) -> Result<(), HqError> {
    let (stacks, _) = store.load_stacks().await?;
    let mut edges = output::Edges::new();
    for (name, jobs) in &stacks {
        for job in jobs.values() {
            let to: Vec<&ServiceId> = job.links.iter().map(|l| &l.service).collect();
            let keep = stack.is_none_or(|s| s == name || to.iter().any(|t| &t.stack == s));
            if keep {
                let to = to.iter().map(ToString::to_string).collect();
                edges.insert(job.service().to_string(), to);
            }
        }
    }
    let text = if dot {
        output::graph_dot(&edges)
    } else if out == Format::Json {
        output::json(&edges)
    } else {
        output::graph_tree(&edges)
    };
    print!("{text}");
    Ok(())
}

async fn rm(store: &Store, stack: &StackName, force: bool) -> Result<(), HqError> {
    let removed = store.remove_stack(stack, force).await?;
    let ports: Vec<String> = removed.released.iter().map(u16::to_string).collect();
    let ports = if ports.is_empty() {
        "none".into()
    } else {
        ports.join(", ")
    };
    if removed.deployed {
        println!("removed {stack}; released ports: {ports}");
    } else {
        println!(
            "{stack} was not deployed; released the ports a failed deploy left allocated: {ports}"
        );
    }
    Ok(())
}

/// `viking scale`'s number: what a stack file's `scale` may be.
fn parse_scale(s: &str) -> Result<u32, String> {
    let max = schema::MAX_SCALE;
    s.parse::<u32>()
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| format!("a scale is a whole number of instances from 0 to {max}"))
}

async fn set_scale(store: &Store, service: &ServiceId, scale: u32) -> Result<(), HqError> {
    let before = store.set_scale(&service.stack, &service.job, scale).await?;
    println!("{service}: scale {before} -> {scale}");
    Ok(())
}

/// The job's logs from this host's Docker; the hosts of its other instances are named.
async fn logs(store: &Store, service: &ServiceId, follow: bool, tail: u32) -> Result<(), HqError> {
    let state = hq::grid::GridState::read(store).await?;
    let elsewhere: Vec<String> = state
        .assign
        .keys()
        .filter(|s| &s.service == service)
        .map(|s| format!("{}/{} on {}", service, s.instance, s.host))
        .collect();
    let docker = launch::docker().await?;
    let here = launch::existing(&docker, &service.stack)
        .await?
        .into_iter()
        .any(|e| e.job == service.job.as_str());
    if !here {
        return Err(HqError::Refused(if elsewhere.is_empty() {
            format!(
                "{service} has no instances; `viking run {}` starts them",
                service.stack
            )
        } else {
            format!(
                "{service} has no container on this host's Docker; its instances run elsewhere \
                 ({}): run `viking logs` there",
                elsewhere.join(", ")
            )
        }));
    }
    if !elsewhere.is_empty() {
        eprintln!("instances: {}", elsewhere.join(", "));
    }
    launch::logs(&docker, &service.stack, &service.job, follow, tail).await
}

/// A host's role: a lower-case name (`router` is the one viking acts on).
fn parse_role(text: &str) -> Result<String, String> {
    let ok = (1..=63).contains(&text.len())
        && text.starts_with(|c: char| c.is_ascii_lowercase())
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "role {text:?}: a role is a lower-case name of a-z, 0-9 and '-', starting with a \
             letter, e.g. router"
        ))
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("label {text:?} is not KEY=VALUE, e.g. role=db"))?;
    if !hq::stackfile::is_label(k) || !hq::stackfile::is_label_value(v) {
        return Err(format!(
            "label {text:?}: names and values are letters, digits, '.', '_', '-' (names start \
             with a letter), at most 63 each"
        ));
    }
    Ok((k.to_owned(), v.to_owned()))
}

async fn host(store: &Store, command: HostCommand, out: Format) -> Result<(), HqError> {
    match command {
        HostCommand::Add {
            host,
            addr,
            roles,
            labels,
        } => {
            schema::check_member_addr(addr).map_err(HqError::Input)?;
            let record = HostRecord {
                v: schema::records::RECORD_VERSION,
                host: host.clone(),
                addr: addr.to_string(),
                roles,
                labels: labels.into_iter().collect(),
                draining: false,
            };
            store.host_add(&record).await?;
            println!("{host} {addr}");
        }
        HostCommand::Label { host, changes } => {
            let mut set = BTreeMap::new();
            let mut unset = Vec::new();
            for c in &changes {
                match c.strip_suffix('-') {
                    Some(k) if !c.contains('=') => {
                        if !hq::stackfile::is_label(k) {
                            return Err(HqError::Input(format!(
                                "{c:?}: {k:?} is not a label name (a letter, then letters, \
                                 digits, '.', '_', '-')"
                            )));
                        }
                        unset.push(k.to_owned());
                    }
                    _ => {
                        let (k, v) = parse_label(c).map_err(HqError::Input)?;
                        set.insert(k, v);
                    }
                }
            }
            let labels = store.host_label(&host, &set, &unset).await?;
            let text: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("{host}: {}", output::list(&text));
        }
        HostCommand::Drain { host } => {
            store.host_update(&host, |r| r.draining = true).await?;
            println!(
                "{host}: draining; its instances move elsewhere (`viking host ls` says when it is drained)"
            );
        }
        HostCommand::Undrain { host } => {
            store.host_update(&host, |r| r.draining = false).await?;
            println!("{host}: takes work again");
        }
        HostCommand::Rm { host } => {
            let state = hq::grid::GridState::read(store).await?;
            let assigned = state.assign.keys().filter(|s| s.host == host).count();
            if assigned > 0 {
                return Err(HqError::Refused(format!(
                    "{host} has {assigned} instances assigned; `viking host drain {host}` moves \
                     them elsewhere, then remove it once `viking host ls` shows it drained"
                )));
            }
            if !store.host_rm(&host).await? {
                return Err(HqError::Refused(format!(
                    "{host} is not a member; `viking host ls` lists them"
                )));
            }
        }
        HostCommand::Ls => {
            let state = hq::grid::GridState::read(store).await?;
            let report = state.report();
            let rows: Vec<HostRow> = report
                .hosts
                .into_iter()
                .map(|b| {
                    let record = state.hosts.get(&HostId::new(&b.host).expect("a host id"));
                    HostRow {
                        member: record.is_some(),
                        roles: record.map(|r| r.roles.clone()).unwrap_or_default(),
                        host: b.host,
                        addr: b.addr,
                        alive: b.agents,
                        labels: b.labels,
                        state: b.state,
                        cpus_milli: b.cpus_milli,
                        cpus_reserved_milli: b.cpus_reserved_milli,
                        memory: b.memory,
                        memory_reserved: b.memory_reserved,
                        instances: b.instances.len(),
                    }
                })
                .collect();
            print!("{}", output::render(&rows, out));
        }
    }
    Ok(())
}

fn not_deployed(stack: &StackName) -> HqError {
    HqError::Refused(format!(
        "stack {stack} is not deployed; `viking stacks` lists what is"
    ))
}

async fn stack_jobs(store: &Store, stack: &StackName) -> Result<Vec<JobSpec>, HqError> {
    let (stacks, _) = store.load_stacks().await?;
    let mut jobs: Vec<JobSpec> = stacks
        .get(stack)
        .ok_or_else(|| not_deployed(stack))?
        .values()
        .cloned()
        .collect();
    jobs.sort_by_key(|j| j.order);
    Ok(jobs)
}

/// `port/proto=ambassador-port` for each allocated port of a job.
async fn ambassador_ports(store: &Store, job: &JobSpec) -> Result<Vec<String>, HqError> {
    let mut out = Vec::new();
    for p in &job.ports {
        let sp = schema::ServicePort {
            service: job.service(),
            port: p.port,
            proto: p.proto,
        };
        if let Some(n) = store.allocator.get(&sp).await? {
            out.push(format!("{p}={n}"));
        }
    }
    Ok(out)
}
