//! What a deploy writes, planned without I/O: from the compiled deployment and the keys read
//! under `stacks/`, the puts and deletes (only what changed), the guards that make the one
//! transaction commit only if nothing it read has changed since, and the report.

use std::collections::{BTreeMap, BTreeSet};

use schema::records::{self, RouteRecord, StackMetaRecord};
use schema::{Dir, JobName, JobSpec, Key, Kv, Prefix, StackName};

use crate::compile::Deployment;

/// What a deploy changed, per stack.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeployReport {
    pub stacks: Vec<StackReport>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StackReport {
    pub stack: String,
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
}

/// Fails, before anything is allocated or written, when deploying `files` over `read` would
/// need a transaction of more than `max_txn_ops` compares or operations (etcd's
/// `--max-txn-ops`): one guard and at most one write per job and per stack meta, one delete
/// and guard per job the files drop, one guard per job of another stack they link to.
pub fn check_size(
    prefix: &Prefix,
    files: &[crate::StackFile],
    read: &BTreeMap<String, Kv>,
    max_txn_ops: usize,
) -> Result<(), crate::HqError> {
    let deploying: BTreeSet<&StackName> = files.iter().map(|f| &f.name).collect();
    let jobs: usize = files.iter().map(|f| f.jobs.len()).sum();
    let dropped = read
        .keys()
        .filter(|k| match prefix.parse(k) {
            Ok(Key::StackJob(stack, job) | Key::StackPrev(stack, job)) => files
                .iter()
                .find(|f| f.name == stack)
                .is_some_and(|f| !f.jobs.iter().any(|j| j.name == job)),
            _ => false,
        })
        .count();
    let outside: BTreeSet<&schema::ServiceId> = files
        .iter()
        .flat_map(|f| &f.jobs)
        .flat_map(|j| &j.links)
        .map(|l| &l.target)
        .filter(|t| !deploying.contains(&t.stack))
        .collect();
    // Two more: the ports it writes in the env were not released since they were allocated.
    // A job that exists already may also write its previous spec (for `viking rollback`).
    let existing = files
        .iter()
        .flat_map(|f| f.jobs.iter().map(move |j| (&f.name, &j.name)))
        .filter(|(s, j)| read.contains_key(&prefix.key(&Key::StackJob((*s).clone(), (*j).clone()))))
        .count();
    // One compare and at most one write per domain (a domain a stack drops: one more each).
    let domains: usize = files
        .iter()
        .flat_map(|f| &f.jobs)
        .map(|j| j.domains.len())
        .sum();
    let guards = jobs + existing + files.len() + dropped + outside.len() + domains + 2;
    if guards <= max_txn_ops {
        return Ok(());
    }
    let room = max_txn_ops.saturating_sub(files.len() + dropped + outside.len() + 2);
    Err(crate::HqError::Input(format!(
        "this deploy is one etcd transaction of {guards} compares ({jobs} jobs, {} stack \
         metas, {dropped} jobs removed, {} linked jobs of other stacks) and etcd takes at most \
         {max_txn_ops} (its --max-txn-ops): deploy at most {room} jobs at once, or raise etcd's \
         --max-txn-ops and pass the same to viking --max-txn-ops; nothing was allocated or written",
        files.len(),
        outside.len()
    )))
}

/// A condition of the transaction on one key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Guard {
    /// The key still has the revision it was read at.
    Unchanged { key: String, mod_revision: i64 },
    /// The key still does not exist.
    Absent { key: String },
}

/// One write of the transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put { key: String, value: String },
    Delete { key: String },
}

/// The transaction of a deploy, and what it reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub guards: BTreeSet<Guard>,
    pub writes: Vec<Write>,
    pub report: DeployReport,
}

fn guard(key: &str, read: Option<&Kv>) -> Guard {
    match read {
        Some(kv) => Guard::Unchanged {
            key: key.to_owned(),
            mod_revision: kv.mod_revision,
        },
        None => Guard::Absent {
            key: key.to_owned(),
        },
    }
}

