//! The router's shared state, and etcd into it: `routes/` and `services/` into the route
//! table, `certs/` (with `--certs`) into the certificates. While etcd is away the last known
//! table and certificates keep being served.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::Client;
use runtime::watch::{self, Kv, WatchUpdate};
use schema::records::{self, CertRecord};
use schema::{Dir, Domain, Key, Prefix};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::pool::Pools;
use crate::proxy::{AccessLog, Settings};
use crate::table::Table;
use crate::tls::{self, CertStore, Loaded};

/// Everything a request and the admin server read.
pub struct State {
    pub prefix: Prefix,
    table: tokio::sync::watch::Sender<Arc<Table>>,
    pub pool: Pools,
    pub metrics: Metrics,
    pub settings: Settings,
    pub access_log: Option<AccessLog>,
    pub certs: Arc<CertStore>,
    /// Certificates from etcd and from `--certs` that could not be served, with why.
    pub cert_problems: std::sync::Mutex<BTreeMap<String, String>>,
    synced: AtomicBool,
    answering: AtomicBool,
    /// Every client connection's task (a WebSocket's tunnel runs in its connection's task):
    /// the drain at a stop waits for all of them.
    pub connections: TaskTracker,
    /// The grace period is over: every connection and tunnel closes now.
    pub cut: CancellationToken,
}

impl State {
    pub fn new(
        prefix: Prefix,
        settings: Settings,
        access_log: Option<AccessLog>,
        pool: Pools,
    ) -> Arc<Self> {
        Arc::new(Self {
            prefix,
            table: tokio::sync::watch::channel(Arc::new(Table::default())).0,
            pool,
            metrics: Metrics::default(),
            settings,
            access_log,
            certs: Arc::new(CertStore::default()),
            cert_problems: Default::default(),
            synced: AtomicBool::new(false),
            answering: AtomicBool::new(false),
            connections: TaskTracker::new(),
            cut: CancellationToken::new(),
        })
    }

    pub fn table(&self) -> Arc<Table> {
        self.table.borrow().clone()
    }

    /// The routes were read once (what `/healthz` says).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Read once, and etcd answers now.
    pub fn is_current(&self) -> bool {
        self.is_synced() && self.answering.load(Ordering::Relaxed)
    }

    fn set_answering(&self, answering: bool) -> bool {
        let was = self.answering.swap(answering, Ordering::Relaxed);
        self.metrics.synced.set(i64::from(self.is_current()));
        was != answering
    }

