//! Forwarding in the sender's own system call: when the client and the backend of a joined
//! connection both run on this host (in the cgroup given), their `sendmsg` puts the bytes
//! straight into the send queue of the proxy's socket on the other side, without a wake-up
//! of the proxy or of a kernel worker (the `sk_skb` path of [`crate::KernelPath`] forwards
//! through a work queue: a context switch per message).
//!
//! Two programs, built as bytecode here:
//! * `sockops`, attached to the cgroup: a TCP socket of the cgroup that connects to a watched
//!   address (a listener of the proxy) or is accepted on one (a local backend's) is put, once
//!   established, in the `peers` sockhash under its four-tuple, and its `state` (bytes it has
//!   sent, whether it forwards, its credit) starts at zero;
//! * `sk_msg`, attached to `peers`: runs on each `sendmsg` of those sockets. A socket that
//!   forwards has its bytes redirected to the socket in `targets` under its four-tuple (the
//!   proxy's socket towards the other peer). Until then the bytes go their usual way (to the
//!   proxy, which relays them) and are counted; the socket starts to forward at the first
//!   `sendmsg` that finds its count equal to the count the proxy armed in `armed`: the
//!   bytes the proxy has relayed from it and written to the other side. So every byte sent
//!   before is in the target's send queue ahead of the first byte forwarded (each `sendmsg`
//!   of a socket runs under its lock: the count and the check never race with a send).
//!   Each arming grants a credit, the bytes it may forward before one send goes the usual
//!   way again (see [`sk_msg`] for why); the proxy relays it, arms again, and the peer
//!   forwards again from its next send.
//!
//! What the proxy keeps: it goes on relaying (what it reads, it writes and arms again),
//! end of stream (the FIN still comes the usual way, after every byte the sender forwarded),
//! errors and the idle timeout.
//!
//! A caveat of the kernel's, for the peers: a socket in a sockmap reads through
//! `tcp_bpf_recvmsg`, which on this kernel (6.18) can return EAGAIN from a *blocking* read
//! woken without data (a wake-up for room to write, after the peer's own send buffer had
//! filled). Clients that read on non-blocking sockets (event loops, libpq, most drivers) do
//! not notice; a client that blocks in `recv` may see the error. Hence a cgroup chosen by
//! the operator, not every process by default.
//!
//! Sockets of other processes are only ever redirected to a socket the proxy put in
//! `targets` under their own four-tuple: the one it accepted from them or connected to them.

use std::fs::File;
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use crate::Asm;
use crate::op::*;
use crate::sys::{self, Map};

const PROG_TYPE_SOCK_OPS: u32 = 13;
const PROG_TYPE_SK_MSG: u32 = 16;
const ATTACH_CGROUP_SOCK_OPS: u32 = 3;
const ATTACH_SK_MSG_VERDICT: u32 = 7;
const MAP_TYPE_HASH: u32 = 1;
const MAP_TYPE_LRU_HASH: u32 = 9;
const MAP_TYPE_SOCKHASH: u32 = 18;
const FUNC_SOCK_HASH_UPDATE: i32 = 70;
const FUNC_MSG_REDIRECT_HASH: i32 = 71;
const AF_INET: i32 = 2;
const SOCK_OPS_ACTIVE_ESTABLISHED: i32 = 4;
const SOCK_OPS_PASSIVE_ESTABLISHED: i32 = 5;

// `struct bpf_sock_ops` fields.
const OPS_OP: i16 = 0;
const OPS_FAMILY: i16 = 20;
const OPS_REMOTE_IP4: i16 = 24;
const OPS_LOCAL_IP4: i16 = 28;
const OPS_REMOTE_PORT: i16 = 64;
const OPS_LOCAL_PORT: i16 = 68;
// `struct sk_msg_md` fields.
const MSG_FAMILY: i16 = 16;
const MSG_REMOTE_IP4: i16 = 20;
const MSG_LOCAL_IP4: i16 = 24;
const MSG_REMOTE_PORT: i16 = 60;
const MSG_LOCAL_PORT: i16 = 64;
const MSG_SIZE: i16 = 68;

