//! Migration as the VMM drives it: what goes into the stream (the
//! `migration` crate frames it), the source's phases, the destination's
//! read-then-apply, the job QMP reports on, and the QMP commands.
//!
//! Stream contents, in order: `config` (machine and NICs), RAM passes
//! (`ram` sections ending with a `pass` marker each), then with the VM
//! stopped: `vm` (irqchip, PIT, clock), `vcpu/N`, one section per device
//! of [`VmParts::devices`](crate::builder::VmParts::devices) in its order
//! (`serial/com1`, `acpi-ged`, `virtio-net/<id>`), `global-state` (the run
//! state the guest was stopped from) and `end`. Over a
//! socket the destination answers with an acknowledgement once
//! everything is loaded (see [`ack`]).

pub mod ack;
pub mod arriving;
pub mod converge;
pub mod dest;
pub mod error;
pub mod forward;
pub mod job;
pub mod multifd;
mod pagemap;
pub mod params;
pub mod qmp;
pub mod ram;
pub mod report;
pub mod snapshot;
pub mod source;
pub mod throttle;
pub mod tls;

use serde::{Deserialize, Serialize};

use crate::config::{MachineConfig, NetDescriptor};

/// The `config` section: enough to build the same machine elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationConfig {
    pub machine: MachineConfig,
    pub nets: Vec<NetDescriptor>,
    /// The schedule the destination announces the guest with, from the
    /// source's migration parameters.
    #[serde(default)]
    pub announce: net::AnnounceParams,
    /// Local migration over unix:: the host resources that follow this
    /// section as one descriptor message (issue #8).
    #[serde(default)]
    pub backend: Option<BackendHandover>,
    /// multifd: the connections RAM travels on besides this one (0: RAM
    /// on this one), and the session their hellos name.
    #[serde(default)]
    pub ram_channels: u32,
    #[serde(default)]
    pub session: u64,
    /// The source waits for the destination's FERRYPAS after each pass
    /// (see [`ack`]); an older source does not, and is not sent one.
    #[serde(default)]
    pub pass_acks: bool,
    /// The source reads the destination's report after the ACK (see
    /// [`report`]).
    #[serde(default)]
    pub report: bool,
    /// After the ACK the source forwards the frames its TAPs got while
    /// the guest was stopped ([`forward`]), for up to this many ms.
    #[serde(default)]
    pub forward_frames_ms: Option<u64>,
}

/// What a local migration hands over: one TAP descriptor per NIC, in NIC
/// order, then the memfd of guest RAM when there is one (then no page is
/// copied: both processes map the same pages).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendHandover {
    pub taps: usize,
    pub memfd: bool,
}

impl BackendHandover {
    pub fn fd_count(&self) -> usize {
        self.taps + usize::from(self.memfd)
    }
}

pub const CONFIG_SECTION: &str = "config";
pub const CONFIG_VERSION: u32 = 1;
pub const VM_SECTION: &str = "vm";
pub const VM_VERSION: u32 = 1;
pub const VCPU_VERSION: u32 = 1;
pub const GLOBAL_SECTION: &str = "global-state";
pub const GLOBAL_VERSION: u32 = 1;

/// QEMU's "global state": the run state the source stopped the guest
/// from, written last before `end`. A guest paused there arrives paused
/// (and a snapshot of one restores paused); a stream without it (an
/// older Ferry) means running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalState {
    /// QEMU's name for the state (`running`, `paused`).
    pub runstate: String,
}

impl GlobalState {
    pub fn of(state: crate::runstate::RunState) -> Self {
        let runstate = if state.is_running() {
            "running"
        } else {
            "paused"
        };
        Self {
            runstate: runstate.into(),
        }
    }

    pub fn running(&self) -> bool {
        self.runstate == "running"
    }
}
pub fn vcpu_section(id: u8) -> String {
    format!("vcpu/{id}")
}

pub use error::{IncomingError, MigrateError};
pub use job::{MigrationJob, MigrationStatus};
pub use params::MigrationParameters;
