//! The data path: bytes between client and backend, each direction on its own.
//!
//! A direction starts with buffered copies and switches to zero-copy `splice()` through a pipe
//! once it carries bulk: [`RelayConfig::splice_after`] bytes in back-to-back reads that each
//! filled the whole buffer. Request/response traffic, however long the connection lives, stays
//! on the copying path, which costs two system calls per message where splice costs three;
//! bulk streams move without copying through user space.
//!
//! The relay is one hand-written poll function over a small state per direction, not a tree
//! of futures: an idle connection holds two sockets, this state and one timer, and no buffer
//! (copies go through a per-thread scratch buffer; only bytes the destination could not take
//! yet are kept, in a buffer of their own). A splicing direction fills its pipe from the
//! source while the destination drains it, so neither side waits for the other's turn.
//!
//! No `unsafe` here: nix's `splice`, `pipe2` and `fcntl` wrappers take owned or borrowed fds.
//! End of stream on one side is passed on as a write shutdown on the other (half-close in both
//! directions); the relay ends when both directions have ended, or on the first error.

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

/// Sizes chosen by measurement (see ARCHITECTURE.md).
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    /// Most bytes one read of the copying path takes.
    pub buffer: usize,
    /// Bytes a direction copies in back-to-back full-buffer reads (a sign of bulk) before it
    /// switches to splice; 0: splice from the start; `u64::MAX`: never.
    pub splice_after: u64,
    /// Pipe capacity asked for with F_SETPIPE_SZ.
    pub pipe_size: usize,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// With the kernel path on: reads relayed here (short ones, none of a bulk run) before
    /// the pair is handed to the kernel (`--kernel-forward-after`); 0: at once.
    pub kernel_after: u32,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            buffer: 16 * 1024,
            splice_after: 64 * 1024,
            pipe_size: 256 * 1024,
            idle_timeout: Duration::from_secs(3600),
            kernel_after: 16,
        }
    }
}

/// Bytes moved each way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub up: u64,
    pub down: u64,
}

/// A connection's bytes as its service's counters hold them. The relay and the kernel path
/// count bytes as they move, not when the connection ends: a database pool's connections live
/// for hours, and `/metrics`, `/state` and the UI must show their traffic meanwhile.
/// `Default`: counters of its own (tests).
#[derive(Debug, Default)]
pub struct Tally {
    up: Counter,
    down: Counter,
    counted: Moved,
    /// The sender path, while this connection's peers may be in it (`sockmap::sender`).
    senders: Option<std::sync::Arc<sockmap::sender::SenderPath>>,
    /// The peers forward in their own sends once all they sent is relayed: each count that
    /// moves is armed for its sender.
    arming: Option<Arming>,
}

/// A connection's client and backend as the sender path keys them (each from its own side).
#[derive(Debug, Clone)]
pub struct Peers {
    pub path: std::sync::Arc<sockmap::sender::SenderPath>,
    pub client: sockmap::sender::Peer,
    pub backend: sockmap::sender::Peer,
}

impl Peers {
    /// The peers of the connection between `client` and `backend` (this process's sockets),
    /// each keyed from its own side: its address first. IPv4 only.
    pub fn of(
        path: std::sync::Arc<sockmap::sender::SenderPath>,
        client: &TcpStream,
        backend: &TcpStream,
    ) -> Option<Peers> {
        use std::net::SocketAddr::V4;
        match (
            client.peer_addr(),
            client.local_addr(),
            backend.peer_addr(),
            backend.local_addr(),
        ) {
            (Ok(V4(c)), Ok(V4(us)), Ok(V4(b)), Ok(V4(ours))) => Some(Peers {
                path,
                client: sockmap::sender::Peer {
                    local: c,
                    remote: us,
                },
                backend: sockmap::sender::Peer {
                    local: b,
                    remote: ours,
                },
            }),
            _ => None,
        }
    }

    /// Both peers' sockets are in the path.
    pub fn caught(&self) -> bool {
        self.path.caught(self.client) && self.path.caught(self.backend)
    }

    /// Both out of the path for good (plain TCP again).
    pub fn release(&self) {
        self.path.release(self.client);
        self.path.release(self.backend);
    }
}

/// A pair whose peers forward in their own sends. Dropped (the pair ends, also when its task
/// is cut at the end of the grace period), it takes both peers' targets out of the path.
#[derive(Debug)]
pub struct Arming {
    pub peers: Peers,
    /// The counts last armed.
    pub armed: Option<Moved>,
}

