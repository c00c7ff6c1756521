//! Stack files: the design notes' YAML (or JSON) shape, parsed strictly, every error with
//! `file:line:column`.
//!
//! Top-level keys are job names; each job has `type` (`job` or `task`), `image`, `ports`,
//! `volume`, `link`, `scale`, `env`, `export_env`, `command`, and for the grid `restart`,
//! `resources`, `placement` and `update`. The design notes indent with tabs, which
//! YAML forbids: a file indented consistently with tabs is read as one tab per level; a file
//! that mixes tabs and spaces in its indentation is an error that says where.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

pub use schema::{CommandSpec, PortSpec};
use schema::{
    HostId, JobKind, JobName, Placement, Proto, Resources, Restart, ServiceId, StackName,
    UpdatePolicy,
};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

/// A place in a source file, shown as `file:line:column`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub file: String,
    pub line: u64,
    pub column: u64,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// An error in a stack file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pos}: {message}")]
pub struct ParseError {
    pub pos: Pos,
    pub message: String,
}

/// A link as written: `shared/mongo` (another stack) or `middleware` (this stack).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkDef {
    pub alias: String,
    pub target: ServiceId,
    pub at: Pos,
}

/// One job of a stack file, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDef {
    pub name: JobName,
    pub at: Pos,
    pub image: String,
    pub ports: Vec<PortSpec>,
    pub volumes: Vec<String>,
    pub links: Vec<LinkDef>,
    pub scale: u32,
    pub env: BTreeMap<String, String>,
    pub export_env: Vec<String>,
    pub command: Option<CommandSpec>,
    pub kind: JobKind,
    pub restart: Option<Restart>,
    pub resources: Resources,
    pub placement: Placement,
    pub update: UpdatePolicy,
    /// Domains the router sends to this job.
    pub domains: Vec<(schema::Domain, Pos)>,
    pub http_port: Option<u16>,
    pub https_redirect: bool,
}

/// A parsed stack: its jobs in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackFile {
    pub name: StackName,
    pub path: String,
    /// A digest of the source text, to tell a re-deploy of the same file.
    pub digest: String,
    pub jobs: Vec<JobDef>,
}

pub use schema::MAX_SCALE;

#[derive(Deserialize)]
#[serde(untagged)]
enum PortValue {
    Number(i64),
    Text(String),
}

#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    fn text(self) -> String {
        match self {
            Scalar::Text(s) => s,
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EnvValue {
    Map(BTreeMap<String, Scalar>),
    List(Vec<String>),
}

/// A job as written. Unknown keys are errors that list the known ones.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    #[serde(rename = "type", default)]
    kind: Option<Spanned<String>>,
    image: Option<Spanned<String>>,
    #[serde(default)]
    ports: Vec<Spanned<PortValue>>,
    #[serde(default)]
    volume: Vec<String>,
    #[serde(default)]
    link: Vec<Spanned<String>>,
    #[serde(default)]
    scale: Option<Spanned<i64>>,
    #[serde(default)]
    env: Option<Spanned<EnvValue>>,
    #[serde(default)]
    export_env: Vec<Spanned<String>>,
    #[serde(default)]
    command: Option<CommandSpec>,
    #[serde(default)]
    restart: Option<Spanned<String>>,
    #[serde(default)]
    resources: Option<Spanned<RawResources>>,
    #[serde(default)]
    placement: Option<Spanned<RawPlacement>>,
    #[serde(default)]
    update: Option<Spanned<RawUpdate>>,
    #[serde(default)]
    domains: Vec<Spanned<String>>,
    #[serde(default)]
    http_port: Option<Spanned<i64>>,
    #[serde(default)]
    https_redirect: Option<bool>,
}

/// `resources: {cpus: 0.5, memory: 256M}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    #[serde(default)]
    cpus: Option<Spanned<Scalar>>,
    #[serde(default)]
    memory: Option<Spanned<Scalar>>,
}

/// `placement: {labels: {role: db}, hosts: [node-1], max_per_host: 1}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlacement {
    #[serde(default)]
    labels: HashMap<Spanned<String>, Scalar>,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
    #[serde(default)]
    max_per_host: Option<Spanned<i64>>,
}

/// `update: {max_parallel: 1, min_healthy: 5s, timeout: 2m, auto_revert: false}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpdate {
    #[serde(default)]
    max_parallel: Option<Spanned<i64>>,
    #[serde(default)]
    min_healthy: Option<Spanned<Scalar>>,
    #[serde(default)]
    timeout: Option<Spanned<Scalar>>,
    #[serde(default)]
    auto_revert: Option<bool>,
}

