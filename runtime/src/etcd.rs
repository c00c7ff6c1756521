//! How every viking process reaches etcd: flags (each with a `VIKING_*` env twin), the
//! connection, and the errors callers branch on (retry, or report and stop).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use schema::Prefix;
use tokio_util::sync::CancellationToken;

/// Where etcd is looked for when no `--etcd` is given: a local one.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";

/// The etcd connection flags shared by every binary (`#[command(flatten)]`); global, so that
/// `viking deploy . --etcd URL` works as well as `viking --etcd URL deploy .`.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated
    #[arg(
        long = "etcd",
        env = "VIKING_ETCD",
        value_delimiter = ',',
        default_value = DEFAULT_ENDPOINT,
        value_name = "URLS",
        global = true
    )]
    pub endpoints: Vec<String>,

    /// Key prefix under which the cluster's keys live
    #[arg(long, env = "VIKING_PREFIX", default_value = schema::DEFAULT_PREFIX, value_name = "PREFIX", global = true)]
    pub prefix: Prefix,

    /// CA certificate (PEM) that signed etcd's server certificate; turns TLS on
    #[arg(
        long = "etcd-ca",
        env = "VIKING_ETCD_CA",
        value_name = "FILE",
        global = true
    )]
    pub ca: Option<PathBuf>,

    /// Client certificate (PEM) for etcd's client-cert auth; needs --etcd-key
    #[arg(
        long = "etcd-cert",
        env = "VIKING_ETCD_CERT",
        value_name = "FILE",
        requires = "key",
        global = true
    )]
    pub cert: Option<PathBuf>,

    /// Client key (PEM) for --etcd-cert
    #[arg(
        long = "etcd-key",
        env = "VIKING_ETCD_KEY",
        value_name = "FILE",
        requires = "cert",
        global = true
    )]
    pub key: Option<PathBuf>,

    /// etcd user name; needs --etcd-password
    #[arg(
        long = "etcd-user",
        env = "VIKING_ETCD_USER",
        requires = "password",
        global = true
    )]
    pub user: Option<String>,

    /// etcd password
    #[arg(
        long = "etcd-password",
        env = "VIKING_ETCD_PASSWORD",
        hide_env_values = true,
        requires = "user",
        global = true
    )]
    pub password: Option<Secret>,

    /// Time limit for connecting and for each etcd request, e.g. 5s or 500ms
    #[arg(long = "etcd-timeout", env = "VIKING_ETCD_TIMEOUT", default_value = "5s", value_parser = parse_duration, global = true)]
    pub timeout: Duration,
}

impl Default for EtcdArgs {
    fn default() -> Self {
        Self::local(vec![DEFAULT_ENDPOINT.to_owned()])
    }
}

impl EtcdArgs {
    /// Plain-text settings for `endpoints` with defaults for the rest (tests, `viking up`).
    pub fn local(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: Prefix::default(),
            ca: None,
            cert: None,
            key: None,
            user: None,
            password: None,
            timeout: Duration::from_secs(5),
        }
    }

    /// The endpoints as one line for messages.
    pub fn endpoints_display(&self) -> String {
        self.endpoints.join(",")
    }

    /// Connects lazily: this fails only on bad settings (unreadable certificate, bad URL);
    /// an unreachable etcd shows in the first request, so daemons can start while etcd is away.
    pub async fn connect(&self) -> Result<Client, EtcdError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_timeout(self.timeout)
            .with_keep_alive(Duration::from_secs(10), self.timeout)
            .with_keep_alive_while_idle(true);
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.with_user(user.clone(), password.0.clone());
        }
        if self.ca.is_some() || self.cert.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read_file(ca, "--etcd-ca")?));
            }
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(
                    read_file(cert, "--etcd-cert")?,
                    read_file(key, "--etcd-key")?,
                ));
            }
            options = options.with_tls(tls);
        }
        let endpoints: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(EtcdError::Config(
                "no etcd endpoint given; pass --etcd http://HOST:2379 or set VIKING_ETCD".into(),
            ));
        }
        Client::connect(&endpoints, Some(options))
            .await
            .map_err(|e| EtcdError::classify(e, &self.endpoints_display()))
    }
}

impl EtcdArgs {
    /// For daemons: like [`EtcdArgs::connect`], and until `shutdown` keeps the client's
    /// requests off members that do not answer (see [`crate::members`]).
    pub async fn connect_daemon(&self, shutdown: &CancellationToken) -> Result<Client, EtcdError> {
        let client = self.connect().await?;
        crate::members::spawn(self, &client, shutdown.clone());
        Ok(client)
    }

