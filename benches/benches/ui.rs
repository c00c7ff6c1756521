//! `viking ui` at scale (a simulation of the data, called one): 1,000 hosts (member, node,
//! registrator and ambassador records, each ambassador with stats for 10 service ports) and
//! 10,000 instances (100 stacks of 10 jobs, scale 10, each job linking to the one before,
//! every instance assigned and running) written to a real etcd; then the real `viking ui`
//! (release build) against it. Measured: the time to the first full page once it has read
//! etcd (the page, its script and style, and the model, over fresh connections, as a browser
//! loads them), the bytes of each, and for 20 changes (one instance's status each) the time
//! from the etcd write to the event on the stream, the event's size and the server's CPU per
//! change pushed; then 20 s of every ambassador rewriting its stats record every 5 s (200
//! puts a second, as 1,000 real ones would) and the server's CPU meanwhile.
//! `make bench-ui` (it builds the release binaries first).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::{Daemon, Etcd};

const HOSTS: usize = 1_000;
const STACKS: usize = 100;
const JOBS: usize = 10;
const SCALE: usize = 10;
const CHANGES: usize = 20;

fn get(addr: SocketAddr, path: &str) -> (Duration, usize) {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = Vec::new();
    s.read_to_end(&mut body).unwrap();
    assert!(
        body.starts_with(b"HTTP/1.1 200"),
        "{path}: {}",
        String::from_utf8_lossy(&body[..body.len().min(200)])
    );
    let head = body.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
    (started.elapsed(), body.len() - head)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let etcd = rt.block_on(Etcd::start());
    let ep = etcd.endpoint();
    let now = "2026-12-03T00:00:00Z";
    let mut kvs: Vec<(String, String)> = Vec::new();
    for h in 0..HOSTS {
        let host = format!("h{h:04}");
        kvs.push((format!("/viking/hosts/{host}"), json!({"v":1,"host":host,"addr":format!("10.{}.{}.1", h / 250, h % 250),"roles":[],"labels":{"zone":format!("z{}", h % 3)}}).to_string()));
        kvs.push((format!("/viking/grid/nodes/{host}"), json!({"v":1,"host":host,"cpus_milli":8000,"memory":16u64<<30,"launcher_version":"0.1.0","since":now}).to_string()));
        kvs.push((format!("/viking/alive/{host}"), json!({"v":1,"host":host,"addr":"10.0.0.1","agent":"registrator","version":"0.1.0","since":now}).to_string()));
        let services: serde_json::Map<String, serde_json::Value> = (0..10)
            .map(|i| (format!("s{:03}/j{i}:80/tcp", h % STACKS), json!({"active":h % 7,"connections":h * 10,"failed":0,"bytes_up":h * 1000,"bytes_down":h * 4000})))
            .collect();
        kvs.push((
            format!("/viking/stats/{host}"),
            json!({"v":1,"since":now,"at":now,"services":services}).to_string(),
        ));
    }
    let mut n = 0;
    for s in 0..STACKS {
        let stack = format!("s{s:03}");
        kvs.push((
            format!("/viking/grid/run/{stack}"),
            json!({"v":1,"since":now}).to_string(),
        ));
        for j in 0..JOBS {
            let job = format!("j{j}");
            let mut spec = schema::JobSpec::new(
                schema::StackName::new(&stack).unwrap(),
                schema::JobName::new(&job).unwrap(),
                "app/image:1",
            );
            spec.scale = SCALE as u32;
            spec.ports = vec![schema::PortSpec {
                port: 80,
                proto: schema::Proto::Tcp,
            }];
            spec.resources.cpus_milli = 100;
            spec.resources.memory = 64 << 20;
            if j > 0 {
                spec.links.push(schema::LinkSpec {
                    alias: format!("j{}", j - 1),
                    service: format!("{stack}/j{}", j - 1).parse().unwrap(),
                    prefix: format!("J{}", j - 1),
                    ports: vec![schema::LinkPortSpec {
                        port: 80,
                        proto: schema::Proto::Tcp,
                        ambassador_port: 20000,
                    }],
                });
                spec.link_env.insert(
                    format!("J{}_PORT", j - 1),
                    format!("tcp://172.17.0.1:{}", 20000 + n),
                );
            }
            kvs.push((
                format!("/viking/stacks/{stack}/jobs/{job}"),
                serde_json::to_string(&spec).unwrap(),
            ));
            kvs.push((
                format!("/viking/ports/alloc/{stack}/{job}/80-tcp"),
                json!({"v":1,"port":20000 + (s * JOBS + j) % 10000}).to_string(),
            ));
            for i in 0..SCALE {
                let host = format!("h{:04}", n % HOSTS);
                n += 1;
                kvs.push((
                    format!("/viking/grid/assign/{host}/{stack}/{job}/{i}"),
                    json!({"v":1,"spec_digest":"d","generation":1,"assigned_at":now}).to_string(),
                ));
                kvs.push((format!("/viking/grid/status/{host}/{stack}/{job}/{i}"), json!({"v":1,"state":"running","container_id":format!("{n:012x}"),"spec_digest":"d","since":now,"restarts":0,"reason":""}).to_string()));
            }
        }
    }
    let keys = kvs.len();
    rt.block_on(async {
        let mut c = etcd.client().await;
        for chunk in kvs.chunks(100) {
            let ops: Vec<etcd_client::TxnOp> = chunk
                .iter()
                .map(|(k, v)| etcd_client::TxnOp::put(k.as_str(), v.as_str(), None))
                .collect();
            c.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
        }
    });
    eprintln!(
        "simulated cluster written: {keys} keys ({HOSTS} hosts, {} instances)",
        STACKS * JOBS * SCALE
    );

    let addr: SocketAddr = ([127, 0, 0, 1], testkit::free_ports(1)[0]).into();
    let started = Instant::now();
    let mut ui = Daemon::spawn(
        testkit::workspace_bin("viking"),
        &["--etcd", &ep, "ui", "--listen", &addr.to_string()],
    );
    ui.wait_log("viking ui serving the cluster", Duration::from_secs(30));
    // Read once: the model has every host.
    loop {
        let (_, bytes) = get(addr, "/api/model");
        if bytes > 100_000 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the model never filled:\n{}",
            ui.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready = started.elapsed();
    let mut page = Duration::ZERO;
    let mut sizes = Vec::new();
    for path in ["/", "/app.js", "/style.css", "/api/model"] {
        let (took, bytes) = get(addr, path);
        page += took;
        sizes.push((path, bytes, took));
    }

    // The event stream, then one status change at a time.
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(stream, "GET /events HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut pending = Vec::new();
    // Reads up to `needle`; the bytes of the stream up to it.
    let mut read_until = |needle: &str, stream: &mut TcpStream| -> usize {
        loop {
            if let Some(at) = pending
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
            {
                pending.drain(..at + needle.len());
                return at + needle.len();
            }
            let n = stream.read(&mut buf).expect("the event stream");
            assert!(n > 0, "the event stream ended");
            pending.extend_from_slice(&buf[..n]);
        }
    };
    read_until("\n\n", &mut stream); // the model at subscription
    let before = cpu_ticks(ui.pid());
    let mut latencies = Vec::new();
    let mut event_bytes = Vec::new();
    let mut client = rt.block_on(etcd.client());
    for i in 0..CHANGES {
        let marker = format!("bench-change-{i}");
        let value = json!({"v":1,"state":"failed","container_id":"0","spec_digest":"d","since":now,"restarts":1,"reason":marker}).to_string();
        let written = Instant::now();
        rt.block_on(client.put("/viking/grid/status/h0000/s000/j0/0", value, None))
            .unwrap();
        let head = read_until(&marker, &mut stream);
        latencies.push(written.elapsed());
        event_bytes.push(head + read_until("\n\n", &mut stream));
        std::thread::sleep(Duration::from_millis(300));
    }
    let hz = 100.0; // USER_HZ on Linux
    let cpu_per_change = (cpu_ticks(ui.pid()) - before) as f64 / hz / CHANGES as f64;
    latencies.sort();
    event_bytes.sort();

    // The steady state of a big cluster: every ambassador rewrites its stats every 5 s.
    const CHURN: Duration = Duration::from_secs(20);
    let before = cpu_ticks(ui.pid());
    let started = Instant::now();
    let mut puts = 0usize;
    while started.elapsed() < CHURN {
        let round = Instant::now();
        for h in 0..HOSTS {
            let host = format!("h{h:04}");
            let at = format!("2026-12-03T00:00:{:02}Z", puts % 60);
            let services: serde_json::Map<String, serde_json::Value> = (0..10)
                .map(|i| (format!("s{:03}/j{i}:80/tcp", h % STACKS), json!({"active":h % 7,"connections":h * 10 + puts,"failed":0,"bytes_up":h * 1000 + puts,"bytes_down":h * 4000})))
                .collect();
            let value = json!({"v":1,"since":now,"at":at,"services":services}).to_string();
            rt.block_on(client.put(format!("/viking/stats/{host}"), value, None))
                .unwrap();
            puts += 1;
            // 1,000 puts spread over 5 s.
            let due = round + Duration::from_millis(5 * (h as u64 + 1));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    let churn_secs = started.elapsed().as_secs_f64();
    let churn_cpu = (cpu_ticks(ui.pid()) - before) as f64 / hz / churn_secs;
    let model_bytes = sizes
        .iter()
        .find(|s| s.0 == "/api/model")
        .map(|s| s.1)
        .unwrap_or(0);
    println!();
    println!(
        "viking ui, {HOSTS} hosts, {} instances ({keys} keys), one machine",
        STACKS * JOBS * SCALE
    );
    println!("| measure | value | goal |");
    println!("| --- | --- | --- |");
    println!(
        "| start to the first full model (process start, etcd read, model built) | {ready:.2?} | |"
    );
    println!(
        "| first full page once serving (/, /app.js, /style.css, /api/model) | {page:.2?} | under 1 s |"
    );
    for (path, bytes, took) in &sizes {
        println!("| {path} | {bytes} bytes, {took:.2?} | |");
    }
    println!(
        "| a change in etcd to its event on the stream, median of {CHANGES} | {:.2?} (max {:.2?}) | on screen within 2 s |",
        latencies[CHANGES / 2],
        latencies[CHANGES - 1]
    );
    println!(
        "| the event of a change (the sections it touched; the whole model is {model_bytes} bytes), median | {} bytes | |",
        event_bytes[CHANGES / 2]
    );
    println!(
        "| server CPU per change pushed | {:.1} ms | |",
        cpu_per_change * 1000.0
    );
    println!(
        "| server CPU while every host rewrites its stats every 5 s ({puts} puts in {churn_secs:.1} s) | {:.1}% of a core | |",
        churn_cpu * 100.0
    );
}
