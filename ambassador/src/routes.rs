//! The routing table: ambassador port -> service port -> live backends, rebuilt from what the
//! watches saw, with per-backend counters that survive rebuilds.
//!
//! A rebuild swaps one `Arc<Routes>`; a connection takes the current `Arc` once, so new
//! connections see a change as soon as it is applied and open ones are never touched.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use runtime::watch::Kv;
use schema::records::{self, EndpointRecord, PortAllocRecord};
use schema::{Key, PortRange, Prefix, ServicePort};

use crate::metrics::{BackendCounters, Metrics, ServiceCounters};

/// Consecutive connect failures that eject a backend.
pub const EJECT_AFTER: u32 = 3;
/// First ejection; each further one doubles, up to [`EJECT_MAX`].
pub const EJECT_BASE: Duration = Duration::from_secs(1);
pub const EJECT_MAX: Duration = Duration::from_secs(30);

/// One backend (an endpoint record) and what the proxy learned about it.
#[derive(Debug)]
pub struct Backend {
    /// The instance key (`<host>:<container-id-12>:<port>`).
    pub instance: String,
    pub addr: SocketAddr,
    pub host: String,
    pub active: AtomicU64,
    pub connections: AtomicU64,
    /// Also on `/metrics`.
    pub counters: BackendCounters,
    consecutive_failures: AtomicU32,
    /// Ejections since the last successful connect: the exponent of the next ejection time.
    streak: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

impl Backend {
    /// A backend whose counters `/metrics` does not show (tests).
    pub fn new(instance: String, addr: SocketAddr, host: String) -> Self {
        Self::counted(instance, addr, host, BackendCounters::default())
    }

    pub fn counted(
        instance: String,
        addr: SocketAddr,
        host: String,
        counters: BackendCounters,
    ) -> Self {
        Self {
            instance,
            addr,
            host,
            active: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            counters,
            consecutive_failures: AtomicU32::new(0),
            streak: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
        }
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until
            .lock()
            .expect("ejection lock")
            .is_some_and(|until| until > now)
    }

    /// A connect succeeded: the backend is healthy again.
    pub fn connected(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.streak.store(0, Ordering::Relaxed);
        *self.ejected_until.lock().expect("ejection lock") = None;
    }

