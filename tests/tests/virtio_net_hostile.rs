//! Hostile input for virtio-net (issue #4, item 6): a malicious driver
//! (`ferry_tests::virtio_driver`) programs a real `MmioTransport<Net>` over
//! real guest memory and a real TAP in a namespace of its own, feeds it
//! crafted descriptor chains, rings and control commands, and checks for
//! each case that the device refused it visibly (a `NetMetrics` counter,
//! a status or interrupt bit, the log line that says why), wrote nothing
//! outside what it was given, and still serves: a valid frame reaches the
//! TAP, an injected one reaches the guest, a valid control command is
//! answered VIRTIO_NET_OK. Register-level abuse of the transport is in
//! `virtio_mmio_hostile.rs`.

use std::time::Instant;

use devices::virtio::net::device::{CTRL_QUEUE, MAX_FRAME_LEN, RX_QUEUE, TX_QUEUE};
use devices::virtio::{VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1};
use ferry_tests::virtio_driver::net_rig::*;
use ferry_tests::virtio_driver::{logcap, Desc, Prng};
use net::{MacAddr, Nic};
use virtio_bindings::virtio_net::*;

// ---- TX ----

#[test]
fn tx_descriptor_outside_guest_memory() {
    case("tx_descriptor_outside_guest_memory", all(), |r| {
        r.tx_refused(&[
            &[Desc::read(HOLE, 100)],
            &[Desc::read(END_A - 16, 64)], // runs off the end of a region
            &[Desc::read(FAR, 64)],
            &[Desc::read(slot(1), 12), Desc::read(HOLE, 64)],
        ]);
    });
}

#[test]
fn tx_chain_that_loops() {
    case("tx_chain_that_loops", all(), |r| {
        let t = r.drv.queues[TX_QUEUE].layout.desc;
        let d = |next| Desc::read(slot(1), 64).then(next);
        r.drv.put_desc(t, 200, d(201));
        r.drv.put_desc(t, 201, d(200)); // back to the head
        r.drv.put_desc(t, 202, d(202)); // onto itself
        r.drv.put_desc(t, 203, d(999)); // next beyond the table
        for head in 200..204 {
            r.drv.publish(TX_QUEUE, head);
        }
        r.kick_refused(TX_QUEUE, 4);
    });
}

#[test]
fn tx_write_only_zero_and_huge_lengths() {
    case("tx_write_only_zero_and_huge_lengths", all(), |r| {
        r.tx_refused(&[
            &[Desc::write(slot(1), 100)],
            &[Desc::read(slot(1), 0)],
            &[Desc::read(slot(1), u32::MAX)],
            &[
                Desc::read(slot(1), 0x8000_0000),
                Desc::read(slot(1), 0x8000_0000),
            ],
        ]);
    });
}

#[test]
fn tx_indirect_table_bad_length_or_nesting() {
    case("tx_indirect_table_bad_length_or_nesting", all(), |r| {
        let (t1, t2) = (slot(2), slot(3));
        r.drv.put_desc(t1, 0, Desc::indirect(t2, 16)); // nested
        r.drv.put_desc(t2, 0, Desc::read(slot(1), 64).then(7));
        r.tx_refused(&[
            &[Desc::indirect(t2, 17)],
            &[Desc::indirect(t2, 0)],
            &[Desc::indirect(HOLE, 32)],
            &[Desc::indirect(t1, 16)],
            &[Desc::indirect(t2, 32)], // its next (7) is beyond the table
            &[Desc::indirect(t2, 16 * 65_536)],
        ]);
        // A good indirect table is sent.
        r.drv.write_mem(slot(4) - 12, &[0; 12]);
        r.drv.write_mem(slot(4), &frame([0xff; 6], MAC, 0, 72));
        r.drv.put_desc(t2, 0, Desc::read(slot(4) - 12, 84));
        r.drv.chain(TX_QUEUE, &[Desc::indirect(t2, 16)]);
        r.kick(TX_QUEUE);
        assert_eq!(r.drv.take_used(TX_QUEUE).len(), 1);
        assert_eq!(r.m().tx_frames, 1);
    });
}

