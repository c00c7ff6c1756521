//! `viking ui`: the cluster on one live page. One resuming watch of the whole prefix (as the
//! daemons watch theirs) feeds a model ([`model`]) in sections; a change rebuilds, at most
//! every 100 ms, only the sections its keys show in. The page gets the whole model on load
//! and, as server-sent events, the sections that changed since it was last sent each.
//! hyper's HTTP/1.1, as the router's admin server; the page (HTML, CSS and a little
//! JavaScript, no build step and nothing fetched from elsewhere) is built into the binary.
//!
//! Security: 127.0.0.1 by default; any other `--listen` needs `--token`, which every request
//! must carry (`Authorization: Bearer`, `?token=`, or the HttpOnly cookie the page's answer
//! sets, which the page's own requests and its event stream send).
//! Env values are never pushed: a job's come on request (`/api/env`), with the same token.

pub mod model;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_client::Client;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use runtime::CancellationToken;
use runtime::watch::{self, Kv, WatchUpdate};
use schema::{Dir, Prefix};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::HqError;

const INDEX: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/style.css");

/// `viking ui`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct UiArgs {
    /// Where the page is served; an address other than loopback needs --token
    #[arg(long, env = "VIKING_UI_LISTEN", default_value = "127.0.0.1:9180")]
    pub listen: SocketAddr,

    /// A secret every request must carry (open the page as http://ADDR/?token=SECRET)
    #[arg(long, env = "VIKING_UI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// The server's state.
struct Ui {
    prefix: Prefix,
    token: Option<String>,
    kvs: Mutex<BTreeMap<String, Kv>>,
    /// The model as published.
    model: tokio::sync::watch::Sender<Arc<Published>>,
}

/// The model's sections as JSON text, each with the number of the rebuild that last changed
/// it, so every event stream sends what changed since it last sent that section.
#[derive(Debug, Default, Clone)]
struct Published {
    version: u64,
    etcd: bool,
    at: String,
    /// Shared by every published version: a rebuild copies only the sections it changed.
    sections: BTreeMap<model::Section, (u64, Arc<str>)>,
}

impl Published {
    /// `{"etcd":…,"at":…, "<section>": …}` with the sections newer than `sent` (all for an
    /// empty one), which is brought up to date.
    fn patch(&self, sent: &mut BTreeMap<model::Section, u64>) -> String {
        let mut out = format!(
            "{{\"etcd\":{},\"at\":{}",
            self.etcd,
            serde_json::Value::from(self.at.as_str())
        );
        for (section, (version, json)) in &self.sections {
            if sent.get(section).is_some_and(|v| v >= version) {
                continue;
            }
            sent.insert(*section, *version);
            out.push_str(&format!(",\"{}\":{json}", section.name()));
        }
        out.push('}');
        out
    }
}

