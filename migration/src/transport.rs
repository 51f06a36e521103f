//! The transports: `tcp:`, `unix:` and `file:` channels, buffered both
//! ways, with file-descriptor passing on `unix:`.

use crate::scm;
use crate::uri::MigrationUri;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Size of a channel's read buffer and of its write buffer.
pub const IO_BUFFER_SIZE: usize = 1 << 20;

/// Tag of a descriptor message ([`Channel::send_fds`]).
const FD_TAG: [u8; 4] = *b"FDS1";
/// Largest payload of a descriptor message.
const FD_PAYLOAD_MAX: usize = 16 << 20;

/// A connected migration transport. Reads and writes are buffered
/// ([`IO_BUFFER_SIZE`] each way); `flush` sends what is buffered, and a
/// read flushes pending writes first (so a request is never stuck in the
/// buffer while its sender waits for the reply).
pub trait Channel: Read + Write + Send {
    /// Shuts the connection down both ways: blocked reads and writes on
    /// every clone return. A no-op for files.
    fn shutdown(&self) -> io::Result<()>;
    /// Read and write timeouts (`None`: block). A no-op for files.
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()>;
    /// The socket or file descriptor.
    fn as_raw_fd(&self) -> RawFd;
    /// Another handle on the same connection, with its own (empty)
    /// buffers: for [`Self::shutdown`] from another thread.
    fn try_clone_box(&self) -> io::Result<Box<dyn Channel>>;
    /// The peer, for log lines: its address (`tcp:`) or its process
    /// (`unix:`).
    fn peer_name(&self) -> Option<String> {
        None
    }
    /// Whether [`Self::send_fds`] works here (`unix:` only).
    fn can_pass_fds(&self) -> bool {
        false
    }
    /// Flushes, then sends `payload` (at most 16 MiB) with the file
    /// descriptors `fds` (at most 253) as one message in the stream.
    fn send_fds(&mut self, fds: &[RawFd], payload: &[u8]) -> io::Result<()> {
        let _ = (fds, payload);
        Err(no_fd_passing())
    }
    /// Reads the next message of the stream, which must be one sent by
    /// [`Self::send_fds`] with at most `max` descriptors.
    fn recv_fds(&mut self, max: usize) -> io::Result<(Vec<OwnedFd>, Vec<u8>)> {
        let _ = max;
        Err(no_fd_passing())
    }
}

fn no_fd_passing() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "file descriptors can only be passed over a unix: channel",
    )
}

/// A transport that could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("migration transport: cannot connect to {uri}: {source}")]
    Connect { uri: String, source: io::Error },
    #[error("migration transport: cannot listen on {uri}: {source}")]
    Bind { uri: String, source: io::Error },
    #[error("migration transport: accepting a connection on {uri} failed: {source}")]
    Accept { uri: String, source: io::Error },
    #[error("migration transport: cannot open {uri}: {source}")]
    Open { uri: String, source: io::Error },
    #[error("migration transport: {uri} is in use by a live listener")]
    InUse { uri: String },
    #[error("migration transport: {uri} exists and is not a socket (not replacing it)")]
    NotASocket { uri: String },
    #[error("migration transport: {uri}: {why}")]
    Invalid { uri: String, why: &'static str },
    #[error("migration transport: {uri}: refused a peer running as uid {uid} (pid {pid}): only this user or root may migrate to it")]
    PeerRefused { uri: String, uid: u32, pid: i32 },
}

/// Opens the source side of a migration: connects (`tcp:`, `unix:`) or
/// creates/truncates the file (`file:`).
pub fn connect(uri: &MigrationUri) -> Result<Box<dyn Channel>, TransportError> {
    connect_with_timeout(uri, None)
}

/// [`connect`], giving up on a TCP connection attempt after `timeout`.
pub fn connect_with_timeout(
    uri: &MigrationUri,
    timeout: Option<Duration>,
) -> Result<Box<dyn Channel>, TransportError> {
    let name = uri.to_string();
    let stream = match uri {
        MigrationUri::Tcp { host, port } => {
            if host.is_empty() {
                return Err(TransportError::Invalid {
                    uri: name,
                    why: "connecting needs a host",
                });
            }
            if *port == 0 {
                return Err(TransportError::Invalid {
                    uri: name,
                    why: "connecting needs a port other than 0",
                });
            }
            Stream::Tcp(
                tcp_connect(host, *port, timeout)
                    .map_err(|source| TransportError::Connect { uri: name, source })?,
            )
        }
        MigrationUri::Unix(path) => Stream::Unix(
            UnixStream::connect(path)
                .map_err(|source| TransportError::Connect { uri: name, source })?,
        ),
        MigrationUri::File(path) => Stream::File(
            File::create(path).map_err(|source| TransportError::Open { uri: name, source })?,
        ),
    };
    Ok(Box::new(StreamChannel::new(stream)))
}

