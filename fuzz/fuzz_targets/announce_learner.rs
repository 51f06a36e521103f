//! The announce learner: the identities (source MAC, VLAN) a guest's
//! frames teach the host, the set as it comes back from a stream, and the
//! RARP plan a round makes of them and of the guest's filter. The input
//! is a list of operations; after each the bounds the announcer relies on
//! are checked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use net::senders::{MAX_FALLBACK_FRAMES, MAX_SENDERS};
use net::{rarp_plan, MacAddr, Senders};

/// Takes `n` bytes off the front, or all that is left.
fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, rest) = data.split_at(n.min(data.len()));
    *data = rest;
    head
}

fn mac(bytes: &[u8]) -> MacAddr {
    let mut m = [0u8; 6];
    for (d, s) in m.iter_mut().zip(bytes) {
        *d = *s;
    }
    MacAddr(m)
}

fn check_plan(senders: &Senders, primary: MacAddr, macs: &[MacAddr], vlans: &[u16], since: u64) {
    let learned = senders.seen_since(since);
    let all = senders.all();
    assert!(learned.iter().all(|id| all.binary_search(id).is_ok()));
    let (plan, left_out) = rarp_plan(primary, macs, vlans, &learned);
    assert_eq!(plan[0], (primary, None), "the primary MAC comes first");
    assert!(plan.len() <= 1 + learned.len() + MAX_FALLBACK_FRAMES);
    let mut unique = plan.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), plan.len(), "an identity planned twice");
    for id in &learned {
        assert!(plan.contains(id), "a learned identity left out");
    }
    assert!(left_out <= macs.len() * (1 + vlans.len()));
    for &(m, vlan) in plan.iter().take(64) {
        let frame = net::rarp::rarp_frame(m, vlan);
        assert_eq!(&frame[6..12], &m.0, "the RARP's source is the identity");
    }
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let mut senders = Senders::default();
    let mut marks = vec![0u64];
    while let Some((&op, rest)) = data.split_first() {
        data = rest;
        match op % 5 {
            // A frame the guest sent (its first bytes, as the transmit
            // path hands them over, often shorter than a header).
            0 | 1 => {
                let len = take(&mut data, 1).first().copied().unwrap_or(0) as usize % 24;
                senders.record_frame(take(&mut data, len));
            }
            2 => marks.push(senders.mark()),
            // A round: the plan for what was learned since a mark.
            3 => {
                let head = take(&mut data, 3);
                let (nmacs, nvlans) = (
                    head.first().copied().unwrap_or(0) as usize % 8,
                    head.get(1).copied().unwrap_or(0) as usize % 8,
                );
                let since = marks[head.get(2).copied().unwrap_or(0) as usize % marks.len()];
                let primary = mac(take(&mut data, 6));
                let macs: Vec<MacAddr> = (0..nmacs).map(|_| mac(take(&mut data, 6))).collect();
                let vlans: Vec<u16> = (0..nvlans)
                    .map(|_| {
                        let b = take(&mut data, 2);
                        u16::from_le_bytes([b.first().copied().unwrap_or(0), b.get(1).copied().unwrap_or(0)])
                            & 0x0fff
                    })
                    .collect();
                check_plan(&senders, primary, &macs, &vlans, since);
            }
            // The set as a stream carries it: whatever the bytes say,
            // never more than the bound, and it saves back to itself.
            _ => {
                let len = take(&mut data, 1).first().copied().unwrap_or(0) as usize;
                if let Ok(restored) = serde_json::from_slice::<Senders>(take(&mut data, len)) {
                    assert!(restored.len() <= MAX_SENDERS);
                    let again: Senders =
                        serde_json::from_value(serde_json::to_value(&restored).unwrap()).unwrap();
                    assert_eq!(again.all(), restored.all());
                    senders = restored;
                    marks = vec![0];
                }
            }
        }
        assert!(senders.len() <= MAX_SENDERS);
    }
});
