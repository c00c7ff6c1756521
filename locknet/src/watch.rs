//! `--watch`: members are the hosts under `/viking/hosts/`, followed live.
//!
//! Every change is applied as element adds and deletes (the rules stay), then checked: if etcd
//! no longer answers, the change is rolled back and the reason logged, so a bad membership
//! change cannot cut this host off from the store it takes membership from. While etcd is
//! away the applied rules stay as they are. An empty member list (a wiped or wrong prefix) is
//! never applied: it would isolate every host, etcd's own peers included.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use runtime::CancellationToken;
use runtime::lease::LeasedKey;
use runtime::watch::Kv;
use schema::records::{self, FirewallRecord, HostRecord};
use schema::{Dir, HostId, Key, Prefix};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::policy::{Options, Policy};
use crate::{Firewall, Outcome, nft, render};

#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub prefix: Prefix,
    /// Members given on the command line or in a hosts file, admitted besides etcd's.
    pub static_members: BTreeSet<IpAddr>,
    pub options: Options,
    /// How long etcd may take to answer after an apply before it is rolled back.
    pub check_timeout: Duration,
    /// An `--iface` may be absent: warn at every apply instead of refusing.
    pub iface_may_appear: bool,
    /// How often the kernel's table is compared with what was applied (and applied again
    /// when it was flushed or changed behind locknet's back).
    pub resync: Duration,
    /// This host, whose status goes to `firewall/<host>` every [`STATUS_EVERY`].
    pub host: Option<HostId>,
}

/// How often `firewall/<host>` is written.
pub const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Writes `firewall/<host>` under a lease of its own (revoked on a clean stop).
struct Status {
    record: LeasedKey,
    since: String,
}

impl Status {
    fn start(config: &WatchConfig, client: &Client) -> Option<Status> {
        let key = config.prefix.key(&Key::Firewall(config.host.clone()?));
        Some(Status {
            record: LeasedKey::start(client.clone(), key, STATUS_EVERY * 3),
            since: runtime::host::rfc3339_now(),
        })
    }

    /// Reads the table's counters (a read of its own: what `resync` compares stays as it
    /// was) and writes them.
    async fn publish(&self) {
        let applied = match nft::read() {
            Ok(a) => a,
            Err(e) => {
                debug!("cannot read the counters: {e}");
                return;
            }
        };
        let record = FirewallRecord {
            v: records::RECORD_VERSION,
            since: self.since.clone(),
            at: runtime::host::rfc3339_now(),
            table: applied.is_some(),
            members: applied.as_ref().map_or(0, |a| a.members.len() as u64),
            dropped_packets: applied.as_ref().map_or(0, |a| a.dropped_packets),
            dropped_bytes: applied.as_ref().map_or(0, |a| a.dropped_bytes),
        };
        if let Err(e) = self.record.put(records::encode(&record)).await {
            debug!("cannot write the firewall status: {e}");
        }
    }
}

/// Follows `/viking/hosts/` until `shutdown`. The rules stay in place when it stops.
pub async fn run(config: WatchConfig, client: Client, shutdown: CancellationToken) {
    let (tx, mut rx) = mpsc::channel(64);
    let dir = config.prefix.dir(Dir::Hosts);
    let watcher = tokio::spawn(runtime::watch::watch_prefix(
        client.clone(),
        dir,
        tx,
        shutdown.clone(),
    ));
    let mut hosts: BTreeMap<String, Kv> = BTreeMap::new();
    let mut warned = BTreeSet::new();
    let mut fw = Firewall::default();
    let mut last: Option<Policy> = None;
    let mut was_router = config.options.router;
    let mut resync = tokio::time::interval(config.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let status = Status::start(&config, &client);
    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let update = tokio::select! {
            u = rx.recv() => u,
            _ = status_tick.tick(), if status.is_some() => {
                if let Some(s) = &status {
                    s.publish().await;
                }
                continue;
            }
            _ = resync.tick() => {
                if let Some(policy) = &last {
                    resync_table(&mut fw, policy, &client, &config).await;
                }
                continue;
            }
            () = shutdown.cancelled() => None,
        };
        let Some(update) = update else { break };
        runtime::watch::apply(&mut hosts, update);
        while let Ok(more) = rx.try_recv() {
            runtime::watch::apply(&mut hosts, more);
        }
        let mut members = config.static_members.clone();
        let mut problems = BTreeSet::new();
        for kv in hosts.values() {
            match host_addr(kv) {
                Ok(ip) => {
                    members.insert(ip);
                }
                Err(p) => {
                    problems.insert(p);
                }
            }
        }
        for p in problems.difference(&warned) {
            warn!("ignoring a host: {p}");
        }
        warned = problems;
        if members.is_empty() {
            warn!(
                "etcd lists no hosts under {}; keeping the current rules (an empty member list \
                 would cut every host off)",
                config.prefix.dir(Dir::Hosts)
            );
            continue;
        }
        // This host's own record may say it is a router: 80 and 443 open, as `--router`.
        let router = config.options.router || has_role(&hosts, &config, ROUTER);
        if router != was_router {
            if router && !config.options.router {
                info!("this host has role {ROUTER} in etcd: ports 80 and 443 are open to everyone");
            } else if !router {
                info!("this host no longer has role {ROUTER}: ports 80 and 443 are members-only");
            }
            was_router = router;
        }
        let options = Options {
            router,
            ..config.options.clone()
        };
        let policy = Policy::new(members, &options);
        if config.iface_may_appear {
            let present = crate::policy::interfaces();
            let absent = crate::policy::absent_ifaces(&config.options.ifaces, &present);
            if !absent.is_empty() {
                warn!(absent = ?absent, "--iface names no interface yet: nothing is filtered on it until it appears");
            }
        }
        apply_safely(&mut fw, &policy, &client, &config).await;
        last = Some(policy);
    }
    if let Some(s) = status {
        s.record.end().await;
    }
    let _ = watcher.await;
}

