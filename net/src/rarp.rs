//! The self-announce frame QEMU has sent since 2007 (seed 003, later RARP):
//! a broadcast reverse-ARP request "from" each MAC, which makes every
//! switch on the way learn where that MAC lives now, without asking
//! anyone to answer.

use crate::MacAddr;

pub const ETH_P_RARP: u16 = 0x8035;
pub const ETH_P_8021Q: u16 = 0x8100;
const ARP_HTYPE_ETH: u16 = 1;
const ARP_PTYPE_IP: u16 = 0x0800;
const ARP_OP_REQUEST_REV: u16 = 3;
/// Ethernet's minimum frame without the FCS.
pub const MIN_FRAME: usize = 60;

/// The RARP announce for `mac`, 802.1Q-tagged when `vlan` is given: 60
/// bytes untagged (QEMU's exact bytes), 64 tagged.
pub fn rarp_frame(mac: MacAddr, vlan: Option<u16>) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_FRAME + 4);
    f.extend([0xff; 6]);
    f.extend(mac.0);
    if let Some(vid) = vlan {
        f.extend(ETH_P_8021Q.to_be_bytes());
        f.extend((vid & 0x0fff).to_be_bytes());
    }
    f.extend(ETH_P_RARP.to_be_bytes());
    f.extend(ARP_HTYPE_ETH.to_be_bytes());
    f.extend(ARP_PTYPE_IP.to_be_bytes());
    f.push(6);
    f.push(4);
    f.extend(ARP_OP_REQUEST_REV.to_be_bytes());
    f.extend(mac.0); // sender hardware address
    f.extend([0; 4]); // sender protocol address
    f.extend(mac.0); // target hardware address
    f.extend([0; 4]); // target protocol address
    let min = if vlan.is_some() {
        MIN_FRAME + 4
    } else {
        MIN_FRAME
    };
    f.resize(min, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

    #[test]
    fn untagged_is_qemus_60_bytes() {
        let f = rarp_frame(MAC, None);
        let mut expected = vec![0xff; 6];
        expected.extend([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        expected.extend([0x80, 0x35, 0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x03]);
        expected.extend([0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0]);
        expected.extend([0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0]);
        expected.extend([0u8; 18]);
        assert_eq!(f.len(), 60);
        assert_eq!(f, expected);
    }

    #[test]
    fn tagged_carries_the_vlan_and_stays_at_least_60_bytes() {
        let f = rarp_frame(MAC, Some(100));
        assert_eq!(f.len(), 64);
        assert_eq!(&f[12..16], &[0x81, 0x00, 0x00, 100]);
        assert_eq!(&f[16..18], &[0x80, 0x35]);
        // The rest is the untagged frame's body.
        assert_eq!(&f[18..46], &rarp_frame(MAC, None)[14..42]);
        assert_eq!(&rarp_frame(MAC, Some(4095))[14..16], &[0x0f, 0xff]);
    }
}
