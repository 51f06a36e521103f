//! Credentials from a `tls-creds-x509` directory, with QEMU's file names:
//! `ca-cert.pem`, `server-cert.pem` + `server-key.pem` (the destination),
//! `client-cert.pem` + `client-key.pem` (the source).

use super::TlsError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::path::Path;
use std::sync::Arc;

/// The destination's side: its certificate, with `verify-peer` the CA
/// every source's certificate must come from, and with `tls-authz` the
/// one subject it must carry.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    identity: Option<String>,
}

/// The source's side: the CA the destination's certificate must come
/// from (unless `verify-peer` is off), the name it must carry, and the
/// source's own certificate when the directory has one.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl ServerTls {
    pub fn load(dir: &Path, verify_peer: bool) -> Result<Self, TlsError> {
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?;
        let builder = if verify_peer {
            let roots = Arc::new(roots(dir)?);
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(config_err)?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let (chain, key) = identity(dir, "server")?;
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| bad(&dir.join("server-key.pem"), e))?;
        Ok(Self {
            config: Arc::new(config),
            identity: None,
        })
    }

    /// QEMU's `authz-simple`: only a client whose certificate's subject
    /// is `identity` (RFC 4514, as [`super::dn::subject`] writes it) gets
    /// in. Needs `verify-peer` (a client that proves nothing has no name).
    pub fn with_identity(mut self, identity: &str) -> Self {
        self.identity = Some(identity.to_string());
        self
    }

    pub(super) fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    pub(super) fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }
}

impl ClientTls {
    /// `hostname`: what the destination's certificate must name — QEMU's
    /// `tls-hostname`, or the host of the URI (an address matches the
    /// certificate's IP SANs).
    pub fn load(dir: &Path, verify_peer: bool, hostname: &str) -> Result<Self, TlsError> {
        let bare = hostname.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(bare.to_string())
            .map_err(|_| TlsError::BadName(hostname.to_string()))?;
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?;
        let builder = if verify_peer {
            builder.with_root_certificates(roots(dir)?)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        };
        let config = if dir.join("client-cert.pem").exists() {
            let (chain, key) = identity(dir, "client")?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad(&dir.join("client-key.pem"), e))?
        } else {
            builder.with_no_client_auth()
        };
        Ok(Self {
            config: Arc::new(config),
            name,
        })
    }

    pub(super) fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    pub(super) fn server_name(&self) -> ServerName<'static> {
        self.name.clone()
    }
}

/// ring, with AES-128-GCM first: the fastest suite where the CPU has
/// AES-NI, and what the bulk of a migration is encrypted with.
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        use rustls::CipherSuite as C;
        match s.suite() {
            C::TLS13_AES_128_GCM_SHA256 => 0,
            C::TLS13_AES_256_GCM_SHA384 => 1,
            _ => 2,
        }
    });
    Arc::new(p)
}

fn config_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

fn bad(path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::Bad {
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(path, e))?;
    if certs.is_empty() {
        return Err(bad(path, "no certificate in it"));
    }
    Ok(certs)
}

fn roots(dir: &Path) -> Result<RootCertStore, TlsError> {
    let path = dir.join("ca-cert.pem");
    let mut store = RootCertStore::empty();
    for c in certs(&path)? {
        store.add(c).map_err(|e| bad(&path, e))?;
    }
    Ok(store)
}

/// `{side}-cert.pem` and `{side}-key.pem`.
fn identity(
    dir: &Path,
    side: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = certs(&dir.join(format!("{side}-cert.pem")))?;
    let key_path = dir.join(format!("{side}-key.pem"));
    let key = PrivateKeyDer::from_pem_slice(&read(&key_path)?).map_err(|e| bad(&key_path, e))?;
    Ok((chain, key))
}

/// A client with `verify-peer` off, as QEMU allows: any server
/// certificate is taken, but the handshake's signatures still are checked.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
