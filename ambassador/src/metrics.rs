//! The ambassador's counters. Each is kept once, as a prometheus-client handle (an atomic):
//! `/metrics` encodes the registry, `/state` reads the same handles through the route table.
//!
//! A service port's and a backend's handles are looked up in their family when the route
//! table first sees them and carried across rebuilds, so a connection touches only atomics;
//! their series are dropped when they leave the table (a released port, an endpoint gone):
//! containers come and go with new addresses, and a series kept for each would stay in every
//! scrape for the process's life.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use schema::ServicePort;

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
struct DropLabel {
    service: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    service: String,
    backend: String,
}

/// Every metric family, registered once.
#[derive(Clone, Default)]
pub struct Metrics {
    active: Family<ServiceLabel, Gauge>,
    connections: Family<ServiceLabel, Counter>,
    failed: Family<ServiceLabel, Counter>,
    local_errors: Family<ServiceLabel, Counter>,
    bytes: Family<BytesLabel, Counter>,
    connect_errors: Family<BackendLabel, Counter>,
    ejections: Family<BackendLabel, Counter>,
    datagrams: Family<BytesLabel, Counter>,
    sessions_active: Family<ServiceLabel, Gauge>,
    sessions: Family<ServiceLabel, Counter>,
    drops: Family<DropLabel, Counter>,
    refused: Family<DropLabel, Counter>,
    pub synced: Gauge,
    pub listeners: Gauge,
    kernel_forwarded: Family<ServiceLabel, Counter>,
    kernel_refused: Family<ServiceLabel, Counter>,
    kernel_active: Family<ServiceLabel, Gauge>,
    kernel_senders: Family<ServiceLabel, Counter>,
    udp_kernel_sends: Family<ServiceLabel, Counter>,
    /// 1 when the kernel path is on (`--kernel-forward on` and the kernel took it).
    pub kernel_forwarding: Gauge,
    /// 1 when joined pairs whose peers run here forward in their own sends
    /// (`--kernel-senders`, and the kernel took it).
    pub kernel_senders_on: Gauge,
    /// 1 when UDP service ports are balanced by the kernel (`--udp-kernel`, and it took it).
    pub udp_kernel: Gauge,
}

/// One service port's counters (standalone, not registered, when made by `Default`: tests).
#[derive(Debug, Clone, Default)]
pub struct ServiceCounters {
    /// Connections open now.
    pub active: Gauge,
    pub connections: Counter,
    /// Connections closed because no backend answered.
    pub failed: Counter,
    /// Backend connects that failed here, for want of a file descriptor.
    pub local_errors: Counter,
    /// Client to backend.
    pub bytes_up: Counter,
    /// Backend to client.
    pub bytes_down: Counter,
    /// UDP: datagrams client to backend, and back.
    pub datagrams_up: Counter,
    pub datagrams_down: Counter,
    /// UDP sessions open now, and in all.
    pub sessions_active: Gauge,
    pub sessions: Counter,
    /// UDP datagrams dropped: no backend, the session limit, a failed send.
    pub udp_drop_no_backend: Counter,
    pub udp_drop_limit: Counter,
    pub udp_drop_send: Counter,
    /// Connections (and UDP sessions) refused by link-scoped access.
    pub refused_not_linked: Counter,
    pub refused_unknown: Counter,
    /// TCP: connections handed to the kernel path, those it refused (relayed in user space),
    /// and those in it now.
    pub kernel_forwarded: Counter,
    pub kernel_refused: Counter,
    pub kernel_active: Gauge,
    /// Of those handed to the kernel path, the connections whose peers forward in their own
    /// sends (`--kernel-senders`).
    pub kernel_senders: Counter,
    /// UDP: datagrams (and connects) the kernel balanced straight to a backend
    /// (`--udp-kernel`), read from its map when `/metrics` is scraped.
    pub udp_kernel_sends: Counter,
}

/// One backend's counters that `/metrics` shows too.
#[derive(Debug, Clone, Default)]
pub struct BackendCounters {
    pub connect_errors: Counter,
    pub ejections: Counter,
}

