//! virtio-net's saved state: everything the guest configured, as a plain
//! serde struct, with its transport's registers and queues, in the
//! `virtio-net/<id>` section. The device keeps its guest-visible state in
//! this type, so saving it is a clone.

use migration::persist::{decode, encode};
use migration::{SavedState, SavedStateError};
use net::{MacAddr, NetBackend};
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

/// Section name prefix and version of a NIC in the stream
/// (`virtio-net/<id>`).
pub const SECTION: &str = "virtio-net";
pub const VERSION: u32 = 1;

/// The section of the NIC called `id`.
pub fn section_name(id: &str) -> String {
    format!("{SECTION}/{id}")
}

impl<B: NetBackend> MmioTransport<Net<B>> {
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
    /// The (MAC, VLAN) pairs the guest sends from: what an announce after
    /// the move must carry (absent from an older Ferry's stream).
    #[serde(default)]
    pub senders: net::Senders,
}

/// The section is named for the NIC's id on this host (its `--net`),
/// which is the id it had on the source: a destination's `--net` only
/// picks the TAP.
impl<B: NetBackend> SavedState for MmioTransport<Net<B>> {
    fn section_name(&self) -> String {
        section_name(&self.device().state().id)
    }

    fn section_version(&self) -> u32 {
        VERSION
    }

    fn save_state(&self) -> Result<Vec<u8>, SavedStateError> {
        encode(&self.save_net())
    }

    fn restore_state(&mut self, _version: u32, payload: &[u8]) -> Result<(), SavedStateError> {
        let snapshot: NetSnapshot = decode(payload)?;
        self.restore_net(&snapshot)
            .map_err(SavedStateError::refused)
    }
}

/// Where a NIC is in its announce schedule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceState {
    /// Rounds still to go.
    pub rounds_left: u64,
    /// S_ANNOUNCE is set and the guest has not acknowledged it yet.
    pub awaiting_ack: bool,
}
