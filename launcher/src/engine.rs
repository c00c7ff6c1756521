//! The container runtime the launcher drives, behind [`Engine`]: Docker ([`DockerEngine`]),
//! or a stand-in where a simulation runs thousands of launchers in one process.
//!
//! Containers carry the labels `viking.stack`, `viking.job`, `viking.instance` (what the
//! registrator names endpoints from) and `viking.spec` (the spec digest: a container whose
//! digest differs from its assignment's is replaced). Docker's own restart policy restarts a
//! crashed container (`unless-stopped` for `restart: always`, `on-failure`, or `no`), so a crash
//! is healed even while etcd is away; the launcher starts what Docker does not.

use std::collections::HashMap;

use async_trait::async_trait;
use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, HostConfig, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
};
use futures_util::StreamExt;
use schema::{CommandSpec, HostId, JobSpec, Restart, ServiceId};

/// What a container is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    /// Created, restarting or paused: not serving, not finished.
    Starting,
    /// Stopped, with its exit code (`None` if never started).
    Exited(Option<i64>),
}

/// A viking container as the engine has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub id: String,
    pub name: String,
    pub service: ServiceId,
    pub instance: u32,
    /// Its `viking.spec` label.
    pub spec: String,
    pub state: RunState,
    /// Restarts by the engine's own policy.
    pub restarts: u32,
    /// Its `viking.host` label: the host whose launcher made it.
    pub host: Option<String>,
    /// Its health check's verdict, when its image (or spec) has one.
    pub health: Health,
}

/// What a container's health check says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Health {
    /// It has no health check.
    #[default]
    None,
    /// Not yet decided (Docker's `health: starting`).
    Starting,
    Healthy,
    Unhealthy,
}

impl Health {
    /// From Docker's status words (`Up 5 seconds (healthy)`).
    pub fn from_status(status: &str) -> Health {
        if status.contains("(health: starting)") {
            Health::Starting
        } else if status.contains("(unhealthy)") {
            Health::Unhealthy
        } else if status.contains("(healthy)") {
            Health::Healthy
        } else {
            Health::None
        }
    }

    /// Whether it may take traffic: healthy, or without a health check.
    pub fn passes(self) -> bool {
        matches!(self, Health::None | Health::Healthy)
    }
}

/// Why the engine refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EngineError(pub String);

/// The operations the launcher needs of a container runtime.
#[async_trait]
pub trait Engine: Send + Sync {
    /// Every container this host's launcher made (viking's labels), running or not.
    async fn list(&self) -> Result<Vec<Existing>, EngineError>;
    /// Creates and starts instance `instance` of `spec` (named `<stack>_<job>_<instance>`,
    /// labelled as made by `host`); returns its id.
    async fn start(
        &self,
        spec: &JobSpec,
        instance: u32,
        host: &HostId,
        name: &str,
    ) -> Result<String, EngineError>;
    /// Starts a stopped container again.
    async fn restart(&self, id: &str) -> Result<(), EngineError>;
    /// Removes a container (by id or name), running or not.
    async fn remove(&self, id: &str) -> Result<(), EngineError>;
    /// Stops a container gracefully (SIGTERM, then SIGKILL after `timeout`).
    async fn stop(&self, id: &str, timeout: std::time::Duration) -> Result<(), EngineError>;
    /// Gives a container another name.
    async fn rename(&self, id: &str, name: &str) -> Result<(), EngineError>;
    /// Its last few log lines, for a failure's reason.
    async fn last_logs(&self, id: &str) -> String;
}

/// Docker, through bollard: the containers of one host's launcher.
pub struct DockerEngine {
    docker: Docker,
    /// Only containers labelled with this host are listed (and inspected): a daemon shared
    /// with another cluster or with hand-run containers costs nothing.
    host: HostId,
}

impl DockerEngine {
    pub fn new(docker: Docker, host: HostId) -> Self {
        Self { docker, host }
    }
}

/// The Docker create body of instance `instance` of a job, made by `host`'s launcher.
pub fn container_config(spec: &JobSpec, instance: u32, host: &HostId) -> ContainerCreateBody {
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
            (schema::labels::SPEC.to_owned(), spec.digest()),
            (schema::labels::HOST.to_owned(), host.to_string()),
        ])
        .collect();
    let policy = match spec.restart_policy() {
        Restart::Always => RestartPolicyNameEnum::UNLESS_STOPPED,
        Restart::OnFailure => RestartPolicyNameEnum::ON_FAILURE,
        Restart::Never => RestartPolicyNameEnum::NO,
    };
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
                // Which host it runs on (the job's own env wins).
                .chain(
                    (!spec.env.contains_key("VIKING_HOST")).then(|| format!("VIKING_HOST={host}")),
                )
                .collect(),
        ),
        exposed_ports: Some(ports),
        volumes: (!volumes.is_empty()).then_some(volumes),
        labels: Some(labels),
        host_config: Some(HostConfig {
            port_bindings: Some(bindings),
            binds: (!binds.is_empty()).then_some(binds),
            restart_policy: Some(RestartPolicy {
                name: Some(policy),
                maximum_retry_count: None,
            }),
            ..HostConfig::default()
        }),
        ..ContainerCreateBody::default()
    }
}