impl Metrics {
    /// The families, registered in `reg`.
    pub fn register(reg: &mut Registry) -> Self {
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
        let failed = "Connections closed because no backend answered";
        reg.register("ambassador_connections_failed", failed, m.failed.clone());
        let local = "Backend connects that failed on this host (out of file descriptors)";
        reg.register(
            "ambassador_local_connect_errors",
            local,
            m.local_errors.clone(),
        );
        let bytes = "Bytes relayed (up: client to backend)";
        reg.register("ambassador_bytes", bytes, m.bytes.clone());
        let errors = "Failed connects to a backend";
        reg.register(
            "ambassador_backend_connect_errors",
            errors,
            m.connect_errors.clone(),
        );
        let ejections = "Times a backend was ejected";
        reg.register(
            "ambassador_backend_ejections",
            ejections,
            m.ejections.clone(),
        );
        reg.register(
            "ambassador_udp_datagrams",
            "UDP datagrams relayed (up: client to backend)",
            m.datagrams.clone(),
        );
        reg.register(
            "ambassador_udp_sessions_active",
            "UDP sessions open now",
            m.sessions_active.clone(),
        );
        reg.register(
            "ambassador_udp_sessions",
            "UDP sessions started",
            m.sessions.clone(),
        );
        reg.register(
            "ambassador_udp_drops",
            "UDP datagrams dropped, by reason (no backend, session limit, send error)",
            m.drops.clone(),
        );
        reg.register(
            "ambassador_connections_refused",
            "Connections and UDP sessions refused by link-scoped access, by reason (not linked, unknown source)",
            m.refused.clone(),
        );
        let synced = "1 while the routes are current: read from etcd, which answers now";
        reg.register("ambassador_etcd_synced", synced, m.synced.clone());
        reg.register(
            "ambassador_listeners",
            "Listening sockets",
            m.listeners.clone(),
        );
        reg.register(
            "ambassador_kernel_forwarded_connections",
            "Connections handed to the kernel path (a sockhash and an eBPF verdict program)",
            m.kernel_forwarded.clone(),
        );
        reg.register(
            "ambassador_udp_kernel_sends",
            "UDP datagrams (and UDP connects) the kernel balanced straight to a backend (--udp-kernel)",
            m.udp_kernel_sends.clone(),
        );
        reg.register(
            "ambassador_kernel_sender_connections",
            "Of the connections handed to the kernel path, those whose client and backend forward in their own sends (--kernel-senders)",
            m.kernel_senders.clone(),
        );
        reg.register(
            "ambassador_kernel_refused_connections",
            "Connections the kernel would not join, relayed in user space instead",
            m.kernel_refused.clone(),
        );
        reg.register(
            "ambassador_kernel_connections_active",
            "Connections in the kernel path now",
            m.kernel_active.clone(),
        );
        reg.register(
            "ambassador_kernel_forwarding",
            "1 when connections are forwarded in the kernel, 0 when relayed in user space",
            m.kernel_forwarding.clone(),
        );
        reg.register(
            "ambassador_kernel_senders",
            "1 when connections whose client and backend run in the --kernel-senders cgroup forward in their own sends",
            m.kernel_senders_on.clone(),
        );
        reg.register(
            "ambassador_udp_kernel_balancing",
            "1 when UDP service ports are balanced by the kernel as sockets send (--udp-kernel)",
            m.udp_kernel.clone(),
        );
        m
    }

