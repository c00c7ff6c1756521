//! The kernel path (`--kernel-forward on`): once the backend is connected, the kernel moves
//! the bytes and this process only watches the connection's ends.
//!
//! The two sockets are joined in a sockhash (crate `sockmap`) and leave tokio's reactor,
//! which would otherwise wake this thread for every segment the kernel forwards. What user
//! space keeps, with an epoll instance of the connection's own that reports only a peer's
//! FIN (EPOLLRDHUP), errors and hang-ups, never data:
//!
//! * **End of stream**: a FIN from one side becomes a write shutdown of the other (half-close
//!   both ways), but only once every byte that side sent is in the other's send queue: the
//!   kernel forwards through a work queue, so the FIN can be seen before the last bytes moved.
//!   `TCP_INFO` says how many bytes arrived in order (`tcpi_bytes_received`, less one for the
//!   FIN), and the acknowledged bytes plus the send queue (`SIOCOUTQ`) say how many were
//!   written; until they match, the check runs again after 1 ms, then 2, up to 50.
//! * **Errors**: a reset on either side resets the other (SO_LINGER 0 at close).
//! * **The idle timeout**: `tcpi_last_data_recv` of both sockets, read when the timer fires.
//! * **The byte counts** for `/metrics` and `/state`, from `tcpi_bytes_received`: read every
//!   [`COUNT_EVERY`] while the connection lives (its bytes move without waking this process),
//!   and at the end.
//!
//! A pair the kernel refuses to join (the map is full, a side closed already) is handed back
//! and relayed in user space (`relay`).

use std::io;
use std::net::{Shutdown, TcpStream as StdStream};
use std::os::fd::AsFd;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use sockmap::KernelPath;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::metrics::ServiceCounters;
use crate::relay::{Ended, Moved, RelayConfig, Tally};

/// First and longest wait before checking again whether a side's bytes are all forwarded.
const FLUSH_FIRST: Duration = Duration::from_millis(1);
const FLUSH_MOST: Duration = Duration::from_millis(50);
/// How long the bytes a failed side sent may take to reach the other before both are reset.
const FAILED_FLUSH_MOST: Duration = Duration::from_secs(1);
/// How often a joined connection's byte counts are read while it lives: two `TCP_INFO` reads
/// and a timer's wake-up per connection, so that 10,000 joined connections cost 4,000 system
/// calls a second; a Prometheus scrape (15 s or more apart) sees them at most this late.
pub const COUNT_EVERY: Duration = Duration::from_secs(5);

/// Forwards in the kernel until both directions end. `Err` gives the sockets back when the
/// kernel refused to join them (nothing was moved or lost: relay them in user space).
/// `ack_pending`: as for [`crate::relay::relay`]; the kernel sends the handshake's last ACK
/// now, since nothing here knows when the first bytes go. The bytes are counted in `tally`
/// from the connection's first byte (those relayed before the hand-over are in it already);
/// `stats`: the service's counters of the kernel path.
pub(crate) async fn forward(
    path: &KernelPath,
    client: TcpStream,
    backend: TcpStream,
    config: &RelayConfig,
    ack_pending: bool,
    tally: &mut Tally,
    stats: &ServiceCounters,
) -> Result<Ended, (TcpStream, TcpStream, io::Error)> {
    if let Err(e) = path.join(client.as_fd(), backend.as_fd()) {
        stats.kernel_refused.inc();
        return Err((client, backend, e));
    }
    stats.kernel_forwarded.inc();
    // Also when the connection is cut at the end of the grace period (this future dropped).
    let _in_kernel = InKernel::new(&stats.kernel_active);
    if ack_pending {
        let _ = socket2::SockRef::from(&backend).set_tcp_quickack(true);
    }
    // `watch` counts after every step, and each way it ends carries its last step's counts.
    Ok(watch(client, backend, config, tally).await)
}

/// Counts a connection in the kernel path while it lives (also when its task is cut).
pub(crate) struct InKernel<'a>(&'a Gauge);

