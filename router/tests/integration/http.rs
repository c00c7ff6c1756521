//! Plain HTTP: routing by host, the router's own answers, forwarding headers, retries,
//! limits, the PROXY protocol, many clients.

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use testkit::Etcd;

use crate::{Router, Web, curl, get, put_endpoint, put_route};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_wildcard_answers_404_and_503_itself_and_sets_forwarding_headers() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let (a, b) = (Web::start("a").await, Web::start("b").await);
    put_route(&mut c, "a.test", "a", false).await;
    put_route(&mut c, "*.apps.test", "b", false).await;
    put_route(&mut c, "down.test", "down", false).await;
    put_endpoint(&mut c, "a", 1, a.addr).await;
    put_endpoint(&mut c, "b", 2, b.addr).await;
    let log = tempfile::NamedTempFile::new().unwrap();
    let router = Router::start(&etcd, &["--access-log", log.path().to_str().unwrap()]);

    let got = get(&router, "a.test", "/hello?x=1");
    assert_eq!(got.status, 200, "{got:?}");
    let seen = got.json();
    assert_eq!(seen["name"], "a");
    assert_eq!(seen["path"], "/hello");
    assert_eq!(seen["host"], "a.test", "Host is kept");
    assert_eq!(seen["xff"], "127.0.0.1");
    assert_eq!(seen["xfp"], "http");
    assert_eq!(seen["xfh"], "a.test");
    assert_eq!(
        seen["forwarded"],
        "for=127.0.0.1;proto=http;host=\"a.test\""
    );
    assert_eq!(
        seen["connection"], "",
        "hop-by-hop headers are not forwarded"
    );
    // Case and port of the Host do not matter; a wildcard takes any name below it.
    assert_eq!(get(&router, "A.TEST:80", "/").json()["name"], "a");
    assert_eq!(get(&router, "x.apps.test", "/").json()["name"], "b");
    assert_eq!(get(&router, "y.x.apps.test", "/").json()["name"], "b");

    let unknown = get(&router, "nobody.test", "/");
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert!(
        unknown.body.contains("No site is served for nobody.test"),
        "{unknown:?}"
    );
    let down = get(&router, "down.test", "/");
    assert_eq!(down.status, 503, "{down:?}");
    assert_eq!(
        down.headers.get("retry-after").map(String::as_str),
        Some("1")
    );

    // A new endpoint is used at once; one that leaves gets nothing more.
    let a2 = Web::start("a2").await;
    put_endpoint(&mut c, "a", 3, a2.addr).await;
    testkit::eventually(Duration::from_secs(5), "a2 takes requests", || {
        (get(&router, "a.test", "/").json()["name"] == "a2").then_some(())
    });
    c.delete(crate::endpoint_key("a", 3), None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = a2.gets.load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..20 {
        assert_eq!(get(&router, "a.test", "/").json()["name"], "a");
    }
    assert_eq!(a2.gets.load(std::sync::atomic::Ordering::Relaxed), before);

    let metrics = router.metrics();
    assert!(
        metrics.contains("router_requests_total{domain=\"a.test\",class=\"2xx\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("router_requests_total{domain=\"\",class=\"4xx\"} 1"),
        "{metrics}"
    );
    let state = router.state();
    assert_eq!(state["synced"], true, "{state}");
    let lines = std::fs::read_to_string(log.path()).unwrap();
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(first["host"], "a.test");
    assert_eq!(first["status"], 200);
    assert_eq!(first["backend"], a.addr.to_string());
    assert!(lines.contains("\"status\":404"), "{lines}");

    // A domain no longer routed answers 404, and its series go (kept, those of every preview
    // domain ever routed would pile up in every scrape); the others stay.
    assert!(metrics.contains("domain=\"*.apps.test\""), "{metrics}");
    c.delete("/viking/routes/*.apps.test", None).await.unwrap();
    testkit::eventually(Duration::from_secs(5), "the wildcard unrouted", || {
        (get(&router, "x.apps.test", "/").status == 404).then_some(())
    });
    let metrics = router.metrics();
    assert!(!metrics.contains("domain=\"*.apps.test\""), "{metrics}");
    assert!(metrics.contains("domain=\"a.test\""), "{metrics}");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_during_1000_gets_fails_none_and_a_post_whose_backend_died_gets_502() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let (w1, w2) = (Web::start("w1").await, Web::start("w2").await);
    put_route(&mut c, "d.test", "d", false).await;
    put_endpoint(&mut c, "d", 1, w1.addr).await;
    put_endpoint(&mut c, "d", 2, w2.addr).await;
    let router = Router::start(&etcd, &[]);

    // One curl, 1000 GETs over keep-alive; w1 is killed while they run.
    let url = format!("http://{}/n[1-1000]", router.http);
    let run = std::thread::spawn(move || {
        Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}\n",
                "-H",
                "Host: d.test",
            ])
            .arg(url)
            .output()
            .expect("curl")
    });
    testkit::eventually(Duration::from_secs(10), "w1 took some of the GETs", || {
        (w1.gets.load(std::sync::atomic::Ordering::Relaxed) >= 100).then_some(())
    });
    w1.kill();
    let out = run.join().unwrap();
    let codes = String::from_utf8_lossy(&out.stdout);
    let statuses: Vec<&str> = codes.lines().collect();
    assert_eq!(statuses.len(), 1000);
    let failed: Vec<_> = statuses.iter().filter(|s| **s != "200").collect();
    assert!(
        failed.is_empty(),
        "{} of 1000 failed: {failed:?}",
        failed.len()
    );
    let w2_gets = w2.gets.load(std::sync::atomic::Ordering::Relaxed);
    assert!(w2_gets > 0, "w2 took the rest");

    // A POST is sent, its backend dies before answering: 502, and no other backend sees it.
    let (p1, p2) = (Web::start("p1").await, Web::start("p2").await);
    put_route(&mut c, "p.test", "p", false).await;
    put_endpoint(&mut c, "p", 1, p1.addr).await;
    put_endpoint(&mut c, "p", 2, p2.addr).await;
    testkit::eventually(Duration::from_secs(5), "p.test is routed", || {
        (get(&router, "p.test", "/").status == 200).then_some(())
    });
    let got = curl(&[
        "-X",
        "POST",
        "--data",
        "order=1",
        "-H",
        "Host: p.test",
        &format!("http://{}/die", router.http),
    ]);
    assert_eq!(got.status, 502, "{got:?}");
    let posts = p1.posts.load(std::sync::atomic::Ordering::Relaxed)
        + p2.posts.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        posts, 1,
        "the POST reached exactly one backend: it is not retried"
    );
    let metrics = router.metrics();
    assert!(
        metrics.contains("router_backend_errors_total{domain=\"p.test\",kind=\"response\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connections_are_reused_and_closed_once_idle_for_the_timeout() {
    use std::sync::atomic::Ordering::Relaxed;
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let web = Web::start("p").await;
    put_route(&mut c, "p.test", "p", false).await;
    put_endpoint(&mut c, "p", 1, web.addr).await;
    let router = Router::start(&etcd, &["--backend-idle-timeout", "2s"]);

    // Eight clients at once, 50 keep-alive requests each.
    let url = format!("http://{}/n[1-50]", router.http);
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "-w", "%{http_code}\n"])
                    .args(["-H", "Host: p.test", &url])
                    .output()
                    .expect("curl")
            })
        })
        .collect();
    for client in clients {
        let out = String::from_utf8(client.join().unwrap().stdout).unwrap();
        assert_eq!(out.lines().filter(|l| *l == "200").count(), 50, "{out}");
    }
    assert_eq!(web.gets.load(Relaxed), 400);
    let opened = web.conns.load(Relaxed);
    assert!(
        (1..=16).contains(&opened),
        "400 requests from 8 clients at once took {opened} backend connections"
    );
    let pooled = router.state()["pooled_backend_connections"]
        .as_u64()
        .unwrap();
    assert!(
        (1..=opened).contains(&pooled),
        "{pooled} pooled of {opened}"
    );

    // Nothing uses them now: closed after the idle timeout, without a request to notice.
    testkit::eventually(Duration::from_secs(15), "the idle pool emptied", || {
        (router.state()["pooled_backend_connections"] == 0).then_some(())
    });
    // And a request after that opens a new one.
    assert_eq!(get(&router, "p.test", "/").status, 200);
    assert_eq!(web.conns.load(Relaxed), opened + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_head_is_cut_and_a_thousand_keepalive_clients_are_served() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let w = Web::start("w").await;
    put_route(&mut c, "k.test", "k", false).await;
    put_endpoint(&mut c, "k", 1, w.addr).await;
    let router = Router::start(&etcd, &["--head-timeout", "2s"]);

    // Slowloris: the head arrives one byte a second; the router closes after 2 s.
    let mut s = std::net::TcpStream::connect(router.http).unwrap();
    let mut w = s.try_clone().unwrap();
    let start = Instant::now();
    std::thread::spawn(move || {
        for byte in b"GET / HTTP/1.1\r\nHost: k.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n" {
            if w.write_all(&[*byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut got = Vec::new();
    let read = s.read_to_end(&mut got);
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(
        read.is_ok()
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "not closed: {read:?} after {took:?}"
    );
    assert!(!text.contains(" 200 "), "a slow head was answered: {text}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "cut after {took:?}, the head timeout is 2 s"
    );
    assert!(
        router.metrics().contains("router_head_timeouts_total 1"),
        "{}",
        router.metrics()
    );

    // 1000 clients at once, each keeping its connection for 4 requests.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 8192; exec h2load --h1 -c 1000 -n 4000 -t 1 -H ':authority: k.test' http://{}/",
            router.http
        ))
        .output()
        .expect("h2load: run `make test`, which installs nghttp2-client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("4000 succeeded, 0 failed, 0 errored") && text.contains("4000 2xx"),
        "{text}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        router.metrics()
    );
}

/// A PROXY protocol v2 header from 203.0.113.7:4444 to 192.0.2.1:80.
fn proxy_v2() -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // TCP over IPv4
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&[203, 0, 113, 7, 192, 0, 2, 1]);
    h.extend_from_slice(&4444u16.to_be_bytes());
    h.extend_from_slice(&80u16.to_be_bytes());
    h
}

/// A connection to the router that has sent `request` (reads time out after 10 s).
fn ask(router: &Router, request: &[u8]) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(router.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    s
}

fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_protocol_sets_the_client_only_when_turned_on() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let w = Web::start("w").await;
    put_route(&mut c, "pp.test", "pp", false).await;
    put_endpoint(&mut c, "pp", 1, w.addr).await;
    let trusting = Router::start(&etcd, &["--proxy-protocol"]);
    let plain = Router::start(&etcd, &[]);
    let request = b"GET / HTTP/1.1\r\nHost: pp.test\r\nConnection: close\r\n\r\n";

    let mut v2 = proxy_v2();
    v2.extend_from_slice(request);
    let answer = raw(trusting.http, &v2);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"xff\":\"203.0.113.7\""), "{answer}");
    let mut v1 = b"PROXY TCP4 198.51.100.9 192.0.2.1 5555 80\r\n".to_vec();
    v1.extend_from_slice(request);
    let answer = raw(trusting.http, &v1);
    assert!(answer.contains("\"xff\":\"198.51.100.9\""), "{answer}");
    // With the flag on, a connection without a header is refused.
    let answer = raw(trusting.http, request);
    assert!(answer.is_empty(), "served without a PROXY header: {answer}");

    // Without the flag, a PROXY header is never trusted: the request is malformed.
    let gets = w.gets.load(std::sync::atomic::Ordering::Relaxed);
    let answer = raw(plain.http, &v2);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    assert_eq!(w.gets.load(std::sync::atomic::Ordering::Relaxed), gets);
}

