//! The receive filter the control queue programs (virtio 1.x, 5.1.6.5):
//! RX modes, the MAC table and the VLAN filter. It decides which frames
//! from the TAP reach the guest, and it is what the host knows of the
//! guest's addresses.

use net::MacAddr;
use serde::{Deserialize, Serialize};

/// Entries in the unicast and multicast tables together, as in QEMU.
pub const MAC_TABLE_ENTRIES: usize = 64;
pub const VLAN_COUNT: usize = 4096;
const ETH_P_8021Q: u16 = 0x8100;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RxFilter {
    pub promisc: bool,
    pub allmulti: bool,
    pub alluni: bool,
    pub nomulti: bool,
    pub nouni: bool,
    pub nobcast: bool,
    pub unicast: Vec<MacAddr>,
    pub multicast: Vec<MacAddr>,
    /// The guest gave more entries than fit: accept all of that kind.
    pub unicast_overflow: bool,
    pub multicast_overflow: bool,
    /// 4096 bits, one per VLAN id.
    pub vlans: Vec<u32>,
}

impl Default for RxFilter {
    /// The state after reset: promiscuous (what drivers that never touch
    /// the control queue expect), empty tables, every VLAN passes.
    fn default() -> Self {
        Self {
            promisc: true,
            allmulti: false,
            alluni: false,
            nomulti: false,
            nouni: false,
            nobcast: false,
            unicast: Vec::new(),
            multicast: Vec::new(),
            unicast_overflow: false,
            multicast_overflow: false,
            vlans: vec![u32::MAX; VLAN_COUNT / 32],
        }
    }
}

impl RxFilter {
    /// The filter a driver starts from once it negotiated CTRL_VLAN: no
    /// VLAN passes until it adds it.
    pub fn with_vlan_filtering(vlan_filtering: bool) -> Self {
        let mut f = Self::default();
        if vlan_filtering {
            f.vlans.fill(0);
        }
        f
    }

    pub fn set_mac_table(&mut self, unicast: Vec<MacAddr>, multicast: Vec<MacAddr>) {
        self.unicast_overflow = unicast.len() > MAC_TABLE_ENTRIES;
        self.unicast = if self.unicast_overflow {
            Vec::new()
        } else {
            unicast
        };
        let room = MAC_TABLE_ENTRIES - self.unicast.len();
        self.multicast_overflow = multicast.len() > room;
        self.multicast = if self.multicast_overflow {
            Vec::new()
        } else {
            multicast
        };
    }

    pub fn set_vlan(&mut self, vid: u16, on: bool) {
        let (word, bit) = (usize::from(vid) / 32, u32::from(vid) % 32);
        if let Some(w) = self.vlans.get_mut(word) {
            if on {
                *w |= 1 << bit;
            } else {
                *w &= !(1 << bit);
            }
        }
    }

    pub fn vlan_allowed(&self, vid: u16) -> bool {
        let (word, bit) = (usize::from(vid) / 32, u32::from(vid) % 32);
        self.vlans.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    /// VLAN ids that pass, in order; empty when every VLAN passes (no
    /// filtering programmed), so callers can tell "all" from "some".
    pub fn vlan_list(&self) -> Vec<u16> {
        if self.vlans.iter().all(|&w| w == u32::MAX) {
            return Vec::new();
        }
        (0..VLAN_COUNT as u16)
            .filter(|&v| self.vlan_allowed(v))
            .collect()
    }

    /// Whether the Ethernet frame `frame` (no vnet header) is for a guest
    /// whose primary MAC is `mac`.
    pub fn accepts(&self, mac: &MacAddr, frame: &[u8]) -> bool {
        if self.promisc {
            return true;
        }
        if frame.len() < 14 {
            return false;
        }
        if u16::from_be_bytes([frame[12], frame[13]]) == ETH_P_8021Q && frame.len() >= 16 {
            let vid = u16::from_be_bytes([frame[14], frame[15]]) & 0xfff;
            if !self.vlan_allowed(vid) {
                return false;
            }
        }
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&frame[..6]);
        let dst = MacAddr(dst);
        if dst.is_broadcast() {
            !self.nobcast
        } else if dst.is_multicast() {
            !self.nomulti
                && (self.allmulti || self.multicast_overflow || self.multicast.contains(&dst))
        } else {
            !self.nouni
                && (self.alluni
                    || self.unicast_overflow
                    || dst == *mac
                    || self.unicast.contains(&dst))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
    const OTHER: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 2]);
    const MCAST: MacAddr = MacAddr([0x01, 0x00, 0x5e, 0, 0, 1]);

    fn frame(dst: MacAddr, vlan: Option<u16>) -> Vec<u8> {
        let mut f = dst.0.to_vec();
        f.extend([0x02, 0, 0, 0, 0, 9]);
        if let Some(v) = vlan {
            f.extend(ETH_P_8021Q.to_be_bytes());
            f.extend(v.to_be_bytes());
        }
        f.extend([0x08, 0x00]);
        f.extend([0u8; 46]);
        f
    }

    #[test]
    fn promiscuous_after_reset_then_filters() {
        let mut f = RxFilter::with_vlan_filtering(true);
        assert!(f.accepts(&OWN, &frame(OTHER, Some(7))));
        f.promisc = false;
        assert!(f.accepts(&OWN, &frame(OWN, None)));
        assert!(!f.accepts(&OWN, &frame(OTHER, None)));
        assert!(f.accepts(&OWN, &frame(net::mac::BROADCAST, None)));
        assert!(!f.accepts(&OWN, &frame(MCAST, None)));
        assert!(
            !f.accepts(&OWN, &frame(OWN, Some(100))),
            "VLAN 100 not added yet"
        );
        f.set_vlan(100, true);
        assert!(f.accepts(&OWN, &frame(OWN, Some(100))));
        assert_eq!(f.vlan_list(), vec![100]);
        f.set_mac_table(vec![OTHER], vec![MCAST]);
        assert!(f.accepts(&OWN, &frame(OTHER, None)));
        assert!(f.accepts(&OWN, &frame(MCAST, None)));
        f.nobcast = true;
        assert!(!f.accepts(&OWN, &frame(net::mac::BROADCAST, None)));
        f.nouni = true;
        assert!(!f.accepts(&OWN, &frame(OWN, None)));
        assert!(!f.accepts(&OWN, &[0u8; 10]), "runt frame");
    }

    #[test]
    fn mac_table_overflow_accepts_all_of_that_kind() {
        let mut f = RxFilter {
            promisc: false,
            ..RxFilter::default()
        };
        let many: Vec<MacAddr> = (0..65u8).map(|i| MacAddr([2, 0, 0, 0, 0, i])).collect();
        f.set_mac_table(many, vec![MCAST]);
        assert!(f.unicast_overflow && f.unicast.is_empty());
        assert!(f.accepts(&OWN, &frame(MacAddr([2, 9, 9, 9, 9, 9]), None)));
        assert_eq!(f.multicast, vec![MCAST]);
        let uni: Vec<MacAddr> = (0..60u8).map(|i| MacAddr([2, 0, 0, 0, 0, i])).collect();
        let multi: Vec<MacAddr> = (0..5u8).map(|i| MacAddr([1, 0, 0, 0, 0, i])).collect();
        f.set_mac_table(uni, multi);
        assert!(!f.unicast_overflow && f.multicast_overflow);
        assert_eq!(
            f.vlan_list(),
            Vec::<u16>::new(),
            "no VLAN filtering: all pass"
        );
    }
}
