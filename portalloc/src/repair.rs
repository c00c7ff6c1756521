//! `portalloc repair`: make `alloc/` and `owner/` agree again.
//!
//! They disagree when someone wrote keys by hand, an older version wrote one without the
//! other, or a crash hit a tool that did not use one transaction. [`plan`] is pure: it reads a
//! [`State`] (everything under `ports/` at one revision) and returns the fixes; each fix
//! carries the compares that make it commit only if the keys it read are unchanged.
//!
//! The rules, in order:
//! * the `alloc/` record is what users see (HQ's env vars, the ambassador's listeners), so when
//!   the two disagree about a port that an allocation claims, the owner key is rewritten;
//! * when two allocations claim one port, the one the owner key names keeps it (else the first
//!   by name) and the others move to free ports;
//! * an owner key no allocation claims gets its allocation back if its service port has none,
//!   else it is dropped and the port freed;
//! * unreadable records are dropped; free-list entries for owned ports are dropped;
//! * `ports/next` is raised above the highest claimed port and written zero-padded.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use etcd_client::{Compare, CompareOp, TxnOp};
use schema::records::{self, PortAllocRecord};
use schema::{Key, Kv, Prefix, ServicePort};

use crate::plan::PortRange;

/// Everything under `ports/` at one revision, keyed by full key.
#[derive(Debug, Clone, Default)]
pub struct State {
    pub revision: i64,
    pub allocs: BTreeMap<String, Kv>,
    pub owners: BTreeMap<String, Kv>,
    pub free: BTreeMap<String, Kv>,
    pub next: Option<Kv>,
}

/// One change repair makes, with the keys it needs (full paths) and the revisions it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fix {
    CreateOwner {
        service_port: String,
        port: u16,
        alloc_key: String,
        alloc_rev: i64,
        owner_key: String,
    },
    RewriteOwner {
        service_port: String,
        port: u16,
        was: String,
        alloc_key: String,
        alloc_rev: i64,
        owner_key: String,
        owner_rev: i64,
    },
    RestoreAlloc {
        service_port: String,
        port: u16,
        alloc_key: String,
        /// The unreadable alloc value it replaces, if any.
        alloc_rev: Option<i64>,
        owner_key: String,
        owner_rev: i64,
    },
    DropOwner {
        port: u16,
        was: String,
        owner_key: String,
        owner_rev: i64,
        free_key: Option<String>,
    },
    Reassign {
        service_port: String,
        from: u16,
        to: u16,
        taken_by: String,
        alloc_key: String,
        alloc_rev: i64,
        new_owner_key: String,
        /// The revision of an owner key at `to` that already names this service port.
        new_owner_rev: Option<i64>,
        free_key: String,
    },
    DropKey {
        key: String,
        rev: i64,
        why: String,
    },
    SetNext {
        key: String,
        was: Option<String>,
        to: u32,
        rev: i64,
    },
    /// Found but not fixable automatically; reported only.
    Unfixable {
        what: String,
    },
}

