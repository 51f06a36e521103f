//! Who the guest is on the wire: the (source MAC, VLAN) pairs of the
//! frames it sends, learned on the transmit path. An announce after a
//! migration moves exactly these on the switch (plus the primary MAC
//! untagged), instead of every MAC of the filter on every VLAN of the
//! filter — 266,000 frames a round for 64 MACs and 4094 VLANs, most for
//! identities nobody uses. The set is bounded and travels with the NIC's
//! saved state.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::MacAddr;

/// A MAC on a VLAN (`None`: untagged).
pub type Identity = (MacAddr, Option<u16>);

/// Most identities learned per NIC; beyond it new ones are counted, not
/// kept (the announce then falls back to the filter for their MACs).
pub const MAX_SENDERS: usize = 4096;

/// Most frames one round sends for MACs the guest never sent from (the
/// filter's cross product, the fallback).
pub const MAX_FALLBACK_FRAMES: usize = 1024;

/// The identities the guest sent from, each with the announce mark that
/// was current when it was last seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Senders {
    seen: HashMap<Identity, u64>,
    mark: u64,
    /// The last identity recorded under the current mark: most frames
    /// come from it, and need no lookup.
    last: Option<Identity>,
    /// Identities not kept because the set was full.
    pub overflow: u64,
}

