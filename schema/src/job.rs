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

    /// Checks a spec read from etcd with the rules a stack file follows (a key edited by
    /// hand deserves the same): the image, the scale, env names and values, export_env, ports.
    pub fn check(&self) -> Result<(), String> {
        check_image(&self.image)?;
        if self.scale > MAX_SCALE {
            return Err(format!(
                "scale {} is out of range 0-{MAX_SCALE}",
                self.scale
            ));
        }
        for (k, v) in self.env.iter().chain(&self.link_env) {
            if !is_env_name(k) {
                return Err(format!(
                    "env name {k:?} is not letters, digits and '_' (not starting with a digit)"
                ));
            }
            if v.contains('\0') {
                return Err(format!("env {k} holds a NUL character"));
            }
        }
        if let Some(x) = self.export_env.iter().find(|x| !self.env.contains_key(*x)) {
            return Err(format!("export_env names {x:?}, which is not in its env"));
        }
        if let Some(p) = self.ports.iter().find(|p| p.port == 0) {
            return Err(format!("port {p} is not 1-65535"));
        }
        Ok(())
    }

    /// The container env: the link vars, then the job's own (which win on a clash).
    pub fn container_env(&self) -> BTreeMap<String, String> {
        let mut env = self.link_env.clone();
        env.extend(self.env.clone());
        env
    }
}

/// The largest `scale` accepted: beyond it is a typo more often than a plan.
pub const MAX_SCALE: u32 = 1000;

/// Checks a Docker image reference: `[HOST[:PORT]/]NAME[/NAME...][:TAG][@DIGEST]`, each name of
/// lower-case letters and digits joined by `.`, `_`, `__` or `-`. The error says what is wrong
/// (a flag such as `--privileged`, white space, upper case) and the rule.
pub fn check_image(image: &str) -> Result<(), String> {
    let rule = "an image is [HOST[:PORT]/]NAME[:TAG][@sha256:DIGEST] with names of lower-case \
                letters, digits and '.', '_', '-' inside, e.g. mongo:4.4 or reg:5000/team/api";
    let bad = |why: &str| Err(format!("image {image:?} {why}; {rule}"));
    if image.is_empty() {
        return bad("is empty");
    }
    if image.starts_with('-') {
        return bad("starts with '-' (it would be read as a flag)");
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("holds white space or a control character");
    }
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        let ok = d.split_once(':').is_some_and(|(alg, hex)| {
            !alg.is_empty()
                && alg
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                && hex.len() >= 32
                && hex.chars().all(|c| c.is_ascii_hexdigit())
        });
        if !ok {
            return bad("has a digest that is not ALGORITHM:HEX");
        }
    }
    let mut parts: Vec<&str> = rest.split('/').collect();
    // A first part with '.', ':' or "localhost" is a registry host.
    if parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost") {
        let host = parts.remove(0);
        let (name, port) = host.split_once(':').unwrap_or((host, ""));
        let host_ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            && (port.is_empty() || port.parse::<u16>().is_ok_and(|p| p > 0));
        if !host_ok {
            return bad("has a registry host that is not HOST[:PORT]");
        }
    }
    let last = parts.len() - 1;
    let (path_end, tag) = match parts[last].split_once(':') {
        Some((n, t)) => (n, Some(t)),
        None => (parts[last], None),
    };
    parts[last] = path_end;
    if let Some(t) = tag {
        let ok = !t.is_empty()
            && t.len() <= 128
            && t.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !ok {
            return bad("has a tag that is not 1-128 of letters, digits, '_', '.', '-'");
        }
    }
    for name in &parts {
        let ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            && name
                .chars()
                .last()
                .is_some_and(|c| c.is_ascii_alphanumeric());
        if !ok {
            return bad(if name.chars().any(|c| c.is_ascii_uppercase()) {
                "has upper-case letters in a name"
            } else {
                "has a name that is not lower-case letters and digits joined by '.', '_', '-'"
            });
        }
    }
    Ok(())
}

/// An env variable name as a shell and Docker take it: letters, digits and `_`, not starting
/// with a digit.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
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
    fn image_references_follow_dockers_rule_and_the_error_says_why() {
        for ok in [
            "busybox",
            "mongo:4.4",
            "viking/busybox",
            "reg:5000/team/api:v1.2-rc_3",
            "localhost/x",
            "ghcr.io/a/b",
            "a@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(check_image(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("--privileged", "starts with '-'"),
            ("my image", "white space"),
            ("a\nb", "white space or a control"),
            ("Mongo", "upper-case"),
            ("mongo:", "tag"),
            ("", "is empty"),
            ("a//b", "name that is not"),
        ] {
            let e = check_image(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_spec_from_etcd_is_checked_like_a_stack_file() {
        let stack = StackName::new("app").unwrap();
        let good = JobSpec::new(stack, JobName::new("web").unwrap(), "busybox");
        assert_eq!(good.check(), Ok(()));
        let mut big = good.clone();
        big.scale = 5000;
        assert!(big.check().unwrap_err().contains("scale 5000"));
        let mut env = good.clone();
        env.env.insert("A=B".into(), "1".into());
        assert!(env.check().unwrap_err().contains("\"A=B\""));
        let mut nul = good.clone();
        nul.env.insert("A".into(), "x\0y".into());
        assert!(nul.check().unwrap_err().contains("NUL"));
        let mut empty = good;
        empty.image = String::new();
        assert!(empty.check().unwrap_err().contains("is empty"));
    }

    #[test]
    fn container_names_join_stack_job_and_instance() {
        let stack = StackName::new("app").unwrap();
        let job = JobName::new("web").unwrap();
        assert_eq!(container_name(&stack, &job, 2), "app_web_2");
    }
}
