//! The router as a daemon: its flags (each with a `VIKING_*` env twin), their checks, and the
//! start-up that the `router` binary and `viking up --router` share.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use runtime::etcd::parse_duration;
use runtime::handover::Sockets;
use runtime::{CancellationToken, process};
use schema::Prefix;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, warn};

use crate::pool::Pools;
use crate::proxy::{AccessLog, Settings};
use crate::server::{Limits, Serving};
use crate::state::State;

/// The router's flags (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Router")]
pub struct RouterArgs {
    /// Plain HTTP listener: ADDR:PORT, :PORT (all addresses) or `off`
    #[arg(long, env = "VIKING_HTTP", default_value = ":80")]
    pub http: String,

    /// HTTPS listener: ADDR:PORT, :PORT (all addresses) or `off`
    #[arg(long, env = "VIKING_HTTPS", default_value = ":443")]
    pub https: String,

    /// Admin server: /metrics, /healthz, /state
    #[arg(long, env = "VIKING_ROUTER_ADMIN", default_value = "127.0.0.1:9102")]
    pub admin: SocketAddr,

    /// Directory of certificates: <domain>.crt (PEM chain, leaf first) with <domain>.key, a
    /// wildcard as _.example.com.crt; read again when its files change. etcd `certs/` wins
    /// for a domain both have
    #[arg(long, env = "VIKING_CERTS")]
    pub certs: Option<PathBuf>,

    /// Expect a PROXY protocol v1 or v2 header on every connection (from a front load
    /// balancer) and take the client address from it; without this flag a PROXY header is
    /// never trusted (the request is refused as malformed)
    #[arg(long, env = "VIKING_PROXY_PROTOCOL")]
    pub proxy_protocol: bool,

    /// Write one JSON line per request to this file (`-`: stdout)
    #[arg(long, env = "VIKING_ACCESS_LOG")]
    pub access_log: Option<String>,

    /// Time open requests get to finish after SIGTERM
    #[arg(long, env = "VIKING_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub grace: Duration,

    /// Time to receive a request head (and a TLS handshake), counted from when the router
    /// starts waiting for it; so also how long an idle keep-alive connection stays open
    #[arg(long, env = "VIKING_HEAD_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub head_timeout: Duration,

    /// Time limit for connecting to a backend
    #[arg(long, env = "VIKING_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Time limit for a backend's response head, from when the request was sent (504 after)
    #[arg(long, env = "VIKING_RESPONSE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub response_timeout: Duration,

    /// Longest wait for the next bytes of a body once it has begun, from the client (408, and
    /// the connection closed) or from the backend (the response cut short); and for a client
    /// to take what is written to it (one that stops reading, or acknowledges nothing, is left)
    #[arg(long, env = "VIKING_BODY_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub body_timeout: Duration,

    /// Close an upgraded connection (WebSocket) after this long without a byte either way: a
    /// client or backend gone without a word would otherwise keep it, its permit and its
    /// backend connection
    #[arg(long, env = "VIKING_TUNNEL_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub tunnel_timeout: Duration,

    /// Close a pooled backend connection idle for this long instead of using it
    #[arg(long, env = "VIKING_BACKEND_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub backend_idle_timeout: Duration,

    /// Most idle keep-alive connections kept per backend (the pool follows demand: those idle
    /// for --backend-idle-timeout are closed); as many as requests run at once avoids a new
    /// backend connection per request under load
    #[arg(long, env = "VIKING_BACKEND_POOL", default_value_t = 1024)]
    pub backend_pool: usize,

    /// Most client connections open at once; further ones wait in the kernel's queue
    #[arg(long, env = "VIKING_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,

    /// Largest request head, e.g. 64K (at least 8K)
    #[arg(long, env = "VIKING_MAX_HEAD", default_value = "64K", value_parser = parse_size)]
    pub max_head: u64,

    /// Most header fields in a request head
    #[arg(long, env = "VIKING_MAX_HEADERS", default_value_t = 100)]
    pub max_headers: usize,

