//! The ambassador's state and its life: follow etcd into the route table and the DNS zone,
//! keep the listeners in step with the table ([`crate::listeners`]), drain on shutdown.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::Client;
use prometheus_client::registry::Registry;
use runtime::watch::{self, Kv, WatchUpdate};
use schema::Dir;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::Config;
use crate::listeners::{AcceptContext, Listener, reconcile};
use crate::metrics::Metrics;
use crate::routes::Routes;
use crate::workers::{Workers, keep_timer_due};

/// Whether etcd answered the last probe, and since when that is so.
#[derive(Debug, Clone, Copy)]
struct EtcdState {
    answering: bool,
    since: std::time::SystemTime,
}

/// How often `run` asks etcd whether it answers, and how long an answer may take: the
/// synced gauge drops within about two of these after etcd stops answering.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Asks etcd for its status every [`PROBE_EVERY`] and records whether it answered, so that
/// `ambassador_etcd_synced` says when the routes may be stale (they keep being served).
async fn probe_etcd(shared: Arc<Shared>, client: Client, stop: CancellationToken) {
    let mut maintenance = client.maintenance_client();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        if !shared.is_synced() {
            continue; // the first read says so itself
        }
        let answered = matches!(
            tokio::time::timeout(PROBE_EVERY, maintenance.status()).await,
            Ok(Ok(_))
        );
        if shared.set_etcd_answering(answered) {
            if answered {
                info!("etcd answers again; routes are current");
            } else {
                warn!("etcd does not answer; serving the last known routes until it does");
            }
        }
    }
}

/// State shared by the tasks, the admin server and tests.
pub struct Shared {
    pub config: Config,
    routes: tokio::sync::watch::Sender<Arc<Routes>>,
    zone: tokio::sync::watch::Sender<Arc<crate::dns::Zone>>,
    /// The first full read of etcd is done: the routes are known (what `/healthz` says).
    synced: AtomicBool,
    /// Whether etcd answers now, and since when (the probe in `run`).
    etcd: Mutex<EtcdState>,
    /// Ports with a bound listener.
    pub(crate) listening: Mutex<BTreeMap<u16, SocketAddr>>,
    registry: Registry,
    pub(crate) metrics: Metrics,
    /// Connections accepted, per thread.
    pub(crate) accepted: Box<[AtomicU64]>,
    /// How many threads take new connections (`steer`).
    pub(crate) steer: tokio::sync::watch::Sender<usize>,
    /// UDP sessions open now, in all (`--max-udp-sessions`).
    pub(crate) udp_sessions: AtomicUsize,
    /// The session limit was logged (again once sessions fall to half of it).
    pub(crate) udp_limit_logged: AtomicBool,
    /// UDP ports with bound sockets.
    pub(crate) udp_listening: Mutex<BTreeMap<u16, SocketAddr>>,
    /// Link-scoped access: who may connect to which service (`crate::access`).
    access: tokio::sync::watch::Sender<Arc<crate::access::Access>>,
    /// This process handed its sockets over to a successor (rather than being stopped): its
    /// UDP sessions linger a moment for the replies on their way (`crate::udp`).
    pub handed_over: AtomicBool,
    /// Listening sockets offered to a successor and inherited from a predecessor, by name:
    /// `tcp/<port>/<thread>`, `udp/<port>/<thread>`, `dns/udp`, `dns/tcp`, `admin`, `lock`.
    pub sockets: runtime::handover::Sockets,
    /// The kernel path, when on and the kernel took the map and the program.
    pub(crate) kernel: Option<sockmap::KernelPath>,
    /// Joined pairs whose peers run here forward in the peers' own sends
    /// (`--kernel-senders`), when asked, the kernel path is on and the kernel took it.
    pub(crate) senders: Option<Arc<sockmap::sender::SenderPath>>,
    /// The backends the sender path watches (as of the last routes).
    sender_backends: Mutex<BTreeSet<SocketAddrV4>>,
    /// UDP balanced by the kernel (`--udp-kernel`), when asked and the kernel took it.
    pub udp_kernel: Option<crate::udp_kernel::KernelUdp>,
}

