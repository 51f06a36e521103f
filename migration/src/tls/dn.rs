//! A certificate's subject as the string QEMU's `authz-simple` compares
//! with its `identity`: what GnuTLS writes for QEMU 7.2 on Debian 12 —
//! the parts in the certificate's own order (`C=GB,O=Example,CN=client`,
//! not RFC 4514's reversed one), the values of a multi-valued part joined
//! by `+` as they are encoded, RFC 4514's escapes (`\,`), GnuTLS's short
//! names for the attributes (`EMAIL=` among them) and `OID=#hex` for the
//! others. Checked against QEMU's own denial line for one certificate
//! (the test below). Only the DER the subject needs is read; anything
//! malformed is an error, never a guess.

/// Why no name could be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the client certificate's subject cannot be read: {0}")]
pub struct DnError(&'static str);

/// One DER element: its tag and contents, and what follows it.
fn element(der: &[u8]) -> Result<(u8, &[u8], &[u8]), DnError> {
    let (&tag, rest) = der.split_first().ok_or(DnError("truncated"))?;
    let (&first, rest) = rest.split_first().ok_or(DnError("truncated"))?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(DnError("bad length"));
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err(DnError("truncated"));
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

fn expect(der: &[u8], want: u8) -> Result<(&[u8], &[u8]), DnError> {
    let (tag, body, rest) = element(der)?;
    if tag != want {
        return Err(DnError("unexpected element"));
    }
    Ok((body, rest))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// The subject of the DER certificate `cert`.
pub fn subject(cert: &[u8]) -> Result<String, DnError> {
    let (certificate, _) = expect(cert, SEQUENCE)?;
    let (mut tbs, _) = expect(certificate, SEQUENCE)?;
    // [0] version, when present.
    if tbs.first() == Some(&0xa0) {
        tbs = element(tbs)?.2;
    }
    // serialNumber, signature, issuer, validity: skipped.
    for _ in 0..4 {
        tbs = element(tbs)?.2;
    }
    let (name, _) = expect(tbs, SEQUENCE)?;
    name_string(name)
}

fn name_string(mut name: &[u8]) -> Result<String, DnError> {
    let mut rdns = Vec::new();
    while !name.is_empty() {
        let (mut set, rest) = expect(name, SET)?;
        name = rest;
        let mut parts = Vec::new();
        while !set.is_empty() {
            let (atv, rest) = expect(set, SEQUENCE)?;
            set = rest;
            let (oid, value) = expect(atv, OID)?;
            let (tag, value, _) = element(value)?;
            parts.push(format!("{}={}", attribute(oid), value_string(tag, value)?));
        }
        rdns.push(parts.join("+"));
    }
    Ok(rdns.join(","))
}

/// GnuTLS's short name for an attribute, else its dotted OID.
fn attribute(oid: &[u8]) -> String {
    const NAMES: &[(&[u8], &str)] = &[
        (&[0x55, 0x04, 0x03], "CN"),
        (&[0x55, 0x04, 0x04], "SN"),
        (&[0x55, 0x04, 0x05], "serialNumber"),
        (&[0x55, 0x04, 0x06], "C"),
        (&[0x55, 0x04, 0x07], "L"),
        (&[0x55, 0x04, 0x08], "ST"),
        (&[0x55, 0x04, 0x09], "STREET"),
        (&[0x55, 0x04, 0x0a], "O"),
        (&[0x55, 0x04, 0x0b], "OU"),
        (&[0x55, 0x04, 0x0c], "title"),
        (&[0x55, 0x04, 0x2a], "GN"),
        (
            &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01],
            "EMAIL",
        ),
        (
            &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19],
            "DC",
        ),
        (
            &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01],
            "UID",
        ),
    ];
    if let Some((_, name)) = NAMES.iter().find(|(o, _)| *o == oid) {
        return (*name).to_string();
    }
    dotted(oid)
}

fn dotted(oid: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut acc: u64 = 0;
    for &b in oid {
        acc = (acc << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (acc / 40).min(2);
                arcs.push(first);
                arcs.push(acc - first * 40);
            } else {
                arcs.push(acc);
            }
            acc = 0;
        }
    }
    arcs.iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(".")
}

/// A value as text, escaped as RFC 4514 says; one that is no string
/// type is `#` and its DER in hex.
fn value_string(tag: u8, value: &[u8]) -> Result<String, DnError> {
    let text = match tag {
        // UTF8String, PrintableString, T61String, IA5String, VisibleString.
        0x0c | 0x13 | 0x14 | 0x16 | 0x1a => std::str::from_utf8(value)
            .map(str::to_string)
            .map_err(|_| DnError("a name that is not UTF-8"))?,
        // BMPString: UTF-16, big-endian.
        0x1e => {
            if !value.len().is_multiple_of(2) {
                return Err(DnError("an odd BMPString"));
            }
            let units: Vec<u16> = value
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).map_err(|_| DnError("a bad BMPString"))?
        }
        _ => {
            let mut hex = format!("#{tag:02x}{:02x}", value.len());
            for b in value {
                hex.push_str(&format!("{b:02x}"));
            }
            return Ok(hex);
        }
    };
    Ok(escape(&text))
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let last = text.chars().count().saturating_sub(1);
    for (i, c) in text.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oids_and_escapes() {
        assert_eq!(attribute(&[0x55, 0x04, 0x03]), "CN");
        assert_eq!(
            attribute(&[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37]),
            "1.3.6.1.4.1.311"
        );
        assert_eq!(escape("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape(" lead#"), "\\ lead#");
        assert_eq!(escape("#x "), "\\#x\\ ");
        assert_eq!(value_string(0x02, &[1]).unwrap(), "#020101");
    }

    /// A certificate made by openssl with
    /// `-subj "/C=GB/ST=London/L=London/O=Ferry Test, Ltd/OU=ops+UID=u1/CN=source/emailAddress=ops@example.com"`;
    /// the name is the one qemu-system-x86_64 7.2 (GnuTLS 3.7.9) printed
    /// when its `authz-simple` denied that certificate.
    #[test]
    fn the_subject_as_qemu_writes_it() {
        use rustls::pki_types::pem::PemObject;
        let pem = include_bytes!("testdata/gnutls-subject.pem");
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem).unwrap();
        assert_eq!(
            subject(&der).unwrap(),
            "C=GB,ST=London,L=London,O=Ferry Test\\, Ltd,OU=ops+UID=u1,CN=source,EMAIL=ops@example.com"
        );
    }

    #[test]
    fn malformed_is_an_error() {
        for der in [
            &[][..],
            &[0x30],
            &[0x30, 0x05, 0x30],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
        ] {
            assert!(subject(der).is_err(), "{der:?}");
        }
    }
}
