//! Certificates for TLS tests, laid out as QEMU's `tls-creds-x509` wants
//! them: one CA, a server certificate naming the destination (by name and
//! by address), a client certificate for the source. Made with rcgen, so
//! no openssl or certtool is needed on the test machine.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};

/// A CA that signs test certificates.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: String,
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).expect("CA certificate");
        TestCa {
            pem: cert.pem(),
            cert,
            key,
        }
    }

    /// A certificate for `side` naming `names` (DNS names, or IP
    /// addresses), valid now, or expired when `expired`. Its subject is
    /// [`subject`]`(names[0])`.
    pub fn leaf(&self, side: Side, names: &[&str], expired: bool) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        for n in names {
            p.subject_alt_names.push(match n.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().expect("a DNS name")),
            });
        }
        // Country, organization (a comma in it, which the subject's text
        // escapes), then the name: `C=GB,O=Ferry Test\, Ltd,CN=NAME`.
        // (rcgen's default subject holds a CN already: start afresh.)
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CountryName, "GB");
        p.distinguished_name
            .push(DnType::OrganizationName, "Ferry Test, Ltd");
        p.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("client"),
        );
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![match side {
            Side::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Side::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// A `tls-creds-x509` directory at `dir` for `side`: `ca-cert.pem`,
    /// and `server-*.pem` or `client-*.pem`.
    pub fn write_dir(&self, dir: &Path, side: Side, names: &[&str], expired: bool) -> PathBuf {
        std::fs::create_dir_all(dir).expect("creds dir");
        std::fs::write(dir.join("ca-cert.pem"), &self.pem).expect("ca-cert.pem");
        let (cert, key) = self.leaf(side, names, expired);
        let prefix = match side {
            Side::Server => "server",
            Side::Client => "client",
        };
        std::fs::write(dir.join(format!("{prefix}-cert.pem")), cert).expect("cert");
        std::fs::write(dir.join(format!("{prefix}-key.pem")), key).expect("key");
        dir.to_path_buf()
    }

    /// The CA certificate alone (for a client that checks the server but
    /// has no certificate of its own).
    pub fn pem(&self) -> &str {
        &self.pem
    }
}

/// The subject of a [`TestCa::leaf`] named `name`, as `tls-authz` names it.
pub fn subject(name: &str) -> String {
    format!("C=GB,O=Ferry Test\\, Ltd,CN={name}")
}
