//! What every NIC model tells the host about itself.

use std::io;
use std::os::fd::RawFd;

use crate::announce::Announced;
use crate::rarp::rarp_frame;
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

    /// One announce round: by default a RARP for every MAC, untagged and
    /// on every VLAN. Models that can ask the guest (virtio-net's
    /// GUEST_ANNOUNCE) override this.
    fn announce(&mut self) -> io::Result<Announced> {
        rarp_announce(self)
    }

    /// Rounds of the announce in flight still to go, kept with the NIC's
    /// migrated state; 0 once a reset of the NIC cancelled it.
    fn announce_rounds_left(&self) -> u64;
    fn set_announce_rounds_left(&mut self, rounds: u64);
    /// Drops an announce in flight (a reset, a new migration).
    fn cancel_announce(&mut self);
    /// Readable after each time the guest acknowledged an announce it was
    /// asked for ([`Announced::Guest`]); `None` for a model that never
    /// asks the guest.
    fn announce_ack_fd(&self) -> Option<RawFd> {
        None
    }
}

/// The host's announce: every MAC × (untagged + every VLAN).
pub fn rarp_announce<N: Nic + ?Sized>(nic: &mut N) -> io::Result<Announced> {
    let vlans = nic.vlans();
    let mut frames = 0;
    for mac in nic.macs() {
        for vlan in std::iter::once(None).chain(vlans.iter().map(|&v| Some(v))) {
            nic.send_raw(&rarp_frame(mac, vlan))?;
            frames += 1;
        }
    }
    Ok(Announced::Rarp { frames })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder {
        macs: Vec<MacAddr>,
        vlans: Vec<u16>,
        sent: Vec<Vec<u8>>,
        rounds_left: u64,
    }

    impl Nic for Recorder {
        fn id(&self) -> &str {
            "rec"
        }
        fn macs(&self) -> Vec<MacAddr> {
            self.macs.clone()
        }
        fn vlans(&self) -> Vec<u16> {
            self.vlans.clone()
        }
        fn send_raw(&mut self, frame: &[u8]) -> io::Result<()> {
            self.sent.push(frame.to_vec());
            Ok(())
        }
        fn announce_rounds_left(&self) -> u64 {
            self.rounds_left
        }
        fn set_announce_rounds_left(&mut self, rounds: u64) {
            self.rounds_left = rounds;
        }
        fn cancel_announce(&mut self) {
            self.rounds_left = 0;
        }
    }

    #[test]
    fn every_mac_on_every_vlan() {
        let a = MacAddr([2, 0, 0, 0, 0, 1]);
        let b = MacAddr([2, 0, 0, 0, 0, 2]);
        let mut nic = Recorder {
            macs: vec![a, b],
            vlans: vec![100, 200],
            sent: vec![],
            rounds_left: 0,
        };
        assert_eq!(nic.announce().unwrap(), Announced::Rarp { frames: 6 });
        let expected: Vec<Vec<u8>> = [a, b]
            .iter()
            .flat_map(|&m| [None, Some(100), Some(200)].map(|v| rarp_frame(m, v)))
            .collect();
        assert_eq!(nic.sent, expected);
    }
}
