//! The daemons' admin servers (`/metrics`, `/healthz`, `/state`), on hyper's HTTP/1.1: one
//! server, each daemon gives the answers. Keep-alive works, a slow client is cut after 5 s of
//! head, and only GET is served.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One answer of a daemon's admin server.
pub struct Answer {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Answer {
    pub fn ok(content_type: &'static str, body: String) -> Answer {
        Answer {
            status: StatusCode::OK,
            content_type,
            body,
        }
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(body: String) -> Answer {
        Answer::ok(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        )
    }

    /// `/healthz`: 200 `ok`, or 503 with why not.
    pub fn health(ready: bool, why_not: &str) -> Answer {
        if ready {
            Answer::ok("text/plain", "ok\n".to_owned())
        } else {
            Answer {
                status: StatusCode::SERVICE_UNAVAILABLE,
                content_type: "text/plain",
                body: format!("{why_not}\n"),
            }
        }
    }

    /// `/state`, pretty JSON.
    pub fn json(value: &serde_json::Value) -> Answer {
        Answer::ok(
            "application/json",
            serde_json::to_string_pretty(value).unwrap_or_default() + "\n",
        )
    }

    pub fn not_found() -> Answer {
        Answer {
            status: StatusCode::NOT_FOUND,
            content_type: "text/plain",
            body: "not found; try /metrics, /healthz or /state\n".to_owned(),
        }
    }
}

/// Serves `answer(path)` for every GET until `stop`.
pub async fn serve(
    listener: TcpListener,
    answer: impl Fn(&str) -> Answer + Send + Sync + 'static,
    stop: CancellationToken,
) {
    let answer = Arc::new(answer);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let a = if req.method() == http::Method::GET {
                    answer(req.uri().path())
                } else {
                    Answer {
                        status: StatusCode::METHOD_NOT_ALLOWED,
                        content_type: "text/plain",
                        body: "GET only\n".to_owned(),
                    }
                };
                let mut resp = Response::new(Full::new(Bytes::from(a.body)));
                *resp.status_mut() = a.status;
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(a.content_type),
                );
                std::future::ready(Ok::<_, Infallible>(resp))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
