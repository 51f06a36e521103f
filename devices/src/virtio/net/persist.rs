//! virtio-net's saved state: everything the guest configured, as a plain
//! serde struct. The device keeps its guest-visible state in this type, so
//! saving it is a clone (issue #6 adds the queues and the stream section).

use net::MacAddr;
use serde::{Deserialize, Serialize};

use super::filter::RxFilter;

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
}