impl Senders {
    /// Notes a frame the guest sent, from its Ethernet header (the bytes
    /// after the vnet header; shorter is ignored). Group source MACs are
    /// not identities.
    pub fn record_frame(&mut self, header: &[u8]) {
        let Some(src) = header.get(6..12) else {
            return;
        };
        let mut mac = [0u8; 6];
        mac.copy_from_slice(src);
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return;
        }
        let vlan = match header.get(12..16) {
            Some([0x81, 0x00, hi, lo]) => Some(u16::from_be_bytes([*hi, *lo]) & 0x0fff),
            _ => None,
        };
        self.record((MacAddr(mac), vlan));
    }

    pub fn record(&mut self, id: Identity) {
        if self.last == Some(id) {
            return;
        }
        let full = self.seen.len() >= MAX_SENDERS;
        match self.seen.get_mut(&id) {
            Some(mark) => *mark = self.mark,
            None if full => {
                self.overflow += 1;
                return;
            }
            None => {
                self.seen.insert(id, self.mark);
            }
        }
        self.last = Some(id);
    }

    /// Starts a new period (an announce round); returns its mark for
    /// [`Self::seen_since`].
    pub fn mark(&mut self) -> u64 {
        self.mark += 1;
        self.last = None;
        self.mark
    }

    /// Identities the guest sent from since `mark` was taken.
    pub fn seen_since(&self, mark: u64) -> Vec<Identity> {
        let mut v: Vec<Identity> = self
            .seen
            .iter()
            .filter(|(_, &m)| m >= mark)
            .map(|(id, _)| *id)
            .collect();
        v.sort();
        v
    }

    /// Every identity learned, sorted.
    pub fn all(&self) -> Vec<Identity> {
        let mut v: Vec<Identity> = self.seen.keys().copied().collect();
        v.sort();
        v
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// What one RARP round announces for a NIC: the primary MAC untagged,
/// every identity the guest sent from, and — for each MAC of the guest's
/// filter it never sent from — that MAC untagged and on each VLAN of the
/// filter, at most [`MAX_FALLBACK_FRAMES`] of those. Returns the plan and
/// how many fallback identities the cap left out.
pub fn rarp_plan(
    primary: MacAddr,
    filter_macs: &[MacAddr],
    filter_vlans: &[u16],
    senders: &[Identity],
) -> (Vec<Identity>, usize) {
    let mut plan = vec![(primary, None)];
    let mut planned: HashSet<Identity> = plan.iter().copied().collect();
    for id in senders {
        if planned.insert(*id) {
            plan.push(*id);
        }
    }
    // Runs on the event loop once a round: linear in what it plans, not
    // in the filter's size (64 MACs x 4094 VLANs are 262,080 candidates).
    let sending: HashSet<MacAddr> = senders.iter().map(|(m, _)| *m).collect();
    let per_mac = 1 + filter_vlans.len();
    let mut budget = MAX_FALLBACK_FRAMES;
    let mut left_out = 0;
    let mut done_macs = HashSet::new();
    for &mac in filter_macs {
        if sending.contains(&mac) || !done_macs.insert(mac) {
            continue;
        }
        let vlans = std::iter::once(None).chain(filter_vlans.iter().map(|&v| Some(v)));
        for (k, vlan) in vlans.enumerate() {
            let id = (mac, vlan);
            if planned.contains(&id) {
                continue;
            }
            if budget == 0 {
                left_out += per_mac - k;
                break;
            }
            planned.insert(id);
            plan.push(id);
            budget -= 1;
        }
    }
    (plan, left_out)
}

impl Serialize for Senders {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.all().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Senders {
    /// A list from the stream; more than [`MAX_SENDERS`] is cut there.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list: Vec<Identity> = Vec::deserialize(d)?;
        let mut s = Senders::default();
        for id in list.into_iter().take(MAX_SENDERS) {
            s.seen.insert(id, 0);
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xa]);
    const B: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xb]);

    fn header(src: MacAddr, vlan: Option<u16>) -> Vec<u8> {
        let mut h = vec![0xff; 6];
        h.extend_from_slice(&src.0);
        if let Some(v) = vlan {
            h.extend_from_slice(&[0x81, 0x00]);
            h.extend_from_slice(&(v | 0x2000).to_be_bytes());
        }
        h.extend_from_slice(&[0x08, 0x06]);
        h
    }

    #[test]
    fn learns_mac_and_vlan_from_frames_and_ignores_group_sources() {
        let mut s = Senders::default();
        s.record_frame(&header(A, None));
        s.record_frame(&header(A, Some(100)));
        s.record_frame(&header(MacAddr([3, 0, 0, 0, 0, 1]), None));
        s.record_frame(&header(MacAddr([0; 6]), None));
        s.record_frame(&[1, 2, 3]);
        assert_eq!(s.all(), vec![(A, None), (A, Some(100))]);
    }

    #[test]
    fn seen_since_a_mark_is_what_the_guest_sent_in_the_round() {
        let mut s = Senders::default();
        s.record((A, None));
        s.record((B, Some(7)));
        let m = s.mark();
        assert!(s.seen_since(m).is_empty());
        s.record((A, None));
        assert_eq!(s.seen_since(m), vec![(A, None)]);
    }

    #[test]
    fn the_set_is_bounded_and_survives_the_stream() {
        let mut s = Senders::default();
        for i in 0..(MAX_SENDERS as u32 + 10) {
            let b = i.to_be_bytes();
            s.record((MacAddr([2, 0, b[0], b[1], b[2], b[3]]), None));
        }
        assert_eq!(s.len(), MAX_SENDERS);
        assert_eq!(s.overflow, 10);
        let json = serde_json::to_string(&s).unwrap();
        let back: Senders = serde_json::from_str(&json).unwrap();
        assert_eq!(back.all(), s.all());
    }

    #[test]
    fn the_plan_is_the_senders_plus_a_capped_fallback() {
        // The guest sent from A on VLAN 5 only; B it never used.
        let (plan, left) = rarp_plan(A, &[A, B], &[5, 6], &[(A, Some(5))]);
        assert_eq!(
            plan,
            vec![
                (A, None),
                (A, Some(5)),
                (B, None),
                (B, Some(5)),
                (B, Some(6))
            ]
        );
        assert_eq!(left, 0);
        // 64 MACs on 4094 VLANs, none ever used: bounded.
        let macs: Vec<MacAddr> = (0..64).map(|i| MacAddr([2, 0, 0, 0, 1, i])).collect();
        let vlans: Vec<u16> = (1..=4094).collect();
        let (plan, left) = rarp_plan(macs[0], &macs, &vlans, &[]);
        assert_eq!(plan.len(), 1 + MAX_FALLBACK_FRAMES);
        assert_eq!(left, 64 * 4095 - 1 - MAX_FALLBACK_FRAMES);
        // The same guest, having sent from each MAC once: 64 frames.
        let senders: Vec<Identity> = macs.iter().map(|&m| (m, Some(10))).collect();
        let (plan, _) = rarp_plan(macs[0], &macs, &vlans, &senders);
        assert_eq!(plan.len(), 65);
    }
}
