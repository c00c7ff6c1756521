//! The registrator's loop: Docker's state in, this host's leased endpoint keys out.
//!
//! One task follows Docker (connect, subscribe to events, reconnect with backoff) and feeds a
//! bounded channel; this loop is the only etcd writer. It drains the channel into one change
//! per container (coalescing), asks Docker for the truth about each, and writes the
//! difference between what runs and what etcd holds in as few transactions as possible. A
//! full reconciliation (list every running container, read back every key of this host)
//! happens at start, after every Docker reconnect, on every new lease and every `resync`.
//! Whatever fails is retried with backoff; meanwhile the last known state stays in memory
//! and in etcd.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use bollard::Docker;
use etcd_client::Client;
use futures_util::StreamExt;
use runtime::lease::{LeaseKeeper, LeaseOptions, LeaseState};
use runtime::watch::WatchUpdate;
use runtime::{Backoff, CancellationToken};
use schema::records::{self, AliveRecord, RECORD_VERSION};
use schema::{Dir, Key, Prefix};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::docker::{self, Change};
use crate::naming::{self, Container, Settings};
use crate::sync::{self, Actual, Op};

/// Room for a burst of Docker events; when full, the event reader waits (and Docker may drop
/// it, which ends in a reconnect and a full reconciliation).
const EVENT_QUEUE: usize = 4096;

/// Everything the registrator needs to know.
#[derive(Debug, Clone)]
pub struct Config {
    pub prefix: Prefix,
    pub settings: Settings,
    /// Lease time to live: a dead host's endpoints vanish this long after it stops renewing.
    pub ttl: Duration,
    /// Full reconciliation period.
    pub resync: Duration,
    /// Docker endpoint; `None` for `DOCKER_HOST` or the local socket.
    pub docker: Option<String>,
}

enum Msg {
    /// (Re)connected to Docker: list everything. Events follow in order.
    Connected(Docker),
    Event {
        id: String,
        change: Change,
        action: String,
    },
}

/// Runs until `shutdown` fires. Keys stay behind on shutdown, under the lease: a registrator
/// that restarts within the TTL takes them over without a gap; one that does not come back
/// loses them when the lease expires.
pub async fn run(config: Config, client: Client, shutdown: CancellationToken) {
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    let follower = tokio::spawn(follow_docker(config.docker.clone(), tx, shutdown.clone()));
    let lease = LeaseKeeper::spawn(
        client.clone(),
        LeaseOptions {
            ttl: config.ttl,
            revoke_on_shutdown: false,
        },
        shutdown.clone(),
    );
    // The deployed stacks decide who may claim a name (see `naming`): followed live.
    let (stacks_tx, stacks_rx) = mpsc::channel(16);
    let stacks_watch = tokio::spawn(runtime::watch::watch_prefix(
        client.clone(),
        config.prefix.dir(Dir::Stacks),
        stacks_tx,
        shutdown.clone(),
    ));
    // The containers this host's launcher is about to stop: out of service first.
    let (stopping_tx, stopping_rx) = mpsc::channel(16);
    let stopping_watch = tokio::spawn(runtime::watch::watch_prefix(
        client.clone(),
        config.prefix.dir(Dir::HostStopping(&config.settings.host)),
        stopping_tx,
        shutdown.clone(),
    ));
    let mut agent = Agent::new(config, client);
    agent
        .run(rx, stacks_rx, stopping_rx, lease.subscribe(), &shutdown)
        .await;
    let _ = follower.await;
    let _ = stacks_watch.await;
    let _ = stopping_watch.await;
    lease.join().await;
}

