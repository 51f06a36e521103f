//! The migration stream and its transports.
//!
//! One versioned, self-describing byte stream serves live migration,
//! snapshot and restore: a 16-byte header, then sections (configuration,
//! RAM runs, vCPU and VM state, one section per device, RAM pass markers),
//! each with its own CRC-32, and an end section that counts what came
//! before it. `docs/migration-stream.md` describes it byte by byte.
//!
//! - [`StreamWriter`] / [`StreamReader`]: framing, limits, checksums.
//! - [`RamSectionWriter`] / [`RamRuns`]: guest pages as runs of zero or
//!   data pages.
//! - [`MigrationUri`], [`connect`], [`Listener`], [`Channel`]: the
//!   `tcp:`, `unix:` and `file:` transports, buffered, with file
//!   descriptor passing on `unix:` ([`Channel::send_fds`]).
//! - [`tls`]: TLS on a connected channel, with QEMU's credential files.
//! - [`SavedState`]: what a device implements to travel in the stream.

mod error;
pub mod persist;
mod ram;
mod reader;
pub mod scm;
pub mod snapshot;
mod throttle;
pub mod tls;
mod transport;
mod uri;
mod writer;

#[cfg(test)]
mod tests;

pub use error::StreamError;
pub use persist::{SavedState, SavedStateError};
pub use ram::{OutsideMemory, RamRun, RamRuns, RamSink, RunDefect};
pub use reader::{Section, StreamReader};
pub use throttle::Bandwidth;
pub use transport::{
    connect, connect_with_timeout, Channel, Listener, TransportError, IO_BUFFER_SIZE,
};
pub use uri::{MigrationUri, UriError};
pub use writer::{RamSectionWriter, RamStats, StreamWriter};

use std::fmt;

/// The first eight bytes of every stream.
pub const MAGIC: [u8; 8] = *b"FERRYMIG";
/// The stream format version this build writes and reads.
pub const STREAM_VERSION: u32 = 1;
/// Guest page size; RAM runs count pages of this size.
pub const PAGE_SIZE: usize = 4096;
/// Length of the stream header: magic, version, flags.
pub const HEADER_LEN: usize = 16;
/// Name of the RAM sections [`RamSectionWriter`] writes.
pub const RAM_SECTION: &str = "ram";
/// Name of the pass-marker sections.
pub const PASS_SECTION: &str = "pass";
/// Name of the end section.
pub const END_SECTION: &str = "end";
/// Payload length of a pass section: pass number u32, pages u64.
pub const PASS_PAYLOAD_LEN: u64 = 12;
/// Payload length of the end section: sections u64, bytes u64.
pub const END_PAYLOAD_LEN: u64 = 16;

const MIB: u64 = 1024 * 1024;

/// What a section carries. The discriminant is the byte on the wire.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SectionKind {
    /// The VM configuration (JSON), so the destination needs no copy of
    /// the source's command line.
    Config = 1,
    /// Guest pages as runs (see [`RamRuns`]).
    Ram = 2,
    /// One vCPU's state (`vcpu/N`).
    Vcpu = 3,
    /// VM-wide state: irqchip, PIT, clock.
    VmState = 4,
    /// One device's state (`serial/com1`, `virtio-net/net0`).
    Device = 5,
    /// End of a RAM pass: pass number u32 LE, pages in the pass u64 LE.
    Pass = 6,
    /// End of stream: sections before it u64 LE, bytes before it u64 LE.
    End = 0xff,
}

impl SectionKind {
    /// The kind for a wire byte, `None` for an unknown one.
    pub fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Config,
            2 => Self::Ram,
            3 => Self::Vcpu,
            4 => Self::VmState,
            5 => Self::Device,
            6 => Self::Pass,
            0xff => Self::End,
            _ => return None,
        })
    }

    /// The largest payload a section of this kind may carry. Pass and end
    /// sections have an exact length instead (see [`Self::exact_len`]).
    pub fn max_payload(self) -> u64 {
        match self {
            Self::Config | Self::Vcpu | Self::VmState | Self::Device => 16 * MIB,
            Self::Ram => 64 * MIB,
            Self::Pass => PASS_PAYLOAD_LEN,
            Self::End => END_PAYLOAD_LEN,
        }
    }

    /// The payload length a section of this kind must have, if fixed.
    pub fn exact_len(self) -> Option<u64> {
        match self {
            Self::Pass => Some(PASS_PAYLOAD_LEN),
            Self::End => Some(END_PAYLOAD_LEN),
            _ => None,
        }
    }

    /// Checks a payload length against this kind's exact length or limit,
    /// for the reader and the writer alike; `section` names it in the
    /// error, `offset` is where the section starts.
    pub fn check_len(
        self,
        len: u64,
        section: impl FnOnce() -> String,
        offset: u64,
    ) -> Result<(), StreamError> {
        match self.exact_len() {
            Some(expected) if len != expected => Err(StreamError::BadLength {
                section: section(),
                kind: self,
                len,
                expected,
                offset,
            }),
            None if len > self.max_payload() => Err(StreamError::TooLarge {
                section: section(),
                kind: self,
                len,
                max: self.max_payload(),
                offset,
            }),
            _ => Ok(()),
        }
    }

    /// Lower-case name used in documentation and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Ram => "ram",
            Self::Vcpu => "vcpu",
            Self::VmState => "vm-state",
            Self::Device => "device",
            Self::Pass => "pass",
            Self::End => "end",
        }
    }
}

impl fmt::Display for SectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
