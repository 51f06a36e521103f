//! The data path without a guest, a TAP or root: rx, tx and the control
//! queue over rings in test memory and frames in memory (MemBackend).
//! The real-TAP and hostile-ring tests (tests/) stay the integration
//! check.

use net::{MacAddr, MemBackend, Nic};
use virtio_bindings::virtio_net::*;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::test_utils::{interrupt, memory, TestQueue};

const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
const OTHER: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x99]);
const HDR: usize = VNET_HDR_LEN;

struct TestNet {
    net: Net<MemBackend>,
    mem: GuestMemoryMmap,
    irq: EventFd,
    rx: TestQueue,
    tx: TestQueue,
    ctrl: TestQueue,
}

fn features() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_CTRL_RX,
        VIRTIO_NET_F_CTRL_VLAN,
        VIRTIO_NET_F_CTRL_MAC_ADDR,
    ]
    .iter()
    .fold(0, |f, &b| f | bit(b))
}

/// A virtio-net device activated by a driver that acked `features`.
fn active(features: u64) -> TestNet {
    let mem = memory();
    let (interrupt, irq) = interrupt();
    let mut net = Net::new(NetOptions {
        id: "net0".into(),
        backend: MemBackend::default(),
        mac: MAC,
        guest_announce: true,
    })
    .unwrap();
    let (rx, tx, ctrl) = (
        TestQueue::new(0x1000, 256),
        TestQueue::new(0x4000, 256),
        TestQueue::new(0x7000, 64),
    );
    net.set_acked_features(features);
    net.activate(
        mem.clone(),
        interrupt,
        vec![rx.queue(), tx.queue(), ctrl.queue()],
    )
    .unwrap();
    TestNet {
        net,
        mem,
        irq,
        rx,
        tx,
        ctrl,
    }
}

fn frame(dst: MacAddr, src: MacAddr, len: usize) -> Vec<u8> {
    let mut f = [&dst.0[..], &src.0[..], &[0x88, 0xb5]].concat();
    f.extend((f.len()..len).map(|i| i as u8));
    f
}

fn with_header(frame: &[u8]) -> Vec<u8> {
    [&[0u8; HDR][..], frame].concat()
}

impl TestNet {
    /// Sends a control command; returns the device's ack byte.
    fn ctrl(&mut self, class: u32, cmd: u32, data: &[u8]) -> u8 {
        let command = [&[class as u8, cmd as u8][..], data].concat();
        self.mem
            .write_slice(&command, GuestAddress(0x30000))
            .unwrap();
        self.mem.write_obj(0xeeu8, GuestAddress(0x31000)).unwrap();
        let bufs = [(0x30000, command.len() as u32, false), (0x31000, 1, true)];
        self.ctrl.add(&self.mem, &bufs);
        self.net.process_ctrl();
        self.mem.read_obj(GuestAddress(0x31000)).unwrap()
    }

    fn interrupted(&self) -> bool {
        self.irq.read().is_ok()
    }
}

#[test]
fn tx_sends_the_chain_as_one_frame_and_returns_the_buffers() {
    let mut t = active(features());
    let f = frame(OTHER, MAC, 60);
    t.mem
        .write_slice(&[0u8; HDR], GuestAddress(0x10000))
        .unwrap();
    t.mem.write_slice(&f, GuestAddress(0x11000)).unwrap();
    let head = t.tx.add(
        &t.mem,
        &[(0x10000, HDR as u32, false), (0x11000, 60, false)],
    );
    t.net.process_tx();
    assert_eq!(t.net.backend().from_guest, vec![with_header(&f)]);
    assert_eq!(t.tx.used(&t.mem), vec![(u32::from(head), 0)]);
    assert!(t.interrupted());
    // The header was read across the two buffers: the guest sends as MAC.
    assert_eq!(t.net.state().senders.all(), vec![(MAC, None)]);
    assert_eq!(
        (t.net.metrics().tx_frames, t.net.metrics().tx_bytes),
        (1, 60)
    );
}