/// A socket's four-tuple as the programs key it: its own address, its peer's, its own port
/// and its peer's, each in 32 bits, addresses in network order, ports in host order.
const KEY: usize = 16;
/// `state`: {bytes sent the usual way; 1 while forwarding; bytes it may still forward; the
/// `armed` grant it took them from, plus one}.
const STATE: usize = 32;
/// `armed`: {bytes the proxy relayed from the peer and wrote; bytes the peer may forward}.
const ARMED: usize = 16;
/// The most a peer may forward before it goes the usual way again for a send (through the
/// proxy, which then arms it again with the room it finds).
const MAX_CREDIT: u64 = 512 * 1024;
/// The send buffer a target gets (`SO_SNDBUF`; the kernel doubles it): room for
/// [`MAX_CREDIT`] with the kernel's overhead per byte queued, which small messages make
/// large. TCP would start it at 16 KiB and grow it only as it sends.
const TARGET_SNDBUF: i32 = 1024 * 1024;
/// `watch`: {1 for an address clients connect to, 2 for one a local backend accepts on;
/// the address (0: any); the port}.
const WATCH_KEY: usize = 12;
const CLIENT: u32 = 1;
const SERVER: u32 = 2;

/// A TCP socket seen from the peer's side: `local` is the peer's own address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
}

impl Peer {
    fn key(self) -> [u8; KEY] {
        let mut k = [0u8; KEY];
        k[0..4].copy_from_slice(&self.local.ip().octets());
        k[4..8].copy_from_slice(&self.remote.ip().octets());
        k[8..12].copy_from_slice(&u32::from(self.local.port()).to_ne_bytes());
        k[12..16].copy_from_slice(&u32::from(self.remote.port()).to_ne_bytes());
        k
    }
}

/// The stack's key at r10 - 16 from a context whose fields are at the given offsets; the
/// peer's port comes in network order, shifted up by 16 bits on some kernels and program
/// types: both read the same here.
fn store_key(
    a: &mut Asm,
    ctx: u8,
    local_ip: i16,
    remote_ip: i16,
    local_port: i16,
    remote_port: i16,
) {
    a.op(LDX_W, 2, ctx, local_ip, 0)
        .op(STX_W, 10, 2, -16, 0)
        .op(LDX_W, 2, ctx, remote_ip, 0)
        .op(STX_W, 10, 2, -12, 0)
        .op(LDX_W, 2, ctx, local_port, 0)
        .op(STX_W, 10, 2, -8, 0)
        .op(LDX_W, 2, ctx, remote_port, 0);
    port_to_host(a, 2);
    a.op(STX_W, 10, 2, -4, 0);
}

/// `reg`, a port in network order in the low or the high 16 bits, to host order.
fn port_to_host(a: &mut Asm, reg: u8) {
    // Jumps are to named places, which must be unique per program: one use per program.
    a.jump(JGT_IMM, reg, 0xffff, "high")
        .jump(JA, 0, 0, "low")
        .place("high")
        .op(RSH64_IMM, reg, 0, 0, 16)
        .place("low")
        .op(END_BE, reg, 0, 0, 16);
}