/// Plans the writes of `deployment` over `read` (every key under `stacks/`, as read) and
/// `routes` (every key under `routes/`), stamping changed stacks' metas with `now`. Every key
/// it writes or deletes is guarded, and so is every job outside the deploy that a deployed job
/// links to (its env was built from it). A deployment that changes nothing plans no writes.
///
/// Fails (bad input, nothing written) when a domain of the deployment is routed to a job of a
/// stack outside it.
pub fn plan(
    prefix: &Prefix,
    deployment: &Deployment,
    read: &BTreeMap<String, Kv>,
    routes: &BTreeMap<String, Kv>,
    now: &str,
) -> Result<Plan, crate::HqError> {
    let mut plan = Plan::default();
    plan_routes(prefix, deployment, routes, &mut plan)?;
    for sd in &deployment.stacks {
        let mut report = StackReport {
            stack: sd.name.to_string(),
            ..StackReport::default()
        };
        let stack_dir = prefix.dir(Dir::Stack(&sd.name));
        let mut existing: BTreeMap<&String, &Kv> = read
            .iter()
            .filter(|(k, _)| k.starts_with(&stack_dir))
            .collect();
        for job in &sd.jobs {
            let key = prefix.key(&Key::StackJob(sd.name.clone(), job.job.clone()));
            let old = existing.remove(&key);
            plan.guards.insert(guard(&key, old));
            let same = old.is_some_and(|kv| {
                serde_json::from_slice::<JobSpec>(&kv.value).ok().as_ref() == Some(job)
            });
            let list = match (old, same) {
                (Some(_), true) => &mut report.unchanged,
                (Some(_), false) => &mut report.updated,
                (None, _) => &mut report.created,
            };
            list.push(job.job.to_string());
            if !same {
                // The spec it replaces is kept for `viking rollback` (guarded with the job key:
                // the two change together).
                if let Some(old) = old {
                    plan.writes.push(Write::Put {
                        key: prefix.key(&Key::StackPrev(sd.name.clone(), job.job.clone())),
                        value: String::from_utf8_lossy(&old.value).into_owned(),
                    });
                }
                let value = records::encode(job);
                plan.writes.push(Write::Put { key, value });
            }
        }
        // A previous spec stays while its job does (it was written above if the job changed);
        // it goes with its job.
        let jobs_here: BTreeSet<&JobName> = sd.jobs.iter().map(|j| &j.job).collect();
        existing.retain(|k, _| match prefix.parse(k) {
            Ok(Key::StackPrev(_, job)) => !jobs_here.contains(&job),
            _ => true,
        });
        let meta_key = prefix.key(&Key::StackMeta(sd.name.clone()));
        let old_meta = existing.remove(&meta_key);
        // What is left under the stack: jobs no longer in its file.
        for (key, old) in existing {
            plan.guards.insert(guard(key, Some(old)));
            plan.writes.push(Write::Delete { key: key.clone() });
            if let Ok(Key::StackJob(_, job)) = prefix.parse(key) {
                report.removed.push(job.to_string());
            }
        }
        let changed =
            !report.created.is_empty() || !report.updated.is_empty() || !report.removed.is_empty();
        let meta_same = old_meta
            .and_then(|m| serde_json::from_slice::<StackMetaRecord>(&m.value).ok())
            .is_some_and(|m| m.source_digest == sd.source_digest && m.order == sd.order);
        if changed || !meta_same {
            let meta = StackMetaRecord {
                v: records::RECORD_VERSION,
                name: sd.name.to_string(),
                deployed_at: now.to_owned(),
                source_digest: sd.source_digest.clone(),
                order: sd.order.clone(),
            };
            plan.guards.insert(guard(&meta_key, old_meta));
            plan.writes.push(Write::Put {
                key: meta_key,
                value: records::encode(&meta),
            });
        }
        plan.report.stacks.push(report);
    }
    let deploying: BTreeSet<&StackName> = deployment.stacks.iter().map(|s| &s.name).collect();
    for job in deployment.stacks.iter().flat_map(|s| &s.jobs) {
        for link in &job.links {
            if deploying.contains(&link.service.stack) {
                continue;
            }
            let target = &link.service;
            let key = prefix.key(&Key::StackJob(target.stack.clone(), target.job.clone()));
            if let Some(kv) = read.get(&key) {
                plan.guards.insert(guard(&key, Some(kv)));
            }
        }
    }
    Ok(plan)
}