impl Shared {
    pub fn new(config: Config) -> Arc<Self> {
        Self::inheriting(config, runtime::handover::Sockets::default())
    }

    /// [`Shared::new`] for a process that takes over from a running one: `sockets` holds what
    /// it handed over.
    pub fn inheriting(config: Config, sockets: runtime::handover::Sockets) -> Arc<Self> {
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
        let kernel = kernel_path(&config);
        metrics.kernel_forwarding.set(i64::from(kernel.is_some()));
        let senders = kernel.as_ref().and(config.kernel_senders.as_deref()).and_then(|cgroup| {
            let pairs = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
            match sockmap::sender::SenderPath::attach(cgroup, pairs) {
                Ok(path) => Some(Arc::new(path)),
                Err(why) => {
                    tracing::warn!(
                        "--kernel-senders unavailable, forwarding through the kernel's worker: {why}"
                    );
                    None
                }
            }
        });
        metrics.kernel_senders_on.set(i64::from(senders.is_some()));
        let udp_kernel = config
            .udp_kernel
            .as_deref()
            .and_then(|cgroup| crate::udp_kernel::KernelUdp::start(cgroup, config.bind));
        metrics.udp_kernel.set(i64::from(udp_kernel.is_some()));
        Arc::new(Self {
            config,
            routes,
            zone,
            synced: AtomicBool::new(false),
            etcd: Mutex::new(EtcdState {
                answering: false,
                since: std::time::SystemTime::now(),
            }),
            listening: Mutex::default(),
            registry,
            metrics,
            accepted,
            steer,
            udp_sessions: AtomicUsize::new(0),
            udp_limit_logged: AtomicBool::new(false),
            udp_listening: Mutex::default(),
            handed_over: AtomicBool::new(false),
            access: tokio::sync::watch::channel(Arc::default()).0,
            sockets,
            kernel,
            senders,
            sender_backends: Mutex::default(),
            udp_kernel,
        })
    }

    /// Whether connections are forwarded in the kernel (`--kernel-forward on`, and the kernel
    /// took the map and the program).
    pub fn kernel_forwarding(&self) -> bool {
        self.kernel.is_some()
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

    /// Whether the first full read of etcd is done: the routes are known, and served while
    /// etcd is away.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Whether the routes are current: read once, and etcd answers now. What
    /// `ambassador_etcd_synced` and `/state`'s `synced` say.
    pub fn is_current(&self) -> bool {
        self.is_synced() && self.etcd.lock().expect("etcd state lock").answering
    }

    /// Records whether etcd answered; returns true when that changed.
    fn set_etcd_answering(&self, answering: bool) -> bool {
        let changed = {
            let mut etcd = self.etcd.lock().expect("etcd state lock");
            let changed = etcd.answering != answering;
            if changed {
                *etcd = EtcdState {
                    answering,
                    since: std::time::SystemTime::now(),
                };
            }
            changed
        };
        self.metrics.synced.set(i64::from(self.is_current()));
        changed
    }

    /// Ports with a bound listener and their addresses.
    pub fn listening(&self) -> BTreeMap<u16, SocketAddr> {
        self.listening.lock().expect("listening lock").clone()
    }

    /// Replaces the link-scoped access table (what the watches do; benches and tests).
    pub fn set_access(&self, access: crate::access::Access) {
        self.access.send_replace(Arc::new(access));
    }

    /// The link-scoped access table now.
    pub fn access(&self) -> Arc<crate::access::Access> {
        self.access.borrow().clone()
    }

    /// Decides at once (an address not known yet is refused): for UDP, whose receive loop must
    /// not wait; the client's next datagram asks again.
    pub fn admit_now(
        &self,
        from: std::net::IpAddr,
        service: &schema::ServiceId,
    ) -> crate::access::Decision {
        if self.config.links == crate::access::LinksMode::Open {
            return crate::access::Decision::Accept;
        }
        self.access.borrow().decide(from, service)
    }

    /// Decides a new connection from `from` to `service`; an address not known yet waits up
    /// to `--unknown-source-wait` for the table to learn it. Always accepts with `--links
    /// open`.
    pub async fn admit(
        &self,
        from: std::net::IpAddr,
        service: &schema::ServiceId,
    ) -> crate::access::Decision {
        use crate::access::Decision;
        // The common case: one read of the current table, no subscription.
        let decision = self.admit_now(from, service);
        if decision != Decision::Unknown {
            return decision;
        }
        // Subscribed before looking again, so a change in between is not missed.
        let mut changes = self.access.subscribe();
        let decision = changes.borrow_and_update().decide(from, service);
        if decision != Decision::Unknown {
            return decision;
        }
        let deadline = tokio::time::Instant::now() + self.config.unknown_source_wait;
        loop {
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {
                    let d = changes.borrow_and_update().decide(from, service);
                    if d != Decision::Unknown {
                        return d;
                    }
                }
                _ => return Decision::Unknown,
            }
        }
    }

