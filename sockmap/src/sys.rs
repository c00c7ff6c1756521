//! Every call into the kernel that Rust's safe wrappers do not offer: the `bpf()` system call
//! (map create, lookup, update and delete, program load and attach, links), the socket
//! options and ioctls the kernel paths read (`SO_COOKIE`, `SO_NETNS_COOKIE`, `TCP_INFO`,
//! `SIOCINQ`, `SIOCOUTQ`, `SO_RCVLOWAT`), and `setns` into a network namespace.
//!
//! Soundness, once for the whole module: every call passes either plain integers and a file
//! descriptor borrowed for the call (`BorrowedFd`: open for at least as long as the call), or
//! pointers to memory owned by the calling frame (a zeroed `Attr`, a value, an output buffer)
//! whose size is given to the kernel alongside, so the kernel reads and writes only within it.
//! A map's key and value have no size in the call: the kernel reads and writes the sizes the
//! map was made with, which [`Map`] records and checks every buffer against.
//! The kernel does not keep any of these pointers after the call returns. Outputs are plain
//! integers or `#[repr(C)]` structs of integers, valid for every bit pattern, and zeroed first.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// `union bpf_attr` as the kernel takes it: 144 bytes on this kernel's headers; the kernel
/// accepts a shorter one as long as the fields it reads are there, and checks that any bytes
/// past the ones it knows are zero.
#[repr(C, align(8))]
struct Attr([u8; 144]);

impl Attr {
    fn new() -> Self {
        Attr([0; 144])
    }
    fn u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

// Commands (enum bpf_cmd).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_LINK_CREATE: libc::c_long = 28;

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: see the module comment; `attr` is a live, zero-initialised buffer of the size given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            size_of::<Attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Takes ownership of a descriptor the kernel just returned.
fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: `fd` is a new descriptor returned by a successful bpf() call, owned by no one else.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// `BPF_MAP_CREATE`: a map of `map_type` with fixed key and value sizes.
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    map_create_with(map_type, key_size, value_size, max_entries, 0)
}

/// `BPF_MAP_CREATE` with `map_flags` (`BPF_F_NO_PREALLOC`: entries allocated as they are
/// added, for a hash whose most entries are rarely used).
fn map_create_with(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, map_type)
        .u32(4, key_size)
        .u32(8, value_size)
        .u32(12, max_entries)
        .u32(16, flags);
    bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

/// `BPF_PROG_LOAD`: the program's instructions (8 bytes each, as the kernel lays them out).
/// On refusal, the error and the verifier's log.
pub fn prog_load(
    prog_type: u32,
    insns: &[u64],
    license: &CStr,
    name: &str,
) -> Result<OwnedFd, (io::Error, String)> {
    prog_load_for(prog_type, 0, insns, license, name)
}

/// `BPF_PROG_LOAD` of a program type that must say where it will be attached (cgroup
/// socket-address hooks): `expected_attach_type`.
pub fn prog_load_for(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[u64],
    license: &CStr,
    name: &str,
) -> Result<OwnedFd, (io::Error, String)> {
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = Attr::new();
    attr.u32(0, prog_type)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64);
    // prog_name: at most 15 bytes and a NUL, at offset 48.
    let name = &name.as_bytes()[..name.len().min(15)];
    attr.0[48..48 + name.len()].copy_from_slice(name);
    attr.u32(68, expected_attach_type);
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(owned(fd)),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err((e, String::from_utf8_lossy(&log[..end]).trim().to_owned()))
        }
    }
}

/// `BPF_PROG_ATTACH` of `prog` to `target` (here: a sock map) as `attach_type`.
pub fn prog_attach(
    target: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32(0, target.as_raw_fd() as u32)
        .u32(4, prog.as_raw_fd() as u32)
        .u32(8, attach_type);
    bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
}

/// `BPF_MAP_UPDATE_ELEM` of a sock map: `key` (8 bytes) now holds `socket`.
pub fn map_update_socket(map: BorrowedFd<'_>, key: u64, socket: BorrowedFd<'_>) -> io::Result<()> {
    let value: u32 = socket.as_raw_fd() as u32;
    let mut attr = Attr::new();
    attr.u32(0, map.as_raw_fd() as u32)
        .u64(8, &key as *const u64 as u64)
        .u64(16, &value as *const u32 as u64)
        .u64(24, 0); // BPF_ANY
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// `BPF_LINK_CREATE`: attaches `prog` to `target` (here: a cgroup's directory) as
/// `attach_type` for as long as the returned link is open: closed (also by the process's
/// exit or crash), the program is detached.
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, prog.as_raw_fd() as u32)
        .u32(4, target.as_raw_fd() as u32)
        .u32(8, attach_type);
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// `BPF_MAP_DELETE_ELEM` of `key` (a sock map's 8-byte key).
pub fn map_delete(map: BorrowedFd<'_>, key: u64) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32(0, map.as_raw_fd() as u32)
        .u64(8, &key as *const u64 as u64);
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(drop)
}

/// A plain map (hash, LRU hash, array) that knows its key and value sizes, so that every
/// lookup and update hands the kernel buffers of exactly those sizes.
#[derive(Debug)]
pub struct Map {
    fd: OwnedFd,
    key: usize,
    value: usize,
}