    /// A connect failed; returns true when this failure ejected the backend.
    pub fn failed(&self, now: Instant) -> bool {
        self.counters.connect_errors.inc();
        let fails = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if fails < EJECT_AFTER {
            return false;
        }
        self.counters.ejections.inc();
        let n = self.streak.fetch_add(1, Ordering::Relaxed);
        let time = EJECT_BASE.saturating_mul(1u32 << n.min(16)).min(EJECT_MAX);
        *self.ejected_until.lock().expect("ejection lock") = Some(now + time);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        true
    }
}

/// One allocated service port.
#[derive(Debug)]
pub struct Service {
    pub service_port: ServicePort,
    pub port: u16,
    pub backends: Vec<Arc<Backend>>,
    /// Kept across rebuilds.
    pub stats: Arc<ServiceCounters>,
}

impl Service {
    /// Picks a backend not in `tried` ([`pick`]).
    pub fn pick(
        &self,
        tried: &[usize],
        local: Option<&str>,
        now: Instant,
        rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        pick(&self.backends, tried, local, now, rng)
    }
}

/// Picks one of `backends` not in `tried`: power of two random choices, fewer active
/// connections wins. Ejected backends are used only when nothing else is left; with `local`
/// set, backends on that host are preferred while any is healthy. The ambassador and the
/// router choose alike through this.
pub fn pick(
    backends: &[Arc<Backend>],
    tried: &[usize],
    local: Option<&str>,
    now: Instant,
    rng: &mut fastrand::Rng,
) -> Option<usize> {
    // The common case of a single backend, untried and healthy: no list to build.
    if backends.len() == 1 && tried.is_empty() {
        return Some(0);
    }
    let open: Vec<usize> = (0..backends.len()).filter(|i| !tried.contains(i)).collect();
    let healthy: Vec<usize> = open
        .iter()
        .copied()
        .filter(|i| !backends[*i].is_ejected(now))
        .collect();
    let local_healthy: Vec<usize> = match local {
        Some(host) => healthy
            .iter()
            .copied()
            .filter(|i| backends[*i].host == host)
            .collect(),
        None => Vec::new(),
    };
    let pool = if !local_healthy.is_empty() {
        local_healthy
    } else if !healthy.is_empty() {
        healthy
    } else {
        open
    };
    match pool.len() {
        0 => None,
        1 => Some(pool[0]),
        n => {
            let a = pool[rng.usize(..n)];
            let mut b = pool[rng.usize(..n - 1)];
            if b == a {
                b = pool[n - 1];
            }
            let load = |i: usize| backends[i].active.load(Ordering::Relaxed);
            Some(if load(b) < load(a) { b } else { a })
        }
    }
}

/// The whole table.
#[derive(Debug, Default)]
pub struct Routes {
    /// TCP service ports, by ambassador port.
    pub by_port: BTreeMap<u16, Arc<Service>>,
    /// UDP service ports, by ambassador port.
    pub udp_by_port: BTreeMap<u16, Arc<Service>>,
}

impl Routes {
    /// Builds the table from the watched keys, reusing `previous`'s counters; a service port
    /// or backend seen for the first time gets its counters from `metrics`.
    pub fn build(
        prefix: &Prefix,
        range: PortRange,
        allocs: &BTreeMap<String, Kv>,
        endpoints: &BTreeMap<String, Kv>,
        previous: &Routes,
        metrics: &Metrics,
    ) -> Routes {
        let mut old_backends: HashMap<(&str, SocketAddr), &Arc<Backend>> = HashMap::new();
        let mut old_stats: HashMap<&ServicePort, &Arc<ServiceCounters>> = HashMap::new();
        for s in previous.services() {
            old_stats.insert(&s.service_port, &s.stats);
            for b in &s.backends {
                old_backends.insert((b.instance.as_str(), b.addr), b);
            }
        }
        let mut backends: HashMap<ServicePort, Vec<Arc<Backend>>> = HashMap::new();
        for e in self::endpoints(prefix, endpoints) {
            let instance = e.instance.to_string();
            let backend = old_backends
                .get(&(instance.as_str(), e.addr))
                .map(|b| Arc::clone(b))
                .unwrap_or_else(|| {
                    let counters = metrics.backend(&e.service_port, e.addr);
                    let host = e.record.host.to_string();
                    Arc::new(Backend::counted(instance, e.addr, host, counters))
                });
            backends.entry(e.service_port).or_default().push(backend);
        }
        let (mut by_port, mut udp_by_port) = (BTreeMap::new(), BTreeMap::new());
        for (service_port, port) in allocations(prefix, range, allocs) {
            let table = match service_port.proto {
                schema::Proto::Tcp => &mut by_port,
                schema::Proto::Udp => &mut udp_by_port,
            };
            let stats = old_stats
                .get(&service_port)
                .map(|s| Arc::clone(s))
                .unwrap_or_else(|| Arc::new(metrics.service(&service_port)));
            let list = backends.remove(&service_port).unwrap_or_default();
            table.insert(
                port,
                Arc::new(Service {
                    service_port,
                    port,
                    backends: list,
                    stats,
                }),
            );
        }
        let routes = Routes {
            by_port,
            udp_by_port,
        };
        routes.forget_left(previous, metrics);
        routes
    }

    /// Every service port, TCP and UDP.
    fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.by_port.values().chain(self.udp_by_port.values())
    }

