//! Names that end up inside etcd key paths: stacks, jobs and hosts.
//!
//! All three follow one rule, a DNS label (`[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`), so a name can
//! never smuggle `/`, `..` or an empty segment into a key, and every name is also usable as a
//! DNS name under the service zone. A name only exists as one of the types below after it was
//! checked, so code that builds keys cannot be handed an unchecked string.

use std::fmt;

/// The rule every name follows, quoted in every error so the operator sees what is allowed.
pub const NAME_RULE: &str = "a DNS label: 1-63 characters of a-z, 0-9 and '-', \
starting and ending with a letter or digit";

/// Which kind of name failed, so the error reads `invalid stack name ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Stack,
    Job,
    Host,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Stack => "stack",
            NameKind::Job => "job",
            NameKind::Host => "host",
        })
    }
}

/// A name that broke [`NAME_RULE`]; it names the value, the rule and a fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} name {value:?}: {problem}; a name must be {NAME_RULE}{hint}")]
pub struct NameError {
    pub kind: NameKind,
    pub value: String,
    pub problem: &'static str,
    hint: String,
}

/// Checks `value` against [`NAME_RULE`].
pub fn check_name(kind: NameKind, value: &str) -> Result<(), NameError> {
    let problem = if value.is_empty() {
        Some("it is empty")
    } else if value.len() > 63 {
        Some("it is longer than 63 characters")
    } else if value.bytes().any(|b| b.is_ascii_uppercase()) {
        Some("it has upper-case letters")
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("it has a character other than a-z, 0-9 and '-'")
    } else if value.starts_with('-') || value.ends_with('-') {
        Some("it starts or ends with '-'")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => {
            let suggestion = suggest(value);
            let hint = match suggestion {
                Some(s) if s != value => format!(", e.g. {s:?}"),
                _ => String::new(),
            };
            Err(NameError {
                kind,
                value: value.to_owned(),
                problem,
                hint,
            })
        }
    }
}

/// A valid name close to `value`, offered in the error message when one exists.
fn suggest(value: &str) -> Option<String> {
    let mut s: String = value
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    let s = s.trim_matches('-');
    let s: String = s.chars().take(63).collect();
    let s = s.trim_end_matches('-').to_owned();
    (!s.is_empty()).then_some(s)
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $kind:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $ty(String);

        impl $ty {
            /// Checks `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                check_name($kind, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A stack: a group of jobs deployed together (`shared`).
    StackName,
    NameKind::Stack
);
name_type!(
    /// A job inside a stack (`mongo`).
    JobName,
    NameKind::Job
);
name_type!(
    /// A host id: by default the machine's hostname, lower-cased and checked.
    HostId,
    NameKind::Host
);

impl HostId {
    /// The host id an agent uses when none is given: the hostname, lower-cased.
    /// A hostname that is not a valid label (e.g. a dotted FQDN) keeps its first label.
    pub fn from_hostname(hostname: &str) -> Result<Self, NameError> {
        let lower = hostname.trim().to_ascii_lowercase();
        let first = lower.split('.').next().unwrap_or_default();
        Self::new(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "mongo", "shared", "a-b", "x1", "0", &"a".repeat(63)] {
            assert!(StackName::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_with_named_value_rule_and_hint() {
        let table = [
            ("", "it is empty"),
            ("Shared", "it has upper-case letters"),
            ("a/b", "it has a character other than a-z, 0-9 and '-'"),
            ("..", "it has a character other than a-z, 0-9 and '-'"),
            ("-a", "it starts or ends with '-'"),
            ("a-", "it starts or ends with '-'"),
            ("a_b", "it has a character other than a-z, 0-9 and '-'"),
        ];
        for (bad, problem) in table {
            let err = JobName::new(bad).unwrap_err();
            assert_eq!(err.problem, problem, "{bad:?}");
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("invalid job name {bad:?}")),
                "{msg}"
            );
            assert!(msg.contains(NAME_RULE), "{msg}");
        }
        let long = "a".repeat(64);
        assert_eq!(
            StackName::new(&long).unwrap_err().problem,
            "it is longer than 63 characters"
        );
        let msg = StackName::new("Shared_Mongo").unwrap_err().to_string();
        assert!(msg.ends_with(", e.g. \"shared-mongo\""), "{msg}");
    }

    #[test]
    fn host_from_hostname() {
        assert_eq!(
            HostId::from_hostname("Node-1.example.com")
                .unwrap()
                .as_str(),
            "node-1"
        );
        assert!(HostId::from_hostname("under_score").is_err());
    }
}

/// Checks that `addr` can be a cluster member's address: one host that other hosts reach. Not
/// the unspecified address, a broadcast, loopback or multicast address; not an IPv4 address
/// written as IPv6 (`::ffff:10.0.0.1`), which a firewall's IPv4 rules would not match. The
/// error says which and what to write.
pub fn check_member_addr(addr: std::net::IpAddr) -> Result<(), String> {
    use std::net::IpAddr;
    let why = match addr {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return Err(format!(
                    "{addr} is an IPv4 address written as IPv6, which IPv4 packets do not match; write {v4}"
                ));
            }
            if v6.is_unspecified() {
                "is the unspecified address (no host)"
            } else if v6.is_loopback() {
                "is loopback (this host only, never another)"
            } else if v6.is_multicast() {
                "is a multicast address (a group, not a host)"
            } else {
                return Ok(());
            }
        }
        IpAddr::V4(v4) => {
            if v4.is_unspecified() {
                "is the unspecified address (no host)"
            } else if v4.is_broadcast() {
                "is the broadcast address (every host)"
            } else if v4.is_loopback() {
                "is loopback (this host only, never another)"
            } else if v4.is_multicast() {
                "is a multicast address (a group, not a host)"
            } else {
                return Ok(());
            }
        }
    };
    Err(format!(
        "{addr} {why}; give the address other hosts reach this one on, e.g. 10.0.0.5"
    ))
}

#[cfg(test)]
mod member_addr_tests {
    use super::check_member_addr;

    #[test]
    fn a_member_address_is_one_reachable_host() {
        for ok in ["10.0.0.1", "192.168.1.5", "fd00::1", "2001:db8::5"] {
            assert_eq!(check_member_addr(ok.parse().unwrap()), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("0.0.0.0", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("224.0.0.1", "multicast"),
            ("::ffff:10.250.0.1", "write 10.250.0.1"),
        ] {
            let e = check_member_addr(bad.parse().unwrap()).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
