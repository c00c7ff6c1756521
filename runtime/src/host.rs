//! Facts about the host a daemon runs on: its id, its addresses, its clock as RFC 3339.

use std::net::IpAddr;
use std::time::SystemTime;

use schema::HostId;

/// The `--host` flag every daemon takes (`#[command(flatten)]`; `viking up` takes it once for
/// all the daemons it runs).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HostArgs {
    /// This host's id (default: the hostname, lower-cased)
    #[arg(long = "host", env = "VIKING_HOST", value_name = "HOST")]
    pub host: Option<String>,
}

impl HostArgs {
    /// This host's id: `--host` if given, else the hostname lower-cased.
    pub fn id(&self) -> Result<HostId, HostError> {
        host_id(self.host.as_deref())
    }
}

/// This host has no usable id; the message says what to pass. Bad usage (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}; pass --host")]
pub struct HostError(String);

impl crate::process::Fatal for HostError {
    fn exit_code(&self) -> u8 {
        crate::process::USAGE
    }
}

/// This host's id: `flag` if given, else the hostname lower-cased. The error says what to pass.
pub fn host_id(flag: Option<&str>) -> Result<HostId, HostError> {
    let name = match flag {
        Some(h) => h.to_owned(),
        None => nix::unistd::gethostname()
            .map_err(|e| HostError(format!("cannot read the hostname: {e}")))?
            .to_string_lossy()
            .into_owned(),
    };
    HostId::from_hostname(&name).map_err(|e| HostError(e.to_string()))
}

/// A host's address as given on a command line (`viking host add`, `--addr`): the error says
/// what was wrong and what to give instead.
pub fn parse_addr(s: &str) -> Result<IpAddr, String> {
    s.trim().parse().map_err(|_| {
        format!(
            "{s:?} is not an IP address; give the address other hosts reach this one on, e.g. \
             10.0.0.12 or fd00::12 (a name is not resolved)"
        )
    })
}

/// The first IPv4 address of interface `name` (`docker0`, `eth0`), if it has one.
pub fn interface_addr(name: &str) -> Option<IpAddr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        if ifa.interface_name != name {
            return None;
        }
        let addr = ifa.address?;
        addr.as_sockaddr_in().map(|sin| IpAddr::V4(sin.ip()))
    })
}

/// The IPv4 address of the interface that holds the default route: the address other hosts
/// most likely reach this one on.
pub fn default_route_addr() -> Option<IpAddr> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    let iface = default_route_iface(&table)?;
    interface_addr(iface)
}

/// The interface of the default route in a `/proc/net/route` table.
fn default_route_iface(table: &str) -> Option<&str> {
    table.lines().skip(1).find_map(|line| {
        let mut cols = line.split_whitespace();
        let iface = cols.next()?;
        let destination = cols.next()?;
        let _gateway = cols.next()?;
        let flags = u32::from_str_radix(cols.next()?, 16).ok()?;
        // RTF_UP = 0x1.
        (destination == "00000000" && flags & 1 == 1).then_some(iface)
    })
}

/// Now as RFC 3339 in UTC, e.g. `2026-11-22T08:17:42Z`.
pub fn rfc3339_now() -> String {
    rfc3339(SystemTime::now())
}

/// A time as RFC 3339 in UTC, whole seconds (times before 1970 print as the epoch).
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Reads what [`rfc3339`] writes (`2026-11-22T09:37:42Z`; fractions of a second are
/// ignored); `None` for anything else.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm), the inverse of `rfc3339`.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()?;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// A duration as people read it: `45s`, `3m12s`, `2h5m`, `3d4h`.
pub fn human_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn parses_what_it_formats() {
        for secs in [0, 951_782_400, 1_795_340_262, 4_102_444_800] {
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(human_duration(Duration::from_secs(192)), "3m12s");
    }

    #[test]
    fn formats_known_instants() {
        let at = |s| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_795_340_262), "2026-11-22T09:37:42Z");
    }

    #[test]
    fn an_address_is_an_ip_address_and_the_error_says_what_to_give() {
        assert_eq!(parse_addr("10.0.0.12"), Ok(IpAddr::from([10, 0, 0, 12])));
        assert!(parse_addr("fd00::12").is_ok());
        let err = parse_addr("db.example.com").unwrap_err();
        assert!(
            err.starts_with("\"db.example.com\" is not an IP address; give the address"),
            "{err}"
        );
    }

    #[test]
    fn finds_the_default_route_interface() {
        let table = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
                     docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\n\
                     eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\n";
        assert_eq!(default_route_iface(table), Some("eth0"));
        assert_eq!(default_route_iface("Iface\tDestination\n"), None);
    }
}
