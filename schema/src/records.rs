//! The JSON values stored under the keys of [`crate::keys`].
//!
//! Every record carries a version field `v` (the current one is [`RECORD_VERSION`]) and is read
//! tolerantly: unknown fields are ignored and missing optional fields take defaults, so an
//! older reader accepts what a newer writer wrote. Never add `deny_unknown_fields` here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::names::HostId;
use crate::service::ServicePort;

/// The record version this code writes.
pub const RECORD_VERSION: u32 = 1;

fn current() -> u32 {
    RECORD_VERSION
}

/// `hosts/<host>`: a cluster member, written by an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    #[serde(default = "current")]
    pub v: u32,
    pub host: HostId,
    /// The address other hosts reach this one on; what locknet admits.
    pub addr: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Takes no new work (`viking host drain`); what runs there is moved by the scheduler.
    #[serde(default, skip_serializing_if = "is_false")]
    pub draining: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `alive/<host>`: a live agent, under that host's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliveRecord {
    #[serde(default = "current")]
    pub v: u32,
    pub host: HostId,
    pub addr: String,
    /// Which agent wrote it (`registrator`, `ambassador`).
    pub agent: String,
    /// The agent's software version.
    #[serde(default)]
    pub version: String,
    /// RFC 3339 time the agent started.
    #[serde(default)]
    pub since: String,
}

/// `services/.../<instance>`: one live backend of a service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    #[serde(default = "current")]
    pub v: u32,
    pub host: HostId,
    /// Address and port a client dials: the host's address and published port, or the
    /// container's own address and port with `--internal`.
    pub addr: String,
    pub port: u16,
    pub container_id: String,
    #[serde(default)]
    pub container_name: String,
    #[serde(default)]
    pub registered_at: String,
}

/// `routes/<domain>`: HTTP requests for `domain` go to `stack/job`'s `port` (the router).
/// Written by `viking deploy` in the same transaction as the jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRecord {
    #[serde(default = "current")]
    pub v: u32,
    pub stack: crate::StackName,
    pub job: crate::JobName,
    /// The job's TCP port that speaks HTTP.
    pub port: u16,
    /// A request over plain HTTP is answered with a 308 to HTTPS.
    #[serde(default)]
    pub https_redirect: bool,
}

/// `certs/<domain>`: a certificate chain and its private key, PEM (`viking cert add`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    #[serde(default = "current")]
    pub v: u32,
    pub chain_pem: String,
    pub key_pem: String,
}

/// `ports/alloc/<stack>/<job>/<port>-<proto>`: the ambassador port of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortAllocRecord {
    #[serde(default = "current")]
    pub v: u32,
    pub port: u16,
}

impl PortAllocRecord {
    pub fn new(port: u16) -> Self {
        Self {
            v: RECORD_VERSION,
            port,
        }
    }
}

/// `stacks/<stack>/meta`: what HQ deployed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackMetaRecord {
    #[serde(default = "current")]
    pub v: u32,
    pub name: String,
    #[serde(default)]
    pub deployed_at: String,
    #[serde(default)]
    pub source_digest: String,
    /// Jobs in start order: linked-to before linked-from.
    #[serde(default)]
    pub order: Vec<String>,
}

/// The value of `ports/owner/<port>`: the owning service port as plain text.
pub fn owner_value(service_port: &ServicePort) -> String {
    service_port.to_string()
}

/// The value of `ports/next`: decimal text, zero-padded to 5 digits so that etcd's byte-wise
/// value compare orders it numerically (portalloc only moves it forward with such a compare).
/// Readers must accept any decimal text.
pub fn next_value(port: u32) -> String {
    format!("{port:05}")
}

/// Reads `ports/next`: any decimal text, surrounding white space allowed.
pub fn parse_next(value: &[u8]) -> Option<u32> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// A stable digest of a text (FNV-1a, 64 bits), e.g. a stack's `source_digest`: enough to tell
/// "the same text", not a defence against anyone.
pub fn digest(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("fnv1a64:{h:016x}")
}

