//! UDP balanced by the kernel when a socket sends: cgroup socket-address programs rewrite a
//! datagram's destination from a service's ambassador address to one of its backends, and a
//! reply's source back, so the datagrams go straight between client and backend without
//! passing through the proxy (Cilium's socket-level balancing does the same for services).
//!
//! Four programs, attached to one cgroup (v2) with links that live as long as [`Balancer`]:
//! * `sendmsg4` (a datagram sent with an address) and `connect4` (a UDP socket connected):
//!   when the address is a service in the `services` map under the sender's network
//!   namespace (or under namespace 0: every namespace), the destination becomes the backend
//!   `cookie % count` (a socket keeps its backend while the list stays the same), the pair
//!   (socket, backend) -> service goes into the `reverse` map, and the service's count in
//!   `sent` goes up by one;
//! * `recvmsg4` (a datagram received with its source) and `getpeername4`: a source found in
//!   `reverse` under the socket becomes the service's address again, so a client that checks
//!   where its answer came from (every DNS resolver does) sees the address it asked.
//!
//! TCP sockets are left alone (the programs look at the socket type). What user space keeps:
//! the maps (the ambassador writes each UDP service's live backends on every change).
//!
//! Built as bytecode here, like the sockmap's verdict program; nothing needs a C toolchain.

use std::fs::File;
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use crate::Asm;
use crate::op::*;
use crate::sys::{self, Map};

const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const ATTACH_INET4_CONNECT: u32 = 10;
const ATTACH_UDP4_SENDMSG: u32 = 14;
const ATTACH_UDP4_RECVMSG: u32 = 19;
const ATTACH_INET4_GETPEERNAME: u32 = 29;
const MAP_TYPE_HASH: u32 = 1;
const MAP_TYPE_LRU_HASH: u32 = 9;
const FUNC_GET_SOCKET_COOKIE: i32 = 46;
const FUNC_GET_NETNS_COOKIE: i32 = 122;
const SOCK_DGRAM: i32 = 2;

// `struct bpf_sock_addr` fields (linux/bpf.h).
const CTX_USER_IP4: i16 = 4;
const CTX_USER_PORT: i16 = 24;
const CTX_TYPE: i16 = 32;

/// Backends a service can have in the kernel's choice; a service with more uses its first
/// this many (the ambassador sorts them as its own choice does).
pub const MAX_BACKENDS: usize = 16;

/// services: key `{ip, port, netns cookie}`; value `{count, _, [ip, port] * MAX_BACKENDS}`.
const SERVICE_KEY: usize = 16;
const SERVICE_VALUE: usize = 8 + 8 * MAX_BACKENDS;
/// reverse: key `{socket cookie, backend ip, backend port}`; value `{service ip, port}`.
const REVERSE_KEY: usize = 16;
const REVERSE_VALUE: usize = 8;
/// Sockets remembered with the backend they were sent to: the least recently used go first.
const REVERSE_ENTRIES: u32 = 65_536;

/// The program for `sendmsg4` and `connect4` (the same bytecode, loaded once for each):
///
/// ```text
/// if ctx.type != SOCK_DGRAM: return 1
/// key = {ctx.user_ip4, ctx.user_port, netns_cookie(ctx)}        // r10 - 16
/// svc = services[key] ?: services[key with netns 0] ?: return 1
/// if svc.count == 0: return 1
/// cookie = socket_cookie(ctx); i = cookie % svc.count; if i >= MAX_BACKENDS: return 1
/// reverse[{cookie, backend i}] = {key.ip, key.port}
/// ctx.user_ip4, ctx.user_port = backend i
/// sent[key] += 1 (if there)
/// return 1                                                        // 1: let it go on
/// ```
fn forward(services: &Map, reverse: &Map, sent: &Map) -> Vec<u64> {
    let mut a = Asm::new();
    a.op(MOV64_REG, 6, 1, 0, 0)
        .op(LDX_W, 2, 6, CTX_TYPE, 0)
        .jump(JNE_IMM, 2, SOCK_DGRAM, "pass")
        .op(LDX_W, 2, 6, CTX_USER_IP4, 0)
        .op(STX_W, 10, 2, -16, 0)
        .op(LDX_W, 2, 6, CTX_USER_PORT, 0)
        .op(STX_W, 10, 2, -12, 0)
        .op(MOV64_REG, 1, 6, 0, 0)
        .op(CALL, 0, 0, 0, FUNC_GET_NETNS_COOKIE)
        .op(STX_DW, 10, 0, -8, 0)
        .lookup(services.fd(), -16)
        .jump(JNE_IMM, 0, 0, "found")
        // Not under this namespace: under every namespace?
        .op(ST_DW, 10, 0, -8, 0)
        .lookup(services.fd(), -16)
        .jump(JEQ_IMM, 0, 0, "pass")
        .place("found")
        .op(MOV64_REG, 7, 0, 0, 0)
        .op(LDX_W, 8, 7, 0, 0)
        .jump(JEQ_IMM, 8, 0, "pass")
        .op(MOV64_REG, 1, 6, 0, 0)
        .op(CALL, 0, 0, 0, FUNC_GET_SOCKET_COOKIE)
        .op(MOV64_REG, 9, 0, 0, 0)
        .op(MOD64_REG, 0, 8, 0, 0)
        .jump(JGE_IMM, 0, MAX_BACKENDS as i32, "pass")
        .op(LSH64_IMM, 0, 0, 0, 3)
        .op(ADD64_REG, 7, 0, 0, 0)
        .op(LDX_W, 2, 7, 8, 0)
        .op(LDX_W, 3, 7, 12, 0)
        // reverse key {cookie, backend} at r10 - 32, value {service} at r10 - 40
        .op(STX_DW, 10, 9, -32, 0)
        .op(STX_W, 10, 2, -24, 0)
        .op(STX_W, 10, 3, -20, 0)
        .op(LDX_W, 4, 10, -16, 0)
        .op(STX_W, 10, 4, -40, 0)
        .op(LDX_W, 4, 10, -12, 0)
        .op(STX_W, 10, 4, -36, 0)
        .op(STX_W, 6, 2, CTX_USER_IP4, 0)
        .op(STX_W, 6, 3, CTX_USER_PORT, 0)
        .update(reverse.fd(), -32, -40)
        .lookup(sent.fd(), -16)
        .jump(JEQ_IMM, 0, 0, "pass")
        .op(MOV64_IMM, 1, 0, 0, 1)
        .op(ATOMIC_ADD_DW, 0, 1, 0, 0)
        .place("pass")
        .op(MOV64_IMM, 0, 0, 0, 1)
        .op(EXIT, 0, 0, 0, 0);
    a.finish()
}