#[test]
fn tx_frame_shorter_than_header_or_longer_than_maximum() {
    case("tx_frame_short_or_long", all(), |r| {
        let max = MAX_FRAME_LEN as u32;
        r.tx_refused(&[
            &[Desc::read(slot(1), 11)],
            &[Desc::read(slot(1), max + 1)],
            &[Desc::read(slot(1), max), Desc::read(slot(1), 1)],
        ]);
    });
}

#[test]
fn tx_head_index_beyond_queue_size() {
    case("tx_head_index_beyond_queue_size", all(), |r| {
        r.drv.publish(TX_QUEUE, 256);
        r.kick(TX_QUEUE);
        r.assert_needs_reset("tx used ring");
    });
}

#[test]
fn tx_avail_index_far_beyond_queue_size() {
    case("tx_avail_index_far_beyond_queue_size", all(), |r| {
        let idx = r.drv.queues[TX_QUEUE].avail_idx;
        r.drv.set_avail_idx(TX_QUEUE, idx.wrapping_add(300));
        r.arm();
        r.kick(TX_QUEUE);
        r.untouched(&[]);
        r.assert_needs_reset("tx avail ring");
        // Stopped means stopped: more notifications do nothing.
        r.kick(TX_QUEUE);
        assert_eq!(r.m().tx_frames, 0);
    });
}

// ---- RX ----

/// With `bad` unusable buffers posted: an injected frame waits, then
/// lands in a good buffer; the bad ones come back empty and untouched.
fn rx_refuses(r: &mut Rig, bad: usize) {
    let marker = r.next_marker();
    let f = frame(MAC, PEER, marker, 100);
    r.arm();
    r.inject(&f);
    r.untouched(&[]);
    assert!(r.drv.take_used(RX_QUEUE).is_empty(), "nothing usable yet");
    assert!(r.m().bad_descriptors >= bad as u64);
    assert!(
        !r.net().wants_tap(),
        "waits for buffers, not reading the TAP"
    );
    let good = slot(30)..slot(30) + 2048;
    r.post(&[Desc::write(good.start, 2048)]);
    r.arm();
    r.kick(RX_QUEUE);
    let written = good.start..good.start + 112;
    r.untouched(&[written]);
    let used = r.drv.take_used(RX_QUEUE);
    assert_eq!(used.len(), bad + 1, "{used:?}");
    assert!(used[..bad].iter().all(|&(_, l)| l == 0), "{used:?}");
    assert_eq!(used[bad].1, 112);
    assert_eq!(r.drv.read_mem(good.start + 12, 100), f);
    assert_eq!(r.drv.read_mem(good.start + 10, 2), [1, 0], "num_buffers");
}

#[test]
fn rx_buffer_smaller_than_header() {
    case("rx_buffer_smaller_than_header", all(), |r| {
        r.post(&[Desc::write(slot(1), 11)]);
        r.post(&[Desc::write(slot(1), 0)]);
        rx_refuses(r, 2);
    });
}

#[test]
fn rx_read_only_buffer() {
    case("rx_read_only_buffer", all(), |r| {
        r.post(&[Desc::read(slot(1), 2048)]);
        rx_refuses(r, 1);
    });
}

#[test]
fn rx_buffer_outside_guest_memory() {
    case("rx_buffer_outside_guest_memory", all(), |r| {
        r.post(&[Desc::write(HOLE, 2048)]);
        r.post(&[Desc::write(END_A - 100, 2048)]); // runs off the region
        r.post(&[Desc::write(FAR, 2048)]);
        r.post(&[Desc::write(slot(1), 100), Desc::write(HOLE, 100)]);
        rx_refuses(r, 4);
    });
}

#[test]
fn rx_chain_that_loops() {
    case("rx_chain_that_loops", all(), |r| {
        let t = r.drv.queues[RX_QUEUE].layout.desc;
        r.drv.put_desc(t, 100, Desc::write(slot(1), 64).then(100));
        r.drv.publish(RX_QUEUE, 100);
        rx_refuses(r, 1);
    });
}