/// The job keys a stack file may use, for messages.
pub const JOB_KEYS: &str = "type, image, ports, volume, link, scale, env, export_env, command, \
                            restart, resources, placement, update, domains, http_port, \
                            https_redirect";

/// Parses the text of one stack file (`path` is only for messages).
pub fn parse(name: StackName, path: &str, text: &str) -> Result<StackFile, ParseError> {
    let (yaml, tabs) = untab(path, text)?;
    let at = |loc: &serde_saphyr::Location| pos(path, &tabs, loc.line(), loc.column());
    let raw: HashMap<Spanned<String>, Spanned<RawJob>> = if yaml.trim().is_empty() {
        HashMap::new()
    } else {
        serde_saphyr::from_str(&yaml).map_err(|e| yaml_error(path, &tabs, &e))?
    };
    if raw.is_empty() {
        return Err(ParseError {
            pos: pos(path, &tabs, 1, 1),
            message: "the stack file has no jobs; write one top-level key per job, e.g. `web:` \
                      with `image:` below it"
                .into(),
        });
    }
    let mut entries: Vec<(Spanned<String>, Spanned<RawJob>)> = raw.into_iter().collect();
    entries.sort_by_key(|(k, _)| (k.referenced.line(), k.referenced.column()));
    let mut jobs = Vec::with_capacity(entries.len());
    for (key, job) in entries {
        let job_at = at(&key.referenced);
        let name = JobName::new(key.value.as_str()).map_err(|e| ParseError {
            pos: job_at.clone(),
            message: e.to_string(),
        })?;
        jobs.push(check_job(&name, job_at, job.value, &at)?);
    }
    Ok(StackFile {
        name,
        path: path.to_owned(),
        digest: digest(text),
        jobs,
    })
}