/// The `sockops` program:
///
/// ```text
/// if ctx.family != AF_INET: return 1
/// op == ACTIVE_ESTABLISHED: the remote address and port, kind CLIENT
/// op == PASSIVE_ESTABLISHED: the local address and port, kind SERVER
/// else return 1
/// if !watch[{kind, address, port}] && !watch[{kind, 0, port}]: return 1
/// key = four-tuple; state[key] = {0, 0}; peers[key] = this socket
/// return 1
/// ```
fn sockops(watch: &Map, state: &Map, peers: &Map) -> Vec<u64> {
    let mut a = Asm::new();
    a.op(MOV64_REG, 6, 1, 0, 0)
        .op(LDX_W, 2, 6, OPS_FAMILY, 0)
        .jump(JNE_IMM, 2, AF_INET, "out")
        .op(LDX_W, 2, 6, OPS_OP, 0)
        .jump(JEQ_IMM, 2, SOCK_OPS_PASSIVE_ESTABLISHED, "passive")
        .jump(JNE_IMM, 2, SOCK_OPS_ACTIVE_ESTABLISHED, "out");
    store_key(
        &mut a,
        6,
        OPS_LOCAL_IP4,
        OPS_REMOTE_IP4,
        OPS_LOCAL_PORT,
        OPS_REMOTE_PORT,
    );
    // watch key at r10 - 32: {kind, address, port}: the peer's (the proxy's listener).
    a.op(ST_W, 10, 0, -32, CLIENT as i32)
        .op(LDX_W, 2, 10, -12, 0)
        .op(STX_W, 10, 2, -28, 0)
        .op(LDX_W, 2, 10, -4, 0)
        .op(STX_W, 10, 2, -24, 0)
        .jump(JA, 0, 0, "check")
        .place("passive");
    // The same key; the watched address is the socket's own (a backend's listener).
    a.op(LDX_W, 2, 6, OPS_LOCAL_IP4, 0)
        .op(STX_W, 10, 2, -16, 0)
        .op(STX_W, 10, 2, -28, 0)
        .op(LDX_W, 2, 6, OPS_REMOTE_IP4, 0)
        .op(STX_W, 10, 2, -12, 0)
        .op(LDX_W, 2, 6, OPS_LOCAL_PORT, 0)
        .op(STX_W, 10, 2, -8, 0)
        .op(STX_W, 10, 2, -24, 0)
        .op(ST_W, 10, 0, -32, SERVER as i32)
        .op(LDX_W, 2, 6, OPS_REMOTE_PORT, 0);
    // A second conversion needs places of its own.
    a.jump(JGT_IMM, 2, 0xffff, "high2")
        .jump(JA, 0, 0, "low2")
        .place("high2")
        .op(RSH64_IMM, 2, 0, 0, 16)
        .place("low2")
        .op(END_BE, 2, 0, 0, 16)
        .op(STX_W, 10, 2, -4, 0)
        .place("check")
        .lookup(watch.fd(), -32)
        .jump(JNE_IMM, 0, 0, "watched")
        // Not under its address: under any address (a listener on 0.0.0.0)?
        .op(ST_W, 10, 0, -28, 0)
        .lookup(watch.fd(), -32)
        .jump(JEQ_IMM, 0, 0, "out")
        .place("watched")
        // state[key] = {0, 0}, from r10 - 48
        .op(ST_DW, 10, 0, -48, 0)
        .op(ST_DW, 10, 0, -40, 0)
        .update(state.fd(), -16, -48)
        .sock_call(FUNC_SOCK_HASH_UPDATE, 6, peers.fd(), -16)
        .place("out")
        .op(MOV64_IMM, 0, 0, 0, 1)
        .op(EXIT, 0, 0, 0, 0);
    a.finish()
}

/// The `sk_msg` program:
///
/// ```text
/// key = four-tuple; s = state[key] ?: return SK_PASS
/// if !s.forwarding:
///     a = armed[key] ?: goto count
///     if a.relayed != s.sent: goto count              // the proxy has not caught up
///     s.forwarding = 1
///     if s.grant != a.relayed + 1: s.grant = a.relayed + 1; s.credit = a.credit
/// if s.credit < msg.size: s.forwarding = 0; goto count
/// s.credit -= msg.size
/// return msg_redirect_hash(msg, targets, key, 0) and SK_PASS
/// count: s.sent += msg.size; return SK_PASS           // the usual way, to the proxy
/// ```
///
/// The credit is what keeps a sender from spinning: a redirect into a full send queue fails
/// with EAGAIN while the sender's own socket (empty) says it is writable, so a sender whose
/// target stays full would retry at once, again and again. Each try spends credit, so it
/// soon goes the usual way, to the proxy, whose write waits for room (TCP holds the sender
/// back meanwhile) and which arms it again with the room it finds.
fn sk_msg(state: &Map, armed: &Map, targets: &Map) -> Vec<u64> {
    let mut a = Asm::new();
    a.op(MOV64_REG, 6, 1, 0, 0)
        .op(LDX_W, 2, 6, MSG_FAMILY, 0)
        .jump(JNE_IMM, 2, AF_INET, "pass");
    store_key(
        &mut a,
        6,
        MSG_LOCAL_IP4,
        MSG_REMOTE_IP4,
        MSG_LOCAL_PORT,
        MSG_REMOTE_PORT,
    );
    a.lookup(state.fd(), -16)
        .jump(JEQ_IMM, 0, 0, "pass")
        .op(MOV64_REG, 7, 0, 0, 0)
        .op(LDX_DW, 2, 7, 8, 0)
        .jump(JNE_IMM, 2, 0, "credit")
        .lookup(armed.fd(), -16)
        .jump(JEQ_IMM, 0, 0, "count")
        .op(LDX_DW, 2, 0, 0, 0)
        .op(LDX_DW, 3, 7, 0, 0)
        .jump_reg(JNE_REG, 2, 3, "count")
        .op(ST_DW, 7, 0, 8, 1)
        .op(ADD64_IMM, 2, 0, 0, 1)
        .op(LDX_DW, 3, 7, 24, 0)
        .jump_reg(JEQ_REG, 2, 3, "credit")
        .op(STX_DW, 7, 2, 24, 0)
        .op(LDX_DW, 3, 0, 8, 0)
        .op(STX_DW, 7, 3, 16, 0)
        .place("credit")
        .op(LDX_W, 2, 6, MSG_SIZE, 0)
        .op(LDX_DW, 3, 7, 16, 0)
        .jump_reg(JGT_REG, 2, 3, "fall back")
        .op(SUB64_REG, 3, 2, 0, 0)
        .op(STX_DW, 7, 3, 16, 0)
        .sock_call(FUNC_MSG_REDIRECT_HASH, 6, targets.fd(), -16)
        .jump(JA, 0, 0, "pass")
        .place("fall back")
        .op(ST_DW, 7, 0, 8, 0)
        .place("count")
        .op(LDX_W, 2, 6, MSG_SIZE, 0)
        .op(LDX_DW, 3, 7, 0, 0)
        .op(ADD64_REG, 3, 2, 0, 0)
        .op(STX_DW, 7, 3, 0, 0)
        .place("pass")
        .op(MOV64_IMM, 0, 0, 0, 1)
        .op(EXIT, 0, 0, 0, 0);
    a.finish()
}

