//! UDP service ports: one socket per worker thread for every allocated `/udp` service port
//! (SO_REUSEPORT: the kernel hashes each client address to one of them, so a client's
//! datagrams stay on one thread), and a session per client address.
//!
//! A client's first datagram picks a backend with the same choice and ejection as TCP
//! ([`crate::routes::Service::pick`]) and opens a socket of the session's own, connected to
//! it; later datagrams go through that socket, and a task per session sends the backend's
//! replies back to the client from the listening socket (the address the client sent to). A
//! backend that answers with ICMP port-unreachable (`ECONNREFUSED` on the session's socket)
//! counts as a failed connect and the session moves to another backend; a session whose
//! backend left the routes moves on its next datagram. Sessions idle for
//! `--udp-idle-timeout` end; `--max-udp-sessions` caps them in all (datagrams of new clients
//! are dropped, counted and logged).
//!
//! System calls are batched where a socket has several datagrams queued
//! ([`crate::udp_batch`]): the listening socket's are taken with one `recvmmsg`, a session's
//! replies with one `recvmmsg` and sent on with one `sendmmsg`; each client datagram goes out
//! with its own `send` on its session's socket.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::os::fd::{AsRawFd, RawFd};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::access::Decision;
use crate::routes::{Backend, Routes, Service};
use crate::server::Shared;
use crate::udp_batch::Slots;
use crate::workers::Workers;

/// The largest datagram carried (the most an IPv4 UDP payload can be).
pub const MAX_DATAGRAM: usize = 65_535;

