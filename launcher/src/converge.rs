//! What to do to this host's containers: a pure function of what the grid assigned and what
//! the engine has.

use std::collections::BTreeSet;

use schema::records::InstanceState;
use schema::{JobKind, JobSpec, Restart, ServiceId};

use crate::engine::{Existing, RunState};

/// One instance assigned to this host, with the spec to run.
#[derive(Debug, Clone)]
pub struct Wanted<'a> {
    pub instance: u32,
    pub spec: &'a JobSpec,
}

/// One change to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create and start the instance.
    Start { service: ServiceId, instance: u32 },
    /// Its container exists with the right spec but stopped, and should run.
    Restart {
        service: ServiceId,
        instance: u32,
        id: String,
    },
    /// Its container runs another spec: start the new one beside it under the name `beside`
    /// (or go on with `started`, one already there from a replacement under way), then once
    /// it is ready stop the old one and give the new one the instance's name.
    Replace {
        service: ServiceId,
        instance: u32,
        id: String,
        beside: String,
        started: Option<String>,
    },
    /// Its container has the wanted spec under another name (a replacement whose launcher
    /// stopped before its last step): give it the instance's name, which is free.
    Rename { id: String, name: String },
    /// A viking container that nothing assigns to this host.
    Remove { name: String, id: String },
}

