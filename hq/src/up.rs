//! `viking up`: the whole suite on this host in one process, the design notes' "development"
//! flavour: a local etcd (a child process, unless one answers already or `--etcd` points at
//! one), the ambassador and the registrator as tasks, every log on one stdout tagged by part.
//! SIGINT or SIGTERM stops all of it: the ambassador drains, the registrator leaves its keys
//! to the lease, etcd is stopped.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::Client;
use runtime::{CancellationToken, EtcdArgs};
use schema::HostId;
use tracing::{Instrument, info, info_span, warn};

use crate::store::HqError;

/// What `viking up` runs.
#[derive(Debug, Clone)]
pub struct UpConfig {
    pub host: HostId,
    /// Where a local etcd keeps its data (`<data>/etcd`) and log (`<data>/etcd.log`).
    pub data: PathBuf,
    /// The ambassador's address (default: docker0's).
    pub bind: Option<IpAddr>,
    pub admin: SocketAddr,
    /// The address endpoints are registered at (default: the default route's interface, else
    /// loopback: on one host, the ambassador is the only client).
    pub addr: Option<IpAddr>,
    /// How long the ambassador's open connections may finish on shutdown.
    pub grace: Duration,
    /// Service DNS: `ADDR:PORT`, `off`, or `None` for `<bind>:53`.
    pub dns: Option<String>,
}

/// The default data dir: `$XDG_DATA_HOME/viking` or `~/.local/share/viking`.
pub fn default_data() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"))
        .join("viking")
}

/// A local etcd started by `viking up`, stopped (SIGTERM, then SIGKILL) on Drop.
struct LocalEtcd(Child);

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn answers(client: &Client) -> bool {
    let mut kv = client.kv_client();
    matches!(
        tokio::time::timeout(Duration::from_secs(2), kv.get("/viking-up-probe", None)).await,
        Ok(Ok(_))
    )
}

