//! File descriptors over unix stream sockets (SCM_RIGHTS).
//!
//! The kernel attaches the descriptors of a `sendmsg` to the first byte
//! it sends and hands them to whichever `recvmsg` first reads that byte
//! (a plain `read` would close them). So every read of a unix channel
//! goes through [`recv_with_fds`], which keeps what arrives.
//!
//! Ferry's own rather than vmm-sys-util's `ScmSocket`: that one receives
//! without `MSG_CMSG_CLOEXEC` (a received TAP or memfd would leak into
//! any program the VMM starts), hands back raw descriptors for the caller
//! to wrap (here: `OwnedFd`, closed on every error path), and needs the
//! number of descriptors up front, where a channel read takes whatever
//! comes with the byte it reads.

use std::io;
use std::mem;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Most descriptors one message may carry (the kernel's SCM_MAX_FD).
pub const MAX_FDS: usize = 253;

/// Control buffer for `MAX_FDS` descriptors, aligned for `cmsghdr`.
struct ControlBuf([u64; (MAX_FDS * 4 + 64) / 8]);

impl ControlBuf {
    fn new() -> Self {
        Self([0; (MAX_FDS * 4 + 64) / 8])
    }
}

/// Sends `data` (non-empty) with `fds` attached to its first byte, on the
/// unix socket `sock`. Returns how much of `data` went out; the caller
/// sends the rest with plain writes. Never raises SIGPIPE.
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    if data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors travel with at least one byte of data",
        ));
    }
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_FDS} descriptors per message"),
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control = ControlBuf::new();
    // SAFETY: msghdr is plain old data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` bytes (at most
        // size_of::<ControlBuf>(), MAX_FDS checked above), aligned for
        // cmsghdr; CMSG_FIRSTHDR returns its start, which is non-null
        // because msg_controllen >= sizeof(cmsghdr).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload as usize,
            );
        }
    }
    loop {
        // SAFETY: msg points at a live iovec over `data` and a control
        // buffer that outlive the call; sendmsg only reads them.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Sends `data` on socket `sock` without SIGPIPE. Returns bytes sent.
pub fn send_plain(sock: RawFd, data: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: data is a valid readable buffer of data.len() bytes.
        let n = unsafe { libc::send(sock, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives into `buf` from the unix socket `sock`; descriptors that
/// arrive with the bytes are appended to `fds` (close-on-exec). Returns
/// the number of bytes (0 at end of stream). Descriptors the kernel had
/// to drop (control buffer too small) are an error.
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = ControlBuf::new();
    // SAFETY: msghdr is plain old data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of::<ControlBuf>() as _;
    let n = loop {
        // SAFETY: msg points at a live iovec over `buf` and a control
        // buffer, both writable and sized as declared, outliving the call.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of
    // well-formed cmsghdrs; CMSG_FIRSTHDR/NXTHDR stay within them.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: cmsg is non-null and points at a complete cmsghdr inside
        // the control buffer (see above).
        let (level, kind, len) =
            unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) only computes a size.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            // cmsg_len is size_t on glibc, u32 on musl.
            #[allow(clippy::unnecessary_cast)]
            let count = (len as usize).saturating_sub(header) / mem::size_of::<RawFd>();
            // SAFETY: CMSG_DATA points at `count` RawFds inside this cmsg
            // (len covers them); read unaligned as the data may not be.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: i < count, within the cmsg data (see above).
                let fd = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel just installed fd in our table for us
                // alone; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: msg and cmsg are valid as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "file descriptors were dropped by the kernel (control buffer too small)",
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn passes_a_real_fd_over_a_socketpair() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let path = std::env::temp_dir().join(format!("ferry-scm-{}", std::process::id()));
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("temp file");
        std::fs::remove_file(&path).expect("unlink");
        file.write_all(b"hello").expect("write");

        let sent = send_with_fds(a.as_raw_fd(), b"fd!", &[file.as_raw_fd()]).expect("send");
        assert_eq!(sent, 3);
        drop(file);

        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let n = recv_with_fds(b.as_raw_fd(), &mut buf, &mut fds).expect("recv");
        assert_eq!(&buf[..n], b"fd!");
        assert_eq!(fds.len(), 1);
        // The received descriptor is the same open file: same contents,
        // and a write through it is visible.
        let mut received = File::from(fds.pop().expect("one fd"));
        received.seek(SeekFrom::Start(0)).expect("seek");
        let mut text = String::new();
        received.read_to_string(&mut text).expect("read");
        assert_eq!(text, "hello");
        // SAFETY: fcntl F_GETFD on a descriptor we own.
        let flags = unsafe { libc::fcntl(received.as_raw_fd(), libc::F_GETFD) };
        assert!(
            flags & libc::FD_CLOEXEC != 0,
            "received fd is close-on-exec"
        );
    }

    #[test]
    fn no_fds_and_limits() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        assert!(send_with_fds(a.as_raw_fd(), b"", &[]).is_err());
        let too_many = vec![a.as_raw_fd(); MAX_FDS + 1];
        assert!(send_with_fds(a.as_raw_fd(), b"x", &too_many).is_err());
        send_plain(a.as_raw_fd(), b"plain").expect("send");
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let n = recv_with_fds(b.as_raw_fd(), &mut buf, &mut fds).expect("recv");
        assert_eq!(&buf[..n], b"plain");
        assert!(fds.is_empty());
        drop(a);
        assert_eq!(
            recv_with_fds(b.as_raw_fd(), &mut buf, &mut fds).expect("eof"),
            0
        );
    }
}
