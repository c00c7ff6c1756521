//! `viking up`: the whole suite on this host in one process, the design notes' "development"
//! flavour: a local etcd (a child process, unless one answers already or `--etcd` points at
//! one), the ambassador, the registrator and the launcher (and so a scheduler) as tasks, every
//! log on one stdout tagged by part. SIGINT or SIGTERM stops all of it: the ambassador drains,
//! the registrator and the launcher leave their keys to the lease (the containers keep
//! running), etcd is stopped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ambassador::AmbassadorArgs;
use etcd_client::Client;
use launcher::LauncherArgs;
use registrator::RegistratorArgs;
use runtime::{CancellationToken, EtcdArgs, HostArgs};
use schema::PortRange;
use tracing::{Instrument, info, info_span};

use crate::store::HqError;

/// `viking up`'s flags: `--host` and `--data` of its own, and every flag of the daemons it
/// runs, with the same names, env twins and defaults as the daemons' own binaries.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub host: HostArgs,

    /// Where the local etcd keeps its data (default: ~/.local/share/viking)
    #[arg(long, env = "VIKING_DATA")]
    pub data: Option<PathBuf>,

    #[command(flatten)]
    pub ambassador: AmbassadorArgs,

    #[command(flatten)]
    pub registrator: RegistratorArgs,

    #[command(flatten)]
    pub launcher: LauncherArgs,

    /// Also run the router (HTTP and HTTPS to web jobs by domain), as on a router host
    #[arg(long, env = "VIKING_UP_ROUTER")]
    pub router: bool,

    /// With --router: its plain HTTP listener (ADDR:PORT, :PORT or off)
    #[arg(long, env = "VIKING_UP_ROUTER_HTTP", default_value = ":80")]
    pub router_http: String,

    /// With --router: its HTTPS listener (ADDR:PORT, :PORT or off)
    #[arg(long, env = "VIKING_UP_ROUTER_HTTPS", default_value = ":443")]
    pub router_https: String,

    /// With --router: its admin server
    #[arg(long, env = "VIKING_UP_ROUTER_ADMIN", default_value = "127.0.0.1:9102")]
    pub router_admin: SocketAddr,

    /// The launcher's admin server: /metrics, /healthz, /state (as `launcher --admin`)
    #[arg(
        long,
        env = "VIKING_UP_LAUNCHER_ADMIN",
        default_value = "127.0.0.1:9101"
    )]
    pub launcher_admin: SocketAddr,

    /// With --router: a directory of certificates (<domain>.crt and <domain>.key)
    #[arg(long, env = "VIKING_UP_ROUTER_CERTS")]
    pub router_certs: Option<PathBuf>,
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

