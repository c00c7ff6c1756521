//! Domain names the router serves: `example.com`, `www.example.com`, `*.apps.example.com`.
//!
//! A [`Domain`] exists only after [`Domain::new`] checked it, so `routes/<domain>` and
//! `certs/<domain>` can never hold a `/`, an empty segment or anything but a DNS name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a domain must be, quoted in every error.
pub const DOMAIN_RULE: &str = "a DNS name in ASCII (punycode for international names): labels of \
1-63 characters of a-z, 0-9 and '-', not starting or ending with '-', separated by '.', at most \
253 characters; a wildcard only as the whole first label of a name with at least two more \
(`*.apps.example.com`)";

/// A checked domain name, lower-case; a wildcard starts with `*.`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Domain(String);

/// A domain that broke [`DOMAIN_RULE`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid domain {value:?}: {problem}; a domain must be {DOMAIN_RULE}")]
pub struct DomainError {
    pub value: String,
    pub problem: String,
}

impl Domain {
    /// Checks `value`; upper-case letters are folded (DNS names are case-insensitive) and one
    /// trailing `.` (the root) is dropped.
    pub fn new(value: &str) -> Result<Self, DomainError> {
        let bad = |problem: String| DomainError {
            value: value.to_owned(),
            problem,
        };
        let name = value
            .strip_suffix('.')
            .unwrap_or(value)
            .to_ascii_lowercase();
        if name.is_empty() {
            return Err(bad("it is empty".into()));
        }
        if name.len() > 253 {
            return Err(bad(format!("it is {} characters long", name.len())));
        }
        let (wildcard, rest) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, name.as_str()),
        };
        let labels: Vec<&str> = rest.split('.').collect();
        if wildcard && labels.len() < 2 {
            return Err(bad(
                "a wildcard must cover a name of at least two labels, e.g. *.apps.example.com"
                    .into(),
            ));
        }
        for label in &labels {
            let problem = if label.is_empty() {
                Some("it has an empty label ('..', or a leading '.')".to_owned())
            } else if label.len() > 63 {
                Some(format!("label {label:?} is longer than 63 characters"))
            } else if label.contains('*') {
                Some("'*' may only be the whole first label".to_owned())
            } else if !label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                Some(format!(
                    "label {label:?} has a character other than a-z, 0-9 and '-'"
                ))
            } else if label.starts_with('-') || label.ends_with('-') {
                Some(format!("label {label:?} starts or ends with '-'"))
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(bad(problem));
            }
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }

    /// For a wildcard, the name it covers the subdomains of (`apps.example.com`).
    pub fn wildcard_base(&self) -> Option<&str> {
        self.0.strip_prefix("*.")
    }

    /// The file stem under `--certs` (`_.example.com` for `*.example.com`).
    pub fn file_stem(&self) -> String {
        match self.wildcard_base() {
            Some(base) => format!("_.{base}"),
            None => self.0.clone(),
        }
    }

    /// The domain a `--certs` file stem names (`_.example.com` is `*.example.com`).
    pub fn from_file_stem(stem: &str) -> Result<Self, DomainError> {
        match stem.strip_prefix("_.") {
            Some(base) => Self::new(&format!("*.{base}")),
            None => Self::new(stem),
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Domain {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for Domain {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<Domain> for String {
    fn from(d: Domain) -> String {
        d.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_wildcards_are_accepted_and_folded() {
        assert_eq!(Domain::new("Example.COM.").unwrap().as_str(), "example.com");
        let w = Domain::new("*.apps.example.com").unwrap();
        assert!(w.is_wildcard());
        assert_eq!(w.wildcard_base(), Some("apps.example.com"));
        assert_eq!(w.file_stem(), "_.apps.example.com");
        assert_eq!(Domain::from_file_stem("_.apps.example.com").unwrap(), w);
        assert!(Domain::new("intranet").is_ok());
    }

    #[test]
    fn bad_names_say_what_is_wrong() {
        for (bad, why) in [
            ("", "empty"),
            ("a..b", "empty label"),
            ("a/b.com", "character other"),
            ("-a.com", "starts or ends"),
            ("a.*.com", "'*' may only"),
            ("*.com", "at least two labels"),
            ("ex ample.com", "character other"),
            ("bücher.de", "character other"),
        ] {
            let e = Domain::new(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        assert!(Domain::new(&format!("{}.com", "a".repeat(64))).is_err());
    }
}