/// The program for `recvmsg4` and `getpeername4`:
///
/// ```text
/// if ctx.type != SOCK_DGRAM: return 1
/// service = reverse[{socket_cookie(ctx), ctx.user_ip4, ctx.user_port}] ?: return 1
/// ctx.user_ip4, ctx.user_port = service
/// return 1
/// ```
fn reverse(reverse: &Map) -> Vec<u64> {
    let mut a = Asm::new();
    a.op(MOV64_REG, 6, 1, 0, 0)
        .op(LDX_W, 2, 6, CTX_TYPE, 0)
        .jump(JNE_IMM, 2, SOCK_DGRAM, "out")
        .op(MOV64_REG, 1, 6, 0, 0)
        .op(CALL, 0, 0, 0, FUNC_GET_SOCKET_COOKIE)
        .op(STX_DW, 10, 0, -16, 0)
        .op(LDX_W, 2, 6, CTX_USER_IP4, 0)
        .op(STX_W, 10, 2, -8, 0)
        .op(LDX_W, 2, 6, CTX_USER_PORT, 0)
        .op(STX_W, 10, 2, -4, 0)
        .lookup(reverse.fd(), -16)
        .jump(JEQ_IMM, 0, 0, "out")
        .op(LDX_W, 2, 0, 0, 0)
        .op(STX_W, 6, 2, CTX_USER_IP4, 0)
        .op(LDX_W, 2, 0, 4, 0)
        .op(STX_W, 6, 2, CTX_USER_PORT, 0)
        .place("out")
        .op(MOV64_IMM, 0, 0, 0, 1)
        .op(EXIT, 0, 0, 0, 0);
    a.finish()
}

/// A service address as the programs read it: the address and the port in network order,
/// each in a 32-bit field, as `struct bpf_sock_addr` holds them.
fn addr_bytes(addr: SocketAddrV4) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&addr.ip().octets());
    b[4..6].copy_from_slice(&addr.port().to_be_bytes());
    b
}

/// The maps and the attached programs. Dropping it detaches the programs (their links
/// close) and frees the maps.
#[derive(Debug)]
pub struct Balancer {
    services: Map,
    sent: Map,
    _reverse: Map,
    _links: Vec<OwnedFd>,
}

/// Which senders a service is balanced for, by network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Senders {
    /// Only sockets of this namespace (the one whose cookie is given).
    Namespace(u64),
    /// Sockets of every namespace.
    Any,
}