fn tcp_connect(host: &str, port: u16, timeout: Option<Duration>) -> io::Result<TcpStream> {
    let mut last = None;
    for addr in (host, port).to_socket_addrs()? {
        let res = match timeout {
            Some(t) => TcpStream::connect_timeout(&addr, t),
            None => TcpStream::connect(addr),
        };
        match res {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address for host")))
}

/// The destination side: a bound socket, or the file to restore from.
pub struct Listener {
    uri: MigrationUri,
    kind: ListenerKind,
}

enum ListenerKind {
    Tcp(TcpListener),
    /// The socket file's device and inode, to unlink only our own.
    Unix {
        listener: UnixListener,
        path: PathBuf,
        id: (u64, u64),
    },
    File(PathBuf),
}

impl Listener {
    /// Binds `tcp:` (an empty host listens on every address, port 0 picks
    /// one: see [`Self::local_addr`]) or `unix:` (a stale socket file is
    /// replaced, a live one or any other file is an error; the socket is
    /// unlinked on drop). For `file:`, checks the file can be opened.
    pub fn bind(uri: &MigrationUri) -> Result<Self, TransportError> {
        let name = uri.to_string();
        let bind_err = |source| TransportError::Bind {
            uri: name.clone(),
            source,
        };
        let kind = match uri {
            MigrationUri::Tcp { host, port } if host.is_empty() => ListenerKind::Tcp(
                TcpListener::bind(("::", *port))
                    .or_else(|_| TcpListener::bind(("0.0.0.0", *port)))
                    .map_err(bind_err)?,
            ),
            MigrationUri::Tcp { host, port } => {
                ListenerKind::Tcp(TcpListener::bind((host.as_str(), *port)).map_err(bind_err)?)
            }
            MigrationUri::Unix(path) => {
                remove_stale_socket(path, &name)?;
                // Owner only (0600) whatever the umask; peers are checked
                // as they connect (see `accept`).
                let listener = net::unix::bind_private(path).map_err(bind_err)?;
                let md = std::fs::symlink_metadata(path).map_err(bind_err)?;
                ListenerKind::Unix {
                    listener,
                    path: path.clone(),
                    id: (md.dev(), md.ino()),
                }
            }
            MigrationUri::File(path) => {
                File::open(path).map_err(|source| TransportError::Open {
                    uri: name.clone(),
                    source,
                })?;
                ListenerKind::File(path.clone())
            }
        };
        Ok(Self {
            uri: uri.clone(),
            kind,
        })
    }

    /// Waits for the source (`tcp:`, `unix:`), or opens the file for
    /// reading (`file:`; each call opens it afresh).
    pub fn accept(&self) -> Result<Box<dyn Channel>, TransportError> {
        let accept_err = |source| TransportError::Accept {
            uri: self.uri.to_string(),
            source,
        };
        let stream = match &self.kind {
            ListenerKind::Tcp(l) => {
                let (s, _) = l.accept().map_err(accept_err)?;
                s.set_nodelay(true).map_err(accept_err)?;
                Stream::Tcp(s)
            }
            ListenerKind::Unix { listener, .. } => {
                let (s, _) = listener.accept().map_err(accept_err)?;
                let peer = net::unix::peer_cred(&s).map_err(accept_err)?;
                if !peer.is_trusted() {
                    return Err(TransportError::PeerRefused {
                        uri: self.uri.to_string(),
                        uid: peer.uid,
                        pid: peer.pid,
                    });
                }
                Stream::Unix(s)
            }
            ListenerKind::File(path) => {
                Stream::File(File::open(path).map_err(|source| TransportError::Open {
                    uri: self.uri.to_string(),
                    source,
                })?)
            }
        };
        Ok(Box::new(StreamChannel::new(stream)))
    }

    /// Where the listener is, as a URI: with the actual port for `tcp:`.
    pub fn local_uri(&self) -> MigrationUri {
        match &self.kind {
            ListenerKind::Tcp(l) => match l.local_addr() {
                Ok(addr) => MigrationUri::Tcp {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                },
                Err(_) => self.uri.clone(),
            },
            _ => self.uri.clone(),
        }
    }

    /// [`Self::local_uri`] as text.
    pub fn local_addr(&self) -> String {
        self.local_uri().to_string()
    }

    /// The listening socket, to poll for a connection; `None` for `file:`.
    pub fn as_raw_fd(&self) -> Option<RawFd> {
        match &self.kind {
            ListenerKind::Tcp(l) => Some(l.as_raw_fd()),
            ListenerKind::Unix { listener, .. } => Some(listener.as_raw_fd()),
            ListenerKind::File(_) => None,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenerKind::Unix { path, id, .. } = &self.kind {
            let ours = std::fs::symlink_metadata(path)
                .map(|md| (md.dev(), md.ino()) == *id)
                .unwrap_or(false);
            if ours {
                if let Err(e) = std::fs::remove_file(path) {
                    log::warn!("cannot remove {}: {e}", path.display());
                }
            }
        }
    }
}

/// Removes a socket file nobody listens on; refuses a live socket or a
/// file that is not a socket.
fn remove_stale_socket(path: &Path, uri: &str) -> Result<(), TransportError> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(TransportError::Bind {
                uri: uri.to_owned(),
                source,
            })
        }
    };
    if !md.file_type().is_socket() {
        return Err(TransportError::NotASocket {
            uri: uri.to_owned(),
        });
    }
    if socket_is_listening(path) {
        return Err(TransportError::InUse {
            uri: uri.to_owned(),
        });
    }
    log::info!("removing stale socket {}", path.display());
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(TransportError::Bind {
            uri: uri.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Whether a process listens on the unix socket `path`, from
/// /proc/net/unix (a connect probe would land in the live listener's
/// queue as an empty connection and fail its incoming migration).
/// Without /proc, a probe it is.
fn socket_is_listening(path: &Path) -> bool {
    /// `__SO_ACCEPTCON` in the Flags column: a listening socket.
    const ACCEPTCON: u32 = 0x10000;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return UnixStream::connect(path).is_ok();
    };
    let absolute = std::path::absolute(path).ok();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return false;
        }
        let listening = u32::from_str_radix(fields[3], 16).is_ok_and(|f| f & ACCEPTCON != 0);
        let bound = PathBuf::from(fields[7..].join(" "));
        listening && (bound == path || absolute.as_ref() == Some(&bound))
    })
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    File(File),
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
            Self::File(f) => f.as_raw_fd(),
        }
    }

    fn read_into(&mut self, buf: &mut [u8], fds: &mut VecDeque<OwnedFd>) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::File(f) => f.read(buf),
            Self::Unix(s) => {
                let mut got = Vec::new();
                let n = scm::recv_with_fds(s.as_raw_fd(), buf, &mut got)?;
                fds.extend(got);
                Ok(n)
            }
        }
    }

    fn write_from(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            // std sends on TCP sockets with MSG_NOSIGNAL.
            Self::Tcp(s) => s.write(buf),
            Self::File(f) => f.write(buf),
            Self::Unix(s) => scm::send_plain(s.as_raw_fd(), buf),
        }
    }
}