    /// UDP ports with bound sockets and their addresses.
    pub fn udp_listening(&self) -> BTreeMap<u16, SocketAddr> {
        self.udp_listening.lock().expect("listening lock").clone()
    }

    /// UDP sessions open now, in all.
    pub fn udp_sessions(&self) -> usize {
        self.udp_sessions.load(Ordering::Relaxed)
    }

    /// Prometheus text.
    pub fn metrics_text(&self) -> String {
        if let Some(kernel) = &self.udp_kernel {
            kernel.count(&self.routes());
        }
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
                    "active": s.stats.active.get(),
                    "connections": s.stats.connections.get(),
                    "failed": s.stats.failed.get(),
                    "local_connect_errors": s.stats.local_errors.get(),
                    "bytes_up": s.stats.bytes_up.get(),
                    "bytes_down": s.stats.bytes_down.get(),
                    "kernel_active": s.stats.kernel_active.get(),
                    "kernel_forwarded": s.stats.kernel_forwarded.get(),
                    "kernel_senders": s.stats.kernel_senders.get(),
                    "backends": backends_json(s),
                })
            })
            .collect();
        let udp_listening = self.udp_listening();
        let udp: Vec<_> = routes
            .udp_by_port
            .values()
            .map(|s| {
                serde_json::json!({
                    "port": s.port,
                    "service_port": s.service_port.to_string(),
                    "listening": udp_listening.contains_key(&s.port),
                    "sessions_active": s.stats.sessions_active.get(),
                    "sessions": s.stats.sessions.get(),
                    "datagrams_up": s.stats.datagrams_up.get(),
                    "datagrams_down": s.stats.datagrams_down.get(),
                    "bytes_up": s.stats.bytes_up.get(),
                    "bytes_down": s.stats.bytes_down.get(),
                    "kernel": self.udp_kernel.as_ref().and_then(|k| k.service_state(s.port)).map(
                        |(sends, backends, senders)| serde_json::json!({
                            "sends": sends, "backends": backends, "senders": senders,
                        }),
                    ),
                    "drops": {
                        "no backend": s.stats.udp_drop_no_backend.get(),
                        "session limit": s.stats.udp_drop_limit.get(),
                        "send error": s.stats.udp_drop_send.get(),
                    },
                    "backends": backends_json(s),
                })
            })
            .collect();
        let since = self.etcd.lock().expect("etcd state lock").since;
        serde_json::json!({
            "synced": self.is_current(),
            "routes_read": self.is_synced(),
            "etcd_answering_changed_at": runtime::host::rfc3339(since),
            "accepted_per_thread": self.accepted(),
            "threads_taking_new_connections": *self.steer.borrow(),
            "services": services,
            "udp_services": udp,
            "udp_sessions": self.udp_sessions(),
            "udp_kernel": self.udp_kernel.as_ref().map(|k| k.cgroup.display().to_string()),
            "links": match self.config.links {
                crate::access::LinksMode::Enforced => "enforced",
                crate::access::LinksMode::Open => "open",
            },
            "containers_known": self.access().len(),
        })
    }
}

