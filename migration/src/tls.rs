//! TLS for migration connections, as QEMU's `tls-creds-x509` sets it up:
//! a directory of PEM files with QEMU's names, a server (the destination)
//! and a client (the source), each optionally checking the other.
//!
//! [`accept`] and [`connect`] turn a connected plaintext [`Channel`] into
//! an encrypted one after a handshake bounded by a deadline. The channel
//! can be cloned ([`Channel::try_clone_box`]) and used from two threads at
//! once — one reading the stream, one answering on it — as the plaintext
//! one is: the TLS session is shared under a lock that is never held
//! while waiting for the socket.

mod channel;
mod creds;
pub mod dn;

pub use creds::{ClientTls, ServerTls};

use crate::Channel;
use channel::{handshake, TlsChannel};
use std::time::{Duration, Instant};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS credentials: cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("TLS credentials: {path}: {why}")]
    Bad { path: String, why: String },
    #[error("TLS: {0:?} is not a hostname or address a certificate can name")]
    BadName(String),
    #[error("TLS: {0}")]
    Config(String),
    #[error("TLS handshake with {peer} failed: {why}")]
    Handshake { peer: String, why: String },
    #[error("TLS handshake with {peer}: no answer within {ms} ms")]
    Timeout { peer: String, ms: u128 },
    #[error("TLS: {0} cannot carry TLS")]
    NotASocket(String),
    // QEMU's words.
    #[error("TLS x509 authz check for {0} is denied")]
    Denied(String),
    #[error("TLS: {peer} sent no certificate, and tls-authz needs its name")]
    NoPeerName { peer: String },
    #[error(transparent)]
    Name(#[from] dn::DnError),
}

/// The server side of the handshake on `channel` (the destination), at
/// most `deadline` long. `peer` names the other end in errors.
pub fn accept(
    channel: Box<dyn Channel>,
    tls: &ServerTls,
    deadline: Duration,
    peer: &str,
) -> Result<Box<dyn Channel>, TlsError> {
    let conn =
        rustls::ServerConnection::new(tls.config()).map_err(|e| TlsError::Config(e.to_string()))?;
    let (channel, cert) = finish(channel, conn.into(), deadline, peer)?;
    if let Some(identity) = tls.identity() {
        let cert = cert.ok_or_else(|| TlsError::NoPeerName {
            peer: peer.to_string(),
        })?;
        let name = dn::subject(&cert)?;
        if name != identity {
            return Err(TlsError::Denied(name));
        }
    }
    Ok(channel)
}

/// The client side of the handshake on `channel` (the source).
pub fn connect(
    channel: Box<dyn Channel>,
    tls: &ClientTls,
    deadline: Duration,
    peer: &str,
) -> Result<Box<dyn Channel>, TlsError> {
    let conn = rustls::ClientConnection::new(tls.config(), tls.server_name())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    finish(channel, conn.into(), deadline, peer).map(|(c, _)| c)
}

/// The encrypted channel, and the peer's certificate (DER) if it sent one.
type Finished = (Box<dyn Channel>, Option<Vec<u8>>);

fn finish(
    channel: Box<dyn Channel>,
    conn: rustls::Connection,
    deadline: Duration,
    peer: &str,
) -> Result<Finished, TlsError> {
    let tls =
        TlsChannel::new(&*channel, conn).map_err(|_| TlsError::NotASocket(peer.to_string()))?;
    // The plaintext channel has read nothing yet: its descriptor is the
    // TLS channel's own (a duplicate) from here on.
    drop(channel);
    handshake(&tls, Instant::now() + deadline).map_err(|e| match e {
        channel::HandshakeError::Timeout => TlsError::Timeout {
            peer: peer.to_string(),
            ms: deadline.as_millis(),
        },
        channel::HandshakeError::Failed(why) => TlsError::Handshake {
            peer: peer.to_string(),
            why,
        },
    })?;
    let cert = tls.peer_certificate();
    Ok((Box::new(tls), cert))
}