/// Connects to Docker and forwards its container events, forever: a closed stream or a lost
/// daemon means reconnect (with backoff), never exit.
async fn follow_docker(
    endpoint: Option<String>,
    tx: mpsc::Sender<Msg>,
    shutdown: CancellationToken,
) {
    let target = docker::describe(endpoint.as_deref());
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut was_lost = false;
    while !shutdown.is_cancelled() {
        let docker = tokio::select! {
            r = docker::connect(endpoint.as_deref()) => r,
            () = shutdown.cancelled() => return,
        };
        let docker = match docker {
            Ok(d) => d,
            Err(e) => {
                if backoff.attempts() == 0 || backoff.attempts() % 20 == 0 {
                    warn!(docker = %target, "cannot reach Docker: {e}; retrying");
                }
                was_lost = true;
                if !backoff.wait(&shutdown).await {
                    return;
                }
                continue;
            }
        };
        backoff.reset();
        if was_lost {
            info!(docker = %target, "Docker is back; reconciling");
        } else {
            info!(docker = %target, version = docker.client_version().to_string(), "connected to Docker");
        }
        // Subscribing first and listing second would race; instead the stream replays from
        // just before the list (Docker keeps its last events), and replayed events only
        // repeat what the list already says.
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs().saturating_sub(1));
        let mut events = docker::events(&docker, since);
        if tx.send(Msg::Connected(docker)).await.is_err() {
            return;
        }
        loop {
            let next = tokio::select! {
                n = events.next() => n,
                () = shutdown.cancelled() => return,
            };
            match next {
                Some(Ok(event)) => {
                    let action = event.action.unwrap_or_default();
                    let Some(change) = docker::classify(&action) else {
                        continue;
                    };
                    let Some(id) = event.actor.and_then(|a| a.id) else {
                        continue;
                    };
                    debug!(container = %short(&id), action, time_nano = event.time_nano, "event");
                    if tx.send(Msg::Event { id, change, action }).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    warn!(docker = %target, "Docker event stream failed: {e}; reconnecting");
                    break;
                }
                None => {
                    warn!(docker = %target, "Docker closed the event stream; reconnecting");
                    break;
                }
            }
        }
        was_lost = true;
        if !backoff.wait(&shutdown).await {
            return;
        }
    }
}

struct Agent {
    config: Config,
    client: Client,
    alive_key: String,
    alive_value: String,
    docker: Option<Docker>,
    /// Docker's truth as last seen, by full id.
    containers: BTreeMap<String, Container>,
    /// Whether Docker has been listed at least once: until then nothing is deleted.
    listed: bool,
    need_list: bool,
    /// Containers to look at again, with the event that said so (coalesced: the last wins).
    dirty: BTreeMap<String, (Change, String)>,
    /// The last reason seen per short container id, for log lines.
    why: HashMap<String, String>,
    /// What etcd holds for this host, as last read or written; `None` = read it again.
    applied: Option<Actual>,
    lease: LeaseState,
    /// Problems already logged, so a resync does not repeat them.
    warned: BTreeSet<String>,
    /// Everything under `stacks/`, as watched, and the deployed stacks it makes.
    stacks: BTreeMap<String, runtime::watch::Kv>,
    deployed: naming::Deployed,
    /// `grid/stopping/<host>/`, as watched: containers whose endpoints are withdrawn because
    /// the launcher is about to stop them.
    stopping: BTreeMap<String, runtime::watch::Kv>,
    docker_backoff: Backoff,
    etcd_backoff: Backoff,
    retry_at: Option<Instant>,
    etcd_down: bool,
}

impl Agent {
    fn new(config: Config, client: Client) -> Self {
        let host = config.settings.host.clone();
        let alive_key = config.prefix.key(&Key::Alive(host.clone()));
        let alive_value = records::encode(&AliveRecord {
            v: RECORD_VERSION,
            host,
            addr: config.settings.addr.to_string(),
            agent: "registrator".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            since: runtime::host::rfc3339_now(),
        });
        Self {
            config,
            client,
            alive_key,
            alive_value,
            docker: None,
            containers: BTreeMap::new(),
            listed: false,
            need_list: true,
            dirty: BTreeMap::new(),
            why: HashMap::new(),
            applied: None,
            lease: LeaseState::default(),
            warned: BTreeSet::new(),
            stacks: BTreeMap::new(),
            deployed: naming::Deployed::Unknown,
            stopping: BTreeMap::new(),
            docker_backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            etcd_backoff: Backoff::default(),
            retry_at: None,
            etcd_down: false,
        }
    }