/// Starts etcd at `client` (peers on the next port: 2380 for the default 2379).
fn start_etcd(data: &Path, client: SocketAddr) -> Result<LocalEtcd, HqError> {
    let client_url = format!("http://{client}");
    let client_url = client_url.as_str();
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
    let peer = format!("http://{}:{}", client.ip(), client.port().wrapping_add(1));
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
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
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

/// Runs until `shutdown` fires. Every flag is checked before etcd is started.
pub async fn up(
    etcd: &EtcdArgs,
    range: PortRange,
    run_dir: std::path::PathBuf,
    max_txn_ops: usize,
    args: UpArgs,
    shutdown: CancellationToken,
) -> Result<(), HqError> {
    let host = args.host.id()?;
    let ambassador = args.ambassador.check(&etcd.prefix, &host, range, run_dir)?;
    let registrator = args.registrator.check(&etcd.prefix, &host)?;
    // One Docker and one host lease for the registrator and the launcher.
    let launcher = args.launcher.check(
        &etcd.prefix,
        &host,
        args.registrator.ttl,
        args.registrator.docker.clone(),
        max_txn_ops,
    )?;
    let router = if args.router {
        let mut r = router::RouterArgs::defaults();
        r.http = args.router_http.clone();
        r.https = args.router_https.clone();
        r.admin = args.router_admin;
        r.certs = args.router_certs.clone();
        Some(r.check()?)
    } else {
        None
    };
    let data = args.data.clone().unwrap_or_else(default_data);
    let client = etcd.connect_daemon(&shutdown).await?;
    let local = ensure_etcd(etcd, &client, &data).await?;

    let bind = ambassador.config.bind;
    let dns = ambassador.dns;
    let amb = ambassador::daemon::start(ambassador, client.clone(), shutdown.clone())
        .instrument(info_span!("ambassador"))
        .await?;
    let endpoints_at = registrator.settings.addr;
    let reg = info_span!("registrator")
        .in_scope(|| registrator::daemon::start(registrator, client.clone(), shutdown.clone()));
    let launcher_admin = tokio::net::TcpListener::bind(args.launcher_admin)
        .await
        .map_err(|e| {
            HqError::Input(format!(
                "cannot listen on --launcher-admin {}: {e}; pick another address",
                args.launcher_admin
            ))
        })?;
    tokio::spawn(
        launcher::daemon::serve_admin(launcher_admin, launcher.view.clone(), shutdown.clone())
            .instrument(info_span!("launcher")),
    );
    let launch = info_span!("launcher")
        .in_scope(|| launcher::daemon::start(launcher, client.clone(), shutdown.clone()));
    let router = match router {
        Some(checked) => Some(
            router::daemon::start(
                checked,
                etcd.prefix.clone(),
                client.clone(),
                shutdown.clone(),
            )
            .instrument(info_span!("router"))
            .await?,
        ),
        None => None,
    };
    info!(
        host = %host,
        etcd = %etcd.endpoints_display(),
        ambassador = %bind,
        dns = %dns.map_or("off".to_owned(), |l| format!("{l} ({})", args.ambassador.dns_zone)),
        admin = %format!("http://{}", amb.admin),
        launcher_admin = %format!("http://{}", args.launcher_admin),
        endpoints_at = %endpoints_at,
        "viking is up; Ctrl-C stops it"
    );

    shutdown.cancelled().await;
    info!("stopping");
    amb.wait().instrument(info_span!("ambassador")).await;
    reg.wait().instrument(info_span!("registrator")).await;
    launch.wait().instrument(info_span!("launcher")).await;
    if let Some(r) = router {
        r.wait().instrument(info_span!("router")).await;
    }
    if let Some(etcd) = local {
        drop(etcd);
        info!("stopped the local etcd");
    }
    info!("viking is down");
    Ok(())
}

/// The one loopback address of `--etcd`, where `viking up` may start an etcd of its own.
fn local_endpoint(endpoints: &[String]) -> Option<SocketAddr> {
    let [one] = endpoints else { return None };
    let addr: SocketAddr = one
        .strip_prefix("http://")?
        .trim_end_matches('/')
        .parse()
        .ok()?;
    addr.ip().is_loopback().then_some(addr)
}

/// Uses the etcd that answers, or starts a local one when none does and `--etcd` is one
/// plain-HTTP loopback address (the default, `http://127.0.0.1:2379`, is one).
async fn ensure_etcd(
    etcd: &EtcdArgs,
    client: &Client,
    data: &Path,
) -> Result<Option<LocalEtcd>, HqError> {
    if answers(client).await {
        info!(
            "using the etcd that answers at {}",
            etcd.endpoints_display()
        );
        return Ok(None);
    }
    let Some(addr) = local_endpoint(&etcd.endpoints) else {
        return Err(HqError::Refused(format!(
            "no etcd answers at {}; start it, or give --etcd one loopback address \
             (http://127.0.0.1:PORT, the default is 2379) to let viking up start one there",
            etcd.endpoints_display()
        )));
    };
    let local = start_etcd(data, addr)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !answers(client).await {
        if Instant::now() > deadline {
            return Err(HqError::Refused(format!(
                "the local etcd did not answer in 30 s; see {}",
                data.join("etcd.log").display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    info!(
        data = %data.join("etcd").display(),
        log = %data.join("etcd.log").display(),
        "started a local etcd at http://{addr}"
    );
    Ok(Some(local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viking_up_starts_etcd_only_at_one_plain_loopback_address() {
        let one = |s: &str| local_endpoint(&[s.to_owned()]);
        assert_eq!(
            one("http://127.0.0.1:2379"),
            Some("127.0.0.1:2379".parse().unwrap())
        );
        assert_eq!(
            one("http://[::1]:40001/"),
            Some("[::1]:40001".parse().unwrap())
        );
        assert_eq!(
            one("https://127.0.0.1:2379"),
            None,
            "TLS: not ours to start"
        );
        assert_eq!(one("http://10.0.0.1:2379"), None, "another host's");
        let two = [
            "http://127.0.0.1:1".to_owned(),
            "http://127.0.0.1:2".to_owned(),
        ];
        assert_eq!(local_endpoint(&two), None, "a cluster");
    }
}