/// etcd, a backend `w` serving `g.test`, and a router (with `extra` flags) in front of it.
async fn one_site(extra: &[&str]) -> (Etcd, Web, Router) {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let w = Web::start("w").await;
    put_route(&mut c, "g.test", "g", false).await;
    put_endpoint(&mut c, "g", 1, w.addr).await;
    let router = Router::start(&etcd, extra);
    (etcd, w, router)
}

/// A client that stops reading its response is left once a write to it has waited
/// `--body-timeout` (counted as a body timeout): the kernel keeps a zero window open
/// indefinitely, so it would otherwise hold its connection, and the backend connection of the
/// response, for as long as the router ran. On the router's own HTTP/1.1 path and on what it
/// leaves to hyper (HTTP/1.0). The router goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_response_is_left_after_the_body_timeout() {
    let (_etcd, _w, router) = one_site(&["--body-timeout", "1s"]).await;
    for (n, version) in [(1, "HTTP/1.1"), (2, "HTTP/1.0")] {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // A small window, fixed: the 16 MiB response cannot all go into buffers.
        socket.set_recv_buffer_size(4096).unwrap();
        let mut c = socket.connect(router.http).await.unwrap();
        let ask = format!("GET /big/16777216 {version}\r\nHost: g.test\r\n\r\n");
        c.write_all(ask.as_bytes()).await.unwrap();
        testkit::eventually(
            Duration::from_secs(15),
            "the stalled write given up",
            || (router.metric("router_body_timeouts_total") == n).then_some(()),
        );
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got));
        let _ = read
            .await
            .expect("the connection ends once what was sent is read");
        assert!(
            got.starts_with(b"HTTP/1.") && got.len() < 16 << 20,
            "{version}: {} bytes",
            got.len()
        );
    }
    let again = get(&router, "g.test", "/");
    assert_eq!(again.status, 200, "{again:?}");
}

