//! A job as deployed: what `viking deploy` writes to `stacks/<stack>/jobs/<job>` and
//! `viking run` starts, and the names and labels of the containers that run it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::records::RECORD_VERSION;
use crate::{HostId, JobName, Proto, ServiceId, StackName};

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
    /// A long-running job (restarted) or a task (runs once to completion).
    #[serde(rename = "type", default, skip_serializing_if = "JobKind::is_job")]
    pub kind: JobKind,
    /// When the launcher starts a stopped container again; `None` takes the kind's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<Restart>,
    /// What each instance reserves on its host.
    #[serde(default, skip_serializing_if = "Resources::is_none")]
    pub resources: Resources,
    /// Where instances may run.
    #[serde(default, skip_serializing_if = "Placement::is_anywhere")]
    pub placement: Placement,
    /// How a changed spec rolls out.
    #[serde(default, skip_serializing_if = "UpdatePolicy::is_default")]
    pub update: UpdatePolicy,
    /// Domains the router sends to this job (each also a `routes/<domain>` key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<crate::Domain>,
    /// The TCP port that speaks HTTP for `domains`; `None`: the first TCP port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_port: Option<u16>,
    /// Requests over plain HTTP for `domains` get a 308 to HTTPS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub https_redirect: bool,
}

/// `type:` in a stack file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Long-running; restarted when it stops (the design notes' only type).
    #[default]
    Job,
    /// Runs once to completion; its exit status is reported.
    Task,
}

impl JobKind {
    pub fn is_job(&self) -> bool {
        *self == JobKind::Job
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JobKind::Job => "job",
            JobKind::Task => "task",
        })
    }
}

/// `restart:` in a stack file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Whenever it stops (a job's default).
    Always,
    /// When it exits with a code other than 0.
    OnFailure,
    /// Never (a task's default).
    Never,
}

/// Reservations of one instance: the scheduler never places more on a host than it offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// Thousandths of a core.
    #[serde(default)]
    pub cpus_milli: u64,
    /// Bytes.
    #[serde(default)]
    pub memory: u64,
}

impl Resources {
    pub fn is_none(&self) -> bool {
        *self == Resources::default()
    }
}

/// Constraints on where a job's instances run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Only hosts with every one of these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Only these hosts (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostId>,
    /// At most this many instances on one host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_host: Option<u32>,
}

impl Placement {
    pub fn is_anywhere(&self) -> bool {
        *self == Placement::default()
    }
}

/// How a changed spec rolls out over the instances (used by rolling updates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdatePolicy {
    /// Instances replaced at once.
    pub max_parallel: u32,
    /// How long a new instance must run before the next one is replaced, in milliseconds.
    pub min_healthy_ms: u64,
    /// How long one replacement may take before the update stops, in milliseconds.
    pub timeout_ms: u64,
    /// An update that stops (an instance past `timeout_ms`) puts the previous spec back, as
    /// `viking rollback` does, while instances of that spec still serve.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_revert: bool,
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        Self {
            max_parallel: 1,
            min_healthy_ms: 0,
            timeout_ms: 120_000,
            auto_revert: false,
        }
    }
}

