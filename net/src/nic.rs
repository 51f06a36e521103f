//! What every NIC model tells the host about itself.

use std::io;
use std::os::fd::RawFd;

use crate::senders::{rarp_plan, Identity};
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

    /// Asks the guest to announce itself (virtio-net's GUEST_ANNOUNCE);
    /// `false` for a model (or a driver) that cannot, whose rounds are
    /// the host's RARPs alone.
    fn ask_guest_to_announce(&mut self) -> bool {
        false
    }

    /// What a RARP round sends (see [`crate::senders::rarp_plan`]), and
    /// how many identities its cap left out. By default, with no record
    /// of what the guest sent: the filter's MACs × (untagged + VLANs).
    fn rarp_plan(&self) -> (Vec<Identity>, usize) {
        let macs = self.macs();
        let Some(&primary) = macs.first() else {
            return (Vec::new(), 0);
        };
        rarp_plan(primary, &macs, &self.vlans(), &[])
    }

    /// Starts a period for [`Self::senders_since`] (an announce round).
    fn mark_senders(&mut self) -> u64 {
        0
    }

    /// The identities the guest sent from since `mark`: those it
    /// announced itself in the round, which need no RARP.
    fn senders_since(&self, _mark: u64) -> Vec<Identity> {
        Vec::new()
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
    fn without_a_record_of_senders_every_mac_on_every_vlan() {
        let a = MacAddr([2, 0, 0, 0, 0, 1]);
        let b = MacAddr([2, 0, 0, 0, 0, 2]);
        let nic = Recorder {
            macs: vec![a, b],
            vlans: vec![100, 200],
            sent: vec![],
            rounds_left: 0,
        };
        let (plan, left) = nic.rarp_plan();
        let expected: Vec<Identity> = [a, b]
            .iter()
            .flat_map(|&m| [None, Some(100), Some(200)].map(|v| (m, v)))
            .collect();
        assert_eq!((plan, left), (expected, 0));
    }
}