fn refused(what: String) -> impl FnOnce(bollard::errors::Error) -> EngineError {
    move |e| EngineError(format!("Docker refused to {what}: {}", docker_message(&e)))
}

/// Docker's own words, without bollard's wrapping.
fn docker_message(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// `Exited (1) 5 seconds ago` -> 1.
fn exit_code(status: &str) -> Option<i64> {
    let rest = status.strip_prefix("Exited (")?;
    rest.split(')').next()?.parse().ok()
}

#[async_trait]
impl Engine for DockerEngine {
    async fn list(&self) -> Result<Vec<Existing>, EngineError> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![
                schema::labels::STACK.to_owned(),
                format!("{}={}", schema::labels::HOST, self.host),
            ],
        )]);
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(refused("list containers".into()))?;
        let mut out = Vec::with_capacity(list.len());
        for c in list {
            let labels = c.labels.unwrap_or_default();
            let (Some(id), Some(stack), Some(job), Some(instance)) = (
                c.id,
                labels.get(schema::labels::STACK),
                labels.get(schema::labels::JOB),
                labels
                    .get(schema::labels::INSTANCE)
                    .and_then(|i| i.parse().ok()),
            ) else {
                continue;
            };
            let (Ok(stack), Ok(job)) = (stack.parse(), job.parse()) else {
                continue;
            };
            let state = match c.state {
                Some(ContainerSummaryStateEnum::RUNNING) => RunState::Running,
                Some(ContainerSummaryStateEnum::EXITED | ContainerSummaryStateEnum::DEAD) => {
                    RunState::Exited(c.status.as_deref().and_then(exit_code))
                }
                Some(ContainerSummaryStateEnum::CREATED) => RunState::Exited(None),
                _ => RunState::Starting,
            };
            // The restart count is only in the inspect answer (one request a container).
            let restarts = if state == RunState::Exited(None) {
                0
            } else {
                self.docker
                    .inspect_container(&id, None)
                    .await
                    .ok()
                    .and_then(|i| i.restart_count)
                    .map_or(0, |n| u32::try_from(n).unwrap_or(0))
            };
            out.push(Existing {
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .unwrap_or_default(),
                id,
                service: ServiceId::new(stack, job),
                instance,
                spec: labels
                    .get(schema::labels::SPEC)
                    .cloned()
                    .unwrap_or_default(),
                state,
                restarts,
                host: labels.get(schema::labels::HOST).cloned(),
                health: c
                    .status
                    .as_deref()
                    .map_or(Health::None, Health::from_status),
            });
        }
        Ok(out)
    }

    async fn start(
        &self,
        spec: &JobSpec,
        instance: u32,
        host: &HostId,
        name: &str,
    ) -> Result<String, EngineError> {
        let name = name.to_owned();
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                container_config(spec, instance, host),
            )
            .await
            .map_err(refused(format!("create {name} from image {}", spec.image)))?;
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            // Leave nothing half-made behind: the next attempt creates it again.
            let _ = self.remove(&created.id).await;
            return Err(refused(format!("start {name}"))(e));
        }
        Ok(created.id)
    }

    async fn restart(&self, id: &str) -> Result<(), EngineError> {
        self.docker
            .start_container(id, None)
            .await
            .map_err(refused("start a container".into()))
    }

    async fn remove(&self, id: &str) -> Result<(), EngineError> {
        match self
            .docker
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            // Gone already (removed by hand, or by a race with Docker's own clean-up).
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(refused("remove a container".into())(e)),
        }
    }

    async fn stop(&self, id: &str, timeout: std::time::Duration) -> Result<(), EngineError> {
        let t = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX);
        // Docker answers once the container has exited, up to `timeout` from now: the
        // client's own 10 s limit would cut a longer stop short.
        match self
            .docker
            .clone()
            .with_timeout(timeout + std::time::Duration::from_secs(10))
            .stop_container(
                id,
                Some(bollard::query_parameters::StopContainerOptions {
                    t: Some(t),
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            // Not running (304) or gone (404): stopped all the same.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304 | 404,
                ..
            }) => Ok(()),
            Err(e) => Err(refused("stop a container".into())(e)),
        }
    }

    async fn rename(&self, id: &str, name: &str) -> Result<(), EngineError> {
        self.docker
            .rename_container(
                id,
                bollard::query_parameters::RenameContainerOptions {
                    name: name.to_owned(),
                },
            )
            .await
            .map_err(refused(format!("rename a container to {name}")))
    }

    async fn last_logs(&self, id: &str) -> String {
        let mut stream = self.docker.logs(
            id,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                tail: "5".into(),
                ..Default::default()
            }),
        );
        let mut text = String::new();
        while let Some(Ok(chunk)) = stream.next().await {
            text.push_str(&chunk.to_string());
        }
        text.trim().lines().collect::<Vec<_>>().join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_come_from_dockers_status_text() {
        assert_eq!(exit_code("Exited (1) 5 seconds ago"), Some(1));
        assert_eq!(exit_code("Exited (137) About a minute ago"), Some(137));
        assert_eq!(exit_code("Up 3 seconds"), None);
    }
}
