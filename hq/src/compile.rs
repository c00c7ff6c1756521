//! From stack files to deployment config: pure, no I/O.
//!
//! [`required_service_ports`] says which service ports need an ambassador port; the caller
//! allocates them and puts them in the [`ClusterView`]; [`compile`] then resolves links,
//! orders jobs (linked-to before linked-from) and builds each job's spec with its docker-link
//! environment. Both take the same inputs and agree on every error.

use std::collections::{BTreeMap, BTreeSet};

use schema::env::{self, LinkPort};
use schema::records::RECORD_VERSION;
use schema::{JobName, PortSpec, ServicePort, StackName};
pub use schema::{JobSpec, LinkPortSpec, LinkSpec};
use serde::Serialize;

use crate::stackfile::{JobDef, Pos, StackFile};

/// The Docker bridge gateway: the same on every host, so env vars hold wherever a container runs.
pub const DEFAULT_AMBASSADOR_ADDR: &str = "172.17.0.1";

/// What a deploy writes for one stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StackDeployment {
    pub name: StackName,
    pub source_digest: String,
    /// Job names in start order.
    pub order: Vec<String>,
    pub jobs: Vec<JobSpec>,
}

/// What a deploy writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deployment {
    /// In dependency order: stacks that others in this deploy link to come first.
    pub stacks: Vec<StackDeployment>,
}

/// What compile needs to know of the cluster: stacks already deployed (for links into them),
/// allocated ambassador ports, and the ambassador address.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub stacks: BTreeMap<StackName, BTreeMap<JobName, JobSpec>>,
    pub ports: BTreeMap<ServicePort, u16>,
    pub ambassador_addr: String,
}

/// Why a set of stack files cannot be deployed. Every variant names the place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("{at}: {message}")]
    At { at: Pos, message: String },
    #[error("stack {0} is given twice in one deploy")]
    DuplicateStack(StackName),
    #[error("no ambassador port for {0}; it must be allocated before compiling")]
    MissingPort(ServicePort),
}

fn at(at: &Pos, message: String) -> CompileError {
    CompileError::At {
        at: at.clone(),
        message,
    }
}

/// A link's target: a job being deployed now or one already in etcd.
enum Target<'a> {
    New(&'a JobDef),
    Deployed(&'a JobSpec),
}

impl Target<'_> {
    fn ports(&self) -> &[PortSpec] {
        match self {
            Target::New(j) => &j.ports,
            Target::Deployed(j) => &j.ports,
        }
    }

    fn exported(&self) -> Vec<(String, String)> {
        let (names, env) = match self {
            Target::New(j) => (&j.export_env, &j.env),
            Target::Deployed(j) => (&j.export_env, &j.env),
        };
        names
            .iter()
            .filter_map(|n| env.get(n).map(|v| (n.clone(), v.clone())))
            .collect()
    }
}

/// A job of this deploy: (stack index, job index).
type Node = (usize, usize);

/// Links among jobs of this deploy: from -> [(to, where the link is written)].
type Edges<'a> = BTreeMap<Node, Vec<(Node, &'a Pos)>>;

struct Resolved<'a> {
    /// Per input stack (same index), the job order.
    order: Vec<Vec<usize>>,
    /// Stack order over the input.
    stack_order: Vec<usize>,
    /// (stack index, job index, link index) -> target.
    targets: BTreeMap<(usize, usize, usize), Target<'a>>,
}

