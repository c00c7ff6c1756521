//! The launcher's loop: the grid's assignments for this host in, containers and reports out.
//!
//! It acts only on a whole view: until both `grid/assign/<host>/` and `stacks/` have been
//! listed, and while etcd has not answered for longer than the lease, it starts and stops
//! nothing (what runs keeps running; Docker's restart policy still heals crashes). Statuses
//! and the node record are written under the launcher's lease, rewritten in full on a new
//! lease, and only what changed otherwise.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp};
use futures_util::StreamExt;
use runtime::lease::{LeaseKeeper, LeaseOptions, LeaseState};
use runtime::watch::{Kv, WatchUpdate};
use runtime::{Backoff, CancellationToken};
use schema::records::{
    self, AssignRecord, InstanceState, NodeRecord, RECORD_VERSION, StatusRecord,
};
use schema::{Dir, HostId, JobSpec, Key, Prefix, ServiceId, Slot};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::converge::{self, Step, Wanted};
use crate::engine::{Engine, Existing};

/// Everything the launcher needs to know.
#[derive(Debug, Clone)]
pub struct Config {
    pub prefix: Prefix,
    pub host: HostId,
    /// Lease time to live: the scheduler counts this host lost this long after it stops.
    pub ttl: Duration,
    /// How often Docker is listed even without an event.
    pub resync: Duration,
    /// Docker endpoint; `None` for `DOCKER_HOST` or the local socket.
    pub docker: Option<String>,
    /// What this host offers.
    pub cpus_milli: u64,
    pub memory: u64,
    /// The scheduler this launcher campaigns to be; `None` to never lead.
    pub scheduler: Option<grid::scheduler::Config>,
    /// Fencing: stop this host's containers once etcd has not answered for this long
    /// (`--stop-after`; off by default).
    pub stop_after: Option<Duration>,
    /// How long a container no longer assigned here gets after SIGTERM (`--stop-timeout`).
    pub stop_timeout: Duration,
    /// How long a deregistered container keeps running before SIGTERM (`--shutdown-delay`).
    pub shutdown_delay: Duration,
    /// What the admin server shows, as of the last round.
    pub view: Arc<std::sync::Mutex<View>>,
}

/// What the launcher's admin server (`launcher --admin`) shows, as of its last round.
#[derive(Debug, Default, Clone)]
pub struct View {
    /// Both its prefixes were read: it acts.
    pub listed: bool,
    /// etcd answered within the lease.
    pub etcd_answers: bool,
    pub lease: Option<i64>,
    /// Its keys as last written to etcd: the node record and every instance's status.
    pub written: BTreeMap<String, String>,
    /// Containers being stopped in the background.
    pub stopping: usize,
}

/// How long a replacement must be running (and registered, for a job with ports) before the
/// container it replaces is stopped.
const READY_FOR: Duration = Duration::from_millis(500);

/// How long a new container may take to be ready before its replacement is given up: the
/// job's `update.timeout`, as long as `viking deploy` waits for it. (It was cut to a minute
/// while the replacement held up the launcher's loop; a service that takes longer to pass
/// its health check could then never be replaced.)
fn replacement_limit(spec: &JobSpec) -> Duration {
    Duration::from_millis(spec.update.timeout_ms)
}

/// Runs the launcher (and its campaign for the scheduler) against the local Docker until
/// `shutdown`. Docker may be away at first: it connects with backoff.
pub async fn run(config: Config, client: Client, shutdown: CancellationToken) {
    let scheduler = config
        .scheduler
        .clone()
        .map(|s| tokio::spawn(grid::scheduler::run(client.clone(), s, shutdown.clone())));
    let target = runtime::docker::describe(config.docker.as_deref());
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let docker = loop {
        match runtime::docker::connect(config.docker.as_deref()).await {
            Ok(d) => break Some(d),
            Err(e) => {
                if backoff.attempts() % 20 == 0 {
                    warn!(docker = %target, "cannot reach Docker: {e}; retrying");
                }
                if !backoff.wait(&shutdown).await {
                    break None;
                }
            }
        }
    };
    if let Some(docker) = docker {
        info!(docker = %target, "connected to Docker");
        let (wake_tx, wake_rx) = mpsc::channel(64);
        let events = tokio::spawn(follow_events(docker.clone(), wake_tx, shutdown.clone()));
        let engine: Arc<dyn Engine> = Arc::new(crate::engine::DockerEngine::new(
            docker,
            config.host.clone(),
        ));
        run_with(config, client, engine, wake_rx, shutdown).await;
        let _ = events.await;
    }
    if let Some(s) = scheduler {
        let _ = s.await;
    }
}

/// Wakes the loop on every event of a viking container; reconnects the stream when it breaks.
async fn follow_events(
    docker: bollard::Docker,
    wake: mpsc::Sender<()>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    while !shutdown.is_cancelled() {
        let filters = HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            ("label".to_owned(), vec![schema::labels::STACK.to_owned()]),
        ]);
        let mut events = docker.events(Some(bollard::query_parameters::EventsOptions {
            filters: Some(filters),
            ..Default::default()
        }));
        // Reconnected: look at everything again.
        let _ = wake.try_send(());
        loop {
            let next = tokio::select! {
                n = events.next() => n,
                () = shutdown.cancelled() => return,
            };
            match next {
                Some(Ok(_)) => {
                    backoff.reset();
                    let _ = wake.try_send(());
                }
                Some(Err(e)) => {
                    debug!("Docker event stream failed: {e}; reconnecting");
                    break;
                }
                None => break,
            }
        }
        if !backoff.wait(&shutdown).await {
            return;
        }
    }
}

