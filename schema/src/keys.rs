//! Every etcd key viking reads or writes, built and parsed in one place.
//!
//! Invariant: no other code formats a key path. A [`Key`] holds only checked names, so a built
//! key has no `/` inside a segment, no `..` and no empty segment; [`Prefix::parse`] is its
//! inverse (`parse(build(k)) == k`, property-tested).

use std::fmt;
use std::str::FromStr;

use crate::domain::Domain;
use crate::names::{HostId, JobName, NameError, StackName};
use crate::service::{Proto, ServiceId, ServicePort, parse_port};

/// The default key prefix (`--prefix`, `VIKING_PREFIX`).
pub const DEFAULT_PREFIX: &str = "/viking";

/// The root under which all of a cluster's keys live, e.g. `/viking`.
/// Checked: starts with `/`, no trailing `/`, segments are non-empty and not `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Prefix(String);

impl Default for Prefix {
    fn default() -> Self {
        Self(DEFAULT_PREFIX.to_owned())
    }
}

impl Prefix {
    pub fn new(value: &str) -> Result<Self, KeyError> {
        let bad = |why: &'static str| KeyError::Prefix {
            value: value.to_owned(),
            why,
        };
        let rest = value
            .strip_prefix('/')
            .ok_or_else(|| bad("it must start with '/'"))?;
        if rest.is_empty() {
            return Err(bad("it must name at least one segment, e.g. /viking"));
        }
        for segment in rest.split('/') {
            if segment.is_empty() {
                return Err(bad("it has an empty segment or a trailing '/'"));
            }
            if segment == "." || segment == ".." {
                return Err(bad("it has a '.' or '..' segment"));
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(bad(
                    "segments may hold only A-Z, a-z, 0-9, '-', '_' and '.'",
                ));
            }
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The full key for `key`.
    pub fn key(&self, key: &Key) -> String {
        format!("{}/{}", self.0, key.path())
    }

    /// The range prefix of a directory, always ending in `/`, for range reads and watches.
    pub fn dir(&self, dir: Dir<'_>) -> String {
        let tail = match dir {
            Dir::Hosts => "hosts/".to_owned(),
            Dir::Alive => "alive/".to_owned(),
            Dir::Services => "services/".to_owned(),
            Dir::ServicePort(sp) => {
                format!("services/{}/{}/", sp.service, sp.port_segment())
            }
            Dir::Ports => "ports/".to_owned(),
            Dir::PortAllocs => "ports/alloc/".to_owned(),
            Dir::StackPortAllocs(stack) => format!("ports/alloc/{stack}/"),
            Dir::PortOwners => "ports/owner/".to_owned(),
            Dir::PortFree => "ports/free/".to_owned(),
            Dir::Stacks => "stacks/".to_owned(),
            Dir::Stack(stack) => format!("stacks/{stack}/"),
            Dir::Grid => "grid/".to_owned(),
            Dir::Nodes => "grid/nodes/".to_owned(),
            Dir::Runs => "grid/run/".to_owned(),
            Dir::Assignments => "grid/assign/".to_owned(),
            Dir::HostAssignments(host) => format!("grid/assign/{host}/"),
            Dir::Statuses => "grid/status/".to_owned(),
            Dir::HostStatuses(host) => format!("grid/status/{host}/"),
            Dir::Lost => "grid/lost/".to_owned(),
            Dir::Containers => "containers/".to_owned(),
            Dir::HostContainers(host) => format!("containers/{host}/"),
            Dir::HostStopping(host) => format!("grid/stopping/{host}/"),
            Dir::Stats => "stats/".to_owned(),
            Dir::Firewalls => "firewall/".to_owned(),
            Dir::Routes => "routes/".to_owned(),
            Dir::Certs => "certs/".to_owned(),
        };
        format!("{}/{tail}", self.0)
    }

    /// Parses a full key read from etcd back into a [`Key`].
    pub fn parse(&self, full: &str) -> Result<Key, KeyError> {
        let bad = |why: &'static str| KeyError::Key {
            key: full.to_owned(),
            why,
        };
        let path = full
            .strip_prefix(self.0.as_str())
            .and_then(|p| p.strip_prefix('/'))
            .ok_or_else(|| bad("it is not under the prefix"))?;
        let segments: Vec<&str> = path.split('/').collect();
        let name_err = |e: NameError| KeyError::Name {
            key: full.to_owned(),
            source: e,
        };
        let key = match segments.as_slice() {
            ["hosts", host] => Key::Host(HostId::new(*host).map_err(name_err)?),
            ["alive", host] => Key::Alive(HostId::new(*host).map_err(name_err)?),
            ["services", stack, job, port, instance] => Key::Endpoint {
                service_port: service_port(stack, job, port).map_err(|e| e.in_key(full))?,
                instance: instance
                    .parse()
                    .map_err(|_| bad("the instance is not <host>:<container-id-12>:<port>"))?,
            },
            ["ports", "next"] => Key::PortsNext,
            ["ports", "alloc", stack, job, port] => {
                Key::PortAlloc(service_port(stack, job, port).map_err(|e| e.in_key(full))?)
            }
            ["ports", "owner", port] => {
                Key::PortOwner(parse_port(port).ok_or_else(|| bad("the port is not 1-65535"))?)
            }
            ["ports", "free", port] => {
                Key::PortFree(parse_port(port).ok_or_else(|| bad("the port is not 1-65535"))?)
            }
            ["stacks", stack, "meta"] => Key::StackMeta(StackName::new(*stack).map_err(name_err)?),
            ["stacks", stack, "jobs", job] => Key::StackJob(
                StackName::new(*stack).map_err(name_err)?,
                JobName::new(*job).map_err(name_err)?,
            ),
            ["stacks", stack, "prev", job] => Key::StackPrev(
                StackName::new(*stack).map_err(name_err)?,
                JobName::new(*job).map_err(name_err)?,
            ),
            ["grid", "nodes", host] => Key::Node(HostId::new(*host).map_err(name_err)?),
            ["grid", "run", stack] => Key::Run(StackName::new(*stack).map_err(name_err)?),
            ["routes", domain] => Key::Route(
                Domain::new(domain)
                    .ok()
                    .filter(|d| d.as_str() == *domain)
                    .ok_or_else(|| bad("the domain is not a checked, lower-case DNS name"))?,
            ),
            ["certs", domain] => Key::Cert(
                Domain::new(domain)
                    .ok()
                    .filter(|d| d.as_str() == *domain)
                    .ok_or_else(|| bad("the domain is not a checked, lower-case DNS name"))?,
            ),
            ["grid", "lost", host] => Key::Lost(HostId::new(*host).map_err(name_err)?),
            ["stats", host] => Key::Stats(HostId::new(*host).map_err(name_err)?),
            ["firewall", host] => Key::Firewall(HostId::new(*host).map_err(name_err)?),
            ["containers", host, id] | ["grid", "stopping", host, id] => {
                let stopping = segments[0] == "grid";
                let id = Instance::new(HostId::new(*host).map_err(name_err)?, id, 1)
                    .map_err(|_| bad("the container id is not 12 lowercase hex digits"))?;
                if id.container_id.len() != 12 {
                    return Err(bad("the container id is not 12 lowercase hex digits"));
                }
                if stopping {
                    Key::Stopping(id.host, id.container_id)
                } else {
                    Key::Container(id.host, id.container_id)
                }
            }
            [
                "grid",
                kind @ ("assign" | "status"),
                host,
                stack,
                job,
                instance,
            ] => {
                let slot = Slot {
                    host: HostId::new(*host).map_err(name_err)?,
                    service: ServiceId::new(
                        StackName::new(*stack).map_err(name_err)?,
                        JobName::new(*job).map_err(name_err)?,
                    ),
                    instance: parse_instance(instance)
                        .ok_or_else(|| bad("the instance is not a number 0-999"))?,
                };
                if *kind == "assign" {
                    Key::Assign(slot)
                } else {
                    Key::Status(slot)
                }
            }
            _ => return Err(bad("it matches no key of the contract (docs/contract.md)")),
        };
        Ok(key)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Prefix {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// An instance number as a key segment: decimal without leading zeros, below `MAX_SCALE`.
fn parse_instance(s: &str) -> Option<u32> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    s.parse().ok().filter(|i| *i < crate::MAX_SCALE)
}

fn service_port(stack: &str, job: &str, port_proto: &str) -> Result<ServicePort, KeyPartError> {
    let service = ServiceId::new(StackName::new(stack)?, JobName::new(job)?);
    let (port, proto) = port_proto.split_once('-').ok_or(KeyPartError::Shape(
        "the port segment is not <port>-<proto>",
    ))?;
    let port = parse_port(port).ok_or(KeyPartError::Shape("the port is not 1-65535"))?;
    let proto: Proto = proto
        .parse()
        .map_err(|_| KeyPartError::Shape("the protocol is not tcp or udp"))?;
    Ok(ServicePort {
        service,
        port,
        proto,
    })
}

enum KeyPartError {
    Name(NameError),
    Shape(&'static str),
}

impl From<NameError> for KeyPartError {
    fn from(e: NameError) -> Self {
        KeyPartError::Name(e)
    }
}

impl KeyPartError {
    fn in_key(self, key: &str) -> KeyError {
        match self {
            KeyPartError::Name(source) => KeyError::Name {
                key: key.to_owned(),
                source,
            },
            KeyPartError::Shape(why) => KeyError::Key {
                key: key.to_owned(),
                why,
            },
        }
    }
}

/// A directory of the keyspace, for range reads and watches.
#[derive(Debug, Clone, Copy)]
pub enum Dir<'a> {
    Hosts,
    Alive,
    Services,
    /// All endpoints of one service port.
    ServicePort(&'a ServicePort),
    Ports,
    PortAllocs,
    /// The allocations of one stack's service ports.
    StackPortAllocs(&'a StackName),
    PortOwners,
    PortFree,
    Stacks,
    Stack(&'a StackName),
    /// Everything the grid keeps.
    Grid,
    /// `grid/nodes/`: what each live launcher's host offers.
    Nodes,
    /// `grid/run/`: the stacks asked to run.
    Runs,
    /// `grid/assign/`: every instance placed on a host.
    Assignments,
    /// The instances placed on one host: what its launcher watches.
    HostAssignments(&'a HostId),
    /// `grid/status/`: what every launcher reports.
    Statuses,
    HostStatuses(&'a HostId),
    /// `grid/lost/`: hosts whose launcher went away while they held work.
    Lost,
    /// `containers/`: every host's running containers (link-scoped access).
    Containers,
    /// One host's running containers: what its ambassador watches.
    HostContainers(&'a HostId),
    /// `grid/stopping/<host>/`: the containers its launcher is about to stop, which its
    /// registrator takes out of service first.
    HostStopping(&'a HostId),
    /// `stats/`: every ambassador's traffic counters (the UI).
    Stats,
    /// `firewall/`: every locknet's status (the UI).
    Firewalls,
    /// `routes/`: HTTP routes by domain (the router).
    Routes,
    /// `certs/`: TLS certificates by domain (the router).
    Certs,
}

/// One key of the contract (docs/contract.md, "etcd keys and values").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// `hosts/<host>`: durable cluster membership.
    Host(HostId),
    /// `alive/<host>`: leased liveness of a host's agents.
    Alive(HostId),
    /// `services/<stack>/<job>/<port>-<proto>/<instance>`: a leased endpoint.
    Endpoint {
        service_port: ServicePort,
        instance: Instance,
    },
    /// `ports/next`: the allocation counter (a hint, see portalloc).
    PortsNext,
    /// `ports/alloc/<stack>/<job>/<port>-<proto>`: the ambassador port of a service port.
    PortAlloc(ServicePort),
    /// `ports/owner/<port>`: which service port owns an ambassador port.
    PortOwner(u16),
    /// `ports/free/<port>`: a released port, reused before the counter grows.
    PortFree(u16),
    /// `stacks/<stack>/meta`.
    StackMeta(StackName),
    /// `stacks/<stack>/jobs/<job>`.
    StackJob(StackName, JobName),
    /// `stacks/<stack>/prev/<job>`: the spec a deploy replaced, for `viking rollback`.
    StackPrev(StackName, JobName),
    /// `grid/nodes/<host>`: what a host offers, under its launcher's lease.
    Node(HostId),
    /// `grid/run/<stack>`: the stack is asked to run.
    Run(StackName),
    /// `grid/assign/<host>/<stack>/<job>/<instance>`: an instance placed on a host.
    Assign(Slot),
    /// `grid/status/<host>/<stack>/<job>/<instance>`: what the host's launcher sees of it.
    Status(Slot),
    /// `grid/lost/<host>`: since when a host with work has had no launcher, and when its
    /// instances move.
    Lost(HostId),
    /// `containers/<host>/<id12>`: a running container of that host, under its registrator's
    /// lease.
    Container(HostId, String),
    /// `grid/stopping/<host>/<id12>`: the host's launcher is about to stop that container; its
    /// registrator deregisters it first, under the launcher's lease.
    Stopping(HostId, String),
    /// `stats/<host>`: the host's ambassador's counters per service port, every 5 s, under
    /// its lease.
    Stats(HostId),
    /// `firewall/<host>`: the host's `locknet --watch` status, every 5 s, under its lease.
    Firewall(HostId),
    /// `routes/<domain>`: the job that serves HTTP for a domain.
    Route(Domain),
    /// `certs/<domain>`: a TLS certificate and key for a domain.
    Cert(Domain),
}

/// One instance of a job on one host: the last segments of `grid/assign/` and `grid/status/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot {
    pub host: HostId,
    pub service: ServiceId,
    /// `0..scale`.
    pub instance: u32,
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} on {}", self.service, self.instance, self.host)
    }
}

impl Key {
    /// The path below the prefix, without a leading `/`.
    fn path(&self) -> String {
        match self {
            Key::Host(h) => format!("hosts/{h}"),
            Key::Alive(h) => format!("alive/{h}"),
            Key::Endpoint {
                service_port,
                instance,
            } => format!(
                "services/{}/{}/{instance}",
                service_port.service,
                service_port.port_segment()
            ),
            Key::PortsNext => "ports/next".to_owned(),
            Key::PortAlloc(sp) => format!("ports/alloc/{}/{}", sp.service, sp.port_segment()),
            Key::PortOwner(p) => format!("ports/owner/{p}"),
            Key::PortFree(p) => format!("ports/free/{p}"),
            Key::StackMeta(s) => format!("stacks/{s}/meta"),
            Key::StackJob(s, j) => format!("stacks/{s}/jobs/{j}"),
            Key::StackPrev(s, j) => format!("stacks/{s}/prev/{j}"),
            Key::Node(h) => format!("grid/nodes/{h}"),
            Key::Run(s) => format!("grid/run/{s}"),
            Key::Assign(slot) => format!(
                "grid/assign/{}/{}/{}",
                slot.host, slot.service, slot.instance
            ),
            Key::Status(slot) => format!(
                "grid/status/{}/{}/{}",
                slot.host, slot.service, slot.instance
            ),
            Key::Lost(h) => format!("grid/lost/{h}"),
            Key::Container(h, id) => format!("containers/{h}/{id}"),
            Key::Stopping(h, id) => format!("grid/stopping/{h}/{id}"),
            Key::Stats(h) => format!("stats/{h}"),
            Key::Firewall(h) => format!("firewall/{h}"),
            Key::Route(d) => format!("routes/{d}"),
            Key::Cert(d) => format!("certs/{d}"),
        }
    }
}

/// One running container's port: `<host>:<container-id-12>:<container-port>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instance {
    pub host: HostId,
    /// The first 12 hex digits of the container id, as `docker ps` shows them.
    pub container_id: String,
    pub container_port: u16,
}

impl Instance {
    /// Builds an instance; `container_id` may be the full id, its first 12 digits are kept.
    pub fn new(host: HostId, container_id: &str, container_port: u16) -> Result<Self, KeyError> {
        let short: String = container_id.chars().take(12).collect();
        if short.len() != 12
            || !short
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(KeyError::ContainerId(container_id.to_owned()));
        }
        if container_port == 0 {
            return Err(KeyError::ContainerId(container_id.to_owned()));
        }
        Ok(Self {
            host,
            container_id: short,
            container_port,
        })
    }
}

impl fmt::Display for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            self.host, self.container_id, self.container_port
        )
    }
}

