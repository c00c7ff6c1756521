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
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// A slab this large that is three quarters empty gives its room back (a burst of idle
/// connections gone): its slots move down, each rekeyed in the set.
const SHRINK_FROM: usize = 1024;

/// Readable, the client's close, an error: an add reports what has come already.
const WATCH: epoll::EventFlags = epoll::EventFlags::IN
    .union(epoll::EventFlags::RDHUP)
    .union(epoll::EventFlags::ET);

/// The parked connections of one router.
pub struct Parking {
    /// The epoll set: a socket's data is its slot's key.
    set: OwnedFd,
    parked: Mutex<Parked>,
    /// A parked connection's deadline came before every other's: [`run`] looks again.
    sooner: Notify,
    /// Connections are parked: not after the stop, nor when [`run`] could not watch the set.
    taking: AtomicBool,
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

impl AsFd for Slot {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
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
            taking: AtomicBool::new(true),
        })
    }

    /// Whether an idle connection may be handed over: when not, it waits in its task.
    pub fn taking(&self) -> bool {
        self.taking.load(Ordering::Relaxed)
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
        if let Err(e) = epoll::add(&self.set, &stream, key, WATCH) {
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
        let now = Instant::now();
        for event in events {
            let key = usize::try_from(event.data.u64()).unwrap_or(usize::MAX);
            let Some(slot) = parked.slots.try_remove(key) else {
                continue;
            };
            s.state.metrics.connections_parked.dec();
            let _ = epoll::delete(&self.set, &slot.stream);
            // How long it was idle: its deadline is a head timeout after its last answer.
            let idle = (now + s.limits.head_timeout).saturating_duration_since(slot.deadline);
            let linger = if idle < LINGER_RETURNING {
                LINGER_RETURNING
            } else {
                LINGER
            };
            // In the reactor again when it has to wait (its task reads at once).
            let io = Client::Socket(slot.stream);
            crate::server::spawn_plain(s, slot.held, io, slot.client, Some(linger));
        }
        shrink(&mut parked.slots, &self.set, SHRINK_FROM);
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
        shrink(&mut parked.slots, &self.set, SHRINK_FROM);
        drop(parked);
        // Closed here, out of the lock (a closed socket leaves the epoll set by itself).
        let n = closed.len();
        drop(closed);
        s.state.metrics.head_timeouts.inc_by(n as u64);
        s.state.metrics.connections_parked.dec_by(n as i64);
    }

    /// The stop: closes every parked connection (each has had its answer and waits for
    /// nothing), and those that would park later.
    pub(crate) fn close(&self, s: &Serving) {
        self.taking.store(false, Ordering::Relaxed);
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

/// Once `slots` (at least `from` long) is three quarters empty, moves its slots down and
/// gives the room back, each moved one's key changed in `set` as well. Called by [`run`]
/// alone, once the events it read have been taken: what it reads next carries the new keys.
fn shrink<T: AsFd>(slots: &mut Slab<T>, set: &OwnedFd, from: usize) {
    if slots.capacity() < from || slots.len() > slots.capacity() / 4 {
        return;
    }
    slots.compact(|slot, _, to| {
        let key = epoll::EventData::new_u64(to as u64);
        // One the set refuses stays where it is, and the rest with it.
        epoll::modify(set, &*slot, key, WATCH).is_ok()
    });
}

/// Watches the parked connections until the stop: wakes those whose client sent something,
/// closes those idle past their deadline, and all of them at the stop.
pub async fn run(s: Arc<Serving>) {
    let parking = &s.parking;
    let set = match parking.set.try_clone().and_then(sockmap::register_readable) {
        Ok(set) => set,
        Err(e) => {
            warn!(error = %e, "cannot watch the idle connections' set: they wait in their tasks");
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// After a burst, the slab gives its room back, and each socket left is still the one the
    /// key the set reports for it names; a slab under the size it starts from is left alone.
    #[test]
    fn a_slab_three_quarters_empty_shrinks_and_its_sockets_keep_their_keys() {
        let set = epoll::create(epoll::CreateFlags::CLOEXEC).unwrap();
        let mut slots = Slab::new();
        let mut peers = Vec::new();
        for i in 0..64 {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let key = slots.insert(ours);
            assert_eq!(key, i);
            epoll::add(
                &set,
                &slots[key],
                epoll::EventData::new_u64(key as u64),
                WATCH,
            )
            .unwrap();
            peers.push(theirs);
        }
        let kept = [5usize, 40, 63];
        for i in 0..64 {
            if !kept.contains(&i) {
                slots.remove(i);
            }
        }
        shrink(&mut slots, &set, 16);
        assert_eq!(slots.len(), 3);
        assert!(slots.capacity() < 64, "capacity {}", slots.capacity());
        let mut events = [MaybeUninit::<epoll::Event>::uninit(); 8];
        let second = rustix::event::Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        for (mark, &i) in kept.iter().enumerate() {
            peers[i].write_all(&[mark as u8]).unwrap();
            let (got, _) = epoll::wait(&set, &mut events, Some(&second)).unwrap();
            assert_eq!(got.len(), 1, "one event for socket {i}");
            let key = usize::try_from(got[0].data.u64()).unwrap();
            let mut byte = [0u8];
            slots[key].read_exact(&mut byte).unwrap();
            assert_eq!(byte[0], mark as u8, "key {key} names socket {i}'s");
        }

        let mut small = Slab::new();
        for _ in 0..8 {
            small.insert(UnixStream::pair().unwrap().0);
        }
        for i in 1..8 {
            small.remove(i);
        }
        let before = small.capacity();
        shrink(&mut small, &set, 16);
        assert_eq!(small.capacity(), before);
    }
}
