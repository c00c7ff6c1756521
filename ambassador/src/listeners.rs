//! Listening sockets: one per worker thread for every allocated TCP service port
//! (SO_REUSEPORT), opened and closed as the route table changes, and their accept loops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::connection::{handle, set_congestion, tcp_socket};
use crate::routes::Routes;
use crate::server::Shared;
use crate::workers::Workers;

/// One service port's listening sockets, one per worker, and their accept loops.
pub(crate) struct Listener {
    pub(crate) stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Listener {
    /// Waits until every accept loop has returned, so every socket is closed.
    pub(crate) async fn closed(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// What every accept loop shares.
pub(crate) struct AcceptContext<'a> {
    pub(crate) tracker: &'a TaskTracker,
    pub(crate) global: &'a Arc<Semaphore>,
    pub(crate) hard: &'a CancellationToken,
    pub(crate) workers: &'a Workers,
}

/// Opens listeners for new ports, closes those of released ports.
pub(crate) async fn reconcile(
    shared: &Arc<Shared>,
    routes: &Routes,
    listeners: &mut HashMap<u16, Listener>,
    context: &AcceptContext<'_>,
) {
    let released: Vec<u16> = listeners
        .keys()
        .filter(|port| !routes.by_port.contains_key(port))
        .copied()
        .collect();
    for port in released {
        if let Some(listener) = listeners.remove(&port) {
            shared.sockets.withdraw(&format!("tcp/{port}/"));
            listener.stop.cancel();
            // The sockets close when the accept loops return; only then is the port free.
            listener.closed().await;
            let closed = shared
                .listening
                .lock()
                .expect("listening lock")
                .remove(&port);
            if let (Some(senders), Some(SocketAddr::V4(addr))) = (&shared.senders, closed) {
                senders.unwatch_clients_of(addr);
            }
            info!(
                port,
                "port released; listener closed, its connections drain"
            );
        }
    }
    for (&port, service) in &routes.by_port {
        if listeners.contains_key(&port) {
            continue;
        }
        let addr = SocketAddr::new(shared.config.bind, port);
        // One socket per worker, all bound before any accepts: a port is served by all
        // workers or not at all.
        // Or the ones a predecessor handed over: the same sockets and accept queues.
        let names: Vec<String> = (0..context.workers.handles.len())
            .map(|i| format!("tcp/{port}/{i}"))
            .collect();
        let sockets: std::io::Result<Vec<std::net::TcpListener>> =
            match shared.sockets.inherit_all(&names) {
                Some(fds) => fds
                    .into_iter()
                    .map(|fd| {
                        let socket = std::net::TcpListener::from(fd);
                        socket.set_nonblocking(true).map(|()| socket)
                    })
                    .collect(),
                None => context
                    .workers
                    .handles
                    .iter()
                    .map(|_| listen(addr, shared.config.local_congestion.as_deref()))
                    .collect(),
            };
        match sockets {
            Ok(sockets) => {
                for (name, socket) in names.into_iter().zip(&sockets) {
                    shared.sockets.offer(name, socket);
                }
                let local = sockets[0].local_addr().unwrap_or(addr);
                info!(addr = %local, service = %service.service_port, "listening on");
                if let (Some(senders), SocketAddr::V4(local)) = (&shared.senders, local) {
                    if let Err(e) = senders.watch_clients_of(local) {
                        debug!(error = %e, port, "cannot watch the clients of a port");
                    }
                }
                shared
                    .listening
                    .lock()
                    .expect("listening lock")
                    .insert(port, local);
                let stop = CancellationToken::new();
                // The per-listener limit holds for the port, whichever thread accepts.
                let local_limit =
                    Arc::new(Semaphore::new(shared.config.max_connections_per_listener));
                let tasks = sockets
                    .into_iter()
                    .zip(&context.workers.handles)
                    .enumerate()
                    .map(|(thread, (socket, worker))| {
                        worker.spawn(accept_loop(
                            shared.clone(),
                            socket,
                            (port, thread, context.workers.handles.len()),
                            stop.clone(),
                            context.tracker.clone(),
                            (context.global.clone(), local_limit.clone()),
                            context.hard.clone(),
                        ))
                    })
                    .collect();
                listeners.insert(port, Listener { stop, tasks });
            }
            Err(e) => {
                warn!(addr = %addr, service = %service.service_port, error = %e, "cannot listen; retrying")
            }
        }
    }
    shared.metrics.listeners.set(listeners.len() as i64);
}

async fn accept_loop(
    shared: Arc<Shared>,
    socket: std::net::TcpListener,
    (port, thread, threads): (u16, usize, usize),
    stop: CancellationToken,
    tracker: TaskTracker,
    (global, local): (Arc<Semaphore>, Arc<Semaphore>),
    hard: CancellationToken,
) {
    // Registered with the runtime of the thread this loop runs on.
    let listener = match runtime::accept::Listener::new(socket) {
        Ok(l) => l,
        Err(e) => {
            warn!(port, error = %e, "cannot watch the listening socket");
            return;
        }
    };
    let mut backoff = runtime::Backoff::new(Duration::from_millis(5), Duration::from_secs(1));
    // One wait for the stop signal for the loop's life, not one registered per connection.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    // The first thread's socket carries the port's steering program (`steer`).
    let mut steer = (thread == 0 && threads > 1).then(|| shared.steer.subscribe());
    if let Some(taking) = &mut steer {
        steer_port(&listener, port, *taking.borrow_and_update());
    }
    // The port's place first: a loop that then waits for a place of the global limit holds
    // one of its own port only.
    let permits = || async {
        let l = local.clone().acquire_owned().await.ok()?;
        let g = global.clone().acquire_owned().await.ok()?;
        Some((g, l))
    };
    let mut stopping = false;
    loop {
        let (g, l, client, from) = if stopping {
            // The stop: what waits in the queue is taken, as many as there are permits for,
            // before the socket closes with this loop. Closing it would reset them: their
            // clients have connected and may have sent their first bytes.
            let (Ok(g), Ok(l)) = (
                global.clone().try_acquire_owned(),
                local.clone().try_acquire_owned(),
            ) else {
                return;
            };
            match listener.take_waiting() {
                Some((client, from)) => (g, l, client, from),
                None => return,
            }
        } else {
            // A client in the queue, then the permits, then accept: at the limit, clients
            // wait in the kernel's queue, and a loop whose queue is empty holds no permit.
            let accepted = tokio::select! {
                biased;
                () = &mut stopped => {
                    stopping = true;
                    continue;
                }
                Some(taking) = steer_changed(&mut steer) => {
                    steer_port(&listener, port, taking);
                    continue;
                }
                a = listener.accept(permits) => a,
            };
            match accepted {
                Ok(Some(((g, l), client, from))) => (g, l, client, from),
                Ok(None) => return,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(port, error = %e, "accept failed; backing off");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            }
        };
        backoff.reset();
        shared.accepted[thread].fetch_add(1, Ordering::Relaxed);
        let Some(service) = shared.routes().by_port.get(&port).cloned() else {
            continue;
        };
        let shared = shared.clone();
        let hard = hard.clone();
        // No span per connection: it would cost space in every task and time on every
        // accept; the few log lines of a connection name their service and backend.
        tracker.spawn(async move {
            let _permits = (g, l);
            handle(&shared, client, from, &service, &hard).await;
        });
    }
}

/// The next number of threads taking new connections; never, for a socket that does not steer.
async fn steer_changed(steer: &mut Option<tokio::sync::watch::Receiver<usize>>) -> Option<usize> {
    match steer {
        Some(taking) => match taking.changed().await {
            Ok(()) => Some(*taking.borrow_and_update()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Puts the program for `taking` threads on the port's socket group.
fn steer_port(listener: &impl std::os::fd::AsFd, port: u16, taking: usize) {
    if let Err(e) = crate::steer::attach(listener, taking) {
        // The kernel's hash spreads them instead: slower on light loads, never wrong.
        debug!(port, error = %e, "cannot steer new connections");
    }
}

/// Kernel accept queue of each listener: bursts of new connections wait here, not in SYN
/// retransmits (Linux caps it at net.core.somaxconn).
const BACKLOG: i32 = 4096;

/// A non-blocking listening socket that shares its port with the other workers' sockets
/// (SO_REUSEPORT: new connections go to one of them, `steer`). Only sockets of the same
/// user can join; a port held by anything else fails with EADDRINUSE.
/// `congestion` and TCP_NODELAY are inherited by every accepted socket.
fn listen(addr: SocketAddr, congestion: Option<&str>) -> std::io::Result<std::net::TcpListener> {
    use nix::sys::socket::{self as sock, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let fd = tcp_socket(addr)?;
    sock::setsockopt(&fd, sock::sockopt::ReuseAddr, &true)?;
    sock::setsockopt(&fd, sock::sockopt::ReusePort, &true)?;
    // Accepted sockets inherit it: no system call per connection.
    sock::setsockopt(&fd, sock::sockopt::TcpNoDelay, &true)?;
    set_congestion(&fd, congestion);
    sock::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    sock::listen(
        &fd,
        sock::Backlog::new(BACKLOG).unwrap_or(sock::Backlog::MAXCONN),
    )?;
    Ok(std::net::TcpListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At the stop, the connections waiting in the socket's queue (clients connected, not
    /// accepted yet) are taken before it closes; closing the socket would reset them. (With
    /// no route for the port, as here, each is closed once taken, its permits back at once;
    /// a served port hands them to the relay as any other.)
    #[tokio::test]
    async fn the_stop_takes_the_connections_waiting_in_the_queue() {
        let shared = Shared::new(crate::config::Config::new(
            schema::Prefix::default(),
            "here".into(),
            "127.0.0.1".parse().unwrap(),
        ));
        let socket = listen("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = socket.local_addr().unwrap();
        socket.set_nonblocking(true).unwrap();
        let clients: Vec<_> = (0..4)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let stop = CancellationToken::new();
        stop.cancel();
        accept_loop(
            shared.clone(),
            socket,
            (addr.port(), 0, 1),
            stop,
            TaskTracker::new(),
            (Arc::new(Semaphore::new(10)), Arc::new(Semaphore::new(10))),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(shared.accepted[0].load(Ordering::Relaxed), 4);
        drop(clients);
    }
}
