//! A line protocol for tests of the kernel's forwarding paths, with both ends as Python
//! processes (started in a cgroup, or a namespace, of the test's own): what each side sends
//! is known, so the test checks order and completeness at the ends and the byte counts in
//! between.

/// The backend: listens on 127.0.0.1 (a free port, printed on its first line), takes one
/// connection, answers each line with the line reversed, and at the client's end of stream
/// answers `bye` and closes.
pub const REVERSER: &str = r#"
import socket
l = socket.socket()
l.bind(('127.0.0.1', 0))
l.listen(1)
print(l.getsockname()[1], flush=True)
c, _ = l.accept()
c.settimeout(30)
f = c.makefile('rb')
for line in f:
    c.sendall(line.rstrip(b'\n')[::-1] + b'\n')
c.sendall(b'bye\n')
c.close()
"#;

/// The client, given the port to connect to on 127.0.0.1 and a pause in seconds: 300
/// request/answer rounds, 2,000 lines sent without waiting (1 to 3,000 bytes) and their
/// answers read after, 300 rounds again; with a pause, prints `paused` and waits that long;
/// then a half-close, the rest read to the end, and `ok`.
pub const CLIENT: &str = r#"
import socket, sys, time
c = socket.create_connection(('127.0.0.1', int(sys.argv[1])))
c.settimeout(30)
f = c.makefile('rb')
def line(i):
    return (b'%d:' % i) + b'x' * (i % 3000) + b'\n'
def back(i):
    return line(i).rstrip(b'\n')[::-1] + b'\n'
for i in range(300):
    c.sendall(line(i))
    assert f.readline() == back(i), i
for i in range(2000):
    c.sendall(line(i))
for i in range(2000):
    got = f.readline()
    assert got == back(i), (i, got[:40])
for i in range(300):
    c.sendall(line(i))
    assert f.readline() == back(i), i
pause = float(sys.argv[2])
if pause > 0:
    print('paused', flush=True)
    time.sleep(pause)
c.shutdown(socket.SHUT_WR)
assert f.readline() == b'bye\n'
assert f.read() == b''
print('ok', flush=True)
"#;

/// The bytes [`CLIENT`] sends, all lines (the answers are as long, and `bye\n` more).
pub fn client_sends() -> u64 {
    (0..300).chain(0..2000).chain(0..300).map(line_len).sum()
}

/// Line `i` of [`CLIENT`], in bytes.
fn line_len(i: u64) -> u64 {
    format!("{i}:").len() as u64 + i % 3000 + 1
}
