//! The probe's network behaviour on one NIC: its identities (MAC, VLAN,
//! IPv4), ARP and ICMP echo answers, UDP echo (port 7) and sink (port 9),
//! the UDP source workload, and gratuitous ARPs on announce.

use ferry_probe_packets::ipv4::{write_icmp_echo_frame, write_udp_frame, Endpoints};
use ferry_probe_packets::{
    Arp, ArpOp, Ethernet, IcmpEcho, Ipv4, Ipv4Addr, MacAddr, Udp, ETHERTYPE_ARP, ETHERTYPE_IPV4,
    IP_PROTO_ICMP, IP_PROTO_UDP,
};

use crate::virtio_net::TxSide;

pub const MAX_IDS: usize = 16;
pub const UDP_ECHO_PORT: u16 = 7;
pub const UDP_SINK_PORT: u16 = 9;
/// Source port of the probe's own UDP traffic (udp-blast).
pub const UDP_SOURCE_PORT: u16 = 40_009;

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub mac: MacAddr,
    /// Whether `mac` is the device's own (as opposed to an extra MAC the
    /// device learns through MAC_TABLE_SET).
    pub device_mac: bool,
    pub vlan: Option<u16>,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    /// Never in the probe's own gratuitous ARPs.
    pub quiet: bool,
}

#[derive(Default, Clone, Copy)]
pub struct Counters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub arp_replies: u64,
    pub icmp_echo: u64,
    pub udp_echo: u64,
    pub udp_sink_frames: u64,
    pub udp_sink_bytes: u64,
    pub announces: u64,
    pub garps: u64,
    /// Frames not for any identity (other MAC, IP, VLAN, protocol, port).
    pub ignored: u64,
    /// Frames that do not parse (short, bad checksum, spanning buffers).
    pub malformed: u64,
}

#[derive(Clone, Copy)]
struct ArpEntry {
    vlan: Option<u16>,
    ip: Ipv4Addr,
    mac: MacAddr,
}

/// The UDP source: blasts datagrams from an identity to an address.
#[derive(Clone, Copy)]
pub struct Blast {
    pub from: usize,
    pub dst: Ipv4Addr,
    pub port: u16,
    pub size: usize,
    /// Frames per second; 0 = as fast as the queue takes them.
    pub rate: u64,
    pub count: u64,
    pub sent: u64,
    started_ns: u64,
    dst_mac: Option<MacAddr>,
    last_arp_ns: u64,
}

pub enum BlastEvent {
    Done { frames: u64, bytes: u64, ms: u64 },
    NoArpReply,
}

pub struct NetStack {
    pub ids: [Option<Identity>; MAX_IDS],
    pub counters: Counters,
    arp_cache: [Option<ArpEntry>; 16],
    arp_next: usize,
    ip_id: u16,
    pub blast: Option<Blast>,
}

impl NetStack {
    pub const fn new() -> NetStack {
        NetStack {
            ids: [None; MAX_IDS],
            counters: Counters {
                rx_frames: 0,
                rx_bytes: 0,
                arp_replies: 0,
                icmp_echo: 0,
                udp_echo: 0,
                udp_sink_frames: 0,
                udp_sink_bytes: 0,
                announces: 0,
                garps: 0,
                ignored: 0,
                malformed: 0,
            },
            arp_cache: [None; 16],
            arp_next: 0,
            ip_id: 1,
            blast: None,
        }
    }