    /// The `/state` document.
    pub fn state_json(&self) -> serde_json::Value {
        let table = self.table();
        let now = std::time::Instant::now();
        let mut routes: Vec<_> = table
            .routes()
            .map(|r| {
                serde_json::json!({
                    "domain": r.domain.as_str(),
                    "service": r.service_port.service.to_string(),
                    "port": r.record.port,
                    "https_redirect": r.record.https_redirect,
                    "requests": r.counters.total(),
                    "backends": r.backends.iter().map(|b| serde_json::json!({
                        "instance": b.instance,
                        "addr": b.addr.to_string(),
                        "host": b.host,
                        "active": b.active.load(Ordering::Relaxed),
                        "requests": b.connections.load(Ordering::Relaxed),
                        "ejected": b.is_ejected(now),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        routes.sort_by(|a, b| a["domain"].as_str().cmp(&b["domain"].as_str()));
        let certs = self.certs.all();
        let mut cert_list: Vec<_> = certs
            .iter()
            .map(|(d, l)| {
                serde_json::json!({
                    "domain": d,
                    "names": l.names,
                    "not_after": runtime::host::rfc3339(l.not_after),
                    "source": l.source,
                })
            })
            .collect();
        cert_list.sort_by(|a, b| a["domain"].as_str().cmp(&b["domain"].as_str()));
        serde_json::json!({
            "synced": self.is_current(),
            "routes_read": self.is_synced(),
            "routes": routes,
            "certs": cert_list,
            "cert_problems": *self.cert_problems.lock().expect("problems lock"),
            "connections_active": self.metrics.connections_active.get(),
            "pooled_backend_connections": self.pool.idle_count(),
        })
    }
}

/// Follows etcd until `stop`: the route table and the certificates of etcd (merged with those
/// of `certs_dir`, read again when its files change).
pub async fn follow(
    state: Arc<State>,
    client: Client,
    certs_dir: Option<PathBuf>,
    stop: CancellationToken,
) {
    let (routes_tx, mut routes_rx) = mpsc::channel(64);
    let (svc_tx, mut svc_rx) = mpsc::channel(64);
    let (certs_tx, mut certs_rx) = mpsc::channel(64);
    for (dir, tx) in [
        (Dir::Routes, routes_tx),
        (Dir::Services, svc_tx),
        (Dir::Certs, certs_tx),
    ] {
        tokio::spawn(watch::watch_prefix(
            client.clone(),
            state.prefix.dir(dir),
            tx,
            stop.clone(),
        ));
    }
    tokio::spawn(probe(state.clone(), client, stop.clone()));
    let mut routes: BTreeMap<String, Kv> = BTreeMap::new();
    let mut services: BTreeMap<String, Kv> = BTreeMap::new();
    let mut cert_keys: BTreeMap<String, Kv> = BTreeMap::new();
    let (mut routes_seen, mut services_seen, mut certs_seen) = (false, false, false);
    let mut etcd_certs: BTreeMap<Domain, Arc<Loaded>> = BTreeMap::new();
    let mut file_certs: BTreeMap<Domain, Arc<Loaded>> = BTreeMap::new();
    let mut file_problems: Vec<String> = Vec::new();
    let mut etcd_problems: BTreeMap<String, String> = BTreeMap::new();
    let mut dir_sig = None;
    let mut dir_tick = tokio::time::interval(Duration::from_secs(2));
    dir_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut rebuild = false;
        let mut certs_changed = false;
        tokio::select! {
            () = stop.cancelled() => return,
            Some(u) = routes_rx.recv() => {
                routes_seen |= matches!(u, WatchUpdate::Snapshot { .. });
                watch::apply(&mut routes, u);
                rebuild = true;
            }
            Some(u) = svc_rx.recv() => {
                services_seen |= matches!(u, WatchUpdate::Snapshot { .. });
                watch::apply(&mut services, u);
                rebuild = true;
            }
            Some(u) = certs_rx.recv() => {
                certs_seen |= matches!(u, WatchUpdate::Snapshot { .. });
                watch::apply(&mut cert_keys, u);
                (etcd_certs, etcd_problems) = etcd_certs_from(&state.prefix, &cert_keys);
                for (k, why) in &etcd_problems {
                    warn!(key = %k, "{why}; not served");
                }
                certs_changed = true;
            }
            _ = dir_tick.tick(), if certs_dir.is_some() => {
                let dir = certs_dir.as_ref().expect("checked");
                let sig = tls::dir_signature(dir);
                if dir_sig.as_ref() != Some(&sig) {
                    dir_sig = Some(sig);
                    (file_certs, file_problems) = tls::read_dir(dir);
                    for p in &file_problems {
                        warn!("{p}; not served");
                    }
                    info!(certs = file_certs.len(), dir = %dir.display(), "read certificates");
                    certs_changed = true;
                }
            }
        }
        if certs_changed {
            state.certs.set(&file_certs, &etcd_certs);
            let mut problems = etcd_problems.clone();
            for (i, p) in file_problems.iter().enumerate() {
                problems.insert(format!("--certs #{i}"), p.clone());
            }
            *state.cert_problems.lock().expect("problems lock") = problems;
        }
        // Read once all three are: serving starts (after an upgrade) with every certificate.
        let first = !state.is_synced();
        if (rebuild || first) && routes_seen && services_seen && certs_seen {
            let previous = state.table();
            let table = Table::build(&state.prefix, &routes, &services, &previous, &state.metrics);
            let keep: HashSet<_> = table
                .routes()
                .flat_map(|r| r.backends.iter().map(|b| b.addr))
                .collect();
            state.pool.retain(&keep);
            state.table.send_replace(Arc::new(table));
            if first {
                state.synced.store(true, Ordering::Relaxed);
                state.set_answering(true);
                info!(
                    routes = state.table().len(),
                    "routes read from etcd; serving"
                );
            }
        }
    }
}

fn etcd_certs_from(
    prefix: &Prefix,
    keys: &BTreeMap<String, Kv>,
) -> (BTreeMap<Domain, Arc<Loaded>>, BTreeMap<String, String>) {
    let mut out = BTreeMap::new();
    let mut problems = BTreeMap::new();
    for (key, kv) in keys {
        let Ok(Key::Cert(domain)) = prefix.parse(key) else {
            continue;
        };
        let loaded = records::decode::<CertRecord>(key, &kv.value)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                tls::check_for(
                    &domain,
                    r.chain_pem.as_bytes(),
                    r.key_pem.as_bytes(),
                    "etcd",
                )
                .map_err(|e| e.to_string())
            });
        match loaded {
            Ok(l) => {
                out.insert(domain, Arc::new(l));
            }
            Err(e) => {
                problems.insert(key.clone(), e);
            }
        }
    }
    (out, problems)
}

/// Asks etcd for its status every second, to say on `/metrics` when the routes may be stale.
async fn probe(state: Arc<State>, client: Client, stop: CancellationToken) {
    let mut maintenance = client.maintenance_client();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        if !state.is_synced() {
            continue;
        }
        let answered = matches!(
            tokio::time::timeout(Duration::from_secs(1), maintenance.status()).await,
            Ok(Ok(_))
        );
        if state.set_answering(answered) {
            if answered {
                info!("etcd answers again; routes are current");
            } else {
                warn!("etcd does not answer; serving the last known routes until it does");
            }
        }
    }
}
