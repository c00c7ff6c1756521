//! The ambassador's tasks: follow etcd, keep one listener per allocated TCP service port,
//! proxy each connection to a live backend, drain on shutdown.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::Client;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use runtime::watch::{self, Kv, WatchUpdate};
use schema::{Dir, Prefix};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::relay::{self, Ended, Moved, RelayConfig};
use crate::routes::{Routes, Service};

/// Settings of one ambassador.
#[derive(Debug, Clone)]
pub struct Config {
    pub prefix: Prefix,
    /// This host's id, for the same-host preference.
    pub host: String,
    /// Address every listener binds (the Docker bridge gateway in production).
    pub bind: IpAddr,
    /// Prefer backends on this host while one is healthy.
    pub prefer_local: bool,
    pub connect_timeout: Duration,
    /// Backends tried per connection before the client is closed.
    pub connect_attempts: usize,
    pub relay: RelayConfig,
    /// How long open connections may finish after SIGTERM.
    pub grace: Duration,
    pub max_connections: usize,
    pub max_connections_per_listener: usize,
    /// Threads that accept and relay connections, each with its own listening socket per
    /// port (SO_REUSEPORT) and its own single-threaded runtime: the calling runtime is the
    /// first of them.
    pub threads: usize,
    /// TCP congestion control for the hops that stay on this host: every client (containers
    /// here reach the ambassador over the bridge) and backends on this host. `None`: the
    /// host's default. See [`DEFAULT_LOCAL_CONGESTION`].
    pub local_congestion: Option<String>,
    /// Service DNS, built from the same watches as the routes; `None`: no DNS.
    pub dns: Option<crate::dns::DnsSettings>,
}

