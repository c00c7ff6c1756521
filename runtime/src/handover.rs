//! Listening sockets handed from a running daemon to its successor, so that an upgrade loses
//! no connection (HAProxy's `-x`, Pingora's `--upgrade`).
//!
//! The running process listens on a Unix `SOCK_SEQPACKET` socket under the run dir (mode
//! 0600; the peer's uid is checked as well). A new process started with `--upgrade` connects
//! and says [`HELLO`]; the running one answers with a header (`{"meta": ..., "count": N}`),
//! then its sockets in batches of at most [`BATCH`] descriptors (`SCM_RIGHTS`, each batch
//! with the JSON list of their names), then `{"end": true}`. The new process serves on them
//! (the same sockets: one accept queue, nothing in it is lost), syncs its state, and says
//! [`READY`]; only then does the running one answer [`OK`] and stop accepting (its caller
//! drains and exits). A new process that fails or dies before `READY` changes nothing: its
//! copies of the descriptors close with it. One hand-over at a time: a second one is refused
//! while one is in progress, and every one after the process has handed over.
//!
//! Blocking calls on threads of their own: a handful of messages once per upgrade.

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What the new process says first (the protocol's name and version).
pub const HELLO: &[u8] = b"viking-handover 1";
/// The new process serves: the running one may stop accepting.
pub const READY: &[u8] = b"ready";
/// The running one stopped accepting.
pub const OK: &[u8] = b"ok";
/// Descriptors per message (the kernel takes at most 253).
pub const BATCH: usize = 200;
/// The largest message: a batch's names.
const MAX_MESSAGE: usize = 64 * 1024;

/// Why a hand-over did not happen, said by the new process (exit 1: the running one serves on).
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error(
        "cannot reach a running process to upgrade at {}: {error}; is it running with this \
         --run-dir? Start without --upgrade if none runs",
        path.display()
    )]
    Connect {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the running process refused the upgrade: {0}")]
    Refused(String),
    #[error("the hand-over failed: {0}; the running process keeps serving")]
    Protocol(String),
}

impl crate::Fatal for HandoverError {
    fn exit_code(&self) -> u8 {
        crate::process::FAILURE
    }
}

/// The sockets a running process offers, by name, with whatever its successor must know
/// (`meta`, e.g. its thread count). The descriptors are copies (`dup`): the offer keeps them
/// only while it sends.
pub struct Listing {
    pub meta: serde_json::Value,
    pub fds: Vec<(String, OwnedFd)>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    meta: serde_json::Value,
    count: usize,
}

#[derive(Serialize, Deserialize)]
struct Batch {
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    end: bool,
}

/// The running process's side: answers upgrades until dropped.
pub struct Offer {
    path: PathBuf,
    /// The socket file this offer made (device, inode): removed on drop only if it is still
    /// this one (a successor has made its own at the same path).
    made: (u64, u64),
    stop: Arc<AtomicBool>,
    /// An upgrade began (and, once it succeeded, stays set): the path is the successor's then,
    /// whatever its inode says (a file system may give the successor's socket the inode this
    /// one's had; CI saw a drained router delete its successor's socket that way).
    busy: Arc<AtomicBool>,
}

