//! The admin server: `/metrics` (Prometheus text), `/healthz` (200 once routes were read from
//! etcd), `/state` (JSON: listeners, backends, counters). A tiny HTTP/1.0 responder: one
//! request per connection, enough for scrapers and curl, nothing to configure.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::server::Shared;

/// Serves until `shutdown` fires.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) =
                tokio::time::timeout(Duration::from_secs(5), answer(stream, &shared)).await
            {
                debug!(error = %e, "admin request timed out");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    while len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n")
            || buf[..len].windows(2).any(|w| w == b"\n\n")
        {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics_text(),
        ),
        ("GET", "/healthz") if shared.is_synced() => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", "/healthz") => (
            "503 Service Unavailable",
            "text/plain",
            "not synced: routes not yet read from etcd\n".to_owned(),
        ),
        ("GET", "/state") => (
            "200 OK",
            "application/json",
            serde_json::to_string_pretty(&shared.state_json()).unwrap_or_default(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz or /state\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.0 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
