//! `viking run`, `stop`, `scale`, `logs`: a stack's containers on the local Docker host.
//!
//! [`plan`] is pure: from the compiled jobs and the containers Docker has, what to start,
//! replace, keep and remove. The rest talks to Docker (bollard) and, to wait for linked-to
//! jobs, to etcd. A container carries the labels `viking.stack`, `viking.job`,
//! `viking.instance` (what the registrator names endpoints from) and `viking.spec`, a digest
//! of its job's spec: a container whose digest differs from the job's is replaced.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, HostConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
};
use futures_util::StreamExt;
use schema::{JobName, ServiceId, StackName};

use crate::compile::JobSpec;
use crate::stackfile::CommandSpec;
use crate::store::{HqError, Store};

/// How long `viking run` waits for a linked-to job's first live endpoint.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// A container of a stack as Docker has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub id: String,
    pub name: String,
    pub job: String,
    pub instance: u32,
    pub spec: String,
    pub running: bool,
}

/// What `viking run` does to one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create and start `<stack>_<job>_<i>`.
    Start {
        job: JobName,
        instance: u32,
    },
    /// It exists with this spec but is stopped.
    Restart {
        job: JobName,
        instance: u32,
        id: String,
    },
    /// Its spec changed: remove it, then create and start it again.
    Replace {
        job: JobName,
        instance: u32,
        id: String,
    },
    Keep {
        name: String,
    },
    /// Its job or instance is gone from the stack.
    Remove {
        name: String,
        id: String,
    },
}

pub use schema::container_name;

/// The digest of what makes a job's container: see [`JobSpec::digest`].
pub fn spec_digest(spec: &JobSpec) -> String {
    spec.digest()
}

/// The steps that turn `existing` into `jobs` (in start order), then the removals.
pub fn plan(jobs: &[JobSpec], existing: &[Existing]) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut wanted = BTreeSet::new();
    for spec in jobs {
        let digest = spec_digest(spec);
        for i in 0..spec.scale {
            wanted.insert((spec.job.to_string(), i));
            let have = existing
                .iter()
                .find(|e| e.job == spec.job.as_str() && e.instance == i);
            steps.push(match have {
                None => Step::Start {
                    job: spec.job.clone(),
                    instance: i,
                },
                Some(e) if e.spec != digest => Step::Replace {
                    job: spec.job.clone(),
                    instance: i,
                    id: e.id.clone(),
                },
                Some(e) if !e.running => Step::Restart {
                    job: spec.job.clone(),
                    instance: i,
                    id: e.id.clone(),
                },
                Some(e) => Step::Keep {
                    name: e.name.clone(),
                },
            });
        }
    }
    for e in existing {
        if !wanted.contains(&(e.job.clone(), e.instance)) {
            steps.push(Step::Remove {
                name: e.name.clone(),
                id: e.id.clone(),
            });
        }
    }
    steps
}

/// The Docker create body of instance `i` of a job.
pub fn container_config(spec: &JobSpec, instance: u32) -> ContainerCreateBody {
    let ports: Vec<String> = spec
        .ports
        .iter()
        .map(|p| format!("{}/{}", p.port, p.proto))
        .collect();
    // Published on ephemeral host ports: the registrator reads them back.
    let bindings: HashMap<String, Option<Vec<PortBinding>>> = ports
        .iter()
        .map(|p| {
            (
                p.clone(),
                Some(vec![PortBinding {
                    host_ip: None,
                    host_port: Some(String::new()),
                }]),
            )
        })
        .collect();
    let (binds, volumes): (Vec<String>, Vec<String>) =
        spec.volumes.iter().cloned().partition(|v| v.contains(':'));
    let labels: HashMap<String, String> = spec
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .chain([
            (schema::labels::STACK.to_owned(), spec.stack.to_string()),
            (schema::labels::JOB.to_owned(), spec.job.to_string()),
            (schema::labels::INSTANCE.to_owned(), instance.to_string()),
            (schema::labels::SPEC.to_owned(), spec_digest(spec)),
        ])
        .collect();
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: spec.command.as_ref().map(|c| match c {
            CommandSpec::Shell(s) => vec!["sh".to_owned(), "-c".to_owned(), s.clone()],
            CommandSpec::Exec(v) => v.clone(),
        }),
        env: Some(
            spec.container_env()
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
        ),
        exposed_ports: Some(ports),
        volumes: (!volumes.is_empty()).then_some(volumes),
        labels: Some(labels),
        host_config: Some(HostConfig {
            port_bindings: Some(bindings),
            binds: (!binds.is_empty()).then_some(binds),
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                maximum_retry_count: None,
            }),
            ..HostConfig::default()
        }),
        ..ContainerCreateBody::default()
    }
}

