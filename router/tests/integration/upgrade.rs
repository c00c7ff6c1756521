//! `router --upgrade` (issue 20): the running router hands its listeners to the new one; no
//! request fails, and an open keep-alive connection is answered by the old process.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use testkit::{Daemon, Etcd};

use crate::{Router, Web, put_endpoint, put_route};

const LIMIT: Duration = Duration::from_secs(30);

/// One `GET /` for `up.example` on a new connection: whether it got a 200.
fn get_once(addr: SocketAddr) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: up.example\r\nConnection: close\r\n\r\n")?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)?;
        Ok(answer.starts_with(b"HTTP/1.1 200"))
    };
    attempt().unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_upgrades_under_traffic_fail_no_request() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let web = Web::start("w0").await;
    put_route(&mut c, "up.example", "site", false).await;
    put_endpoint(&mut c, "site", 0, web.addr).await;
    let run = tempfile::tempdir().unwrap();
    let run_dir = run.path().to_str().unwrap().to_owned();
    let router = Router::start(&etcd, &["--run-dir", &run_dir]);
    let mut args: Vec<String> = vec![
        "--etcd".into(),
        etcd.endpoint(),
        "--http".into(),
        router.http.to_string(),
        "--https".into(),
        router.https.to_string(),
        "--admin".into(),
        router.admin.to_string(),
        "--grace".into(),
        "5s".into(),
        "--run-dir".into(),
        run_dir,
        "--upgrade".into(),
    ];

    // A keep-alive connection opened on the first router, with a slow request (3 s) in
    // flight when the first upgrade happens: the old process answers it.
    let mut kept = std::net::TcpStream::connect(router.http).unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let read_answer = |kept: &mut std::net::TcpStream| {
        let mut buf = [0u8; 4096];
        let n = kept.read(&mut buf).unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
    };
    kept.write_all(b"GET / HTTP/1.1\r\nHost: up.example\r\n\r\n")
        .unwrap();
    read_answer(&mut kept);

    // New connections every 2 ms throughout (bounded: 60 s).
    let stop = Arc::new(AtomicBool::new(false));
    let (made, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let traffic = {
        let (stop, made, failed, addr) = (stop.clone(), made.clone(), failed.clone(), router.http);
        std::thread::spawn(move || {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                if !get_once(addr) {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                made.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    kept.write_all(b"GET /slow HTTP/1.1\r\nHost: up.example\r\n\r\n")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut old = router.daemon;
    for round in 0..5 {
        let mut next = Daemon::spawn(env!("CARGO_BIN_EXE_router"), &args);
        next.wait_log("took over; the previous process drains", LIMIT);
        old.wait_log("handed over to the new process", LIMIT);
        if round == 0 {
            read_answer(&mut kept);
        }
        assert!(old.wait_exit(LIMIT).success(), "{}", old.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
        old = next;
    }
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    let (made, failed) = (made.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("5 router upgrades under traffic: {failed} failed of {made} requests");
    assert_eq!(failed, 0, "requests failed during the upgrades");
    assert!(made >= 200, "{made}");

    // A successor with etcd away gives up and changes nothing.
    let at = args.iter().position(|a| a == "--etcd").unwrap();
    args[at + 1] = format!("http://127.0.0.1:{}", testkit::free_ports(1)[0]);
    args.extend(["--upgrade-timeout".to_owned(), "2s".to_owned()]);
    let out = Command::new(env!("CARGO_BIN_EXE_router"))
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not taking over"), "{err}");
    assert!(get_once(router.http), "the running router serves on");
    drop(old);
}