/// The maps and the attached programs; dropping it detaches the `sockops` program (its
/// link closes) and frees the maps: sockets already in `peers` go back to plain TCP.
#[derive(Debug)]
pub struct SenderPath {
    watch: Map,
    state: Map,
    armed: Map,
    targets: Map,
    peers: Map,
    _programs: Vec<OwnedFd>,
    _link: OwnedFd,
}

impl SenderPath {
    /// Creates the maps for `pairs` connections, loads both programs and attaches them: the
    /// `sockops` program to the cgroup (v2) directory `cgroup`. The error names the step
    /// the kernel refused and why (with the verifier's log for a program).
    pub fn attach(cgroup: &Path, pairs: u32) -> Result<SenderPath, String> {
        let dir = File::open(cgroup).map_err(|e| format!("opening {}: {e}", cgroup.display()))?;
        let entries = pairs.saturating_mul(2).max(2);
        let map = |kind, key, value, entries, grow, what: &str| {
            Map::create(kind, key, value, entries, grow)
                .map_err(|e| format!("creating the {what} map failed: {e}"))
        };
        let watch = map(MAP_TYPE_HASH, WATCH_KEY, 4, 65_536, true, "watch")?;
        let state = map(MAP_TYPE_LRU_HASH, KEY, STATE, entries, false, "state")?;
        let armed = map(MAP_TYPE_HASH, KEY, ARMED, entries, true, "armed")?;
        let targets = map(MAP_TYPE_SOCKHASH, KEY, 8, entries, false, "targets")?;
        let peers = map(MAP_TYPE_SOCKHASH, KEY, 8, entries, false, "peers")?;
        let load = |kind, insns: &[u64], attach, name: &str| {
            sys::prog_load_for(kind, attach, insns, c"Dual MIT/GPL", name).map_err(|(e, log)| {
                if log.is_empty() {
                    format!("loading {name} failed: {e}")
                } else {
                    format!("loading {name} failed: {e}; verifier: {log}")
                }
            })
        };
        let msg = load(
            PROG_TYPE_SK_MSG,
            &sk_msg(&state, &armed, &targets),
            0,
            "viking_sk_msg",
        )?;
        sys::prog_attach(peers.fd(), msg.as_fd(), ATTACH_SK_MSG_VERDICT)
            .map_err(|e| format!("attaching viking_sk_msg failed: {e}"))?;
        let ops = load(
            PROG_TYPE_SOCK_OPS,
            &sockops(&watch, &state, &peers),
            0,
            "viking_sockops",
        )?;
        let link =
            sys::link_create(ops.as_fd(), dir.as_fd(), ATTACH_CGROUP_SOCK_OPS).map_err(|e| {
                format!(
                    "attaching viking_sockops to {} failed: {e}",
                    cgroup.display()
                )
            })?;
        Ok(SenderPath {
            watch,
            state,
            armed,
            targets,
            peers,
            _programs: vec![msg, ops],
            _link: link,
        })
    }