impl<'a> InKernel<'a> {
    pub(crate) fn new(gauge: &'a Gauge) -> Self {
        gauge.inc();
        InKernel(gauge)
    }
}

impl Drop for InKernel<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn watch(
    client: TcpStream,
    backend: TcpStream,
    config: &RelayConfig,
    tally: &mut Tally,
) -> Ended {
    let sides = match (client.into_std(), backend.into_std()) {
        (Ok(client), Ok(backend)) => [
            Side::new(client, false),
            // Connected by us: its acknowledged bytes count our SYN.
            Side::new(backend, true),
        ],
        (Err(e), _) | (_, Err(e)) => return Ended::Failed(Moved::default(), e),
    };
    let mut pair = Pair {
        sides,
        moved: Moved::default(),
        error: None,
    };
    let ends = match sockmap::Ends::new(pair.sides[0].stream.as_fd(), pair.sides[1].stream.as_fd())
    {
        Ok(ends) => ends,
        Err(e) => return pair.fail(e),
    };
    let mut flush_wait = FLUSH_FIRST;
    let mut deadline = Instant::now() + config.idle_timeout;
    let mut count_at = Instant::now() + COUNT_EVERY;
    loop {
        let step = pair.step();
        tally.reach(pair.moved);
        let flushing = match step {
            Ok(Step::Done) => return Ended::Done(pair.moved),
            Ok(Step::Wait { flushing }) => flushing,
            Err(e) => return pair.fail(e),
        };
        if !flushing {
            flush_wait = FLUSH_FIRST;
        }
        tokio::select! {
            changed = ends.changed() => if let Err(e) = changed {
                return pair.fail(e);
            },
            () = tokio::time::sleep(flush_wait), if flushing => {
                flush_wait = (flush_wait * 2).min(FLUSH_MOST);
            }
            // The next step reads the counts.
            () = tokio::time::sleep_until(count_at) => count_at += COUNT_EVERY,
            () = tokio::time::sleep_until(deadline) => {
                match pair.idle_for() {
                    Ok(idle) if idle >= config.idle_timeout => return Ended::Idle(pair.moved),
                    Ok(idle) => deadline = Instant::now() + (config.idle_timeout - idle),
                    Err(e) => return pair.fail(e),
                }
            }
        }
    }
}

struct Side {
    stream: StdStream,
    /// Sequence space before the first byte written: 1 on a socket we connected (its SYN
    /// counts in `tcpi_bytes_acked`), 0 on an accepted one.
    syn: u64,
    /// This side's end of stream is passed on.
    ended: bool,
    /// Its sending half is shut down (the other side ended first).
    shut: bool,
    /// Its peer's FIN has arrived.
    fin: bool,
}

impl Side {
    fn new(stream: StdStream, connected_by_us: bool) -> Self {
        Side {
            stream,
            syn: u64::from(connected_by_us),
            ended: false,
            shut: false,
            fin: false,
        }
    }

    /// `TCP_INFO` of this side, with a state that says whether the bytes received count a
    /// FIN. The kernel reads the state before it takes the socket's lock for the counters, so
    /// a FIN that arrives in between is in `tcpi_bytes_received` under a state without it,
    /// and would be counted as a byte of data (for good: counts only grow). A state read
    /// after the counters tells: without a FIN still, the first reading had none; with one,
    /// that later reading counts it for sure.
    fn tcp_info(&self) -> io::Result<sockmap::TcpInfo> {
        let first = sockmap::tcp_info(self.stream.as_fd())?;
        if sockmap::state::fin_received(first.state) {
            return Ok(first);
        }
        let then = sockmap::tcp_info(self.stream.as_fd())?;
        Ok(if sockmap::state::fin_received(then.state) {
            then
        } else {
            first
        })
    }

    /// Bytes this side's peer has sent, in order (less the FIN, which counts one).
    fn received(&self, info: &sockmap::TcpInfo) -> u64 {
        info.bytes_received.saturating_sub(u64::from(self.fin))
    }

