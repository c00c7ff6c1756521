//! One proxied connection: pick a backend, connect (trying others when one fails), relay,
//! count.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::ServiceCounters;
use crate::relay::{self, Ended, Tally};
use crate::routes::{Backend, Service};
use crate::server::Shared;

/// `hard` cuts the connection (at the end of the grace period after SIGTERM).
/// Closes a connection that link-scoped access refuses at once, with a reset, and counts it.
fn refuse(
    client: TcpStream,
    from: std::net::SocketAddr,
    service: &Service,
    decision: &crate::access::Decision,
) {
    use crate::access::Decision;
    match decision {
        Decision::NotLinked(name) => {
            service.stats.refused_not_linked.inc();
            debug!(%from, container = %name, service = %service.service_port, "refused: its job does not link to the service");
        }
        _ => {
            service.stats.refused_unknown.inc();
            debug!(%from, service = %service.service_port, "refused: not a known container of this host");
        }
    }
    // SO_LINGER 0: the close sends a reset, not a FIN the client might take for an answer.
    let _ = client.set_zero_linger();
    drop(client);
}

pub(crate) async fn handle(
    shared: &Shared,
    client: TcpStream,
    from: std::net::SocketAddr,
    service: &Service,
    hard: &CancellationToken,
) {
    let stats = &service.stats;
    // Link-scoped access: one table lookup (an unknown address waits for the table).
    let decision = shared.admit(from.ip(), &service.service_port.service).await;
    if decision != crate::access::Decision::Accept {
        refuse(client, from, service, &decision);
        return;
    }
    stats.connections.inc();
    // Boxed: the connect phase's state is freed once connected instead of taking space in
    // the task for the connection's whole life.
    let connected = tokio::select! {
        c = Box::pin(connect_any(shared, service)) => c,
        () = hard.cancelled() => return,
    };
    let Some((upstream, backend)) = connected else {
        stats.failed.inc();
        return;
    };
    backend.active.fetch_add(1, Ordering::Relaxed);
    backend.connections.fetch_add(1, Ordering::Relaxed);
    stats.active.inc();
    // The bytes are counted as they move (also those of a connection cut at the end of the
    // grace period).
    let mut tally = Tally::new(&stats.bytes_up, &stats.bytes_down);
    // Built in place (not first bound to a local) so the task holds the relay's state once.
    let ended = tokio::select! {
        e = Box::pin(carry(shared, client, upstream, &mut tally, stats)) => Some(e),
        () = hard.cancelled() => None,
    };
    match ended {
        None => {
            debug!(service = %service.service_port, backend = %backend.addr, "closed at the end of the grace period");
        }
        Some(Ended::Done(_)) => {}
        Some(Ended::Idle(_)) => {
            debug!(service = %service.service_port, backend = %backend.addr, "closed after the idle timeout");
        }
        Some(Ended::Failed(_, e)) => {
            debug!(service = %service.service_port, backend = %backend.addr, error = %e, "relay ended with an error");
        }
    }
    backend.active.fetch_sub(1, Ordering::Relaxed);
    stats.active.dec();
}

/// Moves the bytes: in user space for the first `kernel_after` reads, then in the kernel when
/// the kernel path is on (and the connection still lives, carries no bulk, and the kernel
/// takes the pair), else in user space to the end. With `--kernel-senders`, a pair whose
/// client and backend both run in its cgroup is forwarded in their own sends instead. The
/// connection's bytes are counted in `tally` as they move; the counts in what this returns
/// are its last stretch's only.
async fn carry(
    shared: &Shared,
    client: TcpStream,
    upstream: TcpStream,
    tally: &mut Tally,
    stats: &ServiceCounters,
) -> Ended {
    let config = &shared.config.relay;
    let Some(path) = &shared.kernel else {
        return relay::relay(client, upstream, config, true, tally).await;
    };
    if let Some(senders) = &shared.senders {
        tally.catch(senders.clone());
    }
    let handed = if config.kernel_after == 0 {
        relay::Handed {
            client,
            backend: upstream,
            ack_pending: true,
        }
    } else {
        let after = Some(config.kernel_after);
        match relay::relay_until(client, upstream, config, true, after, tally).await {
            Ok(ended) => return ended,
            Err(handed) => handed,
        }
    };
    let relay::Handed {
        client,
        backend,
        ack_pending,
    } = handed;
    let peers = tally
        .take_senders()
        .and_then(|path| relay::Peers::of(path, &client, &backend));
    if let Some(peers) = peers {
        if ack_pending {
            // The handshake's last ACK, held back for the first bytes, goes now: the backend's
            // socket is established (and caught) only once it has it.
            let _ = socket2::SockRef::from(&backend).set_tcp_quickack(true);
            backend_caught(&peers).await;
        }
        if peers.caught() {
            return in_senders(peers, client, backend, config, ack_pending, tally, stats).await;
        }
        // One of them runs elsewhere (or was not caught): the kernel path's worker carries
        // the pair, and the other peer need not pay the program on its sends.
        peers.release();
    }
    let (client, backend) = match crate::kernel::forward(
        path,
        client,
        backend,
        config,
        ack_pending,
        tally,
        stats,
    )
    .await
    {
        Ok(ended) => return ended,
        Err((client, backend, e)) => {
            debug!(error = %e, "the kernel refused to join the pair; relaying in user space");
            (client, backend)
        }
    };
    relay::relay(client, backend, config, false, tally).await
}