impl Offer {
    /// Listens at `path` (a stale socket there is replaced). `list` is asked for the sockets
    /// at each upgrade; `handed_over` is cancelled once a successor serves.
    pub fn listen(
        path: &Path,
        list: Arc<dyn Fn() -> Listing + Send + Sync>,
        handed_over: CancellationToken,
    ) -> std::io::Result<Offer> {
        let socket = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        let _ = std::fs::remove_file(path);
        rustix::net::bind(&socket, &SocketAddrUnix::new(path)?)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        rustix::net::listen(&socket, 8)?;
        // accept() returns every 200 ms to look at the stop flag.
        rustix::net::sockopt::set_socket_timeout(
            &socket,
            rustix::net::sockopt::Timeout::Recv,
            Some(Duration::from_millis(200)),
        )?;
        let meta = std::fs::metadata(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicBool::new(false));
        {
            let (stop, path, busy) = (stop.clone(), path.to_owned(), busy.clone());
            std::thread::Builder::new()
                .name("handover".into())
                .spawn(move || accept_loop(&socket, &path, &stop, &busy, &list, &handed_over))?;
        }
        Ok(Offer {
            path: path.to_owned(),
            made: (meta.dev(), meta.ino()),
            stop,
            busy,
        })
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if !self.busy.load(Ordering::Acquire)
            && std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.made)
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn accept_loop(
    socket: &OwnedFd,
    path: &Path,
    stop: &AtomicBool,
    busy: &Arc<AtomicBool>,
    list: &Arc<dyn Fn() -> Listing + Send + Sync>,
    handed_over: &CancellationToken,
) {
    while !stop.load(Ordering::Relaxed) {
        let conn = match rustix::net::accept_with(socket, SocketFlags::CLOEXEC) {
            Ok(c) => c,
            Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::INTR => continue,
            Err(e) => {
                warn!(path = %path.display(), "the upgrade socket failed: {e}; upgrades are off");
                return;
            }
        };
        let (busy, list, handed_over) = (busy.clone(), list.clone(), handed_over.clone());
        let spawned = std::thread::Builder::new()
            .name("handover-conn".into())
            .spawn(move || serve_one(&conn, &busy, &list, &handed_over));
        if let Err(e) = spawned {
            warn!("cannot start a thread for an upgrade: {e}");
        }
    }
}

/// One upgrade request, from the peer check to `OK`.
fn serve_one(
    conn: &OwnedFd,
    busy: &AtomicBool,
    list: &Arc<dyn Fn() -> Listing + Send + Sync>,
    handed_over: &CancellationToken,
) {
    // The hello first, whatever the answer: a refusal written to a peer whose message lies
    // unread would be lost to its reset.
    if set_timeout(conn, Some(Duration::from_secs(10))).is_err() {
        return;
    }
    let hello = match recv(conn) {
        Ok((hello, _)) => hello,
        Err(e) => {
            warn!("an upgrade request said nothing: {e}");
            return;
        }
    };
    if hello != HELLO {
        let _ = send(conn, b"refused: unknown protocol");
        warn!(
            "an upgrade request spoke an unknown protocol: {:?}",
            String::from_utf8_lossy(&hello)
        );
        return;
    }
    let me = rustix::process::geteuid();
    let peer = match rustix::net::sockopt::socket_peercred(conn) {
        Ok(p) => p,
        Err(e) => {
            let _ = send(
                conn,
                format!("refused: cannot read the peer's credentials: {e}").as_bytes(),
            );
            return;
        }
    };
    let pid = peer.pid.as_raw_nonzero();
    if peer.uid != me {
        warn!(
            pid,
            uid = peer.uid.as_raw(),
            "refused an upgrade from another user"
        );
        let _ = send(
            conn,
            format!(
                "refused: only user {} may upgrade this process, not {}",
                me.as_raw(),
                peer.uid.as_raw()
            )
            .as_bytes(),
        );
        return;
    }
    if handed_over.is_cancelled() {
        let _ = send(
            conn,
            b"refused: this process has handed over already and is draining; upgrade its successor",
        );
        return;
    }
    if busy.swap(true, Ordering::AcqRel) {
        let _ = send(
            conn,
            b"refused: an upgrade is in progress; try again once it is done",
        );
        return;
    }
    let result = hand_over(conn, list);
    match result {
        Ok(()) => {
            info!(
                pid,
                "handed over to the new process; no longer accepting, draining"
            );
            handed_over.cancel();
        }
        Err(why) => {
            warn!(pid, "upgrade abandoned, serving on: {why}");
            busy.store(false, Ordering::Release);
        }
    }
}

fn hand_over(conn: &OwnedFd, list: &Arc<dyn Fn() -> Listing + Send + Sync>) -> Result<(), String> {
    let listing = list();
    let header = serde_json::to_vec(&Header {
        meta: listing.meta,
        count: listing.fds.len(),
    })
    .map_err(|e| e.to_string())?;
    send(conn, &header).map_err(|e| format!("cannot send: {e}"))?;
    for chunk in listing.fds.chunks(BATCH) {
        let names = serde_json::to_vec(&Batch {
            names: chunk.iter().map(|(n, _)| n.clone()).collect(),
            end: false,
        })
        .map_err(|e| e.to_string())?;
        let fds: Vec<_> = chunk.iter().map(|(_, fd)| fd.as_fd()).collect();
        send_fds(conn, &names, &fds).map_err(|e| format!("cannot send sockets: {e}"))?;
    }
    let end = serde_json::to_vec(&Batch {
        names: Vec::new(),
        end: true,
    })
    .map_err(|e| e.to_string())?;
    send(conn, &end).map_err(|e| format!("cannot send: {e}"))?;
    drop(listing.fds);
    // The new process syncs first: as long as it needs (its own --upgrade-timeout).
    set_timeout(conn, None).map_err(|e| e.to_string())?;
    match recv(conn) {
        Ok((m, _)) if m == READY => {}
        Ok((m, _)) if m.is_empty() => return Err("the new process went away".into()),
        Ok((m, _)) => return Err(format!("unexpected {:?}", String::from_utf8_lossy(&m))),
        Err(e) => return Err(format!("the new process went away: {e}")),
    }
    send(conn, OK).map_err(|e| format!("cannot confirm: {e}"))?;
    Ok(())
}

/// What a new process received: the sockets by name, and the connection to confirm on.
pub struct Taken {
    conn: OwnedFd,
    pub meta: serde_json::Value,
    pub fds: BTreeMap<String, OwnedFd>,
}

/// Connects to the running process at `path` and takes its sockets (the new process's side).
pub fn take(path: &Path) -> Result<Taken, HandoverError> {
    let connect = || -> std::io::Result<OwnedFd> {
        let conn = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        rustix::net::connect(&conn, &SocketAddrUnix::new(path)?)?;
        Ok(conn)
    };
    let conn = connect().map_err(|error| HandoverError::Connect {
        path: path.to_owned(),
        error,
    })?;
    let proto = |e: std::io::Error| HandoverError::Protocol(e.to_string());
    set_timeout(&conn, Some(Duration::from_secs(10))).map_err(proto)?;
    send(&conn, HELLO).map_err(proto)?;
    let (first, _) = recv(&conn).map_err(proto)?;
    if let Some(why) = first.strip_prefix(b"refused: ") {
        return Err(HandoverError::Refused(
            String::from_utf8_lossy(why).into_owned(),
        ));
    }
    if first.is_empty() {
        return Err(HandoverError::Refused(
            "it closed the connection (is it of the same user?)".into(),
        ));
    }
    let header: Header = serde_json::from_slice(&first)
        .map_err(|e| HandoverError::Protocol(format!("bad header: {e}")))?;
    let mut fds = BTreeMap::new();
    loop {
        let (message, received) = recv(&conn).map_err(proto)?;
        let batch: Batch = serde_json::from_slice(&message)
            .map_err(|e| HandoverError::Protocol(format!("bad batch: {e}")))?;
        if batch.end {
            break;
        }
        if batch.names.len() != received.len() {
            return Err(HandoverError::Protocol(format!(
                "{} names came with {} sockets",
                batch.names.len(),
                received.len()
            )));
        }
        fds.extend(batch.names.into_iter().zip(received));
    }
    if fds.len() != header.count {
        return Err(HandoverError::Protocol(format!(
            "{} of {} sockets came",
            fds.len(),
            header.count
        )));
    }
    Ok(Taken {
        conn,
        meta: header.meta,
        fds,
    })
}

/// An optional hand-over as its sockets (none without one) and what confirms it
/// ([`complete`]).
pub fn split(taken: Option<Taken>) -> (Option<Taken>, BTreeMap<String, OwnedFd>) {
    match taken {
        Some(mut t) => {
            let fds = std::mem::take(&mut t.fds);
            (Some(t), fds)
        }
        None => (None, BTreeMap::new()),
    }
}

impl Taken {
    /// Tells the running process to stop accepting, and waits (up to 10 s) until it has.
    pub fn ready(self) -> Result<(), HandoverError> {
        let proto = |e: std::io::Error| HandoverError::Protocol(e.to_string());
        send(&self.conn, READY).map_err(proto)?;
        let (answer, _) = recv(&self.conn).map_err(proto)?;
        if answer == OK {
            Ok(())
        } else {
            Err(HandoverError::Protocol(format!(
                "the running process answered {:?}",
                String::from_utf8_lossy(&answer)
            )))
        }
    }
}

fn set_timeout(conn: &OwnedFd, timeout: Option<Duration>) -> std::io::Result<()> {
    use rustix::net::sockopt::{Timeout, set_socket_timeout};
    set_socket_timeout(conn, Timeout::Recv, timeout)?;
    set_socket_timeout(conn, Timeout::Send, timeout)?;
    Ok(())
}

fn send(conn: &OwnedFd, message: &[u8]) -> std::io::Result<()> {
    send_fds(conn, message, &[])
}

fn send_fds(
    conn: &OwnedFd,
    message: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> std::io::Result<()> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(BATCH))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other(
            "too many descriptors for one message",
        ));
    }
    rustix::net::sendmsg(
        conn,
        &[IoSlice::new(message)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// One message and the descriptors that came with it; an empty message: the peer closed.
fn recv(conn: &OwnedFd) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(BATCH))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        conn,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if got.flags.contains(rustix::net::ReturnFlags::TRUNC)
        || got.flags.contains(rustix::net::ReturnFlags::CTRUNC)
    {
        return Err(std::io::Error::other("a hand-over message was cut short"));
    }
    buf.truncate(got.bytes);
    Ok((buf, fds))
}