    /// Largest request body, e.g. 64M (413 beyond it)
    #[arg(long, env = "VIKING_MAX_BODY", default_value = "64M", value_parser = parse_size)]
    pub max_body: u64,

    /// Threads serving connections (default: one per core); `viking up --router` runs it on
    /// `viking up`'s own thread
    #[arg(long, env = "VIKING_ROUTER_THREADS")]
    pub threads: Option<usize>,

    /// Most concurrent HTTP/2 streams per client connection
    #[arg(long, env = "VIKING_MAX_STREAMS", default_value_t = 256)]
    pub max_streams: u32,
}

impl RouterArgs {
    /// The threads the `router` binary runs on.
    pub fn thread_count(&self) -> usize {
        self.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
            .max(1)
    }

    /// The defaults (and `VIKING_*` env twins), as the `router` binary would take them with
    /// no flags: for `viking up --router`, which sets only the listeners.
    pub fn defaults() -> Self {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            router: RouterArgs,
        }
        <Only as clap::Parser>::try_parse_from(["router"])
            .map(|o| o.router)
            .unwrap_or_else(|e| panic!("the router's defaults parse: {e}"))
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    schema::parse_memory(s)
}

/// Why the router did not start: exit 2, nothing served.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "--{flag} {value:?} is not an address to listen on; write ADDR:PORT (e.g. 0.0.0.0:80), \
         :PORT for all addresses, or off"
    )]
    Listen { flag: &'static str, value: String },
    #[error("--http and --https are both off: the router would serve nothing; give one")]
    NothingToServe,
    #[error(
        "cannot listen on --{flag} {addr}: {error}; pick another address (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    )]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error(
        "cannot make the epoll set that holds idle connections: {0}; the limit on open files \
         (ulimit -n) or on epoll instances (fs.epoll.max_user_instances) may be reached"
    )]
    Parking(std::io::Error),
    #[error("--max-head {0} is below 8K; HTTP heads need at least 8192 bytes")]
    MaxHead(u64),
    #[error("--certs {}: {error}; pass a directory this user may read", dir.display())]
    Certs { dir: PathBuf, error: std::io::Error },
    #[error("--access-log {path}: {error}; pass a file this user may write, or - for stdout")]
    AccessLog { path: String, error: std::io::Error },
    #[error("TLS set-up failed: {0}")]
    Tls(String),
}

impl runtime::Fatal for StartError {
    fn exit_code(&self) -> u8 {
        process::USAGE
    }
}

/// `ADDR:PORT`, `:PORT` or `off`.
pub fn parse_listen(flag: &'static str, value: &str) -> Result<Option<SocketAddr>, StartError> {
    if value == "off" {
        return Ok(None);
    }
    let full = match value.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => value.to_owned(),
    };
    full.parse().map(Some).map_err(|_| StartError::Listen {
        flag,
        value: value.to_owned(),
    })
}

/// Flags that passed their checks.
#[derive(Debug, Clone)]
pub struct Checked {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub args: RouterArgs,
}

impl RouterArgs {
    /// Checks every flag; binds nothing and needs no etcd.
    pub fn check(&self) -> Result<Checked, StartError> {
        let http = parse_listen("http", &self.http)?;
        let https = parse_listen("https", &self.https)?;
        if http.is_none() && https.is_none() {
            return Err(StartError::NothingToServe);
        }
        if self.max_head < 8192 {
            return Err(StartError::MaxHead(self.max_head));
        }
        if let Some(dir) = &self.certs {
            std::fs::read_dir(dir).map_err(|error| StartError::Certs {
                dir: dir.clone(),
                error,
            })?;
        }
        Ok(Checked {
            http,
            https,
            args: self.clone(),
        })
    }
}

impl Checked {
    /// This router's name for its files under the run dir: after its first listener, so that
    /// two routers of one host (other ports) have their own upgrade sockets.
    pub fn name(&self) -> String {
        let first = self
            .http
            .or(self.https)
            .map(|a| a.to_string())
            .unwrap_or_default();
        format!("router-{}", first.replace(['[', ']'], ""))
    }
}

