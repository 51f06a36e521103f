//! Ethernet II frames with an optional 802.1Q tag.

use crate::{be16, put_be16, BuildError, ParseError, ETHERTYPE_VLAN};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// Parses `aa:bb:cc:dd:ee:ff` (or with `-`), hex digits either case.
    pub fn parse(text: &str) -> Option<MacAddr> {
        let mut mac = [0u8; 6];
        let mut parts = text.split([':', '-']);
        for byte in &mut mac {
            let part = parts.next()?;
            if part.is_empty() || part.len() > 2 {
                return None;
            }
            *byte = u8::from_str_radix(part, 16).ok()?;
        }
        if parts.next().is_some() {
            return None;
        }
        Some(MacAddr(mac))
    }
}

impl core::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The 802.1Q tag control information.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlanTag {
    pub pcp: u8,
    pub dei: bool,
    /// 0 means priority-tagged only (no VLAN); 4095 is reserved.
    pub vid: u16,
}

impl VlanTag {
    pub fn new(vid: u16) -> VlanTag {
        VlanTag {
            pcp: 0,
            dei: false,
            vid: vid & 0x0FFF,
        }
    }

    fn tci(&self) -> u16 {
        ((self.pcp as u16 & 7) << 13) | ((self.dei as u16) << 12) | (self.vid & 0x0FFF)
    }
}

/// A parsed frame: addresses, the tag if any, the inner ethertype and the
/// payload after all headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ethernet<'a> {
    pub dst: MacAddr,
    pub src: MacAddr,
    pub vlan: Option<VlanTag>,
    pub ethertype: u16,
    pub payload: &'a [u8],
}

pub const HEADER_LEN: usize = 14;
pub const VLAN_HEADER_LEN: usize = 18;

impl<'a> Ethernet<'a> {
    pub fn parse(frame: &'a [u8]) -> Result<Ethernet<'a>, ParseError> {
        if frame.len() < HEADER_LEN {
            return Err(ParseError::Truncated);
        }
        let mut dst = [0; 6];
        let mut src = [0; 6];
        dst.copy_from_slice(&frame[0..6]);
        src.copy_from_slice(&frame[6..12]);
        let outer = be16(frame, 12);
        let (vlan, ethertype, header) = if outer == ETHERTYPE_VLAN {
            if frame.len() < VLAN_HEADER_LEN {
                return Err(ParseError::Truncated);
            }
            let tci = be16(frame, 14);
            let tag = VlanTag {
                pcp: (tci >> 13) as u8,
                dei: tci & 0x1000 != 0,
                vid: tci & 0x0FFF,
            };
            (Some(tag), be16(frame, 16), VLAN_HEADER_LEN)
        } else {
            (None, outer, HEADER_LEN)
        };
        Ok(Ethernet {
            dst: MacAddr(dst),
            src: MacAddr(src),
            vlan,
            ethertype,
            payload: &frame[header..],
        })
    }

    /// The VLAN the frame belongs to: `None` untagged or priority-tagged.
    pub fn vlan_id(&self) -> Option<u16> {
        self.vlan.map(|t| t.vid).filter(|&v| v != 0)
    }
}

/// Writes an Ethernet header (tagged when `vlan` is set) and returns its
/// length; the payload goes right after it.
pub fn write_header(
    buf: &mut [u8],
    dst: MacAddr,
    src: MacAddr,
    vlan: Option<u16>,
    ethertype: u16,
) -> Result<usize, BuildError> {
    let len = if vlan.is_some() {
        VLAN_HEADER_LEN
    } else {
        HEADER_LEN
    };
    if buf.len() < len {
        return Err(BuildError::BufferTooSmall);
    }
    buf[0..6].copy_from_slice(&dst.0);
    buf[6..12].copy_from_slice(&src.0);
    match vlan {
        Some(vid) => {
            put_be16(buf, 12, ETHERTYPE_VLAN);
            put_be16(buf, 14, VlanTag::new(vid).tci());
            put_be16(buf, 16, ethertype);
        }
        None => put_be16(buf, 12, ethertype),
    }
    Ok(len)
}

/// Zero-pads a frame of `len` bytes to the Ethernet minimum, returning the
/// padded length (what a NIC puts on the wire, FCS aside).
pub fn pad_to_minimum(buf: &mut [u8], len: usize) -> usize {
    let padded = len.max(crate::ETHERNET_MIN_FRAME).min(buf.len());
    buf[len.min(padded)..padded].fill(0);
    padded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_untagged_and_tagged() {
        let mut frame = [0u8; 64];
        let n = write_header(
            &mut frame,
            MacAddr::BROADCAST,
            MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            None,
            0x0806,
        )
        .unwrap();
        assert_eq!(n, 14);
        assert_eq!(&frame[12..14], &[0x08, 0x06]);
        let eth = Ethernet::parse(&frame).unwrap();
        assert!(eth.dst.is_broadcast());
        assert_eq!(eth.vlan, None);
        assert_eq!(eth.ethertype, 0x0806);
        assert_eq!(eth.payload.len(), 50);

        let n = write_header(&mut frame, MacAddr::ZERO, MacAddr::ZERO, Some(100), 0x0800).unwrap();
        assert_eq!(n, 18);
        assert_eq!(&frame[12..18], &[0x81, 0x00, 0x00, 0x64, 0x08, 0x00]);
        let eth = Ethernet::parse(&frame).unwrap();
        assert_eq!(eth.vlan_id(), Some(100));
        assert_eq!(eth.ethertype, 0x0800);
    }

    #[test]
    fn priority_tag_is_not_a_vlan() {
        // PCP 5, VID 0.
        let mut frame = [0u8; 60];
        frame[12..18].copy_from_slice(&[0x81, 0x00, 0xa0, 0x00, 0x08, 0x06]);
        let eth = Ethernet::parse(&frame).unwrap();
        assert_eq!(eth.vlan.map(|t| t.pcp), Some(5));
        assert_eq!(eth.vlan_id(), None);
    }

    #[test]
    fn truncated_frames_are_errors() {
        assert_eq!(Ethernet::parse(&[0; 13]), Err(ParseError::Truncated));
        let mut tagged = [0u8; 17];
        tagged[12] = 0x81;
        assert_eq!(Ethernet::parse(&tagged), Err(ParseError::Truncated));
        assert_eq!(
            write_header(&mut [0; 17], MacAddr::ZERO, MacAddr::ZERO, Some(1), 0),
            Err(BuildError::BufferTooSmall)
        );
    }

    #[test]
    fn mac_text_round_trip() {
        let mac = MacAddr::parse("52:54:00:AB:cd:0f").unwrap();
        assert_eq!(mac.0, [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]);
        let mut text = [0u8; 17];
        let mut w = crate::tests_util::Writer::new(&mut text);
        core::fmt::write(&mut w, format_args!("{mac}")).unwrap();
        assert_eq!(&text, b"52:54:00:ab:cd:0f");
        assert_eq!(MacAddr::parse("52-54-00-ab-cd-0f"), Some(mac));
        assert_eq!(MacAddr::parse("52:54:00:ab:cd"), None);
        assert_eq!(MacAddr::parse("52:54:00:ab:cd:0f:00"), None);
        assert_eq!(MacAddr::parse("52:54:00:ab:cd:xyz"), None);
    }

    #[test]
    fn padding() {
        let mut buf = [0xAAu8; 100];
        assert_eq!(pad_to_minimum(&mut buf, 42), 60);
        assert!(buf[42..60].iter().all(|&b| b == 0));
        assert_eq!(buf[60], 0xAA);
        assert_eq!(pad_to_minimum(&mut buf, 80), 80);
    }
}
