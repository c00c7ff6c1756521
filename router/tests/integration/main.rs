//! The `router` binary against a real etcd, real HTTP backends (hyper servers in the test
//! process, each on its own loopback port, registered as endpoints) and real clients (curl,
//! h2load, Python's `websockets`, raw sockets where the bytes matter).

mod http;
mod tls;
mod upgrade;
mod ws;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use etcd_client::Client;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use testkit::{Daemon, Etcd};
use tokio_util::sync::CancellationToken;

/// A real HTTP/1.1 server standing in for a web job's instance. `GET` answers JSON naming the
/// server and the forwarding headers it received; `POST /die` kills the server with the
/// request unanswered (a backend that dies mid-request); `GET /slow` answers after 3 s.
pub struct Web {
    pub name: String,
    pub addr: SocketAddr,
    pub gets: Arc<AtomicU64>,
    pub posts: Arc<AtomicU64>,
    /// Connections accepted.
    pub conns: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Web {
    pub async fn start(name: &str) -> Web {
        // A thousand clients at once need more than the default 1024 descriptors.
        runtime::process::raise_nofile();
        // Backlog 4096, as a tuned server's: a thousand connects arrive at once.
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = socket2::Socket::from(std_listener);
        socket.listen(4096).unwrap();
        socket.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(socket.into()).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let gets = Arc::new(AtomicU64::new(0));
        let posts = Arc::new(AtomicU64::new(0));
        let conns = Arc::new(AtomicU64::new(0));
        let (n, g, p, s) = (name.to_owned(), gets.clone(), posts.clone(), stop.clone());
        let accepted = conns.clone();
        tokio::spawn(async move {
            // Dropped on stop: every connection task is aborted, the listener closed.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    () = s.cancelled() => return,
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let (n, g, p, s) = (n.clone(), g.clone(), p.clone(), s.clone());
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        answer(n.clone(), g.clone(), p.clone(), s.clone(), req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Web {
            name: name.to_owned(),
            addr,
            gets,
            posts,
            conns,
            stop,
        }
    }

    /// Closes the listener and every open connection at once.
    pub fn kill(&self) {
        self.stop.cancel();
    }
}

impl Drop for Web {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn answer(
    name: String,
    gets: Arc<AtomicU64>,
    posts: Arc<AtomicU64>,
    stop: CancellationToken,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let header = |h: &str| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let seen = serde_json::json!({
        "name": name,
        "path": req.uri().path(),
        "host": header("host"),
        "xff": header("x-forwarded-for"),
        "xfp": header("x-forwarded-proto"),
        "xfh": header("x-forwarded-host"),
        "forwarded": header("forwarded"),
        "connection": header("connection"),
    });
    if req.method() == hyper::Method::POST {
        posts.fetch_add(1, Ordering::Relaxed);
        let die = req.uri().path() == "/die";
        let _ = req.into_body().collect().await;
        if die {
            stop.cancel();
            std::future::pending::<()>().await;
        }
    } else {
        gets.fetch_add(1, Ordering::Relaxed);
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        if let Some(n) = req.uri().path().strip_prefix("/big/") {
            let n: usize = n.parse().expect("/big/<bytes>");
            return Ok(hyper::Response::new(Full::new(Bytes::from(big(n)))));
        }
    }
    Ok(hyper::Response::new(Full::new(Bytes::from(
        seen.to_string(),
    ))))
}

/// What `GET /big/<n>` answers: `n` bytes of the alphabet over and over.
pub fn big(n: usize) -> String {
    (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect()
}

/// `routes/<domain>` -> `web/<job>:8080`.
pub async fn put_route(c: &mut Client, domain: &str, job: &str, https_redirect: bool) {
    let record = serde_json::json!({
        "v": 1, "stack": "web", "job": job, "port": 8080, "https_redirect": https_redirect,
    });
    c.put(format!("/viking/routes/{domain}"), record.to_string(), None)
        .await
        .unwrap();
}

/// An endpoint of `web/<job>:8080` at `addr`; `n` makes the instance key unique.
pub async fn put_endpoint(c: &mut Client, job: &str, n: u32, addr: SocketAddr) {
    c.put(endpoint_key(job, n), endpoint_value(addr), None)
        .await
        .unwrap();
}

pub fn endpoint_key(job: &str, n: u32) -> String {
    format!("/viking/services/web/{job}/8080-tcp/h1:{n:012x}:8080")
}

fn endpoint_value(addr: SocketAddr) -> String {
    serde_json::json!({
        "v": 1, "host": "h1", "addr": addr.ip().to_string(), "port": addr.port(),
        "container_id": "000000000000",
    })
    .to_string()
}

/// A running `router` on loopback ports of its own.
pub struct Router {
    pub daemon: Daemon,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
}

impl Router {
    pub fn start(etcd: &Etcd, extra: &[&str]) -> Router {
        let ports = testkit::free_ports(3);
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let (http, https, admin) = (addr(ports[0]), addr(ports[1]), addr(ports[2]));
        let mut args: Vec<String> = vec![
            "--etcd".into(),
            etcd.endpoint(),
            "--http".into(),
            http.to_string(),
            "--https".into(),
            https.to_string(),
            "--admin".into(),
            admin.to_string(),
            "--grace".into(),
            "5s".into(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut daemon = Daemon::spawn(env!("CARGO_BIN_EXE_router"), &args);
        daemon.wait_log("routes read from etcd; serving", Duration::from_secs(20));
        Router {
            daemon,
            http,
            https,
            admin,
        }
    }

    pub fn metrics(&self) -> String {
        curl(&[&format!("http://{}/metrics", self.admin)]).body
    }

    /// The value of one series of `/metrics`, named with its labels (`name{label="v"}`).
    pub fn metric(&self, series: &str) -> u64 {
        metric_value(&self.metrics(), series)
    }

    pub fn state(&self) -> serde_json::Value {
        serde_json::from_str(&curl(&[&format!("http://{}/state", self.admin)]).body).unwrap()
    }
}

/// What curl got.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub body: String,
    pub headers: BTreeMap<String, String>,
    /// `%{http_version}`: 1.1, 2.
    pub version: String,
    pub stderr: String,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// Runs curl with `args` (one request); never fails on an HTTP status.
pub fn curl(args: &[&str]) -> Got {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    let out = Command::new("curl")
        .args(["-s", "--max-time", "20", "-D"])
        .arg(&head)
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(args)
        .output()
        .expect("curl: run `make test`, which installs it");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut tail = tail.split(' ');
    let status = tail.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let version = tail.next().unwrap_or("").to_owned();
    let headers = std::fs::read_to_string(&head)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Got {
        status,
        body: body.to_owned(),
        headers,
        version,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A GET through the router's HTTP port with `Host: host`.
pub fn get(router: &Router, host: &str, path: &str) -> Got {
    curl(&[
        "-H",
        &format!("Host: {host}"),
        &format!("http://{}{path}", router.http),
    ])
}

/// The value of `series` (a name with its labels) in the text of `/metrics`.
pub fn metric_value(metrics: &str, series: &str) -> u64 {
    let prefix = format!("{series} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}
