//! `--qmp` socket specs and the listening socket they name.

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::error::QmpSetupError;

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Where the QMP server listens: `unix:PATH`.
///
/// Accepted spellings: `unix:PATH`, and QEMU's `-qmp` forms with options
/// after the path: `server`, `server=on`, `wait=off`, `nowait` in any
/// order (`unix:/run/vm.qmp,server=on,wait=off`). Ferry's socket is always
/// the listening side and never waits for a client before the VM starts,
/// so `server=off` and `wait=on` are refused rather than ignored. As in
/// QEMU, a comma in the path is written `,,`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpSocketSpec {
    pub path: PathBuf,
}

/// Why a `--qmp` value was refused; each names the offending part.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SocketSpecError {
    #[error("{0:?}: expected unix:PATH (optionally followed by ,server=on,wait=off)")]
    NotUnix(String),
    #[error("{0:?}: the socket path after unix: is empty")]
    EmptyPath(String),
    #[error(
        "{spec:?}: the socket path is {len} bytes; a unix socket path is at most {MAX_SOCKET_PATH}"
    )]
    PathTooLong { spec: String, len: usize },
    #[error("{spec:?}: option {option:?} {why}")]
    BadOption {
        spec: String,
        option: String,
        why: &'static str,
    },
}

/// QEMU's spellings of on and off.
fn parse_switch(value: &str) -> Option<bool> {
    match value {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// Splits QEMU option syntax on `,`, where `,,` is a literal comma.
fn split_options(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' && chars.peek() != Some(&',') {
            parts.push(String::new());
            continue;
        }
        if c == ',' {
            chars.next();
        }
        if let Some(p) = parts.last_mut() {
            p.push(c);
        }
    }
    parts
}

impl FromStr for QmpSocketSpec {
    type Err = SocketSpecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let Some(rest) = spec.strip_prefix("unix:") else {
            return Err(SocketSpecError::NotUnix(spec.to_string()));
        };
        let mut parts = split_options(rest).into_iter();
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(SocketSpecError::EmptyPath(spec.to_string()));
        }
        if path.len() > MAX_SOCKET_PATH {
            return Err(SocketSpecError::PathTooLong {
                spec: spec.to_string(),
                len: path.len(),
            });
        }
        let bad = |option: &str, why: &'static str| SocketSpecError::BadOption {
            spec: spec.to_string(),
            option: option.to_string(),
            why,
        };
        for option in parts {
            let (key, value) = match option.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (option.as_str(), None),
            };
            match (key, value.map(parse_switch)) {
                ("server", None | Some(Some(true))) => {}
                ("server", Some(Some(false))) => {
                    return Err(bad(
                        &option,
                        "is not supported: Ferry's QMP socket is always the listening side",
                    ))
                }
                ("wait", Some(Some(false))) | ("nowait", None) => {}
                ("wait", None | Some(Some(true))) => {
                    return Err(bad(
                        &option,
                        "is not supported: Ferry never waits for a QMP client before running \
                         the guest (start it paused with -S instead)",
                    ))
                }
                ("server" | "wait", Some(None)) => {
                    return Err(bad(&option, "needs on or off"));
                }
                _ => {
                    return Err(bad(
                        &option,
                        "is not known (accepted: server, server=on, wait=off, nowait)",
                    ))
                }
            }
        }
        Ok(Self {
            path: PathBuf::from(path),
        })
    }
}

impl fmt::Display for QmpSocketSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.to_string_lossy().replace(',', ",,");
        write!(f, "unix:{path}")
    }
}

/// The bound, listening QMP socket. Binding replaces a stale socket file
/// (one nobody listens on any more, left by a process that was killed)
/// but never a live one or a file that is not a socket. The file is
/// removed when this is dropped, unless something else has replaced it
/// in the meantime.
#[derive(Debug)]
pub struct QmpListener {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file this process created.
    identity: Option<(u64, u64)>,
}