    fn watch_key(kind: u32, addr: SocketAddrV4) -> [u8; WATCH_KEY] {
        let mut k = [0u8; WATCH_KEY];
        k[..4].copy_from_slice(&kind.to_ne_bytes());
        k[4..8].copy_from_slice(&addr.ip().octets());
        k[8..].copy_from_slice(&u32::from(addr.port()).to_ne_bytes());
        k
    }

    /// Sockets of the cgroup that connect to `addr` (the proxy's listener; address 0.0.0.0:
    /// any of this host's) are watched from now on.
    pub fn watch_clients_of(&self, addr: SocketAddrV4) -> io::Result<()> {
        self.watch
            .update(&Self::watch_key(CLIENT, addr), &1u32.to_ne_bytes(), 0)
    }

    /// Sockets of the cgroup accepted on `addr` (a local backend's) are watched from now on.
    pub fn watch_servers_on(&self, addr: SocketAddrV4) -> io::Result<()> {
        self.watch
            .update(&Self::watch_key(SERVER, addr), &1u32.to_ne_bytes(), 0)
    }

    /// Sockets connecting to `addr` (a listener closed) are no longer watched; those caught
    /// stay until they close.
    pub fn unwatch_clients_of(&self, addr: SocketAddrV4) {
        let _ = self.watch.delete(&Self::watch_key(CLIENT, addr));
    }

    /// Sockets accepted on `addr` (a backend gone) are no longer watched.
    pub fn unwatch_servers_on(&self, addr: SocketAddrV4) {
        let _ = self.watch.delete(&Self::watch_key(SERVER, addr));
    }

    /// The peer's socket is watched (its sends can be forwarded).
    pub fn caught(&self, peer: Peer) -> bool {
        let mut value = [0u8; STATE];
        matches!(self.state.lookup(&peer.key(), &mut value), Ok(true))
    }

    /// The peer's sends go to `to` once it has sent what [`SenderPath::arm`] says. `to`'s
    /// send buffer is set to hold what the peer may forward at once.
    pub fn target(&self, peer: Peer, to: BorrowedFd<'_>) -> io::Result<()> {
        if sys::sndbuf(to)? < 2 * TARGET_SNDBUF as u64 {
            sys::set_sndbuf(to, TARGET_SNDBUF)?;
        }
        let fd = to.as_raw_fd() as u64;
        self.targets.update(&peer.key(), &fd.to_ne_bytes(), 0)
    }

    /// `relayed`: the bytes read from the peer and written to `target` so far (the socket
    /// its sends go to). With it goes what the peer may forward before it comes this way
    /// again: a quarter of `target`'s send buffer (the kernel counts its overhead in it),
    /// at most [`MAX_CREDIT`], less what is queued.
    pub fn arm(&self, peer: Peer, relayed: u64, target: BorrowedFd<'_>) -> io::Result<()> {
        let room = (sys::sndbuf(target)? / 4).min(MAX_CREDIT);
        let credit = room.saturating_sub(sys::outq(target)? as u64);
        let mut value = [0u8; ARMED];
        value[..8].copy_from_slice(&relayed.to_ne_bytes());
        value[8..].copy_from_slice(&credit.to_ne_bytes());
        self.armed.update(&peer.key(), &value, 0)
    }

    /// The peer's socket is in the path (its sends run the program).
    pub fn holds(&self, peer: Peer) -> bool {
        let mut cookie = [0u8; 8];
        matches!(self.peers.lookup(&peer.key(), &mut cookie), Ok(true))
    }

    /// Takes the peer's socket out of the path for good: its sends and reads go back to
    /// plain TCP (the kernel drops its psock with its last map). For a connection the path
    /// will not carry (bulk, or a peer on another host), whose peer would otherwise pay the
    /// program on every send.
    pub fn release(&self, peer: Peer) {
        let _ = self.peers.delete(&peer.key());
    }

    /// Forgets the peer: its target and what was armed (the target socket leaves the map
    /// when it closes anyway).
    pub fn leave(&self, peer: Peer) {
        let _ = self.armed.delete(&peer.key());
        let _ = self.targets.delete(&peer.key());
    }
}