#[test]
fn tx_refuses_a_buffer_outside_guest_memory_and_goes_on() {
    let mut t = active(features());
    let outside = t.tx.add(&t.mem, &[(0xffff_0000_0000, 100, false)]);
    let short = t.tx.add(&t.mem, &[(0x10000, 4, false)]);
    let f = frame(OTHER, MAC, 64);
    t.mem
        .write_slice(&with_header(&f), GuestAddress(0x12000))
        .unwrap();
    let good = t.tx.add(&t.mem, &[(0x12000, (HDR + 64) as u32, false)]);
    t.net.process_tx();
    assert_eq!(t.net.backend().from_guest, vec![with_header(&f)]);
    let used: Vec<u32> = t.tx.used(&t.mem).iter().map(|u| u.0).collect();
    assert_eq!(used, [outside, short, good].map(u32::from));
    assert_eq!(t.net.metrics().bad_descriptors, 2);
}

#[test]
fn rx_fills_a_guest_buffer_with_header_and_frame() {
    let mut t = active(features());
    let f = frame(MAC, OTHER, 100);
    t.net.backend_mut().to_guest.push_back(with_header(&f));
    let head = t.rx.add(&t.mem, &[(0x20000, 2048, true)]);
    t.net.process_rx();
    let used = t.rx.used(&t.mem);
    assert_eq!(used, vec![(u32::from(head), (HDR + 100) as u32)]);
    let mut got = vec![0u8; HDR + 100];
    t.mem.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
    assert_eq!(&got[HDR..], &f[..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert!(t.interrupted());
}

#[test]
fn rx_without_buffers_waits_for_the_guest_then_delivers() {
    let mut t = active(features());
    let f = frame(MAC, OTHER, 80);
    t.net.backend_mut().to_guest.push_back(with_header(&f));
    t.net.process_rx();
    assert!(t.rx.used(&t.mem).is_empty());
    assert!(!t.net.wants_tap(), "no reads until the guest adds buffers");
    t.rx.add(&t.mem, &[(0x20000, 2048, true)]);
    t.net.process_rx_queue_event();
    assert_eq!(t.rx.used(&t.mem).len(), 1);
    assert!(t.net.wants_tap());
}

#[test]
fn a_frame_spans_merged_buffers() {
    let mut t = active(features());
    let f = frame(MAC, OTHER, 1400);
    t.net.backend_mut().to_guest.push_back(with_header(&f));
    t.rx.add(&t.mem, &[(0x20000, 512, true)]);
    t.rx.add(&t.mem, &[(0x21000, 512, true)]);
    t.rx.add(&t.mem, &[(0x22000, 512, true)]);
    t.net.process_rx();
    let lens: Vec<u32> = t.rx.used(&t.mem).iter().map(|u| u.1).collect();
    assert_eq!(lens, vec![512, 512, (HDR + 1400 - 1024) as u32]);
    let num_buffers: u16 = t.mem.read_obj(GuestAddress(0x20000 + 10)).unwrap();
    assert_eq!(u16::from_le(num_buffers), 3);
}

#[test]
fn ctrl_programs_the_filter_and_rx_follows_it() {
    let mut t = active(features());
    let ok = VIRTIO_NET_OK as u8;
    assert_eq!(
        t.ctrl(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[0]),
        ok
    );
    // A second MAC in the unicast table, none multicast.
    let table = [&1u32.to_le_bytes()[..], &OTHER.0, &0u32.to_le_bytes()].concat();
    assert_eq!(
        t.ctrl(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, &table),
        ok
    );
    assert_eq!(
        t.ctrl(
            VIRTIO_NET_CTRL_VLAN,
            VIRTIO_NET_CTRL_VLAN_ADD,
            &100u16.to_le_bytes()
        ),
        ok
    );
    assert_eq!(t.net.macs(), vec![MAC, OTHER]);
    assert_eq!(t.net.vlans(), vec![100]);
    // Unknown command and a short one: ERR, the device goes on.
    let err = VIRTIO_NET_ERR as u8;
    assert_eq!(t.ctrl(9, 9, &[]), err);
    assert_eq!(
        t.ctrl(VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD, &[1]),
        err
    );
    assert_eq!(t.net.metrics().ctrl_errors, 2);

    let stranger = MacAddr([0x02, 0, 0, 0, 0, 0x42]);
    for dst in [stranger, OTHER, MAC] {
        t.net
            .backend_mut()
            .to_guest
            .push_back(with_header(&frame(dst, stranger, 60)));
    }
    for i in 0..3 {
        t.rx.add(&t.mem, &[(0x20000 + i * 0x1000, 2048, true)]);
    }
    t.net.process_rx();
    assert_eq!(
        t.rx.used(&t.mem).len(),
        2,
        "the stranger's frame is filtered"
    );
    assert_eq!(t.net.metrics().rx_filtered, 1);
}

#[test]
fn without_guest_announce_the_host_plans_rarps_for_every_mac_and_vlan_it_knows() {
    let mut t = active(features());
    t.ctrl(
        VIRTIO_NET_CTRL_VLAN,
        VIRTIO_NET_CTRL_VLAN_ADD,
        &7u16.to_le_bytes(),
    );
    assert!(!t.net.ask_guest_to_announce());
    // Nothing sent by the guest yet: the filter's cross product.
    assert_eq!(t.net.rarp_plan(), (vec![(MAC, None), (MAC, Some(7))], 0));
    // Once it has sent from MAC on VLAN 7 only, that is what moves (and
    // the primary MAC untagged, always).
    let mut tagged = frame(OTHER, MAC, 60);
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
    t.mem
        .write_slice(&with_header(&tagged), GuestAddress(0x10000))
        .unwrap();
    t.tx.add(&t.mem, &[(0x10000, (HDR + tagged.len()) as u32, false)]);
    t.net.process_tx();
    assert_eq!(t.net.state().senders.all(), vec![(MAC, Some(7))]);
    assert_eq!(t.net.rarp_plan(), (vec![(MAC, None), (MAC, Some(7))], 0));
    let mark = t.net.mark_senders();
    assert!(t.net.senders_since(mark).is_empty());
}

#[test]
fn with_guest_announce_the_guest_is_asked() {
    let mut t = active(features() | bit(VIRTIO_NET_F_GUEST_ANNOUNCE));
    assert!(t.net.ask_guest_to_announce());
    assert!(t.net.state().status & VIRTIO_NET_S_ANNOUNCE as u16 != 0);
    assert!(t.net.backend().from_guest.is_empty());
    assert_eq!(
        t.ctrl(VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, &[]),
        VIRTIO_NET_OK as u8
    );
    assert_eq!(t.net.state().status & VIRTIO_NET_S_ANNOUNCE as u16, 0);
}

#[test]
fn paused_the_device_touches_nothing() {
    let mut t = active(features());
    t.net.pause();
    t.net
        .backend_mut()
        .to_guest
        .push_back(with_header(&frame(MAC, OTHER, 60)));
    t.rx.add(&t.mem, &[(0x20000, 2048, true)]);
    t.tx.add(&t.mem, &[(0x10000, HDR as u32, false)]);
    t.net.process_rx();
    t.net.process_tx();
    assert!(t.rx.used(&t.mem).is_empty() && t.tx.used(&t.mem).is_empty());
    t.net.resume();
    t.net.process_rx();
    t.net.process_tx();
    assert_eq!((t.rx.used(&t.mem).len(), t.tx.used(&t.mem).len()), (1, 1));
}

/// The guest's buffers' contents, in used-ring order: each frame's byte
/// at offset 20 (the test frames count up from there).
fn delivered_marks(t: &TestNet, bufs: &[u64]) -> Vec<u8> {
    t.rx.used(&t.mem)
        .iter()
        .map(|&(head, _)| {
            let at = bufs[head as usize % bufs.len()] + (HDR + 20) as u64;
            t.mem.read_obj::<u8>(GuestAddress(at)).unwrap()
        })
        .collect()
}

fn marked(dst: MacAddr, mark: u8) -> Vec<u8> {
    let mut f = frame(dst, OTHER, 60);
    f[20] = mark;
    with_header(&f)
}

#[test]
fn a_capture_keeps_what_a_stopped_guest_misses_and_gives_it_back_in_order() {
    let mut t = active(features());
    t.net.pause();
    let cap = t.net.start_capture(CaptureLimits { max_bytes: 1 << 20 });
    assert!(t.net.wants_tap(), "a capture reads the TAP of a paused NIC");
    for mark in [1, 2] {
        t.net.backend_mut().to_guest.push_back(marked(MAC, mark));
    }
    // Flooded to the new port too: not kept.
    t.net
        .backend_mut()
        .to_guest
        .push_back(marked(MacAddr([0xff; 6]), 9));
    t.net.process_rx();
    assert_eq!(cap.view().counts.captured, 2);
    assert_eq!(cap.view().counts.flooded, 1);
    // The migration failed: the guest gets both, then the TAP's newer one.
    t.net.stop_capture(true);
    t.net.backend_mut().to_guest.push_back(marked(MAC, 3));
    let bufs = [0x20000, 0x21000, 0x22000];
    for b in bufs {
        t.rx.add(&t.mem, &[(b, 2048, true)]);
    }
    t.net.resume();
    t.net.process_rx();
    assert_eq!(delivered_marks(&t, &bufs), vec![1, 2, 3]);
    assert_eq!(t.net.backlog_counts().delivered, 2);
}

#[test]
fn forwarded_frames_go_first_through_the_filter_and_the_tap_waits_behind() {
    let mut t = active(features());
    // The driver leaves promiscuous mode (a device starts in it, as QEMU's).
    let ok = VIRTIO_NET_OK as u8;
    assert_eq!(
        t.ctrl(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[0]),
        ok
    );
    t.net.hold_tap();
    t.net.backend_mut().to_guest.push_back(marked(MAC, 7));
    let bufs = [0x20000, 0x21000, 0x22000];
    for b in bufs {
        t.rx.add(&t.mem, &[(b, 2048, true)]);
    }
    // The TAP's frame came first, but after the forwarded ones on the
    // wire; the second forwarded frame is for a MAC the guest ignores.
    t.net.process_rx();
    assert!(t.rx.used(&t.mem).is_empty(), "held behind what may come");
    assert!(t.net.hold_deadline().is_some());
    t.net
        .push_forwarded([marked(MAC, 1), marked(OTHER, 2), marked(MAC, 3)]);
    t.net.process_rx();
    assert_eq!(delivered_marks(&t, &bufs), vec![1, 3]);
    t.net.release_hold();
    t.net.process_rx();
    assert_eq!(delivered_marks(&t, &bufs), vec![1, 3, 7]);
    let c = t.net.backlog_counts();
    assert_eq!(
        (c.received, c.delivered, c.filtered, c.held, c.hold_expired),
        (3, 2, 1, 1, 0)
    );
}

#[test]
fn a_held_frame_waits_no_longer_than_its_bound() {
    let mut t = active(features());
    t.net.hold_tap();
    t.net.backend_mut().to_guest.push_back(marked(MAC, 5));
    let bufs = [0x20000];
    t.rx.add(&t.mem, &[(bufs[0], 2048, true)]);
    t.net.process_rx();
    assert!(t.rx.used(&t.mem).is_empty());
    std::thread::sleep(HOLD_MAX + std::time::Duration::from_millis(2));
    t.net.process_rx();
    assert_eq!(delivered_marks(&t, &bufs), vec![5]);
    assert_eq!(t.net.backlog_counts().hold_expired, 1);
}
