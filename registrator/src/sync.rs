//! The etcd edge: read back this host's keys, diff them against what Docker runs, write the
//! difference under the host's lease.

use std::collections::BTreeMap;

use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp};
use schema::{Dir, HostId, Key, Prefix};

/// etcd's default `--max-txn-ops`: a transaction holds at most this many operations.
use schema::MAX_TXN_OPS;

/// This host's keys as etcd holds them: full key -> (value, lease id).
pub type Actual = BTreeMap<String, (String, i64)>;

/// One change to make in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write `value` under our lease. `was` is the value etcd held before, if any (the same
    /// value under another lease, e.g. an earlier run's, is re-owned).
    Put {
        key: String,
        value: String,
        was: Option<String>,
    },
    Delete {
        key: String,
    },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// The operations that turn `actual` into `desired` with every key under `lease`. With
/// `deletes` off, keys that are not desired are left alone (used before Docker has been listed
/// once: not knowing what runs is no reason to remove anything).
pub fn diff(
    desired: &BTreeMap<String, String>,
    actual: &Actual,
    lease: i64,
    deletes: bool,
) -> Vec<Op> {
    let mut ops = Vec::new();
    for (key, value) in desired {
        match actual.get(key) {
            Some((v, l)) if v == value && *l == lease => {}
            was => ops.push(Op::Put {
                key: key.clone(),
                value: value.clone(),
                was: was.map(|(v, _)| v.clone()),
            }),
        }
    }
    if deletes {
        for key in actual.keys() {
            if !desired.contains_key(key) {
                ops.push(Op::Delete { key: key.clone() });
            }
        }
    }
    ops
}

/// Applies `ops` to a read-back state, as etcd will after they succeed.
pub fn apply(actual: &mut Actual, ops: &[Op], lease: i64) {
    for op in ops {
        match op {
            Op::Put { key, value, .. } => {
                actual.insert(key.clone(), (value.clone(), lease));
            }
            Op::Delete { key } => {
                actual.remove(key);
            }
        }
    }
}

/// Reads this host's endpoint keys and its `alive` key.
pub async fn read_host(
    client: &Client,
    prefix: &Prefix,
    host: &HostId,
) -> Result<Actual, etcd_client::Error> {
    let mut kv = client.kv_client();
    let services = kv
        .get(
            prefix.dir(Dir::Services),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    let alive_key = prefix.key(&Key::Alive(host.clone()));
    let alive = kv.get(alive_key.as_str(), None).await?;
    let containers = kv
        .get(
            prefix.dir(Dir::HostContainers(host)),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    let mut actual = Actual::new();
    for kv in services
        .kvs()
        .iter()
        .chain(alive.kvs())
        .chain(containers.kvs())
    {
        let Ok(key) = kv.key_str() else { continue };
        let ours = match prefix.parse(key) {
            Ok(Key::Endpoint { instance, .. }) => &instance.host == host,
            Ok(Key::Alive(h) | Key::Container(h, _)) => &h == host,
            _ => false,
        };
        if ours {
            let value = String::from_utf8_lossy(kv.value()).into_owned();
            actual.insert(key.to_owned(), (value, kv.lease()));
        }
    }
    Ok(actual)
}

/// Writes `ops` under `lease`, in as few transactions as etcd allows, never splitting the keys
/// of one container between two of them (unless it alone has more than [`MAX_TXN_OPS`]).
pub async fn write(client: &Client, ops: &[Op], lease: i64) -> Result<(), etcd_client::Error> {
    let mut kv = client.kv_client();
    for chunk in chunks(ops, MAX_TXN_OPS) {
        let txn_ops: Vec<TxnOp> = chunk
            .iter()
            .map(|op| match op {
                Op::Put { key, value, .. } => TxnOp::put(
                    key.as_str(),
                    value.as_str(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                Op::Delete { key } => TxnOp::delete(key.as_str(), None),
            })
            .collect();
        kv.txn(Txn::new().and_then(txn_ops)).await?;
    }
    Ok(())
}

/// The container a key belongs to: `.../<host>:<id12>:<port>` -> `<host>:<id12>`; other keys
/// are their own group.
fn group(key: &str) -> &str {
    let last = key.rsplit('/').next().unwrap_or(key);
    match last.rsplit_once(':') {
        Some((container, _port)) if last.matches(':').count() == 2 => container,
        _ => key,
    }
}

/// Splits `ops` into runs of at most `max`, keeping each container's ops together.
fn chunks(ops: &[Op], max: usize) -> Vec<Vec<&Op>> {
    let mut groups: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        groups.entry(group(op.key())).or_default().push(op);
    }
    let mut out: Vec<Vec<&Op>> = Vec::new();
    let mut current: Vec<&Op> = Vec::new();
    for (_, members) in groups {
        if !current.is_empty() && current.len() + members.len() > max {
            out.push(std::mem::take(&mut current));
        }
        for op in members {
            if current.len() == max {
                out.push(std::mem::take(&mut current));
            }
            current.push(op);
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn diff_puts_missing_changed_and_foreign_leased_keys_and_deletes_strays() {
        let desired = map(&[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]);
        let actual: Actual = [
            ("a".to_owned(), ("1".to_owned(), 7)),
            ("b".to_owned(), ("old".to_owned(), 7)),
            ("c".to_owned(), ("3".to_owned(), 6)),
            ("x".to_owned(), ("9".to_owned(), 7)),
        ]
        .into();
        let ops = diff(&desired, &actual, 7, true);
        let keys: Vec<_> = ops.iter().map(|o| format!("{o:?}")).collect();
        assert_eq!(
            keys,
            [
                r#"Put { key: "b", value: "2", was: Some("old") }"#,
                r#"Put { key: "c", value: "3", was: Some("3") }"#,
                r#"Put { key: "d", value: "4", was: None }"#,
                r#"Delete { key: "x" }"#,
            ]
        );
        assert_eq!(diff(&desired, &actual, 7, false).len(), 3);
        let mut after = actual.clone();
        apply(&mut after, &ops, 7);
        assert!(diff(&desired, &after, 7, true).is_empty());
    }

    #[test]
    fn chunks_keep_a_container_together() {
        let put = |k: String| Op::Delete { key: k };
        let mut ops = Vec::new();
        for c in 0..3 {
            for port in 0..50 {
                ops.push(put(format!("/v/services/s/j/{port}-tcp/h:{c:012}:{port}")));
            }
        }
        ops.push(put("/v/alive/h".to_owned()));
        let sizes: Vec<usize> = chunks(&ops, 128).iter().map(Vec::len).collect();
        assert_eq!(sizes, [101, 50]);
        let big: Vec<Op> = (1..=300)
            .map(|p| put(format!("/v/services/s/j/{p}-tcp/h:000000000000:{p}")))
            .collect();
        let sizes: Vec<usize> = chunks(&big, 128).iter().map(Vec::len).collect();
        assert_eq!(sizes, [128, 128, 44]);
    }
}