fn check_job(
    name: &JobName,
    job_at: Pos,
    raw: RawJob,
    at: &dyn Fn(&serde_saphyr::Location) -> Pos,
) -> Result<JobDef, ParseError> {
    let err = |pos: Pos, message: String| ParseError { pos, message };
    let kind = match &raw.kind {
        None => JobKind::Job,
        Some(k) if k.value == "job" => JobKind::Job,
        Some(k) if k.value == "task" => JobKind::Task,
        Some(k) => {
            return Err(err(
                at(&k.referenced),
                format!(
                    "job {name}: unknown type {:?}; write `job` (long-running, restarted: the \
                     default) or `task` (runs once to completion)",
                    k.value
                ),
            ));
        }
    };
    let restart = match &raw.restart {
        None => None,
        Some(r) => Some(match r.value.as_str() {
            "always" => Restart::Always,
            "on-failure" => Restart::OnFailure,
            "never" => Restart::Never,
            other => {
                return Err(err(
                    at(&r.referenced),
                    format!(
                        "job {name}: unknown restart {other:?}; write always, on-failure or never"
                    ),
                ));
            }
        }),
    };
    let resources = match raw.resources {
        None => Resources::default(),
        Some(r) => {
            let mut out = Resources::default();
            if let Some(c) = r.value.cpus {
                out.cpus_milli = schema::parse_cpus(&c.value.text()).map_err(|e| {
                    err(
                        at(&c.referenced),
                        format!("job {name}: resources.cpus: {e}"),
                    )
                })?;
            }
            if let Some(m) = r.value.memory {
                out.memory = schema::parse_memory(&m.value.text()).map_err(|e| {
                    err(
                        at(&m.referenced),
                        format!("job {name}: resources.memory: {e}"),
                    )
                })?;
            }
            out
        }
    };
    let placement = match raw.placement {
        None => Placement::default(),
        Some(p) => {
            let mut out = Placement::default();
            let mut labels: Vec<(Spanned<String>, Scalar)> = p.value.labels.into_iter().collect();
            labels.sort_by_key(|(k, _)| (k.referenced.line(), k.referenced.column()));
            for (k, v) in labels {
                let v = v.text();
                if !is_label(&k.value) || !is_label_value(&v) {
                    return Err(err(
                        at(&k.referenced),
                        format!(
                            "job {name}: placement label {}={v:?} is not a label: names and \
                             values are letters, digits, '.', '_', '-' (names start with a \
                             letter), at most 63 each",
                            k.value
                        ),
                    ));
                }
                out.labels.insert(k.value, v);
            }
            for h in p.value.hosts {
                let host = HostId::new(h.value.as_str()).map_err(|e| {
                    err(
                        at(&h.referenced),
                        format!("job {name}: placement.hosts: {e}"),
                    )
                })?;
                if out.hosts.contains(&host) {
                    return Err(err(
                        at(&h.referenced),
                        format!("job {name}: placement.hosts lists {host} twice"),
                    ));
                }
                out.hosts.push(host);
            }
            if let Some(m) = p.value.max_per_host {
                if !(1..=i64::from(MAX_SCALE)).contains(&m.value) {
                    return Err(err(
                        at(&m.referenced),
                        format!(
                            "job {name}: placement.max_per_host {} is out of range 1-{MAX_SCALE}",
                            m.value
                        ),
                    ));
                }
                out.max_per_host = Some(m.value as u32);
            }
            out
        }
    };
    let update = match raw.update {
        None => UpdatePolicy::default(),
        Some(u) => {
            let mut out = UpdatePolicy::default();
            if let Some(m) = u.value.max_parallel {
                if !(1..=i64::from(MAX_SCALE)).contains(&m.value) {
                    return Err(err(
                        at(&m.referenced),
                        format!(
                            "job {name}: update.max_parallel {} is out of range 1-{MAX_SCALE}",
                            m.value
                        ),
                    ));
                }
                out.max_parallel = m.value as u32;
            }
            let millis = |d: Spanned<Scalar>, what: &str| -> Result<u64, ParseError> {
                let text = d.value.text();
                runtime::etcd::parse_duration(&text)
                    .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64)
                    .map_err(|e| err(at(&d.referenced), format!("job {name}: update.{what}: {e}")))
            };
            if let Some(d) = u.value.min_healthy {
                out.min_healthy_ms = millis(d, "min_healthy")?;
            }
            if let Some(d) = u.value.timeout {
                let (place, text) = (at(&d.referenced), d.value.clone().text());
                out.timeout_ms = millis(d, "timeout")?;
                if out.timeout_ms < 1000 {
                    return Err(err(
                        place,
                        format!(
                            "job {name}: update.timeout {text} is too short: a new instance \
                             needs time to start and pass its health check; use at least 1s \
                             (the default is 2m)"
                        ),
                    ));
                }
            }
            out.auto_revert = u.value.auto_revert.unwrap_or(false);
            out
        }
    };
    let image = match raw.image {
        Some(i) => match schema::check_image(&i.value) {
            Ok(()) => i.value,
            Err(why) => return Err(err(at(&i.referenced), format!("job {name}: {why}"))),
        },
        None => {
            return Err(err(
                job_at,
                format!("job {name} has no image; add `image: NAME[:TAG]`"),
            ));
        }
    };
    let mut ports = Vec::new();
    let mut seen_ports = BTreeSet::new();
    for p in raw.ports {
        let text = match &p.value {
            PortValue::Number(n) => n.to_string(),
            PortValue::Text(s) => s.clone(),
        };
        let (num, proto) = match text.split_once('/') {
            Some((n, proto)) => (n, proto.parse::<Proto>().ok()),
            None => (text.as_str(), Some(Proto::Tcp)),
        };
        let port = schema::service::parse_port(num);
        let (Some(port), Some(proto)) = (port, proto) else {
            return Err(err(
                at(&p.referenced),
                format!(
                    "job {name}: invalid port {text:?}; write PORT or \"PORT/udp\" with PORT 1-65535, e.g. 27017 or \"53/udp\""
                ),
            ));
        };
        let spec = PortSpec { port, proto };
        if !seen_ports.insert(spec) {
            return Err(err(
                at(&p.referenced),
                format!("job {name}: port {spec} is listed twice"),
            ));
        }
        ports.push(spec);
    }
    let mut links = Vec::new();
    for l in raw.link {
        let link_at = at(&l.referenced);
        let alias = l.value.trim().to_owned();
        let bad = |e: String| {
            err(
                link_at.clone(),
                format!("job {name}: invalid link {alias:?}: {e}"),
            )
        };
        if let Some((to, _)) = alias.split_once(':') {
            return Err(bad(format!(
                "a link names a job, and gets every port it exposes: write {to:?}"
            )));
        }
        let target = match alias.split_once('/') {
            Some((stack, job)) => ServiceId::new(
                StackName::new(stack).map_err(|e| bad(e.to_string()))?,
                JobName::new(job).map_err(|e| bad(e.to_string()))?,
            ),
            None => ServiceId::new(
                // Filled in with this stack's name by `parse`'s caller through `resolve_stack`.
                StackName::new("self").expect("valid"),
                JobName::new(alias.as_str()).map_err(|e| bad(e.to_string()))?,
            ),
        };
        if links.iter().any(|x: &LinkDef| x.alias == alias) {
            return Err(err(
                link_at,
                format!("job {name}: link {alias:?} is listed twice"),
            ));
        }
        links.push(LinkDef {
            alias,
            target,
            at: link_at,
        });
    }
    let scale = match raw.scale {
        None => 1,
        Some(s) if (0..=i64::from(MAX_SCALE)).contains(&s.value) => s.value as u32,
        Some(s) => {
            return Err(err(
                at(&s.referenced),
                format!(
                    "job {name}: scale {} is out of range 0-{MAX_SCALE}",
                    s.value
                ),
            ));
        }
    };
    let mut env = BTreeMap::new();
    if let Some(e) = raw.env {
        let env_at = at(&e.referenced);
        let pairs: Vec<(String, String)> = match e.value {
            EnvValue::Map(m) => m.into_iter().map(|(k, v)| (k, v.text())).collect(),
            EnvValue::List(l) => {
                let mut pairs = Vec::new();
                for item in l {
                    let Some((k, v)) = item.split_once('=') else {
                        return Err(err(
                            env_at,
                            format!("job {name}: env entry {item:?} is not KEY=VALUE"),
                        ));
                    };
                    pairs.push((k.to_owned(), v.to_owned()));
                }
                pairs
            }
        };
        for (k, v) in pairs {
            if !is_env_name(&k) {
                return Err(err(
                    env_at,
                    format!(
                        "job {name}: invalid env name {k:?}; use letters, digits and '_', not starting with a digit"
                    ),
                ));
            }
            if v.contains('\0') {
                return Err(err(
                    env_at,
                    format!("job {name}: env {k} holds a NUL character"),
                ));
            }
            if let Some(old) = env.insert(k.clone(), v) {
                return Err(err(
                    env_at,
                    format!("job {name}: env {k} is set twice ({old:?} first); keep one of them"),
                ));
            }
        }
    }
    let mut export_env = Vec::new();
    for x in raw.export_env {
        if !env.contains_key(&x.value) {
            return Err(err(
                at(&x.referenced),
                format!(
                    "job {name}: export_env names {:?}, which is not in its env; add it under env",
                    x.value
                ),
            ));
        }
        export_env.push(x.value);
    }
    let mut domains: Vec<(schema::Domain, Pos)> = Vec::new();
    for d in raw.domains {
        let d_at = at(&d.referenced);
        let domain = schema::Domain::new(&d.value)
            .map_err(|e| err(d_at.clone(), format!("job {name}: domains: {e}")))?;
        if domains.iter().any(|(x, _)| *x == domain) {
            return Err(err(
                d_at,
                format!("job {name}: domains lists {domain} twice"),
            ));
        }
        domains.push((domain, d_at));
    }
    let tcp_ports: Vec<u16> = ports
        .iter()
        .filter(|p| p.proto == Proto::Tcp)
        .map(|p| p.port)
        .collect();
    let http_port = match raw.http_port {
        None => None,
        Some(p) => {
            let port = u16::try_from(p.value)
                .ok()
                .filter(|p| tcp_ports.contains(p));
            match port {
                Some(port) => Some(port),
                None => {
                    return Err(err(
                        at(&p.referenced),
                        format!(
                            "job {name}: http_port {} is not one of its TCP ports ({}); list it \
                             under ports, or leave http_port out to use the first TCP port",
                            p.value,
                            if tcp_ports.is_empty() {
                                "it has none".to_owned()
                            } else {
                                tcp_ports
                                    .iter()
                                    .map(u16::to_string)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            }
                        ),
                    ));
                }
            }
        }
    };
    if let Some((d, d_at)) = domains.first() {
        if tcp_ports.is_empty() {
            return Err(err(
                d_at.clone(),
                format!(
                    "job {name}: domains lists {d}, but the job has no TCP port to send its \
                     requests to; add the port its HTTP server listens on under ports"
                ),
            ));
        }
    }
    let https_redirect = raw.https_redirect.unwrap_or(false);
    Ok(JobDef {
        name: name.clone(),
        at: job_at,
        image,
        ports,
        volumes: raw.volume,
        links,
        scale,
        env,
        export_env,
        command: raw.command,
        kind,
        restart,
        resources,
        placement,
        update,
        domains,
        http_port,
        https_redirect,
    })
}