    pub fn add_identity(&mut self, id: Identity) -> Result<(), &'static str> {
        if self
            .ids
            .iter()
            .flatten()
            .any(|i| i.ip == id.ip && i.vlan == id.vlan)
        {
            return Err("identity with that address on that vlan exists");
        }
        let slot = self
            .ids
            .iter_mut()
            .find(|s| s.is_none())
            .ok_or("too many identities")?;
        *slot = Some(id);
        Ok(())
    }

    pub fn remove_identity(&mut self, ip: Ipv4Addr, vlan: Option<Option<u16>>) -> Option<Identity> {
        let slot = self
            .ids
            .iter_mut()
            .find(|s| s.is_some_and(|i| i.ip == ip && vlan.is_none_or(|v| v == i.vlan)))?;
        slot.take()
    }

    /// The MACs besides `primary` the device must accept (MAC_TABLE_SET).
    pub fn extra_macs(&self, primary: MacAddr, out: &mut [MacAddr; MAX_IDS]) -> usize {
        let mut n = 0;
        for id in self.ids.iter().flatten() {
            if id.mac != primary && !out[..n].contains(&id.mac) {
                out[n] = id.mac;
                n += 1;
            }
        }
        n
    }

    /// The VLANs in use (VLAN_ADD).
    pub fn vlans(&self, out: &mut [u16; MAX_IDS]) -> usize {
        let mut n = 0;
        for vid in self.ids.iter().flatten().filter_map(|i| i.vlan) {
            if !out[..n].contains(&vid) {
                out[n] = vid;
                n += 1;
            }
        }
        n
    }

    fn identity_for(&self, vlan: Option<u16>, ip: Ipv4Addr) -> Option<Identity> {
        self.ids
            .iter()
            .flatten()
            .find(|i| i.vlan == vlan && i.ip == ip)
            .copied()
    }

    fn next_ip_id(&mut self) -> u16 {
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ip_id
    }

    fn learn(&mut self, vlan: Option<u16>, ip: Ipv4Addr, mac: MacAddr) {
        if mac.is_multicast() || ip == Ipv4Addr::UNSPECIFIED {
            return;
        }
        if let Some(e) = self
            .arp_cache
            .iter_mut()
            .flatten()
            .find(|e| e.vlan == vlan && e.ip == ip)
        {
            e.mac = mac;
            return;
        }
        self.arp_cache[self.arp_next] = Some(ArpEntry { vlan, ip, mac });
        self.arp_next = (self.arp_next + 1) % self.arp_cache.len();
    }

    fn lookup(&self, vlan: Option<u16>, ip: Ipv4Addr) -> Option<MacAddr> {
        self.arp_cache
            .iter()
            .flatten()
            .find(|e| e.vlan == vlan && e.ip == ip)
            .map(|e| e.mac)
    }

    /// One received frame (empty = a frame the driver had to drop).
    pub fn handle_frame(&mut self, frame: &[u8], tx: &mut TxSide) {
        self.counters.rx_frames += 1;
        self.counters.rx_bytes += frame.len() as u64;
        let Ok(eth) = Ethernet::parse(frame) else {
            self.counters.malformed += 1;
            return;
        };
        let vlan = eth.vlan_id();
        let for_us = eth.dst.is_broadcast()
            || self
                .ids
                .iter()
                .flatten()
                .any(|i| i.vlan == vlan && i.mac == eth.dst);
        if !for_us {
            self.counters.ignored += 1;
            return;
        }
        let handled = match eth.ethertype {
            ETHERTYPE_ARP => self.handle_arp(&eth, vlan, tx),
            ETHERTYPE_IPV4 if !eth.dst.is_broadcast() => self.handle_ipv4(&eth, vlan, tx),
            _ => Ok(false),
        };
        match handled {
            Ok(true) => {}
            Ok(false) => self.counters.ignored += 1,
            Err(()) => self.counters.malformed += 1,
        }
    }

    fn handle_arp(
        &mut self,
        eth: &Ethernet,
        vlan: Option<u16>,
        tx: &mut TxSide,
    ) -> Result<bool, ()> {
        let arp = Arp::parse(eth.payload).map_err(|_| ())?;
        let target = self.identity_for(vlan, arp.target_ip);
        if target.is_some() || self.lookup(vlan, arp.sender_ip).is_some() {
            self.learn(vlan, arp.sender_ip, arp.sender_mac);
        }
        let Some(id) = target else {
            return Ok(false);
        };
        if arp.op != ArpOp::Request || arp.is_gratuitous() {
            return Ok(arp.op == ArpOp::Reply);
        }
        let reply = arp.reply_from(id.mac);
        if tx.send(|buf| reply.write_frame(buf, arp.sender_mac, vlan).ok()) {
            self.counters.arp_replies += 1;
        }
        Ok(true)
    }

    fn handle_ipv4(
        &mut self,
        eth: &Ethernet,
        vlan: Option<u16>,
        tx: &mut TxSide,
    ) -> Result<bool, ()> {
        let ip = Ipv4::parse(eth.payload).map_err(|_| ())?;
        let Some(id) = self.identity_for(vlan, ip.dst) else {
            return Ok(false);
        };
        if id.mac != eth.dst || ip.fragment {
            return Ok(false);
        }
        let ends = Endpoints {
            src_mac: id.mac,
            dst_mac: eth.src,
            vlan,
            src_ip: id.ip,
            dst_ip: ip.src,
        };
        match ip.protocol {
            IP_PROTO_ICMP => {
                let echo = IcmpEcho::parse(ip.payload).map_err(|_| ())?;
                if !echo.is_request {
                    return Ok(false);
                }
                let reply = IcmpEcho {
                    is_request: false,
                    ..echo
                };
                let ip_id = self.next_ip_id();
                if tx.send(|buf| write_icmp_echo_frame(buf, &ends, ip_id, &reply).ok()) {
                    self.counters.icmp_echo += 1;
                }
                Ok(true)
            }
            IP_PROTO_UDP => {
                let udp = Udp::parse(ip.src, ip.dst, ip.payload).map_err(|_| ())?;
                match udp.dst_port {
                    UDP_ECHO_PORT => {
                        let reply = Udp {
                            src_port: udp.dst_port,
                            dst_port: udp.src_port,
                            data: udp.data,
                        };
                        let ip_id = self.next_ip_id();
                        if tx.send(|buf| write_udp_frame(buf, &ends, ip_id, &reply).ok()) {
                            self.counters.udp_echo += 1;
                        }
                        Ok(true)
                    }
                    UDP_SINK_PORT => {
                        self.counters.udp_sink_frames += 1;
                        self.counters.udp_sink_bytes += udp.data.len() as u64;
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            }
            _ => Ok(false),
        }
    }

    /// One announce round: a gratuitous ARP per identity, tagged on its
    /// VLAN. Returns how many were queued.
    pub fn send_garps(&mut self, tx: &mut TxSide) -> u64 {
        let mut sent = 0;
        for id in self.ids.iter().flatten().filter(|i| !i.quiet) {
            let garp = Arp::gratuitous(id.mac, id.ip);
            if tx.send(|buf| garp.write_frame(buf, MacAddr::BROADCAST, id.vlan).ok()) {
                sent += 1;
            }
        }
        tx.flush();
        self.counters.garps += sent;
        self.counters.announces += 1;
        sent
    }

    pub fn start_blast(
        &mut self,
        from_ip: Ipv4Addr,
        dst: Ipv4Addr,
        port: u16,
        size: usize,
        rate: u64,
        count: u64,
    ) -> Result<(), &'static str> {
        let from = self
            .ids
            .iter()
            .position(|s| s.is_some_and(|i| i.ip == from_ip))
            .ok_or("no identity with that source address")?;
        if !(8..=1472).contains(&size) {
            return Err("size must be 8..1472 bytes of UDP payload");
        }
        self.blast = Some(Blast {
            from,
            dst,
            port,
            size,
            rate,
            count,
            sent: 0,
            started_ns: 0,
            dst_mac: None,
            last_arp_ns: 0,
        });
        Ok(())
    }

    /// Advances the UDP source; returns an event when it ends.
    pub fn step_blast(&mut self, now_ns: u64, tx: &mut TxSide) -> Option<BlastEvent> {
        let mut blast = self.blast?;
        let Some(id) = self.ids[blast.from] else {
            self.blast = None;
            return Some(BlastEvent::NoArpReply);
        };
        if blast.dst_mac.is_none() {
            blast.dst_mac = self.lookup(id.vlan, blast.dst);
            if blast.dst_mac.is_none() {
                if blast.started_ns == 0 {
                    blast.started_ns = now_ns;
                } else if now_ns - blast.started_ns > 3_000_000_000 {
                    self.blast = None;
                    return Some(BlastEvent::NoArpReply);
                }
                if blast.last_arp_ns == 0 || now_ns - blast.last_arp_ns > 200_000_000 {
                    blast.last_arp_ns = now_ns;
                    let request = Arp {
                        op: ArpOp::Request,
                        sender_mac: id.mac,
                        sender_ip: id.ip,
                        target_mac: MacAddr::ZERO,
                        target_ip: blast.dst,
                    };
                    tx.send(|buf| request.write_frame(buf, MacAddr::BROADCAST, id.vlan).ok());
                    tx.flush();
                }
                self.blast = Some(blast);
                return None;
            }
            blast.started_ns = now_ns;
        }
        let dst_mac = blast.dst_mac?;
        let due = if blast.rate == 0 {
            blast.count
        } else {
            ((now_ns - blast.started_ns) as u128 * blast.rate as u128 / 1_000_000_000) as u64 + 1
        };
        let ends = Endpoints {
            src_mac: id.mac,
            dst_mac,
            vlan: id.vlan,
            src_ip: id.ip,
            dst_ip: blast.dst,
        };
        let mut payload = [0u8; 1472];
        let mut batch = 0;
        while blast.sent < due.min(blast.count) && batch < 64 && tx.free_slots() > 0 {
            payload[..8].copy_from_slice(&blast.sent.to_be_bytes());
            let udp = Udp {
                src_port: UDP_SOURCE_PORT,
                dst_port: blast.port,
                data: &payload[..blast.size],
            };
            let ip_id = self.next_ip_id();
            if !tx.send(|buf| write_udp_frame(buf, &ends, ip_id, &udp).ok()) {
                break;
            }
            blast.sent += 1;
            batch += 1;
        }
        tx.flush();
        tx.reclaim();
        if blast.sent >= blast.count {
            self.blast = None;
            let ms = (now_ns - blast.started_ns) / 1_000_000;
            return Some(BlastEvent::Done {
                frames: blast.sent,
                bytes: blast.sent * blast.size as u64,
                ms,
            });
        }
        self.blast = Some(blast);
        None
    }
}
