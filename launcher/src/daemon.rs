//! The launcher as a daemon: its flags (each with a `VIKING_*` env twin), their checks, and
//! the one start-up that the `launcher` binary and `viking up` both call.
//!
//! `--docker` and `--ttl` are not here: the binary has its own, and `viking up` hands its
//! launcher the registrator's (one Docker and one host lease per host).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::Client;
use runtime::etcd::parse_duration;
use runtime::{CancellationToken, process};
use schema::{HostId, Prefix};
use tracing::{Instrument, info};

use crate::Config;
use crate::agent::View;

/// The launcher's flags (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Launcher")]
pub struct LauncherArgs {
    /// CPUs this host offers the grid, e.g. 3.5 (default: every CPU this process may use)
    #[arg(long, env = "VIKING_CPUS")]
    pub cpus: Option<String>,

    /// Memory this host offers the grid, e.g. 14G (default: all of it, less --reserve-memory)
    #[arg(long, env = "VIKING_MEMORY")]
    pub memory: Option<String>,

    /// Memory kept for the host itself and not offered, e.g. 512M
    #[arg(long, env = "VIKING_RESERVE_MEMORY", default_value = "0")]
    pub reserve_memory: String,

    /// How long a host's launcher may be gone before the scheduler places its instances
    /// elsewhere
    #[arg(long, env = "VIKING_RESCHEDULE_AFTER", default_value = "30s", value_parser = parse_duration)]
    pub reschedule_after: Duration,

    /// The scheduler election's lease: a lost scheduler is replaced within this long
    #[arg(long, env = "VIKING_LEADER_TTL", default_value = "10s", value_parser = parse_duration)]
    pub leader_ttl: Duration,

    /// Fencing for at-most-once work: stop this host's containers once etcd has not answered
    /// for this long (off by default; longer than --ttl plus --reschedule-after is safe)
    #[arg(long, env = "VIKING_STOP_AFTER", value_parser = parse_duration)]
    pub stop_after: Option<Duration>,

    /// How long a container no longer assigned here gets to exit after SIGTERM before it is
    /// killed (as `docker stop -t`)
    #[arg(long, env = "VIKING_STOP_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub stop_timeout: Duration,

    /// How long a container with ports keeps running after its registrator has taken its
    /// endpoints out of service and before it gets SIGTERM: time for the ambassadors and
    /// routers to stop sending it new connections and for requests in flight to finish (as
    /// Nomad's shutdown_delay; 0 sends the signal as soon as it is deregistered)
    #[arg(long, env = "VIKING_SHUTDOWN_DELAY", default_value = "1s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
}

/// Why the launcher did not start: refused before anything was written, exit 2.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--cpus: {0}")]
    Cpus(String),
    #[error("--{flag}: {why}")]
    Memory { flag: &'static str, why: String },
    #[error(
        "--reserve-memory {reserve} leaves nothing of this host's {total} to offer; reserve \
         less, or pass --memory"
    )]
    NothingLeft { reserve: String, total: String },
    #[error(
        "this host's memory cannot be read from /proc/meminfo; pass --memory, e.g. --memory 8G"
    )]
    NoMeminfo,
    #[error("--{flag} {value:?} is too short: etcd leases count whole seconds; use at least 1s")]
    TtlTooShort { flag: &'static str, value: Duration },
}

impl runtime::Fatal for StartError {
    fn exit_code(&self) -> u8 {
        process::USAGE
    }
}