/// The path of a daemon's upgrade socket under `run_dir`, named like its lock.
pub fn socket_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.upgrade.sock"))
}

/// Tells systemd (a `Type=notify` unit) that this process serves; after an upgrade also that
/// it is the unit's main process now (the unit needs `NotifyAccess=all`). Nothing without
/// systemd.
pub fn notify_ready(upgraded: bool) {
    use sd_notify::NotifyState;
    let pid = std::process::id();
    let mut states = vec![NotifyState::Ready, NotifyState::Status("serving")];
    if upgraded {
        states.insert(0, NotifyState::MainPid(pid));
    }
    if let Err(e) = sd_notify::notify(&states) {
        warn!("cannot tell systemd this process is ready: {e}");
    }
}

/// On SIGUSR2 (what the units' `ExecReload` sends), starts this program again, from the same
/// path with the same arguments and `--upgrade`: the new process takes the sockets over and
/// this one drains (or, if the new one fails, serves on and logs why). The path is the one
/// this process was started from, so a binary replaced since is the one started.
pub fn upgrade_on_sigusr2(program: &'static str, stop: CancellationToken) {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            warn!("cannot find this program's path: {e}; SIGUSR2 upgrades are off");
            return;
        }
    };
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if !args.iter().any(|a| a == "--upgrade") {
        args.push("--upgrade".into());
    }
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
            warn!("cannot handle SIGUSR2; upgrades only with --upgrade");
            return;
        };
        loop {
            tokio::select! {
                _ = usr2.recv() => {}
                () = stop.cancelled() => return,
            }
            info!(exe = %exe.display(), "SIGUSR2: starting the new {program} to take over");
            match std::process::Command::new(&exe).args(&args).spawn() {
                Ok(mut child) => {
                    // Reaped here; a successor that fails says why in its own log lines.
                    std::thread::spawn(move || {
                        if let Ok(status) = child.wait() {
                            if !status.success() {
                                warn!(%status, "the new {program} did not take over; serving on");
                            }
                        }
                    });
                }
                Err(e) => {
                    warn!(exe = %exe.display(), "cannot start the new {program}: {e}; serving on")
                }
            }
        }
    });
}