/// Compares the kernel's table with what was applied; when it is gone or changed (a
/// `locknet --flush`, an `nft delete table`), applies the whole policy again and says so.
async fn resync_table(fw: &mut Firewall, policy: &Policy, client: &Client, config: &WatchConfig) {
    match fw.refresh() {
        Ok(false) => {}
        Ok(true) => {
            warn!(
                "table inet {} is gone or was changed since locknet applied it; applying it again",
                render::TABLE
            );
            apply_safely(fw, policy, client, config).await;
        }
        Err(e) => error!("cannot read the current rules: {e}; will try again"),
    }
}

/// The role that opens 80 and 443 (`viking host add NAME ADDR --role router`).
pub const ROUTER: &str = "router";

/// Whether this host's own record among `hosts` lists `role`.
fn has_role(hosts: &BTreeMap<String, Kv>, config: &WatchConfig, role: &str) -> bool {
    let Some(host) = &config.host else {
        return false;
    };
    let key = config.prefix.key(&Key::Host(host.clone()));
    hosts.get(&key).is_some_and(|kv| {
        records::decode::<HostRecord>(&kv.key, &kv.value)
            .is_ok_and(|r| r.roles.iter().any(|r| r == role))
    })
}

fn host_addr(kv: &Kv) -> Result<IpAddr, String> {
    let record: HostRecord = records::decode(&kv.key, &kv.value).map_err(|e| e.to_string())?;
    record.addr.parse().map_err(|_| {
        format!(
            "{}: addr {:?} is not an IP address; fix it with `viking host add {} <address>`",
            kv.key, record.addr, record.host
        )
    })
}

/// Applies `policy`, then checks etcd still answers; rolls back if it does not.
async fn apply_safely(fw: &mut Firewall, policy: &Policy, client: &Client, config: &WatchConfig) {
    let planned = match fw.plan(policy) {
        Ok(p) => p,
        Err(e) => {
            error!("cannot read the current rules: {e}; not changing anything");
            return;
        }
    };
    let Some((script, outcome)) = planned else {
        return;
    };
    // What undoes it: the inverse element changes, or the whole table as it was.
    let undo = match (&outcome, fw.members()) {
        (Outcome::Members { .. }, Some(old)) => render::members_change(&policy.members, old),
        _ => {
            let reset = format!("table inet {t}\ndelete table inet {t}\n", t = render::TABLE);
            match nft::list_text() {
                Ok(before) => format!("{reset}{}", before.unwrap_or_default()),
                Err(e) => {
                    error!("cannot read the current rules: {e}; not changing anything");
                    return;
                }
            }
        }
    };
    if let Err(e) = fw.run(&script, Some(policy)) {
        // A membership change fails when the table is not what this process thought (flushed
        // behind its back): plan again from what the kernel really has.
        if matches!(outcome, Outcome::Members { .. }) && retry_whole(fw, policy) {
            warn!("{e}; the table was not as applied: applied the whole policy again");
        } else {
            error!("{e}; the kernel's rules are as `locknet --status` shows");
        }
        return;
    }
    if etcd_answers(client, config).await {
        match outcome {
            Outcome::Members { added, removed } => info!(
                members = policy.members.len(),
                added, removed, "membership applied"
            ),
            _ => info!(
                members = policy.members.len(),
                open = ?policy.open.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "ruleset applied"
            ),
        }
        return;
    }
    match fw.run(&undo, None) {
        Ok(()) => warn!(
            "etcd did not answer within {:?} after applying {} members; rolled back to the \
             previous rules",
            config.check_timeout,
            policy.members.len()
        ),
        Err(e) => error!("etcd did not answer after applying, and the roll-back failed: {e}"),
    }
}

/// Reads the table again and applies `policy` from what is there; whether that worked.
fn retry_whole(fw: &mut Firewall, policy: &Policy) -> bool {
    if fw.refresh().is_err() {
        return false;
    }
    match fw.plan(policy) {
        Ok(Some((script, _))) => fw.run(&script, Some(policy)).is_ok(),
        Ok(None) => true,
        Err(_) => false,
    }
}

/// Whether etcd answers within the check timeout. A zero timeout gives it no time at all,
/// rather than racing a local etcd against the timer's millisecond tick.
async fn etcd_answers(client: &Client, config: &WatchConfig) -> bool {
    if config.check_timeout.is_zero() {
        return false;
    }
    let mut kv = client.kv_client();
    let probe = kv.get(
        config.prefix.dir(Dir::Hosts),
        Some(
            GetOptions::new()
                .with_prefix()
                .with_keys_only()
                .with_limit(1),
        ),
    );
    matches!(
        tokio::time::timeout(config.check_timeout, probe).await,
        Ok(Ok(_))
    )
}