/// Connects to the local Docker (`DOCKER_HOST` or the socket).
pub async fn docker() -> Result<Docker, HqError> {
    let refused = |e: bollard::errors::Error| {
        HqError::Refused(format!(
            "cannot reach Docker ({e}); start dockerd (make up and make test do) or set DOCKER_HOST"
        ))
    };
    Docker::connect_with_defaults()
        .map_err(refused)?
        .negotiate_version()
        .await
        .map_err(refused)
}

fn docker_error(what: &str) -> impl Fn(bollard::errors::Error) -> HqError + '_ {
    move |e| HqError::Refused(format!("Docker refused to {what}: {e}"))
}

/// The stack's containers, from their labels.
pub async fn existing(docker: &Docker, stack: &StackName) -> Result<Vec<Existing>, HqError> {
    let filters = HashMap::from([("label".to_owned(), vec![format!("viking.stack={stack}")])]);
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .map_err(docker_error("list containers"))?;
    Ok(list
        .into_iter()
        .filter_map(|c| {
            let labels = c.labels.unwrap_or_default();
            Some(Existing {
                id: c.id?,
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .unwrap_or_default(),
                job: labels.get("viking.job")?.clone(),
                instance: labels.get(schema::labels::INSTANCE)?.parse().ok()?,
                spec: labels
                    .get(schema::labels::SPEC)
                    .cloned()
                    .unwrap_or_default(),
                running: c
                    .state
                    .is_some_and(|s| s == bollard::models::ContainerSummaryStateEnum::RUNNING),
            })
        })
        .collect())
}

/// The compiled jobs of a deployed stack, in start order.
pub async fn jobs(store: &Store, stack: &StackName) -> Result<Vec<JobSpec>, HqError> {
    let (stacks, raw) = store.load_stacks().await?;
    let bad = crate::store::unreadable_jobs(&store.prefix, stack, stacks.get(stack), &raw);
    if !bad.is_empty() {
        return Err(HqError::Refused(format!(
            "stack {stack} has job specs that cannot be read ({}); deploy it again to replace \
             them, or `viking rm {stack}`; nothing was started",
            bad.join(", ")
        )));
    }
    let jobs = stacks.get(stack).ok_or_else(|| {
        HqError::Refused(format!(
            "stack {stack} is not deployed; `viking deploy` its stack file first (`viking stacks` lists what is)"
        ))
    })?;
    let mut jobs: Vec<JobSpec> = jobs.values().cloned().collect();
    jobs.sort_by_key(|j| (j.order, j.job.to_string()));
    Ok(jobs)
}