/// A service's backends and their counters, for `/state` (`active` and `connections` count
/// TCP connections; a UDP session counts in neither).
fn backends_json(service: &crate::routes::Service) -> Vec<serde_json::Value> {
    let now = Instant::now();
    service
        .backends
        .iter()
        .map(|b| {
            serde_json::json!({
                "instance": b.instance,
                "addr": b.addr.to_string(),
                "host": b.host,
                "active": b.active.load(Ordering::Relaxed),
                "connections": b.connections.load(Ordering::Relaxed),
                "connect_errors": b.counters.connect_errors.get(),
                "ejections": b.counters.ejections.get(),
                "ejected": b.is_ejected(now),
            })
        })
        .collect()
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
    let client_for_probe = client.clone();
    tokio::spawn(watch::watch_prefix(
        client.clone(),
        prefix.dir(Dir::Services),
        svc_tx,
        background.clone(),
    ));
    tokio::spawn(sync_routes(shared.clone(), alloc_rx, svc_rx).instrument(info_span!("sync")));
    if shared.config.links == crate::access::LinksMode::Enforced {
        let (containers_tx, containers_rx) = mpsc::channel(64);
        let (stacks_tx, stacks_rx) = mpsc::channel(64);
        let host = schema::HostId::new(shared.config.host.as_str());
        match host {
            Ok(host) => {
                tokio::spawn(watch::watch_prefix(
                    client.clone(),
                    prefix.dir(Dir::HostContainers(&host)),
                    containers_tx,
                    background.clone(),
                ));
            }
            // Not a host id: no container is ever known, every container is refused.
            Err(e) => {
                warn!(host = %shared.config.host, "{e}: no container of this host can be known")
            }
        }
        tokio::spawn(watch::watch_prefix(
            client.clone(),
            prefix.dir(Dir::Stacks),
            stacks_tx,
            background.clone(),
        ));
        tokio::spawn(
            sync_access(shared.clone(), containers_rx, stacks_rx).instrument(info_span!("access")),
        );
    }
    if shared.udp_kernel.is_some() {
        tokio::spawn(resync_udp_kernel(shared.clone(), background.clone()));
    }
    let stats = tokio::spawn(crate::stats::publish(
        shared.clone(),
        client_for_probe.clone(),
        background.clone(),
    ));
    tokio::spawn(probe_etcd(
        shared.clone(),
        client_for_probe,
        background.clone(),
    ));
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
    let mut udp: HashMap<u16, crate::udp::UdpListener> = HashMap::new();
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
        crate::udp::reconcile(&shared, &routes, &mut udp, &workers).await;
        if shared.is_synced() {
            // Sockets of ports released while the predecessor handed over: close them.
            for name in shared.sockets.drop_inherited() {
                debug!(name, "inherited socket of a released port closed");
            }
        }
        tokio::select! {
            r = changes.changed() => { if r.is_err() { break; } }
            _ = retry.tick() => {}
            () = shutdown.cancelled() => break,
        }
    }

    // Shutdown: stop accepting, let connections finish, then cut the rest. UDP has no
    // connections to drain: its sockets are no longer read from now on. No copy of a socket that stops being
    // served stays open: the kernel would queue what comes to it, unanswered, where a closed
    // port refuses it at once and the client goes elsewhere. (The DNS server stops on the same
    // signal.)
    for prefix in ["udp/", "tcp/", "dns/"] {
        shared.sockets.withdraw(prefix);
    }
    // (After a hand-over their sessions linger a moment: awaited once the TCP drain is over.)
    let udp_closing: Vec<_> = udp.drain().map(|(_, socket)| socket.stop()).collect();
    shared.udp_listening.lock().expect("listening lock").clear();
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
    for closing in udp_closing {
        closing.await;
    }
    workers.stop().await;
    // Its lease revoked (left to the successor after a hand-over), so the record goes with
    // this process (bounded: etcd may be away).
    let _ = tokio::time::timeout(Duration::from_secs(3), stats).await;
    info!(drained = report.drained, cut = report.cut, "shut down");
    report
}

