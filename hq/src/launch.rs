//! `viking logs`: a job's containers on this host's Docker. (Starting and stopping
//! containers is the launcher's: `viking run` asks the grid.)

use std::collections::HashMap;

use bollard::Docker;
use bollard::query_parameters::{ListContainersOptions, LogsOptions};
use futures_util::StreamExt;
use schema::{JobName, StackName};

use crate::store::HqError;

/// A container of a stack as Docker has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub id: String,
    pub name: String,
    pub job: String,
    pub instance: u32,
}

/// Connects to the local Docker (`DOCKER_HOST` or the socket).
pub async fn docker() -> Result<Docker, HqError> {
    let refused = |e: bollard::errors::Error| {
        HqError::Refused(format!(
            "cannot reach Docker ({e}); start dockerd (make up and make test do) or set DOCKER_HOST"
        ))
    };
    runtime::docker::connect(None).await.map_err(refused)
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
            })
        })
        .collect())
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