impl Config {
    pub fn new(prefix: Prefix, host: String, bind: IpAddr) -> Self {
        Self {
            prefix,
            host,
            bind,
            prefer_local: false,
            connect_timeout: Duration::from_secs(1),
            connect_attempts: 3,
            relay: RelayConfig::default(),
            grace: Duration::from_secs(30),
            max_connections: 65_536,
            max_connections_per_listener: 16_384,
            threads: 1,
            local_congestion: None,
            dns: None,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabel {
    service: String,
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    service: String,
    backend: String,
}

/// The Prometheus metrics, registered once in a registry passed in.
#[derive(Clone, Default)]
struct Metrics {
    active: Family<ServiceLabel, Gauge>,
    connections: Family<ServiceLabel, Counter>,
    failed: Family<ServiceLabel, Counter>,
    bytes: Family<BytesLabel, Counter>,
    connect_errors: Family<BackendLabel, Counter>,
    ejections: Family<BackendLabel, Counter>,
    synced: Gauge,
    listeners: Gauge,
}

impl Metrics {
    fn register(reg: &mut Registry) -> Self {
        let m = Metrics::default();
        reg.register(
            "ambassador_connections_active",
            "Connections open now",
            m.active.clone(),
        );
        reg.register(
            "ambassador_connections",
            "Connections accepted",
            m.connections.clone(),
        );
        reg.register(
            "ambassador_connections_failed",
            "Connections closed because no backend answered",
            m.failed.clone(),
        );
        reg.register(
            "ambassador_bytes",
            "Bytes relayed (up: client to backend)",
            m.bytes.clone(),
        );
        reg.register(
            "ambassador_backend_connect_errors",
            "Failed connects to a backend",
            m.connect_errors.clone(),
        );
        reg.register(
            "ambassador_backend_ejections",
            "Times a backend was ejected",
            m.ejections.clone(),
        );
        reg.register(
            "ambassador_etcd_synced",
            "1 once routes were read from etcd",
            m.synced.clone(),
        );
        reg.register(
            "ambassador_listeners",
            "Listening sockets",
            m.listeners.clone(),
        );
        m
    }
}

/// State shared by the tasks, the admin server and tests.
pub struct Shared {
    pub config: Config,
    routes: tokio::sync::watch::Sender<Arc<Routes>>,
    zone: tokio::sync::watch::Sender<Arc<crate::dns::Zone>>,
    synced: AtomicBool,
    /// Ports with a bound listener.
    listening: Mutex<BTreeMap<u16, SocketAddr>>,
    registry: Registry,
    metrics: Metrics,
    /// Connections accepted, per thread.
    accepted: Box<[AtomicU64]>,
    /// How many threads take new connections (`steer`).
    steer: tokio::sync::watch::Sender<usize>,
}

impl Shared {
    pub fn new(config: Config) -> Arc<Self> {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let (routes, _) = tokio::sync::watch::channel(Arc::new(Routes::default()));
        let empty = match &config.dns {
            Some(settings) => crate::dns::Zone::empty(settings),
            None => crate::dns::Zone::empty(&crate::dns::DnsSettings::default()),
        };
        let (zone, _) = tokio::sync::watch::channel(Arc::new(empty));
        let accepted = (0..config.threads.max(1))
            .map(|_| AtomicU64::new(0))
            .collect();
        let (steer, _) = tokio::sync::watch::channel(1);
        Arc::new(Self {
            config,
            routes,
            zone,
            synced: AtomicBool::new(false),
            listening: Mutex::default(),
            registry,
            metrics,
            accepted,
            steer,
        })
    }

    /// Connections accepted so far by each thread (`steer` decides which threads' listening
    /// sockets take them).
    pub fn accepted(&self) -> Vec<u64> {
        self.accepted
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    pub fn routes(&self) -> Arc<Routes> {
        self.routes.borrow().clone()
    }

    /// The service DNS zone as it changes (empty until the first sync, or without DNS).
    pub fn zone(&self) -> tokio::sync::watch::Receiver<Arc<crate::dns::Zone>> {
        self.zone.subscribe()
    }

    /// Whether the first full read of etcd is done.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Ports with a bound listener and their addresses.
    pub fn listening(&self) -> BTreeMap<u16, SocketAddr> {
        self.listening.lock().expect("listening lock").clone()
    }

    /// Prometheus text.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The `/state` document.
    pub fn state_json(&self) -> serde_json::Value {
        let routes = self.routes();
        let listening = self.listening();
        let services: Vec<_> = routes
            .by_port
            .values()
            .map(|s| {
                serde_json::json!({
                    "port": s.port,
                    "service_port": s.service_port.to_string(),
                    "listening": listening.contains_key(&s.port),
                    "active": s.stats.active.load(Ordering::Relaxed),
                    "connections": s.stats.connections.load(Ordering::Relaxed),
                    "failed": s.stats.failed.load(Ordering::Relaxed),
                    "bytes_up": s.stats.bytes_up.load(Ordering::Relaxed),
                    "bytes_down": s.stats.bytes_down.load(Ordering::Relaxed),
                    "backends": s.backends.iter().map(|b| serde_json::json!({
                        "instance": b.instance,
                        "addr": b.addr.to_string(),
                        "host": b.host,
                        "active": b.active.load(Ordering::Relaxed),
                        "connections": b.connections.load(Ordering::Relaxed),
                        "connect_errors": b.connect_errors.load(Ordering::Relaxed),
                        "ejections": b.ejections.load(Ordering::Relaxed),
                        "ejected": b.is_ejected(Instant::now()),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "synced": self.is_synced(),
            "accepted_per_thread": self.accepted(),
            "threads_taking_new_connections": *self.steer.borrow(),
            "services": services,
        })
    }
}

/// What shutdown did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections that finished within the grace period.
    pub drained: u64,
    /// Connections still open when the grace period ended, closed by force.
    pub cut: u64,
}

/// Runs the ambassador until `shutdown` fires, then drains. `client` may point at an etcd
/// that is down: routes come when it answers, and stay while it is away.
pub async fn run(
    shared: Arc<Shared>,
    client: Client,
    shutdown: CancellationToken,
) -> ShutdownReport {
    let tracker = TaskTracker::new();
    let hard = CancellationToken::new();
    let background = CancellationToken::new();

    // etcd -> routes.
    let (alloc_tx, alloc_rx) = mpsc::channel(64);
    let (svc_tx, svc_rx) = mpsc::channel(64);
    let prefix = &shared.config.prefix;
    tokio::spawn(watch::watch_prefix(
        client.clone(),
        prefix.dir(Dir::PortAllocs),
        alloc_tx,
        background.clone(),
    ));
    tokio::spawn(watch::watch_prefix(
        client,
        prefix.dir(Dir::Services),
        svc_tx,
        background.clone(),
    ));
    tokio::spawn(sync_routes(shared.clone(), alloc_rx, svc_rx).instrument(info_span!("sync")));
    let workers = match Workers::start(shared.config.threads) {
        Ok(w) => w,
        Err(e) => {
            // Fewer threads is slower, not wrong.
            warn!(error = %e, "cannot start worker threads; accepting on one");
            Workers::start(1).expect("one worker needs no thread")
        }
    };
    for worker in &workers.handles {
        worker.spawn(keep_timer_due(
            shared.config.connect_timeout,
            background.clone(),
        ));
    }
    if workers.handles.len() > 1 {
        if let Some(cpu) = workers.cpu.iter().cloned().collect::<Option<Vec<_>>>() {
            let shared = shared.clone();
            let stop = background.clone();
            tokio::spawn(async move { crate::steer::control(cpu, &shared.steer, stop).await });
        }
    }

    // routes -> listeners.
    let global = Arc::new(Semaphore::new(shared.config.max_connections));
    let mut listeners: HashMap<u16, Listener> = HashMap::new();
    let mut changes = shared.routes.subscribe();
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    loop {
        let routes = shared.routes();
        let context = AcceptContext {
            tracker: &tracker,
            global: &global,
            hard: &hard,
            workers: &workers,
        };
        reconcile(&shared, &routes, &mut listeners, &context).await;
        tokio::select! {
            r = changes.changed() => { if r.is_err() { break; } }
            _ = retry.tick() => {}
            () = shutdown.cancelled() => break,
        }
    }

    // Shutdown: stop accepting, let connections finish, then cut the rest.
    for listener in listeners.values() {
        listener.stop.cancel();
    }
    // Once the accept loops have returned, their sockets are closed: nothing is accepted.
    for (_, listener) in listeners.drain() {
        listener.closed().await;
    }
    shared.listening.lock().expect("listening lock").clear();
    background.cancel();
    tracker.close();
    let open = tracker.len() as u64;
    info!(open, grace = ?shared.config.grace, "stopped accepting; waiting for open connections");
    let report = if tokio::time::timeout(shared.config.grace, tracker.wait())
        .await
        .is_ok()
    {
        ShutdownReport {
            drained: open,
            cut: 0,
        }
    } else {
        let cut = tracker.len() as u64;
        hard.cancel();
        tracker.wait().await;
        ShutdownReport {
            drained: open.saturating_sub(cut),
            cut,
        }
    };
    workers.stop().await;
    info!(drained = report.drained, cut = report.cut, "shut down");
    report
}

/// Congestion control for hops on this host. A pacing one such as BBR (a common host
/// default) spaces out segments by timer on a veth or loopback hop that has no queue to
/// protect; measured on loopback with BBR as the default, the proxy's bulk stream went from
/// 0.63-0.75 of direct to 0.90-0.94 with its sending hop on cubic, which does not pace.
pub const DEFAULT_LOCAL_CONGESTION: &str = "cubic";

/// Checks that the kernel offers `name` as a congestion control for this process.
pub fn check_congestion(name: &str) -> std::io::Result<()> {
    let socket = std::net::TcpListener::bind("127.0.0.1:0")?;
    socket2::SockRef::from(&socket).set_tcp_congestion(name.as_bytes())
}

/// Whether the hop to `backend` stays on this host: registered by this host's registrator,
/// or on loopback.
fn on_this_host(backend: &crate::routes::Backend, host: &str) -> bool {
    backend.host == host || backend.addr.ip().is_loopback()
}

/// Sets the congestion control of a socket; `None` keeps the host's default. Checked at
/// start (`check_congestion`), so a failure here only costs speed.
fn set_congestion(fd: &impl std::os::fd::AsFd, name: Option<&str>) {
    if let Some(name) = name {
        let _ = socket2::SockRef::from(fd).set_tcp_congestion(name.as_bytes());
    }
}

/// The threads that accept and relay: the calling runtime, and one more single-threaded
/// runtime on a thread of its own per extra thread. A connection lives on the thread whose
/// socket accepted it, so no connection's wake-ups cross threads (tokio's multi-threaded
/// scheduler measured dearer per connection on 2 cores); the threads' sockets share each port
/// (SO_REUSEPORT) and `steer` picks which of them take new connections.
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    /// Where each thread's CPU time is read (`steer`); the calling runtime's thread first.
    cpu: Vec<Option<std::path::PathBuf>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Workers {
    fn start(count: usize) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut workers = Workers {
            handles: vec![tokio::runtime::Handle::current()],
            cpu: vec![crate::steer::this_thread()],
            threads: Vec::new(),
            stop: stop.clone(),
        };
        for i in 1..count.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.handles.push(rt.handle().clone());
            let stop = stop.clone();
            let (cpu_tx, cpu_rx) = std::sync::mpsc::sync_channel(1);
            let thread = std::thread::Builder::new()
                .name(format!("ambassador-{i}"))
                .spawn(move || {
                    let _ = cpu_tx.send(crate::steer::this_thread());
                    rt.block_on(stop.cancelled());
                })?;
            workers.cpu.push(cpu_rx.recv().ok().flatten());
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// Ends the extra threads (their connections have ended or been cut by now).
    async fn stop(self) {
        self.stop.cancel();
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// One service port's listening sockets, one per worker, and their accept loops.
struct Listener {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Listener {
    /// Waits until every accept loop has returned, so every socket is closed.
    async fn closed(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// What every accept loop shares.
struct AcceptContext<'a> {
    tracker: &'a TaskTracker,
    global: &'a Arc<Semaphore>,
    hard: &'a CancellationToken,
    workers: &'a Workers,
}

/// Keeps a timer due sooner than any connect deadline. tokio wakes its I/O driver (a write to
/// an eventfd) whenever a new timer is due before the driver's next planned wake-up, which
/// every connection's connect timeout would otherwise be: one system call per connection,
/// measured with strace, traded for two wake-ups a second.
async fn keep_timer_due(connect_timeout: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval((connect_timeout / 2).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Applies watch updates to the two key maps and publishes a rebuilt table after each.
async fn sync_routes(
    shared: Arc<Shared>,
    mut allocs_rx: mpsc::Receiver<WatchUpdate>,
    mut services_rx: mpsc::Receiver<WatchUpdate>,
) {
    let mut allocs: BTreeMap<String, Kv> = BTreeMap::new();
    let mut services: BTreeMap<String, Kv> = BTreeMap::new();
    let (mut have_allocs, mut have_services) = (false, false);
    loop {
        tokio::select! {
            u = allocs_rx.recv() => match u {
                Some(u) => { have_allocs |= matches!(u, WatchUpdate::Snapshot { .. }); watch::apply(&mut allocs, u); }
                None => return,
            },
            u = services_rx.recv() => match u {
                Some(u) => { have_services |= matches!(u, WatchUpdate::Snapshot { .. }); watch::apply(&mut services, u); }
                None => return,
            },
        }
        if !(have_allocs && have_services) {
            continue;
        }
        let previous = shared.routes();
        let routes = Routes::build(&shared.config.prefix, &allocs, &services, &previous);
        debug!(services = routes.by_port.len(), "routes rebuilt");
        shared.routes.send_replace(Arc::new(routes));
        if let Some(settings) = &shared.config.dns {
            let revision = allocs
                .values()
                .chain(services.values())
                .map(|kv| kv.mod_revision)
                .max()
                .unwrap_or(0);
            let serial = u32::try_from(revision.rem_euclid(1 << 32)).unwrap_or(0);
            let zone = crate::dns::Zone::build(
                settings,
                &shared.config.prefix,
                &allocs,
                &services,
                serial,
            );
            shared.zone.send_replace(Arc::new(zone));
        }
        if !shared.synced.swap(true, Ordering::Relaxed) {
            shared.metrics.synced.set(1);
            info!("routes synced from etcd");
        }
    }
}

/// Opens listeners for new ports, closes those of released ports.
async fn reconcile(
    shared: &Arc<Shared>,
    routes: &Routes,
    listeners: &mut HashMap<u16, Listener>,
    context: &AcceptContext<'_>,
) {
    let released: Vec<u16> = listeners
        .keys()
        .filter(|port| !routes.by_port.contains_key(port))
        .copied()
        .collect();
    for port in released {
        if let Some(listener) = listeners.remove(&port) {
            listener.stop.cancel();
            // The sockets close when the accept loops return; only then is the port free.
            listener.closed().await;
            shared
                .listening
                .lock()
                .expect("listening lock")
                .remove(&port);
            info!(
                port,
                "port released; listener closed, its connections drain"
            );
        }
    }
    for (&port, service) in &routes.by_port {
        if listeners.contains_key(&port) {
            continue;
        }
        let addr = SocketAddr::new(shared.config.bind, port);
        // One socket per worker, all bound before any accepts: a port is served by all
        // workers or not at all.
        let sockets: std::io::Result<Vec<std::net::TcpListener>> = context
            .workers
            .handles
            .iter()
            .map(|_| listen(addr, shared.config.local_congestion.as_deref()))
            .collect();
        match sockets {
            Ok(sockets) => {
                let local = sockets[0].local_addr().unwrap_or(addr);
                info!(addr = %local, service = %service.service_port, "listening on");
                shared
                    .listening
                    .lock()
                    .expect("listening lock")
                    .insert(port, local);
                let stop = CancellationToken::new();
                // The per-listener limit holds for the port, whichever thread accepts.
                let local_limit =
                    Arc::new(Semaphore::new(shared.config.max_connections_per_listener));
                let tasks = sockets
                    .into_iter()
                    .zip(&context.workers.handles)
                    .enumerate()
                    .map(|(thread, (socket, worker))| {
                        worker.spawn(accept_loop(
                            shared.clone(),
                            socket,
                            (port, thread, context.workers.handles.len()),
                            stop.clone(),
                            context.tracker.clone(),
                            (context.global.clone(), local_limit.clone()),
                            context.hard.clone(),
                        ))
                    })
                    .collect();
                listeners.insert(port, Listener { stop, tasks });
            }
            Err(e) => {
                warn!(addr = %addr, service = %service.service_port, error = %e, "cannot listen; retrying")
            }
        }
    }
    shared.metrics.listeners.set(listeners.len() as i64);
}

async fn accept_loop(
    shared: Arc<Shared>,
    socket: std::net::TcpListener,
    (port, thread, threads): (u16, usize, usize),
    stop: CancellationToken,
    tracker: TaskTracker,
    (global, local): (Arc<Semaphore>, Arc<Semaphore>),
    hard: CancellationToken,
) {
    // Registered with the runtime of the thread this loop runs on.
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            warn!(port, error = %e, "cannot watch the listening socket");
            return;
        }
    };
    let mut backoff = runtime::Backoff::new(Duration::from_millis(5), Duration::from_secs(1));
    // One wait for the stop signal for the loop's life, not one registered per connection.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    // The first thread's socket carries the port's steering program (`steer`).
    let mut steer = (thread == 0 && threads > 1).then(|| shared.steer.subscribe());
    if let Some(taking) = &mut steer {
        steer_port(&listener, port, *taking.borrow_and_update());
    }
    loop {
        // A permit before accept: at the limit, clients wait in the kernel's backlog.
        let permits = tokio::select! {
            biased;
            p = async { (global.clone().acquire_owned().await, local.clone().acquire_owned().await) } => p,
            () = &mut stopped => return,
        };
        let (Ok(g), Ok(l)) = permits else { return };
        let accepted = tokio::select! {
            biased;
            () = &mut stopped => return,
            Some(taking) = steer_changed(&mut steer) => {
                steer_port(&listener, port, taking);
                continue;
            }
            a = listener.accept() => a,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(port, error = %e, "accept failed; backing off");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        backoff.reset();
        shared.accepted[thread].fetch_add(1, Ordering::Relaxed);
        let Some(service) = shared.routes().by_port.get(&port).cloned() else {
            continue;
        };
        let shared = shared.clone();
        let hard = hard.clone();
        // No span per connection: it would cost space in every task and time on every
        // accept; the few log lines of a connection name their service and backend.
        tracker.spawn(async move {
            let _permits = (g, l);
            handle(&shared, client, &service, &hard).await;
        });
    }
}

/// The next number of threads taking new connections; never, for a socket that does not steer.
async fn steer_changed(steer: &mut Option<tokio::sync::watch::Receiver<usize>>) -> Option<usize> {
    match steer {
        Some(taking) => match taking.changed().await {
            Ok(()) => Some(*taking.borrow_and_update()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Puts the program for `taking` threads on the port's socket group.
fn steer_port(listener: &TcpListener, port: u16, taking: usize) {
    if let Err(e) = crate::steer::attach(listener, taking) {
        // The kernel's hash spreads them instead: slower on light loads, never wrong.
        debug!(port, error = %e, "cannot steer new connections");
    }
}

/// One connection: pick, connect (with retries on other backends), relay.
/// One service's metric handles, looked up once per service rather than per connection.
#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    name: String,
    active: Gauge,
    connections: Counter,
    failed: Counter,
    bytes_up: Counter,
    bytes_down: Counter,
}

impl Metrics {
    fn service<'s>(&self, service: &'s Service) -> &'s ServiceMetrics {
        service.stats.metrics.get_or_init(|| {
            let name = service.service_port.to_string();
            let label = ServiceLabel {
                service: name.clone(),
            };
            let bytes = |direction| {
                self.bytes
                    .get_or_create(&BytesLabel {
                        service: name.clone(),
                        direction,
                    })
                    .clone()
            };
            ServiceMetrics {
                active: self.active.get_or_create(&label).clone(),
                connections: self.connections.get_or_create(&label).clone(),
                failed: self.failed.get_or_create(&label).clone(),
                bytes_up: bytes("up"),
                bytes_down: bytes("down"),
                name,
            }
        })
    }
}

/// `hard` cuts the connection (at the end of the grace period after SIGTERM).
async fn handle(shared: &Shared, client: TcpStream, service: &Service, hard: &CancellationToken) {
    let sm = shared.metrics.service(service);
    sm.connections.inc();
    service.stats.connections.fetch_add(1, Ordering::Relaxed);
    // Boxed: the connect phase's state is freed once connected instead of taking space in
    // the task for the connection's whole life.
    let connected = tokio::select! {
        c = Box::pin(connect_any(shared, service, sm)) => c,
        () = hard.cancelled() => return,
    };
    let Some((upstream, backend)) = connected else {
        service.stats.failed.fetch_add(1, Ordering::Relaxed);
        sm.failed.inc();
        return;
    };
    backend.active.fetch_add(1, Ordering::Relaxed);
    backend.connections.fetch_add(1, Ordering::Relaxed);
    service.stats.active.fetch_add(1, Ordering::Relaxed);
    sm.active.inc();
    // Built in place (not first bound to a local) so the task holds the relay's state once.
    let ended = tokio::select! {
        e = relay::relay(client, upstream, &shared.config.relay, true) => Some(e),
        () = hard.cancelled() => None,
    };
    let moved = match ended {
        None => {
            debug!(service = %sm.name, backend = %backend.addr, "closed at the end of the grace period");
            Moved::default()
        }
        Some(Ended::Done(m)) => m,
        Some(Ended::Idle(m)) => {
            debug!(service = %sm.name, backend = %backend.addr, "closed after the idle timeout");
            m
        }
        Some(Ended::Failed(m, e)) => {
            debug!(service = %sm.name, backend = %backend.addr, error = %e, "relay ended with an error");
            m
        }
    };
    let stats = &service.stats;
    stats.bytes_up.fetch_add(moved.up, Ordering::Relaxed);
    stats.bytes_down.fetch_add(moved.down, Ordering::Relaxed);
    sm.bytes_up.inc_by(moved.up);
    sm.bytes_down.inc_by(moved.down);
    backend.active.fetch_sub(1, Ordering::Relaxed);
    stats.active.fetch_sub(1, Ordering::Relaxed);
    sm.active.dec();
}

/// Picks backends and connects, trying up to `connect_attempts` of them: the client sees no
/// failure while a live backend exists. `None` when none answered.
async fn connect_any<'s>(
    shared: &Shared,
    service: &'s Service,
    sm: &ServiceMetrics,
) -> Option<(TcpStream, &'s crate::routes::Backend)> {
    let m = &shared.metrics;
    let config = &shared.config;
    let local = config.prefer_local.then_some(config.host.as_str());
    let mut rng = fastrand::Rng::new();
    let mut tried = Vec::new();
    while tried.len() < config.connect_attempts {
        let Some(i) = service.pick(&tried, local, Instant::now(), &mut rng) else {
            break;
        };
        tried.push(i);
        let backend = &service.backends[i];
        // Set before the SYN: switched later, after BBR's start-up, cubic would go on from
        // a window BBR left small (8 bulk streams measured 0.48 of direct that way).
        let congestion = config
            .local_congestion
            .as_deref()
            .filter(|_| on_this_host(backend, &config.host));
        match tokio::time::timeout(config.connect_timeout, connect(backend.addr, congestion)).await
        {
            Ok(Ok(stream)) => {
                backend.connected();
                return Some((stream, backend));
            }
            Ok(Err(e)) => {
                debug!(service = %sm.name, backend = %backend.addr, error = %e, "connect failed")
            }
            Err(_) => debug!(service = %sm.name, backend = %backend.addr, "connect timed out"),
        }
        let bl = BackendLabel {
            service: sm.name.clone(),
            backend: backend.addr.to_string(),
        };
        m.connect_errors.get_or_create(&bl).inc();
        if backend.failed(Instant::now()) {
            warn!(service = %sm.name, backend = %backend.addr, "backend ejected after consecutive connect failures");
            m.ejections.get_or_create(&bl).inc();
        }
    }
    if service.backends.is_empty() {
        warn!(service = %sm.name, "no backends registered; is registrator running on the backend hosts?");
    } else {
        warn!(service = %sm.name, tried = tried.len(), "no backend answered");
    }
    None
}

/// Kernel accept queue of each listener: bursts of new connections wait here, not in SYN
/// retransmits (Linux caps it at net.core.somaxconn).
const BACKLOG: i32 = 4096;

/// A non-blocking TCP socket of `addr`'s family.
fn tcp_socket(addr: SocketAddr) -> nix::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{self as sock, AddressFamily, SockFlag, SockType};
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    sock::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// A non-blocking listening socket that shares its port with the other workers' sockets
/// (SO_REUSEPORT: new connections go to one of them, `steer`). Only sockets of the same
/// user can join; a port held by anything else fails with EADDRINUSE.
/// `congestion` and TCP_NODELAY are inherited by every accepted socket.
fn listen(addr: SocketAddr, congestion: Option<&str>) -> std::io::Result<std::net::TcpListener> {
    use nix::sys::socket::{self as sock, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let fd = tcp_socket(addr)?;
    sock::setsockopt(&fd, sock::sockopt::ReuseAddr, &true)?;
    sock::setsockopt(&fd, sock::sockopt::ReusePort, &true)?;
    // Accepted sockets inherit it: no system call per connection.
    sock::setsockopt(&fd, sock::sockopt::TcpNoDelay, &true)?;
    set_congestion(&fd, congestion);
    sock::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    sock::listen(
        &fd,
        sock::Backlog::new(BACKLOG).unwrap_or(sock::Backlog::MAXCONN),
    )?;
    Ok(std::net::TcpListener::from(fd))
}

/// Connects to a backend, TCP_NODELAY set before the SYN. Unlike tokio's `TcpStream::connect`,
/// it asks the kernel for the socket's error (getsockopt SO_ERROR) only when the readiness says
/// the connect failed, not after every clean one: one system call less per connection.
async fn connect(addr: SocketAddr, congestion: Option<&str>) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{self as sock, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let fd = tcp_socket(addr)?;
    let _ = sock::setsockopt(&fd, sock::sockopt::TcpNoDelay, &true);
    // The handshake's last ACK waits to ride on the first bytes the relay sends (one
    // segment less per connection); the relay sends it alone when it has nothing to send at
    // once (`relay::relay`'s `ack_pending`), so a backend that speaks first is not held up.
    let _ = socket2::SockRef::from(&fd).set_tcp_quickack(false);
    set_congestion(&fd, congestion);
    match sock::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(fd))?;
    let ready = stream
        .ready(tokio::io::Interest::WRITABLE | tokio::io::Interest::ERROR)
        .await?;
    if ready.is_error() || ready.is_write_closed() {
        let error = stream.take_error()?;
        return Err(error.unwrap_or_else(|| std::io::ErrorKind::ConnectionRefused.into()));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_is_local_when_this_host_registered_the_backend_or_it_is_on_loopback() {
        let backend = |host: &str, addr: &str| {
            crate::routes::Backend::new(
                format!("{host}:000000000001:80"),
                addr.parse().unwrap(),
                host.to_owned(),
            )
        };
        assert!(on_this_host(&backend("a", "10.0.0.1:80"), "a"));
        assert!(on_this_host(&backend("b", "127.0.0.1:80"), "a"));
        assert!(on_this_host(&backend("b", "[::1]:80"), "a"));
        assert!(!on_this_host(&backend("b", "10.0.0.2:80"), "a"));
    }
}
