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
            match self.place_and_write().await {
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
        let (writes, rolling) = self.writes(&plan, &jobs, &broken);
        ops.extend(writes);
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

    /// The puts and deletes that turn the assignments into `plan`.
    /// The puts and deletes that turn the assignments into `plan`, and whether a rolling
    /// update is under way (then the caller looks again soon).
    ///
    /// A job whose spec changed is rolled: an instance that keeps its host gets the new
    /// digest only while fewer than `update.max_parallel` of the job's instances are on the
    /// new digest without being healthy yet (its status running that digest for
    /// `update.min_healthy`). An instance that is not healthy within `update.timeout` of its
    /// assignment stops the update: no further instance is changed (`viking ps` shows its
    /// launcher's reason) until the spec changes again. New and moved instances get the new
    /// digest at once.
    fn writes(
        &self,
        plan: &Plan,
        jobs: &BTreeMap<ServiceId, JobSpec>,
        broken: &BTreeSet<ServiceId>,
    ) -> (Vec<TxnOp>, bool) {
        let prefix = &self.config.prefix;
        let mut ops = Vec::new();
        let mut wanted = BTreeSet::new();
        let now = runtime::host::rfc3339_now();
        let wall = SystemTime::now();
        let assigned: BTreeMap<&String, AssignRecord> = self
            .view
            .assign
            .iter()
            .filter_map(|(k, kv)| Some((k, records::decode::<AssignRecord>(k, &kv.value).ok()?)))
            .collect();
        let statuses: BTreeMap<Slot, StatusRecord> = self
            .view
            .statuses
            .iter()
            .filter_map(|(k, kv)| match prefix.parse(k) {
                Ok(Key::Status(slot)) => Some((slot, records::decode(k, &kv.value).ok()?)),
                _ => None,
            })
            .collect();
        // Per job: instances on the new digest that are not healthy yet, and whether one of
        // them is past its timeout.
        // Each job's digest once (it encodes the whole spec), not once per instance.
        let digests: BTreeMap<&ServiceId, String> =
            jobs.iter().map(|(s, j)| (s, j.digest())).collect();
        let mut budget: BTreeMap<&ServiceId, (u32, bool)> = BTreeMap::new();
        for ((service, instance), host) in &plan.placed {
            let job = &jobs[service];
            let slot = Slot {
                host: host.clone(),
                service: service.clone(),
                instance: *instance,
            };
            let key = prefix.key(&Key::Assign(slot.clone()));
            let Some(record) = assigned
                .get(&key)
                .filter(|r| r.spec_digest == digests[service])
            else {
                continue;
            };
            let healthy = statuses.get(&slot).is_some_and(|st| {
                st.state == InstanceState::Running
                    && st.spec_digest == record.spec_digest
                    && parse_rfc3339(&st.since).is_some_and(|t| {
                        wall.duration_since(t).unwrap_or_default()
                            >= Duration::from_millis(job.update.min_healthy_ms)
                    })
            });
            if !healthy {
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
        for ((service, instance), host) in &plan.placed {
            let job = &jobs[service];
            let digest = digests[service].clone();
            let key = prefix.key(&Key::Assign(Slot {
                host: host.clone(),
                service: service.clone(),
                instance: *instance,
            }));
            wanted.insert(key.clone());
            let current = assigned.get(&key);
            if current.is_some_and(|r| r.spec_digest == digest) {
                continue;
            }
            if current.is_some() {
                // Same host, another digest: a rolling update.
                rolling = true;
                let (unhealthy, stuck) = budget.get(service).copied().unwrap_or_default();
                let done = changed.entry(service).or_default();
                if stuck || unhealthy + *done >= job.update.max_parallel {
                    continue;
                }
                *done += 1;
            }
            let record = AssignRecord {
                v: RECORD_VERSION,
                spec_digest: digest,
                generation: self.leader.rev(),
                assigned_at: now.clone(),
            };
            ops.push(TxnOp::put(key.as_str(), records::encode(&record), None));
        }
        rolling |= budget
            .values()
            .any(|(unhealthy, stuck)| *unhealthy > 0 && !stuck);
        for key in self.view.assign.keys() {
            let broken_spec = matches!(
                prefix.parse(key),
                Ok(Key::Assign(slot)) if broken.contains(&slot.service)
            );
            if !wanted.contains(key) && !broken_spec {
                ops.push(TxnOp::delete(key.as_str(), None));
            }
        }
        (ops, rolling)
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

/// Where instances are assigned now.
fn current(prefix: &Prefix, assign: &BTreeMap<String, Kv>) -> BTreeMap<InstanceId, HostId> {
    let mut out = BTreeMap::new();
    for k in assign.keys() {
        if let Ok(Key::Assign(slot)) = prefix.parse(k) {
            // Two hosts for one instance (a hand edit): the first stays, the plan drops the
            // other.
            out.entry((slot.service, slot.instance))
                .or_insert(slot.host);
        }
    }
    out
}
