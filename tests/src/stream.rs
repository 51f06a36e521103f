//! Reading a migration stream the way docs/migration-stream.md describes
//! it, independently of the `migration` crate: for tests that take a
//! stream apart and put bad ones together.

/// Where one section of a stream is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionAt {
    pub kind: u8,
    pub name: String,
    /// Offset of its kind byte: where its CRC starts.
    pub start: usize,
    pub payload: usize,
    pub len: usize,
}

impl SectionAt {
    /// Offset of its CRC, right after the payload.
    pub fn crc_at(&self) -> usize {
        self.payload + self.len
    }
}

/// Every section after the 16-byte header.
pub fn sections(stream: &[u8]) -> Vec<SectionAt> {
    let mut out = Vec::new();
    let mut at = 16;
    while at < stream.len() {
        let kind = stream[at];
        let name_len = stream[at + 1] as usize;
        let name = String::from_utf8_lossy(&stream[at + 2..at + 2 + name_len]).into_owned();
        let len_at = at + 2 + name_len + 4;
        let mut len = [0u8; 8];
        len.copy_from_slice(&stream[len_at..len_at + 8]);
        let len = u64::from_le_bytes(len) as usize;
        let payload = len_at + 8;
        out.push(SectionAt {
            kind,
            name,
            start: at,
            payload,
            len,
        });
        at = payload + len + 4;
    }
    out
}

/// CRC-32 (IEEE), bit by bit: the tests' own, independent of the crate.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Recomputes the CRC of `section` in `stream` after its bytes changed.
pub fn fix_crc(stream: &mut [u8], section: &SectionAt) {
    let crc = crc32(&stream[section.start..section.crc_at()]);
    stream[section.crc_at()..section.crc_at() + 4].copy_from_slice(&crc.to_le_bytes());
}