/// The steps that make `existing` what `wanted` asks, removals first (they free ports and
/// names). `unsure` are instances whose assignment and spec disagree for a moment (the spec
/// changed, the scheduler has not caught up): their containers are left alone.
pub fn plan(
    wanted: &[Wanted<'_>],
    unsure: &BTreeSet<(ServiceId, u32)>,
    existing: &[Existing],
) -> Vec<Step> {
    let mut steps = Vec::new();
    // The container that is each wanted instance; every other container goes.
    let mut kept: BTreeSet<&str> = BTreeSet::new();
    let mut starts = Vec::new();
    for w in wanted {
        let service = w.spec.service();
        let name = schema::container_name(&service.stack, &service.job, w.instance);
        let held = |n: &str, by: &str| existing.iter().any(|e| e.name == n && e.id != by);
        // Several containers for one instance (a replacement left half-way, a hand-made
        // copy): the one with the wanted spec is it (under the instance's name first), else
        // the one under the instance's name, else the first.
        let digest = w.spec.digest();
        let mine = || {
            existing
                .iter()
                .filter(|e| e.service == service && e.instance == w.instance)
        };
        let wanted_one = mine()
            .filter(|e| e.spec == digest)
            .min_by_key(|e| e.name != name);
        let named = mine().find(|e| e.name == name);
        match (wanted_one, named) {
            (None, None) if mine().next().is_none() => starts.push(Step::Start {
                service,
                instance: w.instance,
            }),
            // A replacement under way when its launcher stopped: the new container beside
            // the old one, which still serves under the instance's name. It goes on where it
            // was (the new one must be ready before the old one stops); removing the old one
            // now would leave the instance to a container that may not serve yet.
            (Some(new), Some(old)) if new.id != old.id => {
                kept.extend([new.id.as_str(), old.id.as_str()]);
                starts.push(Step::Replace {
                    service,
                    instance: w.instance,
                    id: old.id.clone(),
                    beside: new.name.clone(),
                    started: Some(new.id.clone()),
                });
            }
            (Some(e), _) => {
                kept.insert(&e.id);
                if e.name != name && !held(&name, &e.id) {
                    starts.push(Step::Rename {
                        id: e.id.clone(),
                        name,
                    });
                }
                if should_restart(w.spec, e.state) {
                    starts.push(Step::Restart {
                        service,
                        instance: w.instance,
                        id: e.id.clone(),
                    });
                }
            }
            (None, e) => {
                let e = e.or_else(|| mine().next()).expect("one exists");
                kept.insert(&e.id);
                // The new container starts beside the old one under a name the old one
                // does not hold; while a container on its way out still holds it, the
                // replacement waits for the next round.
                let next = format!("{name}-next");
                let beside = if e.name == next { name } else { next };
                if !held(&beside, &e.id) {
                    starts.push(Step::Replace {
                        service,
                        instance: w.instance,
                        id: e.id.clone(),
                        beside,
                        started: None,
                    });
                }
            }
        }
    }
    for e in existing {
        if unsure.contains(&(e.service.clone(), e.instance)) || kept.contains(e.id.as_str()) {
            continue;
        }
        steps.push(Step::Remove {
            name: e.name.clone(),
            id: e.id.clone(),
        });
    }
    steps.extend(starts);
    steps
}

/// Whether a stopped container of `spec` should be started again by the launcher (Docker's
/// policy did not, or was told not to).
fn should_restart(spec: &JobSpec, state: RunState) -> bool {
    match state {
        RunState::Running | RunState::Starting => false,
        // Created but never started: a start that failed half-way.
        RunState::Exited(None) => true,
        RunState::Exited(Some(code)) => match spec.restart_policy() {
            Restart::Always => true,
            Restart::OnFailure => code != 0,
            Restart::Never => false,
        },
    }
}

/// What to report of an instance whose container is `e`: its state, reason and exit code.
pub fn status_of(spec: &JobSpec, e: &Existing) -> (InstanceState, Option<i64>) {
    match e.state {
        RunState::Running => (InstanceState::Running, None),
        RunState::Starting | RunState::Exited(None) => (InstanceState::Starting, None),
        RunState::Exited(Some(0)) if spec.kind == JobKind::Task => (InstanceState::Exited, Some(0)),
        RunState::Exited(Some(code)) => (InstanceState::Failed, Some(code)),
    }
}

/// What a container on its way out (no longer assigned) is reported as: `running` while it
/// runs, else `exited` with its code.
pub fn status_of_stopping(e: &Existing) -> (InstanceState, Option<i64>) {
    match e.state {
        RunState::Running | RunState::Starting => (InstanceState::Running, None),
        RunState::Exited(code) => (InstanceState::Exited, code),
    }
}

#[cfg(test)]
mod tests {
    use schema::{JobName, StackName};

    use super::*;

    fn spec(job: &str) -> JobSpec {
        JobSpec::new(
            StackName::new("app").unwrap(),
            JobName::new(job).unwrap(),
            "busybox",
        )
    }

    fn existing(spec: &JobSpec, instance: u32, state: RunState) -> Existing {
        Existing {
            id: format!("id-{}-{instance}", spec.job),
            name: schema::container_name(&spec.stack, &spec.job, instance),
            service: spec.service(),
            instance,
            spec: spec.digest(),
            state,
            restarts: 0,
            host: Some("node-a".into()),
            health: Default::default(),
        }
    }

    #[test]
    fn starts_what_is_missing_keeps_what_runs_and_removes_what_is_not_assigned() {
        let web = spec("web");
        let old = spec("old");
        let wanted = [
            Wanted {
                instance: 0,
                spec: &web,
            },
            Wanted {
                instance: 1,
                spec: &web,
            },
        ];
        let have = [
            existing(&web, 0, RunState::Running),
            existing(&web, 2, RunState::Running),
            existing(&old, 0, RunState::Running),
        ];
        let steps = plan(&wanted, &BTreeSet::new(), &have);
        assert_eq!(
            steps,
            [
                Step::Remove {
                    name: "app_web_2".into(),
                    id: "id-web-2".into()
                },
                Step::Remove {
                    name: "app_old_0".into(),
                    id: "id-old-0".into()
                },
                Step::Start {
                    service: web.service(),
                    instance: 1
                },
            ]
        );
    }

    #[test]
    fn a_changed_spec_is_replaced_unless_the_assignment_is_behind() {
        let web = spec("web");
        let mut newer = web.clone();
        newer.image = "busybox:2".into();
        let wanted = [Wanted {
            instance: 0,
            spec: &newer,
        }];
        let have = [existing(&web, 0, RunState::Running)];
        assert_eq!(
            plan(&wanted, &BTreeSet::new(), &have),
            [Step::Replace {
                service: web.service(),
                instance: 0,
                id: "id-web-0".into(),
                beside: "app_web_0-next".into(),
                started: None,
            }]
        );
        // Assignment and spec disagree: not wanted yet, but not removed either.
        let unsure = BTreeSet::from([(web.service(), 0)]);
        assert!(plan(&[], &unsure, &have).is_empty());
    }

    #[test]
    fn a_replacement_left_half_way_is_finished_without_touching_what_serves() {
        let web = spec("web");
        let mut newer = web.clone();
        newer.image = "busybox:2".into();
        let beside = |e: &Existing| Existing {
            id: format!("{}-next", e.id),
            name: format!("{}-next", e.name),
            ..e.clone()
        };
        let wanted = |spec| [Wanted { instance: 0, spec }];
        // Stopped after the old one went, before the rename: the new one gets the name.
        let only_next = beside(&existing(&newer, 0, RunState::Running));
        assert_eq!(
            plan(
                &wanted(&newer),
                &BTreeSet::new(),
                std::slice::from_ref(&only_next)
            ),
            [Step::Rename {
                id: "id-web-0-next".into(),
                name: "app_web_0".into()
            }]
        );
        // Stopped with both running: the replacement goes on (the old one serves until the
        // new one is ready).
        let old = existing(&web, 0, RunState::Running);
        let new = beside(&existing(&newer, 0, RunState::Running));
        assert_eq!(
            plan(
                &wanted(&newer),
                &BTreeSet::new(),
                &[old.clone(), new.clone()]
            ),
            [Step::Replace {
                service: web.service(),
                instance: 0,
                id: "id-web-0".into(),
                beside: "app_web_0-next".into(),
                started: Some("id-web-0-next".into()),
            }]
        );
        // Two copies of the wanted spec: the one under the instance's name is it.
        let copy = existing(&newer, 0, RunState::Running);
        let steps = plan(&wanted(&newer), &BTreeSet::new(), &[new.clone(), copy]);
        assert_eq!(
            steps,
            [Step::Remove {
                name: "app_web_0-next".into(),
                id: "id-web-0-next".into()
            }]
        );
        // The spec changed again meanwhile: the new one starts under the name the serving
        // one does not hold; never under `-next`, which would remove what serves.
        let mut newest = newer.clone();
        newest.image = "busybox:3".into();
        assert_eq!(
            plan(&wanted(&newest), &BTreeSet::new(), &[only_next]),
            [Step::Replace {
                service: web.service(),
                instance: 0,
                id: "id-web-0-next".into(),
                beside: "app_web_0".into(),
                started: None,
            }]
        );
        // With both there, neither of the wanted spec: the one under the instance's name is
        // kept and replaced once the other, on its way out, gives back `-next`.
        let steps = plan(&wanted(&newest), &BTreeSet::new(), &[new, old]);
        assert_eq!(
            steps,
            [Step::Remove {
                name: "app_web_0-next".into(),
                id: "id-web-0-next".into()
            }]
        );
    }

    #[test]
    fn stopped_containers_follow_the_restart_policy() {
        let web = spec("web");
        let mut task = spec("migrate");
        task.kind = JobKind::Task;
        let mut retry = task.clone();
        retry.restart = Some(Restart::OnFailure);
        let cases = [
            (&web, RunState::Exited(Some(0)), true),
            (&web, RunState::Exited(Some(1)), true),
            (&web, RunState::Exited(None), true),
            (&web, RunState::Starting, false),
            (&task, RunState::Exited(Some(0)), false),
            (&task, RunState::Exited(Some(3)), false),
            (&retry, RunState::Exited(Some(3)), true),
            (&retry, RunState::Exited(Some(0)), false),
        ];
        for (spec, state, restart) in cases {
            let wanted = [Wanted { instance: 0, spec }];
            let steps = plan(&wanted, &BTreeSet::new(), &[existing(spec, 0, state)]);
            assert_eq!(!steps.is_empty(), restart, "{} {state:?}", spec.job);
        }
        assert_eq!(
            status_of(&task, &existing(&task, 0, RunState::Exited(Some(0)))),
            (InstanceState::Exited, Some(0))
        );
        assert_eq!(
            status_of(&task, &existing(&task, 0, RunState::Exited(Some(3)))),
            (InstanceState::Failed, Some(3))
        );
    }
}