/// A started router.
pub struct Running {
    pub state: Arc<State>,
    /// Where each listener is (the ports the kernel chose for `:0`).
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
    serving: Arc<Serving>,
    grace: Duration,
    shutdown: CancellationToken,
    background: CancellationToken,
    /// Copies of the listening sockets, for a successor (`router --upgrade`).
    sockets: Arc<Sockets>,
}

/// Binds every listener, then serves until `shutdown`. `client` may point at an etcd that is
/// down: routes come when it answers.
pub async fn start(
    checked: Checked,
    prefix: Prefix,
    client: Client,
    shutdown: CancellationToken,
) -> Result<Running, StartError> {
    start_inheriting(checked, prefix, client, shutdown, BTreeMap::new()).await
}

/// [`start`] for a router that takes over from a running one (`router --upgrade`):
/// `inherited` holds its listening sockets (`http`, `https`, `admin`), used instead of binding;
/// they are served on once the routes (and certificates) are read from etcd, so a successor
/// that never syncs answers nothing.
pub async fn start_inheriting(
    checked: Checked,
    prefix: Prefix,
    client: Client,
    shutdown: CancellationToken,
    inherited: BTreeMap<String, OwnedFd>,
) -> Result<Running, StartError> {
    let upgrading = !inherited.is_empty();
    let sockets = Arc::new(Sockets::inheriting(inherited));
    let args = &checked.args;
    let nofile = runtime::process::raise_nofile().unwrap_or(0);
    let needed = (args.max_connections as u64)
        .saturating_mul(2)
        .saturating_add(256);
    if nofile < needed {
        warn!(
            nofile,
            "--max-connections {} needs about {needed} file descriptors (a client's and a \
             backend's each) and this process may open {nofile}: raise its nofile limit \
             (LimitNOFILE= in the systemd unit) or lower --max-connections",
            args.max_connections
        );
    }
    let access_log = match &args.access_log {
        None => None,
        Some(path) => Some(
            AccessLog::open(path).map_err(|error| StartError::AccessLog {
                path: path.clone(),
                error,
            })?,
        ),
    };
    // Each listener: the one a predecessor handed over, or a new one.
    let bind = |flag: &'static str, addr: SocketAddr| {
        match sockets.inherit(flag) {
            Some(fd) => {
                let listener = std::net::TcpListener::from(fd);
                listener
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpListener::from_std(listener))
            }
            None if flag == "admin" => std::net::TcpListener::bind(addr).and_then(|listener| {
                listener.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(listener)
            }),
            None => crate::server::bind(addr),
        }
        .map_err(|error| StartError::Bind { flag, addr, error })
    };
    let http = checked.http.map(|a| bind("http", a)).transpose()?;
    let https = checked.https.map(|a| bind("https", a)).transpose()?;
    for listener in http.iter().chain(https.iter()) {
        if let Err(e) = crate::server::drop_silent_clients(listener, args.body_timeout * 2) {
            warn!(error = %e, "cannot set TCP_USER_TIMEOUT: a client gone without a word is dropped only by the kernel's retransmission limit");
        }
    }
    let admin = bind("admin", args.admin)?;
    for (name, listener) in [
        ("http", http.as_ref()),
        ("https", https.as_ref()),
        ("admin", Some(&admin)),
    ] {
        if let Some(listener) = listener {
            sockets.offer(name.to_owned(), listener);
        }
    }
    let addr_of =
        |l: &Option<tokio::net::TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
    let (http_addr, https_addr) = (addr_of(&http), addr_of(&https));
    let admin_addr = admin.local_addr().unwrap_or(args.admin);
    let settings = Settings {
        connect_timeout: args.connect_timeout,
        response_timeout: args.response_timeout,
        body_timeout: args.body_timeout,
        tunnel_timeout: args.tunnel_timeout,
        max_body: usize::try_from(args.max_body).unwrap_or(usize::MAX),
        https_port: https_addr.map_or(443, |a| a.port()),
    };
    let pool = Pools::new(args.backend_pool, args.backend_idle_timeout);
    let state = State::new(prefix, settings, access_log, pool);
    let limits = Limits {
        head_timeout: args.head_timeout,
        max_head_bytes: usize::try_from(args.max_head).unwrap_or(usize::MAX),
        max_headers: args.max_headers,
        max_streams: args.max_streams,
        proxy_protocol: args.proxy_protocol,
    };
    let parking = crate::park::Parking::new().map_err(StartError::Parking)?;
    let serving = Arc::new(Serving {
        parking,
        state: state.clone(),
        builder: crate::server::builder(&limits),
        limits,
        permits: Arc::new(Semaphore::new(args.max_connections)),
        accepting: TaskTracker::new(),
        stop: CancellationToken::new(),
    });
    let background = CancellationToken::new();
    let span = tracing::Span::current();
    // In the accept loops' tracker: it ends at the stop, with the parked connections closed.
    serving
        .accepting
        .spawn(crate::park::run(serving.clone()).instrument(span.clone()));
    tokio::spawn(
        crate::state::follow(
            state.clone(),
            client,
            args.certs.clone(),
            background.clone(),
        )
        .instrument(span.clone()),
    );
    {
        let (state, background) = (state.clone(), background.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => state.pool.sweep(),
                    () = background.cancelled() => return,
                }
            }
        });
    }
    let acceptor = match &https {
        Some(_) => Some(tokio_rustls::TlsAcceptor::from(
            crate::tls::server_config(state.certs.clone())
                .map_err(|e| StartError::Tls(e.to_string()))?,
        )),
        None => None,
    };
    let front = {
        let (state, serving, background) = (state.clone(), serving.clone(), background.clone());
        async move {
            if upgrading {
                // Until the routes and certificates are read, the predecessor answers.
                while !state.is_synced() {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(20)) => {}
                        () = background.cancelled() => return,
                    }
                }
            }
            let span = tracing::Span::current();
            tokio::spawn(
                crate::admin::serve(admin, state.clone(), background.clone())
                    .instrument(span.clone()),
            );
            if let Some(l) = http {
                serving.accepting.spawn(
                    crate::server::accept_loop(serving.clone(), l, None).instrument(span.clone()),
                );
            }
            if let Some(l) = https {
                serving.accepting.spawn(
                    crate::server::accept_loop(serving.clone(), l, acceptor)
                        .instrument(span.clone()),
                );
            }
        }
        .instrument(span.clone())
    };
    if upgrading {
        tokio::spawn(front);
    } else {
        front.await;
    }
    info!(
        http = ?http_addr,
        https = ?https_addr,
        admin = %admin_addr,
        proxy_protocol = args.proxy_protocol,
        "router listening"
    );
    Ok(Running {
        state,
        http: http_addr,
        https: https_addr,
        admin: admin_addr,
        serving,
        grace: args.grace,
        shutdown,
        background,
        sockets,
    })
}