impl QmpListener {
    pub fn bind(spec: &QmpSocketSpec) -> Result<Self, QmpSetupError> {
        let path = spec.path.clone();
        let bind_err = |source: io::Error| QmpSetupError::Bind {
            path: spec.path.clone(),
            source,
        };
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(&path) {
                Ok(_) => return Err(QmpSetupError::InUse { path }),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    log::info!("qmp: removing stale socket {}", path.display());
                    fs::remove_file(&path).map_err(bind_err)?;
                }
                Err(e) => return Err(bind_err(e)),
            },
            Ok(_) => return Err(QmpSetupError::NotASocket { path }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        // Listen under a private name and rename into place, so the path
        // appears only once connections are accepted: a client that waits
        // for the file and then connects never meets ECONNREFUSED.
        let mut staging = path.clone().into_os_string();
        staging.push(format!(".{}.tmp", std::process::id()));
        let staging = std::path::PathBuf::from(staging);
        let _ = fs::remove_file(&staging);
        // Owner only (0600) from the moment it exists, whatever the umask.
        let listener = net::unix::bind_private(&staging).map_err(bind_err)?;
        if let Err(e) = fs::rename(&staging, &path) {
            let _ = fs::remove_file(&staging);
            return Err(bind_err(e));
        }
        listener.set_nonblocking(true).map_err(bind_err)?;
        let identity = fs::symlink_metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        Ok(Self {
            listener,
            path,
            identity,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn accept(&self) -> io::Result<UnixStream> {
        self.listener.accept().map(|(stream, _)| stream)
    }
}

impl AsRawFd for QmpListener {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for QmpListener {
    fn drop(&mut self) {
        let still_ours = fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()))
            .is_some_and(|id| Some(id) == self.identity);
        if still_ours {
            if let Err(e) = fs::remove_file(&self.path) {
                log::debug!("qmp: removing {}: {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path_of(s: &str) -> PathBuf {
        s.parse::<QmpSocketSpec>().unwrap().path
    }

    fn err(s: &str) -> String {
        s.parse::<QmpSocketSpec>().unwrap_err().to_string()
    }

    #[test]
    fn accepted_spellings() {
        for s in [
            "unix:/tmp/q.sock",
            "unix:/tmp/q.sock,server",
            "unix:/tmp/q.sock,server=on",
            "unix:/tmp/q.sock,server=on,wait=off",
            "unix:/tmp/q.sock,wait=off,server=on",
            "unix:/tmp/q.sock,server,nowait",
            "unix:/tmp/q.sock,nowait",
            "unix:/tmp/q.sock,server=yes,wait=no",
        ] {
            assert_eq!(path_of(s), PathBuf::from("/tmp/q.sock"), "{s}");
        }
        assert_eq!(path_of("unix:rel/q"), PathBuf::from("rel/q"));
        assert_eq!(path_of("unix:/tmp/a,,b,server"), PathBuf::from("/tmp/a,b"));
    }

    #[test]
    fn refusals_name_the_problem() {
        assert!(err("/tmp/q.sock").contains("expected unix:PATH"));
        assert!(err("tcp:localhost:4444").contains("expected unix:PATH"));
        assert!(err("unix:").contains("path after unix: is empty"));
        assert!(err("unix:,server").contains("empty"));
        let e = err("unix:/tmp/q,server=off");
        assert!(
            e.contains("\"server=off\"") && e.contains("listening side"),
            "{e}"
        );
        let e = err("unix:/tmp/q,server=on,wait=on");
        assert!(e.contains("\"wait=on\"") && e.contains("-S"), "{e}");
        assert!(err("unix:/tmp/q,server,wait").contains("\"wait\""));
        assert!(err("unix:/tmp/q,server=maybe").contains("needs on or off"));
        let e = err("unix:/tmp/q,nodelay");
        assert!(e.contains("\"nodelay\"") && e.contains("not known"), "{e}");
        assert!(err("unix:/tmp/q,").contains("not known"));
        let long = format!("unix:/{}", "x".repeat(200));
        assert!(err(&long).contains("at most 107"));
    }

    #[test]
    fn display_round_trips() {
        let spec: QmpSocketSpec = "unix:/tmp/a,,b,server=on,wait=off".parse().unwrap();
        assert_eq!(spec.to_string(), "unix:/tmp/a,,b");
        assert_eq!(spec.to_string().parse::<QmpSocketSpec>().unwrap(), spec);
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-qmp-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn bind_replaces_stale_refuses_live_and_unlinks() {
        let dir = temp_dir("bind");
        let spec = QmpSocketSpec {
            path: dir.join("q.sock"),
        };
        // A stale socket: bound, then its listener dropped without unlink.
        drop(std::os::unix::net::UnixListener::bind(&spec.path).unwrap());
        assert!(spec.path.exists());
        let live = QmpListener::bind(&spec).unwrap();
        assert!(matches!(
            QmpListener::bind(&spec),
            Err(QmpSetupError::InUse { .. })
        ));
        drop(live);
        assert!(!spec.path.exists(), "socket file removed on drop");

        fs::write(&spec.path, b"precious").unwrap();
        assert!(matches!(
            QmpListener::bind(&spec),
            Err(QmpSetupError::NotASocket { .. })
        ));
        assert_eq!(fs::read(&spec.path).unwrap(), b"precious");
        fs::remove_file(&spec.path).unwrap();

        // A file put in its place after binding is not ours to remove.
        let l = QmpListener::bind(&spec).unwrap();
        fs::remove_file(&spec.path).unwrap();
        fs::write(&spec.path, b"other").unwrap();
        drop(l);
        assert!(spec.path.exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