/// etcd, a [`RawBackend`] serving `r.test`, and a router (with `extra` flags) in front of it.
pub(crate) async fn raw_site(extra: &[&str]) -> (Etcd, RawBackend, Router) {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let b = RawBackend::start();
    put_route(&mut c, "r.test", "r", false).await;
    put_endpoint(&mut c, "r", 1, b.addr).await;
    let router = Router::start(&etcd, extra);
    (etcd, b, router)
}

/// SIGTERM lets a request in progress finish, and closes the listening sockets at once: a
/// client that connects while the router drains is refused (and can go elsewhere at once)
/// rather than left in an accept queue that nobody reads, to be reset when the process
/// exits. A client whose connection the router accepted before the signal, and whose request
/// came after it, is answered (with `Connection: close`), not cut with its request unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_open_requests_refuses_new_clients_and_answers_early_ones() {
    let (_etcd, w, mut router) = one_site(&[]).await;
    let addr = router.http;
    // A slow request (3 s) keeps the router draining.
    let slow =
        std::thread::spawn(move || curl(&["-H", "Host: g.test", &format!("http://{addr}/slow")]));
    testkit::eventually(
        Duration::from_secs(5),
        "the slow request reached the backend",
        || (w.gets.load(std::sync::atomic::Ordering::Relaxed) == 1).then_some(()),
    );
    let mut early = std::net::TcpStream::connect(addr).unwrap();
    testkit::eventually(
        Duration::from_secs(5),
        "the router accepted the second connection",
        || (router.metric("router_connections_total") == 2).then_some(()),
    );
    router.daemon.signal(nix::sys::signal::Signal::SIGTERM);
    router.daemon.wait_log(
        "stopping: open connections finish their requests",
        Duration::from_secs(10),
    );
    // Time for anything done at the stop to be done (hyper's graceful shutdown closes a
    // connection that has not read anything yet at once).
    std::thread::sleep(Duration::from_millis(300));
    let late = std::net::TcpStream::connect(addr);
    assert!(
        late.is_err(),
        "a connection made while the router drains was accepted by the kernel: nobody would \
         answer it, and the exit would reset it"
    );
    early
        .write_all(b"GET / HTTP/1.1\r\nHost: g.test\r\n\r\n")
        .unwrap();
    early
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = early.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer:?}");
    assert!(answer.contains("connection: close"), "{answer}");
    let status = router.daemon.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert_eq!(slow.join().unwrap().status, 200);
}

