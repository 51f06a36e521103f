//! The encrypted channel: a rustls session over a non-blocking socket,
//! shared by every clone of the channel. The session's lock is held only
//! while bytes move between the socket, the session and the caller; a
//! thread that must wait for the socket waits with the lock released, so a
//! reader blocked on the network never holds up a writer, nor the reverse.

use crate::Channel;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Ciphertext read from the socket at once.
const READ_CHUNK: usize = 256 << 10;
/// Plaintext a writer gathers before it is sealed into records.
const WRITE_GATHER: usize = 64 << 10;
/// Ciphertext the session holds for sending before a writer drains it.
const SEND_LIMIT: usize = 1 << 20;

struct Session {
    conn: rustls::Connection,
    /// Ciphertext read from the socket, not yet given to the session.
    cipher: Vec<u8>,
    cipher_pos: usize,
    /// The socket said end of file.
    eof: bool,
}

struct Shared {
    sock: OwnedFd,
    session: Mutex<Session>,
    timeouts: Mutex<(Option<Duration>, Option<Duration>)>,
}

pub(super) struct TlsChannel {
    shared: Arc<Shared>,
    /// Plaintext written, not yet sealed.
    plain: Vec<u8>,
}

pub(super) enum HandshakeError {
    Timeout,
    Failed(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl TlsChannel {
    /// The peer's own certificate (DER), once the handshake is done.
    pub(super) fn peer_certificate(&self) -> Option<Vec<u8>> {
        let s = lock(&self.shared.session);
        s.conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|c| c.to_vec())
    }

    /// Takes a duplicate of `plain`'s socket, made non-blocking.
    pub(super) fn new(plain: &dyn Channel, mut conn: rustls::Connection) -> io::Result<Self> {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor the channel owns; the
        // result is checked and owned below.
        let fd = unsafe { libc::fcntl(plain.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut st: libc::stat = unsafe_zeroed_stat();
        // SAFETY: fstat writes one stat into `st`.
        if unsafe { libc::fstat(fd, &mut st) } < 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        // SAFETY: F_GETFL/F_SETFL on our own descriptor.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        conn.set_buffer_limit(Some(SEND_LIMIT));
        Ok(Self {
            shared: Arc::new(Shared {
                sock,
                session: Mutex::new(Session {
                    conn,
                    cipher: Vec::new(),
                    cipher_pos: 0,
                    eof: false,
                }),
                timeouts: Mutex::new((None, None)),
            }),
            plain: Vec::new(),
        })
    }

    fn fd(&self) -> RawFd {
        self.shared.sock.as_raw_fd()
    }

    /// Seals `data` and sends every sealed byte, waiting (unlocked) for
    /// the socket as needed.
    fn send(&self, mut data: &[u8]) -> io::Result<()> {
        loop {
            let pending = {
                let mut s = lock(&self.shared.session);
                while !data.is_empty() {
                    let n = s.conn.writer().write(data)?;
                    if n == 0 {
                        break;
                    }
                    data = &data[n..];
                }
                push(&mut s.conn, self.fd())?
            };
            if !pending && data.is_empty() {
                return Ok(());
            }
            let write = lock(&self.shared.timeouts).1;
            wait(self.fd(), libc::POLLOUT, write.map(|t| Instant::now() + t))?;
        }
    }

    fn flush_plain(&mut self) -> io::Result<()> {
        if self.plain.is_empty() {
            return Ok(());
        }
        let plain = std::mem::take(&mut self.plain);
        let r = self.send(&plain);
        self.plain = plain;
        self.plain.clear();
        r
    }
}

fn unsafe_zeroed_stat() -> libc::stat {
    // SAFETY: all-zero is a valid stat.
    unsafe { std::mem::zeroed() }
}

/// Writes what the session has sealed until the socket would block;
/// whether some is left.
fn push(conn: &mut rustls::Connection, fd: RawFd) -> io::Result<bool> {
    while conn.wants_write() {
        match conn.write_tls(&mut FdIo(fd)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Moves ciphertext from the socket into the session and decrypts it;
/// `Ok(false)`: the socket has nothing now.
fn pull(s: &mut Session, fd: RawFd) -> io::Result<bool> {
    if s.cipher_pos == s.cipher.len() {
        if s.eof {
            return Ok(false);
        }
        s.cipher.resize(READ_CHUNK, 0);
        s.cipher_pos = 0;
        match FdIo(fd).read(&mut s.cipher) {
            Ok(0) => {
                s.cipher.clear();
                s.eof = true;
                // The session learns of the end (and says whether it was a
                // clean one) on the next read of its plaintext.
                let _ = s.conn.read_tls(&mut io::empty());
                return Ok(true);
            }
            Ok(n) => s.cipher.truncate(n),
            Err(e) => {
                s.cipher.clear();
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
                    _ => Err(e),
                };
            }
        }
    }
    let mut rest = &s.cipher[s.cipher_pos..];
    let before = rest.len();
    s.conn.read_tls(&mut rest)?;
    s.cipher_pos += before - rest.len();
    s.conn.process_new_packets().map_err(tls_err)?;
    Ok(true)
}

/// Waits until `fd` is ready for `events`, or the deadline.
fn wait(fd: RawFd, events: libc::c_short, deadline: Option<Instant>) -> io::Result<()> {
    loop {
        let ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::from(io::ErrorKind::TimedOut));
                }
                left.as_millis().clamp(1, i32::MAX as u128) as i32
            }
        };
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one pollfd, valid for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            return Ok(());
        }
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// The handshake, both ways, until it is done or `deadline`.
pub(super) fn handshake(tls: &TlsChannel, deadline: Instant) -> Result<(), HandshakeError> {
    let fd = tls.fd();
    let failed = |e: io::Error| HandshakeError::Failed(e.to_string());
    loop {
        let (pending, need_read) = {
            let mut s = lock(&tls.shared.session);
            let pending = push(&mut s.conn, fd).map_err(failed)?;
            if !s.conn.is_handshaking() && !pending {
                return Ok(());
            }
            let mut need_read = false;
            if s.conn.is_handshaking() && s.conn.wants_read() {
                match pull(&mut s, fd) {
                    Ok(true) if s.eof && s.conn.is_handshaking() => {
                        return Err(HandshakeError::Failed(
                            "the peer closed the connection (is it using TLS?)".into(),
                        ))
                    }
                    Ok(true) => continue,
                    Ok(false) => need_read = true,
                    Err(e) => {
                        // Tell the peer why (rustls queued an alert).
                        let _ = push(&mut s.conn, fd);
                        return Err(failed(e));
                    }
                }
            }
            (pending, need_read)
        };
        let events = match (pending, need_read) {
            (true, true) => libc::POLLIN | libc::POLLOUT,
            (true, false) => libc::POLLOUT,
            _ => libc::POLLIN,
        };
        wait(fd, events, Some(deadline)).map_err(|e| match e.kind() {
            io::ErrorKind::TimedOut => HandshakeError::Timeout,
            _ => failed(e),
        })?;
    }
}

impl Read for TlsChannel {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        self.flush_plain()?;
        let fd = self.fd();
        let deadline = lock(&self.shared.timeouts).0.map(|t| Instant::now() + t);
        loop {
            {
                let mut s = lock(&self.shared.session);
                loop {
                    match s.conn.reader().read(out) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    let more = pull(&mut s, fd);
                    // Whatever the session has to say back (a key update).
                    push(&mut s.conn, fd)?;
                    if !more? {
                        break;
                    }
                }
            }
            wait(fd, libc::POLLIN, deadline)?;
        }
    }
}

impl Write for TlsChannel {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // What was gathered goes first, whatever comes next.
        if self.plain.len() + data.len() > WRITE_GATHER || data.len() >= WRITE_GATHER / 4 {
            self.flush_plain()?;
        }
        if data.len() >= WRITE_GATHER / 4 {
            self.send(data)?;
        } else {
            self.plain.extend_from_slice(data);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_plain()
    }
}

impl Drop for TlsChannel {
    fn drop(&mut self) {
        if let Err(e) = self.flush_plain() {
            log::debug!("TLS migration channel: unsent bytes dropped: {e}");
        }
        if Arc::strong_count(&self.shared) == 1 {
            // The last handle: a clean end for the peer, if it still reads.
            let mut s = lock(&self.shared.session);
            s.conn.send_close_notify();
            let _ = push(&mut s.conn, self.shared.sock.as_raw_fd());
        }
    }
}

impl Channel for TlsChannel {
    fn shutdown(&self) -> io::Result<()> {
        // SAFETY: shutdown on our own socket; no pointers.
        if unsafe { libc::shutdown(self.fd(), libc::SHUT_RDWR) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        *lock(&self.shared.timeouts) = (read, write);
        Ok(())
    }

    fn as_raw_fd(&self) -> RawFd {
        self.fd()
    }

    fn try_clone_box(&self) -> io::Result<Box<dyn Channel>> {
        Ok(Box::new(TlsChannel {
            shared: self.shared.clone(),
            plain: Vec::new(),
        }))
    }
}

/// Raw reads and writes on a descriptor (the socket is non-blocking).
struct FdIo(RawFd);

impl Read for FdIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Write for FdIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for reads of buf.len() bytes; MSG_NOSIGNAL:
        // a closed peer is an error, not a SIGPIPE.
        let n = unsafe { libc::send(self.0, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let msg = libc::msghdr {
            msg_name: std::ptr::null_mut(),
            msg_namelen: 0,
            msg_iov: bufs.as_ptr() as *mut libc::iovec,
            msg_iovlen: bufs.len().min(1024) as _,
            msg_control: std::ptr::null_mut(),
            msg_controllen: 0,
            msg_flags: 0,
        };
        // SAFETY: IoSlice is ABI-compatible with iovec; every slice is
        // valid for reads for the call.
        let n = unsafe { libc::sendmsg(self.0, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
