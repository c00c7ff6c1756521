//! Certificates: read from PEM (a `--certs` directory, or etcd `certs/<domain>`), checked
//! (the key matches the chain, the chain covers the domain), and chosen by SNI for each new
//! TLS connection. Replacing the set swaps one `Arc`: handshakes from then on see the new
//! certificates, open connections keep the ones they were made with.
//!
//! ACME would be one more source of the same [`Loaded`] certificates; nothing else changes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use schema::Domain;

/// A certificate that cannot be served; the text names what is wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CertError(pub String);

/// A checked certificate chain with its key.
#[derive(Debug)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// The DNS names of the leaf (subject alternative names, else its common name).
    pub names: Vec<String>,
    /// End of validity of the leaf.
    pub not_after: SystemTime,
    /// Where it came from: `etcd` or the file path.
    pub source: String,
}

/// The TLS provider every server config of the router uses: ring, as the rest of the tree.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses and checks a PEM chain (leaf first) and its PEM private key.
pub fn load_pem(chain_pem: &[u8], key_pem: &[u8], source: &str) -> Result<Loaded, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            CertError(format!(
                "{source}: the chain is not PEM certificates ({e}); give the leaf certificate \
                 first, then its intermediates, each as -----BEGIN CERTIFICATE-----"
            ))
        })?;
    if chain.is_empty() {
        return Err(CertError(format!(
            "{source}: no certificate in the chain; give the leaf certificate first, then its \
             intermediates, each as -----BEGIN CERTIFICATE-----"
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        CertError(format!(
            "{source}: the key is not a PEM private key ({e}); give a PKCS#8, PKCS#1 (RSA) or \
             SEC1 (EC) key, -----BEGIN PRIVATE KEY----- or similar"
        ))
    })?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        CertError(format!(
            "{source}: the key does not fit the certificate ({e}); give the private key of the \
             leaf certificate (the first in the chain)"
        ))
    })?;
    let (names, not_after) = leaf_info(&certified.cert[0]).map_err(|e| {
        CertError(format!(
            "{source}: the leaf certificate cannot be read: {e}"
        ))
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        names,
        not_after,
        source: source.to_owned(),
    })
}

/// The DNS names and the end of validity of a DER certificate.
fn leaf_info(der: &[u8]) -> Result<(Vec<String>, SystemTime), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.push(s.to_ascii_lowercase());
            }
        }
    }
    let secs = cert.validity().not_after.timestamp();
    let not_after = UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    Ok((names, not_after))
}

/// Whether a certificate naming `names` is valid for `domain` (a wildcard name covers one
/// label; a wildcard domain needs a wildcard name).
pub fn covers(names: &[String], domain: &Domain) -> bool {
    names.iter().any(|n| {
        n == domain.as_str()
            || (!domain.is_wildcard()
                && n.strip_prefix("*.").is_some_and(|base| {
                    domain
                        .as_str()
                        .split_once('.')
                        .is_some_and(|(_, parent)| parent == base)
                }))
    })
}

/// Checks a certificate for `domain` as `viking cert add` and the router do.
pub fn check_for(
    domain: &Domain,
    chain_pem: &[u8],
    key_pem: &[u8],
    source: &str,
) -> Result<Loaded, CertError> {
    let loaded = load_pem(chain_pem, key_pem, source)?;
    if !covers(&loaded.names, domain) {
        return Err(CertError(format!(
            "{source}: the certificate names {} and not {domain}; give the certificate made \
             for {domain}",
            if loaded.names.is_empty() {
                "no DNS name".to_owned()
            } else {
                loaded.names.join(", ")
            }
        )));
    }
    Ok(loaded)
}