/// A client that gives up before the backend answers leaves no count on the backend: the
/// backend choice (fewer requests in flight wins) reads those counts, and each such client
/// left one behind for good, the backend looking busier and busier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_leaves_no_count_on_the_backend() {
    let (_etcd, w, router) = one_site(&[]).await;
    let addr = router.http;
    // The backend answers /slow after 3 s; curl gives up after 0.5 s.
    let got = curl(&[
        "-m",
        "0.5",
        "-H",
        "Host: g.test",
        &format!("http://{addr}/slow"),
    ]);
    assert_ne!(got.status, 200, "{got:?}");
    assert_eq!(w.gets.load(std::sync::atomic::Ordering::Relaxed), 1);
    let active = || {
        let state = router.state();
        let route = state["routes"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["domain"] == "g.test").cloned())
            .unwrap_or_default();
        route["backends"][0]["active"].as_u64()
    };
    // Well before the backend's answer: the request went with its client.
    testkit::eventually(Duration::from_secs(2), "no request in flight", || {
        (active() == Some(0)).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_away_keeps_the_last_routes_and_a_restarted_etcd_is_followed_again() {
    let mut etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let (a, b) = (Web::start("a").await, Web::start("b").await);
    put_route(&mut c, "e.test", "e", false).await;
    put_endpoint(&mut c, "e", 1, a.addr).await;
    let router = Router::start(&etcd, &[]);
    assert_eq!(get(&router, "e.test", "/").json()["name"], "a");

    etcd.stop();
    testkit::eventually(
        Duration::from_secs(10),
        "the router says etcd is away",
        || {
            router
                .metrics()
                .contains("router_etcd_synced 0")
                .then_some(())
        },
    );
    for _ in 0..20 {
        let got = get(&router, "e.test", "/");
        assert_eq!(
            got.status, 200,
            "served from the last known routes: {got:?}"
        );
    }

    etcd.restart().await;
    let mut c = etcd.client().await;
    c.delete(crate::endpoint_key("e", 1), None).await.unwrap();
    put_endpoint(&mut c, "e", 2, b.addr).await;
    testkit::eventually(
        Duration::from_secs(20),
        "the change after the restart is followed",
        || (get(&router, "e.test", "/").json()["name"] == "b").then_some(()),
    );
    testkit::eventually(Duration::from_secs(10), "synced again", || {
        router
            .metrics()
            .contains("router_etcd_synced 1")
            .then_some(())
    });
}

const BYTES_OUT: &str = "router_response_bytes_total{domain=\"s.test\"}";

/// A long response (a download, an event stream) shows its bytes while it streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_response_is_counted_as_it_passes() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    // A backend that sends 64 KiB of a chunked response, then the rest when told to.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let chunk = |n: usize| {
            [
                format!("{n:x}\r\n").into_bytes(),
                vec![b'z'; n],
                b"\r\n".to_vec(),
            ]
            .concat()
        };
        s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap();
        s.write_all(&chunk(65_536)).unwrap();
        wait.recv_timeout(Duration::from_secs(20)).unwrap();
        s.write_all(&chunk(1_000)).unwrap();
        s.write_all(b"0\r\n\r\n").unwrap();
    });
    put_route(&mut c, "s.test", "s", false).await;
    put_endpoint(&mut c, "s", 1, backend).await;
    let router = Router::start(&etcd, &[]);
    let mut client = ask(
        &router,
        b"GET /stream HTTP/1.1\r\nHost: s.test\r\nConnection: close\r\n\r\n",
    );
    let mut got = Vec::new();
    let mut buf = [0u8; 16_384];
    // The router frames the body anew (chunks of its own size): count the body's bytes.
    while got.iter().filter(|&&b| b == b'z').count() < 65_536 {
        let n = client.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(router.metric(BYTES_OUT), 65_536, "counted while it streams");
    go.send(()).unwrap();
    client.read_to_end(&mut got).unwrap();
    server.join().unwrap();
    testkit::eventually(Duration::from_secs(5), "the whole body counted", || {
        (router.metric(BYTES_OUT) == 66_536).then_some(())
    });
}

