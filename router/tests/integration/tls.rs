//! HTTPS: certificates by SNI from `--certs` and etcd, HTTP/2 by ALPN, a certificate replaced
//! in etcd while a connection stays open, redirects to HTTPS. The CA and certificates are
//! made by the `openssl` command for each test.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use testkit::Etcd;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::{Router, Web, curl, get, put_endpoint, put_route};
use std::process::Command;

async fn put_cert(c: &mut etcd_client::Client, domain: &str, dir: &Path, file: &str) {
    let read = |ext: &str| std::fs::read_to_string(dir.join(format!("{file}.{ext}"))).unwrap();
    let record = serde_json::json!({"v": 1, "chain_pem": read("crt"), "key_pem": read("key")});
    c.put(format!("/viking/certs/{domain}"), record.to_string(), None)
        .await
        .unwrap();
}

fn https(router: &Router, ca: &Path, host: &str, extra: &[&str]) -> crate::Got {
    let port = router.https.port();
    let mut args = vec![
        "--cacert".to_owned(),
        ca.display().to_string(),
        "--resolve".to_owned(),
        format!("{host}:{port}:127.0.0.1"),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args.push(format!("https://{host}:{port}/"));
    curl(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// A test CA in `d` and, for each `(file, served, names)`, a leaf for `names` copied into
/// `d/certs` as `<served>.crt` and `.key` (a `--certs` directory); the directory.
fn cert_dir(d: &Path, leaves: &[(&str, &str, &[&str])]) -> std::path::PathBuf {
    testkit::certs::ca(d);
    let certs = d.join("certs");
    std::fs::create_dir(&certs).unwrap();
    for (file, served, names) in leaves {
        testkit::certs::leaf(d, file, names, 20);
        for ext in ["crt", "key"] {
            let to = certs.join(format!("{served}.{ext}"));
            std::fs::copy(d.join(format!("{file}.{ext}")), to).unwrap();
        }
    }
    certs
}

/// A TLS connection to the router for `name`, trusting only the test CA.
async fn tls_connect(
    router: &Router,
    ca: &Path,
    name: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_connect_alpn(router, ca, name, &[]).await
}

/// As [`tls_connect`], offering the ALPN protocols `alpn`.
async fn tls_connect_alpn(
    router: &Router,
    ca: &Path,
    name: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(router.https).await.unwrap();
    tls_over(tcp, ca, name, alpn).await
}

/// A TLS connection over `tcp` for `name`, trusting only the test CA, offering `alpn`.
async fn tls_over(
    tcp: tokio::net::TcpStream,
    ca: &Path,
    name: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for cert in
        <rustls_pki_types::CertificateDer<'_> as rustls_pki_types::pem::PemObject>::pem_slice_iter(
            &pem,
        )
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut config = config;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let server_name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
    connector.connect(server_name, tcp).await.unwrap()
}

fn peer_cert(s: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// One keep-alive GET on an open connection: the status and the body.
async fn get_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    host: &str,
) -> (u16, String) {
    s.get_mut()
        .write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut status = String::new();
    s.read_line(&mut status).await.unwrap();
    let mut length = 0;
    loop {
        let mut line = String::new();
        s.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).await.unwrap();
    (
        status[9..12].parse().unwrap(),
        String::from_utf8(body).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_picks_the_certificate_by_sni_speaks_h2_swaps_a_certificate_and_redirects() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = cert_dir(
        d,
        &[
            ("a", "a.test", &["a.test"]),
            ("w", "_.w.test", &["*.w.test"]),
        ],
    );
    testkit::certs::leaf(d, "b", &["b.test"], 20);
    testkit::certs::leaf(d, "b2", &["b.test", "www.b.test"], 20);
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let (a, b) = (Web::start("a").await, Web::start("b").await);
    for (domain, job, redirect) in [
        ("a.test", "a", false),
        ("b.test", "b", false),
        ("*.w.test", "a", false),
        ("r.test", "a", true),
    ] {
        put_route(&mut c, domain, job, redirect).await;
    }
    put_endpoint(&mut c, "a", 1, a.addr).await;
    put_endpoint(&mut c, "b", 2, b.addr).await;
    put_cert(&mut c, "b.test", d, "b").await;
    testkit::certs::leaf(d, "r", &["r.test"], 20);
    put_cert(&mut c, "r.test", d, "r").await;
    let router = Router::start(&etcd, &["--certs", certs.to_str().unwrap()]);
    let ca_path = d.join("ca.crt");
    testkit::eventually(
        Duration::from_secs(10),
        "the etcd certificates are served",
        || {
            let state = router.state();
            (state["certs"].as_array().map_or(0, Vec::len) == 4).then_some(())
        },
    );

    // From --certs, chosen by SNI; HTTP/2 by ALPN.
    let got = https(&router, &ca_path, "a.test", &["--http2"]);
    assert_eq!((got.status, got.version.as_str()), (200, "2"), "{got:?}");
    assert_eq!(got.json()["name"], "a");
    assert_eq!(got.json()["xfp"], "https");
    assert_eq!(
        got.json()["host"],
        format!("a.test:{}", router.https.port()),
        "the :authority becomes Host"
    );
    // Many streams at once on two connections, with answers small and larger than what one
    // turn of a connection gathers before writing (`router::batch::LIMIT`): every one whole.
    let port = router.https.port();
    let big = crate::big(200_000);
    let got = curl(&[
        "--cacert",
        ca_path.to_str().unwrap(),
        "--resolve",
        &format!("a.test:{port}:127.0.0.1"),
        "--http2",
        &format!("https://a.test:{port}/big/200000"),
    ]);
    assert_eq!(
        (got.status, got.version.as_str()),
        (200, "2"),
        "{}",
        got.stderr
    );
    assert!(
        got.body == big,
        "the body came changed ({} bytes)",
        got.body.len()
    );
    for path in ["/", "/big/200000"] {
        let out = Command::new("h2load")
            .args(["-c", "2", "-m", "20", "-n", "400", "--connect-to"])
            .arg(router.https.to_string())
            .arg(format!("https://a.test:{port}{path}"))
            .output()
            .expect("h2load: run `make test`, which installs nghttp2-client");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("400 succeeded, 0 failed, 0 errored") && text.contains("400 2xx"),
            "{path}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let got = https(&router, &ca_path, "a.test", &["--http1.1"]);
    assert_eq!((got.status, got.version.as_str()), (200, "1.1"), "{got:?}");
    // From etcd; and a wildcard file.
    assert_eq!(https(&router, &ca_path, "b.test", &[]).json()["name"], "b");
    assert_eq!(
        https(&router, &ca_path, "x.w.test", &[]).json()["name"],
        "a"
    );
    // No certificate for the name: the handshake fails. TLS below 1.2 is refused.
    assert_eq!(https(&router, &ca_path, "nobody.test", &[]).status, 0);
    let old = https(
        &router,
        &ca_path,
        "a.test",
        &["--tlsv1.1", "--tls-max", "1.1"],
    );
    assert_eq!(old.status, 0, "{old:?}");
    assert!(
        router
            .metrics()
            .contains("router_tls_handshake_failures_total")
    );

    // A certificate replaced in etcd: new connections get it, an open one keeps working.
    let stream = tls_connect(&router, &ca_path, "b.test").await;
    let first = peer_cert(&stream);
    let mut open = BufReader::new(stream);
    assert_eq!(get_on(&mut open, "b.test").await.0, 200);
    put_cert(&mut c, "b.test", d, "b2").await;
    let mut fresh = None;
    for _ in 0..200 {
        let s = tls_connect(&router, &ca_path, "b.test").await;
        if peer_cert(&s) != first {
            fresh = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let fresh = fresh.expect("the new certificate is served to new connections within 5 s");
    let mut fresh = BufReader::new(fresh);
    assert_eq!(get_on(&mut fresh, "b.test").await.0, 200);
    let (status, body) = get_on(&mut open, "b.test").await;
    assert_eq!(status, 200, "the connection opened before the swap: {body}");

    // https_redirect: plain HTTP gets a 308 to the same URL over HTTPS.
    let got = get(&router, "r.test", "/p?q=1");
    assert_eq!(got.status, 308, "{got:?}");
    assert_eq!(
        got.headers.get("location").map(String::as_str),
        Some(format!("https://r.test:{}/p?q=1", router.https.port()).as_str())
    );
    assert_eq!(https(&router, &ca_path, "r.test", &[]).status, 200);
}

/// An HTTP/2 request without body goes to the backend over a plain HTTP/1.1 connection
/// (`router::plain`) and its response comes back decoded from every framing: a length, chunked
/// (with trailers), to the connection's end; 1xx heads skipped; `HEAD`, 204; a chunked body
/// beside a length read as chunked; the backend connection back in the pool after responses
/// without body; a backend that stalls mid-body cut after `--body-timeout`. The backend gets
/// an HTTP/1.1 head: origin form, `Host` from `:authority`, the forwarding fields, the
/// `Cookie` fields HTTP/2 split joined in one (also through hyper's client, for a request
/// with a body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_2_requests_go_to_backends_over_http_1_1_and_come_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = cert_dir(d, &[("r", "r.test", &["r.test"])]);
    let extra = ["--certs", certs.to_str().unwrap(), "--body-timeout", "1s"];
    let (_etcd, b, router) = crate::http::raw_site(&extra).await;
    let ca = d.join("ca.crt");
    let port = router.https.port();
    let get = |path: &str, extra: &[&str]| {
        let mut args = vec![
            "--cacert".to_owned(),
            ca.display().to_string(),
            "--resolve".to_owned(),
            format!("r.test:{port}:127.0.0.1"),
            "--http2".to_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args.push(format!("https://r.test:{port}{path}"));
        curl(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    for (path, body) in [
        ("/chunked", "abcdefg"),
        ("/nolength", "until-close"),
        ("/early", "ok"),
        ("/framing", "ok"),
    ] {
        let got = get(path, &[]);
        assert_eq!(
            (got.status, got.version.as_str(), got.body.as_str()),
            (200, "2", body),
            "{path}: {got:?}"
        );
    }
    let got = get("/plain?q=1", &["-H", "cookie: a=1", "-H", "cookie: b=2"]);
    assert_eq!((got.status, got.body.as_str()), (200, ""), "{got:?}");
    let got = get("/trailers", &[]);
    assert_eq!((got.status, got.body.as_str()), (200, "abc"), "{got:?}");
    assert_eq!(
        got.headers.get("x-sum").map(String::as_str),
        Some("7"),
        "{got:?}"
    );
    let got = get("/head", &["-I"]);
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(
        got.headers.get("content-length").map(String::as_str),
        Some("10")
    );
    assert_eq!(get("/204", &[]).status, 204);
    // A response without body (HEAD, 204) leaves its backend connection in the pool, as one
    // with a body does: one connection served all of the above but `/nolength`.
    assert_eq!(router.state()["pooled_backend_connections"], 1);

    // A request with a body goes through hyper's client: its cookies are joined too.
    let got = get(
        "/echo",
        &["-d", "hi", "-H", "cookie: a=1", "-H", "cookie: b=2"],
    );
    assert_eq!((got.status, got.body.as_str()), (200, "hi"), "{got:?}");
    // A backend that stops sending its body: the stream is cut after --body-timeout.
    let start = std::time::Instant::now();
    let got = get("/stall", &[]);
    assert!(
        start.elapsed() < Duration::from_secs(4) && got.body.len() < 10,
        "{got:?} after {:?}",
        start.elapsed()
    );
    assert_eq!(
        router.metric("router_body_timeouts_total"),
        1,
        "{}",
        router.metrics()
    );

    let heads = b.heads.lock().unwrap().clone();
    let posted = heads
        .iter()
        .find(|h| h.starts_with("POST /echo "))
        .unwrap_or_else(|| panic!("{heads:?}"));
    assert!(posted.contains("cookie: a=1; b=2\r\n"), "{posted}");
    let head = heads
        .iter()
        .find(|h| h.starts_with("GET /plain?q=1 "))
        .unwrap_or_else(|| panic!("{heads:?}"));
    assert!(head.starts_with("GET /plain?q=1 HTTP/1.1\r\n"), "{head}");
    let lower = head.to_ascii_lowercase();
    for field in [
        format!("host: r.test:{port}\r\n"),
        "x-forwarded-proto: https\r\n".to_owned(),
        "x-forwarded-for: 127.0.0.1\r\n".to_owned(),
        format!("forwarded: for=127.0.0.1;proto=https;host=\"r.test:{port}\"\r\n"),
        "cookie: a=1; b=2\r\n".to_owned(),
    ] {
        assert!(lower.contains(&field), "{field:?} not in {head}");
    }
}

/// An HTTP/2 connection is closed once no stream has been open on it for the head timeout, as
/// an idle HTTP/1.1 one is (a GOAWAY, counted as a head timeout): one whose client finished
/// the handshake and sent nothing more (it was kept for as long as the router ran), and one
/// that was answered and stayed idle; a stream that lasts three head timeouts keeps its
/// connection and ends whole (its body's bytes half a second apart, each wait shorter than
/// `--body-timeout` and all of them longer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_2_connection_without_streams_is_closed_at_the_head_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = cert_dir(d, &[("r", "r.test", &["r.test"])]);
    let extra = [
        "--certs",
        certs.to_str().unwrap(),
        "--head-timeout",
        "1s",
        // Each of the dripped body's waits (0.5 s) well under it, all of them (3 s) over it.
        "--body-timeout",
        "2s",
    ];
    let (_etcd, _b, router) = crate::http::raw_site(&extra).await;
    let ca = d.join("ca.crt");

    // The preface and an empty SETTINGS frame, then silence (the router's PING unanswered).
    let mut silent = tls_connect_alpn(&router, &ca, "r.test", &[b"h2"]).await;
    assert_eq!(silent.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    silent
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut got))
        .await
        .expect("the router closes a silent HTTP/2 connection")
        .ok();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(6),
        "closed after {waited:?}"
    );
    let mut types = Vec::new();
    let mut at = 0;
    while at + 9 <= got.len() {
        let len =
            usize::from(got[at]) << 16 | usize::from(got[at + 1]) << 8 | usize::from(got[at + 2]);
        types.push(got[at + 3]);
        at += 9 + len;
    }
    assert!(
        types.contains(&0x7),
        "a GOAWAY among frames of types {types:?}"
    );

    // A real client: a stream of 3 s (the backend drips its body), then idle.
    let tls = tls_connect_alpn(&router, &ca, "r.test", &[b"h2"]).await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let mut conn = tokio::spawn(conn);
    let req = hyper::Request::get("https://r.test/drip")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("the whole body, the stream open for three head timeouts")
        .to_bytes();
    assert_eq!(&body[..], b"drippy");
    assert!(!conn.is_finished(), "the connection outlived its stream");
    let idle = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(6), &mut conn)
        .await
        .expect("the router closes the idle connection")
        .unwrap()
        .expect("a clean close (GOAWAY)");
    assert!(
        idle.elapsed() >= Duration::from_millis(900),
        "closed after {:?}",
        idle.elapsed()
    );
    assert_eq!(router.metric("router_head_timeouts_total"), 2);
}

/// An HTTP/2 client that stops reading its response is left once the router's write to it has
/// waited `--body-timeout` (counted as a body timeout), as an HTTP/1.x one is. The client is
/// raw frames: the preface, SETTINGS with the largest stream window and a connection window
/// as large (so that only TCP holds the response back), a GET for 16 MiB, then nothing read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_2_client_that_stops_reading_is_left_after_the_body_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let w = Web::start("w").await;
    put_route(&mut c, "g.test", "g", false).await;
    put_endpoint(&mut c, "g", 1, w.addr).await;
    let certs = cert_dir(d, &[("g", "g.test", &["g.test"])]);
    let router = Router::start(
        &etcd,
        &["--certs", certs.to_str().unwrap(), "--body-timeout", "1s"],
    );
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(router.https).await.unwrap();
    let mut tls = tls_over(tcp, &d.join("ca.crt"), "g.test", &[b"h2"]).await;
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE (4) = 2^31 - 1; the connection's window as large.
    out.extend(frame(0x4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
    out.extend(frame(0x8, 0, 0, &0x7fff_0000u32.to_be_bytes()));
    // GET https://g.test/big/16777216 (HPACK: :method GET, :scheme https, :path and
    // :authority as literals with indexed names).
    let mut block = vec![0x82, 0x87, 0x44, 13];
    block.extend_from_slice(b"/big/16777216");
    block.extend_from_slice(&[0x41, 6]);
    block.extend_from_slice(b"g.test");
    out.extend(frame(0x1, 0x5, 1, &block));
    tls.write_all(&out).await.unwrap();
    testkit::eventually(
        Duration::from_secs(15),
        "the stalled write given up",
        || (router.metric("router_body_timeouts_total") == 1).then_some(()),
    );
    testkit::eventually(Duration::from_secs(5), "its connection gone", || {
        (router.metric("router_connections_active") == 0).then_some(())
    });
    drop(tls);
}
