//! Idle keep-alive connections held without a task.
//!
//! A connection that has been answered and stays idle for [`LINGER`] (longer for a client that
//! came back soon after it was parked: [`LINGER_RETURNING`]) leaves its task: its socket goes
//! into one epoll set of the router's own (itself watched by tokio's reactor) and a slot of a
//! slab, with what it holds (its permit, its place in the drain, its count in
//! `connections_active`) and its client's address; nothing else. When the client sends its
//! next request (or closes), the socket leaves the set and gets a new task, which reads at
//! once. [`run`] closes those still idle at their deadline (the head timeout, as in the task)
//! and every one at the stop, as the task would have.
//!
//! What this saves: a task's cell and its connection's future (about 1.1 KiB), and tokio's
//! registration of the socket (256 bytes: cache-line aligned), against a slot of about 100
//! bytes. nginx keeps an idle connection in about 0.5 KiB, HAProxy in about 1.1
//! (docs/performance.md, "The router"). What it costs: about 3.5 µs of CPU on the next
//! request of a connection that was parked (four `epoll_ctl`, the set's and the reactor's
//! removal and addition, and a task's spawn); nothing for busy connections, which never leave
//! their task.
//!
//! The slots are a `slab` (h2's, in the tree already): a hand-written free list would be the
//! slab again. The set is `rustix`'s epoll, registered with tokio as `sockmap`'s `Ends` are.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::event::epoll;
use slab::Slab;
use tokio::sync::Notify;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::warn;

use crate::client::Client;
use crate::server::{Held, Serving};

/// How long an answered connection waits in its task for the next request before it is
/// parked: long beside the gap between a busy client's requests (under load a connection never
/// parks), short beside how long browsers keep connections open (seconds), and short enough
/// that a burst of new connections that ask once and stay open is parked before the next
/// burst (1,000 connections made in 0.12 s: 0.30-0.38 KiB each when parked after 10 ms, 1.41
/// after 100 ms).
pub const LINGER: Duration = Duration::from_millis(10);

/// The linger of a connection whose client came back within this after it was last answered:
/// a client that asks every few tens of milliseconds stays in its task rather than pay the
/// parking (about 3.5 µs of CPU) on every request.
pub const LINGER_RETURNING: Duration = Duration::from_millis(100);

/// The closes of parked connections at their deadline are looked at no more often than this:
/// a parked connection is closed up to this much after its head timeout.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// The parked connections of one router.
pub struct Parking {
    /// The epoll set: a socket's data is its slot's key.
    set: OwnedFd,
    parked: Mutex<Parked>,
    /// A parked connection's deadline came before every other's: [`run`] looks again.
    sooner: Notify,
}

struct Parked {
    slots: Slab<Slot>,
    /// The stop came: nothing parks any more.
    closed: bool,
    /// The earliest deadline among `slots` (or a little before it).
    earliest: Option<Instant>,
}

/// A parked connection: the slab's key is its token in the epoll set.
struct Slot {
    stream: std::net::TcpStream,
    client: SocketAddr,
    deadline: Instant,
    held: Held,
    /// A task's place in the drain (`State::connections`), which it holds without a task.
    _drain: TaskTrackerToken,
}

impl Parking {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            set: epoll::create(epoll::CreateFlags::CLOEXEC)?,
            parked: Mutex::new(Parked {
                slots: Slab::new(),
                closed: false,
                earliest: None,
            }),
            sooner: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parks an idle connection until its client sends something, closes, or `deadline`
    /// passes. After the stop (or when the set refuses it) it is closed instead.
    pub fn park(&self, s: &Serving, io: Client, client: SocketAddr, held: Held, deadline: Instant) {
        let Ok(stream) = io.into_std() else { return };
        let mut parked = self.lock();
        if parked.closed {
            return;
        }
        let entry = parked.slots.vacant_entry();
        let key = epoll::EventData::new_u64(entry.key() as u64);
        // Readable, the client's close, an error: an add reports what has come already.
        let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP | epoll::EventFlags::ET;
        if let Err(e) = epoll::add(&self.set, &stream, key, flags) {
            warn!(error = %e, "cannot park an idle connection: closed");
            return;
        }
        entry.insert(Slot {
            stream,
            client,
            deadline,
            held,
            _drain: s.state.connections.token(),
        });
        s.state.metrics.connections_parked.inc();
        if parked.earliest.is_none_or(|e| deadline < e) {
            parked.earliest = Some(deadline);
            drop(parked);
            self.sooner.notify_one();
        }
    }

