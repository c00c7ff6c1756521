//! A job as deployed: what `viking deploy` writes to `stacks/<stack>/jobs/<job>` and
//! `viking run` starts, and the names and labels of the containers that run it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::records::RECORD_VERSION;
use crate::{JobName, Proto, ServiceId, StackName};

fn current() -> u32 {
    RECORD_VERSION
}

fn one() -> u32 {
    1
}

/// A port a job exposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortSpec {
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.proto)
    }
}

/// The command a container runs: a shell string or an exec list, as in Docker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CommandSpec {
    Shell(String),
    Exec(Vec<String>),
}

/// A link as compiled: where it points and through which ambassador ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkSpec {
    /// As written: `shared/mongo` or `middleware`.
    pub alias: String,
    /// The linked service.
    pub service: ServiceId,
    /// The env prefix, e.g. `SHARED_MONGO`.
    pub prefix: String,
    pub ports: Vec<LinkPortSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkPortSpec {
    pub port: u16,
    pub proto: Proto,
    pub ambassador_port: u16,
}

/// `stacks/<stack>/jobs/<job>`: a compiled job, what `viking run` starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    #[serde(default = "current")]
    pub v: u32,
    pub stack: StackName,
    pub job: JobName,
    pub image: String,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub volumes: Vec<String>,
    #[serde(default)]
    pub links: Vec<LinkSpec>,
    #[serde(default = "one")]
    pub scale: u32,
    /// The job's own env.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Which of `env` linked containers see as `<P>_ENV_<VAR>`.
    #[serde(default)]
    pub export_env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandSpec>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Start position in the stack: linked-to jobs come first.
    #[serde(default)]
    pub order: u32,
    /// The docker-link env of every link.
    #[serde(default)]
    pub link_env: BTreeMap<String, String>,
}

impl JobSpec {
    /// A job of one instance of `image` with nothing else set.
    pub fn new(stack: StackName, job: JobName, image: impl Into<String>) -> Self {
        Self {
            v: RECORD_VERSION,
            stack,
            job,
            image: image.into(),
            ports: Vec::new(),
            volumes: Vec::new(),
            links: Vec::new(),
            scale: 1,
            env: BTreeMap::new(),
            export_env: Vec::new(),
            command: None,
            labels: BTreeMap::new(),
            order: 0,
            link_env: BTreeMap::new(),
        }
    }

    pub fn service(&self) -> ServiceId {
        ServiceId::new(self.stack.clone(), self.job.clone())
    }

    /// The container env: the link vars, then the job's own (which win on a clash).
    pub fn container_env(&self) -> BTreeMap<String, String> {
        let mut env = self.link_env.clone();
        env.extend(self.env.clone());
        env
    }
}

/// The Docker labels viking puts on the containers it starts; the registrator names endpoints
/// from the first two (with `SERVICE_NAME`-style env as the fallback for others' containers).
pub mod labels {
    /// The stack of the job the container runs.
    pub const STACK: &str = "viking.stack";
    /// The job the container runs.
    pub const JOB: &str = "viking.job";
    /// Its instance number within the job, from 0.
    pub const INSTANCE: &str = "viking.instance";
    /// A digest of the job spec it was made from (all but scale and order): a different one
    /// means the container is replaced.
    pub const SPEC: &str = "viking.spec";
}

/// The container name of instance `i` of a job: `<stack>_<job>_<i>`.
pub fn container_name(stack: &StackName, job: &JobName, i: u32) -> String {
    format!("{stack}_{job}_{i}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_names_its_service_as_stack_slash_job_in_json() {
        let link = LinkSpec {
            alias: "db".into(),
            service: "shared/mongo".parse().unwrap(),
            prefix: "DB".into(),
            ports: vec![],
        };
        let json = serde_json::to_value(&link).unwrap();
        assert_eq!(json["service"], "shared/mongo");
        let back: LinkSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, link);
        let bad = serde_json::json!({"alias": "x", "service": "Bad/x", "prefix": "X", "ports": []});
        assert!(serde_json::from_value::<LinkSpec>(bad).is_err());
    }

    #[test]
    fn container_names_join_stack_job_and_instance() {
        let stack = StackName::new("app").unwrap();
        let job = JobName::new("web").unwrap();
        assert_eq!(container_name(&stack, &job, 2), "app_web_2");
    }
}
