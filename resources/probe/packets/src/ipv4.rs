//! IPv4 (no options written, options skipped when read), ICMP echo and UDP.

use crate::checksum::{internet_checksum, Checksum};
use crate::ethernet::{self, MacAddr};
use crate::{be16, put_be16, BuildError, ParseError, ETHERTYPE_IPV4, IP_PROTO_ICMP, IP_PROTO_UDP};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Ipv4Addr(pub [u8; 4]);

impl Ipv4Addr {
    pub const UNSPECIFIED: Ipv4Addr = Ipv4Addr([0; 4]);

    /// Parses dotted-quad text.
    pub fn parse(text: &str) -> Option<Ipv4Addr> {
        let mut addr = [0u8; 4];
        let mut parts = text.split('.');
        for byte in &mut addr {
            let part = parts.next()?;
            if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            *byte = part.parse().ok()?;
        }
        if parts.next().is_some() {
            return None;
        }
        Some(Ipv4Addr(addr))
    }

    pub fn to_u32(self) -> u32 {
        u32::from_be_bytes(self.0)
    }

    /// Whether `other` is on the same `/prefix` network as `self`.
    pub fn same_subnet(self, other: Ipv4Addr, prefix: u8) -> bool {
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix.min(32) as u32)
        };
        self.to_u32() & mask == other.to_u32() & mask
    }
}

impl core::fmt::Display for Ipv4Addr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let a = self.0;
        write!(f, "{}.{}.{}.{}", a[0], a[1], a[2], a[3])
    }
}

/// A parsed IPv4 packet (header checksum verified).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub ttl: u8,
    /// True when this is a fragment (MF set or offset nonzero).
    pub fragment: bool,
    /// The payload, cut to the header's total length (Ethernet padding off).
    pub payload: &'a [u8],
}

const IPV4_HEADER: usize = 20;

impl<'a> Ipv4<'a> {
    pub fn parse(packet: &'a [u8]) -> Result<Ipv4<'a>, ParseError> {
        if packet.len() < IPV4_HEADER {
            return Err(ParseError::Truncated);
        }
        if packet[0] >> 4 != 4 {
            return Err(ParseError::Unsupported);
        }
        let header_len = (packet[0] & 0x0F) as usize * 4;
        let total = be16(packet, 2) as usize;
        if header_len < IPV4_HEADER {
            return Err(ParseError::Unsupported);
        }
        if total < header_len || packet.len() < total {
            return Err(ParseError::Truncated);
        }
        if internet_checksum(&packet[..header_len]) != 0 {
            return Err(ParseError::BadChecksum);
        }
        let flags_offset = be16(packet, 6);
        Ok(Ipv4 {
            src: Ipv4Addr([packet[12], packet[13], packet[14], packet[15]]),
            dst: Ipv4Addr([packet[16], packet[17], packet[18], packet[19]]),
            protocol: packet[9],
            ttl: packet[8],
            fragment: flags_offset & 0x3FFF != 0,
            payload: &packet[header_len..total],
        })
    }
}

/// Writes a 20-byte IPv4 header for `payload_len` bytes of payload.
pub fn write_header(
    buf: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    id: u16,
    payload_len: usize,
) -> Result<usize, BuildError> {
    if buf.len() < IPV4_HEADER {
        return Err(BuildError::BufferTooSmall);
    }
    let total = IPV4_HEADER + payload_len;
    if total > u16::MAX as usize {
        return Err(BuildError::TooLong);
    }
    buf[0] = 0x45;
    buf[1] = 0;
    put_be16(buf, 2, total as u16);
    put_be16(buf, 4, id);
    put_be16(buf, 6, 0x4000); // don't fragment
    buf[8] = 64;
    buf[9] = protocol;
    put_be16(buf, 10, 0);
    buf[12..16].copy_from_slice(&src.0);
    buf[16..20].copy_from_slice(&dst.0);
    let sum = internet_checksum(&buf[..IPV4_HEADER]);
    put_be16(buf, 10, sum);
    Ok(IPV4_HEADER)
}

/// An ICMP echo request or reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpEcho<'a> {
    pub is_request: bool,
    pub id: u16,
    pub seq: u16,
    pub data: &'a [u8],
}

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;

