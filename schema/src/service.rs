//! Services (`stack/job`) and service ports (`stack/job:27017/tcp`).

use std::fmt;
use std::str::FromStr;

use crate::names::{JobName, NameError, StackName};

/// The syntax of a service port, quoted in parse errors.
pub const SERVICE_PORT_SYNTAX: &str = "stack/job:PORT[/tcp|/udp], PORT 1-65535";

/// A transport protocol of a service port. `tcp` is the default when none is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Proto {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Proto {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Proto {
    type Err = ServicePortError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(ServicePortError::Proto(s.to_owned())),
        }
    }
}

/// A service: a job in a stack, written `stack/job`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceId {
    pub stack: StackName,
    pub job: JobName,
}

impl ServiceId {
    pub fn new(stack: StackName, job: JobName) -> Self {
        Self { stack, job }
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.stack, self.job)
    }
}

impl serde::Serialize for ServiceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ServiceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for ServiceId {
    type Err = ServicePortError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (stack, job) = s
            .split_once('/')
            .ok_or_else(|| ServicePortError::JobShape(s.to_owned()))?;
        Ok(Self {
            stack: StackName::new(stack)?,
            job: JobName::new(job)?,
        })
    }
}

/// A service plus a container port and protocol: what gets one ambassador port.
/// Displayed canonically with the protocol: `shared/mongo:27017/tcp`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePort {
    pub service: ServiceId,
    pub port: u16,
    pub proto: Proto,
}

impl ServicePort {
    pub fn new(service: ServiceId, port: u16, proto: Proto) -> Result<Self, ServicePortError> {
        if port == 0 {
            return Err(ServicePortError::Port(port.to_string()));
        }
        Ok(Self {
            service,
            port,
            proto,
        })
    }

    /// The `<port>-<proto>` segment used in etcd keys.
    pub fn port_segment(&self) -> String {
        format!("{}-{}", self.port, self.proto)
    }
}

impl fmt::Display for ServicePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.service, self.port, self.proto)
    }
}

/// Parses `1-65535` (no sign, no leading `+`, no zero).
pub fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

impl serde::Serialize for ServicePort {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl FromStr for ServicePort {
    type Err = ServicePortError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (service, rest) = s
            .rsplit_once(':')
            .ok_or_else(|| ServicePortError::Shape(s.to_owned()))?;
        let service: ServiceId = service.parse().map_err(|e| match e {
            ServicePortError::JobShape(_) => ServicePortError::Shape(s.to_owned()),
            other => other,
        })?;
        let (port, proto) = match rest.split_once('/') {
            Some((port, proto)) => (port, proto.parse()?),
            None => (rest, Proto::Tcp),
        };
        let port = parse_port(port).ok_or_else(|| ServicePortError::Port(port.to_owned()))?;
        Self::new(service, port, proto)
    }
}

/// Why a service port did not parse; every variant names the bad part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServicePortError {
    #[error("invalid service port {0:?}: expected {SERVICE_PORT_SYNTAX}, e.g. shared/mongo:27017")]
    Shape(String),
    #[error("invalid job {0:?}: expected stack/job, e.g. shared/mongo")]
    JobShape(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("invalid port {0:?}: a port is a whole number from 1 to 65535")]
    Port(String),
    #[error("invalid protocol {0:?}: use tcp or udp")]
    Proto(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays_canonically() {
        let table = [
            ("shared/mongo:27017", "shared/mongo:27017/tcp"),
            ("shared/mongo:27017/tcp", "shared/mongo:27017/tcp"),
            ("app/dns:53/udp", "app/dns:53/udp"),
            ("a/b:65535", "a/b:65535/tcp"),
        ];
        for (input, canonical) in table {
            let sp: ServicePort = input.parse().unwrap();
            assert_eq!(sp.to_string(), canonical);
        }
    }

    #[test]
    fn a_job_is_stack_slash_job() {
        let id: ServiceId = "shared/mongo".parse().unwrap();
        assert_eq!(id.to_string(), "shared/mongo");
        let err = "mongo".parse::<ServiceId>().unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid job \"mongo\": expected stack/job, e.g. shared/mongo"
        );
        let err = "shared/Mongo".parse::<ServiceId>().unwrap_err().to_string();
        assert!(err.starts_with("invalid job name \"Mongo\""), "{err}");
    }

    #[test]
    fn rejects_bad_input_naming_the_part() {
        let table = [
            ("Shared/Mongo:80", "invalid stack name \"Shared\""),
            ("shared/../x:80", "invalid job name \"../x\""),
            ("shared/mongo:0", "invalid port \"0\""),
            ("shared/mongo:70000", "invalid port \"70000\""),
            ("shared/mongo:+80", "invalid port \"+80\""),
            ("a/b:80/sctp", "invalid protocol \"sctp\""),
            ("mongo:80", "invalid service port \"mongo:80\""),
            ("a/b", "invalid service port \"a/b\""),
            ("a/b/c:80", "invalid job name \"b/c\""),
            ("/b:80", "invalid stack name \"\""),
        ];
        for (input, start) in table {
            let err = input.parse::<ServicePort>().unwrap_err().to_string();
            assert!(err.starts_with(start), "{input}: {err}");
        }
    }
}
