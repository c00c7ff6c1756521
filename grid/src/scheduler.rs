//! The scheduler: one launcher at a time, elected through etcd, places every instance of the
//! jobs asked to run and writes the assignments.
//!
//! Every launcher campaigns for `grid/leader` under a lease of its own. The leader follows
//! `stacks/` (the specs), `grid/run/` (which stacks run), `grid/nodes/` (the live hosts and
//! what they offer), `hosts/` (labels, draining), `grid/assign/` (its own writes) and
//! `grid/lost/` (its lost-host records), and
//! after every change (coalesced for a few milliseconds) computes [`crate::place`] and writes
//! the difference, in transactions of at most `--max-txn-ops` operations, each guarded by a
//! compare on its election key: a deposed leader's write fails, and it campaigns again.
//!
//! Nothing is placed until every one of those prefixes has been listed once: a partial view
//! would read as "nothing runs" and move everything. A host whose launcher's lease is gone
//! keeps its instances (it may be cut off, still running them) until the deadline of its
//! `grid/lost/<host>` record ([`crate::lost`]: `reschedule_after`, doubling for a host that
//! flaps); then they are placed elsewhere. The record is in etcd, so a new leader keeps the
//! deadline its predecessor set.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use std::time::SystemTime;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use runtime::host::parse_rfc3339;
use runtime::lease::{LeaseKeeper, LeaseOptions};
use runtime::watch::{Kv, WatchUpdate};
use runtime::{Backoff, CancellationToken};
use schema::records::{
    self, AssignRecord, HostRecord, InstanceState, LostRecord, NodeRecord, RECORD_VERSION,
    StatusRecord,
};
use schema::{Dir, HostId, JobSpec, Key, Prefix, ServiceId, Slot};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::lost;
use crate::place::{Host, InstanceId, Plan, place_avoiding};

/// What the scheduler needs to know.
#[derive(Debug, Clone)]
pub struct Config {
    pub prefix: Prefix,
    /// This launcher's host: the value it campaigns with.
    pub host: HostId,
    /// The election lease: a leader that stops renewing it is replaced this long after.
    pub ttl: Duration,
    /// How long a host's launcher may be gone before its instances are placed elsewhere.
    pub reschedule_after: Duration,
    /// etcd's `--max-txn-ops`.
    pub max_txn_ops: usize,
}

/// The election's name: candidates' keys are `<name>/<lease>`.
pub fn election(prefix: &Prefix) -> String {
    prefix.dir(Dir::Grid) + "leader"
}

/// Campaigns, and while elected places work; until `shutdown`.
pub async fn run(client: Client, config: Config, shutdown: CancellationToken) {
    let mut keeper = LeaseKeeper::spawn(
        client.clone(),
        LeaseOptions {
            ttl: config.ttl,
            // Resigning at once hands the work to another launcher without waiting a TTL.
            revoke_on_shutdown: true,
        },
        shutdown.clone(),
    );
    let mut backoff = Backoff::default();
    let mut leases = keeper.subscribe();
    while !shutdown.is_cancelled() {
        let Some(lease) = (tokio::select! {
            s = keeper.granted() => s,
            () = shutdown.cancelled() => None,
        }) else {
            break;
        };
        let lease_id = lease.id.expect("granted");
        let mut election = client.election_client();
        let campaign = tokio::select! {
            r = election.campaign(election_name(&config), config.host.as_str(), lease_id) => Some(r),
            // A new lease means the key we campaigned with is gone: campaign again.
            _ = leases.wait_for(|s| s.generation != lease.generation) => None,
            () = shutdown.cancelled() => break,
        };
        let leader = match campaign {
            None => continue,
            Some(Ok(mut resp)) => match resp.take_leader() {
                Some(l) => l,
                None => continue,
            },
            // The client's request timeout ends a campaign that is still waiting its turn:
            // campaign again at once (with the same lease, it resumes its place).
            Some(Err(e)) if is_timeout(&e) => {
                debug!("campaign still waiting: {e}");
                continue;
            }
            Some(Err(e)) => {
                warn!("campaign for the scheduler failed: {e}; retrying");
                if !backoff.wait(&shutdown).await {
                    break;
                }
                continue;
            }
        };
        backoff.reset();
        info!(
            term = leader.rev(),
            "elected: this launcher places the grid's work"
        );
        let end = Leader::new(client.clone(), config.clone(), leader)
            .lead(&mut leases, lease.generation, &shutdown)
            .await;
        match end {
            End::Shutdown => break,
            End::Deposed(why) => warn!("no longer the scheduler: {why}; campaigning again"),
        }
    }
    keeper.join().await;
}