impl Drop for Arming {
    fn drop(&mut self) {
        self.peers.path.leave(self.peers.client);
        self.peers.path.leave(self.peers.backend);
    }
}

impl Tally {
    /// Counts into the service's `bytes_up` and `bytes_down`.
    pub fn new(up: &Counter, down: &Counter) -> Self {
        Tally {
            up: up.clone(),
            down: down.clone(),
            counted: Moved::default(),
            senders: None,
            arming: None,
        }
    }

    /// The connection's peers may be in the sender path (its addresses are read only when
    /// needed: most connections end first): taken out of it if a direction turns to bulk (the
    /// path forwards small messages; bulk stays on splice, here).
    pub fn catch(&mut self, senders: std::sync::Arc<sockmap::sender::SenderPath>) {
        self.senders = Some(senders);
    }

    /// The sender path, if the peers may still be in it (for the hand-over to decide).
    pub fn take_senders(&mut self) -> Option<std::sync::Arc<sockmap::sender::SenderPath>> {
        self.senders.take()
    }

    /// Takes the peers out of the path for good (a direction turned to bulk).
    fn release_peers(&mut self, client: &TcpStream, backend: &TcpStream) {
        if let Some(peers) = self
            .senders
            .take()
            .and_then(|path| Peers::of(path, client, backend))
        {
            peers.release();
        }
    }

    /// From now on [`Tally::rearm`] arms each count that moved for its sender.
    pub fn arm(&mut self, arming: Arming) {
        self.arming = Some(arming);
    }

    /// Arms the sender path with `relayed` (the bytes this relay moved from each peer since
    /// the connection's first byte, all written: call it after the writes) where it moved
    /// since the last time, with the room in the socket each peer's sends go to (`client`:
    /// the backend's; `backend`: the client's).
    pub fn rearm(
        &mut self,
        relayed: Moved,
        client: BorrowedFd<'_>,
        backend: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let Some(a) = &mut self.arming else {
            return Ok(());
        };
        let (last, p) = (a.armed, &a.peers);
        if last.is_none_or(|m| m.up != relayed.up) {
            p.path.arm(p.client, relayed.up, backend)?;
        }
        if last.is_none_or(|m| m.down != relayed.down) {
            p.path.arm(p.backend, relayed.down, client)?;
        }
        a.armed = Some(relayed);
        Ok(())
    }

    /// Counts what the peers forwarded in their own sends: it went into `client` and
    /// `backend`, so what each has been written (acknowledged or queued, less our SYN and
    /// FIN, which take a place in the sequence) is the total.
    fn count_written(&mut self, client: &TcpStream, backend: &TcpStream) {
        let written = |s: &TcpStream, syn: bool| {
            let info = sockmap::tcp_info(s.as_fd()).ok()?;
            let queued = sockmap::unacked(s.as_fd()).ok()? as u64;
            let fin = sockmap::state::fin_sent(info.state);
            Some((info.bytes_acked + queued).saturating_sub(u64::from(syn) + u64::from(fin)))
        };
        if let (Some(up), Some(down)) = (written(backend, true), written(client, false)) {
            self.reach(Moved { up, down });
        }
    }

    /// The peers no longer forward to this pair (it ends).
    pub fn disarm(&mut self) {
        self.arming = None;
    }

    /// Whether the peers may forward in their own sends (bytes move without the relay).
    pub fn armed(&self) -> bool {
        self.arming.is_some()
    }

    /// Counts the connection's bytes up to `total` (each way, since its first byte); a byte
    /// already counted is not counted again.
    pub fn reach(&mut self, total: Moved) {
        if total.up > self.counted.up {
            self.up.inc_by(total.up - self.counted.up);
            self.counted.up = total.up;
        }
        if total.down > self.counted.down {
            self.down.inc_by(total.down - self.counted.down);
            self.counted.down = total.down;
        }
    }

    /// What is counted so far.
    pub fn counted(&self) -> Moved {
        self.counted
    }
}

/// How a relay ended.
#[derive(Debug)]
pub enum Ended {
    /// Both sides closed their sending half.
    Done(Moved),
    /// Nothing moved for the idle timeout.
    Idle(Moved),
    /// A side failed (reset, broken pipe).
    Failed(Moved, io::Error),
}