impl<'a> IcmpEcho<'a> {
    /// Parses an ICMP message; `Unsupported` for anything but echo.
    pub fn parse(message: &'a [u8]) -> Result<IcmpEcho<'a>, ParseError> {
        if message.len() < 8 {
            return Err(ParseError::Truncated);
        }
        if internet_checksum(message) != 0 {
            return Err(ParseError::BadChecksum);
        }
        let is_request = match (message[0], message[1]) {
            (ICMP_ECHO_REQUEST, 0) => true,
            (ICMP_ECHO_REPLY, 0) => false,
            _ => return Err(ParseError::Unsupported),
        };
        Ok(IcmpEcho {
            is_request,
            id: be16(message, 4),
            seq: be16(message, 6),
            data: &message[8..],
        })
    }

    pub fn write(&self, buf: &mut [u8]) -> Result<usize, BuildError> {
        let len = 8 + self.data.len();
        if buf.len() < len {
            return Err(BuildError::BufferTooSmall);
        }
        buf[0] = if self.is_request {
            ICMP_ECHO_REQUEST
        } else {
            ICMP_ECHO_REPLY
        };
        buf[1] = 0;
        put_be16(buf, 2, 0);
        put_be16(buf, 4, self.id);
        put_be16(buf, 6, self.seq);
        buf[8..len].copy_from_slice(self.data);
        let sum = internet_checksum(&buf[..len]);
        put_be16(buf, 2, sum);
        Ok(len)
    }
}

/// A UDP datagram (checksum verified when nonzero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Udp<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub data: &'a [u8],
}

fn udp_checksum(src: Ipv4Addr, dst: Ipv4Addr, datagram: &[u8]) -> u16 {
    let mut sum = Checksum::new();
    sum.add_bytes(&src.0)
        .add_bytes(&dst.0)
        .add_word(IP_PROTO_UDP as u16)
        .add_word(datagram.len() as u16)
        .add_bytes(datagram);
    sum.finish()
}

impl<'a> Udp<'a> {
    pub fn parse(src: Ipv4Addr, dst: Ipv4Addr, datagram: &'a [u8]) -> Result<Udp<'a>, ParseError> {
        if datagram.len() < 8 {
            return Err(ParseError::Truncated);
        }
        let len = be16(datagram, 4) as usize;
        if len < 8 || len > datagram.len() {
            return Err(ParseError::Truncated);
        }
        let datagram = &datagram[..len];
        if be16(datagram, 6) != 0 && udp_checksum(src, dst, datagram) != 0 {
            return Err(ParseError::BadChecksum);
        }
        Ok(Udp {
            src_port: be16(datagram, 0),
            dst_port: be16(datagram, 2),
            data: &datagram[8..],
        })
    }

    /// Writes the datagram with its checksum (which covers the addresses).
    pub fn write(&self, buf: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr) -> Result<usize, BuildError> {
        let len = 8 + self.data.len();
        if len > u16::MAX as usize {
            return Err(BuildError::TooLong);
        }
        if buf.len() < len {
            return Err(BuildError::BufferTooSmall);
        }
        put_be16(buf, 0, self.src_port);
        put_be16(buf, 2, self.dst_port);
        put_be16(buf, 4, len as u16);
        put_be16(buf, 6, 0);
        buf[8..len].copy_from_slice(self.data);
        let sum = match udp_checksum(src, dst, &buf[..len]) {
            0 => 0xFFFF, // zero means "no checksum" in UDP over IPv4
            s => s,
        };
        put_be16(buf, 6, sum);
        Ok(len)
    }
}

/// Addresses of one side of a frame: where it goes on the link and in IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub vlan: Option<u16>,
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
}

/// A whole Ethernet + IPv4 + UDP frame; returns its length.
pub fn write_udp_frame(
    buf: &mut [u8],
    ends: &Endpoints,
    ip_id: u16,
    udp: &Udp<'_>,
) -> Result<usize, BuildError> {
    let eth = ethernet::write_header(buf, ends.dst_mac, ends.src_mac, ends.vlan, ETHERTYPE_IPV4)?;
    let udp_len = 8 + udp.data.len();
    let ip = write_header(
        &mut buf[eth..],
        ends.src_ip,
        ends.dst_ip,
        IP_PROTO_UDP,
        ip_id,
        udp_len,
    )?;
    let n = udp.write(&mut buf[eth + ip..], ends.src_ip, ends.dst_ip)?;
    Ok(ethernet::pad_to_minimum(buf, eth + ip + n))
}

