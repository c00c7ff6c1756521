//! Reaching Docker, the same way in every agent that talks to it (registrator, launcher).

use bollard::Docker;
use bollard::errors::Error as DockerError;

/// Connects to `endpoint` (`unix:///var/run/docker.sock`, a socket path, `tcp://host:2375`), or
/// to `DOCKER_HOST` / the local socket when `None`, and agrees on an API version with the
/// daemon. Fails if the daemon does not answer.
pub async fn connect(endpoint: Option<&str>) -> Result<Docker, DockerError> {
    let docker = match endpoint {
        Some(path) if path.starts_with('/') => {
            Docker::connect_with_host(&format!("unix://{path}"))?
        }
        Some(url) => Docker::connect_with_host(url)?,
        None => Docker::connect_with_defaults()?,
    };
    // Requests are small; a daemon that does not answer in 10 s is treated as gone. (Pulling
    // or starting is done with a longer timeout by whoever needs one.)
    docker
        .with_timeout(std::time::Duration::from_secs(10))
        .negotiate_version()
        .await
}

/// Where [`connect`] goes, for logs and errors.
pub fn describe(endpoint: Option<&str>) -> String {
    match endpoint {
        Some(e) => e.to_owned(),
        None => std::env::var("DOCKER_HOST")
            .unwrap_or_else(|_| "unix:///var/run/docker.sock".to_owned()),
    }
}