/// The `routes/` part of a deploy: every domain of a deployed job routed to it, and the
/// domains a deployed stack no longer lists removed.
fn plan_routes(
    prefix: &Prefix,
    deployment: &Deployment,
    routes: &BTreeMap<String, Kv>,
    plan: &mut Plan,
) -> Result<(), crate::HqError> {
    let deploying: BTreeSet<&StackName> = deployment.stacks.iter().map(|s| &s.name).collect();
    let mut wanted: BTreeMap<&schema::Domain, RouteRecord> = BTreeMap::new();
    for job in deployment.stacks.iter().flat_map(|s| &s.jobs) {
        // `JobSpec::check` holds for a compiled job: a job with domains has a web port.
        let Some(port) = job.web_port() else { continue };
        for domain in &job.domains {
            wanted.insert(
                domain,
                RouteRecord {
                    v: records::RECORD_VERSION,
                    stack: job.stack.clone(),
                    job: job.job.clone(),
                    port,
                    https_redirect: job.https_redirect,
                },
            );
        }
    }
    for (key, kv) in routes {
        let Ok(Key::Route(domain)) = prefix.parse(key) else {
            continue;
        };
        let old = serde_json::from_slice::<RouteRecord>(&kv.value).ok();
        match (wanted.get(&domain), &old) {
            (None, Some(old)) if deploying.contains(&old.stack) => {
                plan.guards.insert(guard(key, Some(kv)));
                plan.writes.push(Write::Delete { key: key.clone() });
            }
            (Some(new), Some(old))
                if !deploying.contains(&old.stack)
                    && (old.stack != new.stack || old.job != new.job) =>
            {
                return Err(crate::HqError::Input(format!(
                    "domain {domain} of job {}/{} is already routed to {}/{} (key {key}); a \
                     domain routes to one job: drop it from {}'s stack file and deploy that \
                     first, or pick another domain; nothing was written",
                    new.stack, new.job, old.stack, old.job, old.stack
                )));
            }
            _ => {}
        }
    }
    for (domain, record) in wanted {
        let key = prefix.key(&Key::Route(domain.clone()));
        let old = routes.get(&key);
        let same = old.is_some_and(|kv| {
            serde_json::from_slice::<RouteRecord>(&kv.value)
                .ok()
                .as_ref()
                == Some(&record)
        });
        plan.guards.insert(guard(&key, old));
        if !same {
            plan.writes.push(Write::Put {
                key,
                value: records::encode(&record),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::StackDeployment;
    use schema::{JobName, LinkSpec};

    fn job(stack: &str, name: &str, links: &[&str]) -> JobSpec {
        let mut job = JobSpec::new(
            StackName::new(stack).unwrap(),
            JobName::new(name).unwrap(),
            "busybox",
        );
        job.links = links
            .iter()
            .map(|l| LinkSpec {
                alias: (*l).into(),
                service: l.parse().unwrap(),
                prefix: l.replace('/', "_").to_uppercase(),
                ports: vec![],
            })
            .collect();
        job
    }

    fn deployment(stack: &str, jobs: Vec<JobSpec>) -> Deployment {
        Deployment {
            stacks: vec![StackDeployment {
                name: StackName::new(stack).unwrap(),
                source_digest: "d1".into(),
                order: jobs.iter().map(|j| j.job.to_string()).collect(),
                jobs,
            }],
        }
    }

    /// What etcd holds after `d` was deployed to an empty one, each key at revision `rev`.
    fn deployed(d: &Deployment, rev: i64) -> BTreeMap<String, Kv> {
        let mut read = BTreeMap::new();
        for w in &plan(
            &Prefix::default(),
            d,
            &BTreeMap::new(),
            &BTreeMap::new(),
            "t1",
        )
        .unwrap()
        .writes
        {
            match w {
                Write::Put { key, value } => {
                    let kv = Kv {
                        key: key.clone(),
                        value: value.clone().into_bytes(),
                        mod_revision: rev,
                        lease: 0,
                    };
                    read.insert(key.clone(), kv);
                }
                Write::Delete { key } => {
                    read.remove(key);
                }
            }
        }
        read
    }

    fn key(stack: &str, job: &str) -> String {
        Prefix::default().key(&Key::StackJob(
            StackName::new(stack).unwrap(),
            JobName::new(job).unwrap(),
        ))
    }

    #[test]
    fn a_first_deploy_creates_jobs_and_meta_guarded_as_absent() {
        let p = Prefix::default();
        let d = deployment("app", vec![job("app", "web", &[]), job("app", "db", &[])]);
        let plan = plan(&p, &d, &BTreeMap::new(), &BTreeMap::new(), "now").unwrap();
        assert_eq!(plan.writes.len(), 3, "two jobs and the meta");
        assert!(
            plan.guards
                .iter()
                .all(|g| matches!(g, Guard::Absent { .. }))
        );
        assert_eq!(plan.guards.len(), 3);
        assert_eq!(plan.report.stacks[0].created, ["web", "db"]);
    }

    #[test]
    fn the_same_deploy_again_writes_nothing_and_reports_unchanged() {
        let p = Prefix::default();
        let d = deployment("app", vec![job("app", "web", &[])]);
        let read = deployed(&d, 7);
        let again = plan(&p, &d, &read, &BTreeMap::new(), "t2").unwrap();
        assert!(again.writes.is_empty(), "{:?}", again.writes);
        assert_eq!(again.report.stacks[0].unchanged, ["web"]);
    }

    #[test]
    fn a_changed_job_is_updated_and_a_dropped_one_deleted_both_guarded_at_their_revision() {
        let p = Prefix::default();
        let first = deployment("app", vec![job("app", "web", &[]), job("app", "old", &[])]);
        let read = deployed(&first, 7);
        let mut web = job("app", "web", &[]);
        web.image = "busybox:2".into();
        let second = plan(
            &p,
            &deployment("app", vec![web]),
            &read,
            &BTreeMap::new(),
            "t2",
        )
        .unwrap();
        let r = &second.report.stacks[0];
        assert_eq!(
            (r.updated.as_slice(), r.removed.as_slice()),
            (&["web".to_owned()][..], &["old".to_owned()][..])
        );
        assert!(second.writes.contains(&Write::Delete {
            key: key("app", "old")
        }));
        for k in [key("app", "web"), key("app", "old")] {
            assert!(
                second.guards.contains(&Guard::Unchanged {
                    key: k.clone(),
                    mod_revision: 7
                }),
                "{k} guarded at the revision read: {:?}",
                second.guards
            );
        }
    }

    #[test]
    fn a_job_linked_to_outside_the_deploy_is_guarded_and_one_inside_it_is_not_twice() {
        let p = Prefix::default();
        let read = deployed(&deployment("shared", vec![job("shared", "mongo", &[])]), 3);
        let d = deployment(
            "app",
            vec![
                job("app", "web", &["shared/mongo", "app/db"]),
                job("app", "db", &[]),
            ],
        );
        let plan = plan(&p, &d, &read, &BTreeMap::new(), "t2").unwrap();
        let mongo = Guard::Unchanged {
            key: key("shared", "mongo"),
            mod_revision: 3,
        };
        assert!(plan.guards.contains(&mongo), "{:?}", plan.guards);
        assert!(
            !plan
                .writes
                .iter()
                .any(|w| matches!(w, Write::Put { key, .. } if key.contains("/shared/"))),
            "the linked-to stack is not written"
        );
        assert_eq!(
            plan.guards.len(),
            4,
            "two jobs, the meta, and shared/mongo once"
        );
    }

    fn web(stack: &str, name: &str, domains: &[&str]) -> JobSpec {
        let mut j = job(stack, name, &[]);
        j.ports = vec![schema::PortSpec {
            port: 8080,
            proto: schema::Proto::Tcp,
        }];
        j.domains = domains.iter().map(|d| d.parse().unwrap()).collect();
        j
    }

    fn routes_of(d: &Deployment, rev: i64) -> BTreeMap<String, Kv> {
        deployed(d, rev)
            .into_iter()
            .filter(|(k, _)| k.starts_with("/viking/routes/"))
            .collect()
    }

    #[test]
    fn domains_are_routed_in_the_deploy_and_a_dropped_one_is_removed() {
        let p = Prefix::default();
        let first = deployment(
            "app",
            vec![web("app", "web", &["a.example.com", "b.example.com"])],
        );
        let plan1 = plan(&p, &first, &BTreeMap::new(), &BTreeMap::new(), "t1").unwrap();
        let route = p.key(&Key::Route("a.example.com".parse().unwrap()));
        assert!(plan1.guards.contains(&Guard::Absent { key: route.clone() }));
        let put = plan1.writes.iter().find_map(|w| match w {
            Write::Put { key, value } if *key == route => Some(value.clone()),
            _ => None,
        });
        let record: RouteRecord = serde_json::from_str(&put.expect("route written")).unwrap();
        assert_eq!((record.job.as_str(), record.port), ("web", 8080));

        let routes = routes_of(&first, 5);
        let second = deployment("app", vec![web("app", "web", &["a.example.com"])]);
        let plan2 = plan(&p, &second, &BTreeMap::new(), &routes, "t2").unwrap();
        let b = p.key(&Key::Route("b.example.com".parse().unwrap()));
        assert!(plan2.writes.contains(&Write::Delete { key: b.clone() }));
        assert!(plan2.guards.contains(&Guard::Unchanged {
            key: b,
            mod_revision: 5
        }));
        assert!(
            !plan2
                .writes
                .iter()
                .any(|w| matches!(w, Write::Put { key, .. } if *key == route)),
            "an unchanged route is not written again"
        );
    }

    #[test]
    fn a_domain_routed_to_another_stack_is_refused_naming_both_and_a_move_within_is_not() {
        let p = Prefix::default();
        let routes = routes_of(
            &deployment("shop", vec![web("shop", "front", &["example.com"])]),
            5,
        );
        let d = deployment("blog", vec![web("blog", "web", &["example.com"])]);
        let e = plan(&p, &d, &BTreeMap::new(), &routes, "t")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("example.com") && e.contains("blog/web") && e.contains("shop/front"),
            "{e}"
        );
        let moved = deployment("shop", vec![web("shop", "new-front", &["example.com"])]);
        let plan = plan(&p, &moved, &BTreeMap::new(), &routes, "t").unwrap();
        assert!(plan.writes.iter().any(
            |w| matches!(w, Write::Put { key, value } if key.ends_with("/routes/example.com") && value.contains("new-front"))
        ));
    }
}
