//! Notifications both ways. Receive-queue kicks: while the device has rx
//! buffers it asks the driver not to notify it of more
//! (VRING_USED_F_NO_NOTIFY; with VIRTIO_F_RING_EVENT_IDX, an avail_event it
//! has passed), and once a frame waits for buffers it asks to be notified
//! of the very next one. Interrupts: a driver without EVENT_IDX that sets
//! VRING_AVAIL_F_NO_INTERRUPT on a queue gets none for it. Checked from the
//! driver's side, with the rule a driver applies before kicking, on the
//! real device over a real TAP (the rig of the hostile-input tests).

use devices::virtio::net::device::{RX_QUEUE, TX_QUEUE};
use devices::virtio::{INT_USED_RING, VIRTIO_F_RING_EVENT_IDX};
use ferry_tests::virtio_driver::net_rig::*;
use ferry_tests::virtio_driver::{reg, Desc};
use virtio_bindings::virtio_ring::{VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY};
use vm_memory::{Bytes, GuestAddress};

fn read_u16(r: &Rig, addr: u64) -> u16 {
    u16::from_le(r.drv.mem.read_obj(GuestAddress(addr)).expect("ring"))
}

/// Posts one 2 KiB rx buffer at slot `n`; returns whether a driver must
/// kick for it (virtio 1.x 2.7.10 / 2.7.7.2 seen from the driver).
fn post_needs_kick(r: &mut Rig, n: u64, event_idx: bool) -> bool {
    let old = r.drv.queues[RX_QUEUE].avail_idx;
    r.post(&[Desc::write(slot(n), 2048)]);
    let new = r.drv.queues[RX_QUEUE].avail_idx;
    let l = r.drv.queues[RX_QUEUE].layout;
    if event_idx {
        let event = read_u16(r, l.used + 4 + 8 * u64::from(l.size));
        // vring_need_event(event, new, old)
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    } else {
        read_u16(r, l.used) & VRING_USED_F_NO_NOTIFY as u16 == 0
    }
}

fn rx_notifications(name: &'static str, features: u64) {
    let event_idx = features & f(VIRTIO_F_RING_EVENT_IDX) != 0;
    case(name, features, move |r| {
        assert!(post_needs_kick(r, 60, event_idx), "the first buffer");
        r.kick(RX_QUEUE);
        // The device has a buffer: more need no kick.
        assert!(
            !post_needs_kick(r, 61, event_idx),
            "a buffer added while the device has some was to be kicked"
        );
        // Three frames for two buffers: the third waits, and the device
        // asks for the next buffer.
        let frames: Vec<Vec<u8>> = (0..3)
            .map(|_| {
                let m = r.next_marker();
                frame(MAC, PEER, m, 100)
            })
            .collect();
        for fr in &frames {
            r.inject(fr);
        }
        assert_eq!(r.drv.take_used(RX_QUEUE).len(), 2);
        assert!(
            post_needs_kick(r, 62, event_idx),
            "the device waits for buffers but did not ask to be told"
        );
        r.kick(RX_QUEUE);
        let used = r.drv.take_used(RX_QUEUE);
        assert_eq!(used.len(), 1, "the waiting frame, after the kick");
        assert_eq!(r.drv.read_mem(slot(62) + 12, 100), frames[2]);
        // Buffers again, and again no kicks needed.
        assert!(!post_needs_kick(r, 63, event_idx));
        assert!(!post_needs_kick(r, 64, event_idx));
        // ... which the device finds by itself.
        for _ in 0..2 {
            let m = r.next_marker();
            r.inject(&frame(MAC, PEER, m, 100));
        }
        assert_eq!(r.drv.take_used(RX_QUEUE).len(), 2);
        assert_eq!(r.m().rx_frames, 5);
    });
}

#[test]
fn rx_kicks_only_when_out_of_buffers() {
    rx_notifications("rx_kicks_only_when_out_of_buffers", all());
}

#[test]
fn rx_kicks_only_when_out_of_buffers_with_event_idx() {
    rx_notifications(
        "rx_kicks_only_when_out_of_buffers_with_event_idx",
        all() | f(VIRTIO_F_RING_EVENT_IDX),
    );
}

/// The used-ring bit of the interrupt status, acknowledged.
fn take_used_interrupt(r: &mut Rig) -> bool {
    let isr = r.drv.read32(reg::INTERRUPT_STATUS);
    r.drv.write32(reg::INTERRUPT_ACK, isr);
    isr & INT_USED_RING != 0
}

/// Sets or clears VRING_AVAIL_F_NO_INTERRUPT on queue `q`.
fn set_no_interrupt(r: &mut Rig, q: usize, on: bool) {
    let flags: u16 = if on {
        VRING_AVAIL_F_NO_INTERRUPT as u16
    } else {
        0
    };
    let avail = r.drv.queues[q].layout.avail;
    r.drv.write_mem(avail, &flags.to_le_bytes());
}

#[test]
fn no_interrupt_flag_silences_a_queue() {
    case("no_interrupt_flag_silences_a_queue", all(), |r| {
        take_used_interrupt(r);
        // A driver that reaps its transmit queue on the next send.
        set_no_interrupt(r, TX_QUEUE, true);
        r.tx_ok();
        r.tx_ok();
        assert!(
            !take_used_interrupt(r),
            "transmitted frames interrupted a driver that asked for none"
        );
        // Receive still interrupts: its flag is clear.
        r.post(&[Desc::write(slot(60), 2048)]);
        r.kick(RX_QUEUE);
        let m = r.next_marker();
        r.inject(&frame(MAC, PEER, m, 100));
        assert_eq!(r.drv.take_used(RX_QUEUE).len(), 1);
        assert!(take_used_interrupt(r), "no interrupt for a received frame");
        // The flag cleared: interrupts again.
        set_no_interrupt(r, TX_QUEUE, false);
        r.tx_ok();
        assert!(
            take_used_interrupt(r),
            "no interrupt once the flag is clear"
        );
    });
}