impl Fix {
    /// The compares and operations that apply this fix.
    pub fn txn_parts(&self) -> (Vec<Compare>, Vec<TxnOp>) {
        let unchanged = |k: &str, rev: i64| Compare::mod_revision(k, CompareOp::Equal, rev);
        let absent = |k: &str| Compare::create_revision(k, CompareOp::Equal, 0);
        let alloc_value = |port: u16| records::encode(&PortAllocRecord::new(port));
        match self {
            Fix::CreateOwner {
                service_port,
                alloc_key,
                alloc_rev,
                owner_key,
                ..
            } => (
                vec![unchanged(alloc_key, *alloc_rev), absent(owner_key)],
                vec![TxnOp::put(owner_key.as_str(), service_port.as_str(), None)],
            ),
            Fix::RewriteOwner {
                service_port,
                alloc_key,
                alloc_rev,
                owner_key,
                owner_rev,
                ..
            } => (
                vec![
                    unchanged(alloc_key, *alloc_rev),
                    unchanged(owner_key, *owner_rev),
                ],
                vec![TxnOp::put(owner_key.as_str(), service_port.as_str(), None)],
            ),
            Fix::RestoreAlloc {
                port,
                alloc_key,
                alloc_rev,
                owner_key,
                owner_rev,
                ..
            } => (
                vec![
                    unchanged(owner_key, *owner_rev),
                    match alloc_rev {
                        Some(rev) => unchanged(alloc_key, *rev),
                        None => absent(alloc_key),
                    },
                ],
                vec![TxnOp::put(alloc_key.as_str(), alloc_value(*port), None)],
            ),
            Fix::DropOwner {
                owner_key,
                owner_rev,
                free_key,
                ..
            } => {
                let mut ops = vec![TxnOp::delete(owner_key.as_str(), None)];
                if let Some(free_key) = free_key {
                    ops.push(TxnOp::put(free_key.as_str(), "", None));
                }
                (vec![unchanged(owner_key, *owner_rev)], ops)
            }
            Fix::Reassign {
                to,
                alloc_key,
                alloc_rev,
                new_owner_key,
                new_owner_rev: Some(owner_rev),
                ..
            } => (
                vec![
                    unchanged(alloc_key, *alloc_rev),
                    unchanged(new_owner_key, *owner_rev),
                ],
                vec![TxnOp::put(alloc_key.as_str(), alloc_value(*to), None)],
            ),
            Fix::Reassign {
                service_port,
                to,
                alloc_key,
                alloc_rev,
                new_owner_key,
                new_owner_rev: None,
                free_key,
                ..
            } => (
                vec![unchanged(alloc_key, *alloc_rev), absent(new_owner_key)],
                vec![
                    TxnOp::put(alloc_key.as_str(), alloc_value(*to), None),
                    TxnOp::put(new_owner_key.as_str(), service_port.as_str(), None),
                    TxnOp::delete(free_key.as_str(), None),
                ],
            ),
            Fix::DropKey { key, rev, .. } => (
                vec![unchanged(key, *rev)],
                vec![TxnOp::delete(key.as_str(), None)],
            ),
            Fix::SetNext { key, to, rev, .. } => (
                vec![if *rev == 0 {
                    absent(key)
                } else {
                    unchanged(key, *rev)
                }],
                vec![TxnOp::put(key.as_str(), records::next_value(*to), None)],
            ),
            Fix::Unfixable { .. } => (Vec::new(), Vec::new()),
        }
    }
}

impl fmt::Display for Fix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fix::CreateOwner {
                service_port, port, ..
            } => write!(
                f,
                "created owner of port {port} for {service_port} (it was missing)"
            ),
            Fix::RewriteOwner {
                service_port,
                port,
                was,
                ..
            } => write!(
                f,
                "owner of port {port} set to {service_port} (was {was:?})"
            ),
            Fix::RestoreAlloc {
                service_port, port, ..
            } => write!(
                f,
                "restored allocation {service_port} -> {port} from its owner key"
            ),
            Fix::DropOwner { port, was, .. } => write!(
                f,
                "dropped owner of port {port} ({was:?} does not hold it) and freed the port"
            ),
            Fix::Reassign {
                service_port,
                from,
                to,
                taken_by,
                ..
            } => write!(
                f,
                "moved {service_port} from port {from} (held by {taken_by}) to port {to}"
            ),
            Fix::DropKey { key, why, .. } => write!(f, "deleted {key}: {why}"),
            Fix::SetNext { was, to, .. } => match was {
                Some(was) => write!(f, "set the counter to {to} (was {was:?})"),
                None => write!(f, "set the counter to {to} (it was missing)"),
            },
            Fix::Unfixable { what } => write!(f, "not fixed: {what}"),
        }
    }
}

