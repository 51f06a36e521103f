//! What every NIC model tells the host about itself.

use std::io;

use crate::MacAddr;

/// A guest network card seen from the host. The MACs and VLANs are what
/// the guest has configured (for virtio-net: the primary MAC plus the
/// control queue's unicast table, and its VLAN filter), which is exactly
/// what must be announced after a migration.
pub trait Nic {
    /// The NIC's id (`--net ...,id=`).
    fn id(&self) -> &str;
    /// Unicast MACs the guest answers to, primary first.
    fn macs(&self) -> Vec<MacAddr>;
    /// VLANs the guest carries (empty: untagged only).
    fn vlans(&self) -> Vec<u16>;
    /// Sends one Ethernet frame out of the NIC's backend, as if the guest
    /// had sent it.
    fn send_raw(&mut self, frame: &[u8]) -> io::Result<()>;
}