/// At a hand-over before any byte went to the backend, the backend's socket may not be
/// established on its side yet (our ACK just sent), so the sender path has not caught it:
/// while the client is caught, a moment more (at most [`SENDER_WAITS`] ms). After relayed
/// bytes the backend has had its ACK, and one not caught by then runs elsewhere.
async fn backend_caught(peers: &relay::Peers) {
    for _ in 0..SENDER_WAITS {
        if !peers.path.caught(peers.client) || peers.path.caught(peers.backend) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

const SENDER_WAITS: u32 = 3;

/// A pair whose client and backend both run here: each forwards in its own sends into this
/// process's socket towards the other, once all it sent before is relayed; this relay goes on
/// for what comes before that and for the ends (a FIN still comes the usual way).
async fn in_senders(
    peers: relay::Peers,
    client: TcpStream,
    backend: TcpStream,
    config: &relay::RelayConfig,
    ack_pending: bool,
    tally: &mut Tally,
    stats: &ServiceCounters,
) -> Ended {
    use std::os::fd::AsFd;
    let targeted = peers
        .path
        .target(peers.client, backend.as_fd())
        .and_then(|()| peers.path.target(peers.backend, client.as_fd()));
    // Armed at the relay's first step, and again whenever it relays more; dropped, it
    // takes the peers' targets out of the path.
    let arming = relay::Arming { peers, armed: None };
    if let Err(e) = targeted {
        debug!(error = %e, "the kernel refused the sender path; relaying in user space");
        arming.peers.release();
        drop(arming);
        stats.kernel_refused.inc();
        return relay::relay(client, backend, config, ack_pending, tally).await;
    }
    tally.arm(arming);
    stats.kernel_forwarded.inc();
    stats.kernel_senders.inc();
    let _in_kernel = crate::kernel::InKernel::new(&stats.kernel_active);
    relay::relay(client, backend, config, ack_pending, tally).await
}

/// Tries of a connection that fail for want of a file descriptor, and the wait after each.
const LOCAL_RETRIES: usize = 5;
const LOCAL_BACKOFF: std::time::Duration = std::time::Duration::from_millis(20);

/// EMFILE or ENFILE: this process or host is out of file descriptors.
fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == nix::errno::Errno::EMFILE as i32 || code == nix::errno::Errno::ENFILE as i32
    )
}

/// Picks backends and connects, trying up to `connect_attempts` of them: the client sees no
/// failure while a live backend exists. `None` when none answered.
async fn connect_any<'s>(
    shared: &Shared,
    service: &'s Service,
) -> Option<(TcpStream, &'s Backend)> {
    let config = &shared.config;
    let local = config.prefer_local.then_some(config.host.as_str());
    let mut rng = fastrand::Rng::new();
    let mut tried = Vec::new();
    // Failures of our own (no file descriptor left) do not count against a backend.
    let mut local_failures = 0;
    while tried.len() < config.connect_attempts && local_failures < LOCAL_RETRIES {
        let Some(i) = service.pick(&tried, local, Instant::now(), &mut rng) else {
            break;
        };
        tried.push(i);
        let backend = &service.backends[i];
        // Set before the SYN: switched later, after BBR's start-up, cubic would go on from
        // a window BBR left small (8 bulk streams measured 0.48 of direct that way).
        let congestion = config
            .local_congestion
            .as_deref()
            .filter(|_| on_this_host(backend, &config.host));
        match tokio::time::timeout(config.connect_timeout, connect(backend.addr, congestion)).await
        {
            Ok(Ok(stream)) => {
                backend.connected();
                return Some((stream, backend));
            }
            Ok(Err(e)) if out_of_descriptors(&e) => {
                // This host's limit, not the backend's fault: wait a little for descriptors
                // to be freed, try again, eject nobody.
                service.stats.local_errors.inc();
                debug!(service = %service.service_port, error = %e, "no file descriptor for a backend connection; backing off");
                tried.pop();
                local_failures += 1;
                tokio::time::sleep(LOCAL_BACKOFF).await;
                continue;
            }
            Ok(Err(e)) => {
                debug!(service = %service.service_port, backend = %backend.addr, error = %e, "connect failed")
            }
            Err(_) => {
                debug!(service = %service.service_port, backend = %backend.addr, "connect timed out")
            }
        }
        if backend.failed(Instant::now()) {
            warn!(service = %service.service_port, backend = %backend.addr, "backend ejected after consecutive connect failures");
        }
    }
    if service.backends.is_empty() {
        warn!(service = %service.service_port, "no backends registered; is registrator running on the backend hosts?");
    } else if local_failures > 0 && tried.is_empty() {
        warn!(service = %service.service_port, "out of file descriptors: raise the nofile limit or lower --max-connections");
    } else {
        warn!(service = %service.service_port, tried = tried.len(), "no backend answered");
    }
    None
}