/// A host label name: a letter, then letters, digits, '.', '_', '-'; at most 63.
pub fn is_label(name: &str) -> bool {
    name.len() <= 63
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// A host label value: letters, digits, '.', '_', '-'; at most 63 (may be empty).
pub fn is_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Parses one job file of a deployment folder (`<dir>/<stack>/<job>.yaml`): the body of one
/// job, named by the file.
pub fn parse_job_file(
    stack: &StackName,
    job: &JobName,
    path: &str,
    text: &str,
) -> Result<JobDef, ParseError> {
    let (yaml, tabs) = untab(path, text)?;
    let at = |loc: &serde_saphyr::Location| pos(path, &tabs, loc.line(), loc.column());
    let raw: RawJob = serde_saphyr::from_str(&yaml).map_err(|e| yaml_error(path, &tabs, &e))?;
    let mut def = check_job(job, pos(path, &tabs, 1, 1), raw, &at)?;
    for link in &mut def.links {
        if !link.alias.contains('/') {
            link.target.stack = stack.clone();
        }
    }
    Ok(def)
}

/// A job in the stack-file shape, for `viking export`.
#[derive(Debug, Serialize)]
pub struct JobOut<'a> {
    #[serde(rename = "type")]
    pub kind: String,
    pub image: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub volume: &'a [String],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub link: Vec<&'a str>,
    pub scale: u32,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub export_env: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: &'a Option<CommandSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<Restart>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub resources: BTreeMap<&'static str, String>,
    #[serde(skip_serializing_if = "Placement::is_anywhere")]
    pub placement: &'a Placement,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub update: BTreeMap<&'static str, String>,
}

