//! Forwarding between two connected TCP sockets inside the kernel, without waking user space
//! per message; the same in the peers' own sends when they run on this host ([`sender`]);
//! and UDP balanced by the kernel as a socket sends ([`balance`]).
//!
//! A sockhash holds the sockets of every joined pair, each under its peer's socket cookie;
//! an `sk_skb` verdict program attached to the map runs on every segment that arrives on any
//! of them, looks its own socket's cookie up and redirects the segment to the socket found
//! there: into that socket's send queue, as if written to it. The program is nine instructions,
//! built here as bytecode ([`program`]) and loaded with the `bpf()` system call (module `sys`,
//! the only `unsafe` of the crate): no C toolchain, no LLVM, no ELF object.
//!
//! What stays in user space (the ambassador's `kernel` module): end of stream, errors, the idle
//! timeout and the byte counts, read from `TCP_INFO` and the send queue.
//!
//! Why not aya: it loads programs only from ELF objects that LLVM writes; building one by hand
//! to have it parsed back would be more code than the four `bpf()` commands used here.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::event::epoll;
use tokio::io::unix::AsyncFd;

pub mod balance;
pub mod sender;
mod sys;

pub use sys::{TcpInfo, register_readable};

const MAP_TYPE_SOCKHASH: u32 = 18;
const PROG_TYPE_SK_SKB: u32 = 14;
/// `BPF_SK_SKB_VERDICT`: the verdict program without a stream parser (Linux 5.13): it sees
/// each segment as it arrives.
const ATTACH_SK_SKB_VERDICT: u32 = 38;
const FUNC_GET_SOCKET_COOKIE: i32 = 46;
pub(crate) const FUNC_MAP_LOOKUP: i32 = 1;
pub(crate) const FUNC_MAP_UPDATE: i32 = 2;
const FUNC_SK_REDIRECT_HASH: i32 = 72;
/// `SK_PASS`: keep the segment on its own socket, for user space to read.
const SK_PASS: i32 = 1;

/// One eBPF instruction: opcode, destination and source registers, offset, immediate.
pub(crate) fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | (dst & 0x0f);
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    u64::from_le_bytes(b)
}

/// Opcodes (linux/bpf.h, linux/bpf_common.h), for both kernel paths' programs.
mod op {
    pub const MOV64_REG: u8 = 0x07 | 0xb0 | 0x08; // BPF_ALU64 | BPF_MOV | BPF_X
    pub const MOV64_IMM: u8 = 0x07 | 0xb0; // BPF_ALU64 | BPF_MOV | BPF_K
    pub const ADD64_IMM: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
    pub const ADD64_REG: u8 = 0x07 | 0x08; // BPF_ALU64 | BPF_ADD | BPF_X
    pub const SUB64_REG: u8 = 0x07 | 0x10 | 0x08; // BPF_ALU64 | BPF_SUB | BPF_X
    pub const MOD64_REG: u8 = 0x07 | 0x90 | 0x08; // BPF_ALU64 | BPF_MOD | BPF_X
    pub const LSH64_IMM: u8 = 0x07 | 0x60; // BPF_ALU64 | BPF_LSH | BPF_K
    pub const RSH64_IMM: u8 = 0x07 | 0x70; // BPF_ALU64 | BPF_RSH | BPF_K
    /// `dst = htobe16(dst)` with `imm` 16 (BPF_ALU | BPF_END | BPF_TO_BE).
    pub const END_BE: u8 = 0x04 | 0xd0 | 0x08;
    pub const LDX_W: u8 = 0x01 | 0x60; // BPF_LDX | BPF_MEM | BPF_W
    pub const LDX_DW: u8 = 0x01 | 0x60 | 0x18; // BPF_LDX | BPF_MEM | BPF_DW
    pub const STX_W: u8 = 0x03 | 0x60; // BPF_STX | BPF_MEM | BPF_W
    pub const STX_DW: u8 = 0x03 | 0x60 | 0x18; // BPF_STX | BPF_MEM | BPF_DW
    pub const ST_DW: u8 = 0x02 | 0x60 | 0x18; // BPF_ST | BPF_MEM | BPF_DW
    pub const ST_W: u8 = 0x02 | 0x60; // BPF_ST | BPF_MEM | BPF_W
    /// `lock *(u64 *)(dst + off) += src` (BPF_STX | BPF_ATOMIC | BPF_DW, imm BPF_ADD).
    pub const ATOMIC_ADD_DW: u8 = 0x03 | 0xc0 | 0x18;
    pub const LD_IMM64: u8 = 0x18; // BPF_LD | BPF_IMM | BPF_DW
    pub const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
    pub const JEQ_IMM: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    pub const JNE_IMM: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
    pub const JGE_IMM: u8 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    pub const JGT_IMM: u8 = 0x25; // BPF_JMP | BPF_JGT | BPF_K
    pub const JNE_REG: u8 = 0x5d; // BPF_JMP | BPF_JNE | BPF_X
    pub const JGT_REG: u8 = 0x2d; // BPF_JMP | BPF_JGT | BPF_X
    pub const JEQ_REG: u8 = 0x1d; // BPF_JMP | BPF_JEQ | BPF_X
    pub const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
    pub const JA: u8 = 0x05; // BPF_JMP | BPF_JA: always
    /// `src` of a 64-bit immediate load that names a map by its file descriptor.
    pub const PSEUDO_MAP_FD: u8 = 1;
}
use op::*;