impl UpdatePolicy {
    pub fn is_default(&self) -> bool {
        *self == UpdatePolicy::default()
    }
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
            kind: JobKind::Job,
            restart: None,
            resources: Resources::default(),
            placement: Placement::default(),
            update: UpdatePolicy::default(),
            domains: Vec::new(),
            http_port: None,
            https_redirect: false,
        }
    }

    /// The port HTTP requests for `domains` go to: `http_port`, else the first TCP port.
    pub fn web_port(&self) -> Option<u16> {
        self.http_port.or_else(|| {
            self.ports
                .iter()
                .find(|p| p.proto == Proto::Tcp)
                .map(|p| p.port)
        })
    }

    /// The restart policy in force: the one set, else `always` for a job and `never` for a
    /// task.
    pub fn restart_policy(&self) -> Restart {
        self.restart.unwrap_or(match self.kind {
            JobKind::Job => Restart::Always,
            JobKind::Task => Restart::Never,
        })
    }

    /// The digest of what makes a job's container (label `viking.spec`): everything but
    /// `scale`, `order`, `resources`, `placement` and `update`, so scaling, moving or
    /// re-tuning a job does not replace its running instances. A spec without the grid's
    /// fields digests as it did before they existed.
    pub fn digest(&self) -> String {
        let mut s = self.clone();
        s.scale = 1;
        s.order = 0;
        s.resources = Resources::default();
        s.placement = Placement::default();
        s.update = UpdatePolicy::default();
        // Routing is the router's business: a new domain does not replace containers.
        s.domains = Vec::new();
        s.http_port = None;
        s.https_redirect = false;
        crate::records::digest(&serde_json::to_string(&s).expect("serializable"))
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
        if self.placement.max_per_host == Some(0) {
            return Err(
                "placement.max_per_host 0 places nothing; leave it out or use 1 or more".to_owned(),
            );
        }
        if !self.domains.is_empty() {
            match self.web_port() {
                None => {
                    return Err("it lists domains but has no TCP port to send them to; add \
                                one under ports (or http_port)"
                        .to_owned());
                }
                Some(p)
                    if !self.ports.contains(&PortSpec {
                        port: p,
                        proto: Proto::Tcp,
                    }) =>
                {
                    return Err(format!(
                        "http_port {p} is not one of its TCP ports; list {p} under ports"
                    ));
                }
                Some(_) => {}
            }
        }
        if self.update.max_parallel == 0 {
            return Err("update.max_parallel 0 updates nothing; use 1 or more".to_owned());
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

/// Parses a memory size as Docker takes it: a number of bytes, or with a unit `k`, `m`, `g`,
/// `t` (also `K`, `KB`, `KiB`, ...; all powers of 1024): `256M`, `1.5g`, `512MiB`.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        format!(
            "invalid memory size {text:?}: write a number of bytes or one with a unit k, m, g or \
             t (powers of 1024), e.g. 256M or 1.5G"
        )
    };
    let value: f64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    let bytes = value * 2f64.powi(shift);
    if !bytes.is_finite() || !(0.0..=1e18).contains(&bytes) {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// Shows a memory size in the largest unit that keeps it whole to a tenth: `256M`, `1.5G`.
pub fn format_memory(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    for (size, unit) in UNITS {
        if bytes >= size {
            let v = bytes as f64 / size as f64;
            return if (v - v.round()).abs() < 0.05 {
                format!("{}{unit}", v.round())
            } else {
                format!("{v:.1}{unit}")
            };
        }
    }
    format!("{bytes}B")
}

/// Parses a CPU count (`0.5`, `2`) into thousandths of a core, at most 4096 cores.
pub fn parse_cpus(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "invalid CPU count {text:?}: write a number of cores above 0 and at most 4096, e.g. 0.5 or 2"
        )
    };
    let v: f64 = text.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v <= 0.0 || v > 4096.0 {
        return Err(bad());
    }
    Ok(((v * 1000.0).round() as u64).max(1))
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
    /// The host whose launcher made it: a launcher removes only its own containers, never
    /// those of another cluster's launcher or of a hand-run `docker run` sharing the daemon.
    pub const HOST: &str = "viking.host";
    /// Services (`stack/job`, comma-separated) a container started by other means may reach
    /// under link-scoped access.
    pub const LINKS: &str = "viking.links";
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
    fn memory_and_cpus_parse_as_docker_takes_them() {
        assert_eq!(parse_memory("256M"), Ok(256 << 20));
        assert_eq!(parse_memory("1.5g"), Ok(3 << 29));
        assert_eq!(parse_memory("512MiB"), Ok(512 << 20));
        assert_eq!(parse_memory("1024"), Ok(1024));
        assert_eq!(parse_memory("2T"), Ok(2 << 40));
        for bad in ["", "M", "-1G", "12 parsecs", "1e30"] {
            assert!(
                parse_memory(bad)
                    .unwrap_err()
                    .contains("invalid memory size"),
                "{bad}"
            );
        }
        assert_eq!(format_memory(256 << 20), "256M");
        assert_eq!(format_memory(3 << 29), "1.5G");
        assert_eq!(parse_cpus("0.5"), Ok(500));
        assert_eq!(parse_cpus("2"), Ok(2000));
        for bad in ["0", "-1", "x", "NaN", "5000"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_digest_ignores_what_does_not_make_the_container() {
        let stack = StackName::new("app").unwrap();
        let one = JobSpec::new(stack, JobName::new("web").unwrap(), "busybox");
        let mut moved = one.clone();
        moved.scale = 4;
        moved.resources.memory = 1 << 30;
        moved.placement.max_per_host = Some(1);
        moved.update.max_parallel = 2;
        assert_eq!(one.digest(), moved.digest());
        let mut task = one.clone();
        task.kind = JobKind::Task;
        assert_ne!(one.digest(), task.digest());
        // The grid's fields are left out of the JSON when unset, so older digests hold.
        let json = serde_json::to_value(&one).unwrap();
        for field in ["type", "restart", "resources", "placement", "update"] {
            assert!(json.get(field).is_none(), "{field} in {json}");
        }
    }

    #[test]
    fn container_names_join_stack_job_and_instance() {
        let stack = StackName::new("app").unwrap();
        let job = JobName::new("web").unwrap();
        assert_eq!(container_name(&stack, &job, 2), "app_web_2");
    }
}