/// A whole Ethernet + IPv4 + ICMP echo frame; returns its length.
pub fn write_icmp_echo_frame(
    buf: &mut [u8],
    ends: &Endpoints,
    ip_id: u16,
    echo: &IcmpEcho<'_>,
) -> Result<usize, BuildError> {
    let eth = ethernet::write_header(buf, ends.dst_mac, ends.src_mac, ends.vlan, ETHERTYPE_IPV4)?;
    let icmp_len = 8 + echo.data.len();
    let ip = write_header(
        &mut buf[eth..],
        ends.src_ip,
        ends.dst_ip,
        IP_PROTO_ICMP,
        ip_id,
        icmp_len,
    )?;
    let n = echo.write(&mut buf[eth + ip..])?;
    Ok(ethernet::pad_to_minimum(buf, eth + ip + n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Ethernet;

    const A: Ipv4Addr = Ipv4Addr([198, 18, 0, 1]);
    const B: Ipv4Addr = Ipv4Addr([198, 18, 0, 2]);

    #[test]
    fn address_text() {
        assert_eq!(Ipv4Addr::parse("198.18.0.2"), Some(B));
        assert_eq!(Ipv4Addr::parse("198.18.0"), None);
        assert_eq!(Ipv4Addr::parse("198.18.0.256"), None);
        assert_eq!(Ipv4Addr::parse("198.18.0.2.1"), None);
        assert_eq!(Ipv4Addr::parse("198.18.+0.2"), None);
        assert!(A.same_subnet(B, 24));
        assert!(!A.same_subnet(Ipv4Addr([198, 19, 0, 1]), 16));
        assert!(A.same_subnet(Ipv4Addr([198, 19, 0, 1]), 15));
        assert!(A.same_subnet(Ipv4Addr([1, 2, 3, 4]), 0));
    }

    #[test]
    fn icmp_echo_known_checksum() {
        // The echo request Windows' ping sends (id 1, seq 1): checksum 4d5a.
        let data = b"abcdefghijklmnopqrstuvwabcdefghi";
        let echo = IcmpEcho {
            is_request: true,
            id: 1,
            seq: 1,
            data,
        };
        let mut buf = [0u8; 64];
        let n = echo.write(&mut buf).unwrap();
        assert_eq!(n, 40);
        assert_eq!(&buf[..8], &[8, 0, 0x4d, 0x5a, 0, 1, 0, 1]);
        assert_eq!(IcmpEcho::parse(&buf[..n]).unwrap(), echo);
        buf[9] ^= 1;
        assert_eq!(IcmpEcho::parse(&buf[..n]), Err(ParseError::BadChecksum));
    }

    #[test]
    fn udp_frame_known_checksums() {
        // 198.18.0.1:40000 -> 198.18.0.2:7 "hello", IP id 0x1234: header
        // checksum 9c70 and UDP checksum 9392, computed independently.
        let ends = Endpoints {
            src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            vlan: None,
            src_ip: A,
            dst_ip: B,
        };
        let udp = Udp {
            src_port: 40000,
            dst_port: 7,
            data: b"hello",
        };
        let mut buf = [0u8; 128];
        let n = write_udp_frame(&mut buf, &ends, 0x1234, &udp).unwrap();
        assert_eq!(n, 60); // 14 + 20 + 13, padded
        assert_eq!(&buf[14 + 10..14 + 12], &[0x9c, 0x70]);
        assert_eq!(&buf[34 + 6..34 + 8], &[0x93, 0x92]);
        let eth = Ethernet::parse(&buf[..n]).unwrap();
        let ip = Ipv4::parse(eth.payload).unwrap();
        assert_eq!(
            (ip.src, ip.dst, ip.protocol, ip.fragment),
            (A, B, IP_PROTO_UDP, false)
        );
        // Total length cuts the Ethernet padding off.
        assert_eq!(ip.payload.len(), 13);
        assert_eq!(Udp::parse(ip.src, ip.dst, ip.payload).unwrap(), udp);
        // A wrong pseudo-header (other destination) fails the checksum.
        assert_eq!(Udp::parse(A, A, ip.payload), Err(ParseError::BadChecksum));
    }

    #[test]
    fn malformed_ipv4_is_rejected() {
        let mut buf = [0u8; 40];
        write_header(&mut buf, A, B, IP_PROTO_UDP, 1, 20).unwrap();
        assert!(Ipv4::parse(&buf).is_ok());
        assert_eq!(Ipv4::parse(&buf[..39]), Err(ParseError::Truncated));
        let mut bad = buf;
        bad[15] ^= 0xff;
        assert_eq!(Ipv4::parse(&bad), Err(ParseError::BadChecksum));
        let mut short_ihl = buf;
        short_ihl[0] = 0x44;
        assert_eq!(Ipv4::parse(&short_ihl), Err(ParseError::Unsupported));
        let mut v6 = buf;
        v6[0] = 0x60;
        assert_eq!(Ipv4::parse(&v6), Err(ParseError::Unsupported));
        assert_eq!(Udp::parse(A, B, &[0; 7]), Err(ParseError::Truncated));
    }

    #[test]
    fn tagged_icmp_reply_frame() {
        let ends = Endpoints {
            src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            vlan: Some(100),
            src_ip: B,
            dst_ip: A,
        };
        let echo = IcmpEcho {
            is_request: false,
            id: 7,
            seq: 9,
            data: &[0x55; 56],
        };
        let mut buf = [0u8; 200];
        let n = write_icmp_echo_frame(&mut buf, &ends, 1, &echo).unwrap();
        assert_eq!(n, 18 + 20 + 64);
        let eth = Ethernet::parse(&buf[..n]).unwrap();
        assert_eq!(eth.vlan_id(), Some(100));
        let ip = Ipv4::parse(eth.payload).unwrap();
        assert_eq!(IcmpEcho::parse(ip.payload).unwrap(), echo);
    }
}