/// Reads `--certs DIR`: `<domain>.crt` (or `.pem`) with `<domain>.key`, a wildcard as
/// `_.example.com.crt`. Returns what loaded and, for each file pair that did not, why.
pub fn read_dir(dir: &Path) -> (BTreeMap<Domain, Arc<Loaded>>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(format!("--certs {}: {e}", dir.display()));
            return (out, problems);
        }
    };
    let mut chains: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("crt" | "pem")))
        .collect();
    chains.sort();
    for chain in chains {
        let Some(stem) = chain.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let domain = match Domain::from_file_stem(stem) {
            Ok(d) => d,
            Err(e) => {
                problems.push(format!(
                    "{}: the file name is not a domain ({e}); name it <domain>.crt, a wildcard as \
                     _.example.com.crt",
                    chain.display()
                ));
                continue;
            }
        };
        let key = chain.with_extension("key");
        let read = std::fs::read(&chain).and_then(|c| Ok((c, std::fs::read(&key)?)));
        match read {
            Ok((c, k)) => match check_for(&domain, &c, &k, &chain.display().to_string()) {
                Ok(l) => {
                    out.insert(domain, Arc::new(l));
                }
                Err(e) => problems.push(e.to_string()),
            },
            Err(e) => problems.push(format!(
                "{} and {}: {e}; each certificate needs its key beside it",
                chain.display(),
                key.display()
            )),
        }
    }
    (out, problems)
}

/// A fingerprint of a directory's certificate files (names, sizes, modification times), to
/// notice a change without reading them.
pub fn dir_signature(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut sig: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((e.path(), m.len(), m.modified().ok()))
        })
        .collect();
    sig.sort();
    sig
}

/// The certificates served now, by domain.
#[derive(Debug, Default)]
pub struct CertStore {
    certs: RwLock<Arc<HashMap<String, Arc<Loaded>>>>,
}

impl CertStore {
    /// Replaces the set: `etcd` wins over `files` for the same domain.
    pub fn set(&self, files: &BTreeMap<Domain, Arc<Loaded>>, etcd: &BTreeMap<Domain, Arc<Loaded>>) {
        let mut map: HashMap<String, Arc<Loaded>> = HashMap::new();
        for (d, l) in files.iter().chain(etcd) {
            map.insert(d.as_str().to_owned(), Arc::clone(l));
        }
        *self.certs.write().expect("cert lock") = Arc::new(map);
    }

    pub fn all(&self) -> Arc<HashMap<String, Arc<Loaded>>> {
        self.certs.read().expect("cert lock").clone()
    }

    /// The certificate for a server name: the exact one, else the wildcard of its parent.
    pub fn find(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let certs = self.all();
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(l) = certs.get(&name) {
            return Some(l.key.clone());
        }
        let (_, parent) = name.split_once('.')?;
        certs.get(&format!("*.{parent}")).map(|l| l.key.clone())
    }
}

/// Chooses the certificate by SNI; without SNI (a client that dialled an address), the only
/// certificate when there is exactly one.
#[derive(Debug)]
pub struct Resolver(pub Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            Some(name) => self.0.find(name),
            None => {
                let certs = self.0.all();
                (certs.len() == 1)
                    .then(|| certs.values().next().map(|l| l.key.clone()))
                    .flatten()
            }
        }
    }
}

/// The server config: TLS 1.3 and 1.2, h2 then HTTP/1.1 by ALPN, certificates by SNI.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver(store)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_names_cover_one_label() {
        let names = vec!["*.example.com".to_owned(), "example.com".to_owned()];
        let d = |s: &str| s.parse::<Domain>().unwrap();
        assert!(covers(&names, &d("example.com")));
        assert!(covers(&names, &d("www.example.com")));
        assert!(!covers(&names, &d("a.b.example.com")));
        assert!(covers(&names, &d("*.example.com")));
        assert!(!covers(
            &["www.example.com".to_owned()],
            &d("*.example.com")
        ));
    }

    #[test]
    fn garbage_is_refused_with_what_to_give() {
        let e = load_pem(b"nothing", b"nothing", "x.crt")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.crt") && e.contains("BEGIN CERTIFICATE"),
            "{e}"
        );
    }
}