    /// For one-shot commands: like [`EtcdArgs::connect`], but with several endpoints only
    /// those that accept a TCP connection within the connect timeout are used (all of them if
    /// none does, so the error names them). etcd-client sends a request to a dead endpoint of
    /// its list instead of trying the next, so a stopped member would fail the command.
    pub async fn connect_live(&self) -> Result<Client, EtcdError> {
        if self.endpoints.len() < 2 {
            return self.connect().await;
        }
        let probes = self.endpoints.iter().map(|e| {
            let e = e.trim().to_owned();
            let timeout = self.timeout.min(Duration::from_secs(1));
            async move {
                let hostport = e
                    .trim_start_matches("http://")
                    .trim_start_matches("https://")
                    .trim_end_matches('/')
                    .to_owned();
                let ok = matches!(
                    tokio::time::timeout(timeout, tokio::net::TcpStream::connect(hostport)).await,
                    Ok(Ok(_))
                );
                (e, ok)
            }
        });
        let live: Vec<String> = futures_util::future::join_all(probes)
            .await
            .into_iter()
            .filter_map(|(e, ok)| ok.then_some(e))
            .collect();
        if live.is_empty() {
            return self.connect().await;
        }
        let mut only_live = self.clone();
        only_live.endpoints = live;
        only_live.connect().await
    }
}

fn read_file(path: &PathBuf, flag: &str) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path)
        .map_err(|e| EtcdError::Config(format!("cannot read {flag} {}: {e}", path.display())))
}

/// Parses `5s`, `500ms`, `2m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: use a number with ms, s, m or h, e.g. 5s"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {unit:?}; use ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("invalid duration {s:?}: out of range"))
}

/// A password or other secret: `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// What went wrong talking to etcd, shaped by what the caller does next.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// etcd could not be reached or had no leader: retry with backoff.
    #[error(
        "cannot reach etcd at {endpoints}: {reason}; is etcd running there? pass --etcd or set VIKING_ETCD"
    )]
    Unavailable { endpoints: String, reason: String },
    /// Our settings are wrong (bad URL, unreadable certificate, refused credentials): do not retry.
    #[error("{0}")]
    Config(String),
    /// etcd refused the request itself: a bug or a server limit; do not retry.
    #[error("etcd refused the request: {0}")]
    Rejected(String),
}

/// Bad settings are bad usage (2); etcd that cannot be reached or refuses is a failure (1).
impl crate::process::Fatal for EtcdError {
    fn exit_code(&self) -> u8 {
        match self {
            EtcdError::Config(_) => crate::process::USAGE,
            _ => crate::process::FAILURE,
        }
    }
}

impl EtcdError {
    /// Sorts a client error into retry / give up.
    pub fn classify(error: etcd_client::Error, endpoints: &str) -> Self {
        use etcd_client::Error as E;
        use tonic::Code::*;
        let unavailable = |reason: String| EtcdError::Unavailable {
            endpoints: endpoints.to_owned(),
            reason,
        };
        match error {
            E::TransportError(e) => unavailable(format!("{e}")),
            E::IoError(e) => unavailable(e.to_string()),
            E::GRpcStatus(status) => {
                let message = status.message().to_owned();
                match status.code() {
                    Unavailable | DeadlineExceeded | Cancelled | Aborted | Unknown | Internal
                    | ResourceExhausted => unavailable(if message.is_empty() {
                        format!("{:?}", status.code())
                    } else {
                        message
                    }),
                    Unauthenticated | PermissionDenied => EtcdError::Config(format!(
                        "etcd at {endpoints} refused our credentials: {message}; check --etcd-user, \
                         --etcd-password and the client certificate"
                    )),
                    _ => EtcdError::Rejected(message),
                }
            }
            E::InvalidUri(e) => EtcdError::Config(format!(
                "invalid etcd endpoint in {endpoints:?}: {e}; use URLs like http://127.0.0.1:2379"
            )),
            E::InvalidArgs(e) | E::EndpointError(e) => {
                EtcdError::Config(format!("invalid etcd settings ({endpoints}): {e}"))
            }
            E::WatchError(e) | E::LeaseKeepAliveError(e) => unavailable(e),
            other => EtcdError::Rejected(other.to_string()),
        }
    }

    /// Whether trying again later can help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, EtcdError::Unavailable { .. })
    }
}