/// A non-blocking TCP socket of `addr`'s family.
pub(crate) fn tcp_socket(addr: SocketAddr) -> nix::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{self as sock, AddressFamily, SockFlag, SockType};
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    sock::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// Connects to a backend, TCP_NODELAY set before the SYN. Unlike tokio's `TcpStream::connect`,
/// it asks the kernel for the socket's error (getsockopt SO_ERROR) only when the readiness says
/// the connect failed, not after every clean one: one system call less per connection.
async fn connect(addr: SocketAddr, congestion: Option<&str>) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{self as sock, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let fd = tcp_socket(addr)?;
    let _ = sock::setsockopt(&fd, sock::sockopt::TcpNoDelay, &true);
    // The handshake's last ACK waits to ride on the first bytes the relay sends (one
    // segment less per connection); the relay sends it alone when it has nothing to send at
    // once (`relay::relay`'s `ack_pending`), so a backend that speaks first is not held up.
    let _ = socket2::SockRef::from(&fd).set_tcp_quickack(false);
    set_congestion(&fd, congestion);
    match sock::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(fd))?;
    let ready = stream
        .ready(tokio::io::Interest::WRITABLE | tokio::io::Interest::ERROR)
        .await?;
    if ready.is_error() || ready.is_write_closed() {
        let error = stream.take_error()?;
        return Err(error.unwrap_or_else(|| std::io::ErrorKind::ConnectionRefused.into()));
    }
    Ok(stream)
}

/// Whether the hop to `backend` stays on this host: registered by this host's registrator,
/// or on loopback.
fn on_this_host(backend: &Backend, host: &str) -> bool {
    backend.host == host || backend.addr.ip().is_loopback()
}

/// Sets the congestion control of a socket; `None` keeps the host's default. Checked at
/// start (`check_congestion`), so a failure here only costs speed.
pub(crate) fn set_congestion(fd: &impl std::os::fd::AsFd, name: Option<&str>) {
    if let Some(name) = name {
        let _ = socket2::SockRef::from(fd).set_tcp_congestion(name.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_is_local_when_this_host_registered_the_backend_or_it_is_on_loopback() {
        let backend = |host: &str, addr: &str| {
            Backend::new(
                format!("{host}:000000000001:80"),
                addr.parse().unwrap(),
                host.to_owned(),
            )
        };
        assert!(on_this_host(&backend("a", "10.0.0.1:80"), "a"));
        assert!(on_this_host(&backend("b", "127.0.0.1:80"), "a"));
        assert!(on_this_host(&backend("b", "[::1]:80"), "a"));
        assert!(!on_this_host(&backend("b", "10.0.0.2:80"), "a"));
    }
}

#[cfg(test)]
mod size {
    use std::sync::Arc;

    use super::*;
    use crate::config::Config;
    use crate::routes::Service;

    /// An idle connection costs its task: keep the future small (docs/performance.md).
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let shared = Shared::new(Config::new(
            schema::Prefix::default(),
            "h".into(),
            "127.0.0.1".parse().unwrap(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let service = Service {
            service_port: "s/j:80".parse().unwrap(),
            port: 1,
            backends: Vec::new(),
            stats: Arc::default(),
        };
        let hard = CancellationToken::new();
        let from = client.local_addr().unwrap();
        let task = handle(&shared, client, from, &service, &hard);
        let size = std::mem::size_of_val(&task);
        println!("connection task: {size} bytes");
        assert!(size <= 1024, "the connection task grew to {size} bytes");
    }
}
