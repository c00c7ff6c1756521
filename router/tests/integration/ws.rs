//! WebSocket through the router, with Python's `websockets` (Debian's `python3-websockets`)
//! as both the echo server behind it and the client in front of it.

use std::time::Duration;

use testkit::{Daemon, Etcd};

use crate::{Router, put_route};

const PYTHON: &str = "/usr/bin/python3";

const ECHO_SERVER: &str = r#"
import asyncio, sys, websockets
async def echo(ws, path=None):
    async for m in ws:
        await ws.send(m)
async def main():
    async with websockets.serve(echo, "127.0.0.1", int(sys.argv[1])):
        print("echo server ready", flush=True)
        await asyncio.Future()
asyncio.run(main())
"#;

const CLIENT: &str = r#"
import asyncio, sys, websockets
async def main():
    uri, host, port = sys.argv[1], "127.0.0.1", int(sys.argv[2])
    async with websockets.connect(uri, host=host, port=port, compression=None) as ws:
        for i in range(100):
            msg = "message %d " % i + "x" * i
            await ws.send(msg)
            got = await asyncio.wait_for(ws.recv(), 5)
            assert got == msg, (got, msg)
        big = "y" * 200000
        await ws.send(big)
        assert await asyncio.wait_for(ws.recv(), 5) == big
    print("echoed 101 messages")
asyncio.run(main())
"#;

