//! virtio-net's saved state: everything the guest configured, as a plain
//! serde struct. The device keeps its guest-visible state in this type, so
//! saving it is a clone (issue #6 adds the queues and the stream section).

use net::MacAddr;
use serde::{Deserialize, Serialize};

use super::filter::RxFilter;
use super::Net;
use crate::virtio::mmio::{MmioTransport, MmioTransportSnapshot, RestoreError};

/// A virtio-net device as the migration stream carries it: the device's
/// state and its transport's (registers, queues).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSnapshot {
    pub net: NetState,
    pub transport: MmioTransportSnapshot,
}

/// Section name and version of a NIC in the stream (`virtio-net/<id>`).
pub const SECTION: &str = "virtio-net";
pub const SECTION_VERSION: u32 = 1;

impl MmioTransport<Net> {
    /// Saves the NIC; the VM must be paused.
    pub fn save_net(&self) -> NetSnapshot {
        NetSnapshot {
            net: self.device().state().clone(),
            transport: self.snapshot(),
        }
    }

    /// Restores a saved NIC onto this one (its TAP stays this host's).
    pub fn restore_net(&mut self, snapshot: &NetSnapshot) -> Result<(), RestoreError> {
        self.device_mut().restore_state(&snapshot.net);
        self.restore(&snapshot.transport)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub id: String,
    /// The MAC in config space (MAC_ADDR_SET changes it).
    pub mac: MacAddr,
    /// Config-space status: LINK_UP, ANNOUNCE.
    pub status: u16,
    pub avail_features: u64,
    pub acked_features: u64,
    pub config_generation: u32,
    pub rx_filter: RxFilter,
    /// The announce in flight, if any (issue #7).
    #[serde(default)]
    pub announce: AnnounceState,
}

/// Where a NIC is in its announce schedule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceState {
    /// Rounds still to go.
    pub rounds_left: u64,
    /// S_ANNOUNCE is set and the guest has not acknowledged it yet.
    pub awaiting_ack: bool,
}
