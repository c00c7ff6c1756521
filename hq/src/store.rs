//! The etcd edge of HQ: read the cluster, allocate, write a deployment in one transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, KvClient, Txn, TxnOp};
use portalloc::{AllocError, Allocator};
use runtime::EtcdError;
use runtime::host::rfc3339_now;
use schema::records::{self, AliveRecord, EndpointRecord, HostRecord, StackMetaRecord};
use schema::{Dir, HostId, JobName, Key, Kv, Prefix, ServicePort, StackName};

use tracing::warn;

use crate::compile::{self, ClusterView, CompileError, Deployment, JobSpec};
use crate::deploy::{self, Guard, Write};
use crate::stackfile::StackFile;

/// Why a command failed, shaped by its exit code.
#[derive(Debug, thiserror::Error)]
pub enum HqError {
    /// Bad input: exit 2, nothing written.
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The cluster refuses (a stack still linked to, a missing stack): exit 1.
    #[error("{0}")]
    Refused(String),
    /// `viking up`: no usable host id (exit 2).
    #[error(transparent)]
    Host(#[from] runtime::host::HostError),
    /// `viking up`: the ambassador refused to start, as the `ambassador` binary would.
    #[error(transparent)]
    Ambassador(#[from] ambassador::StartError),
    /// `viking up`: the registrator refused to start, as the `registrator` binary would.
    #[error(transparent)]
    Registrator(#[from] registrator::StartError),
    /// `viking up`: the launcher refused to start, as the `launcher` binary would.
    #[error(transparent)]
    Launcher(#[from] launcher::StartError),
    /// `viking up --router`: the router refused to start, as the `router` binary would.
    #[error(transparent)]
    Router(#[from] router::StartError),
}

impl runtime::Fatal for HqError {
    fn exit_code(&self) -> u8 {
        use runtime::process::{FAILURE, USAGE};
        match self {
            HqError::Input(_) | HqError::Compile(_) => USAGE,
            HqError::Alloc(e) => e.exit_code(),
            HqError::Etcd(e) => e.exit_code(),
            HqError::Host(e) => e.exit_code(),
            HqError::Ambassador(e) => e.exit_code(),
            HqError::Registrator(e) => e.exit_code(),
            HqError::Launcher(e) => e.exit_code(),
            HqError::Router(e) => e.exit_code(),
            HqError::Refused(_) => FAILURE,
        }
    }
}

/// Talks to etcd for HQ.
#[derive(Clone)]
pub struct Store {
    kv: KvClient,
    pub prefix: Prefix,
    endpoints: String,
    pub allocator: Allocator,
}

pub use crate::deploy::{DeployReport, StackReport};

/// What `viking rm` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// Whether the stack was deployed (else only ports it still held were released).
    pub deployed: bool,
    pub released: Vec<u16>,
}

/// What [`Store::release_unused`] may do.
#[derive(Debug, Clone, Copy)]
enum Release {
    /// `viking rm`: remove the stack (refused while linked to, unless forced) and its ports.
    Remove { force: bool },
    /// After a failed deploy: release the ports of a stack only if it is not deployed.
    LeftoversOnly,
}

/// The jobs of other stacks that link to `stack`, as `stack/job -> service`.
fn linkers(
    stacks: &BTreeMap<StackName, BTreeMap<JobName, JobSpec>>,
    stack: &StackName,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, jobs) in stacks {
        if name == stack {
            continue;
        }
        for job in jobs.values() {
            for link in &job.links {
                if &link.service.stack == stack {
                    out.push(format!("{name}/{} -> {}", job.job, link.service));
                }
            }
        }
    }
    out
}

/// The job keys of `stack` under `raw` (as `load_stacks` returns it) that `jobs` lacks: the
/// ones whose value could not be read.
pub fn unreadable_jobs<'a>(
    prefix: &Prefix,
    stack: &StackName,
    jobs: Option<&BTreeMap<JobName, JobSpec>>,
    raw: &'a BTreeMap<String, Kv>,
) -> Vec<&'a str> {
    raw.keys()
        .filter(|key| match prefix.parse(key) {
            Ok(Key::StackJob(s, job)) => &s == stack && !jobs.is_some_and(|j| j.contains_key(&job)),
            _ => false,
        })
        .map(String::as_str)
        .collect()
}

/// A planned guard as an etcd compare.
fn compare(guard: &Guard) -> Compare {
    match guard {
        Guard::Unchanged { key, mod_revision } => {
            Compare::mod_revision(key.as_str(), CompareOp::Equal, *mod_revision)
        }
        Guard::Absent { key } => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
    }
}

/// A planned write as an etcd operation.
fn txn_op(write: &Write) -> TxnOp {
    match write {
        Write::Put { key, value } => TxnOp::put(key.as_str(), value.as_str(), None),
        Write::Delete { key } => TxnOp::delete(key.as_str(), None),
    }
}

impl Store {
    pub fn new(client: &Client, prefix: Prefix, allocator: Allocator, endpoints: String) -> Self {
        Self {
            kv: client.kv_client().max_decoding_message_size(64 << 20),
            prefix,
            endpoints,
            allocator,
        }
    }