/// One UDP service port's sockets, one per worker, and their receive loops.
pub(crate) struct UdpListener {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl UdpListener {
    /// Ends the loops at once (nothing more is read from the sockets); what it returns
    /// completes once every session has ended and the sockets are closed.
    pub(crate) fn stop(self) -> impl std::future::Future<Output = ()> {
        self.stop.cancel();
        async move {
            for task in self.tasks {
                let _ = task.await;
            }
        }
    }
}

/// How long the sessions of a process that handed its sockets over stay, for the replies
/// already on their way from the backends (at most `--grace`): the successor reads the
/// listening sockets from the hand-over on, and makes sessions of its own.
pub const LINGER: Duration = Duration::from_secs(2);

/// Opens sockets for new UDP ports, closes those of released ports (their sessions end).
pub(crate) async fn reconcile(
    shared: &Arc<Shared>,
    routes: &Routes,
    open_ports: &mut HashMap<u16, UdpListener>,
    workers: &Workers,
) {
    let released: Vec<u16> = open_ports
        .keys()
        .filter(|port| !routes.udp_by_port.contains_key(port))
        .copied()
        .collect();
    for port in released {
        if let Some(socket) = open_ports.remove(&port) {
            shared.sockets.withdraw(&format!("udp/{port}/"));
            socket.stop().await;
            shared
                .udp_listening
                .lock()
                .expect("listening lock")
                .remove(&port);
            info!(port, "UDP port released; socket closed, its sessions ended");
        }
    }
    for (&port, service) in &routes.udp_by_port {
        if open_ports.contains_key(&port) {
            continue;
        }
        match open(shared, port, workers) {
            Ok(socket) => {
                let addr = SocketAddr::new(shared.config.bind, port);
                info!(%addr, service = %service.service_port, "listening on (UDP)");
                shared
                    .udp_listening
                    .lock()
                    .expect("listening lock")
                    .insert(port, addr);
                open_ports.insert(port, socket);
            }
            Err(e) => {
                warn!(port, service = %service.service_port, error = %e, "cannot listen on UDP; retrying");
            }
        }
    }
}

/// Opens the sockets of `port` on every worker and starts their loops.
fn open(shared: &Arc<Shared>, port: u16, workers: &Workers) -> std::io::Result<UdpListener> {
    let addr = SocketAddr::new(shared.config.bind, port);
    // All bound before any loop starts: a port is served by all workers or not at all.
    // Or the ones a predecessor handed over.
    let names: Vec<String> = (0..workers.handles.len())
        .map(|i| format!("udp/{port}/{i}"))
        .collect();
    let sockets = match shared.sockets.inherit_all(&names) {
        Some(fds) => fds
            .into_iter()
            .map(|fd| {
                let socket = std::net::UdpSocket::from(fd);
                socket.set_nonblocking(true).map(|()| socket)
            })
            .collect::<std::io::Result<Vec<_>>>()?,
        None => workers
            .handles
            .iter()
            .map(|_| bind(addr))
            .collect::<std::io::Result<Vec<_>>>()?,
    };
    for (name, socket) in names.into_iter().zip(&sockets) {
        shared.sockets.offer(name, socket);
    }
    let stop = CancellationToken::new();
    let tasks = sockets
        .into_iter()
        .zip(&workers.handles)
        .map(|(socket, worker)| {
            worker.spawn(receive_loop(shared.clone(), socket, port, stop.clone()))
        })
        .collect();
    Ok(UdpListener { stop, tasks })
}

/// A non-blocking UDP socket that shares `addr` with the other workers' (SO_REUSEPORT; only
/// sockets of the same user can join).
fn bind(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Bursts wait in the kernel rather than being dropped there.
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// One client's session.
struct Session {
    /// The backend and the socket connected to it; replaced when the session moves.
    current: Mutex<Current>,
    /// Milliseconds since `epoch` of the last datagram either way.
    last: AtomicU64,
    /// Ends the reply task (idle, moved for good, or the port closed).
    stop: CancellationToken,
    /// Its service's counters, for the end (the service may have left the routes by then).
    stats: Arc<crate::metrics::ServiceCounters>,
}

struct Current {
    backend: Arc<Backend>,
    socket: Arc<UdpSocket>,
    /// The route table the backend was checked against.
    routes: Arc<Routes>,
}

/// What one socket's loop and its sessions share.
struct Port {
    shared: Arc<Shared>,
    port: u16,
    listening: UdpSocket,
    sessions: Mutex<HashMap<SocketAddr, Arc<Session>>>,
    /// Clients whose first datagram waits for the access table to learn them.
    waiting: Mutex<std::collections::HashSet<SocketAddr>>,
    epoch: Instant,
    /// The port closed: every session's `stop` is a child of it, and none starts after it.
    ended: CancellationToken,
}

impl Port {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

async fn receive_loop(
    shared: Arc<Shared>,
    socket: std::net::UdpSocket,
    port: u16,
    stop: CancellationToken,
) {
    let listening = match UdpSocket::from_std(socket) {
        Ok(s) => s,
        Err(e) => {
            warn!(port, error = %e, "cannot watch the UDP socket");
            return;
        }
    };
    let port = Arc::new(Port {
        shared,
        port,
        listening,
        sessions: Mutex::default(),
        waiting: Mutex::default(),
        epoch: Instant::now(),
        ended: CancellationToken::new(),
    });
    let mut slots = Slots::new(MAX_DATAGRAM);
    let fd = port.listening.as_raw_fd();
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    'wait: loop {
        let ready = tokio::select! {
            biased;
            () = &mut stopped => break,
            r = port.listening.readable() => r,
        };
        if let Err(e) = ready {
            warn!(port = port.port, error = %e, "UDP socket not readable");
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        // Everything queued, a batch per call, until the socket is empty.
        loop {
            let batch = match port
                .listening
                .try_io(Interest::READABLE, || slots.receive(fd))
            {
                Ok(batch) => batch,
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue 'wait,
                // An ICMP error for an earlier reply to a client that went away.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => continue,
                Err(e) => {
                    warn!(port = port.port, error = %e, "UDP receive failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue 'wait;
                }
            };
            let routes = port.shared.routes();
            let Some(service) = routes.udp_by_port.get(&port.port).cloned() else {
                continue;
            };
            for (i, (n, client)) in batch.iter().enumerate() {
                let Some(client) = *client else { continue };
                service.stats.datagrams_up.inc();
                service.stats.bytes_up.inc_by(*n as u64);
                forward(&port, &routes, &service, client, slots.get(i, *n)).await;
            }
        }
    }
    // The port closed: every session ends with it. After a hand-over the successor reads
    // the socket, and the replies on their way still reach their clients through the
    // sessions here (sent from this process's copy of the same socket) for a moment.
    if port.shared.handed_over.load(Ordering::Acquire) {
        tokio::time::sleep(LINGER.min(port.shared.config.grace)).await;
    }
    port.ended.cancel();
    let sessions: Vec<Arc<Session>> = port
        .sessions
        .lock()
        .expect("sessions lock")
        .drain()
        .map(|(_, s)| s)
        .collect();
    for s in &sessions {
        counted_out(&port, s);
    }
}

/// Sends one client datagram on: through its session, made or moved as needed.
async fn forward(
    port: &Arc<Port>,
    routes: &Arc<Routes>,
    service: &Arc<Service>,
    client: SocketAddr,
    datagram: &[u8],
) {
    let existing = port
        .sessions
        .lock()
        .expect("sessions lock")
        .get(&client)
        .cloned();
    let session = match existing {
        Some(s) => {
            // The routes changed since the session's backend was checked: is it still one?
            let gone = {
                let mut current = s.current.lock().expect("session lock");
                if Arc::ptr_eq(&current.routes, routes) {
                    false
                } else if service
                    .backends
                    .iter()
                    .any(|b| Arc::ptr_eq(b, &current.backend))
                {
                    current.routes = routes.clone();
                    false
                } else {
                    true
                }
            };
            if gone && !move_session(port, routes, service, &s, None).await {
                end(port, client, &s);
                return;
            }
            s
        }
        None => {
            // Link-scoped access, as for a TCP connection.
            match port
                .shared
                .admit_now(client.ip(), &service.service_port.service)
            {
                Decision::Accept => {}
                Decision::NotLinked(name) => {
                    refused(service, client, &Decision::NotLinked(name));
                    return;
                }
                // Not known yet: waited for apart, so the loop goes on serving the others.
                Decision::Unknown => {
                    hold(port, service, client, datagram);
                    return;
                }
            }
            match start(port, routes, service, client).await {
                Some(s) => s,
                None => return,
            }
        }
    };
    session.last.store(port.now_ms(), Ordering::Relaxed);
    let socket = session.current.lock().expect("session lock").socket.clone();
    match socket.send(datagram).await {
        Ok(_) => {}
        // The backend refused an earlier datagram (ICMP port unreachable): move and resend.
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            let refused = session
                .current
                .lock()
                .expect("session lock")
                .backend
                .clone();
            refused.failed(Instant::now());
            if move_session(port, routes, service, &session, Some(&refused)).await {
                let socket = session.current.lock().expect("session lock").socket.clone();
                if socket.send(datagram).await.is_err() {
                    service.stats.udp_drop_send.inc();
                }
            } else {
                service.stats.udp_drop_no_backend.inc();
                end(port, client, &session);
            }
        }
        Err(e) => {
            debug!(service = %service.service_port, error = %e, "UDP send to a backend failed");
            service.stats.udp_drop_send.inc();
        }
    }
}

/// Counts and logs a session that link-scoped access refuses.
fn refused(service: &Service, client: SocketAddr, decision: &Decision) {
    if let Decision::NotLinked(name) = decision {
        service.stats.refused_not_linked.inc();
        debug!(%client, container = %name, service = %service.service_port, "UDP refused: its job does not link to the service");
    } else {
        service.stats.refused_unknown.inc();
        debug!(%client, service = %service.service_port, "UDP refused: not a known container of this host");
    }
}

/// The first datagram of a client the access table does not know yet: held (one per client)
/// while the table is given `--unknown-source-wait` to learn it, then sent through a new
/// session or refused. Datagrams of that client meanwhile are dropped.
fn hold(port: &Arc<Port>, service: &Arc<Service>, client: SocketAddr, datagram: &[u8]) {
    if !port.waiting.lock().expect("waiting lock").insert(client) {
        return;
    }
    let (port, service) = (port.clone(), service.clone());
    let datagram = datagram.to_vec();
    tokio::spawn(async move {
        let decision = port
            .shared
            .admit(client.ip(), &service.service_port.service)
            .await;
        port.waiting.lock().expect("waiting lock").remove(&client);
        if decision != Decision::Accept {
            refused(&service, client, &decision);
            return;
        }
        let routes = port.shared.routes();
        if let Some(session) = start(&port, &routes, &service, client).await {
            let socket = session.current.lock().expect("session lock").socket.clone();
            if socket.send(&datagram).await.is_err() {
                service.stats.udp_drop_send.inc();
            }
        }
    });
}

/// A new session for `client`, or `None` (counted) when the limit is reached or no backend
/// is left.
async fn start(
    port: &Arc<Port>,
    routes: &Arc<Routes>,
    service: &Arc<Service>,
    client: SocketAddr,
) -> Option<Arc<Session>> {
    let shared = &port.shared;
    let max = shared.config.max_udp_sessions;
    if shared.udp_sessions.fetch_add(1, Ordering::Relaxed) >= max {
        shared.udp_sessions.fetch_sub(1, Ordering::Relaxed);
        service.stats.udp_drop_limit.inc();
        if !shared.udp_limit_logged.swap(true, Ordering::Relaxed) {
            warn!(
                max,
                service = %service.service_port,
                %client,
                "--max-udp-sessions {max} reached: datagrams of new UDP clients are dropped \
                 (counted as ambassador_udp_drops{{reason=\"session limit\"}}) until sessions \
                 end; raise --max-udp-sessions or lower --udp-idle-timeout"
            );
        }
        return None;
    }
    let Some((backend, socket)) = connect(service, &[]).await else {
        shared.udp_sessions.fetch_sub(1, Ordering::Relaxed);
        service.stats.udp_drop_no_backend.inc();
        debug!(service = %service.service_port, %client, "no backend for a UDP datagram");
        return None;
    };
    if shared.udp_sessions.load(Ordering::Relaxed) < max / 2 {
        shared.udp_limit_logged.store(false, Ordering::Relaxed);
    }
    service.stats.sessions.inc();
    service.stats.sessions_active.inc();
    let session = Arc::new(Session {
        current: Mutex::new(Current {
            backend,
            socket,
            routes: routes.clone(),
        }),
        last: AtomicU64::new(port.now_ms()),
        stop: port.ended.child_token(),
        stats: service.stats.clone(),
    });
    {
        let mut sessions = port.sessions.lock().expect("sessions lock");
        // The port closed while this one was being set up (its first datagram waited for
        // the access table): it would never be ended.
        if port.ended.is_cancelled() {
            drop(sessions);
            counted_out(port, &session);
            return None;
        }
        sessions.insert(client, session.clone());
    }
    tokio::spawn(replies(
        port.clone(),
        service.clone(),
        client,
        session.clone(),
    ));
    Some(session)
}

/// A backend of `service` other than `refused`, and a socket connected to it.
async fn connect(
    service: &Service,
    refused: &[&Arc<Backend>],
) -> Option<(Arc<Backend>, Arc<UdpSocket>)> {
    let mut tried: Vec<usize> = service
        .backends
        .iter()
        .enumerate()
        .filter(|(_, b)| refused.iter().any(|r| Arc::ptr_eq(r, b)))
        .map(|(i, _)| i)
        .collect();
    let mut rng = fastrand::Rng::new();
    while let Some(i) = service.pick(&tried, None, Instant::now(), &mut rng) {
        let backend = &service.backends[i];
        let local = if backend.addr.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let socket = match UdpSocket::bind(local).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot open a UDP socket for a session");
                service.stats.local_errors.inc();
                return None;
            }
        };
        match socket.connect(backend.addr).await {
            Ok(()) => return Some((backend.clone(), Arc::new(socket))),
            Err(_) => {
                backend.failed(Instant::now());
                tried.push(i);
            }
        }
    }
    None
}

/// Points `session` at another backend (not `refused`); false when none is left.
async fn move_session(
    port: &Port,
    routes: &Arc<Routes>,
    service: &Service,
    session: &Session,
    refused: Option<&Arc<Backend>>,
) -> bool {
    let Some((backend, socket)) = connect(service, &refused.into_iter().collect::<Vec<_>>()).await
    else {
        return false;
    };
    debug!(port = port.port, backend = %backend.addr, "UDP session moved");
    *session.current.lock().expect("session lock") = Current {
        backend,
        socket,
        routes: routes.clone(),
    };
    true
}

/// Ends a session: out of the table, its reply task stopped, counted.
fn end(port: &Port, client: SocketAddr, session: &Arc<Session>) {
    let removed = {
        let mut sessions = port.sessions.lock().expect("sessions lock");
        match sessions.get(&client) {
            Some(s) if Arc::ptr_eq(s, session) => sessions.remove(&client).is_some(),
            _ => false,
        }
    };
    if removed {
        counted_out(port, session);
    } else {
        session.stop.cancel();
    }
}

/// A session out of the table: its reply task stopped, and it no longer counts toward
/// `--max-udp-sessions` and `ambassador_udp_sessions_active`.
fn counted_out(port: &Port, session: &Session) {
    session.stop.cancel();
    port.shared.udp_sessions.fetch_sub(1, Ordering::Relaxed);
    session.stats.sessions_active.dec();
}

thread_local! {
    /// The reply batches of this thread's sessions (taken and given back within one
    /// synchronous call, so one set per thread is enough).
    static REPLY_SLOTS: std::cell::RefCell<Option<Slots>> = const { std::cell::RefCell::new(None) };
}

/// Takes the replies queued on a session's socket `from` and sends them to `client` from the
/// listening socket `listening`: (received, their bytes, sent). A full send buffer drops the
/// rest (counted by the caller) rather than reporting `WouldBlock` for the session's socket.
fn relay_replies(
    from: RawFd,
    listening: RawFd,
    client: SocketAddr,
) -> std::io::Result<(usize, u64, usize)> {
    REPLY_SLOTS.with(|cell| {
        let mut cell = cell.borrow_mut();
        let slots = cell.get_or_insert_with(|| Slots::new(MAX_DATAGRAM));
        let batch = slots.receive(from)?;
        let datagrams: Vec<&[u8]> = batch
            .iter()
            .enumerate()
            .map(|(i, (n, _))| slots.get(i, *n))
            .collect();
        let bytes = datagrams.iter().map(|d| d.len() as u64).sum();
        let sent = crate::udp_batch::send(listening, &datagrams, Some(client)).unwrap_or(0);
        Ok((batch.len(), bytes, sent))
    })
}

/// The session's replies, from whichever backend it points at, back to the client; ends it
/// once it has been idle for `--udp-idle-timeout`.
async fn replies(
    port: Arc<Port>,
    service: Arc<Service>,
    client: SocketAddr,
    session: Arc<Session>,
) {
    let idle = port.shared.config.udp_idle_timeout;
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    let listening = port.listening.as_raw_fd();
    loop {
        let socket = session.current.lock().expect("session lock").socket.clone();
        let last = session.last.load(Ordering::Relaxed);
        let deadline = port.epoch + Duration::from_millis(last.saturating_add(idle_ms));
        let ready = tokio::select! {
            () = session.stop.cancelled() => return,
            () = tokio::time::sleep_until(deadline.into()) => {
                if port.now_ms().saturating_sub(session.last.load(Ordering::Relaxed)) >= idle_ms {
                    debug!(port = port.port, %client, "UDP session idle: ended");
                    end(&port, client, &session);
                    return;
                }
                continue;
            }
            r = socket.readable() => r,
        };
        // Every reply queued, in batches, sent on to the client a batch per call.
        let received = ready.and_then(|()| {
            let fd = socket.as_raw_fd();
            socket.try_io(Interest::READABLE, || relay_replies(fd, listening, client))
        });
        match received {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Ok((n, bytes, sent)) => {
                session.last.store(port.now_ms(), Ordering::Relaxed);
                service.stats.datagrams_down.inc_by(n as u64);
                service.stats.bytes_down.inc_by(bytes);
                if sent < n {
                    service.stats.udp_drop_send.inc_by((n - sent) as u64);
                }
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                // ICMP port unreachable: a failed connect; the next datagram goes elsewhere.
                let refused = {
                    let current = session.current.lock().expect("session lock");
                    if !Arc::ptr_eq(&socket, &current.socket) {
                        continue; // moved meanwhile
                    }
                    current.backend.clone()
                };
                if refused.failed(Instant::now()) {
                    info!(service = %service.service_port, backend = %refused.addr, "backend ejected: UDP port unreachable");
                }
                let routes = port.shared.routes();
                if !move_session(&port, &routes, &service, &session, Some(&refused)).await {
                    end(&port, client, &session);
                    return;
                }
            }
            Err(e) => {
                debug!(port = port.port, error = %e, "UDP receive from a backend failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