/// Checks the flags, then serves until `shutdown`. etcd may be away: the page says so and
/// fills in when it answers.
pub async fn serve(
    etcd: &runtime::EtcdArgs,
    args: UiArgs,
    shutdown: CancellationToken,
) -> Result<(), HqError> {
    if !args.listen.ip().is_loopback() && args.token.as_deref().is_none_or(str::is_empty) {
        return Err(HqError::Input(format!(
            "--listen {}: an address other than loopback shows the cluster (and, on request, \
             its env values) to the network; pass --token SECRET (or VIKING_UI_TOKEN), which \
             every request must carry, or listen on 127.0.0.1",
            args.listen
        )));
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| {
            HqError::Input(format!(
                "cannot listen on --listen {}: {e}; pick another address",
                args.listen
            ))
        })?;
    let addr = listener.local_addr().unwrap_or(args.listen);
    let client = etcd.connect_daemon(&shutdown).await?;
    let ui = Arc::new(Ui {
        prefix: etcd.prefix.clone(),
        token: args.token.clone(),
        kvs: Mutex::default(),
        model: tokio::sync::watch::channel(Arc::new(Published::default())).0,
    });
    tokio::spawn(follow(ui.clone(), client, shutdown.clone()));
    let shown = if args.token.is_some() {
        format!("http://{addr}/?token=…")
    } else {
        format!("http://{addr}/")
    };
    info!(listen = %addr, "viking ui serving the cluster at {shown}");
    eprintln!("viking ui: {shown}");
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => return Ok(()),
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let ui = ui.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(ui.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// etcd into the model: a change marks the sections it shows in stale, rebuilt at most every
/// 100 ms; the traffic history takes a sample every 5 s.
async fn follow(ui: Arc<Ui>, client: Client, stop: CancellationToken) {
    let (tx, mut rx) = mpsc::channel(64);
    let root = format!("{}/", ui.prefix.as_str());
    tokio::spawn(watch::watch_prefix(client, root, tx, stop.clone()));
    let started = Instant::now();
    let mut traffic = model::Traffic::default();
    let mut sample = tokio::time::interval(ambassador::stats::EVERY);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published = Published::default();
    let mut seen = false;
    let mut stale = model::Sections::NONE;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            u = rx.recv() => {
                let Some(u) = u else { return };
                seen |= matches!(u, WatchUpdate::Snapshot { .. });
                let mut kvs = ui.kvs.lock().expect("kvs lock");
                stale.add(apply(&ui.prefix, &mut kvs, u));
                while let Ok(more) = rx.try_recv() {
                    stale.add(apply(&ui.prefix, &mut kvs, more));
                }
            }
            _ = sample.tick() => {
                let stats = {
                    let kvs = ui.kvs.lock().expect("kvs lock");
                    stats_records(&ui.prefix, &kvs)
                };
                traffic.record(started.elapsed().as_secs_f64(), &stats);
                stale.add(model::Sections::of(&[model::Section::Traffic]));
            }
        }
        if !seen || stale.is_empty() {
            continue;
        }
        // More changes in the next 100 ms go into the same rebuild.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let built = {
            let mut kvs = ui.kvs.lock().expect("kvs lock");
            while let Ok(more) = rx.try_recv() {
                stale.add(apply(&ui.prefix, &mut kvs, more));
            }
            model::sections(&ui.prefix, &kvs, &traffic, std::mem::take(&mut stale))
        };
        published.version += 1;
        published.etcd = true;
        published.at = runtime::host::rfc3339_now();
        for (section, value) in built {
            let json = value.to_string();
            // Unchanged text (a rewrite of the same record) is not sent again.
            if published
                .sections
                .get(&section)
                .is_none_or(|(_, old)| **old != *json)
            {
                published
                    .sections
                    .insert(section, (published.version, json.into()));
            }
        }
        // A copy of the map of shared section texts, not of the texts.
        ui.model.send_replace(Arc::new(published.clone()));
    }
}

/// Applies a watch update to `kvs`; returns the sections it shows in (all for a snapshot).
fn apply(prefix: &Prefix, kvs: &mut BTreeMap<String, Kv>, update: WatchUpdate) -> model::Sections {
    let mut stale = model::Sections::NONE;
    match &update {
        WatchUpdate::Snapshot { .. } => stale = model::Sections::ALL,
        WatchUpdate::Changes { changes, .. } => {
            for change in changes {
                let (key, after) = match change {
                    watch::Change::Put(kv) => (&kv.key, Some(kv)),
                    watch::Change::Delete { key, .. } => (key, None),
                };
                stale.add(model::touched(prefix, key, kvs.get(key), after));
            }
        }
    }
    watch::apply(kvs, update);
    stale
}

fn stats_records(
    prefix: &Prefix,
    kvs: &BTreeMap<String, Kv>,
) -> BTreeMap<String, schema::records::StatsRecord> {
    let dir = prefix.dir(Dir::Stats);
    kvs.range(dir.clone()..)
        .take_while(|(k, _)| k.starts_with(&dir))
        .filter_map(|(k, kv)| {
            serde_json::from_slice(&kv.value)
                .ok()
                .map(|r| (k[dir.len()..].to_owned(), r))
        })
        .collect()
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-store")
        // Nothing from anywhere else: scripts, styles and data come from this server.
        .header(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'",
        )
        .header("x-content-type-options", "nosniff")
        .body(Full::new(body.into()).boxed_unsync())
        .expect("a valid response")
}