/// How long ago either socket last sent data (`TCP_INFO`), for a pair whose peers forward
/// in their own sends into them.
fn sent_since(client: &TcpStream, backend: &TcpStream) -> Option<Duration> {
    let a = sockmap::tcp_info(client.as_fd()).ok()?.last_data_sent;
    let b = sockmap::tcp_info(backend.as_fd()).ok()?.last_data_sent;
    Some(Duration::from_millis(u64::from(a.min(b))))
}

/// Makes the coming close send a RST instead of a FIN (SO_LINGER 0).
fn reset_on_close(socket: &TcpStream) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(std::time::Duration::ZERO));
}

/// Relays until both directions end. `ack_pending`: the backend connection's handshake is
/// not acknowledged yet (TCP_QUICKACK was off while connecting); the first bytes to the
/// backend carry the ACK, and when the first poll has none to send, the ACK goes alone
/// there and then: a backend that speaks first must not wait for the delayed-ACK timer.
pub async fn relay(
    client: TcpStream,
    backend: TcpStream,
    config: &RelayConfig,
    ack_pending: bool,
    tally: &mut Tally,
) -> Ended {
    match relay_until(client, backend, config, ack_pending, None, tally).await {
        Ok(ended) => ended,
        Err(_) => unreachable!("relay_until hands a pair back only when asked to"),
    }
}

/// A pair handed back by [`relay_until`]: everything read so far is written, neither side
/// has ended, and no direction carries bulk.
pub struct Handed {
    pub client: TcpStream,
    pub backend: TcpStream,
    /// The handshake's last ACK to the backend is still held back.
    pub ack_pending: bool,
}

/// [`relay`], handing the pair back once `hand_after` reads (of request/response size) have
/// been relayed while nothing is held and nothing has ended or turned to bulk: then the
/// kernel path takes it. Short connections end here before that, and bulk ones go on here
/// (splice beats the kernel path on a single bulk stream, docs/performance.md).
/// The bytes written are counted in `tally` as they go (on top of what it held at the start).
pub async fn relay_until(
    mut client: TcpStream,
    mut backend: TcpStream,
    config: &RelayConfig,
    mut ack_pending: bool,
    hand_after: Option<u32>,
    tally: &mut Tally,
) -> Result<Ended, Handed> {
    let before = tally.counted();
    let mut to_backend = Direction::default();
    let mut to_client = Direction::default();
    let mut last = Instant::now();
    let idle = tokio::time::sleep(config.idle_timeout);
    tokio::pin!(idle);
    // Made and polled only while the peers forward in their own sends (`Tally::arm`).
    let mut count: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let ended = poll_fn(|cx| {
        let mut active = false;
        let down_done = to_client.is_done();
        let up = to_backend.poll(
            cx,
            &mut client,
            &mut backend,
            config,
            down_done,
            &mut active,
        );
        let up_done = to_backend.is_done();
        let down = to_client.poll(cx, &mut backend, &mut client, config, up_done, &mut active);
        if std::mem::take(&mut ack_pending) && to_backend.moved == 0 && !to_backend.is_done() {
            let _ = socket2::SockRef::from(&backend).set_tcp_quickack(true);
        }
        let moved = Moved {
            up: to_backend.moved,
            down: to_client.moved,
        };
        let relayed = Moved {
            up: before.up + moved.up,
            down: before.down + moved.down,
        };
        tally.reach(relayed);
        if let Err(e) = tally.rearm(relayed, client.as_fd(), backend.as_fd()) {
            // The peers keep sending the usual way, here.
            debug!(error = %e, "cannot arm the sender path");
            tally.disarm();
        }
        for result in [up, down] {
            if let Poll::Ready(Err(e)) = result {
                if e.kind() == io::ErrorKind::ConnectionReset {
                    // One side reset: the other must see a reset too, not a clean end of
                    // stream that could pass for a complete answer.
                    reset_on_close(&client);
                    reset_on_close(&backend);
                }
                return Poll::Ready(Some(Ended::Failed(moved, e)));
            }
        }
        if to_backend.is_done() && to_client.is_done() {
            return Poll::Ready(Some(Ended::Done(moved)));
        }
        if tally.senders.is_some() && (to_backend.spliced() || to_client.spliced()) {
            tally.release_peers(&client, &backend);
        }
        if let Some(after) = hand_after {
            if to_backend.reads + to_client.reads >= after
                && to_backend.handable()
                && to_client.handable()
            {
                return Poll::Ready(None);
            }
        }
        if active {
            last = Instant::now();
        }
        if tally.armed() {
            // The peers' bytes move without this relay: counted from the sockets now and
            // then, as the kernel path counts its own.
            let count = count
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(crate::kernel::COUNT_EVERY)));
            while count.as_mut().poll(cx).is_ready() {
                tally.count_written(&client, &backend);
                count
                    .as_mut()
                    .reset(Instant::now() + crate::kernel::COUNT_EVERY);
            }
        }
        // The timer is set once and moved on only when it fires early: no timer work per byte.
        while idle.as_mut().poll(cx).is_ready() {
            if tally.armed() {
                // The peers' bytes move without this relay: idle is what the sockets say.
                if let Some(since) = sent_since(&client, &backend) {
                    last = last.max(Instant::now() - since);
                }
            }
            let deadline = last + config.idle_timeout;
            if deadline <= Instant::now() {
                return Poll::Ready(Some(Ended::Idle(moved)));
            }
            idle.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await;
    if tally.armed() {
        tally.disarm();
        tally.count_written(&client, &backend);
    }
    ended.ok_or_else(|| Handed {
        client,
        backend,
        ack_pending,
    })
}

/// One direction's state.
#[derive(Default)]
struct Direction {
    /// Bytes written to the destination so far.
    moved: u64,
    /// Bytes of the current run of reads that each filled the whole buffer.
    bulk: u64,
    /// Reads that carried bytes.
    reads: u32,
    phase: Phase,
}

#[derive(Default)]
enum Phase {
    /// Copying through user space; `held[at..]` was read but not yet taken by the destination.
    #[default]
    Copying,
    Held {
        held: Vec<u8>,
        at: usize,
    },
    /// Copying for good: no pipe could be had (e.g. out of file descriptors).
    CopyingOnly,
    Splicing(Box<Pipe>),
    /// End of stream passed on.
    Done,
}

/// A pipe between the two sockets and what it holds.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    /// Bytes in the pipe.
    held: usize,
    /// The source reached end of stream.
    eof: bool,
    /// The last fill found the pipe full: wait for the destination to take some first.
    full: bool,
}

