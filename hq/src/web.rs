//! `viking routes` and `viking cert`: the router's side of the cluster state.
//!
//! Routes are written by `viking deploy` (from each job's `domains`); this lists them with
//! their live endpoints. Certificates are put in etcd `certs/<domain>` after the same checks
//! the router makes (the key fits the chain, the chain names the domain), so a certificate
//! the router would refuse is never written.

use std::path::Path;
use std::time::SystemTime;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use schema::records::{self, CertRecord, EndpointRecord, RouteRecord};
use schema::{Dir, Domain, Key};
use serde::Serialize;

use crate::output::{Row, list};
use crate::store::{HqError, Store};

/// `viking routes`: one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteRow {
    pub domain: String,
    /// `stack/job`.
    pub service: String,
    pub port: u16,
    pub https_redirect: bool,
    /// `ADDR:PORT` of each live endpoint of that port.
    pub endpoints: Vec<String>,
}

impl Row for RouteRow {
    const HEADER: &'static [&'static str] =
        &["DOMAIN", "SERVICE", "PORT", "HTTPS-ONLY", "ENDPOINTS"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.domain.clone(),
            self.service.clone(),
            self.port.to_string(),
            if self.https_redirect { "yes" } else { "no" }.to_owned(),
            list(&self.endpoints),
        ]
    }
}

/// Every route with its live endpoints (one read of both directories).
pub async fn routes(store: &Store) -> Result<Vec<RouteRow>, HqError> {
    let read = store.read_dirs(&[Dir::Routes, Dir::Services]).await?;
    let (routes, services) = (&read[0], &read[1]);
    let mut rows = Vec::new();
    for (key, kv) in routes {
        let Ok(Key::Route(domain)) = store.prefix.parse(key) else {
            continue;
        };
        let Ok(r) = records::decode::<RouteRecord>(key, &kv.value) else {
            continue;
        };
        let port_dir = format!(
            "{}{}/{}/{}-tcp/",
            store.prefix.dir(Dir::Services),
            r.stack,
            r.job,
            r.port
        );
        let endpoints = services
            .range(port_dir.clone()..)
            .take_while(|(k, _)| k.starts_with(&port_dir))
            .filter_map(|(k, v)| records::decode::<EndpointRecord>(k, &v.value).ok())
            .map(|e| format!("{}:{}", e.addr, e.port))
            .collect();
        rows.push(RouteRow {
            domain: domain.to_string(),
            service: format!("{}/{}", r.stack, r.job),
            port: r.port,
            https_redirect: r.https_redirect,
            endpoints,
        });
    }
    Ok(rows)
}

/// `viking cert ls`: one certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertRow {
    pub domain: String,
    /// The DNS names the certificate is valid for.
    pub names: Vec<String>,
    /// RFC 3339.
    pub not_after: String,
    /// Whole days until it expires (negative: expired).
    pub days_left: i64,
    /// Why the router does not serve it, if it does not.
    pub problem: Option<String>,
}

impl Row for CertRow {
    const HEADER: &'static [&'static str] = &["DOMAIN", "EXPIRES", "DAYS", "NAMES", "PROBLEM"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.domain.clone(),
            self.not_after.clone(),
            self.days_left.to_string(),
            list(&self.names),
            self.problem.clone().unwrap_or_else(|| "-".to_owned()),
        ]
    }
}

fn days_left(not_after: SystemTime) -> i64 {
    let now = SystemTime::now();
    match not_after.duration_since(now) {
        Ok(d) => (d.as_secs() / 86_400) as i64,
        Err(e) => -((e.duration().as_secs() / 86_400) as i64) - 1,
    }
}

/// Reads and checks a certificate and key for `domain` from files; bad input names the file
/// and what to give.
fn read_cert(domain: &Domain, chain: &Path, key: &Path) -> Result<CertRecord, HqError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| {
            HqError::Input(format!(
                "{}: {e}; give the path of a PEM file this user may read",
                p.display()
            ))
        })
    };
    let (chain_pem, key_pem) = (read(chain)?, read(key)?);
    router::tls::check_for(
        domain,
        chain_pem.as_bytes(),
        key_pem.as_bytes(),
        &format!("{} with {}", chain.display(), key.display()),
    )
    .map_err(|e| HqError::Input(format!("{e}; nothing was written")))?;
    Ok(CertRecord {
        v: records::RECORD_VERSION,
        chain_pem,
        key_pem,
    })
}

/// `viking cert add`: puts (or replaces) `certs/<domain>`; routers serve it to new
/// connections at once.
pub async fn cert_add(
    store: &Store,
    domain: &Domain,
    chain: &Path,
    key: &Path,
) -> Result<CertRow, HqError> {
    let record = read_cert(domain, chain, key)?;
    let loaded = router::tls::load_pem(record.chain_pem.as_bytes(), record.key_pem.as_bytes(), "")
        .map_err(|e| HqError::Input(e.to_string()))?;
    let key_path = store.prefix.key(&Key::Cert(domain.clone()));
    store
        .txn(Txn::new().and_then([TxnOp::put(key_path, records::encode(&record), None)]))
        .await?;
    Ok(CertRow {
        domain: domain.to_string(),
        names: loaded.names,
        not_after: runtime::host::rfc3339(loaded.not_after),
        days_left: days_left(loaded.not_after),
        problem: None,
    })
}

/// `viking cert rm`.
pub async fn cert_rm(store: &Store, domain: &Domain) -> Result<(), HqError> {
    let key = store.prefix.key(&Key::Cert(domain.clone()));
    let removed = store
        .txn(
            Txn::new()
                .when([Compare::create_revision(
                    key.as_str(),
                    CompareOp::Greater,
                    0,
                )])
                .and_then([TxnOp::delete(key.as_str(), None)]),
        )
        .await?;
    if !removed {
        return Err(HqError::Refused(format!(
            "no certificate for {domain} in etcd; `viking cert ls` lists them"
        )));
    }
    Ok(())
}

/// `viking cert ls`: every certificate in etcd, with its expiry and whether the router can
/// serve it.
pub async fn cert_ls(store: &Store) -> Result<Vec<CertRow>, HqError> {
    let read = store.read_dirs(&[Dir::Certs]).await?;
    let mut rows = Vec::new();
    for (key, kv) in &read[0] {
        let Ok(Key::Cert(domain)) = store.prefix.parse(key) else {
            continue;
        };
        let row = records::decode::<CertRecord>(key, &kv.value)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                router::tls::load_pem(r.chain_pem.as_bytes(), r.key_pem.as_bytes(), key)
                    .map_err(|e| e.to_string())
            });
        rows.push(match row {
            Ok(l) => CertRow {
                domain: domain.to_string(),
                problem: (!router::tls::covers(&l.names, &domain))
                    .then(|| format!("it does not name {domain}")),
                names: l.names,
                not_after: runtime::host::rfc3339(l.not_after),
                days_left: days_left(l.not_after),
            },
            Err(e) => CertRow {
                domain: domain.to_string(),
                names: Vec::new(),
                not_after: "-".to_owned(),
                days_left: 0,
                problem: Some(e),
            },
        });
    }
    Ok(rows)
}