    /// The counters of `service`, the same handles every time it is asked. The UDP ones are
    /// shown for UDP service ports only (standalone handles for TCP ones). A series added
    /// here is dropped in [`Metrics::forget_service`] too.
    pub fn service(&self, service: &ServicePort) -> ServiceCounters {
        let name = service.to_string();
        let label = ServiceLabel {
            service: name.clone(),
        };
        let direction = |direction| BytesLabel {
            service: name.clone(),
            direction,
        };
        let reason = |reason| DropLabel {
            service: name.clone(),
            reason,
        };
        let mut counters = ServiceCounters {
            active: handle(&self.active, &label),
            connections: handle(&self.connections, &label),
            failed: handle(&self.failed, &label),
            local_errors: handle(&self.local_errors, &label),
            bytes_up: handle(&self.bytes, &direction("up")),
            bytes_down: handle(&self.bytes, &direction("down")),
            refused_not_linked: handle(&self.refused, &reason("not linked")),
            refused_unknown: handle(&self.refused, &reason("unknown source")),
            ..ServiceCounters::default()
        };
        if service.proto == schema::Proto::Tcp {
            counters.kernel_forwarded = handle(&self.kernel_forwarded, &label);
            counters.kernel_refused = handle(&self.kernel_refused, &label);
            counters.kernel_active = handle(&self.kernel_active, &label);
            counters.kernel_senders = handle(&self.kernel_senders, &label);
        }
        if service.proto == schema::Proto::Udp {
            counters.datagrams_up = handle(&self.datagrams, &direction("up"));
            counters.datagrams_down = handle(&self.datagrams, &direction("down"));
            counters.sessions_active = handle(&self.sessions_active, &label);
            counters.sessions = handle(&self.sessions, &label);
            counters.udp_drop_no_backend = handle(&self.drops, &reason("no backend"));
            counters.udp_drop_limit = handle(&self.drops, &reason("session limit"));
            counters.udp_drop_send = handle(&self.drops, &reason("send error"));
            counters.udp_kernel_sends = handle(&self.udp_kernel_sends, &label);
        }
        counters
    }

    /// The counters of the backend at `addr` of `service`.
    pub fn backend(&self, service: &ServicePort, addr: std::net::SocketAddr) -> BackendCounters {
        let label = BackendLabel {
            service: service.to_string(),
            backend: addr.to_string(),
        };
        BackendCounters {
            connect_errors: handle(&self.connect_errors, &label),
            ejections: handle(&self.ejections, &label),
        }
    }

    /// Drops the series of a service port that left the route table (its port released):
    /// every one [`Metrics::service`] makes.
    pub fn forget_service(&self, service: &ServicePort) {
        let name = service.to_string();
        let label = ServiceLabel {
            service: name.clone(),
        };
        for gauge in [&self.active, &self.kernel_active, &self.sessions_active] {
            gauge.remove(&label);
        }
        for counter in [
            &self.connections,
            &self.failed,
            &self.local_errors,
            &self.kernel_forwarded,
            &self.kernel_refused,
            &self.kernel_senders,
            &self.sessions,
            &self.udp_kernel_sends,
        ] {
            counter.remove(&label);
        }
        for direction in ["up", "down"] {
            let label = BytesLabel {
                service: name.clone(),
                direction,
            };
            self.bytes.remove(&label);
            self.datagrams.remove(&label);
        }
        for reason in ["not linked", "unknown source"] {
            self.refused.remove(&DropLabel {
                service: name.clone(),
                reason,
            });
        }
        for reason in ["no backend", "session limit", "send error"] {
            self.drops.remove(&DropLabel {
                service: name.clone(),
                reason,
            });
        }
    }

    /// Drops the series of a backend that left the route table (its endpoint gone).
    pub fn forget_backend(&self, service: &ServicePort, addr: std::net::SocketAddr) {
        let label = BackendLabel {
            service: service.to_string(),
            backend: addr.to_string(),
        };
        self.connect_errors.remove(&label);
        self.ejections.remove(&label);
    }
}

/// The handle of `label` in `family`. The family's guard ends inside this call: two alive at
/// once in one statement would deadlock on the family's lock.
fn handle<L, M, C>(family: &Family<L, M, C>, label: &L) -> M
where
    L: Clone + std::hash::Hash + Eq,
    M: Clone,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    family.get_or_create(label).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_gets_the_same_handles_each_time_and_the_registry_shows_them() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let sp: ServicePort = "shared/echo:7".parse().unwrap();
        metrics.service(&sp).connections.inc();
        metrics.service(&sp).connections.inc();
        assert_eq!(metrics.service(&sp).connections.get(), 2);
        let backend = metrics.backend(&sp, "10.0.0.1:7".parse().unwrap());
        backend.ejections.inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("ambassador_connections_total{service=\"shared/echo:7/tcp\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "ambassador_backend_ejections_total{service=\"shared/echo:7/tcp\",backend=\"10.0.0.1:7\"} 1"
            ),
            "{text}"
        );
    }
}