/// A backend written byte by byte, to see exactly what the router sends and to answer what
/// hyper-made backends do not: `/echo` answers the request's body (with a length), `/chunked`
/// a chunked body, `/nolength` a body without length ended by closing, `/204` and `/304`
/// nothing, `/drip` a 6-byte body a byte every half second. Every request head it reads is
/// kept.
pub(crate) struct RawBackend {
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl RawBackend {
    pub(crate) fn start() -> RawBackend {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = heads.clone();
        // Detached: the test process's end takes the thread and its listener.
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(s) = s else { return };
                let seen = seen.clone();
                std::thread::spawn(move || RawBackend::serve(s, &seen));
            }
        });
        RawBackend { addr, heads }
    }

    fn serve(s: std::net::TcpStream, seen: &std::sync::Mutex<Vec<String>>) {
        use std::io::BufRead;
        let mut out = s.try_clone().unwrap();
        let mut r = std::io::BufReader::new(s);
        loop {
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            seen.lock().unwrap().push(head.clone());
            let lower = head.to_ascii_lowercase();
            let mut body = Vec::new();
            if lower.contains("transfer-encoding: chunked") {
                loop {
                    let mut size = String::new();
                    r.read_line(&mut size).unwrap();
                    let size = size.split(';').next().unwrap().trim();
                    let n = usize::from_str_radix(size, 16).unwrap();
                    if n == 0 {
                        // Trailer fields, to the blank line.
                        let mut line = String::new();
                        while r.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
                            line.clear();
                        }
                        break;
                    }
                    let mut chunk = vec![0u8; n + 2];
                    r.read_exact(&mut chunk).unwrap();
                    body.extend_from_slice(&chunk[..n]);
                }
            } else if let Some(i) = lower.find("content-length: ") {
                let n: usize = lower[i + 16..]
                    .lines()
                    .next()
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                body = vec![0u8; n];
                if r.read_exact(&mut body).is_err() {
                    return;
                }
            }
            let path = head.split(' ').nth(1).unwrap_or("").to_owned();
            let head_only = head.starts_with("HEAD ");
            let answer = match path.as_str() {
                "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
                    .to_vec(),
                "/nolength" => b"HTTP/1.1 200 OK\r\n\r\nuntil-close".to_vec(),
                "/trailers" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    3\r\nabc\r\n0\r\nX-Sum: 7\r\n\r\n"
                    .to_vec(),
                "/early" => b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
                    HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    .to_vec(),
                "/head" => b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n".to_vec(),
                // Fields that would unframe the response if the router took them away.
                "/framing" => {
                    b"HTTP/1.1 200 OK\r\nConnection: Content-Length, Transfer-Encoding\r\n\
                    Content-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
                        .to_vec()
                }
                "/204" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
                "/stall" => b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc".to_vec(),
                "/304" => b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n".to_vec(),
                _ => {
                    let mut a = format!(
                        "HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    if !head_only {
                        a.extend_from_slice(&body);
                    }
                    a
                }
            };
            if path == "/drip" {
                let _ = out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n");
                for b in b"drippy" {
                    std::thread::sleep(Duration::from_millis(500));
                    if out.write_all(std::slice::from_ref(b)).is_err() {
                        return;
                    }
                }
                continue;
            }
            if out.write_all(&answer).is_err() || path == "/nolength" {
                return;
            }
            if path == "/stall" {
                // 3 bytes of 10, then nothing for 5 s.
                std::thread::sleep(Duration::from_secs(5));
                return;
            }
        }
    }
}

