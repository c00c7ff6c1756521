//! The Docker edge: connect, list, inspect and follow events, through bollard.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerInspectResponse, HealthStatusEnum};
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use futures_util::Stream;
use schema::Proto;

use crate::naming::{Container, Health, Port};

pub use runtime::docker::{connect, describe};

/// Every running container, inspected.
pub async fn running(docker: &Docker) -> Result<Vec<Container>, DockerError> {
    let summaries = docker
        .list_containers(Some(ListContainersOptions::default()))
        .await?;
    let mut out = Vec::with_capacity(summaries.len());
    for id in summaries.into_iter().filter_map(|s| s.id) {
        // A container that went away between list and inspect is simply not running.
        if let Some(c) = inspect(docker, &id).await? {
            out.push(c);
        }
    }
    Ok(out)
}

/// One container; `None` if Docker does not know it (any more).
pub async fn inspect(docker: &Docker, id: &str) -> Result<Option<Container>, DockerError> {
    match docker.inspect_container(id, None).await {
        Ok(r) => Ok(from_inspect(r)),
        Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Container events from `since` (Unix seconds; Docker replays what it kept since then).
pub fn events(
    docker: &Docker,
    since: u64,
) -> impl Stream<Item = Result<bollard::models::EventMessage, DockerError>> + Unpin + use<> {
    let filters = HashMap::from([("type".to_owned(), vec!["container".to_owned()])]);
    docker.events(Some(EventsOptions {
        since: Some(since.to_string()),
        filters: Some(filters),
        ..Default::default()
    }))
}

/// What an event means for a container's registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// It may serve now: inspect it and register what it publishes.
    Up,
    /// It stops serving: deregister at once, without asking Docker.
    Down,
}

/// Classifies an event action (`start`, `die`, `health_status: healthy`, ...); `None` for the
/// many that change nothing (exec, attach, rename is picked up by the next resync).
pub fn classify(action: &str) -> Option<Change> {
    match action {
        "start" | "unpause" | "health_status: healthy" => Some(Change::Up),
        "die" | "stop" | "kill" | "pause" | "destroy" | "health_status: unhealthy" => {
            Some(Change::Down)
        }
        _ => None,
    }
}

fn from_inspect(r: ContainerInspectResponse) -> Option<Container> {
    let id = r.id?;
    let config = r.config.unwrap_or_default();
    let state = r.state.unwrap_or_default();
    let network = r.network_settings.unwrap_or_default();
    let health = match state.health.and_then(|h| h.status) {
        Some(HealthStatusEnum::STARTING) => Health::Starting,
        Some(HealthStatusEnum::HEALTHY) => Health::Healthy,
        Some(HealthStatusEnum::UNHEALTHY) => Health::Unhealthy,
        Some(HealthStatusEnum::NONE | HealthStatusEnum::EMPTY) | None => Health::None,
    };
    let env = config
        .env
        .unwrap_or_default()
        .into_iter()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect();
    let bindings = network.ports.unwrap_or_default();
    let mut exposed: Vec<String> = config.exposed_ports.unwrap_or_default();
    exposed.extend(bindings.keys().cloned());
    exposed.sort();
    exposed.dedup();
    let ports = exposed
        .iter()
        .filter_map(|spec| {
            let (port, proto) = parse_port_spec(spec)?;
            let published = bindings
                .get(spec)
                .and_then(Option::as_ref)
                .map(|list| {
                    list.iter()
                        .filter_map(|b| {
                            let host_port = b.host_port.as_deref()?.parse().ok()?;
                            let ip = b
                                .host_ip
                                .as_deref()
                                .filter(|s| !s.is_empty())
                                .and_then(|s| s.parse::<IpAddr>().ok());
                            Some((ip, host_port))
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(Port {
                port,
                proto,
                published,
            })
        })
        .collect();
    // Networks in name order, so the choice is stable across inspects.
    let networks: BTreeMap<_, _> = network.networks.unwrap_or_default().into_iter().collect();
    let ip = networks.values().find_map(|n| {
        n.ip_address
            .as_deref()
            .filter(|s| !s.is_empty())
            .and_then(|s| s.parse().ok())
    });
    let addrs = networks
        .values()
        .flat_map(|n| [n.ip_address.as_deref(), n.global_ipv6_address.as_deref()])
        .flatten()
        .filter_map(|s| s.parse().ok())
        .collect();
    Some(Container {
        addrs,
        name: r
            .name
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_else(|| id.chars().take(12).collect()),
        id,
        image: config.image.unwrap_or_default(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        env,
        ports,
        ip,
        running: state.running.unwrap_or(false),
        paused: state.paused.unwrap_or(false),
        health,
        started_at: state.started_at.unwrap_or_default(),
        netns_cookie: state
            .pid
            .and_then(|pid| u32::try_from(pid).ok())
            .filter(|pid| *pid > 0 && state.running == Some(true))
            .and_then(|pid| sockmap::balance::netns_cookie_of(pid).ok()),
    })
}

/// `8080/tcp` -> (8080, tcp); other protocols (sctp) are not ours.
fn parse_port_spec(spec: &str) -> Option<(u16, Proto)> {
    let (port, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return None,
    };
    Some((schema::service::parse_port(port)?, proto))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_events_that_matter() {
        assert_eq!(classify("start"), Some(Change::Up));
        assert_eq!(classify("health_status: healthy"), Some(Change::Up));
        assert_eq!(classify("health_status: unhealthy"), Some(Change::Down));
        assert_eq!(classify("die"), Some(Change::Down));
        assert_eq!(classify("exec_start: sh"), None);
    }

    #[test]
    fn port_specs() {
        assert_eq!(parse_port_spec("53/udp"), Some((53, Proto::Udp)));
        assert_eq!(parse_port_spec("80"), Some((80, Proto::Tcp)));
        assert_eq!(parse_port_spec("132/sctp"), None);
        assert_eq!(parse_port_spec("0/tcp"), None);
    }
}
