//! The register file as a driver programs it, with a virtio-net over
//! frames in memory behind it: negotiation, queue setup, activation,
//! reset, and what it ignores.

use std::sync::Arc;

use net::{MacAddr, MemBackend};
use virtio_bindings::virtio_net::*;

use super::*;
use crate::virtio::net::{Net, NetOptions};
use crate::virtio::test_utils::{interrupt, memory, TestQueue};

const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

fn transport() -> MmioTransport<Net<MemBackend>> {
    let net = Net::new(NetOptions {
        id: "net0".into(),
        backend: MemBackend::default(),
        mac: MAC,
        guest_announce: false,
    })
    .unwrap();
    let evts: Vec<Arc<EventFd>> = net.queue_evts().to_vec();
    let (irq, _) = interrupt();
    MmioTransport::new(net, memory(), irq, evts).unwrap()
}

fn read(t: &mut MmioTransport<Net<MemBackend>>, reg: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(reg, &mut b);
    u32::from_le_bytes(b)
}

fn write(t: &mut MmioTransport<Net<MemBackend>>, reg: u64, v: u32) {
    t.write(reg, &v.to_le_bytes());
}

fn negotiate(t: &mut MmioTransport<Net<MemBackend>>, features: u64) -> u32 {
    write(t, STATUS, status::ACKNOWLEDGE);
    write(t, STATUS, status::ACKNOWLEDGE | status::DRIVER);
    for sel in 0..2 {
        write(t, DRIVER_FEATURES_SEL, sel);
        write(t, DRIVER_FEATURES, (features >> (32 * sel)) as u32);
    }
    write(
        t,
        STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    read(t, STATUS)
}

fn set_queue(t: &mut MmioTransport<Net<MemBackend>>, index: u32, q: &TestQueue) {
    write(t, QUEUE_SEL, index);
    write(t, QUEUE_NUM, u32::from(q.size));
    for (low, addr) in [
        (QUEUE_DESC_LOW, q.desc),
        (QUEUE_DRIVER_LOW, q.avail),
        (QUEUE_DEVICE_LOW, q.used),
    ] {
        write(t, low, addr as u32);
        write(t, low + 4, (addr >> 32) as u32);
    }
    write(t, QUEUE_READY, 1);
}

const V1: u64 = 1 << VIRTIO_F_VERSION_1;

#[test]
fn identity_and_offered_features() {
    let mut t = transport();
    assert_eq!(read(&mut t, MAGIC), MAGIC_VALUE);
    assert_eq!(read(&mut t, VERSION), 2);
    assert_eq!(read(&mut t, DEVICE_ID), 1);
    write(&mut t, DEVICE_FEATURES_SEL, 1);
    assert_eq!(read(&mut t, DEVICE_FEATURES) & 1, 1, "VERSION_1");
    write(&mut t, QUEUE_SEL, 2);
    assert_eq!(read(&mut t, QUEUE_NUM_MAX), 64);
    write(&mut t, QUEUE_SEL, 7);
    assert_eq!(read(&mut t, QUEUE_NUM_MAX), 0, "no such queue");
    let mut mac = [0u8; 6];
    t.read(CONFIG_SPACE, &mut mac);
    assert_eq!(mac, MAC.0);
}

#[test]
fn features_without_version_1_or_not_offered_are_refused() {
    let mut t = transport();
    let s = negotiate(&mut t, 1 << VIRTIO_NET_F_MAC);
    assert_eq!(s & status::FEATURES_OK, 0, "no VERSION_1");
    write(&mut t, STATUS, 0);
    let s = negotiate(&mut t, V1 | 1 << 63);
    assert_eq!(s & status::FEATURES_OK, 0, "bit 63 is not offered");
    write(&mut t, STATUS, 0);
    let s = negotiate(&mut t, V1 | 1 << VIRTIO_NET_F_MAC);
    assert_ne!(s & status::FEATURES_OK, 0);
}

#[test]
fn driver_ok_activates_with_the_programmed_queues_and_reset_stops() {
    let mut t = transport();
    negotiate(&mut t, V1 | 1 << VIRTIO_NET_F_MAC);
    let (rx, tx) = (TestQueue::new(0x1000, 256), TestQueue::new(0x4000, 128));
    set_queue(&mut t, 0, &rx);
    set_queue(&mut t, 1, &tx);
    // Queue registers are read-only once the queue is ready.
    write(&mut t, QUEUE_SEL, 1);
    write(&mut t, QUEUE_NUM, 16);
    assert_eq!(t.queue(1).size(), 128);
    let s = read(&mut t, STATUS);
    write(&mut t, STATUS, s | status::DRIVER_OK);
    assert!(t.device().is_active());
    let live = t.device().live_queues().unwrap();
    assert_eq!((live[0].desc_table, live[1].size), (0x1000, 128));
    // Clearing bits is ignored; 0 resets.
    write(&mut t, STATUS, status::ACKNOWLEDGE);
    assert!(t.device().is_active());
    write(&mut t, STATUS, 0);
    assert!(!t.device().is_active());
    assert_eq!(read(&mut t, STATUS), 0);
}

#[test]
fn rings_outside_memory_need_a_reset_instead_of_starting() {
    let mut t = transport();
    negotiate(&mut t, V1);
    set_queue(&mut t, 0, &TestQueue::new(0x1000, 256));
    set_queue(&mut t, 1, &TestQueue::new(0xfff0_0000, 256));
    let s = read(&mut t, STATUS);
    write(&mut t, STATUS, s | status::DRIVER_OK);
    assert!(!t.device().is_active());
    assert_ne!(read(&mut t, STATUS) & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn odd_accesses_are_ignored() {
    let mut t = transport();
    let mut b = [0xffu8; 2];
    t.read(MAGIC, &mut b);
    assert_eq!(b, [0, 0], "a 2-byte read reads nothing");
    t.write(STATUS, &[1, 0]);
    write(&mut t, STATUS + 1, 1);
    assert_eq!(read(&mut t, STATUS), 0);
    // Queue registers before FEATURES_OK, a notify for no queue.
    write(&mut t, QUEUE_NUM, 16);
    assert_eq!(t.queue(0).size(), 256);
    write(&mut t, QUEUE_NOTIFY, 99);
    t.write(u64::MAX - 3, &[0; 4]);
}