fn resolve<'a>(
    stacks: &'a [StackFile],
    view: &'a ClusterView,
) -> Result<Resolved<'a>, CompileError> {
    let mut names = BTreeSet::new();
    for s in stacks {
        if !names.insert(&s.name) {
            return Err(CompileError::DuplicateStack(s.name.clone()));
        }
    }
    let index: BTreeMap<(&StackName, &JobName), (usize, usize)> = stacks
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            s.jobs
                .iter()
                .enumerate()
                .map(move |(ji, j)| ((&s.name, &j.name), (si, ji)))
        })
        .collect();
    let mut targets = BTreeMap::new();
    // Edges among jobs of this deploy: (from, to) means `from` links to `to`.
    let mut edges: Edges<'_> = BTreeMap::new();
    for (si, s) in stacks.iter().enumerate() {
        for (ji, job) in s.jobs.iter().enumerate() {
            let prefixes: Vec<&str> = job.links.iter().map(|l| l.alias.as_str()).collect();
            if let Err(e) = env::check_prefix_collisions(prefixes) {
                let link = job
                    .links
                    .iter()
                    .find(|l| l.alias == e.second)
                    .expect("alias");
                return Err(at(&link.at, format!("job {}: {e}", job.name)));
            }
            for (li, link) in job.links.iter().enumerate() {
                let t = &link.target;
                if t.stack == s.name && t.job == job.name {
                    return Err(at(&link.at, format!("job {} links to itself", job.name)));
                }
                let target = if let Some(&(tsi, tji)) = index.get(&(&t.stack, &t.job)) {
                    edges
                        .entry((si, ji))
                        .or_default()
                        .push(((tsi, tji), &link.at));
                    Target::New(&stacks[tsi].jobs[tji])
                } else if t.stack == s.name {
                    let jobs: Vec<&str> = s.jobs.iter().map(|j| j.name.as_str()).collect();
                    return Err(at(
                        &link.at,
                        format!(
                            "job {} links to {}, which is not a job of stack {}; its jobs are: {}",
                            job.name,
                            t.job,
                            s.name,
                            jobs.join(", ")
                        ),
                    ));
                } else if let Some(deployed) = view.stacks.get(&t.stack) {
                    match deployed.get(&t.job) {
                        Some(spec) => Target::Deployed(spec),
                        None => {
                            let jobs: Vec<&str> = deployed.keys().map(JobName::as_str).collect();
                            return Err(at(
                                &link.at,
                                format!(
                                    "job {} links to {t}, but stack {} has no job {}; its jobs are: {}",
                                    job.name,
                                    t.stack,
                                    t.job,
                                    jobs.join(", ")
                                ),
                            ));
                        }
                    }
                } else {
                    return Err(at(
                        &link.at,
                        format!(
                            "job {} links to {t}, but stack {} is not deployed; deploy it first \
                             (viking deploy DIR --name {}) or in the same command",
                            job.name, t.stack, t.stack
                        ),
                    ));
                };
                if target.ports().is_empty() {
                    return Err(at(
                        &link.at,
                        format!(
                            "job {} links to {t}, which exposes no ports; add `ports:` to {t}",
                            job.name
                        ),
                    ));
                }
                targets.insert((si, ji, li), target);
            }
        }
    }

    // Order jobs: depth-first, linked-to first, in file order; a back edge is a cycle.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    let mut marks: BTreeMap<(usize, usize), Mark> =
        index.values().map(|k| (*k, Mark::New)).collect();
    let mut global: Vec<(usize, usize)> = Vec::new();
    fn visit(
        node: (usize, usize),
        edges: &Edges<'_>,
        marks: &mut BTreeMap<(usize, usize), Mark>,
        path: &mut Vec<(usize, usize)>,
        out: &mut Vec<(usize, usize)>,
    ) -> Result<(), Vec<(usize, usize)>> {
        match marks[&node] {
            Mark::Done => return Ok(()),
            Mark::Active => {
                let start = path.iter().position(|n| *n == node).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(node);
                return Err(cycle);
            }
            Mark::New => {}
        }
        marks.insert(node, Mark::Active);
        path.push(node);
        for (to, _) in edges.get(&node).map(Vec::as_slice).unwrap_or_default() {
            visit(*to, edges, marks, path, out)?;
        }
        path.pop();
        marks.insert(node, Mark::Done);
        out.push(node);
        Ok(())
    }
    for (si, s) in stacks.iter().enumerate() {
        for ji in 0..s.jobs.len() {
            if let Err(cycle) = visit((si, ji), &edges, &mut marks, &mut Vec::new(), &mut global) {
                let name = |(si, ji): (usize, usize)| {
                    format!("{}/{}", stacks[si].name, stacks[si].jobs[ji].name)
                };
                let text: Vec<String> = cycle.iter().map(|n| name(*n)).collect();
                let first_link = edges[&cycle[0]]
                    .iter()
                    .find(|(to, _)| *to == cycle[1])
                    .map(|(_, p)| *p)
                    .expect("edge of the cycle");
                return Err(at(
                    first_link,
                    format!(
                        "link cycle: {}; linked-to jobs must start first, so a cycle cannot start",
                        text.join(" -> ")
                    ),
                ));
            }
        }
    }
    let mut order = vec![Vec::new(); stacks.len()];
    let mut stack_order = Vec::new();
    for (si, ji) in global {
        order[si].push(ji);
        if !stack_order.contains(&si) {
            stack_order.push(si);
        }
    }
    Ok(Resolved {
        order,
        stack_order,
        targets,
    })
}

