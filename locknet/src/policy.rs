//! What the firewall admits: members, ports open to everyone, filtered interfaces. Parsed
//! strictly from what the operator typed, with errors that name the bad value.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use schema::Proto;

/// A port open to everyone: `22`, `53/udp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpenPort {
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for OpenPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.proto)
    }
}

/// Which interfaces' incoming traffic is filtered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ifaces {
    /// Everything but loopback and Docker's bridges (`docker*`, `br-*`).
    AllButLocal,
    /// Only these (names as `ip link` shows them; `eth*` style wildcards allowed).
    Only(Vec<String>),
}

/// The whole of what locknet enforces on one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub members: BTreeSet<IpAddr>,
    pub open: BTreeSet<OpenPort>,
    pub ifaces: Ifaces,
}

/// What the operator asked for, before it becomes a [`Policy`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub router: bool,
    pub no_ssh: bool,
    pub allow: Vec<OpenPort>,
    pub ifaces: Vec<String>,
}

impl Policy {
    pub fn new(members: BTreeSet<IpAddr>, options: &Options) -> Policy {
        let mut open: BTreeSet<OpenPort> = options.allow.iter().copied().collect();
        let tcp = |port| OpenPort {
            port,
            proto: Proto::Tcp,
        };
        if !options.no_ssh {
            open.insert(tcp(22));
        }
        if options.router {
            open.insert(tcp(80));
            open.insert(tcp(443));
        }
        let ifaces = if options.ifaces.is_empty() {
            Ifaces::AllButLocal
        } else {
            Ifaces::Only(options.ifaces.clone())
        };
        Policy {
            members,
            open,
            ifaces,
        }
    }
}

/// Bad usage: exit 2.
impl runtime::Fatal for PolicyError {
    fn exit_code(&self) -> u8 {
        runtime::process::USAGE
    }
}

/// Input the operator must fix; nothing is applied while there is any.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "{value:?} ({source_name}) is not an IP address; give each cluster host's IPv4 or IPv6 \
         address, e.g. 10.0.0.1"
    )]
    Address { value: String, source_name: String },
    #[error(
        "{value:?} ({source_name}) is a network, not a host; locknet admits hosts: list each \
         host's address"
    )]
    Network { value: String, source_name: String },
    #[error(
        "--allow-port {0:?}: expected PORT or PORT/tcp or PORT/udp with PORT in 1-65535, e.g. \
         --allow-port 8443 or --allow-port 53/udp"
    )]
    Port(String),
    #[error(
        "--iface {0:?}: expected an interface name (up to 15 characters of letters, digits, \
         '-', '_', '.', optionally ending in '*'), e.g. --iface eth0"
    )]
    Iface(String),
    #[error("{why} ({source_name})")]
    NotAHost { why: String, source_name: String },
    #[error(
        "--iface {}: no such interface here (this host has {}); a rule for it would filter \
         nothing and leave the host open: fix the name, or add --iface-may-appear if it comes \
         up later",
        .absent.join(", --iface "),
        .present.join(", ")
    )]
    NoIface {
        absent: Vec<String>,
        present: Vec<String>,
    },
}

/// Parses member addresses; `source_name` says where they came from (for the error).
pub fn parse_members<'a>(
    values: impl IntoIterator<Item = &'a str>,
    source_name: &str,
) -> Result<BTreeSet<IpAddr>, PolicyError> {
    let mut out = BTreeSet::new();
    for value in values {
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        match value.parse::<IpAddr>() {
            Ok(ip) => {
                schema::check_member_addr(ip).map_err(|why| PolicyError::NotAHost {
                    why,
                    source_name: source_name.to_owned(),
                })?;
                out.insert(ip);
            }
            Err(_)
                if value.contains('/')
                    && value
                        .split('/')
                        .next()
                        .is_some_and(|a| a.parse::<IpAddr>().is_ok()) =>
            {
                return Err(PolicyError::Network {
                    value: value.to_owned(),
                    source_name: source_name.to_owned(),
                });
            }
            Err(_) => {
                return Err(PolicyError::Address {
                    value: value.to_owned(),
                    source_name: source_name.to_owned(),
                });
            }
        }
    }
    Ok(out)
}

/// A hosts file: addresses separated by white space or newlines; `#` starts a comment.
pub fn parse_hosts_file(text: &str, path: &str) -> Result<BTreeSet<IpAddr>, PolicyError> {
    let mut out = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("");
        let source = format!("{path}:{}", n + 1);
        out.extend(parse_members(line.split_whitespace(), &source)?);
    }
    Ok(out)
}

/// `8443`, `8443/tcp`, `53/udp`.
pub fn parse_open_port(s: &str) -> Result<OpenPort, PolicyError> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return Err(PolicyError::Port(s.to_owned())),
    };
    let port = schema::service::parse_port(port).ok_or_else(|| PolicyError::Port(s.to_owned()))?;
    Ok(OpenPort { port, proto })
}