    /// Drops the series of `previous`'s service ports and backends that this table no longer
    /// has (a series is a service port's, or a service port's backend address's).
    fn forget_left(&self, previous: &Routes, metrics: &Metrics) {
        let services: HashSet<&ServicePort> = self.services().map(|s| &s.service_port).collect();
        let backends: HashSet<(&ServicePort, SocketAddr)> = self
            .services()
            .flat_map(|s| s.backends.iter().map(move |b| (&s.service_port, b.addr)))
            .collect();
        for s in previous.services() {
            if !services.contains(&s.service_port) {
                metrics.forget_service(&s.service_port);
            }
            for b in &s.backends {
                if !backends.contains(&(&s.service_port, b.addr)) {
                    metrics.forget_backend(&s.service_port, b.addr);
                }
            }
        }
    }
}

/// One live endpoint as read from a `services/` key.
pub struct EndpointEntry {
    pub service_port: ServicePort,
    pub instance: schema::Instance,
    pub record: EndpointRecord,
    pub addr: SocketAddr,
}

/// The endpoints among the watched `services/` keys; keys or values that do not parse are
/// skipped (the routes and the DNS zone read them alike).
pub fn endpoints<'a>(
    prefix: &'a Prefix,
    keys: &'a BTreeMap<String, Kv>,
) -> impl Iterator<Item = EndpointEntry> + 'a {
    keys.iter().filter_map(move |(key, kv)| {
        let Ok(Key::Endpoint {
            service_port,
            instance,
        }) = prefix.parse(key)
        else {
            return None;
        };
        let record = records::decode::<EndpointRecord>(key, &kv.value).ok()?;
        let ip = record.addr.parse::<std::net::IpAddr>().ok()?;
        Some(EndpointEntry {
            service_port,
            instance,
            addr: SocketAddr::new(ip, record.port),
            record,
        })
    })
}

/// The allocations among the watched `ports/alloc/` keys: (service port, ambassador port).
pub fn allocations<'a>(
    prefix: &'a Prefix,
    range: PortRange,
    keys: &'a BTreeMap<String, Kv>,
) -> impl Iterator<Item = (ServicePort, u16)> + 'a {
    keys.iter().filter_map(move |(key, kv)| {
        let Ok(Key::PortAlloc(service_port)) = prefix.parse(key) else {
            return None;
        };
        let rec = records::decode::<PortAllocRecord>(key, &kv.value).ok()?;
        // Port 0 or outside the range: a stray value, not served (`problems` says so).
        (rec.port != 0 && range.contains(rec.port)).then_some((service_port, rec.port))
    })
}