/// The fixes that make `state` consistent.
pub fn plan(state: &State, prefix: &Prefix, range: PortRange) -> Vec<Fix> {
    let mut fixes = Vec::new();
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();

    // Owners by port; keys that are not owner keys get dropped.
    let mut owners: BTreeMap<u16, (&String, &Kv, Option<ServicePort>)> = BTreeMap::new();
    for (key, raw) in &state.owners {
        match prefix.parse(key) {
            Ok(Key::PortOwner(port)) => {
                let sp = std::str::from_utf8(&raw.value)
                    .ok()
                    .and_then(|s| s.trim().parse::<ServicePort>().ok());
                owners.insert(port, (key, raw, sp));
            }
            _ => fixes.push(Fix::DropKey {
                key: key.clone(),
                rev: raw.mod_revision,
                why: "not an owner key of the contract".into(),
            }),
        }
    }

    // Claims: allocation records by port. Unreadable ones are restored from an owner key
    // that names them, or dropped.
    let mut claims: BTreeMap<u16, Vec<(ServicePort, &String, i64)>> = BTreeMap::new();
    let mut unreadable: BTreeMap<ServicePort, (&String, i64)> = BTreeMap::new();
    for (key, raw) in &state.allocs {
        let Ok(Key::PortAlloc(sp)) = prefix.parse(key) else {
            fixes.push(Fix::DropKey {
                key: key.clone(),
                rev: raw.mod_revision,
                why: "not an allocation key of the contract".into(),
            });
            continue;
        };
        match records::decode::<PortAllocRecord>(key, &raw.value) {
            // Blessing it with an owner key would make a stray value (port 22, say) stick.
            Ok(rec) if rec.port != 0 && !range.contains(rec.port) => {
                fixes.push(Fix::Unfixable {
                    what: format!(
                        "{key} holds port {} outside the range {range}: release it \
                         (portalloc release {sp}) and allocate it again, or widen --range",
                        rec.port
                    ),
                });
            }
            Ok(rec) if rec.port != 0 => {
                claims
                    .entry(rec.port)
                    .or_default()
                    .push((sp, key, raw.mod_revision));
            }
            _ => {
                unreadable.insert(sp, (key, raw.mod_revision));
            }
        }
    }
    let claimed_sp: BTreeMap<&ServicePort, u16> = claims
        .iter()
        .flat_map(|(p, cs)| cs.iter().map(move |(sp, _, _)| (sp, *p)))
        .collect();

    // Ports a reassignment may use: in range, neither claimed nor owned.
    let mut spare = (range.start..=range.end)
        .filter(|p| !claims.contains_key(p) && !owners.contains_key(p))
        .collect::<Vec<_>>()
        .into_iter();

    // Ports that losers of a double claim moved back to (their owner key named them).
    let mut moved_back: BTreeSet<u16> = BTreeSet::new();
    for (&port, claimants) in &claims {
        let owner = owners.get(&port);
        let owner_sp = owner.and_then(|(_, _, sp)| sp.as_ref());
        // The original holder keeps the port: its containers already carry it in their env.
        // That is the claim unchanged the longest (an allocation record changes only when its
        // port does), not the one the owner key names: an allocation that took the port after
        // its owner key was lost wrote a new owner key naming itself. On a tie (one
        // transaction), the owner key decides, then the name.
        let winner = claimants
            .iter()
            .min_by_key(|(sp, _, rev)| (*rev, Some(sp) != owner_sp))
            .expect("a claim has claimants");
        let (wsp, wkey, wrev) = winner;
        match owner {
            None => fixes.push(Fix::CreateOwner {
                service_port: wsp.to_string(),
                port,
                alloc_key: (*wkey).clone(),
                alloc_rev: *wrev,
                owner_key: prefix.key(&Key::PortOwner(port)),
            }),
            Some((okey, oraw, osp)) if osp.as_ref() != Some(wsp) => {
                fixes.push(Fix::RewriteOwner {
                    service_port: wsp.to_string(),
                    port,
                    was: text(&oraw.value),
                    alloc_key: (*wkey).clone(),
                    alloc_rev: *wrev,
                    owner_key: (*okey).clone(),
                    owner_rev: oraw.mod_revision,
                });
            }
            Some(_) => {}
        }
        for (sp, key, rev) in claimants {
            if sp == wsp {
                continue;
            }
            // Back to a port whose owner key already names it, if there is one.
            let own = owners.iter().find(|(p, (_, _, osp))| {
                !claims.contains_key(p) && osp.as_ref() == Some(sp) && !moved_back.contains(*p)
            });
            if let Some((&to, (okey, oraw, _))) = own {
                moved_back.insert(to);
                fixes.push(Fix::Reassign {
                    service_port: sp.to_string(),
                    from: port,
                    to,
                    taken_by: wsp.to_string(),
                    alloc_key: (*key).clone(),
                    alloc_rev: *rev,
                    new_owner_key: (*okey).clone(),
                    new_owner_rev: Some(oraw.mod_revision),
                    free_key: prefix.key(&Key::PortFree(to)),
                });
                continue;
            }
            match spare.next() {
                Some(to) => fixes.push(Fix::Reassign {
                    service_port: sp.to_string(),
                    from: port,
                    to,
                    taken_by: wsp.to_string(),
                    alloc_key: (*key).clone(),
                    alloc_rev: *rev,
                    new_owner_key: prefix.key(&Key::PortOwner(to)),
                    new_owner_rev: None,
                    free_key: prefix.key(&Key::PortFree(to)),
                }),
                None => fixes.push(Fix::Unfixable {
                    what: format!(
                        "{sp} shares port {port} with {wsp} and range {range} has no free port to move it to"
                    ),
                }),
            }
        }
    }

    // Owner keys no allocation claims.
    let mut restored: BTreeSet<ServicePort> = BTreeSet::new();
    for (&port, (okey, oraw, osp)) in &owners {
        if claims.contains_key(&port) || moved_back.contains(&port) {
            continue;
        }
        match osp {
            Some(sp) if !claimed_sp.contains_key(sp) && !restored.contains(sp) => {
                restored.insert(sp.clone());
                fixes.push(Fix::RestoreAlloc {
                    service_port: sp.to_string(),
                    port,
                    alloc_key: prefix.key(&Key::PortAlloc(sp.clone())),
                    alloc_rev: unreadable.get(sp).map(|(_, rev)| *rev),
                    owner_key: (*okey).clone(),
                    owner_rev: oraw.mod_revision,
                });
            }
            _ => fixes.push(Fix::DropOwner {
                port,
                was: text(&oraw.value),
                owner_key: (*okey).clone(),
                owner_rev: oraw.mod_revision,
                free_key: range
                    .contains(port)
                    .then(|| prefix.key(&Key::PortFree(port))),
            }),
        }
    }
    for (sp, (key, rev)) in &unreadable {
        if !restored.contains(sp) {
            fixes.push(Fix::DropKey {
                key: (*key).clone(),
                rev: *rev,
                why: "its value is not an allocation record and no owner key names it".into(),
            });
        }
    }

    // Free-list entries must name unowned, unclaimed ports.
    for (key, raw) in &state.free {
        let why = match prefix.parse(key) {
            Ok(Key::PortFree(p))
                if claims.contains_key(&p)
                    || owners.contains_key(&p)
                    || moved_back.contains(&p) =>
            {
                if owners.get(&p).is_some_and(|_| !claims.contains_key(&p))
                    && fixes
                        .iter()
                        .any(|f| matches!(f, Fix::DropOwner { port, .. } if *port == p))
                {
                    continue; // the owner goes and the port stays free
                }
                format!("port {p} is in use")
            }
            Ok(Key::PortFree(_)) => continue,
            _ => "not a free-list key of the contract".into(),
        };
        fixes.push(Fix::DropKey {
            key: key.clone(),
            rev: raw.mod_revision,
            why,
        });
    }

    // The counter: above every claimed port in range, zero-padded.
    let highest = claims
        .keys()
        .chain(fixes.iter().filter_map(|f| match f {
            Fix::Reassign { to, .. } => Some(to),
            Fix::RestoreAlloc { port, .. } => Some(port),
            _ => None,
        }))
        .filter(|p| range.contains(**p))
        .max()
        .map(|p| u32::from(*p) + 1);
    let key = prefix.key(&Key::PortsNext);
    match &state.next {
        None => {
            if let Some(to) = highest {
                fixes.push(Fix::SetNext {
                    key,
                    was: None,
                    to,
                    rev: 0,
                });
            }
        }
        Some(raw) => {
            let current = records::parse_next(&raw.value);
            let to = current
                .unwrap_or(u32::from(range.start))
                .max(highest.unwrap_or(0));
            if current != Some(to) || raw.value != records::next_value(to).as_bytes() {
                fixes.push(Fix::SetNext {
                    key,
                    was: Some(text(&raw.value)),
                    to,
                    rev: raw.mod_revision,
                });
            }
        }
    }
    fixes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(v: &str, rev: i64) -> Kv {
        Kv {
            value: v.as_bytes().to_vec(),
            mod_revision: rev,
            ..Kv::default()
        }
    }

    fn state(
        allocs: &[(&str, &str)],
        owners: &[(u16, &str)],
        free: &[u16],
        next: Option<&str>,
    ) -> State {
        let p = Prefix::default();
        let mut rev = 10;
        let mut bump = || {
            rev += 1;
            rev
        };
        State {
            revision: 100,
            allocs: allocs
                .iter()
                .map(|(sp, v)| {
                    let sp: ServicePort = sp.parse().unwrap();
                    (p.key(&Key::PortAlloc(sp)), raw(v, bump()))
                })
                .collect(),
            owners: owners
                .iter()
                .map(|(port, v)| (p.key(&Key::PortOwner(*port)), raw(v, bump())))
                .collect(),
            free: free
                .iter()
                .map(|port| (p.key(&Key::PortFree(*port)), raw("", bump())))
                .collect(),
            next: next.map(|n| raw(n, bump())),
        }
    }

    fn lines(fixes: &[Fix]) -> Vec<String> {
        fixes.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn consistent_state_needs_nothing() {
        let s = state(
            &[("a/b:80", r#"{"v":1,"port":20000}"#)],
            &[(20000, "a/b:80/tcp")],
            &[20005],
            Some("20001"),
        );
        assert!(plan(&s, &Prefix::default(), PortRange::DEFAULT).is_empty());
    }

    #[test]
    fn fixes_every_kind_of_disagreement() {
        let s = state(
            &[
                // owner missing
                ("a/one:80", r#"{"port":20000}"#),
                // owner names someone else who does not claim it
                ("a/two:80", r#"{"port":20001}"#),
                // two claims on 20002; the owner names three
                ("a/three:80", r#"{"port":20002}"#),
                ("a/four:80", r#"{"port":20002}"#),
                // unreadable, but an owner key names it
                ("a/five:80", "garbage"),
                // unreadable, nothing names it
                ("a/six:80", "{}"),
            ],
            &[
                (20001, "x/y:1/tcp"),
                (20002, "a/three:80/tcp"),
                (20003, "a/five:80/tcp"),
                // names a service port that holds another port
                (20004, "a/one:80/tcp"),
                (20006, "not a service port"),
            ],
            &[20000, 20009],
            Some("20001"),
        );
        let got = lines(&plan(&s, &Prefix::default(), PortRange::DEFAULT));
        let want = vec![
            "created owner of port 20000 for a/one:80/tcp (it was missing)",
            "owner of port 20001 set to a/two:80/tcp (was \"x/y:1/tcp\")",
            "moved a/four:80/tcp from port 20002 (held by a/three:80/tcp) to port 20005",
            "restored allocation a/five:80/tcp -> 20003 from its owner key",
            "dropped owner of port 20004 (\"a/one:80/tcp\" does not hold it) and freed the port",
            "dropped owner of port 20006 (\"not a service port\") does not hold it) and freed the port",
            "deleted /viking/ports/alloc/a/six/80-tcp: its value is not an allocation record and no owner key names it",
            "deleted /viking/ports/free/20000: port 20000 is in use",
            "set the counter to 20006 (was \"20001\")",
        ];
        assert_eq!(got.len(), want.len(), "{got:#?}");
        for (g, w) in got.iter().zip(&want) {
            if w.starts_with("dropped owner of port 20006") {
                assert!(g.starts_with("dropped owner of port 20006"), "{g}");
            } else {
                assert_eq!(g, w);
            }
        }
    }

    #[test]
    fn pads_the_counter_and_creates_it() {
        let s = state(
            &[("a/b:80", r#"{"port":9000}"#)],
            &[(9000, "a/b:80/tcp")],
            &[],
            None,
        );
        let range = PortRange::new(9000, 12000).unwrap();
        assert_eq!(
            lines(&plan(&s, &Prefix::default(), range)),
            vec!["set the counter to 9001 (it was missing)"]
        );
        let s = state(
            &[("a/b:80", r#"{"port":9000}"#)],
            &[(9000, "a/b:80/tcp")],
            &[],
            Some("9001"),
        );
        assert_eq!(
            lines(&plan(&s, &Prefix::default(), range)),
            vec!["set the counter to 9001 (was \"9001\")"]
        );
    }
}