/// A buffered channel over one of the three transports.
pub(crate) struct StreamChannel {
    stream: Stream,
    rbuf: Vec<u8>,
    rpos: usize,
    rlen: usize,
    wbuf: Vec<u8>,
    /// Descriptors received with stream bytes, oldest first.
    fds: VecDeque<OwnedFd>,
}

impl StreamChannel {
    /// A channel over an open file, from its current position.
    pub(crate) fn file(file: File) -> Self {
        Self::new(Stream::File(file))
    }

    fn new(stream: Stream) -> Self {
        Self {
            stream,
            rbuf: Vec::new(),
            rpos: 0,
            rlen: 0,
            wbuf: Vec::new(),
            fds: VecDeque::new(),
        }
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        let mut done = 0;
        let res = loop {
            if done == self.wbuf.len() {
                break Ok(());
            }
            match self.stream.write_from(&self.wbuf[done..]) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.wbuf.drain(..done);
        res
    }
}

impl Read for StreamChannel {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if !self.wbuf.is_empty() {
            self.flush_buf()?;
        }
        if self.rpos == self.rlen {
            if out.len() >= IO_BUFFER_SIZE {
                return self.stream.read_into(out, &mut self.fds);
            }
            if self.rbuf.is_empty() {
                self.rbuf = vec![0; IO_BUFFER_SIZE];
            }
            self.rlen = self.stream.read_into(&mut self.rbuf, &mut self.fds)?;
            self.rpos = 0;
        }
        let n = out.len().min(self.rlen - self.rpos);
        out[..n].copy_from_slice(&self.rbuf[self.rpos..self.rpos + n]);
        self.rpos += n;
        Ok(n)
    }
}