/// A few instructions with forward jumps to named places, resolved at the end.
pub(crate) struct Asm {
    insns: Vec<u64>,
    jumps: Vec<(usize, u8, u8, u8, i32, &'static str)>,
    places: Vec<(&'static str, usize)>,
}

impl Asm {
    pub(crate) fn new() -> Self {
        Asm {
            insns: Vec::new(),
            jumps: Vec::new(),
            places: Vec::new(),
        }
    }
    pub(crate) fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) -> &mut Self {
        self.insns.push(insn(code, dst, src, off, imm));
        self
    }
    pub(crate) fn map(&mut self, dst: u8, map: BorrowedFd<'_>) -> &mut Self {
        self.op(LD_IMM64, dst, PSEUDO_MAP_FD, 0, map.as_raw_fd())
            .op(0, 0, 0, 0, 0)
    }
    /// `if dst <code> imm goto place`.
    pub(crate) fn jump(&mut self, code: u8, dst: u8, imm: i32, place: &'static str) -> &mut Self {
        self.jumps
            .push((self.insns.len(), code, dst, 0, imm, place));
        self.insns.push(0);
        self
    }
    /// `if dst <code> src goto place` (a register comparison).
    pub(crate) fn jump_reg(
        &mut self,
        code: u8,
        dst: u8,
        src: u8,
        place: &'static str,
    ) -> &mut Self {
        self.jumps
            .push((self.insns.len(), code, dst, src, 0, place));
        self.insns.push(0);
        self
    }
    /// `r0 = bpf_map_lookup_elem(map, r10 + key)`: the key on the stack at `key`.
    pub(crate) fn lookup(&mut self, map: BorrowedFd<'_>, key: i32) -> &mut Self {
        self.map(1, map)
            .op(MOV64_REG, 2, 10, 0, 0)
            .op(ADD64_IMM, 2, 0, 0, key)
            .op(CALL, 0, 0, 0, FUNC_MAP_LOOKUP)
    }
    /// `bpf_map_update_elem(map, r10 + key, r10 + value, BPF_ANY)`: key and value on the
    /// stack.
    pub(crate) fn update(&mut self, map: BorrowedFd<'_>, key: i32, value: i32) -> &mut Self {
        self.map(1, map)
            .op(MOV64_REG, 2, 10, 0, 0)
            .op(ADD64_IMM, 2, 0, 0, key)
            .op(MOV64_REG, 3, 10, 0, 0)
            .op(ADD64_IMM, 3, 0, 0, value)
            .op(MOV64_IMM, 4, 0, 0, 0)
            .op(CALL, 0, 0, 0, FUNC_MAP_UPDATE)
    }
    /// `r0 = func(ctx, map, r10 + key, 0)` with the context in `ctx`: the helpers that put a
    /// socket into a sock map or redirect to one found there.
    pub(crate) fn sock_call(
        &mut self,
        func: i32,
        ctx: u8,
        map: BorrowedFd<'_>,
        key: i32,
    ) -> &mut Self {
        self.op(MOV64_REG, 1, ctx, 0, 0)
            .map(2, map)
            .op(MOV64_REG, 3, 10, 0, 0)
            .op(ADD64_IMM, 3, 0, 0, key)
            .op(MOV64_IMM, 4, 0, 0, 0)
            .op(CALL, 0, 0, 0, func)
    }
    pub(crate) fn place(&mut self, name: &'static str) -> &mut Self {
        self.places.push((name, self.insns.len()));
        self
    }
    pub(crate) fn finish(mut self) -> Vec<u64> {
        for (at, code, dst, src, imm, name) in std::mem::take(&mut self.jumps) {
            let to = self
                .places
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, i)| *i)
                .expect("a jump to a place that exists");
            let off = i16::try_from(to as i64 - at as i64 - 1).expect("a short jump");
            self.insns[at] = insn(code, dst, src, off, imm);
        }
        self.insns
    }
}