/// HTTP/1.1 as clients and backends speak it, through the router's own path: requests
/// pipelined in one write answered in order on one connection; a body with a length and a
/// chunked one arrive whole; a chunked response, `HEAD`, 204 and 304 framed right; a response
/// without length passed to its end with `Connection: close`; hop-by-hop fields (and the
/// fields `Connection` names, but never those that frame a message or the host) not
/// forwarded. And what the router leaves to hyper: HTTP/1.0, `Expect: 100-continue`. Bad
/// heads: 400 and 431.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_1_1_path_frames_every_kind_of_message_and_pipelines() {
    let (etcd, b, router) = raw_site(&["--max-headers", "20"]).await;
    let mut c = etcd.client().await;

    let h = "Host: r.test\r\n";
    let requests = [
        format!("POST /echo HTTP/1.1\r\n{h}Content-Length: 5\r\n\r\nhello"),
        format!(
            "POST /echo HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
        ),
        format!("GET /chunked HTTP/1.1\r\n{h}\r\n"),
        format!("HEAD /head HTTP/1.1\r\n{h}\r\n"),
        format!("GET /204 HTTP/1.1\r\n{h}\r\n"),
        format!("GET /304 HTTP/1.1\r\n{h}\r\n"),
        format!(
            "GET /hop HTTP/1.1\r\n{h}Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\n\
             Keep-Alive: timeout=5\r\nTE: trailers\r\nX-Kept: 1\r\n\r\n"
        ),
        format!(
            "POST /echo HTTP/1.1\r\n{h}Connection: Content-Length, Host\r\nContent-Length: 2\r\n\r\nhi"
        ),
        format!("GET /framing HTTP/1.1\r\n{h}\r\n"),
        format!("GET /nolength HTTP/1.1\r\n{h}\r\n"),
    ];
    let got = raw(router.http, requests.concat().as_bytes());
    let expected = [
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world",
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
        "HTTP/1.1 204 No Content\r\n\r\n",
        "HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi",
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil-close",
    ];
    // Header names as the backend wrote them, compared without case; hop-by-hop ones gone;
    // the Date the backend did not send added to each response.
    let got = got.to_ascii_lowercase();
    let dates = got.matches("\r\ndate: ").count();
    let undated: String = got
        .split_inclusive("\r\n")
        .filter(|l| !l.starts_with("date: "))
        .collect();
    assert_eq!(undated, expected.concat().to_ascii_lowercase(), "{got}");
    assert_eq!(dates, expected.len(), "{got}");
    let heads = b.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 10, "{heads:?}");
    let hop = heads[6].to_ascii_lowercase();
    assert!(hop.contains("x-kept: 1"), "{hop}");
    for gone in ["connection:", "x-secret", "keep-alive", "te:"] {
        assert!(!hop.contains(gone), "{gone} forwarded: {hop}");
    }
    assert!(
        heads[1].contains("Transfer-Encoding: chunked"),
        "{}",
        heads[1]
    );
    let framed = heads[7].to_ascii_lowercase();
    assert!(
        framed.contains("content-length: 2") && framed.contains("host: r.test"),
        "{framed}"
    );
    assert_eq!(
        router.metric("router_request_bytes_total{domain=\"r.test\"}"),
        18
    );

    // HTTP/1.0 and Expect: served by hyper on the same connection's rest.
    let got = raw(
        router.http,
        format!("GET /echo HTTP/1.0\r\n{h}\r\n").as_bytes(),
    );
    assert!(got.starts_with("HTTP/1.0 200 OK\r\n"), "{got}");
    let body = "x".repeat(5000);
    let got = curl(&[
        "-H",
        "Host: r.test",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &body,
        &format!("http://{}/echo", router.http),
    ]);
    assert_eq!((got.status, got.body.len()), (200, 5000), "{}", got.body);

    // An absolute-form target routes by its authority; the backend gets the origin form, and
    // a redirect keeps the path and query (not the whole target).
    put_route(&mut c, "rr.test", "r", true).await;
    let got = raw(
        router.http,
        b"GET http://r.test/abs?q=1 HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    let last = b.heads.lock().unwrap().last().cloned().unwrap();
    assert!(last.starts_with("GET /abs?q=1 HTTP/1.1\r\n"), "{last}");
    assert!(last.contains("Host: r.test\r\n"), "{last}");
    let location = format!(
        "location: https://rr.test:{}/x?y=1\r\n",
        router.https.port()
    );
    testkit::eventually(Duration::from_secs(5), "the redirect", || {
        let ask = b"GET http://rr.test/x?y=1 HTTP/1.1\r\nConnection: close\r\n\r\n";
        let got = raw(router.http, ask);
        (got.starts_with("HTTP/1.1 308 ") && got.contains(&location)).then_some(())
    });

    // Bad heads: refused, and the connection closed.
    let mut many = String::from("GET / HTTP/1.1\r\nHost: r.test\r\n");
    for i in 0..25 {
        many.push_str(&format!("X-{i}: 1\r\n"));
    }
    many.push_str("\r\n");
    for (bad, status) in [
        (many.as_str(), "431"),
        (
            "GET / HTTP/1.1\r\nHost: r.test\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "400",
        ),
        (
            "GET / HTTP/1.1\r\nHost: r.test\r\nContent-Length: 1, 2\r\n\r\n",
            "400",
        ),
        ("GET / HTTP/1.1\r\n\r\n", "400"),
        ("NOT HTTP\r\n\r\n", "400"),
    ] {
        let got = raw(router.http, bad.as_bytes());
        assert!(
            got.starts_with(&format!("HTTP/1.1 {status} ")),
            "{bad:?}: {got}"
        );
        assert!(
            got.to_ascii_lowercase().contains("connection: close"),
            "{got}"
        );
    }
    assert_eq!(
        b.heads.lock().unwrap().len(),
        13,
        "a bad head reached the backend"
    );
}