/// [`take`] off the runtime's threads.
pub async fn take_async(path: &Path) -> Result<Taken, crate::Failure> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || take(&path))
        .await
        .map_err(|e| crate::Failure::failed(e.to_string()))?
        .map_err(crate::Failure::from)
}

/// The new process's last step: waits (up to `timeout`) until `serves()` says it serves what
/// the running one did, then tells that one to stop accepting. Gives up with exit 1 if it
/// does not get there (`why_not` says what it waited for); the running one serves on.
pub async fn complete(
    taken: Taken,
    serves: impl Fn() -> bool,
    timeout: Duration,
    why_not: &str,
) -> Result<(), crate::Failure> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !serves() {
        if tokio::time::Instant::now() >= deadline {
            return Err(crate::Failure::failed(format!(
                "{why_not} within --upgrade-timeout {timeout:?}; not taking over: the running \
                 process keeps serving"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match tokio::task::spawn_blocking(move || taken.ready()).await {
        Ok(Ok(())) => info!("took over; the previous process drains"),
        // It went away meanwhile: this one serves, alone.
        Ok(Err(e)) => warn!("{e}"),
        Err(e) => warn!("{e}"),
    }
    Ok(())
}

/// What a daemon does once it serves: offers its sockets at `path` for the next upgrade
/// (`handed_over` is cancelled when one takes them), tells systemd it is ready (and, after an
/// upgrade, its main process), and upgrades itself on SIGUSR2. Keep the offer until exit.
pub fn serve_upgrades(
    program: &'static str,
    path: &Path,
    list: Arc<dyn Fn() -> Listing + Send + Sync>,
    handed_over: CancellationToken,
    upgraded: bool,
) -> Option<Offer> {
    let offer = match Offer::listen(path, list, handed_over.clone()) {
        Ok(o) => Some(o),
        Err(e) => {
            warn!(path = %path.display(), "cannot offer upgrades: {e}");
            None
        }
    };
    notify_ready(upgraded);
    upgrade_on_sigusr2(program, handed_over);
    offer
}

/// A daemon's sockets by name, for an upgrade: what this process offers its successor
/// (copies of every listening socket, made as each is opened and withdrawn as each is
/// closed: a copy kept after its listener stopped accepting would keep the socket listening,
/// and the kernel would queue connections that nobody answers), and what it inherited from
/// its predecessor (taken as each is needed).
#[derive(Default)]
pub struct Sockets {
    offered: Mutex<BTreeMap<String, OwnedFd>>,
    inherited: Mutex<BTreeMap<String, OwnedFd>>,
}

impl Sockets {
    /// Sockets received from the predecessor.
    pub fn inheriting(fds: BTreeMap<String, OwnedFd>) -> Sockets {
        Sockets {
            offered: Mutex::default(),
            inherited: Mutex::new(fds),
        }
    }

    /// Whether this process was started to take over (and has not used everything yet).
    pub fn is_inheriting(&self) -> bool {
        !self.inherited.lock().expect("sockets lock").is_empty()
    }

    /// Offers a copy of `socket` under `name` to a successor.
    pub fn offer(&self, name: String, socket: &impl AsFd) {
        match socket.as_fd().try_clone_to_owned() {
            Ok(copy) => {
                self.offered
                    .lock()
                    .expect("sockets lock")
                    .insert(name, copy);
            }
            // Without the copy an upgrade binds this socket anew: slower, never wrong.
            Err(e) => tracing::debug!(name, "cannot keep a copy of a socket for an upgrade: {e}"),
        }
    }

    /// Stops offering every socket whose name starts with `prefix` (it is being closed).
    pub fn withdraw(&self, prefix: &str) {
        self.offered
            .lock()
            .expect("sockets lock")
            .retain(|name, _| !name.starts_with(prefix));
    }

    /// The inherited socket `name`, if there is one.
    pub fn inherit(&self, name: &str) -> Option<OwnedFd> {
        self.inherited.lock().expect("sockets lock").remove(name)
    }

    /// All of `names`, or none (a port is served by all threads' sockets or bound anew).
    pub fn inherit_all(&self, names: &[String]) -> Option<Vec<OwnedFd>> {
        let mut inherited = self.inherited.lock().expect("sockets lock");
        if !names.iter().all(|n| inherited.contains_key(n)) {
            return None;
        }
        Some(names.iter().filter_map(|n| inherited.remove(n)).collect())
    }

    /// Closes the inherited service sockets not used (of ports released meanwhile); returns
    /// their names.
    pub fn drop_inherited(&self) -> Vec<String> {
        let mut inherited = self.inherited.lock().expect("sockets lock");
        let names: Vec<String> = inherited
            .keys()
            .filter(|n| n.starts_with("tcp/") || n.starts_with("udp/"))
            .cloned()
            .collect();
        for name in &names {
            inherited.remove(name);
        }
        names
    }

    /// Copies of everything offered now, for a successor.
    pub fn listing(&self) -> Vec<(String, OwnedFd)> {
        self.offered
            .lock()
            .expect("sockets lock")
            .iter()
            .filter_map(|(name, fd)| fd.try_clone().ok().map(|fd| (name.clone(), fd)))
            .collect()
    }
}