/// The verdict program, for the sockhash `map`:
///
/// ```text
/// r6 = r1                                  // the segment
/// r0 = bpf_get_socket_cookie(r1)           // the socket it arrived on
/// *(u64 *)(r10 - 8) = r0
/// r0 = bpf_sk_redirect_hash(r6, map, r10 - 8, 0)   // to the send queue of the socket
///                                          // stored under this socket's cookie: its peer
/// if r0 != SK_DROP: return r0              // SK_PASS: redirected
/// return SK_PASS                           // no peer (being joined or torn down): keep
///                                          // the bytes on this socket rather than drop them
/// ```
pub fn program(map: BorrowedFd<'_>) -> Vec<u64> {
    let fd = map.as_raw_fd();
    vec![
        insn(MOV64_REG, 6, 1, 0, 0),
        insn(CALL, 0, 0, 0, FUNC_GET_SOCKET_COOKIE),
        insn(STX_DW, 10, 0, -8, 0),
        insn(LD_IMM64, 2, PSEUDO_MAP_FD, 0, fd),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_REG, 1, 6, 0, 0),
        insn(MOV64_REG, 3, 10, 0, 0),
        insn(ADD64_IMM, 3, 0, 0, -8),
        insn(MOV64_IMM, 4, 0, 0, 0),
        insn(CALL, 0, 0, 0, FUNC_SK_REDIRECT_HASH),
        insn(JNE_IMM, 0, 0, 1, 0),
        insn(MOV64_IMM, 0, 0, 0, SK_PASS),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// The map and the program, attached: ready to join pairs. Shared by every thread of a
/// process; dropping it detaches everything (the kernel frees the map and the program with
/// their last descriptors, and sockets still joined go back to plain TCP).
#[derive(Debug)]
pub struct KernelPath {
    map: OwnedFd,
    _program: OwnedFd,
}

impl KernelPath {
    /// Creates the map for `pairs` pairs and loads and attaches the program. The error says
    /// which step the kernel refused and why (with the verifier's log when it was the program).
    pub fn new(pairs: u32) -> Result<Self, String> {
        let map = sys::map_create(MAP_TYPE_SOCKHASH, 8, 4, pairs.saturating_mul(2).max(2))
            .map_err(|e| format!("creating the sockhash failed: {e}"))?;
        let insns = program(map.as_fd());
        // The license the kernel asks of every program decides only which helpers it may call;
        // these two are not GPL-only. "Dual MIT/GPL" is one the kernel knows.
        let program = sys::prog_load(PROG_TYPE_SK_SKB, &insns, c"Dual MIT/GPL", "viking_fwd")
            .map_err(|(e, log)| {
                if log.is_empty() {
                    format!("loading the verdict program failed: {e}")
                } else {
                    format!("loading the verdict program failed: {e}; verifier: {log}")
                }
            })?;
        sys::prog_attach(map.as_fd(), program.as_fd(), ATTACH_SK_SKB_VERDICT)
            .map_err(|e| format!("attaching the verdict program failed: {e}"))?;
        Ok(Self {
            map,
            _program: program,
        })
    }

    /// Joins two established TCP sockets: from now on what arrives on one is sent on the
    /// other by the kernel, including bytes already queued on either. Nothing may be read
    /// from either socket afterwards (the kernel takes it), and what user space wrote before
    /// is sent first. Leaving: closing either socket takes both entries out of the map.
    ///
    /// The order avoids a window in which a segment could meet a half-joined pair: `first`
    /// goes into the map first, under `second`'s cookie, with its data-ready callback held
    /// back (SO_RCVLOWAT at its largest: arrivals queue without waking the program); then
    /// `second`, under `first`'s cookie, whose program finds `first` at once. Resetting the
    /// low-water mark of `first` runs its callback over what queued meanwhile, and setting
    /// it on `second` does the same for what `second` had queued before it joined. On error
    /// nothing stays joined.
    pub fn join(&self, first: BorrowedFd<'_>, second: BorrowedFd<'_>) -> io::Result<()> {
        let first_cookie = sys::socket_cookie(first)?;
        let second_cookie = sys::socket_cookie(second)?;
        sys::set_rcvlowat(first, i32::MAX)?;
        let joined =
            sys::map_update_socket(self.map.as_fd(), second_cookie, first).and_then(|()| {
                sys::map_update_socket(self.map.as_fd(), first_cookie, second).inspect_err(|_| {
                    let _ = sys::map_delete(self.map.as_fd(), second_cookie);
                })
            });
        let released = sys::set_rcvlowat(first, 1);
        joined?;
        released?;
        sys::set_rcvlowat(second, 1)
    }
}

/// Tells when either socket of a joined pair ends: the peer's FIN, an error or a hang-up, and
/// never the data the kernel forwards (an epoll instance of the pair's own with EPOLLRDHUP,
/// edge-triggered, readable in tokio's reactor). Joined sockets must leave tokio's reactor
/// (`into_std`), which would wake the thread for every segment.
#[derive(Debug)]
pub struct Ends {
    epoll: AsyncFd<OwnedFd>,
}

impl Ends {
    pub fn new(first: BorrowedFd<'_>, second: BorrowedFd<'_>) -> io::Result<Self> {
        let fd = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        for (i, socket) in [first, second].into_iter().enumerate() {
            epoll::add(
                &fd,
                socket,
                epoll::EventData::new_u64(i as u64),
                epoll::EventFlags::RDHUP | epoll::EventFlags::ET,
            )?;
        }
        Ok(Ends {
            epoll: sys::register_readable(fd)?,
        })
    }

    /// Waits until an event was reported since the last call (which one is not said: read
    /// both sockets' state again).
    pub async fn changed(&self) -> io::Result<()> {
        let mut guard = self.epoll.readable().await?;
        let mut events = [MaybeUninit::<epoll::Event>::uninit(); 4];
        let now = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        while let Ok((got, _)) = epoll::wait(guard.get_inner(), &mut events, Some(&now)) {
            if got.len() < events.len() {
                break;
            }
        }
        guard.clear_ready();
        Ok(())
    }
}

/// `TCP_INFO` of a TCP socket (the fields the kernel path reads).
pub fn tcp_info(socket: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    sys::tcp_info(socket)
}

/// Bytes in the socket's send queue not acknowledged yet.
pub fn unacked(socket: BorrowedFd<'_>) -> io::Result<usize> {
    sys::outq(socket)
}

/// Bytes in the socket's receive queue not read yet.
pub fn unread(socket: BorrowedFd<'_>) -> io::Result<usize> {
    sys::inq(socket)
}

/// TCP states (`tcpi_state`), as the kernel numbers them.
pub mod state {
    pub const ESTABLISHED: u8 = 1;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const CLOSING: u8 = 11;

    /// The peer's FIN has arrived (or the socket is closed altogether).
    pub fn fin_received(state: u8) -> bool {
        matches!(state, TIME_WAIT | CLOSE | CLOSE_WAIT | LAST_ACK | CLOSING)
    }

    /// This side's FIN is in its send queue or sent (or the socket is closed altogether:
    /// after its FIN was acknowledged, or a reset).
    pub fn fin_sent(state: u8) -> bool {
        matches!(
            state,
            FIN_WAIT1 | FIN_WAIT2 | CLOSING | TIME_WAIT | LAST_ACK | CLOSE
        )
    }
}