thread_local! {
    /// The copying path's read buffer, shared by every connection this thread polls.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

impl Direction {
    fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Carries bulk: splicing (or copying for want of a pipe).
    fn spliced(&self) -> bool {
        matches!(self.phase, Phase::Splicing(_) | Phase::CopyingOnly)
    }

    /// Could be handed to the kernel now: copying, with nothing held, not in a bulk run.
    fn handable(&self) -> bool {
        matches!(self.phase, Phase::Copying) && self.bulk == 0
    }

    /// Moves what can be moved now. `Ready(Ok)` once the end of stream is passed on (and on
    /// every later call); `Pending` with wake-ups registered for what it waits on. When the
    /// other direction is done already, this end of stream needs no shutdown: the relay
    /// ends and closing the sockets says it (one system call less per connection).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut TcpStream,
        dst: &mut TcpStream,
        config: &RelayConfig,
        other_done: bool,
        active: &mut bool,
    ) -> Poll<io::Result<()>> {
        let Direction {
            moved,
            bulk,
            reads,
            phase,
        } = self;
        let mut wrote = |moved: &mut u64, n: usize| {
            *moved += n as u64;
            *active = true;
        };
        loop {
            match phase {
                Phase::Done => return Poll::Ready(Ok(())),
                Phase::Held { held, at } => {
                    while *at < held.len() {
                        let n = ready!(Pin::new(&mut *dst).poll_write(cx, &held[*at..]))?;
                        if n == 0 {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                        }
                        *at += n;
                        wrote(moved, n);
                    }
                    *phase = Phase::Copying;
                }
                Phase::Copying if *bulk >= config.splice_after => {
                    *phase = match Pipe::new(config.pipe_size) {
                        Ok(pipe) => Phase::Splicing(Box::new(pipe)),
                        Err(_) => Phase::CopyingOnly,
                    };
                }
                Phase::Copying | Phase::CopyingOnly => {
                    let copied = SCRATCH.with_borrow_mut(|buf| {
                        if buf.len() < config.buffer {
                            buf.resize(config.buffer, 0);
                        }
                        let (n, ending) = ready!(poll_read(cx, src, &mut buf[..config.buffer]))?;
                        if n == 0 {
                            return Poll::Ready(Ok(None));
                        }
                        // The FIN is in and this read left bytes unasked for: nothing is left
                        // but the end of stream, and reading it would cost a system call.
                        let last = ending && n < config.buffer;
                        let data = &buf[..n];
                        let mut written = 0;
                        while written < data.len() {
                            match poll_send(cx, dst, &data[written..], ending) {
                                Poll::Ready(Ok(0)) => {
                                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                                }
                                Poll::Ready(Ok(n)) => written += n,
                                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                                Poll::Pending => break,
                            }
                        }
                        let rest = (written < data.len()).then(|| data[written..].to_vec());
                        Poll::Ready(Ok(Some((data.len(), written, rest, last))))
                    });
                    let Some((read, written, rest, last)) = ready!(copied)? else {
                        *phase = Phase::Done;
                        return Poll::Ready(pass_on_end(dst, other_done));
                    };
                    *reads = reads.saturating_add(1);
                    *bulk = if read == config.buffer {
                        *bulk + read as u64
                    } else {
                        0
                    };
                    wrote(moved, written);
                    match rest {
                        Some(held) => *phase = Phase::Held { held, at: 0 },
                        None if last => {
                            *phase = Phase::Done;
                            return Poll::Ready(pass_on_end(dst, other_done));
                        }
                        None => {}
                    }
                }
                Phase::Splicing(pipe) => {
                    let (n, state) = pipe.poll(cx, src, dst)?;
                    if n > 0 {
                        wrote(moved, n);
                    }
                    ready!(state);
                    *phase = Phase::Done;
                    return Poll::Ready(pass_on_end(dst, other_done));
                }
            }
        }
    }
}