#[test]
fn rx_mergeable_frame_across_buffers() {
    case("rx_mergeable_frame_across_buffers", all(), |r| {
        let bufs = [slot(5), slot(6), slot(7)];
        for b in bufs {
            r.post(&[Desc::write(b, 64)]);
        }
        let f = frame(MAC, PEER, 7, 150);
        r.arm();
        r.inject(&f);
        r.untouched(&[
            bufs[0]..bufs[0] + 64,
            bufs[1]..bufs[1] + 64,
            bufs[2]..bufs[2] + 34,
        ]);
        let lens: Vec<u32> = r.drv.take_used(RX_QUEUE).iter().map(|u| u.1).collect();
        assert_eq!(lens, [64, 64, 34]);
        let got = [
            r.drv.read_mem(bufs[0], 64),
            r.drv.read_mem(bufs[1], 64),
            r.drv.read_mem(bufs[2], 34),
        ]
        .concat();
        assert_eq!(got[10..12], [3, 0], "num_buffers");
        assert_eq!(got[12..], f[..]);
    });
}

#[test]
fn rx_not_mergeable_frame_larger_than_buffer() {
    case(
        "rx_not_mergeable_frame_larger_than_buffer",
        all() & !f(VIRTIO_NET_F_MRG_RXBUF),
        |r| {
            r.post(&[Desc::write(slot(5), 64)]);
            r.arm();
            r.inject(&frame(MAC, PEER, 7, 150));
            r.untouched(&[]);
            assert_eq!(
                r.drv.take_used(RX_QUEUE),
                [(0, 0)],
                "one buffer spent, empty"
            );
            assert_eq!(r.m().rx_dropped, 1);
        },
    );
}

#[test]
fn rx_avail_index_far_beyond_queue_size() {
    case("rx_avail_index_far_beyond_queue_size", all(), |r| {
        let idx = r.drv.queues[RX_QUEUE].avail_idx;
        r.drv.set_avail_idx(RX_QUEUE, idx.wrapping_add(1000));
        r.arm();
        r.inject(&frame(MAC, PEER, 7, 100));
        r.untouched(&[]);
        r.assert_needs_reset("rx ring unreadable");
    });
}

// ---- CTRL ----

#[test]
fn ctrl_shorter_than_header_and_unknown_commands() {
    case("ctrl_short_and_unknown", all(), |r| {
        r.ctrl(&[0], ERR);
        assert!(r.said("shorter than its 2-byte header"));
        for cmd in [
            &[9u8, 0][..],
            &[0, 9, 1],
            &[1, 9],
            &[2, 7, 0, 0],
            &[3, 1],
            &[255, 255],
        ] {
            r.ctrl(cmd, ERR);
        }
        assert!(r.said("unknown command class 255 cmd 255"));
        // An empty readable part: no header at all.
        let (ack, _) = r.ctrl_chain(&[Desc::read(slot(50), 0), Desc::write(slot(51), 1)]);
        assert_eq!(ack, ERR);
    });
}

#[test]
fn ctrl_every_command_with_wrong_payload_length() {
    case("ctrl_wrong_payload_length", all(), |r| {
        for cmd in 0..6u8 {
            r.ctrl(&[0, cmd], ERR);
            r.ctrl(&[0, cmd, 1, 1], ERR);
        }
        for bad in [
            &[1u8, 0, 0, 0, 0][..],
            &[1, 1, 2, 0, 0, 0, 0],
            &[1, 1, 2, 0, 0, 0, 0, 1, 9],
        ] {
            r.ctrl(bad, ERR);
        }
        for vlan in [&[2u8, 0, 5][..], &[2, 1, 5, 0, 0], &[2, 0]] {
            r.ctrl(vlan, ERR);
        }
        r.ctrl(&[3, 0, 1], ERR);
        assert!(r.said("expected 2 bytes of data, got 3"));
        assert!(r.net().vlans().is_empty() && r.net().macs() == [MacAddr(MAC)]);
    });
}

#[test]
fn ctrl_mac_table_whose_count_lies() {
    case("ctrl_mac_table_whose_count_lies", all(), |r| {
        let table = |claim: u32, n: usize| {
            let mut v = claim.to_le_bytes().to_vec();
            v.extend((0..n).flat_map(|i| [2, 0, 0, 0, 0, i as u8]));
            v
        };
        for (uni, multi) in [
            (table(u32::MAX, 1), table(0, 0)),
            (table(2, 1), table(0, 0)),
            (table(1, 1), table(5, 1)),
            (table(1, 1), table(0x2aaa_aaab, 0)), // 6 * count wraps in u32
        ] {
            r.ctrl(&[&[1, 0][..], &uni, &multi].concat(), ERR);
        }
        assert!(r.said("MAC table claims 4294967295 entries"));
        assert!(r.net().state().rx_filter.unicast.is_empty());
    });
}