    fn etcd(&self, e: etcd_client::Error) -> HqError {
        HqError::Etcd(EtcdError::classify(e, &self.endpoints))
    }

    /// Reads a directory. A retryable failure (a leader election, a member going away) is
    /// retried for up to 5 s: a command should not fail while the cluster heals itself.
    async fn get_prefix(&self, dir: String) -> Result<(i64, BTreeMap<String, Kv>), HqError> {
        let mut kv = self.kv.clone();
        let mut backoff =
            runtime::Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let resp = loop {
            match kv
                .get(dir.as_str(), Some(GetOptions::new().with_prefix()))
                .await
            {
                Ok(resp) => break resp,
                Err(e) => {
                    let e = self.etcd(e);
                    let retry = matches!(&e, HqError::Etcd(inner) if inner.is_retryable());
                    if !retry || std::time::Instant::now() >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        };
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok((revision, runtime::watch::to_map(resp.kvs())))
    }

    /// Every deployed stack's jobs, and the raw keys under `stacks/` with their revisions. A job
    /// value that cannot be read is left out with a warning naming its key, so that one bad
    /// key (say, hand-edited) does not stop commands about the other stacks; `viking rm` of its
    /// stack removes it, and [`unreadable_jobs`] lets a command refuse to act on the stack.
    pub async fn load_stacks(
        &self,
    ) -> Result<
        (
            BTreeMap<StackName, BTreeMap<JobName, JobSpec>>,
            BTreeMap<String, Kv>,
        ),
        HqError,
    > {
        let (_, stacks, raw) = self.read_stacks().await?;
        Ok((stacks, raw))
    }

    /// [`Store::load_stacks`] and the revision it read at.
    #[allow(clippy::type_complexity)]
    async fn read_stacks(
        &self,
    ) -> Result<
        (
            i64,
            BTreeMap<StackName, BTreeMap<JobName, JobSpec>>,
            BTreeMap<String, Kv>,
        ),
        HqError,
    > {
        let (revision, raw) = self.get_prefix(self.prefix.dir(Dir::Stacks)).await?;
        let mut stacks: BTreeMap<StackName, BTreeMap<JobName, JobSpec>> = BTreeMap::new();
        for (key, read) in &raw {
            if let Ok(Key::StackJob(stack, job)) = self.prefix.parse(key) {
                let spec = records::decode::<JobSpec>(key, &read.value)
                    .map_err(|e| e.to_string())
                    .and_then(|spec| match spec.check() {
                        Ok(()) => Ok(spec),
                        Err(why) => Err(format!("{key}: {why}")),
                    });
                match spec {
                    Ok(spec) => {
                        stacks.entry(stack).or_default().insert(job, spec);
                    }
                    Err(e) => {
                        warn!("{e}; left out: deploy stack {stack} again, or `viking rm {stack}`");
                        stacks.entry(stack).or_default();
                    }
                }
            } else if let Ok(Key::StackMeta(stack)) = self.prefix.parse(key) {
                stacks.entry(stack).or_default();
            }
        }
        Ok((revision, stacks, raw))
    }

    /// Deploys `files` (several stacks may link to each other): allocates every linked
    /// service port, then writes all metas and jobs in one transaction that commits only if
    /// nothing it read has changed. Re-deploying the same files writes nothing.
    ///
    /// A deploy that fails after allocating releases what it allocated for stacks that are
    /// still not deployed (and that no deployed stack links to), so no port stays held by a
    /// stack that does not exist.
    pub async fn deploy(
        &self,
        files: &[StackFile],
        ambassador_addr: &str,
    ) -> Result<(Deployment, DeployReport), HqError> {
        let mut allocated = BTreeSet::new();
        let result = self
            .try_deploy(files, ambassador_addr, &mut allocated)
            .await;
        if result.is_err() {
            // Also stacks outside the deploy: a linked stack removed while deploying had its
            // ports released, and this deploy may have allocated them again.
            for stack in &allocated {
                match self.release_unused(stack, Release::LeftoversOnly).await {
                    Ok(Some(removed)) if !removed.released.is_empty() => warn!(
                        %stack,
                        ports = ?removed.released,
                        "the deploy failed; released the ports it had allocated for a stack \
                         that is not deployed"
                    ),
                    Ok(_) => {}
                    Err(e) => warn!(
                        %stack,
                        "the deploy failed, and releasing the ports it allocated failed too: \
                         {e}; `viking rm {stack}` releases them later"
                    ),
                }
            }
        }
        result
    }

    async fn try_deploy(
        &self,
        files: &[StackFile],
        ambassador_addr: &str,
        allocated: &mut BTreeSet<StackName>,
    ) -> Result<(Deployment, DeployReport), HqError> {
        let mut backoff =
            runtime::Backoff::new(Duration::from_millis(5), Duration::from_millis(200));
        for _ in 0..16 {
            let (stacks, raw) = self.load_stacks().await?;
            let mut view = ClusterView {
                stacks,
                ports: BTreeMap::new(),
                ambassador_addr: ambassador_addr.to_owned(),
            };
            // Stacks being deployed are replaced, not linked to as deployed.
            for f in files {
                view.stacks.remove(&f.name);
            }
            // Before any port is allocated: the whole deploy must fit in one transaction.
            deploy::check_size(&self.prefix, files, &raw, self.allocator.max_txn_ops())?;
            let required = compile::required_service_ports(files, &view)?;
            allocated.extend(required.iter().map(|sp| sp.service.stack.clone()));
            let (ports, allocated_at) = self.allocator.allocate_many_at(&required).await?;
            let no_release = (!required.is_empty())
                .then(|| self.allocator.released_since(allocated_at))
                .into_iter()
                .flatten();
            view.ports = required.into_iter().zip(ports).collect();
            let deployment = compile::compile(files, &view)?;

            let (_, routes) = self.get_prefix(self.prefix.dir(Dir::Routes)).await?;
            let plan = deploy::plan(&self.prefix, &deployment, &raw, &routes, &rfc3339_now())?;
            if plan.writes.is_empty() {
                return Ok((deployment, plan.report));
            }
            // The ports in the env must still be allocated when it is written: a concurrent
            // `viking rm` (or a failed deploy's clean-up) may release them.
            let compares: Vec<Compare> =
                plan.guards.iter().map(compare).chain(no_release).collect();
            let ops: Vec<TxnOp> = plan.writes.iter().map(txn_op).collect();
            let mut kv = self.kv.clone();
            let resp = kv
                .txn(Txn::new().when(compares).and_then(ops))
                .await
                .map_err(|e| self.etcd(e))?;
            if resp.succeeded() {
                return Ok((deployment, plan.report));
            }
            // Someone changed a stack we read; plan again from fresh state.
            tokio::time::sleep(backoff.next_delay()).await;
        }
        Err(HqError::Refused(
            "the stacks kept changing while deploying; try again".into(),
        ))
    }

    /// `viking rm`: removes a stack's config and releases its ambassador ports, in one
    /// transaction where it fits. A stack that is not deployed but still holds ports (left by
    /// a deploy that failed) has them released.
    pub async fn remove_stack(&self, stack: &StackName, force: bool) -> Result<Removed, HqError> {
        self.release_unused(stack, Release::Remove { force })
            .await?
            .ok_or_else(|| {
                HqError::Refused(format!(
                    "stack {stack} is not deployed and holds no ports; `viking stacks` lists \
                     what is"
                ))
            })
    }

    /// Removes `stack` (with [`Release::Remove`]) and releases the ports it holds that no
    /// other deployed stack links to; `None` when there was nothing to do.
    ///
    /// One read of `stacks/` at a revision decides; the transaction commits only if nothing
    /// under `stacks/` changed since, so a deploy that links to this stack and commits first
    /// makes it read again (and refuse), and a deploy that commits after fails its own compare
    /// on the linked job. Exactly one of the two wins.
    async fn release_unused(
        &self,
        stack: &StackName,
        mode: Release,
    ) -> Result<Option<Removed>, HqError> {
        let mut backoff =
            runtime::Backoff::new(Duration::from_millis(5), Duration::from_millis(200));
        for _ in 0..16 {
            let (revision, stacks, raw) = self.read_stacks().await?;
            let stack_dir = self.prefix.dir(Dir::Stack(stack));
            let keys: Vec<&Kv> = raw
                .iter()
                .filter(|(k, _)| k.starts_with(&stack_dir))
                .map(|(_, kv)| kv)
                .collect();
            let deployed = !keys.is_empty();
            match mode {
                Release::LeftoversOnly if deployed => return Ok(None),
                Release::Remove { force: false } => {
                    let linked = linkers(&stacks, stack);
                    if !linked.is_empty() {
                        return Err(HqError::Refused(format!(
                            "stack {stack} is linked to by {}; remove those first or pass --force",
                            linked.join(", ")
                        )));
                    }
                }
                _ => {}
            }
            // Ports that other deployed stacks link to stay allocated (after --force): their
            // env points at them, and handing them to another service would misroute them.
            let still_linked: BTreeSet<ServicePort> = stacks
                .iter()
                .filter(|(name, _)| *name != stack)
                .flat_map(|(_, jobs)| jobs.values())
                .flat_map(|j| &j.links)
                .flat_map(|l| {
                    l.ports.iter().map(|p| ServicePort {
                        service: l.service.clone(),
                        port: p.port,
                        proto: p.proto,
                    })
                })
                .collect();
            let (_, allocs) = self
                .get_prefix(self.prefix.dir(Dir::StackPortAllocs(stack)))
                .await?;
            let releases: Vec<(ServicePort, u16, i64)> = allocs
                .iter()
                .filter_map(|(k, kv)| match self.prefix.parse(k) {
                    Ok(Key::PortAlloc(sp)) if !still_linked.contains(&sp) => {
                        records::decode::<records::PortAllocRecord>(k, &kv.value)
                            .ok()
                            .map(|r| (sp, r.port, kv.mod_revision))
                    }
                    _ => None,
                })
                .collect();
            if !deployed && releases.is_empty() {
                return Ok(None);
            }
            let nothing_newer =
                Compare::mod_revision(self.prefix.dir(Dir::Stacks), CompareOp::Less, revision + 1)
                    .with_prefix();
            let mut compares = vec![nothing_newer];
            let mut ops = Vec::new();
            if deployed {
                ops.push(TxnOp::delete(
                    stack_dir.as_str(),
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                ));
                // Its domains go with it (each guarded: a deploy may be taking one over).
                let (_, routes) = self.get_prefix(self.prefix.dir(Dir::Routes)).await?;
                for (key, kv) in &routes {
                    let owned = records::decode::<records::RouteRecord>(key, &kv.value)
                        .is_ok_and(|r| r.stack == *stack);
                    if owned {
                        compares.push(Compare::mod_revision(
                            key.as_str(),
                            CompareOp::Equal,
                            kv.mod_revision,
                        ));
                        ops.push(TxnOp::delete(key.as_str(), None));
                    }
                }
            }
            // Each release is a compare and two operations, the second nesting two more.
            let fits = compares.len() + releases.len() <= self.allocator.max_txn_ops()
                && ops.len() + 4 * releases.len() <= self.allocator.max_txn_ops();
            if fits {
                for (sp, port, rev) in &releases {
                    let (c, o) = self.allocator.release_parts(sp, *port, *rev);
                    compares.push(c);
                    ops.extend(o);
                }
            }
            let mut kv = self.kv.clone();
            let resp = kv
                .txn(Txn::new().when(compares).and_then(ops))
                .await
                .map_err(|e| self.etcd(e))?;
            if !resp.succeeded() {
                // A stack or a port changed since the read: decide again from a fresh one.
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
            let mut released: Vec<u16> = Vec::new();
            if fits {
                released.extend(releases.iter().map(|(_, port, _)| *port));
            } else {
                // Too many ports for one transaction with the removal: each is released on
                // its own after it (a crash in between leaves them to the next `viking rm`).
                for (sp, _, _) in &releases {
                    if let Some(p) = self.allocator.release(sp).await? {
                        released.push(p);
                    }
                }
            }
            released.sort_unstable();
            return Ok(Some(Removed { deployed, released }));
        }
        Err(HqError::Refused(format!(
            "the stacks kept changing while removing {stack}; try again"
        )))
    }

    /// Reads several directories in one transaction (one revision).
    pub async fn read_dirs(&self, dirs: &[Dir<'_>]) -> Result<Vec<BTreeMap<String, Kv>>, HqError> {
        let ops: Vec<TxnOp> = dirs
            .iter()
            .map(|d| TxnOp::get(self.prefix.dir(*d), Some(GetOptions::new().with_prefix())))
            .collect();
        let mut kv = self.kv.clone();
        let resp = kv
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(|e| self.etcd(e))?;
        Ok(resp
            .op_responses()
            .into_iter()
            .map(|r| match r {
                etcd_client::TxnOpResponse::Get(g) => runtime::watch::to_map(g.kvs()),
                _ => BTreeMap::new(),
            })
            .collect())
    }

    /// One transaction; whether its compares held.
    pub async fn txn(&self, txn: Txn) -> Result<bool, HqError> {
        let mut kv = self.kv.clone();
        Ok(kv.txn(txn).await.map_err(|e| self.etcd(e))?.succeeded())
    }

    /// Stack metas.
    pub async fn stack_metas(&self) -> Result<Vec<StackMetaRecord>, HqError> {
        let (_, raw) = self.get_prefix(self.prefix.dir(Dir::Stacks)).await?;
        Ok(raw
            .iter()
            .filter(|(k, _)| matches!(self.prefix.parse(k), Ok(Key::StackMeta(_))))
            .filter_map(|(k, r)| records::decode(k, &r.value).ok())
            .collect())
    }

    /// Live endpoints of one service, by `port-proto`.
    pub async fn endpoints(
        &self,
        stack: &StackName,
        job: &JobName,
    ) -> Result<BTreeMap<String, Vec<EndpointRecord>>, HqError> {
        let dir = format!("{}{stack}/{job}/", self.prefix.dir(Dir::Services));
        let (_, raw) = self.get_prefix(dir).await?;
        let mut out: BTreeMap<String, Vec<EndpointRecord>> = BTreeMap::new();
        for (k, r) in raw {
            if let Ok(Key::Endpoint { service_port, .. }) = self.prefix.parse(&k) {
                if let Ok(e) = records::decode::<EndpointRecord>(&k, &r.value) {
                    out.entry(format!("{}/{}", service_port.port, service_port.proto))
                        .or_default()
                        .push(e);
                }
            }
        }
        Ok(out)
    }

    /// `viking scale`: sets a job's `scale`, compared against the revision it read, so a
    /// concurrent deploy is never overwritten. Returns the previous scale.
    pub async fn set_scale(
        &self,
        stack: &StackName,
        job: &JobName,
        scale: u32,
    ) -> Result<u32, HqError> {
        // Concurrent scales of one job: each is applied to what it read, the last one wins.
        for _ in 0..64 {
            if let Some(before) = self.try_set_scale(stack, job, scale).await? {
                return Ok(before);
            }
            // Spread, so that retrying writers do not collide again.
            tokio::time::sleep(Duration::from_millis(fastrand::u64(1..=20))).await;
        }
        Err(HqError::Refused(format!(
            "{stack}/{job} kept changing while scaling (a deploy?); run the command again"
        )))
    }

    /// One compare-and-put of the scale; `None` if the spec changed since it was read.
    async fn try_set_scale(
        &self,
        stack: &StackName,
        job: &JobName,
        scale: u32,
    ) -> Result<Option<u32>, HqError> {
        let key = self.prefix.key(&Key::StackJob(stack.clone(), job.clone()));
        let mut kv = self.kv.clone();
        let resp = kv
            .get(key.as_str(), None)
            .await
            .map_err(|e| EtcdError::classify(e, &self.endpoints))?;
        let Some(found) = resp.kvs().first() else {
            return Err(HqError::Refused(format!(
                "{stack}/{job} is not deployed; `viking ps {stack}` lists the stack's jobs"
            )));
        };
        let mut spec: JobSpec = records::decode(&key, found.value())
            .map_err(|e| HqError::Refused(format!("{e}; fix or remove that key")))?;
        let before = spec.scale;
        spec.scale = scale;
        // The spec as written must pass the check every reader makes, or the job would be
        // left out everywhere ("broken") until it is deployed again.
        spec.check()
            .map_err(|e| HqError::Refused(format!("{stack}/{job}: {e}; nothing was changed")))?;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                found.mod_revision(),
            )])
            .and_then([TxnOp::put(key.as_str(), records::encode(&spec), None)]);
        let done = kv
            .txn(txn)
            .await
            .map_err(|e| EtcdError::classify(e, &self.endpoints))?;
        Ok(done.succeeded().then_some(before))
    }

    /// `viking host add`: durable membership.
    pub async fn host_add(&self, record: &HostRecord) -> Result<(), HqError> {
        let mut kv = self.kv.clone();
        kv.put(
            self.prefix.key(&Key::Host(record.host.clone())),
            records::encode(record),
            None,
        )
        .await
        .map_err(|e| self.etcd(e))?;
        Ok(())
    }

    /// `viking rollback`: puts back the spec the last deploy of `stack/job` replaced (keeping
    /// the current scale), and keeps the one it replaces as the previous one, in one
    /// transaction compared on both. The grid rolls it out like any update.
    pub async fn rollback(&self, stack: &StackName, job: &JobName) -> Result<(), HqError> {
        let key = self.prefix.key(&Key::StackJob(stack.clone(), job.clone()));
        let prev_key = self.prefix.key(&Key::StackPrev(stack.clone(), job.clone()));
        let mut kv = self.kv.clone();
        let txn = Txn::new().and_then([
            TxnOp::get(key.as_str(), None),
            TxnOp::get(prev_key.as_str(), None),
        ]);
        let resp = kv.txn(txn).await.map_err(|e| self.etcd(e))?;
        let mut found = resp.op_responses().into_iter().map(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(runtime::watch::to_kv),
            _ => None,
        });
        let (Some(current), prev) = (found.next().flatten(), found.next().flatten()) else {
            return Err(HqError::Refused(format!(
                "{stack}/{job} is not deployed; `viking ps {stack}` lists the stack's jobs"
            )));
        };
        let Some(prev) = prev else {
            return Err(HqError::Refused(format!(
                "{stack}/{job} has no previous spec: it was deployed once, and rollback puts \
                 back what a later deploy replaced"
            )));
        };
        let (compares, ops) = grid::rollback::swap(&current, &prev)
            .map_err(|e| HqError::Refused(format!("{e}; deploy the stack again")))?;
        let txn = Txn::new().when(compares).and_then(ops);
        if !self.txn(txn).await? {
            return Err(HqError::Refused(format!(
                "{stack}/{job} changed while rolling it back (a deploy?); run the command again"
            )));
        }
        Ok(())
    }

