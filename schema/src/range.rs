//! The range ambassador ports are handed out from (`--range`, `VIKING_PORT_RANGE`): portalloc
//! allocates inside it, and the ambassador serves nothing outside it.

use std::fmt;
use std::str::FromStr;

/// An inclusive range of ambassador ports, written `20000-29999`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub const DEFAULT: PortRange = PortRange {
        start: 20000,
        end: 29999,
    };

    pub fn new(start: u16, end: u16) -> Result<Self, RangeError> {
        if start == 0 || start > end {
            return Err(RangeError(format!("{start}-{end}")));
        }
        Ok(Self { start, end })
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }

    pub fn len(&self) -> usize {
        usize::from(self.end - self.start) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Default for PortRange {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

impl FromStr for PortRange {
    type Err = RangeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || RangeError(s.to_owned());
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let a = crate::service::parse_port(a.trim()).ok_or_else(bad)?;
        let b = crate::service::parse_port(b.trim()).ok_or_else(bad)?;
        Self::new(a, b).map_err(|_| bad())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid port range {0:?}: write FIRST-LAST with 1 <= FIRST <= LAST <= 65535, e.g. 20000-29999 \
(keep it below the kernel's ephemeral range, 32768-60999 on Linux)"
)]
pub struct RangeError(pub String);