impl Balancer {
    /// Creates the maps for `services` services, loads the programs and attaches them to the
    /// cgroup (v2) directory `cgroup`: every process in it and below it is balanced. The
    /// error says which step failed and why (with the verifier's log for a program).
    pub fn attach(cgroup: &Path, services: u32) -> Result<Balancer, String> {
        let dir = File::open(cgroup).map_err(|e| format!("opening {}: {e}", cgroup.display()))?;
        // The hashes grow as services are written (most of their places stay unused); the
        // LRU hash cannot, and is small: 65,536 entries of 24 bytes.
        let map = |kind, key, value, entries, what: &str| {
            Map::create(kind, key, value, entries, kind == MAP_TYPE_HASH)
                .map_err(|e| format!("creating the {what} map failed: {e}"))
        };
        let service_map = map(
            MAP_TYPE_HASH,
            SERVICE_KEY,
            SERVICE_VALUE,
            services.max(1),
            "services",
        )?;
        let sent = map(MAP_TYPE_HASH, SERVICE_KEY, 8, services.max(1), "sent")?;
        let reverse_map = map(
            MAP_TYPE_LRU_HASH,
            REVERSE_KEY,
            REVERSE_VALUE,
            REVERSE_ENTRIES,
            "reverse",
        )?;
        let load = |insns: &[u64], attach: u32, name: &str| {
            sys::prog_load_for(
                PROG_TYPE_CGROUP_SOCK_ADDR,
                attach,
                insns,
                c"Dual MIT/GPL",
                name,
            )
            .map_err(|(e, log)| {
                if log.is_empty() {
                    format!("loading {name} failed: {e}")
                } else {
                    format!("loading {name} failed: {e}; verifier: {log}")
                }
            })
        };
        let out = forward(&service_map, &reverse_map, &sent);
        let back = reverse(&reverse_map);
        let mut links = Vec::new();
        for (insns, attach, name) in [
            (&out, ATTACH_UDP4_SENDMSG, "viking_sendmsg4"),
            (&out, ATTACH_INET4_CONNECT, "viking_connect4"),
            (&back, ATTACH_UDP4_RECVMSG, "viking_recvmsg4"),
            (&back, ATTACH_INET4_GETPEERNAME, "viking_peername4"),
        ] {
            let program = load(insns, attach, name)?;
            let link = sys::link_create(program.as_fd(), dir.as_fd(), attach)
                .map_err(|e| format!("attaching {name} to {} failed: {e}", cgroup.display()))?;
            links.push(link);
        }
        Ok(Balancer {
            services: service_map,
            sent,
            _reverse: reverse_map,
            _links: links,
        })
    }

    fn key(service: SocketAddrV4, senders: Senders) -> [u8; SERVICE_KEY] {
        let mut key = [0u8; SERVICE_KEY];
        key[..8].copy_from_slice(&addr_bytes(service));
        if let Senders::Namespace(cookie) = senders {
            key[8..].copy_from_slice(&cookie.to_ne_bytes());
        }
        key
    }

    /// Balances datagrams to `service` from `senders` over `backends` (at most
    /// [`MAX_BACKENDS`], the first ones taken); none: the datagrams go to the service's
    /// address as sent (the ambassador's own socket there answers them). Its count of sent
    /// datagrams starts at 0 the first time and is kept across changes.
    pub fn set(
        &self,
        service: SocketAddrV4,
        senders: Senders,
        backends: &[SocketAddrV4],
    ) -> io::Result<()> {
        let key = Self::key(service, senders);
        let taken = &backends[..backends.len().min(MAX_BACKENDS)];
        let mut value = [0u8; SERVICE_VALUE];
        value[..4].copy_from_slice(&(taken.len() as u32).to_ne_bytes());
        for (i, b) in taken.iter().enumerate() {
            value[8 + 8 * i..16 + 8 * i].copy_from_slice(&addr_bytes(*b));
        }
        // BPF_NOEXIST: a count already there is kept.
        match self.sent.update(&key, &0u64.to_ne_bytes(), 1) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
            _ => {}
        }
        self.services.update(&key, &value, 0)
    }

    /// Stops balancing `service` for `senders`.
    pub fn remove(&self, service: SocketAddrV4, senders: Senders) -> io::Result<()> {
        let key = Self::key(service, senders);
        self.services.delete(&key)?;
        self.sent.delete(&key)
    }

    /// Datagrams (or UDP connects) sent to `service` by `senders` and balanced by the kernel.
    pub fn sent(&self, service: SocketAddrV4, senders: Senders) -> io::Result<u64> {
        let mut value = [0u8; 8];
        self.sent
            .lookup(&Self::key(service, senders), &mut value)
            .map(|_| u64::from_ne_bytes(value))
    }
}

/// The cookie of this process's network namespace, as the programs see a sender's.
pub fn own_netns_cookie() -> io::Result<u64> {
    let socket = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        None,
    )?;
    sys::netns_cookie(socket.as_fd())
}

/// The cookie of the network namespace of process `pid` (a container's first process), as
/// the programs see its sockets': read from a socket made inside that namespace by a thread
/// that moves there for the purpose and then ends (a namespace is per thread).
pub fn netns_cookie_of(pid: u32) -> io::Result<u64> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                sys::setns_net(ns.as_fd())?;
                own_netns_cookie()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    })
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one), from `/proc/self/mounts`.
pub fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| std::path::PathBuf::from(dir))
    })
}