/// The loop, with any engine: `wake` says something changed in it.
pub async fn run_with(
    config: Config,
    client: Client,
    engine: Arc<dyn Engine>,
    mut wake: mpsc::Receiver<()>,
    shutdown: CancellationToken,
) {
    let lease = LeaseKeeper::spawn(
        client.clone(),
        LeaseOptions {
            ttl: config.ttl,
            revoke_on_shutdown: false,
        },
        shutdown.clone(),
    );
    let (assign_tx, mut assign_rx) = mpsc::channel(16);
    let (stacks_tx, mut stacks_rx) = mpsc::channel(16);
    let watches = [
        tokio::spawn(runtime::watch::watch_prefix(
            client.clone(),
            config.prefix.dir(Dir::HostAssignments(&config.host)),
            assign_tx,
            shutdown.clone(),
        )),
        tokio::spawn(runtime::watch::watch_prefix(
            client.clone(),
            config.prefix.dir(Dir::Stacks),
            stacks_tx,
            shutdown.clone(),
        )),
    ];
    let mut agent = Agent::new(config, client, engine);
    let mut leases = lease.subscribe();
    let mut resync = tokio::time::interval(agent.config.resync);
    resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let retry = agent.retry_at;
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = leases.changed() => {
                if changed.is_err() {
                    break;
                }
                agent.lease = *leases.borrow_and_update();
                agent.written = None;
                // A new lease after the first: this host was cut off long enough to be lost.
                // Read its assignments afresh, and converge (remove what was placed
                // elsewhere meanwhile) before the node record says it takes work again.
                if agent.lease.generation > 1 {
                    agent.relist = true;
                }
            }
            u = assign_rx.recv() => {
                let Some(u) = u else { break };
                agent.take(Source::Assign, u);
                while let Ok(u) = assign_rx.try_recv() {
                    agent.take(Source::Assign, u);
                }
            }
            u = stacks_rx.recv() => {
                let Some(u) = u else { break };
                agent.take(Source::Stacks, u);
                while let Ok(u) = stacks_rx.try_recv() {
                    agent.take(Source::Stacks, u);
                }
            }
            Some(()) = agent.stopped_rx.recv() => {
                while agent.stopped_rx.try_recv().is_ok() {}
            }
            Some(r) = agent.replaced_rx.recv() => {
                agent.replaced(r);
                while let Ok(r) = agent.replaced_rx.try_recv() {
                    agent.replaced(r);
                }
            }
            w = wake.recv() => {
                if w.is_none() {
                    // No more events (a stand-in engine that says nothing): resync only.
                    wake = mpsc::channel(1).1;
                }
                while wake.try_recv().is_ok() {}
            }
            _ = resync.tick() => {}
            () = runtime::sleep_until(retry) => agent.retry_at = None,
        }
        tokio::select! {
            () = agent.step() => {}
            // A replacement waits up to a minute for its new container, a stop up to
            // `--stop-timeout`: the launcher's own stop does not wait for them. What it leaves
            // half-way, the next launcher goes on with (`converge::plan`), and its marks go
            // with its lease.
            () = shutdown.cancelled() => break,
        }
        agent.publish_view();
    }
    for w in watches {
        let _ = w.await;
    }
    lease.join().await;
}

/// Failures within [`CRASH_LOOP_WINDOW`] that make a crash loop.
const CRASH_LOOP_FAILURES: usize = 5;
const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(300);

/// Instances whose assignment and spec disagree for a moment: left alone.
type Unsure = BTreeSet<(ServiceId, u32)>;

enum Source {
    Assign,
    Stacks,
}

/// What the launcher remembers of an instance between rounds.
#[derive(Debug, Clone)]
struct Memory {
    state: InstanceState,
    /// When its container failed lately (its restart count grew), within the last 5 minutes.
    failures: Vec<Instant>,
    /// The restart count last seen, and of which container.
    restarts_seen: (String, u32),
    /// The container it was in at `since`.
    container: String,
    since: String,
    reason: String,
    /// A failed start: when to try again, and how long to wait after the next failure.
    retry_at: Option<Instant>,
    delay: Duration,
    /// The container last seen registered as a live endpoint (checked once per container).
    serving: String,
}

struct Agent {
    config: Config,
    client: Client,
    engine: Arc<dyn Engine>,
    assign: BTreeMap<String, Kv>,
    stacks: BTreeMap<String, Kv>,
    listed: (bool, bool),
    lease: LeaseState,
    /// What etcd holds of this launcher's keys, as written under the current lease; `None`
    /// to write everything again.
    written: Option<BTreeMap<String, String>>,
    memory: BTreeMap<(ServiceId, u32), Memory>,
    /// Log lines of failed containers, by container id and restart count.
    logs: HashMap<(String, u32), String>,
    last_etcd_ok: Option<Instant>,
    etcd_down: bool,
    /// The engine's last list failed (logged once until it answers again).
    engine_down: bool,
    /// Read the assignments directly before the next round (after a new lease).
    relist: bool,
    /// Containers being stopped and removed in the background (no longer assigned here).
    stopping: Arc<std::sync::Mutex<BTreeSet<String>>>,
    /// A background stop finished: look again.
    stopped_tx: mpsc::Sender<()>,
    stopped_rx: mpsc::Receiver<()>,
    /// Fenced: the containers were stopped for `stop_after`.
    fenced: bool,
    /// Containers whose rename to their instance's name failed (logged once).
    unnamed: BTreeSet<String>,
    /// Instances being replaced in the background; their outcomes come back on `replaced_rx`.
    replacing: BTreeSet<(ServiceId, u32)>,
    replaced_tx: mpsc::Sender<Replaced>,
    replaced_rx: mpsc::Receiver<Replaced>,
    started: Instant,
    retry_at: Option<Instant>,
    etcd_backoff: Backoff,
    since: String,
}

