//! Unix sockets only their owner can reach, for QMP and `unix:` migration:
//! created 0600 whatever the umask, and the peer's credentials checked on
//! every connection.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Who is at the other end of a unix socket (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl PeerCred {
    /// The peer may talk to this process: it runs as the same user, or
    /// as root (who could reach it anyway).
    pub fn is_trusted(&self) -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        self.uid == me || self.uid == 0
    }
}

/// Binds a listening socket at `path` with mode 0600 (further narrowed by
/// the umask, never widened). Linux creates the socket file with the mode
/// of the socket's own inode, masked by the umask, so the mode is set on
/// the socket before `bind`: the file never exists with a wider mode, and
/// the process-wide umask is left alone (other threads may create files).
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path must be shorter than {} bytes, without NUL",
                addr.sun_path.len()
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fchmod on a descriptor we own; no pointers.
    if unsafe { libc::fchmod(sock.as_raw_fd(), 0o600) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: addr is a valid sockaddr_un that outlives the call; len
    // covers the family and the NUL-terminated path within it.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a bound socket we own; no pointers.
    if unsafe { libc::listen(sock.as_raw_fd(), 128) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixListener::from(sock))
}

/// The credentials of the process at the other end of `stream`.
pub fn peer_cred(stream: &UnixStream) -> io::Result<PeerCred> {
    // SAFETY: all-zero is a valid ucred.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_whatever_the_umask_and_the_peer_is_us() {
        let dir = std::env::temp_dir().join(format!("ferry-unix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let _ = std::fs::remove_file(&path);
        // SAFETY: umask has no preconditions (the old mask is restored).
        let old = unsafe { libc::umask(0) };
        let bound = bind_private(&path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let l = bound.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let c = UnixStream::connect(&path).unwrap();
        let (s, _) = l.accept().unwrap();
        let cred = peer_cred(&s).unwrap();
        assert_eq!(cred.pid as u32, std::process::id());
        assert!(cred.is_trusted());
        assert_eq!(peer_cred(&c).unwrap().pid as u32, std::process::id());
        let long = dir.join("x".repeat(120));
        assert!(bind_private(&long).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