/// Decodes a JSON record, naming the key in the error.
pub fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, RecordError> {
    serde_json::from_slice(value).map_err(|e| RecordError {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// Encodes a record as JSON. Records are plain data, so this cannot fail.
pub fn encode<T: Serialize>(record: &T) -> String {
    serde_json::to_string(record).expect("records serialize to JSON")
}

/// A value in etcd that is not the record its key promises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad value at {key}: {reason}")]
pub struct RecordError {
    pub key: String,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerates_unknown_fields_and_missing_version() {
        let r: PortAllocRecord = decode("k", br#"{"port":20001,"added_later":{"x":1}}"#).unwrap();
        assert_eq!(r, PortAllocRecord::new(20001));
        let e: EndpointRecord = decode(
            "k",
            br#"{"v":7,"host":"node-1","addr":"10.0.0.2","port":32768,"container_id":"abc","future":true}"#,
        )
        .unwrap();
        assert_eq!(e.v, 7);
        assert_eq!(e.container_name, "");
    }

    #[test]
    fn rejects_bad_names_inside_records() {
        let err = decode::<HostRecord>(
            "/viking/hosts/x",
            br#"{"host":"Bad_Host","addr":"1.2.3.4"}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("invalid host name \"Bad_Host\""),
            "{err}"
        );
    }

    #[test]
    fn next_is_padded_and_read_back() {
        assert_eq!(next_value(9999), "09999");
        assert!(next_value(9999) < next_value(10000));
        assert_eq!(parse_next(b"09999"), Some(9999));
        assert_eq!(parse_next(b" 20000\n"), Some(20000));
        assert_eq!(parse_next(b"x"), None);
    }

    #[test]
    fn encodes_with_version() {
        assert_eq!(
            encode(&PortAllocRecord::new(20000)),
            r#"{"v":1,"port":20000}"#
        );
    }
}

/// `grid/nodes/<host>`: what a host offers the grid, under its launcher's lease: present
/// while the launcher lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    #[serde(default = "current")]
    pub v: u32,
    pub host: HostId,
    /// CPUs offered, in thousandths of a core.
    pub cpus_milli: u64,
    /// Memory offered, in bytes (what the host has less `--reserve-memory`).
    pub memory: u64,
    #[serde(default)]
    pub launcher_version: String,
    /// RFC 3339 time the launcher started.
    #[serde(default)]
    pub since: String,
}

/// `grid/run/<stack>`: the stack is asked to run (`viking run`); `viking stop` deletes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    #[serde(default = "current")]
    pub v: u32,
    /// RFC 3339 time it was asked.
    #[serde(default)]
    pub since: String,
}

/// `containers/<host>/<id12>`: one of the host's running containers, for link-scoped access
/// (the ambassador admits a connection from it only to services its job links to, or that
/// its `viking.links` label names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    #[serde(default = "current")]
    pub v: u32,
    /// Its `viking.stack` and `viking.job` labels; empty for a container without them.
    #[serde(default)]
    pub stack: String,
    #[serde(default)]
    pub job: String,
    /// Every address it has on a Docker network.
    #[serde(default)]
    pub addrs: Vec<String>,
    /// The services its `viking.links` label names (`stack/job`), as written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links_label: Vec<String>,
    /// Its name, for logs.
    #[serde(default)]
    pub name: String,
    /// The cookie of its network namespace (`SO_NETNS_COOKIE`): the ambassador's UDP
    /// balanced by the kernel (`--udp-kernel`) tells a container's sends by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_cookie: Option<u64>,
}

/// `stats/<host>`: what the host's ambassador has carried, per service port (`stack/job:port/
/// proto`), written every 5 s under its lease; the UI sums the hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsRecord {
    #[serde(default = "current")]
    pub v: u32,
    /// RFC 3339: when the ambassador started (how long it has been alive).
    #[serde(default)]
    pub since: String,
    /// RFC 3339: when these counters were read.
    #[serde(default)]
    pub at: String,
    #[serde(default)]
    pub services: BTreeMap<String, ServiceStats>,
}