impl<'a> JobOut<'a> {
    /// The stack-file shape of a deployed job.
    pub fn of(job: &'a schema::JobSpec) -> Self {
        let mut resources = BTreeMap::new();
        if job.resources.cpus_milli > 0 {
            resources.insert(
                "cpus",
                format!("{}", job.resources.cpus_milli as f64 / 1000.0),
            );
        }
        if job.resources.memory > 0 {
            resources.insert("memory", schema::format_memory(job.resources.memory));
        }
        let mut update = BTreeMap::new();
        if !job.update.is_default() {
            update.insert("max_parallel", job.update.max_parallel.to_string());
            update.insert("min_healthy", format!("{}ms", job.update.min_healthy_ms));
            update.insert("timeout", format!("{}ms", job.update.timeout_ms));
            if job.update.auto_revert {
                update.insert("auto_revert", "true".to_owned());
            }
        }
        JobOut {
            kind: job.kind.to_string(),
            image: &job.image,
            ports: job
                .ports
                .iter()
                .map(|p| match p.proto {
                    schema::Proto::Tcp => p.port.to_string(),
                    schema::Proto::Udp => format!("{}/udp", p.port),
                })
                .collect(),
            volume: &job.volumes,
            link: job.links.iter().map(|l| l.alias.as_str()).collect(),
            scale: job.scale,
            env: &job.env,
            export_env: &job.export_env,
            command: &job.command,
            restart: job.restart,
            resources,
            placement: &job.placement,
            update,
        }
    }
}

/// Gives same-stack links (written without a `/`) their stack.
pub fn resolve_stack(mut file: StackFile) -> StackFile {
    let stack = file.name.clone();
    for job in &mut file.jobs {
        for link in &mut job.links {
            if !link.alias.contains('/') {
                link.target.stack = stack.clone();
            }
        }
    }
    file
}

use schema::is_env_name;

/// A YAML error at its place in the file as written.
fn yaml_error(path: &str, tabs: &[usize], e: &serde_saphyr::Error) -> ParseError {
    let (line, column) = e
        .location()
        .map_or((1, 1), |l| (l.line().max(1), l.column().max(1)));
    ParseError {
        pos: pos(path, tabs, line, column),
        message: yaml_message(e),
    }
}

/// The message of a YAML error without its location prefix and source snippet.
fn yaml_message(e: &serde_saphyr::Error) -> String {
    let text = e.without_snippet().to_string();
    let first = text.lines().next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let message = match first.strip_prefix("line ") {
        Some(rest) => rest.split_once(": ").map_or(rest, |(_, m)| m),
        None => first,
    };
    // The place is already in front of the message.
    let message = match message.rfind(" at line ") {
        Some(i) if message[i..].contains(", column ") => &message[..i],
        _ => message,
    };
    in_file_terms(message)
}