    /// Takes the connections `events` name out of the set, each to a task of its own.
    fn wake(&self, s: &Arc<Serving>, events: &[epoll::Event]) {
        let mut parked = self.lock();
        for event in events {
            let key = usize::try_from(event.data.u64()).unwrap_or(usize::MAX);
            let Some(slot) = parked.slots.try_remove(key) else {
                continue;
            };
            s.state.metrics.connections_parked.dec();
            let _ = epoll::delete(&self.set, &slot.stream);
            // How long it was idle: its deadline is a head timeout after its last answer.
            let idle =
                (Instant::now() + s.limits.head_timeout).saturating_duration_since(slot.deadline);
            let linger = if idle < LINGER_RETURNING {
                LINGER_RETURNING
            } else {
                LINGER
            };
            // In the reactor again when it has to wait (its task reads at once).
            let io = Client::Socket(slot.stream);
            crate::server::spawn_plain(s, slot.held, io, slot.client, Some(linger));
        }
    }

    /// Closes the connections whose deadline has passed (each a head timeout); the earliest
    /// deadline of the rest.
    fn sweep(&self, s: &Serving, now: Instant) {
        let mut parked = self.lock();
        let mut earliest = None::<Instant>;
        let mut due = Vec::new();
        for (key, slot) in &parked.slots {
            if slot.deadline <= now {
                due.push(key);
            } else if earliest.is_none_or(|e| slot.deadline < e) {
                earliest = Some(slot.deadline);
            }
        }
        parked.earliest = earliest;
        let closed: Vec<Slot> = due.into_iter().map(|k| parked.slots.remove(k)).collect();
        drop(parked);
        // Closed here, out of the lock (a closed socket leaves the epoll set by itself).
        let n = closed.len();
        drop(closed);
        s.state.metrics.head_timeouts.inc_by(n as u64);
        s.state.metrics.connections_parked.dec_by(n as i64);
    }

    /// The stop: closes every parked connection (each has had its answer and waits for
    /// nothing), and those that would park later.
    fn close(&self, s: &Serving) {
        let mut parked = self.lock();
        parked.closed = true;
        let slots = std::mem::take(&mut parked.slots);
        drop(parked);
        s.state
            .metrics
            .connections_parked
            .dec_by(slots.len() as i64);
    }
}

/// Watches the parked connections until the stop: wakes those whose client sent something,
/// closes those idle past their deadline, and all of them at the stop.
pub async fn run(s: Arc<Serving>) {
    let parking = &s.parking;
    let set = match parking.set.try_clone().and_then(sockmap::register_readable) {
        Ok(set) => set,
        Err(e) => {
            warn!(error = %e, "cannot watch the idle connections' set: they are closed instead");
            parking.close(&s);
            return;
        }
    };
    let now = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let mut swept = Instant::now();
    loop {
        let due = parking.lock().earliest.map(|e| e.max(swept + SWEEP_EVERY));
        let sleep = async {
            match due {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ready = set.readable() => {
                let Ok(mut ready) = ready else {
                    // The reactor is going away: nothing would wake them.
                    parking.close(&s);
                    return;
                };
                // Here, not across the waits: an event holds a pointer, and is not `Send`.
                let mut events = [MaybeUninit::<epoll::Event>::uninit(); 64];
                loop {
                    match epoll::wait(ready.get_inner(), &mut events, Some(&now)) {
                        Ok((got, _)) => {
                            let full = got.len() == 64;
                            parking.wake(&s, got);
                            if !full {
                                break;
                            }
                        }
                        Err(rustix::io::Errno::INTR) => {}
                        Err(e) => {
                            warn!(error = %e, "cannot read the idle connections' set");
                            break;
                        }
                    }
                }
                ready.clear_ready();
            }
            () = sleep => {
                swept = Instant::now();
                parking.sweep(&s, swept);
            }
            () = parking.sooner.notified() => {}
            () = s.stop.cancelled() => {
                parking.close(&s);
                return;
            }
        }
    }
}
