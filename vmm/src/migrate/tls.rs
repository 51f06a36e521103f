//! TLS as QEMU configures it: `migrate-set-parameters {"tls-creds": ID}`
//! names a `tls-creds-x509` object, with a client endpoint on the source
//! and a server endpoint on the destination; `tls-hostname` (or the URI's
//! host) is what the destination's certificate must name.

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
            if !params.tls_authz.is_empty() {
                return Err(format!(
                    "tls-authz '{}': checking the client's name against an authz object is not supported by Ferry; with verify-peer every client the CA signed is taken",
                    params.tls_authz
                ));
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
    ServerTls::load(&dir, verify_peer)
        .map(Some)
        .map_err(|e| e.to_string())
}