/// The YAML library's words for what is wrong, said in the stack file's terms, with what to
/// write instead.
fn in_file_terms(message: &str) -> String {
    if message.starts_with("unknown field") {
        // Inside `resources`, `placement` or `update` the message lists their own keys.
        if message.contains("expected one of type") {
            // serde lists the keys itself; say it once, with the nearest key when one is
            // near (`links` for `link`).
            let field = message.split('`').nth(1).unwrap_or_default();
            let near = JOB_KEYS
                .split(", ")
                .map(|k| (strsim::damerau_levenshtein(field, k), k))
                .min()
                .filter(|(d, _)| *d <= 2)
                .map(|(_, k)| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            return format!("unknown field `{field}`{near}; the keys of a job are: {JOB_KEYS}");
        }
        return message.to_owned();
    }
    if message.contains("untagged enum PortValue") {
        return "a port is a whole number 1-65535, optionally with /tcp or /udp: 80, \"53/udp\""
            .to_owned();
    }
    if message.contains("untagged enum EnvValue") {
        return "env is a map (`KEY: value`) or a list of `KEY=VALUE` strings".to_owned();
    }
    if message.starts_with("invalid i64") || message.starts_with("invalid u") {
        return "expected a whole number here (scale is 0-1000, a port 1-65535), not a \
                fraction or an exponent"
            .to_owned();
    }
    if let Some(rest) = message.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(',').next().unwrap_or(rest).trim();
        return format!(
            "{key} appears twice; a job, and each key of a job, is written once (merge the two)"
        );
    }
    if message.starts_with("expected mapping start") {
        return "expected `key: value` lines here: a job needs at least `image: NAME` below \
                its name, and a stack file is jobs by name"
            .to_owned();
    }
    message.to_owned()
}

/// Maps a position in the untabbed text back to the file as written.
fn pos(path: &str, tabs: &[usize], line: u64, column: u64) -> Pos {
    let t = tabs
        .get(
            usize::try_from(line)
                .unwrap_or(usize::MAX)
                .saturating_sub(1),
        )
        .copied()
        .unwrap_or(0) as u64;
    let column = if t == 0 {
        column
    } else if column <= 2 * t {
        (column - 1) / 2 + 1
    } else {
        column - t
    };
    Pos {
        file: path.to_owned(),
        line,
        column,
    }
}

