//! Everything that can go wrong reading or writing a stream. Each variant
//! says what and where (the byte offset in the stream, and the section),
//! and displays as one line.

use crate::{RunDefect, SavedStateError, SectionKind};
use std::io;

/// An error of the migration stream. Offsets are bytes from the start of
/// the stream (the `F` of the magic is byte 0); a section's offset is the
/// offset of its kind byte.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The first eight bytes are not `FERRYMIG`.
    #[error("migration stream: bad magic {} at byte 0 (expected \"FERRYMIG\"; not a Ferry migration stream)", escape(.found))]
    BadMagic { found: [u8; 8] },

    /// The header's format version is not one this build reads.
    #[error("migration stream: unsupported format version {found} at byte 8 (this Ferry reads version {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },

    /// The header's flags word has bits this build does not know.
    #[error("migration stream: unsupported header flags {found:#010x} at byte 12 (expected 0)")]
    UnsupportedFlags { found: u32 },

    /// The stream ended in the middle of something.
    #[error("migration stream: truncated at byte {offset} (inside the {what})")]
    Truncated { offset: u64, what: &'static str },

    /// A section's CRC-32 does not match its bytes.
    #[error("migration stream: checksum mismatch in section {section} at byte {offset} (stored {expected:#010x}, computed {found:#010x})")]
    ChecksumMismatch {
        section: String,
        offset: u64,
        expected: u32,
        found: u32,
    },

    /// A section claims a payload longer than its kind allows.
    #[error("migration stream: section {section} ({kind}) at byte {offset} claims {len} bytes of payload, more than the {max} allowed")]
    TooLarge {
        section: String,
        kind: SectionKind,
        len: u64,
        max: u64,
        offset: u64,
    },

    /// A pass or end section whose payload is not exactly its length.
    #[error("migration stream: section {section} ({kind}) at byte {offset} has a {len}-byte payload, expected exactly {expected}")]
    BadLength {
        section: String,
        kind: SectionKind,
        len: u64,
        expected: u64,
        offset: u64,
    },

    /// A kind byte this build does not know.
    #[error(
        "migration stream: unknown section kind {kind:#04x} (section {name}) at byte {offset}"
    )]
    UnknownKind { kind: u8, name: String, offset: u64 },

    /// A section name that is empty, too long or not UTF-8.
    #[error("migration stream: bad section name {name} at byte {offset}: {why}")]
    BadName {
        name: String,
        offset: u64,
        why: &'static str,
    },

    /// A section whose version the reader (or device) does not support.
    #[error("migration stream: section {section} at byte {offset} has version {found}, this Ferry reads versions 1 to {supported}")]
    SectionVersion {
        section: String,
        offset: u64,
        found: u32,
        supported: u32,
    },

    /// A malformed RAM run. `offset` is the offset of the run.
    #[error("migration stream: bad RAM run in section {section} at byte {offset}: {defect}")]
    BadRam {
        section: String,
        offset: u64,
        #[source]
        defect: RunDefect,
    },

    /// The end section's counts disagree with what was read.
    #[error("migration stream: bad end section at byte {offset}: it counts {claims} {what} before it, the stream had {had}")]
    BadEnd {
        offset: u64,
        what: &'static str,
        claims: u64,
        had: u64,
    },

    /// A JSON section that does not decode.
    #[error("migration stream: section {section} at byte {offset} does not decode: {source}")]
    BadJson {
        section: String,
        offset: u64,
        #[source]
        source: serde_json::Error,
    },

    /// A device could not save its state, or refused the state a section
    /// carried.
    #[error("migration stream: section {section} at byte {offset}: {source}")]
    DeviceState {
        section: String,
        offset: u64,
        #[source]
        source: SavedStateError,
    },

    /// A section given to a device that is not its own.
    #[error("migration stream: section {section} at byte {offset} is not {expected}")]
    WrongSection {
        section: String,
        offset: u64,
        expected: String,
    },

    /// [`crate::StreamReader::next_section`] called after the end section.
    #[error("migration stream: read past the end section (byte {offset})")]
    AfterEnd { offset: u64 },

    /// The writer was asked for a RAM run it must not write.
    #[error("migration stream: invalid RAM run at gpa {gpa:#x} ({pages} pages): {why}")]
    InvalidRun {
        gpa: u64,
        pages: u64,
        why: &'static str,
    },

    /// A value that does not serialize to JSON.
    #[error("migration stream: cannot encode section {section} at byte {offset}: {source}")]
    Encode {
        section: String,
        offset: u64,
        #[source]
        source: serde_json::Error,
    },

    /// The callback filling RAM pages failed.
    #[error("migration stream: reading guest pages at gpa {gpa:#x} failed: {source}")]
    Fill { gpa: u64, source: io::Error },

    /// The writer used in a way the format does not allow.
    #[error("migration stream: {what} (at byte {offset})")]
    Misuse { what: &'static str, offset: u64 },

    /// The transport failed.
    #[error("migration stream: I/O error at byte {offset}: {source}")]
    Io { offset: u64, source: io::Error },
}

impl StreamError {
    /// The underlying I/O error, if this is a transport failure.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Self::Io { source, .. } | Self::Fill { source, .. } => Some(source),
            _ => None,
        }
    }

    /// Whether the stream ended early (file cut short, peer closed).
    pub fn is_truncated(&self) -> bool {
        matches!(self, Self::Truncated { .. })
    }
}

/// Bytes from the stream, printable on one line.
pub(crate) fn escape(bytes: &[u8]) -> String {
    let mut out = String::from("\"");
    for &b in bytes {
        out.extend(std::ascii::escape_default(b).map(char::from));
    }
    out.push('"');
    out
}

/// A section name from the stream, printable on one line: UTF-8 as is
/// when it has no control characters, escaped bytes otherwise.
pub(crate) fn display_name(name: &[u8]) -> String {
    match std::str::from_utf8(name) {
        Ok(s) if !s.chars().any(char::is_control) && !s.is_empty() => s.to_owned(),
        _ => escape(name),
    }
}