impl Agent {
    fn new(config: Config, client: Client, engine: Arc<dyn Engine>) -> Self {
        let (stopped_tx, stopped_rx) = mpsc::channel(1);
        let (replaced_tx, replaced_rx) = mpsc::channel(16);
        Self {
            replacing: BTreeSet::new(),
            replaced_tx,
            replaced_rx,
            stopping: Arc::default(),
            stopped_tx,
            stopped_rx,
            config,
            client,
            engine,
            assign: BTreeMap::new(),
            stacks: BTreeMap::new(),
            listed: (false, false),
            lease: LeaseState::default(),
            written: None,
            memory: BTreeMap::new(),
            logs: HashMap::new(),
            last_etcd_ok: None,
            etcd_down: false,
            engine_down: false,
            relist: false,
            fenced: false,
            unnamed: BTreeSet::new(),
            started: Instant::now(),
            retry_at: None,
            etcd_backoff: Backoff::default(),
            since: runtime::host::rfc3339_now(),
        }
    }

    fn take(&mut self, source: Source, update: WatchUpdate) {
        let snapshot = matches!(update, WatchUpdate::Snapshot { .. });
        match source {
            Source::Assign => {
                self.listed.0 |= snapshot;
                runtime::watch::apply(&mut self.assign, update);
            }
            Source::Stacks => {
                self.listed.1 |= snapshot;
                runtime::watch::apply(&mut self.stacks, update);
            }
        }
        self.last_etcd_ok = Some(Instant::now());
    }

    fn retry_later(&mut self, delay: Duration) {
        let at = Instant::now() + delay;
        self.retry_at = Some(self.retry_at.map_or(at, |r| r.min(at)));
    }