/// A client that leaves in the middle of a long response is not a backend failure: the
/// backend error counter stays at 0 (the router's write to the client failed, not its read
/// from the backend), and the backend's next request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_during_a_response_is_not_counted_against_the_backend() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    // A backend that streams 64 KiB chunks, 40 ms apart, for at most 5 s.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read_exact(&mut byte).is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
                let chunk = [b"10000\r\n".to_vec(), vec![b'z'; 65_536], b"\r\n".to_vec()].concat();
                for _ in 0..125 {
                    if s.write_all(&chunk).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(40));
                }
            });
        }
    });
    put_route(&mut c, "l.test", "l", false).await;
    put_endpoint(&mut c, "l", 1, backend).await;
    let router = Router::start(&etcd, &[]);
    let mut client = ask(&router, b"GET /long HTTP/1.1\r\nHost: l.test\r\n\r\n");
    let mut got = 0;
    let mut buf = [0u8; 16_384];
    while got < 200_000 {
        let n = client.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early");
        got += n;
    }
    drop(client);
    let errors = "router_backend_errors_total{domain=\"l.test\",kind=\"response\"}";
    testkit::eventually(
        Duration::from_secs(10),
        "the router saw the client go",
        || {
            (router.metric("router_requests_total{domain=\"l.test\",class=\"2xx\"}") == 1)
                .then_some(())
        },
    );
    // Long enough for the router's next writes to the closed connection to fail (a chunk
    // comes every 40 ms).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(router.metric(errors), 0, "{}", router.metrics());
}

