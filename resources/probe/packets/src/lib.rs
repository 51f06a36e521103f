//! Builders and parsers for the frames Ferry's probe guest speaks:
//! Ethernet II with an optional 802.1Q tag, ARP for IPv4 over Ethernet,
//! IPv4, ICMP echo and UDP, and the Internet checksum.
//!
//! `no_std` and allocation-free: parsers borrow from the frame, builders
//! write into a caller's buffer and return the length written. Every parser
//! checks lengths before reading, so any byte string is a safe input.
#![no_std]

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod ipv4;

pub use arp::{Arp, ArpOp};
pub use ethernet::{Ethernet, MacAddr, VlanTag};
pub use ipv4::{IcmpEcho, Ipv4, Ipv4Addr, Udp};

/// Why a frame was not understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than its headers say.
    Truncated,
    /// A field has a value this crate does not handle (e.g. IPv4 options
    /// length below 20, an ARP for another protocol).
    Unsupported,
    /// A checksum does not verify.
    BadChecksum,
}

/// Why a frame could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildError {
    /// The output buffer is too small.
    BufferTooSmall,
    /// The payload does not fit the protocol's length fields.
    TooLong,
}

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const ETHERTYPE_RARP: u16 = 0x8035;

pub const IP_PROTO_ICMP: u8 = 1;
pub const IP_PROTO_UDP: u8 = 17;

/// Frames shorter than this (without FCS) are padded on the wire.
pub const ETHERNET_MIN_FRAME: usize = 60;

pub(crate) fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

pub(crate) fn put_be16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

#[cfg(test)]
pub(crate) mod tests_util {
    /// Formats into a fixed buffer (the crate has no allocator).
    pub struct Writer<'a> {
        buf: &'a mut [u8],
        len: usize,
    }

    impl<'a> Writer<'a> {
        pub fn new(buf: &'a mut [u8]) -> Self {
            Writer { buf, len: 0 }
        }
    }

    impl core::fmt::Write for Writer<'_> {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let end = self.len + s.len();
            if end > self.buf.len() {
                return Err(core::fmt::Error);
            }
            self.buf[self.len..end].copy_from_slice(s.as_bytes());
            self.len = end;
            Ok(())
        }
    }

    /// Decodes a hex string with whitespace into `out`, returning its length.
    pub fn hex(text: &str, out: &mut [u8]) -> usize {
        let digits = text.bytes().filter(|b| !b.is_ascii_whitespace());
        let mut n = 0;
        let mut high: Option<u8> = None;
        for d in digits {
            let v = (d as char).to_digit(16).expect("hex digit") as u8;
            match high.take() {
                None => high = Some(v),
                Some(h) => {
                    out[n] = h << 4 | v;
                    n += 1;
                }
            }
        }
        n
    }
}
