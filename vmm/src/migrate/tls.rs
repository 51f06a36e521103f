//! TLS as QEMU configures it: `migrate-set-parameters {"tls-creds": ID}`
//! names a `tls-creds-x509` object, with a client endpoint on the source
//! and a server endpoint on the destination; `tls-hostname` (or the URI's
//! host) is what the destination's certificate must name; `tls-authz`
//! (an `authz-simple`) the one subject a source's certificate may have.

use super::params::MigrationParameters;
use crate::objects::{Endpoint, Objects, UserObject};
use migration::tls::{ClientTls, ServerTls};
use migration::MigrationUri;
use std::path::PathBuf;

/// The credentials `tls-creds` names, checked for the side that uses them;
/// `None` without `tls-creds`. QEMU's words for a wrong id or endpoint.
fn creds(
    objects: &Objects,
    params: &MigrationParameters,
    want: Endpoint,
) -> Result<Option<(PathBuf, bool)>, String> {
    let id = params.tls_creds.as_str();
    if id.is_empty() {
        return Ok(None);
    }
    match objects.get(id) {
        None => Err(format!("No TLS credentials with id '{id}'")),
        Some(UserObject::TlsCredsX509 {
            dir,
            endpoint,
            verify_peer,
        }) => {
            if *endpoint != want {
                let side = match want {
                    Endpoint::Client => "client",
                    Endpoint::Server => "server",
                };
                return Err(format!("Expected TLS credentials for a {side} endpoint"));
            }
            Ok(Some((dir.clone(), *verify_peer)))
        }
        Some(_) => Err(format!("Object with id '{id}' is not TLS credentials")),
    }
}

/// The source's TLS for a migration to `uri`, loaded.
pub fn client(
    objects: &Objects,
    params: &MigrationParameters,
    uri: &MigrationUri,
) -> Result<Option<ClientTls>, String> {
    let Some((dir, verify_peer)) = creds(objects, params, Endpoint::Client)? else {
        return Ok(None);
    };
    let host = match uri {
        MigrationUri::Tcp { host, .. } => host.clone(),
        // A local socket: the certificate is checked for tls-hostname.
        MigrationUri::Unix(_) => String::new(),
        MigrationUri::File(_) => {
            return Err("TLS protects a connection: a file: migration cannot use tls-creds (clear it for a snapshot)".into())
        }
    };
    let name = if params.tls_hostname.is_empty() {
        host
    } else {
        params.tls_hostname.clone()
    };
    if name.is_empty() {
        return Err(
            "TLS needs the name the destination's certificate carries: set tls-hostname".into(),
        );
    }
    ClientTls::load(&dir, verify_peer, &name)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// The destination's TLS, loaded.
pub fn server(
    objects: &Objects,
    params: &MigrationParameters,
) -> Result<Option<ServerTls>, String> {
    let Some((dir, verify_peer)) = creds(objects, params, Endpoint::Server)? else {
        return Ok(None);
    };
    let identity = identity(objects, params, verify_peer)?;
    let tls = ServerTls::load(&dir, verify_peer).map_err(|e| e.to_string())?;
    Ok(Some(match identity {
        Some(id) => tls.with_identity(&id),
        None => tls,
    }))
}

/// The one client subject `tls-authz` lets in (an `authz-simple`), looked
/// up as each source connects, as QEMU does; QEMU's words when it is
/// missing or of another type. The source's `tls-authz` means nothing,
/// as in QEMU.
fn identity(
    objects: &Objects,
    params: &MigrationParameters,
    verify_peer: bool,
) -> Result<Option<String>, String> {
    let id = params.tls_authz.as_str();
    if id.is_empty() {
        return Ok(None);
    }
    // QEMU checks nothing then; Ferry says so instead of letting in
    // clients the operator meant to keep out.
    if !verify_peer {
        return Err(format!(
            "tls-authz '{id}' needs verify-peer on '{}': a client that shows no certificate has no name to check",
            params.tls_creds
        ));
    }
    match objects.get(id) {
        None => Err(format!("Cannot find QAuthZ object ID {id}")),
        Some(UserObject::AuthzSimple { identity }) => Ok(Some(identity.clone())),
        Some(_) => Err(format!("Object '{id}' is not a QAuthZ subclass")),
    }
}