impl Map {
    /// `BPF_MAP_CREATE` of a plain map; `grow`: its memory is taken as entries are added
    /// (`BPF_F_NO_PREALLOC`), not all at once.
    pub fn create(
        map_type: u32,
        key: usize,
        value: usize,
        max_entries: u32,
        grow: bool,
    ) -> io::Result<Map> {
        let flags = if grow { 1 } else { 0 };
        let fd = map_create_with(map_type, key as u32, value as u32, max_entries, flags)?;
        Ok(Map { fd, key, value })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// The attribute of an element command: this map, `key`, and the value's address and
    /// length when the command has one. Both must be of the map's sizes (what the kernel
    /// reads and writes through them).
    fn elem(&self, key: &[u8], value: Option<(u64, usize)>) -> Attr {
        assert!(key.len() == self.key, "map key size");
        let mut attr = Attr::new();
        attr.u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, key.as_ptr() as u64);
        if let Some((at, len)) = value {
            assert!(len == self.value, "map value size");
            attr.u64(16, at);
        }
        attr
    }

    /// `BPF_MAP_UPDATE_ELEM` with `flags` (`BPF_ANY` 0, `BPF_NOEXIST` 1, `BPF_EXIST` 2).
    pub fn update(&self, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
        let mut attr = self.elem(key, Some((value.as_ptr() as u64, value.len())));
        attr.u64(24, flags);
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
    }

    /// `BPF_MAP_LOOKUP_ELEM` into `value`; false when `key` holds nothing.
    pub fn lookup(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        let mut attr = self.elem(key, Some((value.as_mut_ptr() as u64, value.len())));
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `BPF_MAP_DELETE_ELEM`; a key that holds nothing is not an error.
    pub fn delete(&self, key: &[u8]) -> io::Result<()> {
        match bpf(BPF_MAP_DELETE_ELEM, &mut self.elem(key, None)) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
            _ => Ok(()),
        }
    }
}

/// getsockopt() of a plain-integer or `#[repr(C)]` integer-only value `T`; returns how many
/// bytes the kernel filled.
fn getsockopt<T: Copy>(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    value: &mut T,
) -> io::Result<usize> {
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: see the module comment; `value` is `len` writable bytes, and `T` is only ever
    // instantiated with integer types and `TcpInfo` (integers only), valid for any bytes.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *mut T).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(len as usize)
    }
}

/// The socket's cookie: a 64-bit id the kernel never gives another socket (the key the
/// verdict program finds its peer under).
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE, &mut cookie)?;
    Ok(cookie)
}

/// The socket's send buffer in bytes (`SO_SNDBUF`: what the kernel allows, twice the size
/// set, or the size TCP grew it to).
pub fn sndbuf(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut bytes: libc::c_int = 0;
    getsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &mut bytes)?;
    Ok(bytes.max(0) as u64)
}

/// Sets `SO_SNDBUF` (the kernel doubles it, and stops growing it on its own).
pub fn set_sndbuf(fd: BorrowedFd<'_>, bytes: i32) -> io::Result<()> {
    setsockopt_int(fd, libc::SO_SNDBUF, bytes)
}

/// The cookie of the network namespace the socket lives in (`SO_NETNS_COOKIE`, Linux 5.14).
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    getsockopt(fd, libc::SOL_SOCKET, 71, &mut cookie)?;
    Ok(cookie)
}

/// Moves the calling thread into the network namespace `ns` (an open `/proc/<pid>/ns/net`).
pub fn setns_net(ns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: see the module comment; plain integers, the descriptor borrowed for the call.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `SO_RCVLOWAT`; TCP sets it with `tcp_set_rcvlowat`, which also runs the socket's
/// data-ready callback at once when enough bytes are queued.
pub fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: i32) -> io::Result<()> {
    setsockopt_int(fd, libc::SO_RCVLOWAT, bytes)
}

/// setsockopt() of a `SOL_SOCKET` option whose value is a C int.
fn setsockopt_int(fd: BorrowedFd<'_>, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: see the module comment; the value is a c_int read by the kernel during the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// What the kernel path reads of `struct tcp_info`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpInfo {
    pub state: u8,
    /// Milliseconds since data last arrived.
    pub last_data_recv: u32,
    /// Milliseconds since data was last sent.
    pub last_data_sent: u32,
    /// Sequence space the peer acknowledged (RFC 4898 HCThruOctetsAcked).
    pub bytes_acked: u64,
    /// Sequence space received in order (HCThruOctetsReceived); counts a received FIN as 1.
    pub bytes_received: u64,
}

pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    // SAFETY: `libc::tcp_info` is a `#[repr(C)]` struct of integers: all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)?;
    Ok(TcpInfo {
        state: info.tcpi_state,
        last_data_recv: info.tcpi_last_data_recv,
        last_data_sent: info.tcpi_last_data_sent,
        bytes_acked: info.tcpi_bytes_acked,
        bytes_received: info.tcpi_bytes_received,
    })
}

fn ioctl_int(fd: BorrowedFd<'_>, request: libc::Ioctl) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: see the module comment; both requests write one c_int to the pointer given.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut n as *mut libc::c_int) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n.max(0) as usize)
    }
}

/// Bytes in the receive queue not read yet (`SIOCINQ`).
pub fn inq(fd: BorrowedFd<'_>) -> io::Result<usize> {
    ioctl_int(fd, libc::FIONREAD)
}

/// Bytes in the send queue not acknowledged yet (`SIOCOUTQ`).
pub fn outq(fd: BorrowedFd<'_>) -> io::Result<usize> {
    ioctl_int(fd, libc::TIOCOUTQ)
}

/// Registers a descriptor given to it (an epoll instance, a listening socket) with tokio's
/// reactor, for readable events.
pub fn register_readable(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `AsyncFd` takes ownership of the descriptor and closes it only when it is
    // dropped, after deregistering; nothing else holds it, so it is never closed or replaced
    // while registered (tokio's requirement).
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(Into::into)
}