/// Rebuilds the access table after every change of this host's containers or the specs, and
/// every 30 s (this host's own addresses may change).
async fn sync_access(
    shared: Arc<Shared>,
    mut containers_rx: mpsc::Receiver<WatchUpdate>,
    mut stacks_rx: mpsc::Receiver<WatchUpdate>,
) {
    let mut containers: BTreeMap<String, Kv> = BTreeMap::new();
    let mut stacks: BTreeMap<String, Kv> = BTreeMap::new();
    let mut refresh = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            u = containers_rx.recv() => match u {
                Some(u) => watch::apply(&mut containers, u),
                None => return,
            },
            u = stacks_rx.recv() => match u {
                Some(u) => watch::apply(&mut stacks, u),
                None => return,
            },
            _ = refresh.tick() => {}
        }
        let access = crate::access::Access::build(
            &shared.config.prefix,
            &containers,
            &stacks,
            crate::access::local_addrs(),
        );
        debug!(containers = access.len(), "access table rebuilt");
        shared.access.send_replace(Arc::new(access));
        if let Some(kernel) = &shared.udp_kernel {
            kernel.sync(&shared);
        }
    }
}

/// Writes the kernel's UDP list again every second besides on changes: an ejection (learned
/// by the socket path) ends by time, with no change to trigger a write, and the backend it
/// took out must come back. Writes only what differs.
async fn resync_udp_kernel(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        if let Some(kernel) = &shared.udp_kernel
            && shared.is_synced()
        {
            kernel.sync(&shared);
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
    // Keys already logged as unservable, so each is said once.
    let mut warned: BTreeMap<String, String> = BTreeMap::new();
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
        let prefix = &shared.config.prefix;
        let range = shared.config.range;
        let problems = crate::routes::problems(prefix, range, &allocs, &services);
        for (key, why) in &problems {
            if warned.get(key) != Some(why) {
                warn!(key = %key, "cannot serve this key: {why}");
            }
        }
        warned = problems;
        // The zone first: whoever sees the new routes (a test, a client) finds the zone that
        // goes with them.
        if let Some(settings) = &shared.config.dns {
            let revision = allocs
                .values()
                .chain(services.values())
                .map(|kv| kv.mod_revision)
                .max()
                .unwrap_or(0);
            let serial = u32::try_from(revision.rem_euclid(1 << 32)).unwrap_or(0);
            let zone = crate::dns::Zone::build(settings, prefix, range, &allocs, &services, serial);
            shared.zone.send_replace(Arc::new(zone));
        }
        let previous = shared.routes();
        let routes = Routes::build(
            prefix,
            range,
            &allocs,
            &services,
            &previous,
            &shared.metrics,
        );
        debug!(services = routes.by_port.len(), "routes rebuilt");
        if let Some(senders) = &shared.senders {
            // Sockets accepted from now on at these backends' addresses are watched (those
            // of this host's cgroup); backends gone are no longer.
            let now: BTreeSet<SocketAddrV4> = routes
                .by_port
                .values()
                .flat_map(|s| &s.backends)
                .filter_map(|b| match b.addr {
                    std::net::SocketAddr::V4(addr) => Some(addr),
                    std::net::SocketAddr::V6(_) => None,
                })
                .collect();
            let mut watched = shared.sender_backends.lock().expect("sender backends lock");
            for gone in watched.difference(&now) {
                senders.unwatch_servers_on(*gone);
            }
            for addr in now.difference(&watched) {
                if let Err(e) = senders.watch_servers_on(*addr) {
                    debug!(error = %e, %addr, "cannot watch a backend");
                }
            }
            *watched = now;
        }
        shared.routes.send_replace(Arc::new(routes));
        if let Some(kernel) = &shared.udp_kernel {
            kernel.sync(&shared);
        }
        if !shared.synced.swap(true, Ordering::Relaxed) {
            // Read from etcd: it answers.
            shared.set_etcd_answering(true);
            info!("routes synced from etcd");
        }
    }
}

/// The kernel path for `config`, or `None` (off, or refused: logged once, with the reason).
fn kernel_path(config: &Config) -> Option<sockmap::KernelPath> {
    if config.kernel_forward == crate::config::KernelForward::Off {
        return None;
    }
    let pairs = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
    match sockmap::KernelPath::new(pairs) {
        Ok(path) => {
            tracing::debug!(
                pairs,
                "forwarding in the kernel (sockhash and sk_skb verdict program)"
            );
            Some(path)
        }
        Err(why) => {
            tracing::warn!(
                "kernel forwarding unavailable, relaying in user space: {why} (needs CAP_BPF and CAP_NET_ADMIN, Linux 5.13 or later; --kernel-forward off silences this)"
            );
            None
        }
    }
}