/// Turns tab indentation into spaces (two per tab), returning how many tabs each line had.
/// Indentation that mixes tabs and spaces, in a line or across lines, is an error.
fn untab(path: &str, text: &str) -> Result<(String, Vec<usize>), ParseError> {
    let mut style: Option<(char, usize)> = None; // indent char and the line that set it
    let mut tabs = Vec::new();
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split('\n').enumerate() {
        let n = i + 1;
        let indent: &str = &line[..line.len() - line.trim_start_matches([' ', '\t']).len()];
        let rest = &line[indent.len()..];
        let blank = rest.trim().is_empty() || rest.starts_with('#');
        if !indent.is_empty() && !blank {
            let has_tab = indent.contains('\t');
            let has_space = indent.contains(' ');
            let bad = |column: usize, message: String| ParseError {
                pos: Pos {
                    file: path.to_owned(),
                    line: n as u64,
                    column: column as u64,
                },
                message,
            };
            if has_tab && has_space {
                let column = indent
                    .find(if indent.starts_with('\t') { ' ' } else { '\t' })
                    .unwrap_or(0)
                    + 1;
                return Err(bad(
                    column,
                    "indentation mixes tabs and spaces; indent with tabs only (one tab per level) \
                     or with spaces only"
                        .into(),
                ));
            }
            let c = if has_tab { '\t' } else { ' ' };
            match style {
                None => style = Some((c, n)),
                Some((s, first)) if s != c => {
                    let (this, that) = if c == '\t' {
                        ("tabs", "spaces")
                    } else {
                        ("spaces", "tabs")
                    };
                    return Err(bad(
                        1,
                        format!(
                            "this line is indented with {this} but line {first} with {that}; \
                             indent the whole file one way"
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        if indent.contains('\t') && !indent.contains(' ') {
            tabs.push(indent.len());
            out.push_str(&"  ".repeat(indent.len()));
            out.push_str(rest);
        } else {
            tabs.push(0);
            out.push_str(line);
        }
        out.push('\n');
    }
    out.pop();
    Ok((out, tabs))
}

pub use schema::records::digest;

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(text: &str) -> Result<StackFile, ParseError> {
        parse(StackName::new("app").unwrap(), "stack.yml", text).map(resolve_stack)
    }

    #[test]
    fn reads_tab_indented_design_note_shape() {
        let s = stack(
            "middleware:\n\ttype: job\n\timage: myapp/web\n\tports:\n\t\t- 80\n\tlink:\n\t\t- shared/mongo\n\t\t- web\nweb:\n\timage: x\n\tports:\n\t\t- \"53/udp\"\n",
        )
        .unwrap();
        assert_eq!(s.jobs.len(), 2);
        let m = &s.jobs[0];
        assert_eq!(m.name.as_str(), "middleware");
        assert_eq!(
            m.ports,
            vec![PortSpec {
                port: 80,
                proto: Proto::Tcp
            }]
        );
        assert_eq!(m.links[0].target.to_string(), "shared/mongo");
        assert_eq!(m.links[1].target.to_string(), "app/web");
        assert_eq!(m.links[1].at.to_string(), "stack.yml:8:5");
        assert_eq!(s.jobs[1].ports[0].proto, Proto::Udp);
    }

    #[test]
    fn grid_keys_are_read_into_the_job() {
        let f = stack(
            "db:\n  type: task\n  image: x\n  restart: on-failure\n  resources: {cpus: 0.5, memory: 256M}\n  \
             placement:\n    labels: {role: db, zone: 2}\n    hosts: [node-1, node-2]\n    max_per_host: 1\n  \
             update: {max_parallel: 2, min_healthy: 5s, timeout: 2m}\n",
        )
        .unwrap();
        let j = &f.jobs[0];
        assert_eq!(j.kind, JobKind::Task);
        assert_eq!(j.restart, Some(Restart::OnFailure));
        assert_eq!(
            j.resources,
            Resources {
                cpus_milli: 500,
                memory: 256 << 20
            }
        );
        assert_eq!(j.placement.labels["role"], "db");
        assert_eq!(j.placement.labels["zone"], "2");
        assert_eq!(j.placement.hosts.len(), 2);
        assert_eq!(j.placement.max_per_host, Some(1));
        assert_eq!(
            j.update,
            UpdatePolicy {
                max_parallel: 2,
                min_healthy_ms: 5000,
                timeout_ms: 120_000,
                auto_revert: false,
            }
        );
        // Without them, the defaults: a job, anywhere, reserving nothing.
        let plain = &stack("a:\n  image: x\n").unwrap().jobs[0];
        assert_eq!(plain.kind, JobKind::Job);
        assert!(plain.placement.is_anywhere() && plain.resources.is_none());
    }

    #[test]
    fn errors_carry_file_line_column() {
        let table = [
            (
                "a:\n\timage: x\n  \tports: [1]\n",
                "stack.yml:3:3: indentation mixes tabs and spaces",
            ),
            (
                "a:\n\timage: x\nb:\n  image: y\n",
                "stack.yml:4:1: this line is indented with spaces but line 2 with tabs",
            ),
            (
                "a:\n  image: x\n  prots: [1]\n",
                "stack.yml:3:3: unknown field `prots`",
            ),
            (
                "a:\n  image: x\n  ports: [0]\n",
                "stack.yml:3:11: job a: invalid port \"0\"",
            ),
            (
                "a:\n  image: x\n  ports: [\"80/sctp\"]\n",
                "stack.yml:3:11: job a: invalid port \"80/sctp\"",
            ),
            (
                "Web:\n  image: x\n",
                "stack.yml:1:1: invalid job name \"Web\"",
            ),
            (
                "a:\n  image: x\n  link: [Shared/mongo]\n",
                "stack.yml:3:10: job a: invalid link \"Shared/mongo\": invalid stack name",
            ),
            (
                "a:\n  image: x\n  link: [shared/mongo:27017]\n",
                "stack.yml:3:10: job a: invalid link \"shared/mongo:27017\": a link names a job, \
                 and gets every port it exposes: write \"shared/mongo\"",
            ),
            (
                "a:\n  type: service\n  image: x\n",
                "stack.yml:2:9: job a: unknown type \"service\"",
            ),
            ("a:\n  ports: [1]\n", "stack.yml:1:1: job a has no image"),
            (
                "a:\n  image: x\n  restart: sometimes\n",
                "stack.yml:3:12: job a: unknown restart \"sometimes\"; write always, on-failure or never",
            ),
            (
                "a:\n  image: x\n  resources: {memory: 12 parsecs}\n",
                "stack.yml:3:23: job a: resources.memory: invalid memory size \"12 parsecs\"",
            ),
            (
                "a:\n  image: x\n  resources: {cpus: 0}\n",
                "stack.yml:3:21: job a: resources.cpus: invalid CPU count \"0\"",
            ),
            (
                "a:\n  image: x\n  resources: {disk: 1G}\n",
                "stack.yml:3:15: unknown field `disk`, expected one of cpus, memory",
            ),
            (
                "a:\n  image: x\n  placement: {max_per_host: 0}\n",
                "stack.yml:3:29: job a: placement.max_per_host 0 is out of range 1-1000",
            ),
            (
                "a:\n  image: x\n  placement: {hosts: [Node_1]}\n",
                "stack.yml:3:23: job a: placement.hosts: invalid host name \"Node_1\"",
            ),
            (
                "a:\n  image: x\n  placement: {labels: {\"role db\": x}}\n",
                "stack.yml:3:24: job a: placement label role db=\"x\" is not a label",
            ),
            (
                "a:\n  image: x\n  update: {timeout: soon}\n",
                "stack.yml:3:21: job a: update.timeout: invalid duration \"soon\"",
            ),
            (
                "a:\n  image: x\n  update: {timeout: 0s}\n",
                "stack.yml:3:21: job a: update.timeout 0s is too short",
            ),
            (
                "a:\n  image: x\n  scale: 5000\n",
                "stack.yml:3:10: job a: scale 5000 is out of range",
            ),
            (
                "a:\n  image: x\n  export_env: [X]\n",
                "stack.yml:3:16: job a: export_env names \"X\"",
            ),
            ("a:\n  image: [x\n", "stack.yml:2:10: "),
            (
                "a:\n  image: \"--privileged\"\n",
                "stack.yml:2:10: job a: image \"--privileged\" starts with '-'",
            ),
            (
                "a:\n  image: My/Image\n",
                "stack.yml:2:10: job a: image \"My/Image\" has upper-case letters",
            ),
            (
                "a:\n  image: x\n  ports: [80.5]\n",
                "stack.yml:3:11: a port is a whole number 1-65535",
            ),
            (
                "a:\n  image: x\n  scale: 1e9\n",
                "stack.yml:3:10: expected a whole number here",
            ),
            (
                "a:\n  image: x\na:\n  image: y\n",
                "stack.yml:3:1: a appears twice; a job, and each key of a job, is written once",
            ),
            (
                "a:\n",
                "stack.yml:1:2: expected `key: value` lines here: a job needs at least",
            ),
            (
                "a:\n  image: x\n  env: [A=1, A=2]\n",
                "stack.yml:3:8: job a: env A is set twice (\"1\" first)",
            ),
            ("", "stack.yml:1:1: the stack file has no jobs"),
        ];
        let mut wrong = Vec::new();
        for (text, want) in table {
            let got = stack(text).unwrap_err().to_string();
            if !got.starts_with(want) {
                wrong.push(format!("{text:?}\n got: {got}\nwant: {want}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        let got = stack("a:\n  image: x\n  prots: [1]\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            got,
            format!(
                "stack.yml:3:3: unknown field `prots` (did you mean `ports`?); the keys of a \
                 job are: {JOB_KEYS}"
            )
        );
        let got = stack("a:\n  image: x\n  healthcheck: y\n")
            .unwrap_err()
            .to_string();
        assert!(
            got.contains("unknown field `healthcheck`; the keys"),
            "{got}"
        );
    }

    #[test]
    fn env_as_map_or_list_and_commands() {
        let s = stack(
            "a:\n  image: x\n  env:\n    A: 1\n    B: two\n  export_env: [B]\n  command: [\"sh\", \"-c\", \"true\"]\nb:\n  image: y\n  env: [\"X=1=2\", \"Y=\"]\n  command: echo hi\n",
        )
        .unwrap();
        assert_eq!(s.jobs[0].env["A"], "1");
        assert_eq!(s.jobs[0].export_env, vec!["B"]);
        assert_eq!(s.jobs[1].env["X"], "1=2");
        assert_eq!(s.jobs[1].env["Y"], "");
        assert_eq!(
            s.jobs[1].command,
            Some(CommandSpec::Shell("echo hi".into()))
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(text in "([a-z]{1,3}|:|-|\t|  |\n|\\[|\\]|\"|[0-9]{1,6}|/|,| ){0,60}") {
            let _ = stack(&text);
            let _ = parse_job_file(
                &StackName::new("s").unwrap(),
                &JobName::new("j").unwrap(),
                "j.yaml",
                &text,
            );
        }
    }

    #[test]
    fn json_is_accepted() {
        let s = stack(r#"{"a": {"image": "x", "ports": [80, "53/udp"], "link": ["b"]}, "b": {"image": "y", "ports": [1]}}"#).unwrap();
        assert_eq!(s.jobs.len(), 2);
    }
}