impl FromStr for Instance {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(':');
        let (Some(host), Some(id), Some(port), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(KeyError::ContainerId(s.to_owned()));
        };
        let host = HostId::new(host).map_err(|e| KeyError::Name {
            key: s.to_owned(),
            source: e,
        })?;
        let port = parse_port(port).ok_or_else(|| KeyError::ContainerId(s.to_owned()))?;
        if id.len() != 12 {
            return Err(KeyError::ContainerId(s.to_owned()));
        }
        Self::new(host, id, port)
    }
}

/// A key or prefix that breaks the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("invalid key prefix {value:?}: {why}; pass --prefix like /viking")]
    Prefix { value: String, why: &'static str },
    #[error("unexpected etcd key {key:?}: {why}")]
    Key { key: String, why: &'static str },
    #[error("unexpected etcd key {key:?}: {source}")]
    Name { key: String, source: NameError },
    #[error(
        "invalid container instance {0:?}: expected 12 lower-case hex digits of a container id and a port 1-65535"
    )]
    ContainerId(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?"
    }

    fn service_port() -> impl Strategy<Value = ServicePort> {
        (
            name(),
            name(),
            1u16..,
            prop_oneof![Just(Proto::Tcp), Just(Proto::Udp)],
        )
            .prop_map(|(s, j, port, proto)| ServicePort {
                service: ServiceId::new(StackName::new(s).unwrap(), JobName::new(j).unwrap()),
                port,
                proto,
            })
    }

    fn key() -> impl Strategy<Value = Key> {
        let host = || name().prop_map(|h| HostId::new(h).unwrap());
        prop_oneof![
            host().prop_map(Key::Host),
            host().prop_map(Key::Alive),
            (service_port(), host(), "[0-9a-f]{12}", 1u16..).prop_map(|(sp, h, id, p)| {
                Key::Endpoint {
                    service_port: sp,
                    instance: Instance::new(h, &id, p).unwrap(),
                }
            }),
            Just(Key::PortsNext),
            service_port().prop_map(Key::PortAlloc),
            (1u16..).prop_map(Key::PortOwner),
            (1u16..).prop_map(Key::PortFree),
            name().prop_map(|s| Key::StackMeta(StackName::new(s).unwrap())),
            (name(), name()).prop_map(|(s, j)| Key::StackJob(
                StackName::new(s).unwrap(),
                JobName::new(j).unwrap()
            )),
            (name(), name()).prop_map(|(s, j)| Key::StackPrev(
                StackName::new(s).unwrap(),
                JobName::new(j).unwrap()
            )),
            host().prop_map(Key::Node),
            host().prop_map(Key::Lost),
            host().prop_map(Key::Stats),
            host().prop_map(Key::Firewall),
            (host(), "[0-9a-f]{12}", any::<bool>()).prop_map(|(h, id, s)| if s {
                Key::Stopping(h, id)
            } else {
                Key::Container(h, id)
            }),
            ("(\\*\\.)?", name(), name())
                .prop_map(|(w, a, b)| Key::Route(Domain::new(&format!("{w}{a}.{b}")).unwrap())),
            (name(), name())
                .prop_map(|(a, b)| Key::Cert(Domain::new(&format!("{a}.{b}")).unwrap())),
            name().prop_map(|s| Key::Run(StackName::new(s).unwrap())),
            (host(), name(), name(), 0u32..1000, any::<bool>()).prop_map(|(h, s, j, i, a)| {
                let slot = Slot {
                    host: h,
                    service: ServiceId::new(StackName::new(s).unwrap(), JobName::new(j).unwrap()),
                    instance: i,
                };
                if a {
                    Key::Assign(slot)
                } else {
                    Key::Status(slot)
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn parse_inverts_build(k in key(), prefix in "(/[a-z][a-z0-9_-]{0,8}){1,3}") {
            let prefix = Prefix::new(&prefix).unwrap();
            let built = prefix.key(&k);
            prop_assert_eq!(prefix.parse(&built).unwrap(), k);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = Prefix::default().parse(&s);
            let _ = Prefix::default().parse(&format!("/viking/{s}"));
        }
    }

    #[test]
    fn builds_the_contract_paths() {
        let p = Prefix::default();
        let sp: ServicePort = "shared/mongo:27017".parse().unwrap();
        let host = HostId::new("node-1").unwrap();
        let inst = Instance::new(host.clone(), "0123456789abcdef0123", 27017).unwrap();
        let table = [
            (Key::Host(host.clone()), "/viking/hosts/node-1"),
            (Key::Alive(host), "/viking/alive/node-1"),
            (
                Key::Endpoint {
                    service_port: sp.clone(),
                    instance: inst,
                },
                "/viking/services/shared/mongo/27017-tcp/node-1:0123456789ab:27017",
            ),
            (Key::PortsNext, "/viking/ports/next"),
            (
                Key::PortAlloc(sp.clone()),
                "/viking/ports/alloc/shared/mongo/27017-tcp",
            ),
            (Key::PortOwner(20000), "/viking/ports/owner/20000"),
            (Key::PortFree(20001), "/viking/ports/free/20001"),
            (
                Key::Route(Domain::new("*.apps.example.com").unwrap()),
                "/viking/routes/*.apps.example.com",
            ),
            (
                Key::Cert(Domain::new("example.com").unwrap()),
                "/viking/certs/example.com",
            ),
            (
                Key::Assign(Slot {
                    host: HostId::new("node-1").unwrap(),
                    service: "shared/web".parse().unwrap(),
                    instance: 3,
                }),
                "/viking/grid/assign/node-1/shared/web/3",
            ),
        ];
        for (key, path) in table {
            assert_eq!(p.key(&key), path);
        }
        assert_eq!(
            p.dir(Dir::ServicePort(&sp)),
            "/viking/services/shared/mongo/27017-tcp/"
        );
    }

    #[test]
    fn rejects_bad_prefixes_and_keys() {
        for bad in ["viking", "/", "/viking/", "//x", "/a/../b", "/a b"] {
            assert!(Prefix::new(bad).is_err(), "{bad}");
        }
        let p = Prefix::default();
        for bad in [
            "/other/hosts/a",
            "/viking/hosts/A",
            "/viking/hosts/a/b",
            "/viking/ports/owner/0",
            "/viking/ports/owner/70000",
            "/viking/ports/alloc/shared/mongo/27017",
            "/viking/ports/alloc/shared/mongo/27017-sctp",
            "/viking/services/s/j/80-tcp/h:xyz:80",
            "/viking/grid/assign/h/s/j/01",
            "/viking/grid/assign/h/s/j/1000",
            "/viking/grid/status/h/s/j/x",
            "/viking/unknown",
        ] {
            assert!(p.parse(bad).is_err(), "{bad}");
        }
    }
}