/// The query parameter `name`, decoded (`application/x-www-form-urlencoded`).
fn query<'a>(req: &'a Request<Incoming>, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    form_urlencoded::parse(req.uri().query()?.as_bytes())
        .find_map(|(k, v)| (k == name).then_some(v))
}

/// Whether the request carries the token (always, without one).
fn allowed(ui: &Ui, req: &Request<Incoming>) -> bool {
    let Some(token) = ui.token.as_deref() else {
        return true;
    };
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // The page's own requests (its script, style and event stream) carry the cookie the
    // page's answer set.
    let cookie = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(COOKIE)
                .and_then(|c| c.strip_prefix('='))
        });
    let given = bearer
        .or(cookie)
        .map(std::borrow::Cow::Borrowed)
        .or_else(|| query(req, "token"));
    given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()))
}

/// The cookie that carries the token for the page's own requests (an `EventSource` and a
/// `<script src>` send no header of ours).
const COOKIE: &str = "viking_ui_token";

/// Compares without stopping at the first difference (the time says nothing of the token).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn answer(ui: Arc<Ui>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.method() != http::Method::GET {
        return Ok(full(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "the page is read-only: GET only\n",
        ));
    }
    if !allowed(&ui, &req) {
        return Ok(full(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "a token is required: open the page as /?token=SECRET (viking ui --token)\n",
        ));
    }
    let response = match req.uri().path() {
        "/" => {
            let mut page = full(StatusCode::OK, "text/html; charset=utf-8", INDEX);
            if let Some(token) = &ui.token {
                let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
                if let Ok(value) = http::HeaderValue::from_str(&cookie) {
                    page.headers_mut().insert(header::SET_COOKIE, value);
                }
            }
            page
        }
        "/app.js" => full(StatusCode::OK, "text/javascript; charset=utf-8", SCRIPT),
        "/style.css" => full(StatusCode::OK, "text/css; charset=utf-8", STYLE),
        "/api/model" => {
            let model = ui.model.borrow().clone();
            full(
                StatusCode::OK,
                "application/json",
                model.patch(&mut BTreeMap::new()),
            )
        }
        "/api/env" => {
            let job = query(&req, "job").unwrap_or_default().into_owned();
            let env = {
                let kvs = ui.kvs.lock().expect("kvs lock");
                model::env(&ui.prefix, &kvs, &job)
            };
            match env {
                Some(env) => full(StatusCode::OK, "application/json", env.to_string()),
                None => full(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    format!("no deployed job {job:?}; pass ?job=STACK/JOB\n"),
                ),
            }
        }
        "/events" => events(&ui),
        "/healthz" => full(StatusCode::OK, "text/plain", "ok\n"),
        _ => full(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    };
    Ok(response)
}

/// Server-sent events: the whole model now, then after every rebuild the sections that
/// changed since this stream last sent them (the page merges them into what it has); a
/// comment every 15 s keeps proxies from closing a quiet stream.
fn events(ui: &Ui) -> Response<Body> {
    let rx = ui.model.subscribe();
    let sent: BTreeMap<model::Section, u64> = BTreeMap::new();
    let stream =
        futures_util::stream::unfold((rx, sent, true), |(mut rx, mut sent, first)| async move {
            if !first {
                match tokio::time::timeout(Duration::from_secs(15), rx.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return None,
                    Err(_) => {
                        let ping = Bytes::from_static(b": keep-alive\n\n");
                        return Some((Ok::<_, Infallible>(Frame::data(ping)), (rx, sent, false)));
                    }
                }
            }
            let model = rx.borrow_and_update().clone();
            let event = format!(
                "id: {}\ndata: {}\n\n",
                model.version,
                model.patch(&mut sent)
            );
            Some((Ok(Frame::data(Bytes::from(event))), (rx, sent, false)))
        });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-store")
        .body(BodyExt::boxed_unsync(StreamBody::new(stream.boxed())))
        .unwrap_or_else(|e| {
            warn!("cannot answer the event stream: {e}");
            full(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "")
        })
}