/// `firewall/<host>`: what the host's `locknet --watch` has applied, written every 5 s under
/// its lease (the UI's firewall section).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallRecord {
    #[serde(default = "current")]
    pub v: u32,
    /// RFC 3339: when this locknet started, and when the counters were read.
    #[serde(default)]
    pub since: String,
    #[serde(default)]
    pub at: String,
    /// Whether locknet's table is in the kernel.
    #[serde(default)]
    pub table: bool,
    /// Member addresses admitted.
    #[serde(default)]
    pub members: u64,
    /// What the final drop rule has dropped since the table was made.
    #[serde(default)]
    pub dropped_packets: u64,
    #[serde(default)]
    pub dropped_bytes: u64,
}

/// One service port's counters on one host (since its ambassador started).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStats {
    /// TCP connections open now (UDP: sessions open now).
    #[serde(default)]
    pub active: u64,
    /// TCP connections accepted (UDP: sessions started).
    #[serde(default)]
    pub connections: u64,
    /// Connections that found no backend, or whose every connect failed (UDP: drops).
    #[serde(default)]
    pub failed: u64,
    /// Bytes client to backend.
    #[serde(default)]
    pub bytes_up: u64,
    /// Bytes backend to client.
    #[serde(default)]
    pub bytes_down: u64,
}

/// `grid/stopping/<host>/<id12>`: the host's launcher is about to stop the container. Its
/// registrator takes the container's endpoints out of service at once; the launcher waits for
/// that (and `--shutdown-delay`) before it sends the signal, so no new connection reaches a
/// server that is on its way out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoppingRecord {
    #[serde(default = "current")]
    pub v: u32,
    /// The container's name, for logs.
    #[serde(default)]
    pub name: String,
    /// RFC 3339: when the launcher decided to stop it.
    pub since: String,
}

/// `grid/assign/<host>/<stack>/<job>/<instance>`: the scheduler placed an instance there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignRecord {
    #[serde(default = "current")]
    pub v: u32,
    /// The digest of the job spec to run (`JobSpec::digest`).
    pub spec_digest: String,
    /// The scheduler's term that placed it (its election revision): later terms are higher.
    #[serde(default)]
    pub generation: i64,
    #[serde(default)]
    pub assigned_at: String,
    /// The instance is moving off this (live) host: its replacement is assigned elsewhere,
    /// and this copy keeps running until that one is healthy.
    #[serde(default, skip_serializing_if = "is_false")]
    pub leaving: bool,
}

/// What a launcher sees of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Assigned, not started: waiting for its links, or for Docker.
    Pending,
    /// Its container is being created or started.
    Starting,
    Running,
    /// It could not start or it crashed: `reason` says why.
    Failed,
    /// A task that ran to completion: `exit_code` says how.
    Exited,
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InstanceState::Pending => "pending",
            InstanceState::Starting => "starting",
            InstanceState::Running => "running",
            InstanceState::Failed => "failed",
            InstanceState::Exited => "exited",
        })
    }
}

/// `grid/status/<host>/<stack>/<job>/<instance>`: what the host's launcher sees, under its
/// lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRecord {
    #[serde(default = "current")]
    pub v: u32,
    pub state: InstanceState,
    #[serde(default)]
    pub container_id: String,
    /// The spec digest of the container it reports on.
    #[serde(default)]
    pub spec_digest: String,
    /// RFC 3339 time it entered `state`.
    #[serde(default)]
    pub since: String,
    /// How many times the launcher restarted it.
    #[serde(default)]
    pub restarts: u32,
    /// Why it is pending or failed, in words; empty otherwise.
    #[serde(default)]
    pub reason: String,
    /// A task's exit code, or a crashed container's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// It failed 5 times within 5 minutes here: the scheduler moves it to another host if
    /// one can take it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub crash_loop: bool,
}

/// `grid/lost/<host>`: a host whose launcher went away while it held work. Written by the
/// scheduler, so that its successor carries on with the same delay, and kept after the host
/// comes back (`back_since`) to count flapping; deleted after an hour of good health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostRecord {
    #[serde(default = "current")]
    pub v: u32,
    pub host: HostId,
    /// RFC 3339: when the scheduler saw it gone (this time).
    pub since: String,
    /// RFC 3339: when its instances are placed elsewhere, unless it comes back first.
    pub until: String,
    /// Losses in a row without an hour of good health between them (1 the first time).
    pub losses: u32,
    /// RFC 3339: when it came back, if it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub back_since: Option<String>,
}