/// Checks an interface name: it goes into the ruleset as a quoted string, so nothing that
/// could close the quote gets through.
/// The interfaces of this network namespace now (`/sys/class/net`), sorted.
pub fn interfaces() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The `--iface` names that match none of `present` (a name ending in `*` matches by prefix).
pub fn absent_ifaces(ifaces: &[String], present: &[String]) -> Vec<String> {
    ifaces
        .iter()
        .filter(|want| {
            !present.iter().any(|have| match want.strip_suffix('*') {
                Some(prefix) => have.starts_with(prefix),
                None => have == *want,
            })
        })
        .cloned()
        .collect()
}

/// Fails when an `--iface` matches no interface here, unless it `may_appear` later; returns
/// the absent ones.
pub fn check_ifaces(ifaces: &[String], may_appear: bool) -> Result<Vec<String>, PolicyError> {
    let present = interfaces();
    let absent = absent_ifaces(ifaces, &present);
    if absent.is_empty() || may_appear {
        return Ok(absent);
    }
    Err(PolicyError::NoIface { absent, present })
}

pub fn parse_iface(s: &str) -> Result<String, PolicyError> {
    let body = s.strip_suffix('*').unwrap_or(s);
    let ok = !body.is_empty()
        && s.len() <= 15
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(PolicyError::Iface(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_iface_is_absent_unless_a_present_one_matches_it_or_its_prefix() {
        let present = ["eth0".to_owned(), "lo".to_owned()];
        let want = ["eth0", "eth*", "enp*", "nosuch0"].map(String::from);
        assert_eq!(absent_ifaces(&want, &present), ["enp*", "nosuch0"]);
        let e = PolicyError::NoIface {
            absent: vec!["nosuch0".into()],
            present: present.to_vec(),
        };
        assert!(
            e.to_string()
                .starts_with("--iface nosuch0: no such interface here (this host has eth0, lo)"),
            "{e}"
        );
    }

    #[test]
    fn special_addresses_are_not_members() {
        let e = parse_members(["10.0.0.1", "::ffff:10.250.0.1"], "the command line").unwrap_err();
        assert_eq!(
            e.to_string(),
            "::ffff:10.250.0.1 is an IPv4 address written as IPv6, which IPv4 packets do not \
             match; write 10.250.0.1 (the command line)"
        );
        for bad in ["0.0.0.0", "255.255.255.255", "127.0.0.1"] {
            assert!(parse_members([bad], "t").is_err(), "{bad}");
        }
    }

    #[test]
    fn members_name_the_bad_value_and_where_it_came_from() {
        let ok = parse_members(["10.0.0.1", " fd00::1 ", ""], "the command line").unwrap();
        assert_eq!(ok.len(), 2);
        let e = parse_members(["10.0.0.1", "10.0.0.999"], "the command line").unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"10.0.0.999\" (the command line) is not an IP address; give each cluster host's \
             IPv4 or IPv6 address, e.g. 10.0.0.1"
        );
        let e = parse_members(["10.0.0.0/24"], "x").unwrap_err();
        assert!(matches!(e, PolicyError::Network { .. }), "{e}");
    }

    #[test]
    fn hosts_file_allows_comments_and_says_which_line_is_bad() {
        let text = "# cluster\n10.0.0.1 10.0.0.2\n\n10.0.0.3 # router\n";
        assert_eq!(parse_hosts_file(text, "hosts").unwrap().len(), 3);
        let e = parse_hosts_file("10.0.0.1\nnode-b\n", "/etc/hosts.viking").unwrap_err();
        assert!(e.to_string().contains("/etc/hosts.viking:2"), "{e}");
    }

    #[test]
    fn ports_and_ifaces() {
        assert_eq!(parse_open_port("53/udp").unwrap().to_string(), "53/udp");
        assert_eq!(parse_open_port("8443").unwrap().to_string(), "8443/tcp");
        for bad in ["0", "65536", "80/sctp", "x", ""] {
            assert!(parse_open_port(bad).is_err(), "{bad}");
        }
        assert!(parse_iface("eth0").is_ok());
        assert!(parse_iface("enp*").is_ok());
        for bad in ["", "*", "eth0\" accept", "a-very-long-interface-name"] {
            assert!(parse_iface(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ssh_unless_no_ssh_and_router_opens_web() {
        let p = Policy::new(BTreeSet::new(), &Options::default());
        let open: Vec<String> = p.open.iter().map(ToString::to_string).collect();
        assert_eq!(open, ["22/tcp"]);
        let p = Policy::new(
            BTreeSet::new(),
            &Options {
                router: true,
                no_ssh: true,
                allow: vec![parse_open_port("53/udp").unwrap()],
                ifaces: vec![],
            },
        );
        let open: Vec<String> = p.open.iter().map(ToString::to_string).collect();
        assert_eq!(open, ["53/udp", "80/tcp", "443/tcp"]);
    }
}
