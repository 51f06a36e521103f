//! ARP for IPv4 over Ethernet (RFC 826), and the gratuitous ARP the probe
//! sends for each of its addresses when asked to announce.

use crate::ethernet::{self, MacAddr};
use crate::ipv4::Ipv4Addr;
use crate::{be16, put_be16, BuildError, ParseError, ETHERTYPE_ARP, ETHERTYPE_IPV4};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpOp {
    Request,
    Reply,
    Other(u16),
}

impl ArpOp {
    fn code(self) -> u16 {
        match self {
            ArpOp::Request => 1,
            ArpOp::Reply => 2,
            ArpOp::Other(c) => c,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    pub op: ArpOp,
    pub sender_mac: MacAddr,
    pub sender_ip: Ipv4Addr,
    pub target_mac: MacAddr,
    pub target_ip: Ipv4Addr,
}

/// Hardware type Ethernet, protocol IPv4, lengths 6 and 4.
const ARP_LEN: usize = 28;

impl Arp {
    pub fn parse(payload: &[u8]) -> Result<Arp, ParseError> {
        if payload.len() < ARP_LEN {
            return Err(ParseError::Truncated);
        }
        if be16(payload, 0) != 1
            || be16(payload, 2) != ETHERTYPE_IPV4
            || payload[4] != 6
            || payload[5] != 4
        {
            return Err(ParseError::Unsupported);
        }
        let op = match be16(payload, 6) {
            1 => ArpOp::Request,
            2 => ArpOp::Reply,
            c => ArpOp::Other(c),
        };
        let mac = |at: usize| {
            let mut m = [0; 6];
            m.copy_from_slice(&payload[at..at + 6]);
            MacAddr(m)
        };
        let ip = |at: usize| {
            Ipv4Addr([
                payload[at],
                payload[at + 1],
                payload[at + 2],
                payload[at + 3],
            ])
        };
        Ok(Arp {
            op,
            sender_mac: mac(8),
            sender_ip: ip(14),
            target_mac: mac(18),
            target_ip: ip(24),
        })
    }

    /// Writes the 28-byte ARP body.
    pub fn write(&self, buf: &mut [u8]) -> Result<usize, BuildError> {
        if buf.len() < ARP_LEN {
            return Err(BuildError::BufferTooSmall);
        }
        put_be16(buf, 0, 1);
        put_be16(buf, 2, ETHERTYPE_IPV4);
        buf[4] = 6;
        buf[5] = 4;
        put_be16(buf, 6, self.op.code());
        buf[8..14].copy_from_slice(&self.sender_mac.0);
        buf[14..18].copy_from_slice(&self.sender_ip.0);
        buf[18..24].copy_from_slice(&self.target_mac.0);
        buf[24..28].copy_from_slice(&self.target_ip.0);
        Ok(ARP_LEN)
    }

    /// A whole frame (Ethernet header, tag, ARP, padding); returns its length.
    pub fn write_frame(
        &self,
        buf: &mut [u8],
        dst: MacAddr,
        vlan: Option<u16>,
    ) -> Result<usize, BuildError> {
        let header = ethernet::write_header(buf, dst, self.sender_mac, vlan, ETHERTYPE_ARP)?;
        let body = self.write(&mut buf[header..])?;
        Ok(ethernet::pad_to_minimum(buf, header + body))
    }

    /// The reply to this request from the owner of `target_ip`.
    pub fn reply_from(&self, mac: MacAddr) -> Arp {
        Arp {
            op: ArpOp::Reply,
            sender_mac: mac,
            sender_ip: self.target_ip,
            target_mac: self.sender_mac,
            target_ip: self.sender_ip,
        }
    }

    /// Gratuitous ARP as Linux sends it when it announces an address: a
    /// broadcast request with sender and target IP both the address and the
    /// target MAC zero.
    pub fn gratuitous(mac: MacAddr, ip: Ipv4Addr) -> Arp {
        Arp {
            op: ArpOp::Request,
            sender_mac: mac,
            sender_ip: ip,
            target_mac: MacAddr::ZERO,
            target_ip: ip,
        }
    }

    pub fn is_gratuitous(&self) -> bool {
        self.sender_ip == self.target_ip
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests_util::hex;
    use crate::Ethernet;

    /// A who-has 192.168.1.1 tell 192.168.1.100 as seen on a wire.
    const REQUEST: &str = "ffffffffffff 000c293e5c7b 0806
        0001 0800 06 04 0001 000c293e5c7b c0a80164 000000000000 c0a80101
        000000000000000000000000000000000000";

    #[test]
    fn parses_a_captured_request() {
        let mut frame = [0u8; 64];
        let n = hex(REQUEST, &mut frame);
        assert_eq!(n, 60);
        let eth = Ethernet::parse(&frame[..n]).unwrap();
        assert_eq!(eth.ethertype, ETHERTYPE_ARP);
        let arp = Arp::parse(eth.payload).unwrap();
        assert_eq!(arp.op, ArpOp::Request);
        assert_eq!(arp.sender_mac.0, [0x00, 0x0c, 0x29, 0x3e, 0x5c, 0x7b]);
        assert_eq!(arp.sender_ip, Ipv4Addr([192, 168, 1, 100]));
        assert_eq!(arp.target_ip, Ipv4Addr([192, 168, 1, 1]));
        assert!(!arp.is_gratuitous());
    }

    #[test]
    fn builds_the_reply_byte_for_byte() {
        let mut frame = [0u8; 64];
        let n = hex(REQUEST, &mut frame);
        let request = Arp::parse(Ethernet::parse(&frame[..n]).unwrap().payload).unwrap();
        let ours = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        let mut out = [0xEEu8; 80];
        let len = request
            .reply_from(ours)
            .write_frame(&mut out, request.sender_mac, None)
            .unwrap();
        let mut expected = [0u8; 64];
        let m = hex(
            "000c293e5c7b 525400123456 0806
             0001 0800 06 04 0002 525400123456 c0a80101 000c293e5c7b c0a80164
             000000000000000000000000000000000000",
            &mut expected,
        );
        assert_eq!(&out[..len], &expected[..m]);
    }

    #[test]
    fn gratuitous_on_a_vlan() {
        let mac = MacAddr([0x02, 0, 0, 0, 0, 0x64]);
        let ip = Ipv4Addr([198, 18, 100, 2]);
        let mut out = [0u8; 80];
        let len = Arp::gratuitous(mac, ip)
            .write_frame(&mut out, MacAddr::BROADCAST, Some(100))
            .unwrap();
        assert_eq!(len, 60);
        let mut expected = [0u8; 64];
        let m = hex(
            "ffffffffffff 020000000064 8100 0064 0806
             0001 0800 06 04 0001 020000000064 c6126402 000000000000 c6126402
             0000000000000000000000000000",
            &mut expected,
        );
        assert_eq!(&out[..len], &expected[..m]);
        let eth = Ethernet::parse(&out[..len]).unwrap();
        assert_eq!(eth.vlan_id(), Some(100));
        let arp = Arp::parse(eth.payload).unwrap();
        assert!(arp.is_gratuitous());
    }

    #[test]
    fn rejects_other_protocols_and_short_bodies() {
        let mut body = [0u8; 28];
        Arp::gratuitous(MacAddr::ZERO, Ipv4Addr([1, 2, 3, 4]))
            .write(&mut body)
            .unwrap();
        assert_eq!(Arp::parse(&body[..27]), Err(ParseError::Truncated));
        body[3] = 0xdd; // protocol 0x08dd
        assert_eq!(Arp::parse(&body), Err(ParseError::Unsupported));
    }
}