impl Pipe {
    fn new(size: usize) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Larger pipes mean fewer splice calls; the kernel may refuse (pipe-max-size), which
        // only costs speed.
        let capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(size as i32))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))
            .map_or(64 * 1024, |c| c as usize);
        Ok(Pipe {
            read,
            write,
            capacity,
            held: 0,
            eof: false,
            full: false,
        })
    }

    /// Fills from `src` and drains into `dst` until both wait. Returns the bytes written to
    /// `dst`, and `Ready` once the source ended and the pipe is empty.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
    ) -> io::Result<(usize, Poll<()>)> {
        let mut moved = 0;
        loop {
            let mut again = false;
            if !self.eof && !self.full && self.held < self.capacity {
                if let Poll::Ready(r) = src.poll_read_ready(cx) {
                    r?;
                    again = true;
                    let len = self.capacity - self.held;
                    let fill = || {
                        splice(src.as_fd(), None, self.write.as_fd(), None, len, FLAGS)
                            .map_err(io::Error::from)
                    };
                    // Into an empty pipe, EAGAIN can only mean the socket is drained, and
                    // `try_io` then clears its readiness. Into a pipe that holds bytes it may
                    // mean the pipe is full (its slots, not its bytes, ran out): then the
                    // socket's readiness must stay, and we fill again once the pipe drained.
                    let filled = if self.held == 0 {
                        src.try_io(Interest::READABLE, fill)
                    } else {
                        fill()
                    };
                    match filled {
                        Ok(0) => self.eof = true,
                        Ok(n) => self.held += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.full = self.held > 0;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            if self.held > 0 {
                if let Poll::Ready(r) = dst.poll_write_ready(cx) {
                    r?;
                    again = true;
                    let drained = dst.try_io(Interest::WRITABLE, || {
                        splice(self.read.as_fd(), None, dst.as_fd(), None, self.held, FLAGS)
                            .map_err(io::Error::from)
                    });
                    match drained {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => {
                            self.held -= n;
                            self.full = false;
                            moved += n;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            if self.eof && self.held == 0 {
                return Ok((moved, Poll::Ready(())));
            }
            if !again {
                return Ok((moved, Poll::Pending));
            }
        }
    }
}

/// Reads what `src` holds into `buf`: the byte count (0: end of stream) and whether the
/// source's end of stream has arrived already behind these bytes (the peer's FIN is in; the
/// next read returns 0). tokio's `poll_read` takes a short read as "drained" and clears the
/// readiness, so a message costs one read, not a second one that hears EAGAIN.
fn poll_read(
    cx: &mut Context<'_>,
    src: &mut TcpStream,
    buf: &mut [u8],
) -> Poll<io::Result<(usize, bool)>> {
    ready!(src.poll_read_ready(cx))?;
    // Readiness is set, so this returns at once, with the flags the kernel reported.
    let ending = match std::pin::pin!(src.ready(Interest::READABLE)).poll(cx) {
        Poll::Ready(Ok(ready)) => ready.is_read_closed(),
        _ => false,
    };
    let mut read = ReadBuf::new(buf);
    ready!(Pin::new(&mut *src).poll_read(cx, &mut read))?;
    Poll::Ready(Ok((read.filled().len(), ending)))
}

/// Writes to `dst`. With `more` (the source's end of stream follows these bytes), the last
/// partial segment is held back (MSG_MORE) until the write shutdown or close that comes next
/// in the same poll, so data and FIN leave in one segment: a connection-per-request exchange
/// costs one TCP segment less each way it ends.
fn poll_send(
    cx: &mut Context<'_>,
    dst: &mut TcpStream,
    data: &[u8],
    more: bool,
) -> Poll<io::Result<usize>> {
    use nix::sys::socket::{MsgFlags, send};
    // nix names no MSG_MORE.
    const MSG_MORE: MsgFlags = MsgFlags::from_bits_retain(nix::libc::MSG_MORE);
    if !more {
        return Pin::new(dst).poll_write(cx, data);
    }
    loop {
        ready!(dst.poll_write_ready(cx))?;
        let sent = dst.try_io(Interest::WRITABLE, || {
            send(dst.as_raw_fd(), data, MSG_MORE | MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
        });
        match sent {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => return Poll::Ready(other),
        }
    }
}

/// End of stream from the source: a write shutdown of the destination, unless the relay is
/// about to close both sockets anyway (the other direction ended already).
fn pass_on_end(dst: &TcpStream, other_done: bool) -> io::Result<()> {
    if other_done {
        Ok(())
    } else {
        shutdown_write(dst)
    }
}

fn shutdown_write(s: &TcpStream) -> io::Result<()> {
    match nix::sys::socket::shutdown(s.as_raw_fd(), nix::sys::socket::Shutdown::Write) {
        Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Two loopback connections: (client, the relay's client side, the relay's backend side,
    /// backend).
    async fn sockets() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (from_client, _) = listener.accept().await.unwrap();
        let to_backend = TcpStream::connect(addr).await.unwrap();
        let (backend, _) = listener.accept().await.unwrap();
        (client, from_client, to_backend, backend)
    }

    #[tokio::test]
    async fn half_close_each_way_then_done_with_the_counts() {
        let (mut client, a, b, mut backend) = sockets().await;
        let relay = tokio::spawn(async move {
            relay(a, b, &RelayConfig::default(), false, &mut Tally::default()).await
        });
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got, b"request",
            "the backend reads the request, then end of stream"
        );
        // The client's sending half is closed; its receiving half still works.
        backend.write_all(b"response").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"response");
        match relay.await.unwrap() {
            Ended::Done(m) => assert_eq!(m, Moved { up: 7, down: 8 }),
            other => panic!("expected Done, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_keeps_a_connection_open_and_silence_closes_it() {
        let (mut client, a, b, mut backend) = sockets().await;
        let config = RelayConfig {
            idle_timeout: Duration::from_secs(10),
            ..RelayConfig::default()
        };
        let start = Instant::now();
        let relay =
            tokio::spawn(async move { relay(a, b, &config, false, &mut Tally::default()).await });
        let mut byte = [0u8; 1];
        // A byte every 6 s: never 10 s of silence, so the relay outlives its first deadline.
        for _ in 0..3 {
            client.write_all(b"x").await.unwrap();
            backend.read_exact(&mut byte).await.unwrap();
            tokio::time::sleep(Duration::from_secs(6)).await;
        }
        assert!(!relay.is_finished(), "closed while bytes still moved");
        match relay.await.unwrap() {
            Ended::Idle(m) => assert_eq!(m, Moved { up: 3, down: 0 }),
            other => panic!("expected Idle, got {other:?}"),
        }
        // The last byte went at 12 s: closed 10 s later, not at the first deadline.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(22) && took < Duration::from_secs(23),
            "closed after {took:?}"
        );
        assert_eq!(
            backend.read(&mut byte).await.unwrap(),
            0,
            "backend sees the close"
        );
    }
}
