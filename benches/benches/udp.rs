//! UDP through the ambassador beside the references, in one run (`make bench-udp`, which
//! installs nginx with its stream module and socat): direct to a UDP echo, through the
//! ambassador (`--threads 1`), through nginx's stream module in UDP mode (one worker), and
//! through `socat UDP-LISTEN:...,fork`. For 64-byte and 1,200-byte datagrams: datagrams
//! answered per second (clients keep a window of datagrams in flight, for a fixed time) and
//! the proxy's CPU per datagram (its own and its children's, from `/proc`).
//!
//! Everything stays on loopback; every load is bounded in time. Sizes and length:
//! `UDP_SECS` (5), `UDP_CLIENTS` (4), `UDP_WINDOW` (16), `UDP_RUNS` (3; each figure is the
//! median).

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use testkit::Etcd;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A process killed (with its children's process group) on drop.
struct Proc(Child);

impl Drop for Proc {
    /// SIGTERM first, for up to 2 s: nginx's master stops its workers then, where a SIGKILL
    /// would leave them running; SIGKILL after that.
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        for _ in 0..40 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The echo every target forwards to: one thread, blocking calls.
fn echo() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65_536];
        loop {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        }
    });
    addr
}

fn free_port() -> u16 {
    testkit::free_ports(1)[0]
}

/// CPU ticks (user and system) of `pid` and of its children, living and reaped.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = |pid: &str| -> Option<Vec<u64>> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &s[s.rfind(')')? + 2..];
        Some(
            rest.split(' ')
                .skip(11)
                .take(4)
                .filter_map(|f| f.parse().ok())
                .collect(),
        )
    };
    let own = stat(&pid.to_string()).map_or(0, |f| f.iter().sum());
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let theirs: u64 = children
        .split_whitespace()
        .filter_map(|c| stat(c).map(|f| f[0] + f[1]))
        .sum();
    own + theirs
}

/// `clients` threads, each with `window` datagrams of `size` bytes in flight to `to`, for
/// `secs`: datagrams answered per second.
fn load(to: SocketAddr, size: usize, clients: u64, window: u64, secs: u64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.connect(to).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                let datagram = vec![7u8; size];
                let mut buf = vec![0u8; 65_536];
                let (mut inflight, mut answered) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    while inflight < window {
                        if s.send(&datagram).is_err() {
                            break;
                        }
                        inflight += 1;
                    }
                    match s.recv(&mut buf) {
                        Ok(_) => {
                            answered += 1;
                            inflight -= 1;
                        }
                        // Lost somewhere: refill the window.
                        Err(_) => inflight = 0,
                    }
                }
                answered
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let answered: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    answered as f64 / secs as f64
}

/// Waits until `to` answers a datagram.
fn answers(to: SocketAddr) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(to).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        let _ = s.send(b"ping");
        if s.recv(&mut buf).is_ok() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{to} never answered"
        );
    }
}

fn nginx(dir: &std::path::Path, port: u16, echo: SocketAddr) -> Proc {
    let module = ["/usr/lib/nginx/modules/ngx_stream_module.so"]
        .into_iter()
        .find(|m| std::path::Path::new(m).exists())
        .expect("nginx's stream module: apt-get install libnginx-mod-stream (make bench-udp does)");
    let conf = format!(
        "load_module {module};\ndaemon off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/nginx.err warn;\nevents {{ worker_connections 65536; }}\n\
         stream {{ server {{ listen 127.0.0.1:{port} udp reuseport; proxy_pass {echo}; \
         proxy_timeout 60s; }} }}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new("nginx")
        .args(["-c", dir.join("nginx.conf").to_str().unwrap(), "-p"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (make bench-udp installs it)");
    Proc(child)
}

fn socat(port: u16, echo: SocketAddr) -> Proc {
    let child = Command::new("socat")
        .arg(format!("UDP4-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"))
        .arg(format!("UDP4:{echo}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("socat (make bench-udp installs it)");
    Proc(child)
}

fn main() {
    let secs = env("UDP_SECS", 5);
    let clients = env("UDP_CLIENTS", 4);
    let window = env("UDP_WINDOW", 16);
    let runs = env("UDP_RUNS", 3);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let echo = echo();
    let etcd = rt.block_on(Etcd::start());
    let dir = tempfile::tempdir().unwrap();

    // The ambassador: the allocation and the endpoint, as portalloc and registrator write them.
    let amb_port = free_port();
    let sp = "bench/echo:7/udp";
    rt.block_on(async {
        let mut c = etcd.client().await;
        c.put(
            "/viking/ports/alloc/bench/echo/7-udp",
            format!("{{\"v\":1,\"port\":{amb_port}}}"),
            None,
        )
        .await
        .unwrap();
        c.put(
            "/viking/services/bench/echo/7-udp/h0:000000000001:7",
            format!(
                "{{\"v\":1,\"host\":\"h0\",\"addr\":\"127.0.0.1\",\"port\":{},\"container_id\":\"000000000001\"}}",
                echo.port()
            ),
            None,
        )
        .await
        .unwrap();
    });
    let admin = format!("127.0.0.1:{}", free_port());
    let amb = Proc(
        Command::new(testkit::workspace_bin("ambassador"))
            .args([
                "--etcd",
                &etcd.endpoint(),
                "--host",
                "h0",
                "--bind",
                "127.0.0.1",
                "--admin",
                &admin,
                "--threads",
                "1",
                "--dns",
                "off",
                "--range",
                "1-65535",
                "--run-dir",
                dir.path().to_str().unwrap(),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ambassador"),
    );
    let nginx_port = free_port();
    let ngx = nginx(dir.path(), nginx_port, echo);
    let socat_port = free_port();
    let soc = socat(socat_port, echo);
    let targets: [(&str, u16, Option<u32>); 4] = [
        ("direct", echo.port(), None),
        ("ambassador", amb_port, Some(amb.0.id())),
        ("nginx", nginx_port, Some(ngx.0.id())),
        ("socat", socat_port, Some(soc.0.id())),
    ];
    for (_, port, _) in &targets {
        answers(SocketAddr::from(([127, 0, 0, 1], *port)));
    }
    let hz = 100.0; // USER_HZ
    println!(
        "udp: {clients} clients, {window} datagrams in flight each, {secs} s a run, median of \
         {runs} runs ({sp})"
    );
    println!("| datagram | target | datagrams/s | vs direct | vs nginx | proxy CPU per datagram |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for size in [64usize, 1200] {
        let mut results = Vec::new();
        for (name, port, pid) in &targets {
            let mut rates = Vec::new();
            let mut cpus = Vec::new();
            for _ in 0..runs {
                let before = pid.map(cpu_ticks);
                let rate = load(
                    SocketAddr::from(([127, 0, 0, 1], *port)),
                    size,
                    clients,
                    window,
                    secs,
                );
                if let (Some(pid), Some(before)) = (pid, before) {
                    let ticks = cpu_ticks(*pid).saturating_sub(before) as f64;
                    cpus.push(ticks / hz / (rate * secs as f64) * 1e6);
                }
                rates.push(rate);
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v.get(v.len() / 2).copied()
            };
            results.push((*name, median(&mut rates).unwrap(), median(&mut cpus)));
        }
        let direct = results[0].1;
        let nginx = results[2].1;
        for (name, rate, cpu) in &results {
            println!(
                "| {size} B | {name} | {rate:.0} | {:.2} | {:.2} | {} |",
                rate / direct,
                rate / nginx,
                cpu.map_or("-".to_owned(), |c| format!("{c:.1} µs"))
            );
        }
    }
    drop((amb, ngx, soc));
}
