//! The edge: the `nft` binary. Scripts go in through `nft -f -` (one transaction each); state
//! comes back through `nft -j list table` and serde_json.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use crate::render::{SET_V4, SET_V6, TABLE};

/// What is applied now, read back from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub members: BTreeSet<IpAddr>,
    /// The final drop rule's comment, which carries the rules digest.
    pub drop_comment: String,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    /// Every rule comment in order, e.g. "open to all", for `--status`.
    pub rules: usize,
}

/// nft could not run or refused: exit 1, the previous rules still hold.
impl runtime::Fatal for NftError {
    fn exit_code(&self) -> u8 {
        runtime::process::FAILURE
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft: {0}; install nftables (apt-get install nftables)")]
    Spawn(std::io::Error),
    #[error("nft refused the ruleset, nothing was changed:\n{0}")]
    Refused(String),
    #[error("nft failed: {0}")]
    Failed(String),
    #[error("cannot read nft's JSON: {0}")]
    Json(String),
}

/// Runs a script through `nft -f -`: all of it or nothing.
pub fn run(script: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Reads locknet's table back; `None` if there is none.
pub fn read() -> Result<Option<Applied>, NftError> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "inet", TABLE])
        .output()
        .map_err(NftError::Spawn)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(NftError::Failed(err.trim().to_owned()));
    }
    parse(&out.stdout).map(Some)
}

/// The table as `nft -s` prints it (no counters): what a human, or an idempotence test, reads.
pub fn list_text() -> Result<Option<String>, NftError> {
    let out = Command::new("nft")
        .args(["-s", "list", "table", "inet", TABLE])
        .output()
        .map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
    } else if String::from_utf8_lossy(&out.stderr).contains("No such file or directory") {
        Ok(None)
    } else {
        Err(NftError::Failed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Removes locknet's table and nothing else; false if there was none.
pub fn flush() -> Result<bool, NftError> {
    if read()?.is_none() {
        return Ok(false);
    }
    run(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n"))?;
    Ok(true)
}

fn parse(json: &[u8]) -> Result<Applied, NftError> {
    let doc: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| NftError::Json(e.to_string()))?;
    let items = doc
        .get("nftables")
        .and_then(|v| v.as_array())
        .ok_or_else(|| NftError::Json("no \"nftables\" array".to_owned()))?;
    let mut applied = Applied::default();
    for item in items {
        if let Some(set) = item.get("set") {
            let name = set.get("name").and_then(|v| v.as_str()).unwrap_or("");
            if name != SET_V4 && name != SET_V6 {
                continue;
            }
            for elem in set
                .get("elem")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
            {
                let ip = elem
                    .as_str()
                    .and_then(|s| s.parse::<IpAddr>().ok())
                    .ok_or_else(|| {
                        NftError::Json(format!("unexpected element {elem} in set {name}"))
                    })?;
                applied.members.insert(ip);
            }
        } else if let Some(rule) = item.get("rule") {
            applied.rules += 1;
            let exprs = rule.get("expr").and_then(|v| v.as_array());
            let drops = exprs.is_some_and(|e| e.iter().any(|x| x.get("drop").is_some()));
            if !drops {
                continue;
            }
            applied.drop_comment = rule
                .get("comment")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned();
            for x in exprs.into_iter().flatten() {
                if let Some(c) = x.get("counter") {
                    applied.dropped_packets =
                        c.get("packets").and_then(|v| v.as_u64()).unwrap_or(0);
                    applied.dropped_bytes = c.get("bytes").and_then(|v| v.as_u64()).unwrap_or(0);
                }
            }
        }
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_nft_1_0_6_prints() {
        let json = br#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": "locknet", "handle": 1}},
            {"set": {"family": "inet", "name": "members_v4", "table": "locknet", "type": "ipv4_addr", "handle": 2, "elem": ["10.0.0.1", "10.0.0.2"]}},
            {"set": {"family": "inet", "name": "members_v6", "table": "locknet", "type": "ipv6_addr", "handle": 3}},
            {"chain": {"family": "inet", "table": "locknet", "name": "admit", "handle": 1, "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"}},
            {"rule": {"family": "inet", "table": "locknet", "chain": "admit", "handle": 5, "expr": [{"match": {}}, {"accept": null}]}},
            {"rule": {"family": "inet", "table": "locknet", "chain": "admit", "handle": 4, "comment": "not a member (locknet fnv1a64:0123)", "expr": [{"counter": {"packets": 7, "bytes": 420}}, {"drop": null}]}}]}"#;
        let a = parse(json).unwrap();
        assert_eq!(a.members.len(), 2);
        assert_eq!(a.drop_comment, "not a member (locknet fnv1a64:0123)");
        assert_eq!((a.dropped_packets, a.dropped_bytes, a.rules), (7, 420, 2));
        assert!(parse(b"{}").is_err());
    }
}
