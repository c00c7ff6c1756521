//! Link-scoped access: a new connection (or UDP session) to a service's ambassador port is
//! accepted from a container of this host only if that container's job links to the service
//! (its spec's links, `stacks/*/jobs/*`) or its `viking.links` label names it. Sources that are
//! not containers (loopback, this host's own addresses) are accepted: operators and health
//! checks. A source address the table does not know yet (a container that started a moment
//! ago) waits up to `--unknown-source-wait` for the registrator to publish it.
//!
//! The table is rebuilt from the watched keys (this host's `containers/<host>/` and `stacks/`)
//! on every change and swapped as one `Arc`, like the routes: deciding costs one hash lookup,
//! never an etcd or Docker call.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use runtime::watch::Kv;
use schema::records::{self, ContainerRecord};
use schema::{JobSpec, Key, Prefix, ServiceId};

/// Whether links are enforced (`--links`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LinksMode {
    /// Only linked containers (and the host itself) get in.
    #[default]
    Enforced,
    /// Everything that reaches the port gets in.
    Open,
}

/// One container of this host, as the table knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Its name, for logs.
    pub name: String,
    /// The services it may reach.
    pub allowed: HashSet<ServiceId>,
    /// Its network namespace's cookie, when the registrator could read it.
    pub netns: Option<u64>,
}

/// What to do with a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Accept,
    /// A known container whose job does not link to the service.
    NotLinked(String),
    /// An address the table does not know.
    Unknown,
}

impl Decision {
    /// The `reason` label of a refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            Decision::Accept => "accepted",
            Decision::NotLinked(_) => "not linked",
            Decision::Unknown => "unknown source",
        }
    }
}

/// The table: this host's containers by address, and this host's own addresses.
#[derive(Debug, Default)]
pub struct Access {
    by_addr: HashMap<IpAddr, Arc<Source>>,
    local: HashSet<IpAddr>,
}

impl Access {
    /// Builds the table from this host's container records and the job specs.
    pub fn build(
        prefix: &Prefix,
        containers: &BTreeMap<String, Kv>,
        stacks: &BTreeMap<String, Kv>,
        local: HashSet<IpAddr>,
    ) -> Access {
        let mut by_addr = HashMap::new();
        for (key, kv) in containers {
            if !matches!(prefix.parse(key), Ok(Key::Container(..))) {
                continue;
            }
            let Ok(record) = records::decode::<ContainerRecord>(key, &kv.value) else {
                continue;
            };
            let mut allowed: HashSet<ServiceId> = record
                .links_label
                .iter()
                .filter_map(|l| l.parse().ok())
                .collect();
            if let (Ok(stack), Ok(job)) = (record.stack.parse(), record.job.parse()) {
                let spec_key = prefix.key(&Key::StackJob(stack, job));
                if let Some(spec) = stacks
                    .get(&spec_key)
                    .and_then(|kv| records::decode::<JobSpec>(&spec_key, &kv.value).ok())
                {
                    allowed.extend(spec.links.into_iter().map(|l| l.service));
                }
            }
            let source = Arc::new(Source {
                name: record.name.clone(),
                allowed,
                netns: record.netns_cookie,
            });
            for addr in record.addrs.iter().filter_map(|a| a.parse().ok()) {
                by_addr.insert(addr, source.clone());
            }
        }
        Access { by_addr, local }
    }

    /// Every container with a known network namespace, once each: (its namespace's cookie,
    /// what it may reach).
    pub fn namespaces(&self) -> BTreeMap<u64, &HashSet<ServiceId>> {
        self.by_addr
            .values()
            .filter_map(|s| Some((s.netns?, &s.allowed)))
            .collect()
    }

    /// Whether a connection from `addr` to `service` is accepted.
    pub fn decide(&self, addr: IpAddr, service: &ServiceId) -> Decision {
        let addr = canonical(addr);
        if addr.is_loopback() || self.local.contains(&addr) {
            return Decision::Accept;
        }
        match self.by_addr.get(&addr) {
            Some(source) if source.allowed.contains(service) => Decision::Accept,
            Some(source) => Decision::NotLinked(source.name.clone()),
            None => Decision::Unknown,
        }
    }

    /// Containers known, for `/state`.
    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }
}

/// An IPv4 address in an IPv6 socket address is the IPv4 address.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// This host's own addresses (every interface's), read now.
pub fn local_addrs() -> HashSet<IpAddr> {
    nix::ifaddrs::getifaddrs()
        .map(|list| {
            list.filter_map(|ifa| {
                let a = ifa.address?;
                a.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            })
            .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: String) -> (String, Kv) {
        (
            key.to_owned(),
            Kv {
                key: key.to_owned(),
                value: value.into_bytes(),
                ..Kv::default()
            },
        )
    }

    #[test]
    fn a_container_reaches_what_its_job_or_its_label_links_to_and_nothing_else() {
        let prefix = Prefix::default();
        let mut client = JobSpec::new("app".parse().unwrap(), "client".parse().unwrap(), "x");
        client.links.push(schema::LinkSpec {
            alias: "shared/web".into(),
            service: "shared/web".parse().unwrap(),
            prefix: "SHARED_WEB".into(),
            ports: Vec::new(),
        });
        let stacks = BTreeMap::from([kv(
            "/viking/stacks/app/jobs/client",
            records::encode(&client),
        )]);
        let record = |stack: &str, job: &str, addr: &str, label: &[&str]| {
            records::encode(&ContainerRecord {
                v: 1,
                stack: stack.into(),
                job: job.into(),
                addrs: vec![addr.into()],
                links_label: label.iter().map(|s| (*s).to_owned()).collect(),
                name: format!("{stack}-{job}"),
                netns_cookie: None,
            })
        };
        let containers = BTreeMap::from([
            kv(
                "/viking/containers/h/000000000001",
                record("app", "client", "172.17.0.2", &[]),
            ),
            kv(
                "/viking/containers/h/000000000002",
                record("app", "other", "172.17.0.3", &[]),
            ),
            kv(
                "/viking/containers/h/000000000003",
                record("", "", "172.17.0.4", &["shared/db"]),
            ),
        ]);
        let local = HashSet::from(["10.0.0.5".parse().unwrap()]);
        let access = Access::build(&prefix, &containers, &stacks, local);
        let (web, db): (ServiceId, ServiceId) =
            ("shared/web".parse().unwrap(), "shared/db".parse().unwrap());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(access.decide(ip("172.17.0.2"), &web), Decision::Accept);
        assert_eq!(
            access.decide(ip("172.17.0.2"), &db),
            Decision::NotLinked("app-client".into())
        );
        assert_eq!(
            access.decide(ip("172.17.0.3"), &web),
            Decision::NotLinked("app-other".into())
        );
        assert_eq!(access.decide(ip("172.17.0.4"), &db), Decision::Accept);
        assert_eq!(access.decide(ip("172.17.0.9"), &web), Decision::Unknown);
        assert_eq!(access.decide(ip("127.0.0.1"), &web), Decision::Accept);
        assert_eq!(access.decide(ip("10.0.0.5"), &web), Decision::Accept);
        assert_eq!(
            access.decide(ip("::ffff:172.17.0.2"), &web),
            Decision::Accept
        );
    }
}
