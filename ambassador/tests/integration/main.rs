//! The ambassador against a real etcd and real sockets on loopback.

mod dns;
mod kernel;
mod proxy;
mod senders;
mod udp;
mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambassador::{Config, Shared, ShutdownReport};
use etcd_client::Client;
use schema::records::{self, EndpointRecord, PortAllocRecord};
use schema::{HostId, Instance, Key, Prefix, ServicePort};
use std::future::ready;

use testkit::{Etcd, eventually_async};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// An ambassador running in this process; stopped (and its tasks ended) on drop.
pub struct Amb {
    pub shared: Arc<Shared>,
    pub stop: CancellationToken,
    pub task: Option<JoinHandle<ShutdownReport>>,
}

impl Drop for Amb {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

impl Amb {
    pub async fn start(etcd: &Etcd, tweak: impl FnOnce(&mut Config)) -> Amb {
        let mut config = Config::new(
            Prefix::default(),
            "here".into(),
            "127.0.0.1".parse().unwrap(),
        );
        config.grace = Duration::from_secs(5);
        // The tests allocate free ports the kernel picked, outside the default range.
        config.range = schema::PortRange::new(1, 65535).unwrap();
        // The daemon's env twins, so scripts/test.sh runs this suite with the kernel path
        // taking every connection at once (VIKING_KERNEL_FORWARD_AFTER=0), with it off, and
        // with the peers forwarding in their own sends from the start.
        if let Ok(mode) = std::env::var("VIKING_KERNEL_FORWARD") {
            config.kernel_forward = match mode.as_str() {
                "off" => ambassador::config::KernelForward::Off,
                "on" => ambassador::config::KernelForward::On,
                other => panic!("VIKING_KERNEL_FORWARD={other}: on or off"),
            };
        }
        if let Ok(after) = std::env::var("VIKING_KERNEL_FORWARD_AFTER") {
            config.relay.kernel_after =
                after.parse().expect("VIKING_KERNEL_FORWARD_AFTER: a count");
        }
        // And with the peers forwarding in their own sends (the suite's clients and backends
        // are this process's sockets, in the cgroup v2 root).
        if std::env::var("VIKING_KERNEL_SENDERS").as_deref() == Ok("host") {
            config.kernel_senders = Some(
                sockmap::balance::cgroup2_mount()
                    .expect("VIKING_KERNEL_SENDERS=host: no cgroup v2"),
            );
        }
        tweak(&mut config);
        let shared = Shared::new(config);
        let stop = CancellationToken::new();
        let task = tokio::spawn(ambassador::run(
            shared.clone(),
            etcd.client().await,
            stop.clone(),
        ));
        Amb {
            shared,
            stop,
            task: Some(task),
        }
    }

    /// Waits until `port` has a listener and returns its address.
    pub async fn listening(&self, port: u16) -> SocketAddr {
        eventually_async(Duration::from_secs(10), "a listener on the port", || {
            ready(self.shared.listening().get(&port).copied())
        })
        .await
    }

    /// Waits (up to `limit`) until `port` routes to `n` backends.
    pub async fn wait_backends(&self, port: u16, n: usize, limit: Duration) {
        eventually_async(limit, &format!("{n} backends on port {port}"), || {
            let routes = self.shared.routes();
            let there = routes
                .by_port
                .get(&port)
                .is_some_and(|s| s.backends.len() == n);
            ready(there.then_some(()))
        })
        .await;
    }
}

/// Allocates `sp` at a free loopback port by writing its alloc record, as portalloc would.
pub async fn put_alloc(client: &mut Client, sp: &str) -> u16 {
    let port = testkit::free_ports(1)[0];
    let sp: ServicePort = sp.parse().unwrap();
    client
        .put(
            Prefix::default().key(&Key::PortAlloc(sp)),
            records::encode(&PortAllocRecord::new(port)),
            None,
        )
        .await
        .unwrap();
    port
}

/// Registers `addr` as an endpoint of `sp`, as registrator would; returns the key.
pub async fn put_endpoint(
    client: &mut Client,
    sp: &str,
    host: &str,
    n: u32,
    addr: SocketAddr,
) -> String {
    let sp: ServicePort = sp.parse().unwrap();
    let host_id = HostId::new(host).unwrap();
    let instance = Instance::new(host_id.clone(), &format!("{n:012x}"), sp.port).unwrap();
    let key = Prefix::default().key(&Key::Endpoint {
        service_port: sp,
        instance,
    });
    let rec = EndpointRecord {
        v: 1,
        host: host_id,
        addr: addr.ip().to_string(),
        port: addr.port(),
        container_id: format!("{n:012x}"),
        container_name: format!("c{n}"),
        registered_at: String::new(),
    };
    client
        .put(key.as_str(), records::encode(&rec), None)
        .await
        .unwrap();
    key
}

/// A backend that greets first with `hello from NAME\n`, then echoes until EOF, then closes its
/// sending half. Stops when the handle is aborted or dropped with `Backend`.
pub struct Backend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener: TcpListener = socket.listen(4096).unwrap();
        let addr = listener.local_addr().unwrap();
        let greeting = format!("hello from {name}\n");
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let greeting = greeting.clone();
                conns.spawn(async move {
                    if s.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Backend { addr, task }
    }

    /// Stops accepting and closes the listening socket: new connects are refused.
    /// Waits until the task (and with it the socket) is gone: `abort` alone only
    /// asks, and a connect in between would be accepted and then reset.
    pub async fn kill(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

/// Connects through the proxy and reads the greeting: which backend answered.
pub async fn who(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while !got.ends_with(b"\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before greeting",
            ));
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&got)
        .trim()
        .trim_start_matches("hello from ")
        .to_owned())
}

mod binary;