    async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Msg>,
        mut stacks: mpsc::Receiver<WatchUpdate>,
        mut stopping: mpsc::Receiver<WatchUpdate>,
        mut lease: watch::Receiver<LeaseState>,
        shutdown: &CancellationToken,
    ) {
        let mut resync = tokio::time::interval(self.config.resync);
        resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
        resync.tick().await;
        loop {
            let retry = self.retry_at;
            tokio::select! {
                () = shutdown.cancelled() => break,
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    self.take(msg);
                    while let Ok(msg) = rx.try_recv() {
                        self.take(msg);
                    }
                }
                update = stacks.recv() => {
                    let Some(update) = update else { break };
                    runtime::watch::apply(&mut self.stacks, update);
                    while let Ok(more) = stacks.try_recv() {
                        runtime::watch::apply(&mut self.stacks, more);
                    }
                    self.deployed = deployed(&self.config.prefix, self.stacks.keys());
                }
                update = stopping.recv() => {
                    let Some(update) = update else { break };
                    runtime::watch::apply(&mut self.stopping, update);
                    while let Ok(more) = stopping.try_recv() {
                        runtime::watch::apply(&mut self.stopping, more);
                    }
                }
                _ = resync.tick() => {
                    debug!("periodic reconciliation");
                    self.need_list = true;
                    self.applied = None;
                }
                changed = lease.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let state = *lease.borrow_and_update();
                    if state.generation > 1 {
                        info!(lease = ?state.id, "new lease; writing every key again");
                    }
                    self.lease = state;
                    self.applied = None;
                }
                () = runtime::sleep_until(retry) => self.retry_at = None,
            }
            self.step().await;
        }
    }

    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Connected(docker) => {
                self.docker = Some(docker);
                self.need_list = true;
                self.docker_backoff.reset();
            }
            Msg::Event { id, change, action } => {
                self.dirty.insert(id, (change, action));
            }
        }
    }

    fn retry_later(&mut self, delay: Duration) {
        let at = Instant::now() + delay;
        self.retry_at = Some(self.retry_at.map_or(at, |r| r.min(at)));
    }

    async fn step(&mut self) {
        self.read_docker().await;
        self.write_etcd().await;
    }

    /// Brings `containers` up to date: a full list when due, else the dirty ones.
    async fn read_docker(&mut self) {
        // Going down needs no question to Docker: deregister at once.
        let downs: Vec<String> = self
            .dirty
            .iter()
            .filter(|(_, (c, _))| *c == Change::Down)
            .map(|(id, _)| id.clone())
            .collect();
        for id in downs {
            if let Some((_, action)) = self.dirty.remove(&id) {
                self.why.insert(short(&id), format!("container {action}"));
                self.containers.remove(&id);
            }
        }
        let Some(docker) = self.docker.clone() else {
            return;
        };
        if self.need_list {
            match docker::running(&docker).await {
                Ok(list) => {
                    let now: BTreeMap<String, Container> =
                        list.into_iter().map(|c| (c.id.clone(), c)).collect();
                    for id in self.containers.keys().filter(|id| !now.contains_key(*id)) {
                        self.why
                            .entry(short(id))
                            .or_insert_with(|| "container no longer running".to_owned());
                    }
                    self.containers = now;
                    self.need_list = false;
                    self.listed = true;
                    // The list is newer than every event taken so far.
                    self.dirty.clear();
                }
                Err(e) => {
                    warn!("cannot list containers: {e}; keeping the last known state");
                    let delay = self.docker_backoff.next_delay();
                    self.retry_later(delay);
                    return;
                }
            }
        }
        let ups: Vec<(String, String)> = self
            .dirty
            .iter()
            .map(|(id, (_, action))| (id.clone(), action.clone()))
            .collect();
        for (id, action) in ups {
            match docker::inspect(&docker, &id).await {
                Ok(Some(c)) => {
                    self.why.insert(short(&id), format!("container {action}"));
                    self.containers.insert(id.clone(), c);
                }
                Ok(None) => {
                    self.why.insert(short(&id), "container removed".to_owned());
                    self.containers.remove(&id);
                }
                Err(e) => {
                    warn!(container = %short(&id), "cannot inspect container: {e}; will retry");
                    let delay = self.docker_backoff.next_delay();
                    self.retry_later(delay);
                    return;
                }
            }
            self.dirty.remove(&id);
        }
    }

    /// What etcd should hold for this host.
    fn desired(&mut self) -> BTreeMap<String, String> {
        let mut desired = BTreeMap::from([(self.alive_key.clone(), self.alive_value.clone())]);
        let mut problems = BTreeSet::new();
        let stopping: BTreeSet<String> = self
            .stopping
            .keys()
            .filter_map(|k| k.rsplit('/').next())
            .map(str::to_owned)
            .collect();
        for c in self.containers.values() {
            if stopping.contains(&short(&c.id)) {
                continue; // withdrawn: its launcher stops it next
            }
            let plan = naming::plan(c, &self.config.settings, &self.deployed);
            for r in plan.registrations {
                let key = self.config.prefix.key(&Key::Endpoint {
                    service_port: r.service_port,
                    instance: r.instance,
                });
                desired.insert(key, records::encode(&r.record));
            }
            problems.extend(
                plan.problems
                    .into_iter()
                    .map(|p| format!("not registered: {p}")),
            );
            problems.extend(plan.notes);
        }
        // Every running container, for link-scoped access: who it is, where it is.
        for c in self.containers.values().filter(|c| c.running) {
            let id12: String = c.id.chars().take(12).collect();
            let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
            let record = records::ContainerRecord {
                v: records::RECORD_VERSION,
                stack: label(schema::labels::STACK),
                job: label(schema::labels::JOB),
                addrs: c.addrs.iter().map(ToString::to_string).collect(),
                links_label: label(schema::labels::LINKS)
                    .split(',')
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect(),
                name: c.name.clone(),
                netns_cookie: c.netns_cookie,
            };
            let key = self
                .config
                .prefix
                .key(&Key::Container(self.config.settings.host.clone(), id12));
            desired.insert(key, records::encode(&record));
        }
        for p in problems.difference(&self.warned) {
            warn!("{p}");
        }
        self.warned = problems;
        desired
    }

    async fn write_etcd(&mut self) {
        let Some(lease) = self.lease.id else {
            return;
        };
        // Until the deployed stacks are read, some containers' names cannot be decided, and
        // writing without them would remove their keys (taken over from an earlier run) only
        // to write them again: wait, the lease keeps them meanwhile.
        if self.deployed == naming::Deployed::Unknown {
            return;
        }
        let desired = self.desired();
        if self.applied.is_none() {
            let host = &self.config.settings.host;
            match sync::read_host(&self.client, &self.config.prefix, host).await {
                Ok(actual) => self.applied = Some(actual),
                Err(e) => return self.etcd_failed("read", &e),
            }
        }
        let Some(applied) = self.applied.as_mut() else {
            return;
        };
        let ops = sync::diff(&desired, applied, lease, self.listed);
        if ops.is_empty() {
            self.etcd_ok();
            self.forget_said_reasons();
            return;
        }
        match sync::write(&self.client, &ops, lease).await {
            Ok(()) => {
                sync::apply(applied, &ops, lease);
                self.etcd_ok();
                for op in &ops {
                    self.log(op);
                }
                self.forget_said_reasons();
            }
            Err(e) => {
                self.applied = None;
                self.etcd_failed("write", &e);
            }
        }
    }

    /// etcd matches Docker: the reasons kept for containers that neither run nor have a key
    /// any more have been said in their log lines. Kept, every container the host ever ran
    /// would stay in `why` for the process's life.
    fn forget_said_reasons(&mut self) {
        let keep = still_explained(
            &self.config.prefix,
            self.containers.keys(),
            self.applied.as_ref(),
        );
        self.why.retain(|id, _| keep.contains(id));
    }

    fn etcd_ok(&mut self) {
        if self.etcd_down {
            info!("etcd is back; this host's endpoints are in sync");
        }
        self.etcd_down = false;
        self.etcd_backoff.reset();
    }

    fn etcd_failed(&mut self, what: &str, e: &etcd_client::Error) {
        if !self.etcd_down {
            warn!(
                "cannot {what} etcd: {e}; keeping Docker's state in memory and retrying with backoff"
            );
        }
        self.etcd_down = true;
        self.applied = None;
        let delay = self.etcd_backoff.next_delay();
        self.retry_later(delay);
    }

    /// One line per change, saying why.
    fn log(&self, op: &Op) {
        let parsed = self.config.prefix.parse(op.key()).ok();
        let Some(Key::Endpoint {
            service_port,
            instance,
        }) = parsed
        else {
            debug!(key = op.key(), "wrote");
            return;
        };
        let why = self
            .why
            .get(&instance.container_id)
            .map_or("running", String::as_str);
        match op {
            Op::Put { value, was, .. } => {
                let at = records::decode::<records::EndpointRecord>(op.key(), value.as_bytes())
                    .map(|r| format!("{}:{}", r.addr, r.port))
                    .unwrap_or_default();
                match was {
                    None => info!("registered {service_port} {instance} at {at} ({why})"),
                    Some(old) if old == value => {
                        debug!("took over {service_port} {instance} under this run's lease");
                    }
                    Some(_) => info!("updated {service_port} {instance} to {at} ({why})"),
                }
            }
            Op::Delete { .. } => {
                let why = self.why.get(&instance.container_id).map_or(
                    "no running container matches it (left by an earlier run or a missed event)",
                    String::as_str,
                );
                info!("removed {service_port} {instance} ({why})");
            }
        }
    }
}

