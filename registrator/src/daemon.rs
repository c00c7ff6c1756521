//! The registrator as a daemon: its flags (each with a `VIKING_*` env twin), their checks,
//! and the one start-up that the `registrator` binary and `viking up` both call.

use std::net::IpAddr;
use std::time::Duration;

use etcd_client::Client;
use runtime::etcd::parse_duration;
use runtime::{CancellationToken, process};
use schema::{HostId, Prefix};
use tracing::{Instrument, info};

use crate::{Config, Settings};

/// The registrator's flags (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Registrator")]
pub struct RegistratorArgs {
    /// Docker endpoint: unix:///var/run/docker.sock, a socket path, or tcp://host:2375
    /// (default: DOCKER_HOST, else the local socket)
    #[arg(long, env = "VIKING_DOCKER")]
    pub docker: Option<String>,

    /// Address other hosts reach this one on (default: the address of the interface that
    /// holds the default route)
    #[arg(long, env = "VIKING_ADDR", value_parser = runtime::host::parse_addr)]
    pub addr: Option<IpAddr>,

    /// Register containers' own addresses and ports instead of their published ports
    #[arg(long, env = "VIKING_INTERNAL")]
    pub internal: bool,

    /// Lease time to live: a lost host's endpoints vanish after this long
    #[arg(long, env = "VIKING_TTL", default_value = "10s", value_parser = parse_duration)]
    pub ttl: Duration,

    /// Full reconciliation period
    #[arg(long, env = "VIKING_RESYNC", default_value = "30s", value_parser = parse_duration)]
    pub resync: Duration,
}

/// Why the registrator did not start: refused before anything was written, exit 2.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "this host has no default route to take its address from; pass --addr with the \
         address other hosts reach it on (e.g. --addr 10.0.0.5)"
    )]
    NoAddr,
    #[error("--ttl {0:?} is too short: etcd leases count whole seconds; use at least 1s")]
    TtlTooShort(Duration),
    #[error("--resync must be longer than 0s (e.g. 30s)")]
    NoResync,
}

impl runtime::Fatal for StartError {
    fn exit_code(&self) -> u8 {
        process::USAGE
    }
}

impl RegistratorArgs {
    /// Checks every flag and builds the settings; needs neither etcd nor Docker.
    pub fn check(&self, prefix: &Prefix, host: &HostId) -> Result<Config, StartError> {
        let addr = self
            .addr
            .or_else(runtime::host::default_route_addr)
            .ok_or(StartError::NoAddr)?;
        if self.ttl < Duration::from_secs(1) {
            return Err(StartError::TtlTooShort(self.ttl));
        }
        if self.resync.is_zero() {
            return Err(StartError::NoResync);
        }
        Ok(Config {
            prefix: prefix.clone(),
            settings: Settings {
                host: host.clone(),
                addr,
                internal: self.internal,
            },
            ttl: self.ttl,
            resync: self.resync,
            docker: self.docker.clone(),
        })
    }
}

/// A started registrator.
pub struct Running {
    task: tokio::task::JoinHandle<()>,
}

/// Runs the registrator until `shutdown`, in the caller's span. Docker and etcd may be away:
/// it reconnects to both.
pub fn start(config: Config, client: Client, shutdown: CancellationToken) -> Running {
    info!(
        host = %config.settings.host,
        addr = %config.settings.addr,
        docker = %crate::docker::describe(config.docker.as_deref()),
        ttl = ?config.ttl,
        "registrator starting"
    );
    let task = tokio::spawn(
        crate::agent::run(config, client, shutdown).instrument(tracing::Span::current()),
    );
    Running { task }
}

impl Running {
    /// Waits until it has stopped (its keys are left to the lease).
    pub async fn wait(self) {
        let _ = self.task.await;
        info!("registrator stopped");
    }
}