/// Every service port that the links of `stacks` need an ambassador port for, sorted.
pub fn required_service_ports(
    stacks: &[StackFile],
    view: &ClusterView,
) -> Result<Vec<ServicePort>, CompileError> {
    let resolved = resolve(stacks, view)?;
    let mut out = BTreeSet::new();
    for ((si, ji, li), target) in &resolved.targets {
        let service = &stacks[*si].jobs[*ji].links[*li].target;
        for p in target.ports() {
            out.insert(ServicePort {
                service: service.clone(),
                port: p.port,
                proto: p.proto,
            });
        }
    }
    Ok(out.into_iter().collect())
}

/// Compiles `stacks` against `view`, whose `ports` must hold every required service port.
pub fn compile(stacks: &[StackFile], view: &ClusterView) -> Result<Deployment, CompileError> {
    let resolved = resolve(stacks, view)?;
    check_domains(stacks)?;
    let addr = if view.ambassador_addr.is_empty() {
        DEFAULT_AMBASSADOR_ADDR
    } else {
        view.ambassador_addr.as_str()
    };
    let mut out = Vec::new();
    for &si in &resolved.stack_order {
        let stack = &stacks[si];
        let mut jobs = Vec::new();
        for (position, &ji) in resolved.order[si].iter().enumerate() {
            let job = &stack.jobs[ji];
            let container = format!("{}_{}", stack.name, job.name);
            let mut links = Vec::new();
            let mut link_env = BTreeMap::new();
            for (li, link) in job.links.iter().enumerate() {
                let target = &resolved.targets[&(si, ji, li)];
                let mut ports = Vec::new();
                for p in target.ports() {
                    let sp = ServicePort {
                        service: link.target.clone(),
                        port: p.port,
                        proto: p.proto,
                    };
                    let n = *view
                        .ports
                        .get(&sp)
                        .ok_or_else(|| CompileError::MissingPort(sp.clone()))?;
                    ports.push(LinkPort {
                        port: p.port,
                        proto: p.proto,
                        ambassador_port: n,
                    });
                }
                let prefix = env::env_prefix(&link.alias);
                link_env.extend(env::link_env(&link.alias, &container, addr, &ports));
                for (var, value) in target.exported() {
                    link_env.insert(format!("{prefix}_ENV_{var}"), value);
                }
                links.push(LinkSpec {
                    alias: link.alias.clone(),
                    service: link.target.clone(),
                    prefix,
                    ports: ports
                        .iter()
                        .map(|p| LinkPortSpec {
                            port: p.port,
                            proto: p.proto,
                            ambassador_port: p.ambassador_port,
                        })
                        .collect(),
                });
            }
            let labels = BTreeMap::from([
                (schema::labels::STACK.to_owned(), stack.name.to_string()),
                (schema::labels::JOB.to_owned(), job.name.to_string()),
            ]);
            jobs.push(JobSpec {
                v: RECORD_VERSION,
                stack: stack.name.clone(),
                job: job.name.clone(),
                image: job.image.clone(),
                ports: job.ports.clone(),
                volumes: job.volumes.clone(),
                links,
                scale: job.scale,
                env: job.env.clone(),
                export_env: job.export_env.clone(),
                command: job.command.clone(),
                labels,
                order: position as u32,
                link_env,
                kind: job.kind,
                restart: job.restart,
                resources: job.resources,
                placement: job.placement.clone(),
                update: job.update,
                domains: job.domains.iter().map(|(d, _)| d.clone()).collect(),
                http_port: job.http_port,
                https_redirect: job.https_redirect,
            });
        }
        out.push(StackDeployment {
            name: stack.name.clone(),
            source_digest: stack.digest.clone(),
            order: jobs.iter().map(|j| j.job.to_string()).collect(),
            jobs,
        });
    }
    Ok(Deployment { stacks: out })
}

/// A domain routes to one job: two jobs of this deploy may not list the same one (a job of
/// another, deployed stack is checked against `routes/` when the deploy is planned).
fn check_domains(stacks: &[StackFile]) -> Result<(), CompileError> {
    let mut claimed: BTreeMap<&schema::Domain, (String, &Pos)> = BTreeMap::new();
    for s in stacks {
        for j in &s.jobs {
            for (domain, pos) in &j.domains {
                let who = format!("{}/{}", s.name, j.name);
                if let Some((first, first_at)) = claimed.get(domain) {
                    return Err(at(
                        pos,
                        format!(
                            "job {who}: domain {domain} is also listed by {first} ({first_at}); \
                             a domain routes to one job: keep it in one of them"
                        ),
                    ));
                }
                claimed.insert(domain, (who, pos));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "compile_tests.rs"]
mod tests;