fn start_etcd(data: &Path, client_url: &str) -> Result<LocalEtcd, HqError> {
    std::fs::create_dir_all(data)
        .map_err(|e| HqError::Input(format!("cannot create --data {}: {e}", data.display())))?;
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(data.join("etcd.log"))
        .map_err(|e| {
            HqError::Input(format!(
                "cannot write {}: {e}",
                data.join("etcd.log").display()
            ))
        })?;
    let peer = "http://127.0.0.1:2380";
    // etcd goes down with us even if we are killed (SIGKILL runs no Drop): setpriv (util-linux)
    // sets its parent-death signal before it becomes etcd.
    let mut cmd = if Path::new("/usr/bin/setpriv").exists() {
        let mut c = Command::new("/usr/bin/setpriv");
        c.args(["--pdeathsig", "TERM", "--", "etcd"]);
        c
    } else {
        Command::new("etcd")
    };
    let child = cmd
        .args(["--name", "viking", "--data-dir"])
        .arg(data.join("etcd"))
        .args([
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
        ])
        .args([
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
        ])
        .args(["--initial-cluster", &format!("viking={peer}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| {
            HqError::Refused(format!(
                "cannot start etcd: {e}; install it (make up does: apt-get install etcd-server) \
                 or point --etcd at one"
            ))
        })?;
    Ok(LocalEtcd(child))
}

/// Runs until `shutdown` fires.
pub async fn up(
    etcd: &EtcdArgs,
    config: UpConfig,
    shutdown: CancellationToken,
) -> Result<(), HqError> {
    let client = etcd.connect_daemon(&shutdown).await?;
    let mut local = None;
    if !answers(&client).await {
        let default = etcd.endpoints == [runtime::etcd::DEFAULT_ENDPOINT.to_owned()];
        if !default {
            return Err(HqError::Refused(format!(
                "no etcd answers at {}; start it, or leave out --etcd to let viking up start one",
                etcd.endpoints_display()
            )));
        }
        local = Some(start_etcd(&config.data, runtime::etcd::DEFAULT_ENDPOINT)?);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !answers(&client).await {
            if Instant::now() > deadline {
                return Err(HqError::Refused(format!(
                    "the local etcd did not answer in 30 s; see {}",
                    config.data.join("etcd.log").display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        info!(
            data = %config.data.join("etcd").display(),
            log = %config.data.join("etcd.log").display(),
            "started a local etcd at {}", runtime::etcd::DEFAULT_ENDPOINT
        );
    } else {
        info!(
            "using the etcd that answers at {}",
            etcd.endpoints_display()
        );
    }

    let bind = config
        .bind
        .or_else(|| runtime::host::interface_addr("docker0"))
        .ok_or_else(|| {
            HqError::Input(
                "no docker0 interface to take the ambassador's address from: start dockerd, or \
                 pass --bind with the address containers reach this host on"
                    .into(),
            )
        })?;
    let admin = tokio::net::TcpListener::bind(config.admin)
        .await
        .map_err(|e| {
            HqError::Input(format!(
                "cannot listen on --admin {}: {e}; pick another address",
                config.admin
            ))
        })?;
    let addr = config
        .addr
        .or_else(runtime::host::default_route_addr)
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));

    let mut amb_config =
        ambassador::Config::new(etcd.prefix.clone(), config.host.to_string(), bind);
    amb_config.grace = config.grace;
    // As the ambassador binary does by default; a kernel without it keeps the host's own.
    let congestion = ambassador::server::DEFAULT_LOCAL_CONGESTION;
    amb_config.local_congestion = ambassador::server::check_congestion(congestion)
        .is_ok()
        .then(|| congestion.to_owned());
    let dns = ambassador::dns::settings(
        config.dns.as_deref(),
        ambassador::dns::DEFAULT_ZONE,
        Duration::from_secs(5),
        bind,
    )
    .map_err(HqError::Input)?;
    let dns_listen = dns.as_ref().map(|(listen, _)| *listen);
    amb_config.dns = dns.map(|(_, settings)| settings);
    let shared = ambassador::Shared::new(amb_config);
    if let Some(listen) = dns_listen {
        ambassador::dns::serve(shared.zone(), listen, shutdown.clone())
            .await
            .map_err(|e| {
                HqError::Input(format!(
                    "cannot serve DNS on {listen}: {e}; pass --dns ADDR:PORT or --dns off"
                ))
            })?;
    }
    let admin_stop = CancellationToken::new();
    tokio::spawn(ambassador::admin::serve(
        admin,
        shared.clone(),
        admin_stop.clone(),
    ));
    let amb = tokio::spawn(
        ambassador::run(shared, client.clone(), shutdown.clone())
            .instrument(info_span!("ambassador")),
    );
    let reg_config = registrator::Config {
        prefix: etcd.prefix.clone(),
        settings: registrator::Settings {
            host: config.host.clone(),
            addr,
            internal: false,
        },
        ttl: Duration::from_secs(10),
        resync: Duration::from_secs(30),
        docker: None,
    };
    let reg = tokio::spawn(
        registrator::run(reg_config, client.clone(), shutdown.clone())
            .instrument(info_span!("registrator")),
    );
    info!(
        host = %config.host,
        etcd = %etcd.endpoints_display(),
        ambassador = %bind,
        dns = %dns_listen.map_or("off".to_owned(), |l| format!("{l} ({})", ambassador::dns::DEFAULT_ZONE)),
        admin = %format!("http://{}", config.admin),
        endpoints_at = %addr,
        "viking is up; Ctrl-C stops it"
    );

    shutdown.cancelled().await;
    info!("stopping");
    match amb.await {
        Ok(report) if report.cut > 0 => {
            warn!(
                cut = report.cut,
                "connections closed at the end of the grace period"
            );
        }
        _ => {}
    }
    admin_stop.cancel();
    let _ = reg.await;
    if let Some(etcd) = local {
        drop(etcd);
        info!("stopped the local etcd");
    }
    info!("viking is down");
    Ok(())
}