    /// Bytes written into this socket so far: acknowledged or waiting in its send queue.
    fn written(&self, info: &sockmap::TcpInfo) -> io::Result<u64> {
        let queued = sockmap::unacked(self.stream.as_fd())? as u64;
        Ok((info.bytes_acked + queued).saturating_sub(self.syn))
    }
}

struct Pair {
    /// Client, backend.
    sides: [Side; 2],
    moved: Moved,
    /// A side failed (which, how, when): its last bytes are being delivered to the other.
    error: Option<(usize, io::Error, Instant)>,
}

enum Step {
    Done,
    /// `flushing`: a side's FIN is in but not all its bytes are forwarded yet.
    Wait {
        flushing: bool,
    },
}

impl Pair {
    /// Reads both sockets' state and passes on what ended.
    fn step(&mut self) -> io::Result<Step> {
        let info = [self.sides[0].tcp_info()?, self.sides[1].tcp_info()?];
        for (i, (side, info)) in self.sides.iter_mut().zip(&info).enumerate() {
            // A closed socket that has not ended cleanly: a reset (or a timeout).
            let mut failed = false;
            if info.state == sockmap::state::CLOSE {
                match side.stream.take_error()? {
                    // A write after our own shutdown of this side: the kernel's forwarding
                    // work trying the empty segment that carried the other side's FIN; every
                    // byte was in this socket's send queue before the shutdown.
                    Some(e) if side.shut && e.kind() == io::ErrorKind::BrokenPipe => {}
                    Some(e) => {
                        failed = true;
                        self.error.get_or_insert((i, e, Instant::now()));
                    }
                    None => {}
                }
            }
            if sockmap::state::fin_received(info.state)
                && !failed
                && self.error.as_ref().is_none_or(|(at, _, _)| *at != i)
            {
                side.fin = true;
            }
        }
        self.moved = Moved {
            up: self.sides[0].received(&info[0]),
            down: self.sides[1].received(&info[1]),
        };
        if let Some((i, _, since)) = &self.error {
            // What the failed side sent before it failed goes out first (a reader in user
            // space reads it before the error too); then both are reset.
            let (i, other) = (*i, 1 - *i);
            let sent = self.sides[i].received(&info[i]);
            let delivered = self.sides[other]
                .written(&info[other])
                .is_ok_and(|w| w >= sent);
            if delivered || since.elapsed() >= FAILED_FLUSH_MOST {
                let (_, e, _) = self.error.take().expect("checked above");
                return Err(e);
            }
            return Ok(Step::Wait { flushing: true });
        }
        let mut flushing = false;
        for (src, dst) in [(0, 1), (1, 0)] {
            if self.sides[src].ended || !self.sides[src].fin {
                continue;
            }
            if self.sides[dst].written(&info[dst])? < self.sides[src].received(&info[src]) {
                flushing = true;
                continue;
            }
            self.sides[src].ended = true;
            // When the other direction has ended too, closing both sockets says it.
            if !self.sides[dst].ended {
                match self.sides[dst].stream.shutdown(Shutdown::Write) {
                    Err(e) if e.kind() != io::ErrorKind::NotConnected => return Err(e),
                    _ => self.sides[dst].shut = true,
                }
            }
        }
        if self.sides.iter().all(|s| s.ended) {
            Ok(Step::Done)
        } else {
            Ok(Step::Wait { flushing })
        }
    }

    /// How long no data arrived on either socket.
    fn idle_for(&self) -> io::Result<Duration> {
        let mut ms = u32::MAX;
        for side in &self.sides {
            ms = ms.min(sockmap::tcp_info(side.stream.as_fd())?.last_data_recv);
        }
        Ok(Duration::from_millis(ms.into()))
    }

    /// Ends on an error: both sockets close with a reset, so neither peer takes what it got
    /// for a complete answer.
    fn fail(self, e: io::Error) -> Ended {
        for side in &self.sides {
            let _ = socket2::SockRef::from(&side.stream).set_linger(Some(Duration::ZERO));
        }
        Ended::Failed(self.moved, e)
    }
}