/// Held while one `viking run`, `scale` or `stop` changes a stack's containers on this host:
/// two at once would both create the same container names (Docker answers the second with
/// 409 Conflict). A second one waits for the first, saying so, then plans from what the first
/// left.
pub struct StackLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl StackLock {
    pub async fn take(run_dir: &std::path::Path, stack: &StackName) -> Result<StackLock, HqError> {
        use nix::fcntl::{Flock, FlockArg};
        let refused = |e: std::io::Error| {
            HqError::Refused(format!(
                "cannot use --run-dir {}: {e}; pass --run-dir with a directory this user may write",
                run_dir.display()
            ))
        };
        std::fs::create_dir_all(run_dir).map_err(refused)?;
        let path = run_dir.join(format!("viking-run-{stack}.lock"));
        let mut file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(refused)?;
        let mut said = false;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(StackLock { _lock: lock }),
                Err((f, _)) => {
                    if !std::mem::replace(&mut said, true) {
                        tracing::warn!(
                            "another viking run, scale or stop of {stack} is under way on this \
                             host; waiting for it"
                        );
                    }
                    file = f;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// `viking run`: converges the stack's containers on this host. Returns one line per step.
pub async fn run(
    docker: &Docker,
    store: &Store,
    stack: &StackName,
    wait: Duration,
) -> Result<Vec<String>, HqError> {
    let jobs = jobs(store, stack).await?;
    let existing = existing(docker, stack).await?;
    let steps = plan(&jobs, &existing);
    let mut report = Vec::new();
    let by_job: BTreeMap<String, &JobSpec> = jobs.iter().map(|j| (j.job.to_string(), j)).collect();
    let mut waited = BTreeSet::new();
    for step in steps {
        let job = match &step {
            Step::Start { job, .. } | Step::Restart { job, .. } | Step::Replace { job, .. } => {
                Some(by_job[job.as_str()])
            }
            _ => None,
        };
        // A job starts only once everything it links to has a live endpoint.
        if let Some(spec) = job {
            for link in &spec.links {
                if waited.insert(link.service.clone()) {
                    wait_for_endpoints(store, &link.service, wait).await?;
                }
            }
        }
        let line = match step {
            Step::Keep { name } => format!("unchanged {name}"),
            Step::Remove { name, id } => {
                remove(docker, &id).await?;
                format!("removed {name}")
            }
            Step::Restart { job, instance, id } => {
                docker
                    .start_container(&id, None)
                    .await
                    .map_err(docker_error("start a container"))?;
                format!("restarted {}", container_name(stack, &job, instance))
            }
            Step::Replace { job, instance, id } => {
                remove(docker, &id).await?;
                create_and_start(docker, by_job[job.as_str()], instance).await?;
                format!("replaced {}", container_name(stack, &job, instance))
            }
            Step::Start { job, instance } => {
                create_and_start(docker, by_job[job.as_str()], instance).await?;
                format!("started {}", container_name(stack, &job, instance))
            }
        };
        report.push(line);
    }
    Ok(report)
}

async fn create_and_start(docker: &Docker, spec: &JobSpec, instance: u32) -> Result<(), HqError> {
    let name = container_name(&spec.stack, &spec.job, instance);
    let created = docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            }),
            container_config(spec, instance),
        )
        .await
        .map_err(|e| {
            HqError::Refused(format!(
                "Docker refused to create {name} from image {}: {e}",
                spec.image
            ))
        })?;
    docker
        .start_container(&created.id, None)
        .await
        .map_err(|e| HqError::Refused(format!("Docker refused to start {name}: {e}")))
}

async fn remove(docker: &Docker, id: &str) -> Result<(), HqError> {
    docker
        .remove_container(
            id,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            }),
        )
        .await
        .map_err(docker_error("remove a container"))
}

