//! Migration URIs in QEMU's syntax: `tcp:HOST:PORT` (`tcp:[::1]:4444`
//! for IPv6, `tcp::4444` to listen on every address), `unix:PATH`,
//! `file:PATH`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where a migration stream goes to or comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MigrationUri {
    /// TCP. `host` is a name or address without brackets; empty means
    /// every address (listening only).
    Tcp { host: String, port: u16 },
    /// A unix stream socket (the only transport that can pass file
    /// descriptors).
    Unix(PathBuf),
    /// A file: snapshot (write) or restore (read).
    File(PathBuf),
}

/// A migration URI that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("empty migration URI (expected tcp:HOST:PORT, unix:PATH or file:PATH)")]
    Empty,
    #[error(
        "unknown migration transport in '{uri}' (expected tcp:HOST:PORT, unix:PATH or file:PATH)"
    )]
    UnknownTransport { uri: String },
    #[error("migration URI '{uri}' has no port (expected tcp:HOST:PORT)")]
    MissingPort { uri: String },
    #[error("migration URI '{uri}': bad port '{port}' (expected 0 to 65535)")]
    BadPort { uri: String, port: String },
    #[error("migration URI '{uri}': bad host ({why})")]
    BadHost { uri: String, why: &'static str },
    #[error("migration URI '{uri}' has an empty path")]
    EmptyPath { uri: String },
}

impl FromStr for MigrationUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<Self, UriError> {
        if uri.is_empty() {
            return Err(UriError::Empty);
        }
        let owned = || uri.to_owned();
        let Some((scheme, rest)) = uri.split_once(':') else {
            return Err(UriError::UnknownTransport { uri: owned() });
        };
        match scheme {
            "tcp" => parse_tcp(uri, rest),
            "unix" | "file" => {
                if rest.is_empty() {
                    return Err(UriError::EmptyPath { uri: owned() });
                }
                let path = PathBuf::from(rest);
                Ok(if scheme == "unix" {
                    Self::Unix(path)
                } else {
                    Self::File(path)
                })
            }
            _ => Err(UriError::UnknownTransport { uri: owned() }),
        }
    }
}

fn parse_tcp(uri: &str, rest: &str) -> Result<MigrationUri, UriError> {
    let bad_host = |why| UriError::BadHost {
        uri: uri.to_owned(),
        why,
    };
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err(bad_host("'[' without ']'"));
        };
        if host.is_empty() {
            return Err(bad_host("empty address in brackets"));
        }
        if !host.contains(':') {
            return Err(bad_host("brackets are for IPv6 addresses"));
        }
        let Some(port) = after.strip_prefix(':') else {
            return Err(UriError::MissingPort {
                uri: uri.to_owned(),
            });
        };
        (host, port)
    } else {
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Err(UriError::MissingPort {
                uri: uri.to_owned(),
            });
        };
        if host.contains(':') {
            return Err(bad_host(
                "an IPv6 address goes in brackets, e.g. tcp:[::1]:4444",
            ));
        }
        (host, port)
    };
    if host.contains(|c: char| c.is_whitespace() || c == '[' || c == ']' || c == '/') {
        return Err(bad_host("unexpected character"));
    }
    if port.is_empty() {
        return Err(UriError::MissingPort {
            uri: uri.to_owned(),
        });
    }
    let port = match port.parse::<u16>() {
        Ok(p) if port.bytes().all(|b| b.is_ascii_digit()) => p,
        _ => {
            return Err(UriError::BadPort {
                uri: uri.to_owned(),
                port: port.to_owned(),
            })
        }
    };
    Ok(MigrationUri::Tcp {
        host: host.to_owned(),
        port,
    })
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

impl MigrationUri {
    /// The transport's name: `tcp`, `unix` or `file`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Self::Tcp { .. } => "tcp",
            Self::Unix(_) => "unix",
            Self::File(_) => "file",
        }
    }

    /// Whether file descriptors can travel over this transport.
    pub fn can_pass_fds(&self) -> bool {
        matches!(self, Self::Unix(_))
    }
}
