//! Batched datagram system calls for [`crate::udp`]: `recvmmsg` takes every datagram a socket
//! has queued (up to [`BATCH`]) in one call, `sendmmsg` sends a run of them to one address in
//! one call. Measured on this machine (dnsperf, strace): without them the proxy spends four
//! system calls per query, one per datagram each way on each socket.
//!
//! Through nix's safe wrappers; every call is non-blocking (`MSG_DONTWAIT`).

use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::RawFd;

use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrLike, SockaddrStorage, recvmmsg, sendmmsg,
};

/// Datagrams taken or sent per call.
pub const BATCH: usize = 32;

/// Buffers for one batch: `BATCH` slots of `slot` bytes in one allocation (large enough to be
/// mapped lazily: a slot's pages are touched only by the datagrams written into it).
pub struct Slots {
    bytes: Vec<u8>,
    slot: usize,
}

impl Slots {
    pub fn new(slot: usize) -> Slots {
        Slots {
            bytes: vec![0u8; slot * BATCH],
            slot,
        }
    }

    /// Datagram `i` of the last batch, `len` bytes long.
    pub fn get(&self, i: usize, len: usize) -> &[u8] {
        &self.bytes[i * self.slot..i * self.slot + len.min(self.slot)]
    }

    /// Receives what `fd` has queued, up to [`BATCH`] datagrams: each one's length and, for an
    /// unconnected socket, its source. `WouldBlock` when there is none.
    pub fn receive(&mut self, fd: RawFd) -> std::io::Result<Vec<(usize, Option<SocketAddr>)>> {
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let mut slices: Vec<[IoSliceMut<'_>; 1]> = self
            .bytes
            .chunks_mut(self.slot)
            .map(|chunk| [IoSliceMut::new(chunk)])
            .collect();
        let received = recvmmsg(
            fd,
            &mut headers,
            slices.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(std::io::Error::from)?;
        Ok(received
            .map(|m| (m.bytes, m.address.and_then(|a| std_addr(&a))))
            .collect())
    }
}

/// Sends `datagrams` to `to` (or to a connected socket's peer with `None`) in as few calls as
/// it takes; returns how many were sent before the socket refused (`WouldBlock` or an error
/// for the first one is returned as is).
pub fn send(fd: RawFd, datagrams: &[&[u8]], to: Option<SocketAddr>) -> std::io::Result<usize> {
    let to: Option<SockaddrStorage> = to.map(SockaddrStorage::from);
    let mut sent = 0;
    for run in datagrams.chunks(BATCH) {
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(run.len(), None);
        let slices: Vec<[IoSlice<'_>; 1]> = run.iter().map(|d| [IoSlice::new(d)]).collect();
        let addrs: Vec<Option<SockaddrStorage>> = vec![to; run.len()];
        let cmsgs: [ControlMessage<'_>; 0] = [];
        match sendmmsg(
            fd,
            &mut headers,
            &slices,
            &addrs,
            cmsgs,
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(results) => {
                let n = results.count();
                sent += n;
                if n < run.len() {
                    return Ok(sent);
                }
            }
            Err(e) if sent == 0 => return Err(e.into()),
            Err(_) => return Ok(sent),
        }
    }
    Ok(sent)
}

fn std_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
        .filter(|_| a.len() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_in_and_a_batch_out_keep_every_datagram_and_its_source() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = b.local_addr().unwrap();
        let datagrams: Vec<Vec<u8>> = (0..40u8)
            .map(|i| vec![i; 1 + usize::from(i) * 30])
            .collect();
        let refs: Vec<&[u8]> = datagrams.iter().map(Vec::as_slice).collect();
        assert_eq!(send(a.as_raw_fd(), &refs, Some(to)).unwrap(), 40);
        let mut slots = Slots::new(2048);
        let mut got = Vec::new();
        while got.len() < 40 {
            let batch = slots.receive(b.as_raw_fd()).unwrap();
            assert!(batch.len() <= BATCH);
            for (i, (len, from)) in batch.iter().enumerate() {
                assert_eq!(*from, Some(a.local_addr().unwrap()));
                got.push(slots.get(i, *len).to_vec());
            }
        }
        assert_eq!(got, datagrams);
        let empty = slots.receive(b.as_raw_fd()).unwrap_err();
        assert_eq!(empty.kind(), std::io::ErrorKind::WouldBlock);
    }
}