#[test]
fn ctrl_vlan_id_out_of_range() {
    case("ctrl_vlan_id_out_of_range", all(), |r| {
        r.ctrl(&[2, 0, 0x00, 0x10], ERR);
        r.ctrl(&[2, 0, 0xff, 0xff], ERR);
        r.ctrl(&[2, 1, 0x00, 0x10], ERR);
        assert!(r.said("VLAN id 4096 is out of range"));
        r.ctrl(&[2, 0, 0xff, 0x0f], OK);
        assert_eq!(r.net().vlans(), [4095]);
    });
}

#[test]
fn ctrl_without_a_writable_status_byte() {
    case("ctrl_without_a_writable_status_byte", all(), |r| {
        r.drv.write_mem(slot(50), &[2, 0, 7, 0]); // VLAN_ADD 7
        let before = r.m();
        for descs in [
            &[Desc::read(slot(50), 4)][..],
            &[Desc::read(slot(50), 4), Desc::read(slot(51), 1)],
            &[Desc::read(slot(50), 4), Desc::write(HOLE, 1)],
            &[Desc::read(slot(50), 4), Desc::write(FAR, 1)],
            &[Desc::read(slot(50), 4), Desc::write(slot(51), 0)],
        ] {
            let (ack, used) = r.ctrl_chain(descs);
            assert_eq!((ack, used.len(), used[0].1), (0xee, 1, 0));
        }
        let after = r.m();
        assert_eq!(after.ctrl_errors - before.ctrl_errors, 5);
        assert_eq!(after.bad_descriptors - before.bad_descriptors, 5);
        assert!(r.said("no device-writable status byte"));
        assert!(
            r.net().vlans().is_empty(),
            "a command nobody can be told about is not applied"
        );
    });
}

#[test]
fn ctrl_broken_chains() {
    case("ctrl_broken_chains", all(), |r| {
        let t = r.drv.queues[CTRL_QUEUE].layout.desc;
        r.drv.write_mem(slot(50), &[0, 0, 1]);
        r.drv.put_desc(t, 40, Desc::read(slot(50), 3).then(40)); // a loop
        r.drv.put_desc(t, 41, Desc::read(HOLE, 3).then(42)); // outside memory
        r.drv.put_desc(t, 42, Desc::write(slot(51), 1));
        r.drv.put_desc(t, 43, Desc::indirect(slot(2), 8).then(42)); // bad table
        let errors = r.m().ctrl_errors;
        for head in 40..44 {
            r.drv.write_mem(slot(51), &[0xee]);
            if head != 42 {
                r.drv.publish(CTRL_QUEUE, head);
            }
        }
        r.arm();
        r.kick(CTRL_QUEUE);
        let status_byte = slot(51)..slot(51) + 1;
        r.untouched(&[status_byte]);
        assert_eq!(r.drv.take_used(CTRL_QUEUE).len(), 3);
        assert_eq!(r.m().ctrl_errors - errors, 3);
        assert_eq!(r.drv.read_mem(slot(51), 1), [ERR]);
        assert!(r.said("descriptor chain loops, ends early or lies outside guest memory"));
    });
}

#[test]
fn ctrl_command_larger_than_the_limit() {
    case("ctrl_command_larger_than_the_limit", all(), |r| {
        let mut cmd = vec![1, 0];
        cmd.extend(0u32.to_le_bytes());
        cmd.resize(5000, 0);
        r.ctrl(&cmd, ERR);
        assert!(r.said("command of 5000 bytes is larger than any valid one"));
    });
}