/// Whether a campaign ended only because the client's request timeout ran out.
fn is_timeout(e: &etcd_client::Error) -> bool {
    matches!(
        e,
        etcd_client::Error::GRpcStatus(status)
            if matches!(status.code(), tonic::Code::Cancelled | tonic::Code::DeadlineExceeded)
    )
}

fn election_name(config: &Config) -> String {
    election(&config.prefix)
}

enum End {
    Shutdown,
    Deposed(String),
}

/// The prefixes a leader follows, in the order of [`View::map`].
const WATCHED: usize = 7;

/// What the leader has read.
#[derive(Default)]
struct View {
    stacks: BTreeMap<String, Kv>,
    runs: BTreeMap<String, Kv>,
    nodes: BTreeMap<String, Kv>,
    hosts: BTreeMap<String, Kv>,
    assign: BTreeMap<String, Kv>,
    lost: BTreeMap<String, Kv>,
    statuses: BTreeMap<String, Kv>,
}

impl View {
    fn map(&mut self, i: usize) -> &mut BTreeMap<String, Kv> {
        match i {
            0 => &mut self.stacks,
            1 => &mut self.runs,
            2 => &mut self.nodes,
            3 => &mut self.hosts,
            4 => &mut self.assign,
            5 => &mut self.lost,
            _ => &mut self.statuses,
        }
    }
}

struct Leader {
    client: Client,
    config: Config,
    leader: etcd_client::LeaderKey,
    view: View,
    /// Jobs crashing on a host, since when this leader saw it.
    crashing: BTreeMap<(ServiceId, HostId), Instant>,
    /// Jobs whose pending instances were last logged, to log only changes.
    pending_logged: BTreeMap<ServiceId, usize>,
}

impl Leader {
    fn new(client: Client, config: Config, leader: etcd_client::LeaderKey) -> Self {
        Self {
            client,
            config,
            leader,
            view: View::default(),
            crashing: BTreeMap::new(),
            pending_logged: BTreeMap::new(),
        }
    }