/// A body that stops coming is cut after `--body-timeout`, either way: a client's (408, the
/// connection closed; the backend never gets the rest) and a backend's (the response cut
/// short: the client sees the connection close after the bytes that came).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_coming_is_cut_after_the_body_timeout() {
    let (_etcd, _b, router) = raw_site(&["--body-timeout", "1s"]).await;
    let read_all = |mut s: std::net::TcpStream| {
        let start = Instant::now();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
    };

    let s = ask(
        &router,
        b"POST /echo HTTP/1.1\r\nHost: r.test\r\nContent-Length: 10\r\n\r\nabc",
    );
    let (text, took) = read_all(s);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.contains("--body-timeout"), "{text}");
    assert!(took < Duration::from_secs(4), "answered after {took:?}");

    let s = ask(&router, b"GET /stall HTTP/1.1\r\nHost: r.test\r\n\r\n");
    let (text, took) = read_all(s);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(text.ends_with("\r\n\r\nabc"), "{text}");
    assert!(took < Duration::from_secs(4), "closed after {took:?}");
    assert_eq!(
        router.metric("router_body_timeouts_total"),
        2,
        "{}",
        router.metrics()
    );
}

/// Reads one response with a `Content-Length` from `r`: its status line and its body.
fn read_answer(r: &mut impl std::io::BufRead) -> (String, String) {
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let mut length = 0;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body).unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An answered keep-alive connection that stays idle leaves its task (parked: its socket in an
/// epoll set, a slot in a slab) and is served by a new one when its client asks again; still
/// idle at the head timeout it is closed and counted as a head timeout, as in its task; at the
/// stop a parked connection is closed at once (it waits for nothing), and the drain does not
/// wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_parked_served_again_and_closed_at_its_timeout_or_the_stop() {
    let (_etcd, w, mut router) = one_site(&["--head-timeout", "2s"]).await;
    let parked = |router: &Router, n: u64| {
        testkit::eventually(Duration::from_secs(5), "the parked count", || {
            (router.metric("router_connections_parked") == n).then_some(())
        })
    };
    let connect = || {
        let c = std::net::TcpStream::connect(router.http).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = std::io::BufReader::new(c.try_clone().unwrap());
        (c, r)
    };
    let (mut c, mut r) = connect();
    for i in 1..=3 {
        c.write_all(b"GET / HTTP/1.1\r\nHost: g.test\r\n\r\n")
            .unwrap();
        let (status, body) = read_answer(&mut r);
        assert!(status.starts_with("HTTP/1.1 200 "), "request {i}: {status}");
        assert!(body.contains("\"name\":\"w\""), "request {i}: {body}");
        assert!(
            body.contains("\"xff\":\"127.0.0.1\""),
            "request {i}: {body}"
        );
        // Before the next request: parked (from the second on, parked again).
        parked(&router, 1);
    }
    let answered = Instant::now();
    assert_eq!(w.gets.load(std::sync::atomic::Ordering::Relaxed), 3);
    assert_eq!(
        router.metric("router_connections_total"),
        1,
        "one connection"
    );
    assert_eq!(router.metric("router_connections_active"), 1);

    // Left idle: closed at the head timeout (2 s from its last answer).
    let mut rest = Vec::new();
    let read = r.read_to_end(&mut rest);
    let took = answered.elapsed();
    assert!(
        matches!(read, Ok(0)),
        "not closed cleanly: {read:?} {rest:?}"
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "closed {took:?} after its last answer; the head timeout is 2 s"
    );
    parked(&router, 0);
    assert_eq!(router.metric("router_head_timeouts_total"), 1);
    assert_eq!(router.metric("router_connections_active"), 0);

    // The stop closes a parked connection at once.
    let (mut d, mut r) = connect();
    d.write_all(b"GET / HTTP/1.1\r\nHost: g.test\r\n\r\n")
        .unwrap();
    assert!(read_answer(&mut r).0.starts_with("HTTP/1.1 200 "));
    parked(&router, 1);
    let stopped = Instant::now();
    router.daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let read = r.read_to_end(&mut rest);
    assert!(matches!(read, Ok(0)), "not closed at the stop: {read:?}");
    let status = router.daemon.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(
        stopped.elapsed() < Duration::from_secs(3),
        "the stop took {:?}: it waited for the parked connection (the grace is 5 s)",
        stopped.elapsed()
    );
}