    /// `viking host label`: sets and removes labels of a member, compared against what it
    /// read; returns the labels it has now.
    pub async fn host_label(
        &self,
        host: &HostId,
        set: &BTreeMap<String, String>,
        unset: &[String],
    ) -> Result<BTreeMap<String, String>, HqError> {
        let record = self
            .host_update(host, |r| {
                r.labels.extend(set.clone());
                for k in unset {
                    r.labels.remove(k);
                }
            })
            .await?;
        Ok(record.labels)
    }

    /// Changes a member's record with `change`, compared against what it read.
    pub async fn host_update(
        &self,
        host: &HostId,
        change: impl Fn(&mut HostRecord),
    ) -> Result<HostRecord, HqError> {
        let key = self.prefix.key(&Key::Host(host.clone()));
        for _ in 0..16 {
            let mut kv = self.kv.clone();
            let resp = kv.get(key.as_str(), None).await.map_err(|e| self.etcd(e))?;
            let Some(found) = resp.kvs().first() else {
                return Err(HqError::Refused(format!(
                    "{host} is not a member; `viking host add {host} ADDR` first"
                )));
            };
            let mut record: HostRecord = records::decode(&key, found.value())
                .map_err(|e| HqError::Refused(format!("{e}; add the host again")))?;
            change(&mut record);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    found.mod_revision(),
                )])
                .and_then([TxnOp::put(key.as_str(), records::encode(&record), None)]);
            if self.txn(txn).await? {
                return Ok(record);
            }
        }
        Err(HqError::Refused(format!(
            "{host} kept changing while updating it; try again"
        )))
    }

    /// `viking host rm`: true if it was a member.
    pub async fn host_rm(&self, host: &HostId) -> Result<bool, HqError> {
        let mut kv = self.kv.clone();
        let resp = kv
            .delete(self.prefix.key(&Key::Host(host.clone())), None)
            .await
            .map_err(|e| self.etcd(e))?;
        Ok(resp.deleted() > 0)
    }

    /// Members with their live agents.
    pub async fn hosts(&self) -> Result<Vec<(HostRecord, Vec<AliveRecord>)>, HqError> {
        let (_, hosts) = self.get_prefix(self.prefix.dir(Dir::Hosts)).await?;
        let (_, alive) = self.get_prefix(self.prefix.dir(Dir::Alive)).await?;
        let alive: Vec<AliveRecord> = alive
            .iter()
            .filter_map(|(k, r)| records::decode::<AliveRecord>(k, &r.value).ok())
            .collect();
        Ok(hosts
            .iter()
            .filter_map(|(k, r)| records::decode::<HostRecord>(k, &r.value).ok())
            .map(|h| {
                let a = alive.iter().filter(|a| a.host == h.host).cloned().collect();
                (h, a)
            })
            .collect())
    }
}