impl Write for StreamChannel {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.wbuf.len() + data.len() > IO_BUFFER_SIZE {
            self.flush_buf()?;
        }
        if data.len() >= IO_BUFFER_SIZE {
            return self.stream.write_from(data);
        }
        if self.wbuf.capacity() == 0 {
            self.wbuf.reserve_exact(IO_BUFFER_SIZE);
        }
        self.wbuf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_buf()?;
        match &mut self.stream {
            Stream::File(f) => f.flush(),
            _ => Ok(()),
        }
    }
}

impl Drop for StreamChannel {
    fn drop(&mut self) {
        if !self.wbuf.is_empty() {
            if let Err(e) = self.flush_buf() {
                log::debug!("migration channel: unsent bytes dropped: {e}");
            }
        }
    }
}

impl Channel for StreamChannel {
    fn peer_name(&self) -> Option<String> {
        match &self.stream {
            Stream::Tcp(s) => s.peer_addr().ok().map(|a| a.to_string()),
            Stream::Unix(s) => net::unix::peer_cred(s)
                .ok()
                .map(|c| format!("pid {} (uid {})", c.pid, c.uid)),
            Stream::File(_) => None,
        }
    }

    fn shutdown(&self) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::File(_) => Ok(()),
        }
    }

    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Stream::File(_) => Ok(()),
        }
    }

    fn as_raw_fd(&self) -> RawFd {
        self.stream.fd()
    }

    fn try_clone_box(&self) -> io::Result<Box<dyn Channel>> {
        let stream = match &self.stream {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::File(f) => Stream::File(f.try_clone()?),
        };
        Ok(Box::new(StreamChannel::new(stream)))
    }

    fn can_pass_fds(&self) -> bool {
        matches!(self.stream, Stream::Unix(_))
    }

    fn send_fds(&mut self, fds: &[RawFd], payload: &[u8]) -> io::Result<()> {
        let Stream::Unix(sock) = &self.stream else {
            return Err(no_fd_passing());
        };
        let sock = sock.as_raw_fd();
        if payload.len() > FD_PAYLOAD_MAX || fds.len() > scm::MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a descriptor message carries at most 253 descriptors and 16 MiB",
            ));
        }
        self.flush_buf()?;
        let mut frame = Vec::with_capacity(12 + payload.len());
        frame.extend_from_slice(&FD_TAG);
        frame.extend_from_slice(&(fds.len() as u32).to_le_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(payload);
        let mut done = scm::send_with_fds(sock, &frame, fds)?;
        while done < frame.len() {
            match scm::send_plain(sock, &frame[done..])? {
                0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                n => done += n,
            }
        }
        Ok(())
    }

    fn recv_fds(&mut self, max: usize) -> io::Result<(Vec<OwnedFd>, Vec<u8>)> {
        if !self.can_pass_fds() {
            return Err(no_fd_passing());
        }
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        let mut header = [0u8; 12];
        self.read_exact(&mut header)?;
        if header[..4] != FD_TAG {
            return Err(bad(format!(
                "expected a descriptor message, found bytes {:02x?}",
                &header[..4]
            )));
        }
        let count = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        // The kernel delivered the descriptors with the frame's first byte.
        if self.fds.len() < count {
            return Err(bad(format!(
                "descriptor message announces {count} descriptors, {} arrived",
                self.fds.len()
            )));
        }
        let fds: Vec<OwnedFd> = self.fds.drain(..count).collect();
        if count > max {
            return Err(bad(format!(
                "descriptor message carries {count} descriptors, at most {max} expected (closed)"
            )));
        }
        if len > FD_PAYLOAD_MAX {
            return Err(bad(format!("descriptor message payload of {len} bytes")));
        }
        let mut payload = vec![0; len];
        self.read_exact(&mut payload)?;
        Ok((fds, payload))
    }
}
