//! The route table: domain -> the web job that serves it -> its live backends, rebuilt from
//! the watched `routes/` and `services/` keys. A rebuild swaps one `Arc<Table>`; a request
//! takes the current one once, so an endpoint that leaves gets no new request from then on,
//! and requests already sent to it finish.
//!
//! Backends are `ambassador::routes::Backend`s chosen with `ambassador::routes::pick`: the
//! router and the ambassador balance and eject alike, from one piece of code.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use ambassador::routes::{Backend, endpoints};
use runtime::watch::Kv;
use schema::records::{self, RouteRecord};
use schema::{Domain, Key, Prefix, Proto, ServicePort};

use crate::metrics::{Metrics, RouteCounters};

/// One domain's route.
#[derive(Debug)]
pub struct Route {
    pub domain: Domain,
    pub record: RouteRecord,
    /// The service port behind it: `stack/job:port`.
    pub service_port: ServicePort,
    pub backends: Vec<Arc<Backend>>,
    /// Kept across rebuilds.
    pub counters: Arc<RouteCounters>,
}

/// Every route.
#[derive(Debug, Default)]
pub struct Table {
    exact: HashMap<String, Arc<Route>>,
    /// `*.apps.example.com` under `apps.example.com`.
    wildcard: HashMap<String, Arc<Route>>,
}

impl Table {
    /// Builds the table from the watched keys, keeping `previous`'s backends (their ejection
    /// state and counters) and counters.
    pub fn build(
        prefix: &Prefix,
        routes: &BTreeMap<String, Kv>,
        services: &BTreeMap<String, Kv>,
        previous: &Table,
        metrics: &Metrics,
    ) -> Table {
        let mut old_backends: HashMap<(&str, SocketAddr), &Arc<Backend>> = HashMap::new();
        let mut old_counters: HashMap<&str, &Arc<RouteCounters>> = HashMap::new();
        for r in previous.routes() {
            old_counters.insert(r.domain.as_str(), &r.counters);
            for b in &r.backends {
                old_backends.insert((b.instance.as_str(), b.addr), b);
            }
        }
        let mut by_port: HashMap<ServicePort, Vec<Arc<Backend>>> = HashMap::new();
        for e in endpoints(prefix, services) {
            if e.service_port.proto != Proto::Tcp {
                continue;
            }
            let instance = e.instance.to_string();
            let backend = old_backends
                .get(&(instance.as_str(), e.addr))
                .map(|b| Arc::clone(b))
                .unwrap_or_else(|| {
                    Arc::new(Backend::new(instance, e.addr, e.record.host.to_string()))
                });
            by_port.entry(e.service_port).or_default().push(backend);
        }
        let mut table = Table::default();
        for (key, kv) in routes {
            let Ok(Key::Route(domain)) = prefix.parse(key) else {
                continue;
            };
            let Ok(record) = records::decode::<RouteRecord>(key, &kv.value) else {
                continue;
            };
            let service_port = ServicePort {
                service: schema::ServiceId::new(record.stack.clone(), record.job.clone()),
                port: record.port,
                proto: Proto::Tcp,
            };
            let counters = old_counters
                .get(domain.as_str())
                .map(|c| Arc::clone(c))
                .unwrap_or_else(|| Arc::new(metrics.route(domain.as_str())));
            let route = Arc::new(Route {
                backends: by_port.get(&service_port).cloned().unwrap_or_default(),
                domain: domain.clone(),
                record,
                service_port,
                counters,
            });
            match domain.wildcard_base() {
                Some(base) => table.wildcard.insert(base.to_owned(), route),
                None => table.exact.insert(domain.as_str().to_owned(), route),
            };
        }
        // A domain no longer routed takes its series with it (preview domains come and go;
        // kept, they would pile up in every scrape).
        for r in previous.routes() {
            if !table.routes_domain(&r.domain) {
                metrics.forget_route(r.domain.as_str());
            }
        }
        table
    }

    /// Whether `domain` itself (a wildcard as such) has a route.
    fn routes_domain(&self, domain: &Domain) -> bool {
        match domain.wildcard_base() {
            Some(base) => self.wildcard.contains_key(base),
            None => self.exact.contains_key(domain.as_str()),
        }
    }

    /// The route for a request's host (lower-case, without port): the exact name, else the
    /// wildcard of the nearest parent (`a.b.example.com` tries `*.b.example.com`, then
    /// `*.example.com`): the longest wildcard wins.
    pub fn lookup(&self, host: &str) -> Option<&Arc<Route>> {
        if let Some(r) = self.exact.get(host) {
            return Some(r);
        }
        let mut rest = host;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(r) = self.wildcard.get(parent) {
                return Some(r);
            }
            rest = parent;
        }
        None
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.exact.values().chain(self.wildcard.values())
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The host a request names, lower-case and without the port: `Host` (HTTP/1.1) or the
/// URI's authority (HTTP/2, and absolute-form requests).
pub fn request_host<B>(req: &http::Request<B>) -> Option<String> {
    match req.uri().authority() {
        Some(a) => host_name(a.host()),
        None => host_name(req.headers().get(http::header::HOST)?.to_str().ok()?),
    }
}

/// The name a `Host` value (or an authority) routes by: no port, no final dot, lower case.
pub fn host_name(host: &str) -> Option<String> {
    let host = strip_port(host).trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // An IPv6 literal: `[::1]:80`.
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..=h.len()]);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: String, value: String) -> (String, Kv) {
        (
            key.clone(),
            Kv {
                key,
                value: value.into_bytes(),
                mod_revision: 1,
                lease: 0,
            },
        )
    }

    fn route(domain: &str, job: &str) -> (String, Kv) {
        let p = Prefix::default();
        let record = RouteRecord {
            v: 1,
            stack: "web".parse().unwrap(),
            job: job.parse().unwrap(),
            port: 8080,
            https_redirect: false,
        };
        kv(
            p.key(&Key::Route(domain.parse().unwrap())),
            records::encode(&record),
        )
    }

    #[test]
    fn exact_names_win_then_the_longest_wildcard() {
        let routes: BTreeMap<String, Kv> = [
            route("example.com", "apex"),
            route("*.example.com", "any"),
            route("*.apps.example.com", "apps"),
            route("www.apps.example.com", "www"),
        ]
        .into_iter()
        .collect();
        let metrics = Metrics::default();
        let t = Table::build(
            &Prefix::default(),
            &routes,
            &BTreeMap::new(),
            &Table::default(),
            &metrics,
        );
        let job = |h: &str| t.lookup(h).map(|r| r.record.job.to_string());
        assert_eq!(job("example.com").as_deref(), Some("apex"));
        assert_eq!(job("www.apps.example.com").as_deref(), Some("www"));
        assert_eq!(job("x.apps.example.com").as_deref(), Some("apps"));
        assert_eq!(job("y.x.apps.example.com").as_deref(), Some("apps"));
        assert_eq!(job("apps.example.com").as_deref(), Some("any"));
        assert_eq!(job("other.org"), None);
    }

    #[test]
    fn the_host_comes_without_port_and_case() {
        let req = http::Request::get("/")
            .header("host", "WWW.Example.com:8080")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("www.example.com"));
        let req = http::Request::get("https://a.example.com/x")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("a.example.com"));
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }
}