/// Reconciles once: lists Docker, reads etcd, and writes (unless `dry_run`) the difference.
/// Keys go under the lease of this host's running registrator when there is one (so they stay),
/// else under a new lease of `ttl` (so they vanish unless a registrator takes them over).
/// Returns the operations, done or (with `dry_run`) to do.
pub async fn once(config: &Config, client: &Client, dry_run: bool) -> Result<Vec<Op>, OnceError> {
    let docker = docker::connect(config.docker.as_deref())
        .await
        .map_err(|error| OnceError::DockerUnreachable {
            target: docker::describe(config.docker.as_deref()),
            error,
        })?;
    let containers = docker::running(&docker).await?;
    let stacks = client
        .clone()
        .get(
            config.prefix.dir(Dir::Stacks),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await?;
    let keys: Vec<String> = stacks
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect();
    let deployed = deployed(&config.prefix, keys.iter());
    let mut desired = BTreeMap::new();
    for c in &containers {
        let plan = naming::plan(c, &config.settings, &deployed);
        for p in plan.problems {
            warn!("not registered: {p}");
        }
        for n in plan.notes {
            warn!("{n}");
        }
        for r in plan.registrations {
            let key = config.prefix.key(&Key::Endpoint {
                service_port: r.service_port,
                instance: r.instance,
            });
            desired.insert(key, records::encode(&r.record));
        }
    }
    let mut actual = sync::read_host(client, &config.prefix, &config.settings.host).await?;
    let alive_key = config.prefix.key(&Key::Alive(config.settings.host.clone()));
    let lease = match actual.remove(&alive_key) {
        Some((_, lease)) if lease != 0 => lease,
        _ if dry_run => 0,
        _ => {
            let ttl = i64::try_from(config.ttl.as_secs())
                .unwrap_or(i64::MAX)
                .max(1);
            client.lease_client().grant(ttl, None).await?.id()
        }
    };
    let ops = sync::diff(&desired, &actual, lease, true);
    if !dry_run && !ops.is_empty() {
        sync::write(client, &ops, lease).await?;
    }
    Ok(ops)
}

/// Why one reconciliation failed (exit 1: nothing half-written, etcd writes are transactions).
#[derive(Debug, thiserror::Error)]
pub enum OnceError {
    #[error("cannot reach Docker at {target}: {error}; start dockerd or pass --docker")]
    DockerUnreachable {
        target: String,
        error: bollard::errors::Error,
    },
    #[error("Docker failed: {0}")]
    Docker(#[from] bollard::errors::Error),
    #[error("etcd failed: {0}")]
    Etcd(#[from] etcd_client::Error),
}

impl runtime::Fatal for OnceError {
    fn exit_code(&self) -> u8 {
        runtime::process::FAILURE
    }
}

/// The deployed stacks and their jobs, from the keys under `stacks/`.
fn deployed<'a>(prefix: &Prefix, keys: impl Iterator<Item = &'a String>) -> naming::Deployed {
    let mut stacks: BTreeMap<schema::StackName, BTreeSet<schema::JobName>> = BTreeMap::new();
    for key in keys {
        match prefix.parse(key) {
            Ok(Key::StackJob(stack, job)) => {
                stacks.entry(stack).or_default().insert(job);
            }
            Ok(Key::StackMeta(stack)) => {
                stacks.entry(stack).or_default();
            }
            _ => {}
        }
    }
    naming::Deployed::Known(stacks)
}

/// The short ids of the containers whose reasons may still be needed: those running, and
/// those with an endpoint key in etcd (its removal is still to be said).
fn still_explained<'a>(
    prefix: &Prefix,
    running: impl Iterator<Item = &'a String>,
    applied: Option<&Actual>,
) -> HashSet<String> {
    let mut keep: HashSet<String> = running.map(|id| short(id)).collect();
    for key in applied.iter().flat_map(|a| a.keys()) {
        if let Ok(Key::Endpoint { instance, .. }) = prefix.parse(key) {
            keep.insert(instance.container_id);
        }
    }
    keep
}

fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reasons kept for log lines: a running container's, and a gone container's whose
    /// key is still in etcd (its removal is yet to be logged); not one with neither, so that
    /// every container the host ever ran does not stay in memory.
    #[test]
    fn reasons_are_kept_while_a_line_may_still_need_them() {
        let prefix = Prefix::default();
        let endpoint = |id: &str| {
            prefix.key(&Key::Endpoint {
                service_port: "s/web:80/tcp".parse().unwrap(),
                instance: schema::Instance::new(schema::HostId::new("h1").unwrap(), id, 80)
                    .unwrap(),
            })
        };
        let running = ["aaaaaaaaaaaa0000".to_owned()];
        let applied: Actual = BTreeMap::from([(endpoint("bbbbbbbbbbbb1111"), (String::new(), 7))]);
        let keep = still_explained(&prefix, running.iter(), Some(&applied));
        assert_eq!(
            keep,
            HashSet::from(["aaaaaaaaaaaa".to_owned(), "bbbbbbbbbbbb".to_owned()])
        );
        let mut why: HashMap<String, String> = ["aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"]
            .iter()
            .map(|id| ((*id).to_owned(), "container die".to_owned()))
            .collect();
        why.retain(|id, _| keep.contains(id));
        assert!(!why.contains_key("cccccccccccc"), "{why:?}");
        assert_eq!(why.len(), 2);
    }
}