impl LauncherArgs {
    /// Checks every flag and builds the settings; needs neither etcd nor Docker.
    pub fn check(
        &self,
        prefix: &Prefix,
        host: &HostId,
        ttl: Duration,
        docker: Option<String>,
        max_txn_ops: usize,
    ) -> Result<Config, StartError> {
        let cpus_milli = match &self.cpus {
            Some(c) => schema::parse_cpus(c).map_err(StartError::Cpus)?,
            None => crate::capacity::cpus_milli(),
        };
        let reserve =
            schema::parse_memory(&self.reserve_memory).map_err(|why| StartError::Memory {
                flag: "reserve-memory",
                why,
            })?;
        let memory = match &self.memory {
            Some(m) => schema::parse_memory(m).map_err(|why| StartError::Memory {
                flag: "memory",
                why,
            })?,
            None => {
                let total = crate::capacity::memory().ok_or(StartError::NoMeminfo)?;
                if reserve >= total {
                    return Err(StartError::NothingLeft {
                        reserve: self.reserve_memory.clone(),
                        total: schema::format_memory(total),
                    });
                }
                total - reserve
            }
        };
        for (flag, value) in [("ttl", ttl), ("leader-ttl", self.leader_ttl)] {
            if value < Duration::from_secs(1) {
                return Err(StartError::TtlTooShort { flag, value });
            }
        }
        Ok(Config {
            prefix: prefix.clone(),
            host: host.clone(),
            ttl,
            resync: Duration::from_secs(10),
            docker,
            cpus_milli,
            memory,
            scheduler: Some(grid::scheduler::Config {
                prefix: prefix.clone(),
                host: host.clone(),
                ttl: self.leader_ttl,
                reschedule_after: self.reschedule_after,
                max_txn_ops,
            }),
            stop_after: self.stop_after,
            stop_timeout: self.stop_timeout,
            shutdown_delay: self.shutdown_delay,
            view: Arc::default(),
        })
    }
}

/// The admin server (`launcher --admin`): `/healthz` (200 once it acts: both prefixes read
/// and etcd answering), `/state` (its node record and every instance's status as last
/// written), `/metrics` (instances by state), on the daemons' shared server.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    view: Arc<Mutex<View>>,
    stop: CancellationToken,
) {
    use runtime::admin::Answer;
    let answer = move |path: &str| {
        let view = view.lock().expect("view lock").clone();
        let records: BTreeMap<&str, serde_json::Value> = view
            .written
            .iter()
            .map(|(k, v)| (k.as_str(), serde_json::from_str(v).unwrap_or_default()))
            .collect();
        let states = || {
            let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
            for (k, v) in &records {
                if k.contains("/grid/status/") {
                    let state = v["state"].as_str().unwrap_or("unknown").to_owned();
                    *by_state.entry(state).or_default() += 1;
                }
            }
            by_state
        };
        match path {
            "/healthz" => Answer::health(
                view.listed && view.etcd_answers,
                if view.listed {
                    "etcd has not answered within the lease: starting and stopping nothing"
                } else {
                    "assignments and stacks not read from etcd yet"
                },
            ),
            "/state" => Answer::json(&serde_json::json!({
                "listed": view.listed,
                "etcd_answers": view.etcd_answers,
                "lease": view.lease,
                "stopping": view.stopping,
                "instances_by_state": states(),
                "keys": records,
            })),
            "/metrics" => {
                let mut text = String::from(
                    "# HELP launcher_instances Instances of this host by state, as last reported.\n\
                     # TYPE launcher_instances gauge\n",
                );
                for (state, n) in states() {
                    text.push_str(&format!("launcher_instances{{state=\"{state}\"}} {n}\n"));
                }
                text.push_str(&format!(
                    "# HELP launcher_etcd_answers Whether etcd answered within the lease.\n\
                     # TYPE launcher_etcd_answers gauge\nlauncher_etcd_answers {}\n\
                     # HELP launcher_stopping Containers being stopped.\n\
                     # TYPE launcher_stopping gauge\nlauncher_stopping {}\n# EOF\n",
                    u8::from(view.etcd_answers),
                    view.stopping
                ));
                Answer::metrics(text)
            }
            _ => Answer::not_found(),
        }
    };
    runtime::admin::serve(listener, answer, stop).await;
}

/// A started launcher.
pub struct Running {
    task: tokio::task::JoinHandle<()>,
}

/// Runs the launcher until `shutdown`, in the caller's span. Docker and etcd may be away: it
/// reconnects to both.
pub fn start(config: Config, client: Client, shutdown: CancellationToken) -> Running {
    info!(
        host = %config.host,
        cpus = %grid::place::cores(config.cpus_milli),
        memory = %schema::format_memory(config.memory),
        docker = %runtime::docker::describe(config.docker.as_deref()),
        "launcher starting"
    );
    let task = tokio::spawn(
        crate::agent::run(config, client, shutdown).instrument(tracing::Span::current()),
    );
    Running { task }
}

impl Running {
    /// Waits until it has stopped (its containers keep running; its keys are left to the
    /// lease).
    pub async fn wait(self) {
        let _ = self.task.await;
        info!("launcher stopped");
    }
}