/// Echoes once, says "open", waits for a line on stdin, then echoes once more.
const WAITING_CLIENT: &str = r#"
import asyncio, sys, websockets
async def main():
    uri, host, port = sys.argv[1], "127.0.0.1", int(sys.argv[2])
    async with websockets.connect(uri, host=host, port=port, compression=None) as ws:
        await ws.send("before")
        assert await asyncio.wait_for(ws.recv(), 5) == "before"
        print("open", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await ws.send("after")
        assert await asyncio.wait_for(ws.recv(), 5) == "after"
        print("echoed after the stop", flush=True)
asyncio.run(main())
"#;

/// Echoes a message every 400 ms for 3.2 s, then says "kept".
const STEADY_CLIENT: &str = r#"
import asyncio, sys, websockets
async def main():
    uri, host, port = sys.argv[1], "127.0.0.1", int(sys.argv[2])
    async with websockets.connect(uri, host=host, port=port, compression=None, ping_interval=None) as ws:
        for i in range(8):
            await asyncio.sleep(0.4)
            await ws.send("tick %d" % i)
            assert await asyncio.wait_for(ws.recv(), 5) == "tick %d" % i
    print("kept", flush=True)
asyncio.run(main())
"#;

/// etcd, the echo server serving `ws.test`, and a router (with `extra` flags) in front of it.
async fn echo_site(extra: &[&str]) -> (Etcd, Daemon, Router) {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let port = testkit::free_ports(1)[0];
    let port_arg = port.to_string();
    let mut server = Daemon::spawn(PYTHON, &["-c", ECHO_SERVER, port_arg.as_str()]);
    server.wait_log("echo server ready", Duration::from_secs(20));
    put_route(&mut c, "ws.test", "ws", false).await;
    crate::put_endpoint(&mut c, "ws", 1, ([127, 0, 0, 1], port).into()).await;
    let router = Router::start(&etcd, extra);
    (etcd, server, router)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_passed_through_both_ways() {
    let (_etcd, _server, router) = echo_site(&[]).await;

    let out = std::process::Command::new(PYTHON)
        .args([
            "-c",
            CLIENT,
            "ws://ws.test/chat",
            &router.http.port().to_string(),
        ])
        .output()
        .expect("python3 with websockets: run `make test`, which installs python3-websockets");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("echoed 101 messages"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = router.metrics();
    assert!(
        metrics.contains("router_requests_total{domain=\"ws.test\",class=\"1xx\"} 1"),
        "{metrics}"
    );
    // The upgraded connection's bytes count as request and response bytes: each way at least
    // the 200,000-byte message (the client asks for no compression) and the hundred small ones,
    // plus a few frame header bytes.
    for name in ["router_request_bytes_total", "router_response_bytes_total"] {
        let n = crate::metric_value(&metrics, &format!("{name}{{domain=\"ws.test\"}}"));
        assert!((200_000..300_000).contains(&n), "{name} {n}\n{metrics}");
    }
}

/// A router in front of the echo server, with `extra` flags, and a [`WAITING_CLIENT`] whose
/// WebSocket is open through it.
struct Open {
    _etcd: Etcd,
    _server: Daemon,
    router: Router,
    client: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Open {
    async fn start(extra: &[&str]) -> Open {
        use std::io::BufRead;
        let (etcd, server, router) = echo_site(extra).await;
        let mut client = std::process::Command::new(PYTHON)
            .args([
                "-c",
                WAITING_CLIENT,
                "ws://ws.test/chat",
                &router.http.port().to_string(),
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 with websockets: run `make test`, which installs python3-websockets");
        let lines = std::io::BufReader::new(client.stdout.take().unwrap()).lines();
        let mut open = Open {
            _etcd: etcd,
            _server: server,
            router,
            client,
            lines,
        };
        assert_eq!(open.next_line(), "open");
        open
    }

    fn next_line(&mut self) -> String {
        self.lines.next().and_then(Result::ok).unwrap_or_default()
    }

    /// Lets the client echo once more and close; asserts it did.
    fn finish(&mut self) {
        use std::io::Write;
        writeln!(self.client.stdin.take().unwrap(), "go").unwrap();
        assert_eq!(self.next_line(), "echoed after the stop");
        assert!(self.client.wait().unwrap().success());
    }
}

/// SIGTERM: an open WebSocket is a connection like any other: it keeps working while the
/// router drains, and the router exits once it closes (within `--grace`), not at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_websocket_keeps_working_through_the_drain() {
    let mut open = Open::start(&[]).await;
    let router = &mut open.router;
    router.daemon.signal(nix::sys::signal::Signal::SIGTERM);
    router.daemon.wait_log(
        "stopping: open connections finish their requests",
        Duration::from_secs(10),
    );
    // Time for a router that did not wait for the tunnel to have exited.
    std::thread::sleep(Duration::from_millis(500));
    open.finish();
    let router = &mut open.router;
    let status = router.daemon.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(
        !router.daemon.log().contains("end of the grace period"),
        "{}",
        router.daemon.log()
    );
}

/// An open WebSocket is an open connection for `--max-connections` and
/// `router_connections_active`: at the limit, the next client waits in the kernel's queue
/// until the WebSocket closes. (A limit of 1: a listener takes a permit only once a client
/// waits in its queue, so the HTTPS listener, unused here, holds none.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_websocket_holds_its_connection_permit() {
    use std::io::{Read, Write};
    let mut open = Open::start(&["--max-connections", "1"]).await;
    assert_eq!(open.router.metric("router_connections_active"), 1);
    let mut next = std::net::TcpStream::connect(open.router.http).unwrap();
    next.write_all(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\nConnection: close\r\n\r\n")
        .unwrap();
    next.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut answer = Vec::new();
    let waited = next.read_to_end(&mut answer);
    assert!(
        waited.is_err() && answer.is_empty(),
        "answered beyond --max-connections while a WebSocket is open: {:?}",
        String::from_utf8_lossy(&answer)
    );
    open.finish();
    next.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    next.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}

/// `--tunnel-timeout`: a WebSocket with no byte either way for that long is closed (counted),
/// with its permit; one with a message every 400 ms stays open past three timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_websocket_is_closed_at_the_tunnel_timeout_and_a_busy_one_is_kept() {
    let mut open = Open::start(&["--tunnel-timeout", "1s"]).await;
    let router = &open.router;
    testkit::eventually(Duration::from_secs(10), "the quiet tunnel closed", || {
        (router.metric("router_tunnel_timeouts_total") == 1).then_some(())
    });
    testkit::eventually(Duration::from_secs(5), "its connection gone", || {
        (router.metric("router_connections_active") == 0).then_some(())
    });
    // The client finds it closed when it sends again.
    {
        use std::io::Write;
        writeln!(open.client.stdin.take().unwrap(), "go").unwrap();
    }
    assert_ne!(open.next_line(), "echoed after the stop");
    let _ = open.client.wait();

    let out = std::process::Command::new(PYTHON)
        .args([
            "-c",
            STEADY_CLIENT,
            "ws://ws.test/chat",
            &open.router.http.port().to_string(),
        ])
        .output()
        .expect("python3 with websockets");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("kept"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(open.router.metric("router_tunnel_timeouts_total"), 1);
}