impl Running {
    /// The listening sockets by name (`http`, `https`, `admin`) offered to a successor.
    pub fn sockets(&self) -> Arc<Sockets> {
        self.sockets.clone()
    }

    /// Waits for `shutdown`, stops accepting (the listening sockets close: a client that
    /// connects now is refused, not queued), lets open requests finish for `--grace`, then
    /// cuts the rest; returns how many connections were cut.
    pub async fn wait(self) -> usize {
        self.shutdown.cancelled().await;
        self.serving.stop.cancel();
        // The accept loops take what waits in their queues and drop their listeners as they
        // return; the copies go now. (After a hand-over the successor holds its own.)
        self.sockets.withdraw("");
        self.serving.accepting.close();
        self.serving.accepting.wait().await;
        self.state.connections.close();
        let open = self.state.connections.len();
        info!(open, grace = ?self.grace, "stopping: open connections finish their requests");
        let drained = tokio::time::timeout(self.grace, self.state.connections.wait()).await;
        let cut = if drained.is_err() {
            let cut = self.state.connections.len();
            warn!(
                cut,
                "connections still open at the end of the grace period: closed"
            );
            self.state.cut.cancel();
            let _ =
                tokio::time::timeout(Duration::from_secs(2), self.state.connections.wait()).await;
            cut
        } else {
            0
        };
        self.background.cancel();
        cut
    }
}
