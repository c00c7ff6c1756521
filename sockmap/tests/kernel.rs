//! The kernel path on real loopback sockets (needs CAP_BPF and CAP_NET_ADMIN: the test suite
//! runs as root), and the `TCP_INFO` accounting the ambassador's end-of-stream check relies on.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// client -> (a ... b) -> backend: `a` accepted from the client, `b` connected to the backend.
fn chain(l: &TcpListener) -> (TcpStream, TcpStream, TcpStream, TcpStream) {
    let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (a, _) = l.accept().unwrap();
    let b = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (backend, _) = l.accept().unwrap();
    (client, a, b, backend)
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{what}: not within 5 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn joined_sockets_forward_both_ways_including_bytes_queued_before_the_join() {
    let path = sockmap::KernelPath::new(16).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut client, a, b, mut backend) = chain(&l);
    // Queued on both sides before the join: forwarded first, in order.
    client.write_all(b"early").unwrap();
    backend.write_all(b"greet").unwrap();
    eventually("queued", || {
        sockmap::unread(a.as_fd()).unwrap() == 5 && sockmap::unread(b.as_fd()).unwrap() == 5
    });
    path.join(a.as_fd(), b.as_fd()).unwrap();
    client.write_all(b" hello world").unwrap();
    let mut buf = [0u8; 17];
    backend.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"early hello world");
    let mut buf = [0u8; 5];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"greet");

    // The accounting: bytes_received counts the peer's FIN as one; bytes_acked counts our
    // SYN on the socket we connected (b), not on the accepted one (a).
    client.shutdown(Shutdown::Write).unwrap();
    eventually("the FIN arrived", || {
        sockmap::tcp_info(a.as_fd()).unwrap().state == sockmap::state::CLOSE_WAIT
    });
    let ia = sockmap::tcp_info(a.as_fd()).unwrap();
    let ib = sockmap::tcp_info(b.as_fd()).unwrap();
    assert!(sockmap::state::fin_received(ia.state));
    assert_eq!(ia.bytes_received, 17 + 1, "17 bytes and the FIN");
    eventually("all acknowledged", || {
        sockmap::unacked(b.as_fd()).unwrap() == 0
    });
    let ib2 = sockmap::tcp_info(b.as_fd()).unwrap();
    assert_eq!(ib2.bytes_acked, 17 + 1, "17 bytes and the SYN");
    assert_eq!(ib.bytes_received, 5);
    assert_eq!(ia.bytes_acked, 5, "no SYN counted on the accepted socket");
}

#[test]
fn a_socket_that_cannot_join_leaves_nothing_joined() {
    let path = sockmap::KernelPath::new(16).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut client, a, b, backend) = chain(&l);
    // The backend closed: b is no longer established, the kernel refuses it.
    drop(backend);
    eventually("b sees the close", || {
        sockmap::state::fin_received(sockmap::tcp_info(b.as_fd()).unwrap().state)
    });
    assert!(path.join(a.as_fd(), b.as_fd()).is_err());
    // a is plain TCP again: what the client sends stays for user space to read.
    client.write_all(b"still mine").unwrap();
    let mut a = a;
    let mut buf = [0u8; 10];
    a.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still mine");
}
