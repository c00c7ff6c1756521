//! Docker-link environment naming (docs/contract.md, "The docker-link environment").
//!
//! A link `shared/mongo` has the link name `shared_mongo` and the env prefix `SHARED_MONGO`;
//! its vars point at the ambassador (`A:N`), not at the backend, so they hold on every host.

use std::collections::BTreeMap;

use crate::service::Proto;

/// The link name: the alias with `/` replaced by `_` (`shared/mongo` -> `shared_mongo`).
pub fn link_name(alias: &str) -> String {
    alias.replace('/', "_")
}

/// The env prefix: the alias upper-cased, every character outside `[A-Z0-9]` turned into `_`.
pub fn env_prefix(alias: &str) -> String {
    alias
        .chars()
        .map(|c| match c.to_ascii_uppercase() {
            c @ ('A'..='Z' | '0'..='9') => c,
            _ => '_',
        })
        .collect()
}

/// Two links of one job whose env vars would overwrite each other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "links {first:?} and {second:?} both give the env prefix {prefix}: their variables would \
overwrite each other; rename one of the jobs or stacks"
)]
pub struct EnvPrefixCollision {
    pub first: String,
    pub second: String,
    pub prefix: String,
}

/// Checks that the aliases of one job's links have distinct env prefixes.
pub fn check_prefix_collisions<'a>(
    aliases: impl IntoIterator<Item = &'a str>,
) -> Result<(), EnvPrefixCollision> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for alias in aliases {
        let prefix = env_prefix(alias);
        if let Some(first) = seen.get(&prefix) {
            if *first != alias {
                return Err(EnvPrefixCollision {
                    first: (*first).to_owned(),
                    second: alias.to_owned(),
                    prefix,
                });
            }
        }
        seen.insert(prefix, alias);
    }
    Ok(())
}

/// One exposed port of a linked job and the ambassador port that serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkPort {
    pub port: u16,
    pub proto: Proto,
    pub ambassador_port: u16,
}

/// The env vars one link gives a container named `container_name`, with the ambassador
/// reachable at `addr`. Sorted by name, as `docker inspect` shows them.
pub fn link_env(
    alias: &str,
    container_name: &str,
    addr: &str,
    ports: &[LinkPort],
) -> Vec<(String, String)> {
    let p = env_prefix(alias);
    let mut env = BTreeMap::new();
    let mut sorted = ports.to_vec();
    sorted.sort_by_key(|lp| (lp.port, lp.proto));
    for lp in &sorted {
        let proto = lp.proto.as_str();
        let upper = proto.to_ascii_uppercase();
        let n = lp.ambassador_port;
        let base = format!("{p}_PORT_{}_{upper}", lp.port);
        env.insert(base.clone(), format!("{proto}://{addr}:{n}"));
        env.insert(format!("{base}_ADDR"), addr.to_owned());
        env.insert(format!("{base}_PORT"), n.to_string());
        env.insert(format!("{base}_PROTO"), proto.to_owned());
        // The design notes' convenience form; the first protocol of a port wins.
        env.entry(format!("{p}_PORT_{}", lp.port))
            .or_insert_with(|| format!("{addr}:{n}"));
    }
    if let Some(first) = sorted.first() {
        env.insert(
            format!("{p}_PORT"),
            format!("{}://{addr}:{}", first.proto, first.ambassador_port),
        );
    }
    env.insert(
        format!("{p}_NAME"),
        format!("/{container_name}/{}", link_name(alias)),
    );
    env.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_prefixes() {
        let table = [
            ("shared/mongo", "shared_mongo", "SHARED_MONGO"),
            ("middleware", "middleware", "MIDDLEWARE"),
            ("a-b/c-d", "a-b_c-d", "A_B_C_D"),
        ];
        for (alias, name, prefix) in table {
            assert_eq!(link_name(alias), name);
            assert_eq!(env_prefix(alias), prefix);
        }
    }

    #[test]
    fn detects_collisions() {
        let err = check_prefix_collisions(["shared/mongo", "web", "shared-mongo"]).unwrap_err();
        assert_eq!(err.prefix, "SHARED_MONGO");
        assert!(
            err.to_string()
                .contains("\"shared/mongo\" and \"shared-mongo\"")
        );
        assert!(check_prefix_collisions(["shared/mongo", "shared/mongo", "x"]).is_ok());
    }

    #[test]
    fn docker_link_shapes() {
        let env = link_env(
            "shared/mongo",
            "app-web-0",
            "172.17.0.1",
            &[
                LinkPort {
                    port: 28017,
                    proto: Proto::Tcp,
                    ambassador_port: 20001,
                },
                LinkPort {
                    port: 27017,
                    proto: Proto::Udp,
                    ambassador_port: 20002,
                },
                LinkPort {
                    port: 27017,
                    proto: Proto::Tcp,
                    ambassador_port: 20000,
                },
            ],
        );
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("SHARED_MONGO_PORT"), Some("tcp://172.17.0.1:20000"));
        assert_eq!(
            get("SHARED_MONGO_PORT_27017_TCP"),
            Some("tcp://172.17.0.1:20000")
        );
        assert_eq!(get("SHARED_MONGO_PORT_27017_TCP_ADDR"), Some("172.17.0.1"));
        assert_eq!(get("SHARED_MONGO_PORT_27017_TCP_PORT"), Some("20000"));
        assert_eq!(get("SHARED_MONGO_PORT_27017_TCP_PROTO"), Some("tcp"));
        assert_eq!(
            get("SHARED_MONGO_PORT_27017_UDP"),
            Some("udp://172.17.0.1:20002")
        );
        assert_eq!(get("SHARED_MONGO_PORT_27017"), Some("172.17.0.1:20000"));
        assert_eq!(get("SHARED_MONGO_PORT_28017"), Some("172.17.0.1:20001"));
        assert_eq!(get("SHARED_MONGO_NAME"), Some("/app-web-0/shared_mongo"));
        assert_eq!(env.len(), 3 * 4 + 2 + 2);
    }
}