#[test]
fn ctrl_commands_for_features_not_negotiated() {
    let features = f(VIRTIO_F_VERSION_1) | f(VIRTIO_NET_F_CTRL_VQ) | f(VIRTIO_NET_F_CTRL_RX);
    case("ctrl_commands_not_negotiated", features, |r| {
        r.ctrl(&[2, 0, 5, 0], ERR); // CTRL_VLAN
        r.ctrl(&[0, 2, 1], ERR); // ALLUNI needs CTRL_RX_EXTRA
        r.ctrl(&[1, 1, 2, 0, 0, 0, 0, 9], ERR); // CTRL_MAC_ADDR
        r.ctrl(&[3, 0], ERR); // GUEST_ANNOUNCE
        assert!(r.said("class 2 was not negotiated"));
        assert!(r.said("class 3 was not negotiated"));
        r.ctrl(&[0, 1, 1], OK); // ALLMULTI is plain CTRL_RX
        assert_eq!(r.net().macs(), [MacAddr(MAC)]);
    });
}

#[test]
fn ctrl_announce_ack_without_data_is_accepted() {
    case("ctrl_announce_ack_without_data", all(), |r| {
        r.ctrl(&[3, 0], OK);
        r.ctrl(&[2, 0, 100, 0], OK);
        r.ctrl(&[1, 1, 2, 0, 0, 0, 0, 9], OK);
        assert_eq!(r.net().vlans(), [100]);
        assert_eq!(r.net().macs(), [MacAddr([2, 0, 0, 0, 0, 9])]);
    });
}

#[test]
fn ctrl_avail_index_far_beyond_queue_size() {
    case("ctrl_avail_index_far_beyond_queue_size", all(), |r| {
        let idx = r.drv.queues[CTRL_QUEUE].avail_idx;
        r.drv.set_avail_idx(CTRL_QUEUE, idx.wrapping_add(65)); // size 64
        r.kick(CTRL_QUEUE);
        r.assert_needs_reset("ctrl avail ring");
    });
}

// ---- Fuzz ----

#[test]
fn fuzz_random_rings_and_descriptors() {
    case(
        "fuzz_random_rings_and_descriptors",
        all() | f(VIRTIO_F_RING_EVENT_IDX),
        |r| {
            let mut rng = Prng::new(0x00f3_4417_c0de);
            let start = Instant::now();
            let (mut resets, mut injected) = (0, 0);
            for i in 0..3000u32 {
                let q = (i % 3) as usize;
                let l = r.drv.queues[q].layout;
                for k in 0..l.size {
                    r.drv.put_desc(l.desc, k, random_desc(&mut rng, l.size));
                }
                for k in 0..4 {
                    let table = slot(rng.below(40));
                    r.drv.put_desc(table, k, random_desc(&mut rng, 4));
                }
                let count = if rng.chance(1, 30) {
                    rng.next_u32() as u16
                } else {
                    rng.below(8) as u16
                };
                for _ in 0..count.min(l.size) {
                    let head = if rng.chance(19, 20) {
                        rng.below(u64::from(l.size))
                    } else {
                        rng.below(65_536)
                    };
                    r.drv.publish(q, head as u16);
                }
                let idx = r.drv.queues[q].avail_idx;
                r.drv
                    .set_avail_idx(q, idx.wrapping_add(count - count.min(l.size)));
                // Random avail flags and used_event too.
                r.drv.write_mem(l.avail, &rng.next_u32().to_le_bytes()[..2]);
                r.drv.write_mem(
                    l.avail + 4 + 2 * u64::from(l.size),
                    &rng.next_u32().to_le_bytes()[..2],
                );
                let allowed = writable_ranges(&r.drv, l.desc, l.size);
                r.arm();
                if q == RX_QUEUE && rng.chance(1, 4) {
                    let len = 14 + rng.below(1500) as usize;
                    r.inject(&frame(MAC, PEER, i, len));
                    injected += 1;
                }
                r.kick(q);
                r.untouched(&allowed);
                if r.needs_reset() || !r.net().is_active() {
                    resets += 1;
                    r.init().expect("re-init");
                } else {
                    r.drv.take_used(q);
                }
                let _ = logcap::take();
            }
            r.init()
                .expect("a reset ends the fuzz: survives() needs sane rings");
            let m = r.m();
            eprintln!(
                "fuzz: {:?} in {:?}, {resets} resets, {injected} frames injected",
                m,
                start.elapsed()
            );
            assert!(
                resets > 0 && m.bad_descriptors > 0 && m.ctrl_errors > 0,
                "{m:?}"
            );
        },
    );
}
