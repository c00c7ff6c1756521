//! Every counter of the router, once: registered in one Prometheus registry (`/metrics`), and
//! per route handed out as [`RouteCounters`] that a request increments without a label lookup.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub domain: String,
    /// `2xx` .. `5xx` (`1xx` for a switch of protocols).
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DomainLabels {
    pub domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub domain: String,
    /// `connect`, `timeout`, `response` (the backend failed after the request was sent).
    pub kind: String,
}

/// A route's counters.
#[derive(Debug)]
pub struct RouteCounters {
    /// By status class: 1xx .. 5xx.
    pub requests: [Counter; 5],
    pub duration: Histogram,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub connect_errors: Counter,
    pub timeouts: Counter,
    pub response_errors: Counter,
    pub retries: Counter,
}

impl RouteCounters {
    pub fn count(&self, status: http::StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.requests[class].inc();
    }

    pub fn total(&self) -> u64 {
        self.requests.iter().map(Counter::get).sum()
    }
}

fn buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
    .into_iter()
}

/// The registry and its families.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<DomainLabels, Histogram, fn() -> Histogram>,
    bytes_in: Family<DomainLabels, Counter>,
    bytes_out: Family<DomainLabels, Counter>,
    backend_errors: Family<ErrorLabels, Counter>,
    retries: Family<DomainLabels, Counter>,
    pub tls_handshakes: Counter,
    pub tls_failures: Counter,
    pub connections: Counter,
    pub connections_active: Gauge,
    pub connections_parked: Gauge,
    pub connections_refused: Counter,
    pub head_timeouts: Counter,
    pub body_timeouts: Counter,
    pub tunnel_timeouts: Counter,
    pub synced: Gauge,
    /// Requests for a host no route names (counted under `domain=""`).
    pub unknown: RouteCounters,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("router");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration: Family<DomainLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(buckets()));
        let bytes_in = Family::<DomainLabels, Counter>::default();
        let bytes_out = Family::<DomainLabels, Counter>::default();
        let backend_errors = Family::<ErrorLabels, Counter>::default();
        let retries = Family::<DomainLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by domain (empty: no route) and status class",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from the request head to the response head, by domain",
            duration.clone(),
        );
        registry.register(
            "request_bytes",
            "Request body bytes sent to backends",
            bytes_in.clone(),
        );
        registry.register(
            "response_bytes",
            "Response body bytes sent to clients",
            bytes_out.clone(),
        );
        registry.register(
            "backend_errors",
            "Backend failures by kind: connect, timeout, response",
            backend_errors.clone(),
        );
        registry.register(
            "retries",
            "Requests sent again to another backend",
            retries.clone(),
        );
        let tls_handshakes = Counter::default();
        let tls_failures = Counter::default();
        let connections = Counter::default();
        let connections_active = Gauge::default();
        let connections_parked = Gauge::default();
        let connections_refused = Counter::default();
        let head_timeouts = Counter::default();
        let body_timeouts = Counter::default();
        let tunnel_timeouts = Counter::default();
        let synced = Gauge::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes completed",
            tls_handshakes.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed (no certificate for the name, bad client hello)",
            tls_failures.clone(),
        );
        registry.register(
            "connections",
            "Client connections accepted",
            connections.clone(),
        );
        registry.register(
            "connections_active",
            "Client connections open now",
            connections_active.clone(),
        );
        registry.register(
            "connections_parked",
            "Of the open client connections, those idle after an answer for 10 ms or more (100 \
             ms for a client that came back that soon before), held without a task",
            connections_parked.clone(),
        );
        registry.register(
            "connections_refused",
            "Client connections closed at once: --max-connections reached, or a bad PROXY header",
            connections_refused.clone(),
        );
        registry.register(
            "head_timeouts",
            "Client connections cut because a request head did not arrive within --head-timeout",
            head_timeouts.clone(),
        );
        registry.register(
            "body_timeouts",
            "Bodies cut because their next bytes, from the client or the backend, did not arrive within --body-timeout, or a client did not take a write within it",
            body_timeouts.clone(),
        );
        registry.register(
            "tunnel_timeouts",
            "Upgraded connections (WebSocket) closed after --tunnel-timeout without a byte either way",
            tunnel_timeouts.clone(),
        );
        registry.register(
            "etcd_synced",
            "1 when the routes were read and etcd answers",
            synced.clone(),
        );
        let mut metrics = Self {
            registry,
            requests,
            duration,
            bytes_in,
            bytes_out,
            backend_errors,
            retries,
            tls_handshakes,
            tls_failures,
            connections,
            connections_active,
            connections_parked,
            connections_refused,
            head_timeouts,
            body_timeouts,
            tunnel_timeouts,
            synced,
            unknown: RouteCounters {
                requests: Default::default(),
                duration: Histogram::new(buckets()),
                bytes_in: Counter::default(),
                bytes_out: Counter::default(),
                connect_errors: Counter::default(),
                timeouts: Counter::default(),
                response_errors: Counter::default(),
                retries: Counter::default(),
            },
        };
        metrics.unknown = metrics.route("");
        metrics
    }
}

impl Metrics {
    /// The counters of one domain's route (shared with `/metrics`).
    pub fn route(&self, domain: &str) -> RouteCounters {
        let d = || DomainLabels {
            domain: domain.to_owned(),
        };
        let class = |c: &str| {
            self.requests
                .get_or_create(&RequestLabels {
                    domain: domain.to_owned(),
                    class: c.to_owned(),
                })
                .clone()
        };
        let error = |k: &str| {
            self.backend_errors
                .get_or_create(&ErrorLabels {
                    domain: domain.to_owned(),
                    kind: k.to_owned(),
                })
                .clone()
        };
        RouteCounters {
            requests: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: self.duration.get_or_create(&d()).clone(),
            bytes_in: self.bytes_in.get_or_create(&d()).clone(),
            bytes_out: self.bytes_out.get_or_create(&d()).clone(),
            connect_errors: error("connect"),
            timeouts: error("timeout"),
            response_errors: error("response"),
            retries: self.retries.get_or_create(&d()).clone(),
        }
    }

    /// Drops the series of a domain that is no longer routed.
    pub fn forget_route(&self, domain: &str) {
        let d = DomainLabels {
            domain: domain.to_owned(),
        };
        for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
            self.requests.remove(&RequestLabels {
                domain: domain.to_owned(),
                class: class.to_owned(),
            });
        }
        for kind in ["connect", "timeout", "response"] {
            self.backend_errors.remove(&ErrorLabels {
                domain: domain.to_owned(),
                kind: kind.to_owned(),
            });
        }
        self.duration.remove(&d);
        self.bytes_in.remove(&d);
        self.bytes_out.remove(&d);
        self.retries.remove(&d);
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
