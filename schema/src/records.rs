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