/// Waits until `service` has a live endpoint on any host.
async fn wait_for_endpoints(
    store: &Store,
    service: &ServiceId,
    wait: Duration,
) -> Result<(), HqError> {
    let (stack, job) = (&service.stack, &service.job);
    let deadline = Instant::now() + wait;
    loop {
        let endpoints = store.endpoints(stack, job).await?;
        if endpoints.values().any(|e| !e.is_empty()) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(HqError::Refused(format!(
                "{service} has no live endpoint after {wait:?}: run its stack first (viking run \
                 {stack}) and check that a registrator runs on its host (viking up runs one)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `viking stop`: removes the stack's containers. Returns their names.
pub async fn stop(docker: &Docker, stack: &StackName) -> Result<Vec<String>, HqError> {
    let mut names = Vec::new();
    for e in existing(docker, stack).await? {
        remove(docker, &e.id).await?;
        names.push(e.name);
    }
    Ok(names)
}

/// `viking logs`: prints the job's containers' logs, each line prefixed with the container
/// name; with `follow`, keeps printing until the containers stop.
pub async fn logs(
    docker: &Docker,
    stack: &StackName,
    job: &JobName,
    follow: bool,
    tail: u32,
) -> Result<(), HqError> {
    let mut containers: Vec<Existing> = existing(docker, stack)
        .await?
        .into_iter()
        .filter(|e| e.job == job.as_str())
        .collect();
    if containers.is_empty() {
        return Err(HqError::Refused(format!(
            "{stack}/{job} has no containers on this host; `viking run {stack}` starts them"
        )));
    }
    containers.sort_by_key(|e| e.instance);
    let streams = containers.into_iter().map(|e| {
        let name = e.name.clone();
        docker
            .logs(
                &e.id,
                Some(LogsOptions {
                    follow,
                    stdout: true,
                    stderr: true,
                    tail: tail.to_string(),
                    ..Default::default()
                }),
            )
            .map(move |item| (name.clone(), item))
    });
    let mut all = futures_util::stream::select_all(streams.map(Box::pin));
    while let Some((name, item)) = all.next().await {
        match item {
            Ok(out) => {
                for line in out.to_string().lines() {
                    println!("{name} | {line}");
                }
            }
            Err(e) => return Err(docker_error("read logs")(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, scale: u32) -> JobSpec {
        let stack = StackName::new("app").unwrap();
        let mut spec = JobSpec::new(stack, JobName::new(name).unwrap(), "busybox");
        spec.scale = scale;
        spec
    }

    fn existing(spec: &JobSpec, instance: u32, running: bool) -> Existing {
        Existing {
            id: format!("id-{}-{instance}", spec.job),
            name: container_name(&spec.stack, &spec.job, instance),
            job: spec.job.to_string(),
            instance,
            spec: spec_digest(spec),
            running,
        }
    }

    #[test]
    fn nothing_there_starts_every_instance_in_job_order() {
        let (db, web) = (job("db", 1), job("web", 2));
        let steps = plan(&[db, web], &[]);
        let starts: Vec<(String, u32)> = steps
            .iter()
            .map(|s| match s {
                Step::Start { job, instance } => (job.to_string(), *instance),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            starts,
            [("db".into(), 0), ("web".into(), 0), ("web".into(), 1)]
        );
    }

    #[test]
    fn running_ones_are_kept_stopped_ones_restarted_changed_ones_replaced() {
        let web = job("web", 3);
        let mut changed = web.clone();
        changed.image = "busybox:2".into();
        let have = [
            existing(&web, 0, true),
            existing(&web, 1, false),
            existing(&changed, 2, true),
        ];
        let steps = plan(std::slice::from_ref(&web), &have);
        assert_eq!(
            steps,
            [
                Step::Keep {
                    name: "app_web_0".into()
                },
                Step::Restart {
                    job: web.job.clone(),
                    instance: 1,
                    id: "id-web-1".into()
                },
                Step::Replace {
                    job: web.job.clone(),
                    instance: 2,
                    id: "id-web-2".into()
                },
            ]
        );
    }

    #[test]
    fn scaling_down_removes_the_highest_instances_and_scaling_replaces_nothing() {
        let three = job("web", 3);
        let have: Vec<Existing> = (0..3).map(|i| existing(&three, i, true)).collect();
        let one = job("web", 1);
        assert_eq!(
            spec_digest(&one),
            spec_digest(&three),
            "scale is not part of the spec"
        );
        let steps = plan(&[one], &have);
        assert_eq!(
            steps,
            [
                Step::Keep {
                    name: "app_web_0".into()
                },
                Step::Remove {
                    name: "app_web_1".into(),
                    id: "id-web-1".into()
                },
                Step::Remove {
                    name: "app_web_2".into(),
                    id: "id-web-2".into()
                },
            ]
        );
    }

    #[test]
    fn a_job_gone_from_the_stack_is_removed() {
        let old = job("old", 1);
        let steps = plan(&[], &[existing(&old, 0, true)]);
        assert_eq!(
            steps,
            [Step::Remove {
                name: "app_old_0".into(),
                id: "id-old-0".into()
            }]
        );
    }
}