    /// Whether etcd answered recently enough to act on what it said.
    /// Asks etcd whether it answers (one small read), when nothing else said so within the
    /// lease: a quiet cluster is not a cut-off host.
    async fn probe_etcd(&mut self) {
        let key = self.config.prefix.key(&Key::Node(self.config.host.clone()));
        let mut kv = self.client.kv_client();
        let read = kv.get(key, Some(GetOptions::new().with_count_only()));
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), read).await {
            self.last_etcd_ok = Some(Instant::now());
        }
    }

    fn etcd_fresh(&self) -> bool {
        self.last_etcd_ok
            .is_some_and(|t| t.elapsed() <= self.config.ttl)
    }

    /// The assigned instances with their specs; and those whose assignment and spec disagree.
    fn wanted(&self) -> (Vec<(u32, JobSpec)>, Unsure) {
        let prefix = &self.config.prefix;
        let mut wanted = Vec::new();
        let mut unsure = BTreeSet::new();
        for (k, kv) in &self.assign {
            let Ok(Key::Assign(slot)) = prefix.parse(k) else {
                continue;
            };
            if slot.host != self.config.host {
                continue;
            }
            let Ok(assigned) = records::decode::<AssignRecord>(k, &kv.value) else {
                warn!(key = k, "unreadable assignment left alone");
                unsure.insert((slot.service, slot.instance));
                continue;
            };
            let spec_key = prefix.key(&Key::StackJob(
                slot.service.stack.clone(),
                slot.service.job.clone(),
            ));
            let spec = self
                .stacks
                .get(&spec_key)
                .and_then(|kv| records::decode::<JobSpec>(&spec_key, &kv.value).ok())
                .filter(|s| s.check().is_ok());
            match spec {
                Some(spec) if spec.digest() == assigned.spec_digest => {
                    wanted.push((slot.instance, spec));
                }
                // The spec changed or went, and the scheduler has not caught up yet.
                _ => {
                    unsure.insert((slot.service, slot.instance));
                }
            }
        }
        (wanted, unsure)
    }

    /// Hands the admin server what this round left.
    fn publish_view(&self) {
        let stopping = self.stopping.lock().expect("stopping lock").len();
        let mut view = self.config.view.lock().expect("view lock");
        view.listed = self.listed.0 && self.listed.1;
        view.etcd_answers = !self.etcd_down;
        view.lease = self.lease.id;
        if let Some(written) = &self.written {
            view.written.clone_from(written);
        }
        view.stopping = stopping;
    }

    async fn step(&mut self) {
        if !(self.listed.0 && self.listed.1) {
            return;
        }
        // Back after losing the lease: what was placed elsewhere meanwhile is removed before
        // the node record says this host takes work again (the stops are awaited).
        let relisted = self.relist;
        if self.relist && !self.read_assignments().await {
            return;
        }
        if self.fence().await {
            return;
        }
        let (wanted, unsure) = self.wanted();
        let mut existing = match self.mine().await {
            Some(e) => e,
            None => return,
        };
        if !self.etcd_fresh() {
            self.probe_etcd().await;
        }
        if self.etcd_fresh() {
            let acted = self.converge(&wanted, &unsure, &existing, relisted).await;
            if acted {
                existing = self.mine().await.unwrap_or(existing);
            }
        } else if !self.etcd_down {
            debug!("etcd has not answered within the lease: starting and stopping nothing");
        }
        self.report(&wanted, &unsure, &existing).await;
    }

    /// Reads this host's assignments afresh; false (retried) if etcd does not answer.
    async fn read_assignments(&mut self) -> bool {
        let dir = self
            .config
            .prefix
            .dir(Dir::HostAssignments(&self.config.host));
        let mut kv = self.client.kv_client();
        match kv.get(dir, Some(GetOptions::new().with_prefix())).await {
            Ok(resp) => {
                self.assign = runtime::watch::to_map(resp.kvs());
                self.relist = false;
                self.last_etcd_ok = Some(Instant::now());
                info!(
                    assigned = self.assign.len(),
                    "back after losing the lease: assignments read again"
                );
                true
            }
            Err(e) => {
                debug!("cannot read the assignments: {e}; retrying");
                self.retry_later(Duration::from_secs(1));
                false
            }
        }
    }

    /// `--stop-after`: once etcd has not answered for that long, stops every container this
    /// launcher made (at-most-once work must not run twice when the scheduler moves it).
    /// True while fenced.
    async fn fence(&mut self) -> bool {
        let Some(limit) = self.config.stop_after else {
            return false;
        };
        let silent = self.last_etcd_ok.unwrap_or(self.started).elapsed();
        if silent < limit {
            if self.fenced {
                info!("etcd answers again: no longer fenced");
                self.fenced = false;
            }
            return false;
        }
        self.retry_later(Duration::from_secs(1));
        if self.fenced {
            return true;
        }
        let Some(mine) = self.mine().await else {
            return true;
        };
        warn!(
            containers = mine.len(),
            "etcd has not answered for {silent:?} (--stop-after {limit:?}): stopping this \
             host's containers"
        );
        for e in mine {
            if let Err(err) = self.engine.remove(&e.id).await {
                warn!("cannot stop {}: {err}", e.name);
            }
        }
        self.fenced = true;
        true
    }

    /// The containers this host's launcher made (label `viking.host`): the only ones it
    /// starts, stops or removes. `None` (retried) when the engine does not answer.
    async fn mine(&mut self) -> Option<Vec<Existing>> {
        match self.engine.list().await {
            Ok(all) => {
                if std::mem::take(&mut self.engine_down) {
                    info!("the container engine answers again");
                }
                Some(
                    all.into_iter()
                        .filter(|e| e.host.as_deref() == Some(self.config.host.as_str()))
                        .collect(),
                )
            }
            Err(e) => {
                // Said once, not at every retry while Docker restarts.
                if !std::mem::replace(&mut self.engine_down, true) {
                    warn!("{e}; keeping what runs and retrying every second");
                } else {
                    debug!("{e}; retrying");
                }
                self.retry_later(Duration::from_secs(1));
                None
            }
        }
    }

    /// Carries out the plan; true if anything was done. Containers no longer assigned are
    /// stopped in the background (each may take `--stop-timeout`), or awaited with `inline`.
    async fn converge(
        &mut self,
        wanted: &[(u32, JobSpec)],
        unsure: &Unsure,
        existing: &[Existing],
        inline: bool,
    ) -> bool {
        let want: Vec<Wanted<'_>> = wanted
            .iter()
            .map(|(instance, spec)| Wanted {
                instance: *instance,
                spec,
            })
            .collect();
        let steps = converge::plan(&want, unsure, existing);
        let specs: BTreeMap<(ServiceId, u32), &JobSpec> =
            wanted.iter().map(|(i, s)| ((s.service(), *i), s)).collect();
        let mut links_ready: BTreeMap<ServiceId, bool> = BTreeMap::new();
        let mut acted = false;
        let now = Instant::now();
        // What is no longer assigned here is taken out of service (`withdraw`), stopped
        // gracefully (SIGTERM, then the stop timeout) and removed, each on its own so that a
        // slow one holds up neither the others nor this loop.
        let (removes, steps): (Vec<Step>, Vec<Step>) = steps
            .into_iter()
            .partition(|s| matches!(s, Step::Remove { .. }));
        let mut awaited = Vec::new();
        for step in removes {
            let Step::Remove { name, id } = step else {
                unreachable!("partitioned")
            };
            if !self
                .stopping
                .lock()
                .expect("stopping lock")
                .insert(id.clone())
            {
                continue; // already on its way out
            }
            acted = true;
            let (engine, timeout) = (self.engine.clone(), self.config.stop_timeout);
            let (stopping, done) = (self.stopping.clone(), self.stopped_tx.clone());
            // A running container with a service is taken out of service first.
            let serving = existing
                .iter()
                .find(|e| e.id == id && e.state == crate::engine::RunState::Running)
                .map(|e| e.service.clone());
            let withdraw = self.withdraw();
            let task = async move {
                let mark = match &serving {
                    Some(service) => withdraw.before_stop(service, &id, &name).await,
                    None => None,
                };
                let r = match engine.stop(&id, timeout).await {
                    Ok(()) => engine.remove(&id).await,
                    Err(e) => Err(e),
                };
                withdraw.done(mark).await;
                match r {
                    Ok(()) => info!("removed {name}: not assigned to this host"),
                    Err(e) => {
                        warn!("cannot remove {name}: {e}; trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                stopping.lock().expect("stopping lock").remove(&id);
                let _ = done.try_send(());
            };
            if inline {
                awaited.push(task);
            } else {
                tokio::spawn(task);
            }
        }
        futures_util::future::join_all(awaited).await;
        for step in steps {
            match step {
                Step::Remove { .. } => unreachable!("done above"),
                // Under way in the background.
                Step::Replace {
                    service, instance, ..
                } if self.replacing.contains(&(service.clone(), instance)) => {}
                Step::Rename { id, name } => {
                    acted = true;
                    match self.engine.rename(&id, &name).await {
                        Ok(()) => {
                            self.unnamed.remove(&id);
                            info!(
                                "renamed {} to {name}: its replacement had not finished",
                                &id[..id.len().min(12)]
                            );
                        }
                        Err(e) if self.unnamed.insert(id) => {
                            warn!("cannot give {name} its name: {e}; trying again each round");
                        }
                        Err(_) => {}
                    }
                }
                Step::Start { service, instance }
                | Step::Replace {
                    service, instance, ..
                }
                | Step::Restart {
                    service, instance, ..
                } if self
                    .memory
                    .get(&(service.clone(), instance))
                    .and_then(|m| m.retry_at)
                    .is_some_and(|at| at > now) =>
                {
                    // Failed recently: wait for its backoff.
                    let at = self.memory[&(service, instance)].retry_at.expect("set");
                    self.retry_at = Some(self.retry_at.map_or(at, |r| r.min(at)));
                }
                Step::Restart {
                    service,
                    instance,
                    id,
                } => {
                    acted = true;
                    let name = schema::container_name(&service.stack, &service.job, instance);
                    let r = self.engine.restart(&id).await;
                    self.started(&service, instance, &name, "restarted", r.map(|()| id));
                }
                Step::Start { service, instance }
                | Step::Replace {
                    service, instance, ..
                } if let Some(missing) = self
                    .missing_link(specs[&(service.clone(), instance)], &mut links_ready)
                    .await =>
                {
                    // A job starts only once everything it links to answers somewhere.
                    let why = format!("waiting for a live endpoint of {missing}");
                    let m = self
                        .memory
                        .entry((service.clone(), instance))
                        .or_insert_with(|| Memory::new(InstanceState::Pending));
                    if m.reason != why {
                        info!(%service, instance, "{why}");
                        m.reason = why;
                    }
                    self.retry_later(Duration::from_secs(1));
                }
                Step::Replace {
                    service,
                    instance,
                    id,
                    beside,
                    started,
                } => {
                    acted = true;
                    // In the background: a replacement waits up to a minute for its new
                    // container, and this host's other instances do not wait for it.
                    let spec = specs[&(service.clone(), instance)].clone();
                    let name = schema::container_name(&service.stack, &service.job, instance);
                    self.replacing.insert((service.clone(), instance));
                    self.memory
                        .entry((service.clone(), instance))
                        .or_insert_with(|| Memory::new(InstanceState::Running))
                        .reason = "being replaced: its new spec starts beside it".to_owned();
                    let replacer = self.replacer();
                    let done = self.replaced_tx.clone();
                    tokio::spawn(async move {
                        let result = replacer
                            .replace(&spec, instance, &name, &id, &beside, started)
                            .await;
                        let _ = done
                            .send(Replaced {
                                service,
                                instance,
                                name,
                                result,
                            })
                            .await;
                    });
                }
                Step::Start { service, instance } => {
                    acted = true;
                    let spec = specs[&(service.clone(), instance)];
                    let name = schema::container_name(&service.stack, &service.job, instance);
                    let r = self
                        .engine
                        .start(spec, instance, &self.config.host, &name)
                        .await;
                    self.started(&service, instance, &name, "started", r);
                }
            }
        }
        acted
    }

    /// A running container's state as reported: `running` once its health check (if it has
    /// one) passes and, for a job with ports, once it is a live endpoint; `starting` with the
    /// reason until then. The endpoint is looked up once per container.
    async fn readiness(&mut self, spec: &JobSpec, e: &Existing) -> (InstanceState, String) {
        if !e.health.passes() {
            self.retry_later(Duration::from_millis(500));
            let verdict = if e.health == crate::engine::Health::Unhealthy {
                "fails"
            } else {
                "has not passed yet"
            };
            return (
                InstanceState::Starting,
                format!("its health check {verdict}"),
            );
        }
        let key = (spec.service(), e.instance);
        if self.memory.get(&key).is_some_and(|m| m.serving == e.id) {
            return (InstanceState::Running, String::new());
        }
        if serves(&self.client, &self.config.prefix, spec, &e.id).await {
            self.memory
                .entry(key)
                .or_insert_with(|| Memory::new(InstanceState::Running))
                .serving
                .clone_from(&e.id);
            return (InstanceState::Running, String::new());
        }
        self.retry_later(Duration::from_millis(500));
        (
            InstanceState::Starting,
            "waiting to register as a live endpoint".to_owned(),
        )
    }

    /// What a replacement in the background needs.
    fn replacer(&self) -> Replacer {
        Replacer {
            engine: self.engine.clone(),
            stop_timeout: self.config.stop_timeout,
            withdraw: self.withdraw(),
        }
    }

    /// What a stop needs to take its container out of service first.
    fn withdraw(&self) -> crate::withdraw::Withdraw {
        crate::withdraw::Withdraw {
            client: self.client.clone(),
            prefix: self.config.prefix.clone(),
            host: self.config.host.clone(),
            lease: self.lease.id,
            delay: self.config.shutdown_delay,
        }
    }

    /// Records the outcome of a replacement in the background.
    fn replaced(&mut self, r: Replaced) {
        self.replacing.remove(&(r.service.clone(), r.instance));
        self.started(
            &r.service,
            r.instance,
            &r.name,
            "replaced (its spec changed)",
            r.result,
        );
    }

    /// Records the outcome of a start, restart or replace.
    fn started(
        &mut self,
        service: &ServiceId,
        instance: u32,
        name: &str,
        what: &str,
        result: Result<String, crate::engine::EngineError>,
    ) {
        let m = self
            .memory
            .entry((service.clone(), instance))
            .or_insert_with(|| Memory::new(InstanceState::Pending));
        match result {
            Ok(id) => {
                info!("{what} {name} ({})", &id[..id.len().min(12)]);
                m.retry_at = None;
                m.delay = Duration::from_secs(1);
                m.reason.clear();
            }
            Err(e) => {
                warn!("cannot start {name}: {e}; trying again in {:?}", m.delay);
                m.reason = e.to_string();
                m.retry_at = Some(Instant::now() + m.delay);
                m.delay = (m.delay * 2).min(Duration::from_secs(60));
                let at = m.retry_at.expect("set");
                self.retry_at = Some(self.retry_at.map_or(at, |r| r.min(at)));
            }
        }
    }

    /// The first service `spec` links to that has no live endpoint anywhere in the cluster,
    /// if any (`known` caches the answers of one round).
    async fn missing_link(
        &self,
        spec: &JobSpec,
        known: &mut BTreeMap<ServiceId, bool>,
    ) -> Option<ServiceId> {
        for link in &spec.links {
            let ready = match known.get(&link.service) {
                Some(r) => *r,
                None => {
                    let dir = format!("{}{}/", self.config.prefix.dir(Dir::Services), link.service);
                    let mut kv = self.client.kv_client();
                    let r = kv
                        .get(dir, Some(GetOptions::new().with_prefix().with_count_only()))
                        .await
                        .is_ok_and(|r| r.count() > 0);
                    known.insert(link.service.clone(), r);
                    r
                }
            };
            if !ready {
                return Some(link.service.clone());
            }
        }
        None
    }

    /// Writes the node record and every assigned instance's status, under the lease.
    async fn report(&mut self, wanted: &[(u32, JobSpec)], unsure: &Unsure, existing: &[Existing]) {
        let Some(lease) = self.lease.id else {
            return;
        };
        let prefix = self.config.prefix.clone();
        let mut desired: BTreeMap<String, String> = BTreeMap::new();
        desired.insert(
            prefix.key(&Key::Node(self.config.host.clone())),
            records::encode(&NodeRecord {
                v: RECORD_VERSION,
                host: self.config.host.clone(),
                cpus_milli: self.config.cpus_milli,
                memory: self.config.memory,
                launcher_version: env!("CARGO_PKG_VERSION").to_owned(),
                since: self.since.clone(),
            }),
        );
        let mut seen = BTreeSet::new();
        for (instance, spec) in wanted {
            let key = (spec.service(), *instance);
            seen.insert(key.clone());
            // The container under the instance's name: while a replacement runs beside it,
            // the old one serves and is what the instance is.
            let name = schema::container_name(&key.0.stack, &key.0.job, *instance);
            let mine = || {
                existing
                    .iter()
                    .filter(|e| e.service == key.0 && e.instance == *instance)
            };
            let container = mine().find(|e| e.name == name).or_else(|| mine().next());
            let (state, exit_code, container_id, restarts, mut reason) = match container {
                Some(e) => {
                    let (state, code) = converge::status_of(spec, e);
                    // Running is ready: its health check passes and it is a live endpoint.
                    let (state, not_ready) = if state == InstanceState::Running {
                        self.readiness(spec, e).await
                    } else {
                        (state, String::new())
                    };
                    let reason = match (state, code) {
                        (InstanceState::Failed, Some(code)) => {
                            let logs = self.failure_logs(e).await;
                            format!("exited with code {code}{logs}")
                        }
                        _ => not_ready,
                    };
                    (state, code, e.id.clone(), e.restarts, reason)
                }
                None => (
                    InstanceState::Pending,
                    None,
                    String::new(),
                    0,
                    String::new(),
                ),
            };
            let m = self
                .memory
                .entry(key.clone())
                .or_insert_with(|| Memory::new(state));
            let state = if container.is_none() && m.retry_at.is_some() {
                InstanceState::Failed
            } else {
                state
            };
            if reason.is_empty() && container.is_none() {
                reason = if m.reason.is_empty() {
                    "waiting to start".to_owned()
                } else {
                    m.reason.clone()
                };
            }
            // Running its old spec: why the new one is not there yet (a failed replacement).
            if reason.is_empty() && container.is_some_and(|e| e.spec != spec.digest()) {
                reason.clone_from(&m.reason);
            }
            // Failures of its container: restarts by Docker's policy, counted as they happen.
            let mut crash_loop = false;
            if let Some(e) = container {
                let now = Instant::now();
                if m.restarts_seen.0 == e.id && e.restarts > m.restarts_seen.1 {
                    for _ in m.restarts_seen.1..e.restarts.min(m.restarts_seen.1 + 5) {
                        m.failures.push(now);
                    }
                }
                m.restarts_seen = (e.id.clone(), e.restarts);
                m.failures
                    .retain(|t| now.duration_since(*t) < CRASH_LOOP_WINDOW);
                crash_loop = m.failures.len() >= CRASH_LOOP_FAILURES;
                if crash_loop && reason.is_empty() {
                    let logs = self
                        .logs
                        .get(&(e.id.clone(), e.restarts))
                        .cloned()
                        .unwrap_or_default();
                    reason = format!(
                        "failed {} times in 5 minutes here; moved to another host if one can \
                         take it{logs}",
                        m.failures.len()
                    );
                }
            }
            // A new state, or another container in it (a replacement): since now.
            if m.state != state || m.container != container_id {
                m.state = state;
                m.container.clone_from(&container_id);
                m.since = runtime::host::rfc3339_now();
            }
            let record = StatusRecord {
                v: RECORD_VERSION,
                state,
                container_id: container_id.chars().take(12).collect(),
                spec_digest: container.map(|e| e.spec.clone()).unwrap_or_default(),
                since: m.since.clone(),
                restarts,
                reason,
                exit_code,
                crash_loop,
            };
            desired.insert(
                prefix.key(&Key::Status(Slot {
                    host: self.config.host.clone(),
                    service: key.0,
                    instance: key.1,
                })),
                records::encode(&record),
            );
        }
        // An instance left alone (its spec unreadable, or ahead of its assignment) keeps the
        // status last written for it.
        for (service, instance) in unsure {
            let key = prefix.key(&Key::Status(Slot {
                host: self.config.host.clone(),
                service: service.clone(),
                instance: *instance,
            }));
            if let Some(v) = self.written.as_ref().and_then(|w| w.get(&key)) {
                desired.insert(key, v.clone());
            }
            seen.insert((service.clone(), *instance));
        }
        // A container no longer assigned, on its way out: reported until it is gone, so that
        // `viking stop` waits for it.
        for e in existing {
            let key = (e.service.clone(), e.instance);
            if seen.contains(&key) {
                continue;
            }
            let (state, exit_code) = converge::status_of_stopping(e);
            let record = StatusRecord {
                v: RECORD_VERSION,
                state,
                container_id: e.id.chars().take(12).collect(),
                spec_digest: e.spec.clone(),
                since: runtime::host::rfc3339_now(),
                restarts: e.restarts,
                reason: "stopping: no longer assigned to this host".to_owned(),
                exit_code,
                crash_loop: false,
            };
            let k = prefix.key(&Key::Status(Slot {
                host: self.config.host.clone(),
                service: key.0,
                instance: key.1,
            }));
            // Written once: `since` would change every round.
            let v = match self.written.as_ref().and_then(|w| w.get(&k)) {
                Some(v) => v.clone(),
                None => records::encode(&record),
            };
            desired.insert(k, v);
        }
        self.memory.retain(|k, _| seen.contains(k));
        let written = self.written.get_or_insert_with(BTreeMap::new);
        let mut ops = Vec::new();
        for (k, v) in &desired {
            if written.get(k) != Some(v) {
                ops.push(TxnOp::put(
                    k.as_str(),
                    v.as_str(),
                    Some(PutOptions::new().with_lease(lease)),
                ));
            }
        }
        for k in written.keys() {
            if !desired.contains_key(k) {
                ops.push(TxnOp::delete(k.as_str(), None));
            }
        }
        if ops.is_empty() {
            return;
        }
        let mut kv = self.client.kv_client();
        for chunk in ops.chunks(schema::MAX_TXN_OPS) {
            if let Err(e) = kv.txn(Txn::new().and_then(chunk.to_vec())).await {
                if !self.etcd_down {
                    warn!(
                        "cannot write this host's statuses to etcd: {e}; keeping what runs, retrying"
                    );
                }
                self.etcd_down = true;
                self.written = None;
                let delay = self.etcd_backoff.next_delay();
                self.retry_later(delay);
                return;
            }
        }
        if self.etcd_down {
            info!("etcd is back; statuses written");
        }
        self.etcd_down = false;
        self.etcd_backoff.reset();
        self.last_etcd_ok = Some(Instant::now());
        // Statuses an earlier run left for instances no longer here hang on its lease and
        // expire with it.
        self.written = Some(desired);
    }

    /// ` | <last log lines>` of a failed container, read once per container and restart.
    async fn failure_logs(&mut self, e: &Existing) -> String {
        let key = (e.id.clone(), e.restarts);
        if let Some(text) = self.logs.get(&key) {
            return text.clone();
        }
        let lines = self.engine.last_logs(&e.id).await;
        let text = if lines.is_empty() {
            String::new()
        } else {
            format!(": {lines}")
        };
        if self.logs.len() > 1000 {
            self.logs.clear();
        }
        self.logs.insert(key, text.clone());
        text
    }
}

/// A replacement's outcome, back to the loop.
struct Replaced {
    service: ServiceId,
    instance: u32,
    name: String,
    result: Result<String, crate::engine::EngineError>,
}

/// What a replacement needs, cloned into its task (etcd, the prefix and the host are the
/// withdrawal's).
struct Replacer {
    engine: Arc<dyn Engine>,
    stop_timeout: Duration,
    withdraw: crate::withdraw::Withdraw,
}

impl Replacer {
    /// Replaces `old` with a container of `spec` without a gap: the new one starts beside it
    /// (as `beside`: `<name>-next`, or `name` when the old one is still `<name>-next` from a
    /// replacement its launcher did not finish; or it is `started` already, by a launcher
    /// that stopped before it was ready), and only once it runs, and for a job with ports is
    /// a live endpoint, is the old one stopped (SIGTERM, its stop timeout) and removed and the
    /// new one given the instance's name. A new one that exits or does not get there within
    /// `update.timeout` is removed and the old one keeps serving.
    async fn replace(
        &self,
        spec: &JobSpec,
        instance: u32,
        name: &str,
        old: &str,
        beside: &str,
        started: Option<String>,
    ) -> Result<String, crate::engine::EngineError> {
        use crate::engine::{EngineError, RunState};
        let new = match started {
            Some(id) => id,
            None => {
                self.engine
                    .start(spec, instance, &self.withdraw.host, beside)
                    .await?
            }
        };
        let limit = replacement_limit(spec);
        let deadline = Instant::now() + limit;
        // Ready means ready for a while: a container that exits at once can be running and
        // registered for an instant, which one look would take for good.
        let mut ready_since: Option<Instant> = None;
        let failed = loop {
            let found = self.engine.list().await?.into_iter().find(|e| e.id == new);
            match found.map(|e| (e.state, e.restarts, e.health)) {
                Some((RunState::Running, 0, health))
                    if health.passes()
                        && serves(&self.withdraw.client, &self.withdraw.prefix, spec, &new)
                            .await =>
                {
                    let since = *ready_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= READY_FOR {
                        break None;
                    }
                }
                Some((RunState::Exited(Some(code)), _, _)) => {
                    let logs = self.engine.last_logs(&new).await;
                    break Some(format!("the new container exited with code {code}: {logs}"));
                }
                // Docker's restart policy brought it back: it crashed.
                Some((_, restarts, _)) if restarts > 0 => {
                    let logs = self.engine.last_logs(&new).await;
                    break Some(format!(
                        "the new container exited and was restarted {restarts} times: {logs}"
                    ));
                }
                None => break Some("the new container vanished".to_owned()),
                _ => ready_since = None,
            }
            if Instant::now() >= deadline {
                break Some(format!(
                    "the new container did not run{} within {limit:?}",
                    if spec.ports.is_empty() {
                        ""
                    } else {
                        " and register"
                    }
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if let Some(why) = failed {
            let _ = self.engine.remove(&new).await;
            return Err(EngineError(format!(
                "{why}; {name} keeps running its old spec"
            )));
        }
        let withdraw = &self.withdraw;
        let mark = withdraw.before_stop(&spec.service(), old, name).await;
        // Still running after the old one's withdrawal? If not, the old one serves again.
        let still = self.engine.list().await?.into_iter().find(|e| e.id == new);
        if !matches!(
            still.map(|e| (e.state, e.restarts)),
            Some((RunState::Running, 0))
        ) {
            withdraw.done(mark).await;
            let logs = self.engine.last_logs(&new).await;
            let _ = self.engine.remove(&new).await;
            return Err(EngineError(format!(
                "the new container stopped running while the old one was withdrawn: {logs}; \
                 {name} keeps running its old spec"
            )));
        }
        let stopped = self.engine.stop(old, self.stop_timeout).await;
        let stopped = match stopped {
            Ok(()) => self.engine.remove(old).await,
            Err(e) => Err(e),
        };
        withdraw.done(mark).await;
        stopped?;
        if beside != name {
            self.engine.rename(&new, name).await?;
        }
        Ok(new)
    }
}

/// Whether container `id` of `spec` is a live endpoint (always, for a job without ports).
async fn serves(client: &Client, prefix: &Prefix, spec: &JobSpec, id: &str) -> bool {
    if spec.ports.is_empty() {
        return true;
    }
    crate::withdraw::registered(client, prefix, &spec.service(), id)
        .await
        .unwrap_or(false)
}

impl Memory {
    fn new(state: InstanceState) -> Self {
        Memory {
            state,
            failures: Vec::new(),
            restarts_seen: (String::new(), 0),
            container: String::new(),
            since: runtime::host::rfc3339_now(),
            reason: String::new(),
            retry_at: None,
            delay: Duration::from_secs(1),
            serving: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default `update.timeout` (2 minutes) is the time a new container gets, not a
    /// minute.
    #[test]
    fn a_replacement_gets_the_whole_update_timeout() {
        let mut spec = JobSpec::new("shared".parse().unwrap(), "web".parse().unwrap(), "nginx:1");
        assert_eq!(replacement_limit(&spec), Duration::from_secs(120));
        spec.update.timeout_ms = 600_000;
        assert_eq!(replacement_limit(&spec), Duration::from_secs(600));
    }
}
