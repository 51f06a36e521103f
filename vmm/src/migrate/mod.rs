//! Migration as the VMM drives it: what goes into the stream (the
//! `migration` crate frames it), the live-migration loop on the source,
//! the load on the destination, and the job QMP reports on.
//!
//! Stream contents, in order: `config` (machine and NICs), RAM passes
//! (`ram` sections ending with a `pass` marker each), then with the VM
//! stopped: `vm` (irqchip, PIT, clock), `vcpu/N`, `serial/com1`,
//! `virtio-net/<id>`, and `end`. Over a socket the destination answers
//! with an acknowledgement once everything is loaded (see [`ack`]).

pub mod ack;
pub mod arriving;
pub mod dest;
pub mod job;
mod pagemap;
pub mod ram;
pub mod source;
pub mod throttle;

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
pub const SERIAL_SECTION: &str = "serial/com1";
pub const SERIAL_VERSION: u32 = 1;
/// The power button's pending press; optional on load (streams written
/// before the GED existed have none).
pub const GED_SECTION: &str = "acpi-ged";
pub const GED_VERSION: u32 = 1;

pub fn vcpu_section(id: u8) -> String {
    format!("vcpu/{id}")
}

pub fn net_section(id: &str) -> String {
    format!("{}/{id}", devices::virtio::net::persist::SECTION)
}

pub use job::{MigrationJob, MigrationParameters, MigrationStatus};
