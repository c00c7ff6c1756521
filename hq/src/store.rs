//! The etcd edge of HQ: read the cluster, allocate, write a deployment in one transaction.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, KvClient, Txn, TxnOp};
use portalloc::{AllocError, Allocator};
use runtime::EtcdError;
use runtime::host::rfc3339_now;
use schema::records::{self, AliveRecord, EndpointRecord, HostRecord, StackMetaRecord};
use schema::{Dir, HostId, JobName, Key, Prefix, ServicePort, StackName};

use crate::compile::{self, ClusterView, CompileError, Deployment, JobSpec};
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
}

impl HqError {
    pub fn exit_code(&self) -> u8 {
        match self {
            HqError::Input(_) | HqError::Compile(_) => 2,
            HqError::Alloc(e) => e.exit_code() as u8,
            HqError::Etcd(EtcdError::Config(_)) => 2,
            _ => 1,
        }
    }
}

/// One value with the revision it was read at.
#[derive(Debug, Clone)]
pub struct Read {
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// Talks to etcd for HQ.
#[derive(Clone)]
pub struct Store {
    kv: KvClient,
    pub prefix: Prefix,
    endpoints: String,
    pub allocator: Allocator,
}

/// What a deploy changed, per stack.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DeployReport {
    pub stacks: Vec<StackReport>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StackReport {
    pub stack: String,
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
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
    async fn get_prefix(&self, dir: String) -> Result<(i64, BTreeMap<String, Read>), HqError> {
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
        let map = resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    Read {
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                    },
                )
            })
            .collect();
        Ok((revision, map))
    }

    /// Every deployed stack's jobs, and the raw keys under `stacks/` with their revisions.
    pub async fn load_stacks(
        &self,
    ) -> Result<
        (
            BTreeMap<StackName, BTreeMap<JobName, JobSpec>>,
            BTreeMap<String, Read>,
        ),
        HqError,
    > {
        let (_, raw) = self.get_prefix(self.prefix.dir(Dir::Stacks)).await?;
        let mut stacks: BTreeMap<StackName, BTreeMap<JobName, JobSpec>> = BTreeMap::new();
        for (key, read) in &raw {
            if let Ok(Key::StackJob(stack, job)) = self.prefix.parse(key) {
                let spec: JobSpec = records::decode(key, &read.value)
                    .map_err(|e| HqError::Refused(format!("{e}; fix or remove that key")))?;
                stacks.entry(stack).or_default().insert(job, spec);
            } else if let Ok(Key::StackMeta(stack)) = self.prefix.parse(key) {
                stacks.entry(stack).or_default();
            }
        }
        Ok((stacks, raw))
    }

    /// Deploys `files` (several stacks may link to each other): allocates every linked
    /// service port, then writes all metas and jobs in one transaction that commits only if
    /// nothing it read has changed. Re-deploying the same files writes nothing.
    pub async fn deploy(
        &self,
        files: &[StackFile],
        ambassador_addr: &str,
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
            let required = compile::required_service_ports(files, &view)?;
            let ports = self.allocator.allocate_many(&required).await?;
            view.ports = required.into_iter().zip(ports).collect();
            let deployment = compile::compile(files, &view)?;

            let mut compares = Vec::new();
            let mut ops = Vec::new();
            let mut report = DeployReport::default();
            let now = rfc3339_now();
            for sd in &deployment.stacks {
                let mut r = StackReport {
                    stack: sd.name.to_string(),
                    ..StackReport::default()
                };
                let stack_dir = self.prefix.dir(Dir::Stack(&sd.name));
                let mut existing: BTreeMap<&String, &Read> = raw
                    .iter()
                    .filter(|(k, _)| k.starts_with(&stack_dir))
                    .collect();
                for job in &sd.jobs {
                    let key = self
                        .prefix
                        .key(&Key::StackJob(sd.name.clone(), job.job.clone()));
                    let value = records::encode(job);
                    match existing.remove(&key) {
                        Some(old) => {
                            let same = serde_json::from_slice::<JobSpec>(&old.value).ok().as_ref()
                                == Some(job);
                            compares.push(Compare::mod_revision(
                                key.as_str(),
                                CompareOp::Equal,
                                old.mod_revision,
                            ));
                            if same {
                                r.unchanged.push(job.job.to_string());
                            } else {
                                ops.push(TxnOp::put(key.as_str(), value, None));
                                r.updated.push(job.job.to_string());
                            }
                        }
                        None => {
                            compares.push(Compare::create_revision(
                                key.as_str(),
                                CompareOp::Equal,
                                0,
                            ));
                            ops.push(TxnOp::put(key.as_str(), value, None));
                            r.created.push(job.job.to_string());
                        }
                    }
                }
                let meta_key = self.prefix.key(&Key::StackMeta(sd.name.clone()));
                let old_meta = existing.remove(&meta_key);
                for (key, old) in existing {
                    // Jobs no longer in the file.
                    compares.push(Compare::mod_revision(
                        key.as_str(),
                        CompareOp::Equal,
                        old.mod_revision,
                    ));
                    ops.push(TxnOp::delete(key.as_str(), None));
                    if let Ok(Key::StackJob(_, job)) = self.prefix.parse(key) {
                        r.removed.push(job.to_string());
                    }
                }
                let old: Option<StackMetaRecord> =
                    old_meta.and_then(|m| serde_json::from_slice(&m.value).ok());
                let changed =
                    !r.created.is_empty() || !r.updated.is_empty() || !r.removed.is_empty();
                let meta_same = old
                    .as_ref()
                    .is_some_and(|m| m.source_digest == sd.source_digest && m.order == sd.order);
                if changed || !meta_same {
                    let meta = StackMetaRecord {
                        v: records::RECORD_VERSION,
                        name: sd.name.to_string(),
                        deployed_at: now.clone(),
                        source_digest: sd.source_digest.clone(),
                        order: sd.order.clone(),
                    };
                    match old_meta {
                        Some(m) => compares.push(Compare::mod_revision(
                            meta_key.as_str(),
                            CompareOp::Equal,
                            m.mod_revision,
                        )),
                        None => compares.push(Compare::create_revision(
                            meta_key.as_str(),
                            CompareOp::Equal,
                            0,
                        )),
                    }
                    ops.push(TxnOp::put(meta_key.as_str(), records::encode(&meta), None));
                }
                report.stacks.push(r);
            }
            // Jobs linked to outside this deploy must not have changed under us.
            for job in deployment.stacks.iter().flat_map(|s| &s.jobs) {
                for link in &job.links {
                    let Ok(target) = link.service.parse::<schema::ServiceId>() else {
                        continue;
                    };
                    if files.iter().any(|f| f.name == target.stack) {
                        continue;
                    }
                    let key = self.prefix.key(&Key::StackJob(target.stack, target.job));
                    if let Some(read) = raw.get(&key) {
                        let c = Compare::mod_revision(
                            key.as_str(),
                            CompareOp::Equal,
                            read.mod_revision,
                        );
                        if !compares
                            .iter()
                            .any(|x| format!("{x:?}") == format!("{c:?}"))
                        {
                            compares.push(c);
                        }
                    }
                }
            }
            if ops.is_empty() {
                return Ok((deployment, report));
            }
            let mut kv = self.kv.clone();
            let resp = kv
                .txn(Txn::new().when(compares).and_then(ops))
                .await
                .map_err(|e| self.etcd(e))?;
            if resp.succeeded() {
                return Ok((deployment, report));
            }
            // Someone changed a stack we read; plan again from fresh state.
            tokio::time::sleep(backoff.next_delay()).await;
        }
        Err(HqError::Refused(
            "the stacks kept changing while deploying; try again".into(),
        ))
    }

    /// Stacks that link to `stack` (other than itself), as `stack/job` of the linking job.
    pub async fn linked_from(&self, stack: &StackName) -> Result<Vec<String>, HqError> {
        let (stacks, _) = self.load_stacks().await?;
        let mut out = Vec::new();
        for (name, jobs) in &stacks {
            if name == stack {
                continue;
            }
            for job in jobs.values() {
                for link in &job.links {
                    if link.service.split('/').next() == Some(stack.as_str()) {
                        out.push(format!("{name}/{} -> {}", job.job, link.service));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Removes a stack's config and releases its ambassador ports.
    pub async fn remove_stack(&self, stack: &StackName, force: bool) -> Result<Vec<u16>, HqError> {
        let linked = self.linked_from(stack).await?;
        if !linked.is_empty() && !force {
            return Err(HqError::Refused(format!(
                "stack {stack} is linked to by {}; remove those first or pass --force",
                linked.join(", ")
            )));
        }
        let (_, raw) = self.get_prefix(self.prefix.dir(Dir::Stack(stack))).await?;
        if raw.is_empty() {
            return Err(HqError::Refused(format!(
                "stack {stack} is not deployed; `viking stacks` lists what is"
            )));
        }
        let mut kv = self.kv.clone();
        let compares: Vec<Compare> = raw
            .iter()
            .map(|(k, r)| Compare::mod_revision(k.as_str(), CompareOp::Equal, r.mod_revision))
            .collect();
        let ops = vec![TxnOp::delete(
            self.prefix.dir(Dir::Stack(stack)),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )];
        let resp = kv
            .txn(Txn::new().when(compares).and_then(ops))
            .await
            .map_err(|e| self.etcd(e))?;
        if !resp.succeeded() {
            return Err(HqError::Refused(format!(
                "stack {stack} changed while removing it; try again"
            )));
        }
        // Ports that stacks still deployed link to stay allocated (after --force): their env
        // points at them, and handing them to another service would misroute those clients.
        let (others, _) = self.load_stacks().await?;
        let still_linked: std::collections::BTreeSet<String> = others
            .values()
            .flat_map(|jobs| jobs.values())
            .flat_map(|j| &j.links)
            .flat_map(|l| {
                l.ports
                    .iter()
                    .map(move |p| format!("{}:{}/{}", l.service, p.port, p.proto))
            })
            .collect();
        let mut released = Vec::new();
        for a in self.allocator.list().await? {
            if let Ok(sp) = a.service_port.parse::<ServicePort>() {
                if &sp.service.stack == stack && !still_linked.contains(&sp.to_string()) {
                    if let Some(p) = self.allocator.release(&sp).await? {
                        released.push(p);
                    }
                }
            }
        }
        Ok(released)
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
        if !done.succeeded() {
            return Err(HqError::Refused(format!(
                "{stack}/{job} changed while scaling (a deploy?); run the command again"
            )));
        }
        Ok(before)
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