    async fn lead(
        mut self,
        leases: &mut tokio::sync::watch::Receiver<runtime::lease::LeaseState>,
        generation: u64,
        shutdown: &CancellationToken,
    ) -> End {
        let token = shutdown.child_token();
        let _stop_watches = token.clone().drop_guard();
        let dirs = [
            self.config.prefix.dir(Dir::Stacks),
            self.config.prefix.dir(Dir::Runs),
            self.config.prefix.dir(Dir::Nodes),
            self.config.prefix.dir(Dir::Hosts),
            self.config.prefix.dir(Dir::Assignments),
            self.config.prefix.dir(Dir::Lost),
            self.config.prefix.dir(Dir::Statuses),
        ];
        let (tx, mut rx) = mpsc::channel::<(usize, WatchUpdate)>(64);
        for (i, dir) in dirs.into_iter().enumerate() {
            let (wtx, mut wrx) = mpsc::channel(16);
            tokio::spawn(runtime::watch::watch_prefix(
                self.client.clone(),
                dir,
                wtx,
                token.clone(),
            ));
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(u) = wrx.recv().await {
                    if tx.send((i, u)).await.is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut listed = [false; WATCHED];
        let mut wake: Option<Instant> = None;
        loop {
            let deadline = wake;
            tokio::select! {
                () = shutdown.cancelled() => return End::Shutdown,
                changed = leases.wait_for(|s| s.generation != generation) => {
                    let _ = changed;
                    return End::Deposed("its election lease was lost".into());
                }
                update = rx.recv() => {
                    let Some((i, update)) = update else {
                        return End::Shutdown;
                    };
                    if matches!(update, WatchUpdate::Snapshot { .. }) {
                        listed[i] = true;
                    }
                    runtime::watch::apply(self.view.map(i), update);
                    // Coalesce a burst of changes into one placement.
                    while let Ok((i, update)) = rx.try_recv() {
                        if matches!(update, WatchUpdate::Snapshot { .. }) {
                            listed[i] = true;
                        }
                        runtime::watch::apply(self.view.map(i), update);
                    }
                    // Soon, even when a later wake-up (a lost host's deadline) is set.
                    let soon = Instant::now() + Duration::from_millis(20);
                    wake = Some(wake.map_or(soon, |w| w.min(soon)));
                    continue;
                }
                () = runtime::sleep_until(deadline) => {}
            }
            wake = None;
            if !listed.iter().all(|l| *l) {
                continue;
            }
            // A write retries while etcd is away: the stop and the end of the lease do not
            // wait for it (each transaction is whole; the next leader places from etcd).
            let round = tokio::select! {
                r = self.place_and_write() => r,
                () = shutdown.cancelled() => return End::Shutdown,
                _ = leases.wait_for(|s| s.generation != generation) => {
                    return End::Deposed("its election lease was lost".into());
                }
            };
            match round {
                Ok(next) => wake = next,
                Err(end) => return end,
            }
        }
    }

    /// One round: place and write the difference. Returns when to look again (a lost host's
    /// time running out), or why leadership ended.
    async fn place_and_write(&mut self) -> Result<Option<Instant>, End> {
        let now = Instant::now();
        let prefix = &self.config.prefix;
        let (jobs, broken) = jobs_to_run(prefix, &self.view);
        let current = current(prefix, &self.view.assign);
        let (hosts, next_wake, lost_ops) = self.hosts(&current, now);
        let refs: Vec<&JobSpec> = jobs.values().collect();
        let avoid = self.crashing(now);
        let plan = place_avoiding(&refs, &hosts, &current, &avoid);
        self.log_pending(&plan);
        let mut ops = lost_ops;
        let Writes {
            ops: writes,
            rolling,
            stuck,
        } = self.writes(&plan, &jobs, &broken);
        ops.extend(writes);
        for service in &stuck {
            if jobs[service].update.auto_revert {
                self.revert(service).await?;
            }
        }
        // While an update rolls, look again soon: statuses and `min_healthy` gate each batch.
        let next_wake = if rolling {
            let soon = now + Duration::from_millis(500);
            Some(next_wake.map_or(soon, |w: Instant| w.min(soon)))
        } else {
            next_wake
        };
        if !ops.is_empty() {
            self.write(ops).await?;
        }
        Ok(next_wake)
    }

    /// Every host the grid knows: those with a live launcher, and those holding assignments
    /// whose launcher is gone (lost, until their `grid/lost/` deadline); when to look again;
    /// and the changes to the lost records.
    fn hosts(
        &mut self,
        current: &BTreeMap<InstanceId, HostId>,
        now: Instant,
    ) -> (Vec<Host>, Option<Instant>, Vec<TxnOp>) {
        let prefix = &self.config.prefix;
        let records: BTreeMap<HostId, HostRecord> = self
            .view
            .hosts
            .iter()
            .filter_map(|(k, kv)| records::decode::<HostRecord>(k, &kv.value).ok())
            .map(|r| (r.host.clone(), r))
            .collect();
        let mut out = Vec::new();
        let mut live = BTreeSet::new();
        for (k, kv) in &self.view.nodes {
            let Ok(Key::Node(host)) = prefix.parse(k) else {
                continue;
            };
            let Ok(node) = records::decode::<NodeRecord>(k, &kv.value) else {
                continue;
            };
            live.insert(host.clone());
            out.push(Host::live(&host, &node, records.get(&host)));
        }
        let lost_records: BTreeMap<HostId, LostRecord> = self
            .view
            .lost
            .iter()
            .filter_map(|(k, kv)| records::decode::<LostRecord>(k, &kv.value).ok())
            .map(|r| (r.host.clone(), r))
            .collect();
        let holding: BTreeSet<&HostId> = current.values().collect();
        let mut concerned: BTreeSet<&HostId> = holding.clone();
        concerned.extend(lost_records.keys());
        let wall = SystemTime::now();
        let mut wake: Option<Instant> = None;
        let mut ops = Vec::new();
        for host in concerned {
            let is_live = live.contains(host);
            let change = lost::track(
                lost_records.get(host),
                host,
                is_live,
                holding.contains(host),
                wall,
                self.config.reschedule_after,
            );
            let key = prefix.key(&Key::Lost(host.clone()));
            let record = match change {
                lost::Change::Put(r) => {
                    if r.back_since.is_none() {
                        warn!(
                            %host,
                            losses = r.losses,
                            until = %r.until,
                            "the launcher of a host with work is gone; its instances move \
                             elsewhere unless it comes back first"
                        );
                    } else {
                        info!(%host, "the host's launcher is back");
                    }
                    ops.push(TxnOp::put(key.as_str(), records::encode(&r), None));
                    Some(r)
                }
                lost::Change::Delete => {
                    ops.push(TxnOp::delete(key.as_str(), None));
                    None
                }
                lost::Change::Keep => lost_records.get(host).cloned(),
            };
            if is_live || !holding.contains(host) {
                continue;
            }
            let deadline = record.as_ref().and_then(lost::deadline);
            if let Some(until) = deadline.filter(|u| *u > wall) {
                let at = now + until.duration_since(wall).unwrap_or_default();
                wake = Some(wake.map_or(at, |w| w.min(at)));
                out.push(Host::lost(host));
            }
        }
        (out, wake, ops)
    }

    /// Jobs that keep crashing on a host (their status says so), remembered for five
    /// minutes: such an instance moves if another host can take it, and that host ranks last
    /// for the job meanwhile.
    fn crashing(&mut self, now: Instant) -> BTreeSet<(ServiceId, HostId)> {
        let prefix = &self.config.prefix;
        for (k, kv) in &self.view.statuses {
            let Ok(Key::Status(slot)) = prefix.parse(k) else {
                continue;
            };
            let crash_loop =
                records::decode::<StatusRecord>(k, &kv.value).is_ok_and(|s| s.crash_loop);
            if crash_loop {
                self.crashing
                    .entry((slot.service.clone(), slot.host.clone()))
                    .or_insert_with(|| {
                        warn!(service = %slot.service, host = %slot.host, "keeps crashing there; moving it to another host if one can take it");
                        now
                    });
            }
        }
        self.crashing
            .retain(|_, since| now.duration_since(*since) < Duration::from_secs(300));
        self.crashing.keys().cloned().collect()
    }

    fn log_pending(&mut self, plan: &Plan) {
        let now: BTreeMap<ServiceId, usize> = plan
            .pending
            .iter()
            .map(|(s, p)| (s.clone(), p.instances.len()))
            .collect();
        for (service, p) in &plan.pending {
            if self.pending_logged.get(service) != Some(&p.instances.len()) {
                let reasons: Vec<String> = p
                    .reasons
                    .iter()
                    .take(5)
                    .map(|(h, r)| format!("{h}: {r}"))
                    .collect();
                info!(
                    %service,
                    pending = p.instances.len(),
                    "instances fit on no host ({}{})",
                    reasons.join("; "),
                    if p.reasons.len() > 5 { "; ..." } else { "" }
                );
            }
        }
        self.pending_logged = now;
    }

    /// The puts and deletes that turn the assignments into `plan`, whether an update or a
    /// move is under way (then the caller looks again soon), and the jobs whose update
    /// stopped.
    ///
    /// A job whose spec changed is rolled: an instance that keeps its host gets the new
    /// digest only while fewer than `update.max_parallel` of the job's instances are on the
    /// new digest without being healthy yet (its status running that digest for
    /// `update.min_healthy`). An instance moving off a live host (drained, or crashing there)
    /// follows the same rule, and its old assignment stays, marked `leaving`, until the new
    /// copy is healthy: the job never serves with one instance fewer. An instance that is not
    /// healthy within `update.timeout` of its assignment stops the update: no further
    /// instance is changed or moved (`viking ps` shows its launcher's reason) until the spec
    /// changes again. New instances, and those of a lost host, are placed at once.
    fn writes(
        &self,
        plan: &Plan,
        jobs: &BTreeMap<ServiceId, JobSpec>,
        broken: &BTreeSet<ServiceId>,
    ) -> Writes {
        let prefix = &self.config.prefix;
        let mut ops = Vec::new();
        let mut wanted = BTreeSet::new();
        let now = runtime::host::rfc3339_now();
        let wall = SystemTime::now();
        let assigned: BTreeMap<Slot, (&String, AssignRecord)> = self
            .view
            .assign
            .iter()
            .filter_map(|(k, kv)| match prefix.parse(k) {
                Ok(Key::Assign(slot)) => Some((
                    slot,
                    (k, records::decode::<AssignRecord>(k, &kv.value).ok()?),
                )),
                _ => None,
            })
            .collect();
        let live: BTreeSet<HostId> = self
            .view
            .nodes
            .keys()
            .filter_map(|k| match prefix.parse(k) {
                Ok(Key::Node(host)) => Some(host),
                _ => None,
            })
            .collect();
        // Every assignment of an instance, by instance.
        let mut slots_of: BTreeMap<InstanceId, Vec<&Slot>> = BTreeMap::new();
        for slot in assigned.keys() {
            slots_of
                .entry((slot.service.clone(), slot.instance))
                .or_default()
                .push(slot);
        }
        let statuses: BTreeMap<Slot, StatusRecord> = self
            .view
            .statuses
            .iter()
            .filter_map(|(k, kv)| match prefix.parse(k) {
                Ok(Key::Status(slot)) => Some((slot, records::decode(k, &kv.value).ok()?)),
                _ => None,
            })
            .collect();
        // Each job's digest once (it encodes the whole spec), not once per instance.
        let digests: BTreeMap<&ServiceId, String> =
            jobs.iter().map(|(s, j)| (s, j.digest())).collect();
        // Whether the instance assigned at `slot` runs `digest` and has for `min_healthy`.
        let healthy = |slot: &Slot, digest: &str, job: &JobSpec| {
            statuses.get(slot).is_some_and(|st| {
                st.state == InstanceState::Running
                    && st.spec_digest == digest
                    && parse_rfc3339(&st.since).is_some_and(|t| {
                        wall.duration_since(t).unwrap_or_default()
                            >= Duration::from_millis(job.update.min_healthy_ms)
                    })
            })
        };
        // Per job: instances on the new digest that are not healthy yet, and whether one of
        // them is past its timeout.
        let mut budget: BTreeMap<&ServiceId, (u32, bool)> = BTreeMap::new();
        for ((service, instance), host) in &plan.placed {
            let job = &jobs[service];
            let slot = Slot {
                host: host.clone(),
                service: service.clone(),
                instance: *instance,
            };
            let Some((_, record)) = assigned
                .get(&slot)
                .filter(|(_, r)| r.spec_digest == digests[service])
            else {
                continue;
            };
            if !healthy(&slot, &record.spec_digest, job) {
                let timed_out = parse_rfc3339(&record.assigned_at).is_some_and(|t| {
                    wall.duration_since(t).unwrap_or_default()
                        > Duration::from_millis(job.update.timeout_ms)
                });
                let e = budget.entry(service).or_default();
                e.0 += 1;
                e.1 |= timed_out;
            }
        }
        let mut rolling = false;
        let mut changed: BTreeMap<&ServiceId, u32> = BTreeMap::new();
        let record = |digest: &str, leaving: bool| AssignRecord {
            v: RECORD_VERSION,
            spec_digest: digest.to_owned(),
            generation: self.leader.rev(),
            assigned_at: now.clone(),
            leaving,
        };
        for ((service, instance), host) in &plan.placed {
            let job = &jobs[service];
            let digest = &digests[service];
            let slot = Slot {
                host: host.clone(),
                service: service.clone(),
                instance: *instance,
            };
            let key = prefix.key(&Key::Assign(slot.clone()));
            wanted.insert(key.clone());
            let current = assigned.get(&slot).map(|(_, r)| r);
            // Copies on other live hosts that this one replaces (a move), not yet leaving.
            let from: Vec<&Slot> = slots_of
                .get(&(service.clone(), *instance))
                .into_iter()
                .flatten()
                .copied()
                .filter(|s| s.host != *host && live.contains(&s.host))
                .collect();
            match current {
                Some(r) if r.spec_digest == *digest && !r.leaving => continue,
                // Coming back to a host it was leaving (undrained meanwhile): it stays.
                Some(r) if r.spec_digest == *digest => {
                    ops.push(marked(&key, r, false));
                    continue;
                }
                _ => {}
            }
            let gated = current.is_some() || !from.is_empty();
            if gated {
                // Same host, another digest (a rolling update), or a move off a live host.
                rolling = true;
                let (unhealthy, stuck) = budget.get(service).copied().unwrap_or_default();
                let done = changed.entry(service).or_default();
                if stuck || unhealthy + *done >= job.update.max_parallel {
                    // Not yet: the copies it would replace stay as they are.
                    for s in &from {
                        wanted.insert(assigned[*s].0.clone());
                    }
                    continue;
                }
                *done += 1;
            }
            for s in &from {
                let (k, r) = &assigned[*s];
                wanted.insert((*k).clone());
                if !r.leaving {
                    ops.push(marked(k, r, true));
                }
            }
            ops.push(TxnOp::put(
                key.as_str(),
                records::encode(&record(digest, false)),
                None,
            ));
        }
        rolling |= budget
            .values()
            .any(|(unhealthy, stuck)| *unhealthy > 0 && !stuck);
        let stuck: BTreeSet<ServiceId> = budget
            .iter()
            .filter(|(_, (_, stuck))| *stuck)
            .map(|(s, _)| (*s).clone())
            .collect();
        for (slot, (key, r)) in &assigned {
            if wanted.contains(*key) || broken.contains(&slot.service) {
                continue;
            }
            // A leaving copy on a live host stays until the copy that replaces it is healthy.
            let replacement = plan
                .placed
                .get(&(slot.service.clone(), slot.instance))
                .map(|host| Slot {
                    host: host.clone(),
                    ..slot.clone()
                });
            let waits = r.leaving
                && live.contains(&slot.host)
                && replacement.is_some_and(|new| {
                    assigned.get(&new).is_some_and(|(_, nr)| {
                        !healthy(&new, &nr.spec_digest, &jobs[&slot.service])
                    })
                });
            if waits {
                rolling = true;
                continue;
            }
            ops.push(TxnOp::delete(key.as_str(), None));
        }
        Writes {
            ops,
            rolling,
            stuck,
        }
    }

    /// `update.auto_revert`: puts the previous spec of a job whose update stopped back, as
    /// `viking rollback` does, while instances of that spec are still assigned (so that a
    /// previous spec that fails too is not put back in turn, and back and forth).
    async fn revert(&mut self, service: &ServiceId) -> Result<(), End> {
        let prefix = &self.config.prefix;
        let key = prefix.key(&Key::StackJob(service.stack.clone(), service.job.clone()));
        let prev_key = prefix.key(&Key::StackPrev(service.stack.clone(), service.job.clone()));
        let (Some(current), Some(prev)) =
            (self.view.stacks.get(&key), self.view.stacks.get(&prev_key))
        else {
            return Ok(());
        };
        let Ok(prev_spec) = records::decode::<JobSpec>(&prev_key, &prev.value) else {
            return Ok(());
        };
        let prev_digest = prev_spec.digest();
        let serving = self.view.assign.iter().any(|(k, kv)| {
            matches!(prefix.parse(k), Ok(Key::Assign(slot)) if slot.service == *service)
                && records::decode::<AssignRecord>(k, &kv.value)
                    .is_ok_and(|r| r.spec_digest == prev_digest)
        });
        if !serving {
            return Ok(());
        }
        let Ok((mut compares, ops)) = crate::rollback::swap(current, prev) else {
            return Ok(());
        };
        compares.push(Compare::create_revision(
            self.leader.key(),
            CompareOp::Equal,
            self.leader.rev(),
        ));
        let mut kv = self.client.kv_client();
        match kv.txn(Txn::new().when(compares).and_then(ops)).await {
            Ok(r) if r.succeeded() => {
                warn!(%service, "its update stopped; the previous spec is put back (update.auto_revert)");
                Ok(())
            }
            // Changed meanwhile (a deploy, or the watch behind): the next round sees it.
            Ok(_) => Ok(()),
            Err(e) => {
                debug!("reverting {service} failed: {e}; retrying next round");
                Ok(())
            }
        }
    }

    /// Writes `ops` in chunks, each guarded by this leader's election key.
    async fn write(&mut self, ops: Vec<TxnOp>) -> Result<(), End> {
        let guard =
            Compare::create_revision(self.leader.key(), CompareOp::Equal, self.leader.rev());
        let per_txn = self.config.max_txn_ops.max(2) - 1;
        let total = ops.len();
        let mut kv = self.client.kv_client();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        for chunk in ops.chunks(per_txn) {
            loop {
                let txn = Txn::new().when([guard.clone()]).and_then(chunk.to_vec());
                match kv.txn(txn).await {
                    Ok(resp) if resp.succeeded() => break,
                    Ok(_) => {
                        return Err(End::Deposed(
                            "its election key is gone (another launcher leads)".into(),
                        ));
                    }
                    Err(e) => {
                        // etcd away: keep what is placed, try again; the lease decides whether
                        // this launcher still leads.
                        debug!("writing assignments failed: {e}; retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            }
        }
        info!(changes = total, "assignments written");
        Ok(())
    }
}

/// The jobs of every stack asked to run, by service; and the services of running stacks whose
/// spec cannot be read or fails its check: left out of the placement, and their assignments
/// left as they are (a key broken by hand stops nothing; HQ names it to whoever runs the
/// stack).
fn jobs_to_run(
    prefix: &Prefix,
    view: &View,
) -> (BTreeMap<ServiceId, JobSpec>, BTreeSet<ServiceId>) {
    let running: BTreeSet<schema::StackName> = view
        .runs
        .keys()
        .filter_map(|k| match prefix.parse(k) {
            Ok(Key::Run(stack)) => Some(stack),
            _ => None,
        })
        .collect();
    let mut out = BTreeMap::new();
    let mut broken = BTreeSet::new();
    for (k, kv) in &view.stacks {
        let Ok(Key::StackJob(stack, job)) = prefix.parse(k) else {
            continue;
        };
        if !running.contains(&stack) {
            continue;
        }
        match records::decode::<JobSpec>(k, &kv.value) {
            Ok(spec) if spec.check().is_ok() && spec.stack == stack && spec.job == job => {
                out.insert(spec.service(), spec);
            }
            _ => {
                debug!(
                    key = k,
                    "job spec left out: unreadable or failing its check"
                );
                broken.insert(ServiceId::new(stack, job));
            }
        }
    }
    (out, broken)
}

/// `record` at `key` again, with `leaving` set as given.
fn marked(key: &str, record: &AssignRecord, leaving: bool) -> TxnOp {
    TxnOp::put(
        key,
        records::encode(&AssignRecord {
            leaving,
            ..record.clone()
        }),
        None,
    )
}

/// What one round writes.
struct Writes {
    ops: Vec<TxnOp>,
    /// An update or a move is under way: look again soon.
    rolling: bool,
    /// Jobs whose update stopped (an instance past `update.timeout`).
    stuck: BTreeSet<ServiceId>,
}

/// Where instances are assigned now ([`crate::assign::current`]).
fn current(prefix: &Prefix, assign: &BTreeMap<String, Kv>) -> BTreeMap<InstanceId, HostId> {
    let decoded: Vec<(Slot, AssignRecord)> = assign
        .iter()
        .filter_map(|(k, kv)| match prefix.parse(k) {
            Ok(Key::Assign(slot)) => Some((
                slot,
                // An unreadable record still holds its slot (the launcher keeps what runs).
                records::decode::<AssignRecord>(k, &kv.value).unwrap_or(AssignRecord {
                    v: RECORD_VERSION,
                    spec_digest: String::new(),
                    generation: 0,
                    assigned_at: String::new(),
                    leaving: false,
                }),
            )),
            _ => None,
        })
        .collect();
    crate::assign::current(decoded.iter().map(|(s, r)| (s, r)))
}