/// Every watched key the ambassador cannot serve, with why: values that do not parse, keys
/// outside the contract, and allocations of port 0 or outside `range` (a stray value must not
/// make it bind an ephemeral port, or one such as 22; [`allocations`] leaves those out of the
/// table and the zone). The caller logs each once.
pub fn problems(
    prefix: &Prefix,
    range: PortRange,
    allocs: &BTreeMap<String, Kv>,
    endpoints: &BTreeMap<String, Kv>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (key, kv) in allocs {
        let why = match prefix.parse(key) {
            Ok(Key::PortAlloc(_)) => match records::decode::<PortAllocRecord>(key, &kv.value) {
                Ok(rec) if rec.port == 0 || !range.contains(rec.port) => format!(
                    "port {} is outside the range {range} (--range): not served",
                    rec.port
                ),
                Ok(_) => continue,
                Err(e) => e.to_string(),
            },
            Ok(_) => continue,
            Err(e) => e.to_string(),
        };
        out.insert(key.clone(), why);
    }
    for (key, kv) in endpoints {
        let why = match prefix.parse(key) {
            Ok(Key::Endpoint { .. }) => match records::decode::<EndpointRecord>(key, &kv.value) {
                Ok(rec) if rec.addr.parse::<std::net::IpAddr>().is_err() => {
                    format!("addr {:?} is not an IP address: not a backend", rec.addr)
                }
                Ok(_) => continue,
                Err(e) => e.to_string(),
            },
            Ok(_) => continue,
            Err(e) => e.to_string(),
        };
        out.insert(key.clone(), why);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(n: usize) -> Service {
        Service {
            service_port: "s/j:80".parse().unwrap(),
            port: 20000,
            backends: (0..n)
                .map(|i| {
                    Arc::new(Backend::new(
                        format!("h{i}:0123456789ab:80"),
                        format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                        format!("h{i}"),
                    ))
                })
                .collect(),
            stats: Arc::default(),
        }
    }

    #[test]
    fn two_choices_prefer_the_less_loaded() {
        let s = service(2);
        s.backends[0].active.store(10, Ordering::Relaxed);
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..20 {
            assert_eq!(s.pick(&[], None, Instant::now(), &mut rng), Some(1));
        }
        assert_eq!(s.pick(&[1], None, Instant::now(), &mut rng), Some(0));
        assert_eq!(s.pick(&[0, 1], None, Instant::now(), &mut rng), None);
    }

    #[test]
    fn spreads_over_equal_backends() {
        let s = service(4);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut seen = [0; 4];
        for _ in 0..400 {
            seen[s.pick(&[], None, Instant::now(), &mut rng).unwrap()] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
    }

    #[test]
    fn ejects_after_consecutive_failures_and_returns() {
        let s = service(2);
        let now = Instant::now();
        assert!(!s.backends[0].failed(now));
        assert!(!s.backends[0].failed(now));
        assert!(s.backends[0].failed(now), "third failure ejects");
        let mut rng = fastrand::Rng::with_seed(1);
        for _ in 0..20 {
            assert_eq!(s.pick(&[], None, now, &mut rng), Some(1));
        }
        // Only ejected ones left: still tried rather than failing the client.
        assert_eq!(s.pick(&[1], None, now, &mut rng), Some(0));
        assert!(!s.backends[0].is_ejected(now + EJECT_BASE + Duration::from_millis(1)));
        // The second ejection lasts twice as long.
        for _ in 0..3 {
            s.backends[0].failed(now);
        }
        assert!(s.backends[0].is_ejected(now + EJECT_BASE + Duration::from_millis(1)));
    }

    #[test]
    fn prefers_local_backends_while_healthy() {
        let s = service(3);
        let mut rng = fastrand::Rng::with_seed(1);
        for _ in 0..20 {
            assert_eq!(s.pick(&[], Some("h2"), Instant::now(), &mut rng), Some(2));
        }
        for _ in 0..3 {
            s.backends[2].failed(Instant::now());
        }
        assert_ne!(s.pick(&[], Some("h2"), Instant::now(), &mut rng), Some(2));
    }

    #[test]
    fn allocations_outside_the_range_and_unreadable_values_are_problems_with_their_key() {
        let kv = |key: &str, value: &str| {
            let kv = Kv {
                key: key.into(),
                value: value.into(),
                ..Kv::default()
            };
            (key.to_owned(), kv)
        };
        let allocs = BTreeMap::from([
            kv("/viking/ports/alloc/s/a/80-tcp", r#"{"v":1,"port":20000}"#),
            kv("/viking/ports/alloc/s/b/80-tcp", r#"{"v":1,"port":0}"#),
            kv("/viking/ports/alloc/s/c/80-tcp", r#"{"v":1,"port":22}"#),
            kv("/viking/ports/alloc/s/d/80-tcp", "garbage"),
        ]);
        let endpoints = BTreeMap::from([kv(
            "/viking/services/s/a/80-tcp/h:0123456789ab:80",
            r#"{"v":1,"host":"h","addr":"nowhere","port":1,"container_id":"x"}"#,
        )]);
        let p = problems(&Prefix::default(), PortRange::DEFAULT, &allocs, &endpoints);
        let keys: Vec<&str> = p.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "/viking/ports/alloc/s/b/80-tcp",
                "/viking/ports/alloc/s/c/80-tcp",
                "/viking/ports/alloc/s/d/80-tcp",
                "/viking/services/s/a/80-tcp/h:0123456789ab:80",
            ]
        );
        assert!(
            p["/viking/ports/alloc/s/c/80-tcp"]
                .contains("port 22 is outside the range 20000-29999")
        );
        assert!(p["/viking/services/s/a/80-tcp/h:0123456789ab:80"].contains("\"nowhere\""));
    }
}
