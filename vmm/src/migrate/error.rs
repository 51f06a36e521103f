//! What can go wrong moving a VM, on either end: each error names the
//! phase, section or device that failed, and keeps its cause.

use std::io;

use migration::{SectionKind, StreamError, TransportError};

use super::ram::RamError;
use crate::config::{format_size, ConfigError};
use crate::control::ControlError;
use crate::runstate::IllegalTransition;
use crate::state::StateError;
use crate::VmmError;

/// The source's errors; any of them leaves the guest as it was.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot reach the destination: {0}")]
    Connect(#[source] TransportError),
    #[error("{what}: {source}")]
    Channel {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Ram(#[from] RamError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("vCPU {0} did not save its state in time")]
    VcpuSave(u8),
    #[error("destination refused: {0}")]
    Refused(String),
    #[error("no acknowledgement from the destination: {0}")]
    NoAck(#[source] io::Error),
    #[error("the destination answered {got} {when}")]
    OutOfTurn {
        got: &'static str,
        when: &'static str,
    },
    #[error("did not converge after {passes} passes: the guest dirties at least {dirty_mbps:.0} MB/s, the link carries {link_mbps:.0} MB/s{}", throttle_note(*throttle))]
    NotConverging {
        passes: u64,
        dirty_mbps: f64,
        link_mbps: f64,
        /// The auto-converge throttle reached (percent; 0: none).
        throttle: u64,
    },
    #[error("cannot start the CPU throttle: {0}")]
    Throttle(#[source] io::Error),
    #[error("cancelled")]
    Cancelled,
    #[error("backend-transfer hands over file descriptors, which only a unix: migration can carry (not {0}:)")]
    BackendTransferNeedsUnix(&'static str),
    #[error("the multifd capability needs a tcp: or unix: URI (not {0}:)")]
    MultifdNeedsSocket(&'static str),
    #[error("cannot open multifd channels: {0}")]
    Channels(#[source] TransportError),
    #[error(transparent)]
    Snapshot(#[from] migration::snapshot::SnapshotError),
    #[error("writing the snapshot's RAM image: {0}")]
    Image(#[source] io::Error),
    #[error("{0}")]
    TlsSetup(String),
    #[error(transparent)]
    Tls(#[from] migration::tls::TlsError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("multifd channel {index}: {source}")]
    ChannelFailed {
        index: usize,
        #[source]
        source: Box<MigrateError>,
    },
}

fn throttle_note(percent: u64) -> String {
    if percent == 0 {
        " (auto-converge off or never triggered)".into()
    } else {
        format!(" even with the vCPUs throttled by {percent}%")
    }
}

/// The destination's errors: the source, told by a NAK, keeps its guest.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("--incoming defer waits for QMP's migrate-incoming: it needs --qmp")]
    DeferNeedsQmp,
    #[error("cannot wait for a migration on {uri}: {source}")]
    Listen {
        uri: String,
        #[source]
        source: TransportError,
    },
    #[error("incoming migration on {uri}: {source}")]
    Accept {
        uri: String,
        #[source]
        source: TransportError,
    },
    #[error("wait for the incoming migration: {0}")]
    Wait(#[source] io::Error),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("migration stream: expected the config section first, found {kind} section {name} at byte {offset}")]
    ConfigNotFirst {
        kind: SectionKind,
        name: String,
        offset: u64,
    },
    #[error("--memory {} disagrees with the incoming VM's {}", format_size(*.asked), format_size(*.incoming))]
    MemoryMismatch { asked: u64, incoming: u64 },
    #[error("--cpus {asked} disagrees with the incoming VM's {incoming}")]
    CpusMismatch { asked: u8, incoming: u8 },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--net {net} matches no NIC of the incoming VM (it has {has})")]
    NoSuchNic { net: String, has: String },
    #[error("--net mac= would change NIC {id}'s MAC {mac}: refused")]
    MacChange { id: String, mac: net::MacAddr },
    #[error("--net guest-announce= would change NIC {id}'s features: refused")]
    FeaturesChange { id: String },
    #[error("the stream hands over TAPs and memory, which only a unix: migration can carry")]
    HandoverNeedsUnix,
    #[error("the source hands over {taps} TAPs for {nics} NICs")]
    HandoverTaps { taps: usize, nics: usize },
    #[error("receiving the source's TAPs and memory: {0}")]
    HandoverReceive(#[source] io::Error),
    #[error("expected {expected} descriptors from the source, got {got}")]
    HandoverCount { expected: usize, got: usize },
    #[error("received TAP: {0}")]
    HandoverTap(#[source] net::TapError),
    /// Building the machine the stream describes (boxed: a VmmError can
    /// itself carry an IncomingError).
    #[error("building the incoming VM: {0}")]
    Build(#[source] Box<VmmError>),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot answer the source: {0}")]
    Answer(#[source] io::Error),
    #[error("migration stream: unknown {kind} section {name} at byte {offset}")]
    UnknownSection {
        kind: SectionKind,
        name: String,
        offset: u64,
    },
    #[error("migration stream: section {name} appears twice (second at byte {offset})")]
    Duplicate { name: String, offset: u64 },
    #[error("migration stream ended without its {0} section")]
    Missing(String),
    #[error("restoring the VM state: {0}")]
    VmState(#[source] StateError),
    #[error("restoring vCPU {id}: {source}")]
    Vcpu {
        id: u8,
        #[source]
        source: StateError,
    },
    #[error(transparent)]
    RunState(#[from] IllegalTransition),
    #[error("cannot acknowledge the migration: {0}")]
    Ack(#[source] io::Error),
    #[error("the source uses multifd with {source_channels} channels, but the multifd capability is off here: set it (and multifd-channels {source_channels}) on both ends")]
    MultifdOffHere { source_channels: u32 },
    #[error("the multifd capability is on here ({here} channels) but off on the source: set it on both ends")]
    MultifdOffThere { here: u32 },
    #[error("multifd-channels is {source_channels} on the source but {here} here: set the same on both ends")]
    ChannelCount { source_channels: u32, here: u32 },
    #[error("only {got} of the {expected} multifd channels connected in time")]
    ChannelsMissing { expected: u32, got: u32 },
    #[error("multifd channel {index}: {reason}")]
    Channel { index: usize, reason: String },
    #[error(transparent)]
    Snapshot(#[from] migration::snapshot::SnapshotError),
    #[error("TLS: {0}")]
    TlsSetup(String),
    #[error(transparent)]
    Tls(#[from] migration::tls::TlsError),
    #[error("NIC {id} (MAC {mac}) has no --net here: add --net tap=NAME,id={id} (or one at position {index}); the destination opens only the TAPs its own command line names")]
    NicWithoutNet {
        id: String,
        mac: net::MacAddr,
        index: usize,
    },
}

impl From<VmmError> for IncomingError {
    fn from(e: VmmError) -> Self {
        Self::Build(Box::new(e))
    }
}
