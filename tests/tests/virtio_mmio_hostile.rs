//! Hostile register accesses on the virtio-mmio transport of a real
//! virtio-net device (issue #4, item 6): wrong sizes and offsets, reads of
//! write-only registers, writes in the wrong device status, queue numbers
//! and sizes that do not exist, features never offered, rings outside
//! guest memory, a reset in the middle of traffic. Each is ignored or
//! answered with DEVICE_NEEDS_RESET, says why in the log, and the device
//! serves afterwards (`Rig::survives`, run after every case).

use devices::virtio::net::device::{CTRL_QUEUE, RX_QUEUE, TX_QUEUE};
use devices::virtio::{VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1};
use devices::BusDevice;
use ferry_tests::virtio_driver::net_rig::*;
use ferry_tests::virtio_driver::{reg, status, Desc, QueueLayout};

#[test]
fn transport_unaligned_wrong_size_and_write_only_registers() {
    case("transport_register_abuse", all(), |r| {
        let s = r.drv.status();
        let mut b2 = [0xaa; 2];
        r.drv.dev.read(reg::MAGIC, &mut b2);
        assert_eq!(b2, [0, 0]);
        let mut b8 = [0xaa; 8];
        r.drv.dev.read(reg::MAGIC, &mut b8);
        assert_eq!(b8, [0; 8]);
        assert_eq!(r.drv.read32(reg::MAGIC + 1), 0);
        r.drv.dev.write(reg::STATUS, &[0, 0]); // would reset if honoured
        r.drv.dev.write(reg::STATUS, &[0; 8]);
        r.drv.dev.write(reg::STATUS + 1, &[0; 4]);
        r.drv.dev.write(reg::STATUS + 2, &[0; 1]);
        assert_eq!(r.drv.status(), s);
        for wo in [
            reg::QUEUE_NOTIFY,
            reg::INTERRUPT_ACK,
            reg::DRIVER_FEATURES,
            reg::QUEUE_DESC_LOW,
            reg::QUEUE_SEL,
            0x0f0,
        ] {
            assert_eq!(r.drv.read32(wo), 0, "write-only register {wo:#x}");
        }
        assert!(r.said("read of write-only or unknown register"));
        // Read-only registers and the read-only config space keep theirs.
        r.drv.write32(reg::MAGIC, 0);
        r.drv.write32(reg::DEVICE_ID, 7);
        r.drv.dev.write(reg::CONFIG_SPACE, &[0xff; 6]);
        assert_eq!(r.drv.read32(reg::DEVICE_ID), 1);
        let mut mac = [0u8; 6];
        r.drv.dev.read(reg::CONFIG_SPACE, &mut mac);
        assert_eq!(mac, MAC);
        let mut beyond = [0xaa; 3];
        r.drv.dev.read(0xffd, &mut beyond);
        assert_eq!(beyond, [0; 3]);
        assert!(r.net().is_active());
    });
}

#[test]
fn transport_writes_in_the_wrong_status() {
    case("transport_writes_in_the_wrong_status", all(), |r| {
        // After DRIVER_OK: queue registers and features are frozen.
        let acked = r.net().state().acked_features;
        r.drv.write32(reg::QUEUE_SEL, TX_QUEUE as u32);
        r.drv.write32(reg::QUEUE_READY, 0);
        r.drv.write32(reg::QUEUE_DESC_LOW, HOLE as u32);
        r.drv.write32(reg::QUEUE_NUM, 2);
        assert_eq!(r.drv.read32(reg::QUEUE_READY), 1);
        assert!(r.said("written in status 0xf, ignored"));
        r.drv.write_features(u64::MAX);
        assert_eq!(r.drv.dev.state().driver_features, acked);
        assert!(r.said("driver features written in status 0xf, ignored"));
        // Status bits cannot be taken back without a reset.
        r.drv.set_status(status::ACKNOWLEDGE);
        assert_eq!(r.drv.status(), 0xf);
        assert!(r.said("clears bits, ignored"));
        r.tx_ok();
        // Before DRIVER: no features; before FEATURES_OK: no queues.
        r.drv.set_status(0);
        r.drv.set_status(status::ACKNOWLEDGE);
        r.drv.write_features(all());
        assert_eq!(r.drv.dev.state().driver_features, 0);
        r.drv.set_status(status::ACKNOWLEDGE | status::DRIVER);
        r.drv.write32(reg::QUEUE_SEL, 0);
        r.drv.write32(reg::QUEUE_READY, 1);
        assert_eq!(r.drv.read32(reg::QUEUE_READY), 0);
        // DRIVER_OK without FEATURES_OK activates nothing.
        r.drv
            .set_status(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
        assert!(!r.net().is_active());
    });
}

#[test]
fn transport_queue_select_out_of_range_and_notify_for_missing_queue() {
    case("transport_queue_select_and_notify", all(), |r| {
        r.drv.set_status(0);
        r.drv.negotiate(all());
        for sel in [3, 0xffff, u32::MAX] {
            r.drv.write32(reg::QUEUE_SEL, sel);
            assert_eq!(r.drv.read32(reg::QUEUE_NUM_MAX), 0);
            r.drv.write32(reg::QUEUE_READY, 1);
            assert_eq!(r.drv.read32(reg::QUEUE_READY), 0);
        }
        assert!(r.said("queue register for a queue that does not exist"));
        r.init().unwrap();
        for q in [3, 0xffff, u32::MAX] {
            r.drv.notify(q);
        }
        assert!(r.said("notify for queue 4294967295 that does not exist"));
        for e in r.net().queue_evts().to_vec() {
            assert!(e.read().is_err(), "no queue was signalled");
        }
    });
}

#[test]
fn transport_features_not_offered_or_without_version_1() {
    case("transport_bad_features", all(), |r| {
        let offered = r.drv.device_features();
        assert_eq!(offered & all(), all());
        for bad in [
            all() | f(63),
            all() | f(VIRTIO_F_RING_EVENT_IDX + 1),
            all() & !f(VIRTIO_F_VERSION_1),
            0,
        ] {
            assert!(!r.drv.negotiate(bad), "FEATURES_OK stuck for {bad:#x}");
            assert_eq!(r.net().state().acked_features, 0);
            r.drv.driver_ok();
            assert!(!r.net().is_active());
        }
        assert!(r.said("VERSION_1 is required"));
    });
}

#[test]
fn transport_queue_size_zero_or_not_a_power_of_two() {
    case("transport_bad_queue_size", all(), |r| {
        r.sizes = [16, 16, 16];
        r.drv.negotiate(all());
        for (i, l) in layouts(r.sizes).into_iter().enumerate() {
            r.drv.setup_queue(i as u32, l);
        }
        for bad in [0, 3, 17, 512, 0x1_0000] {
            r.drv.write32(reg::QUEUE_SEL, TX_QUEUE as u32);
            r.drv.write32(reg::QUEUE_READY, 0);
            r.drv.write32(reg::QUEUE_NUM, bad);
            r.drv.write32(reg::QUEUE_READY, 1);
        }
        assert!(r.said("queue size 0"));
        r.drv.driver_ok();
        assert!(!r.needs_reset());
        // The device kept size 16: twenty frames wrap the ring correctly.
        for _ in 0..20 {
            r.tx_ok();
        }
    });
}

#[test]
fn transport_rings_outside_memory_at_driver_ok() {
    case("transport_rings_outside_memory", all(), |r| {
        let good = layouts(SIZES);
        for (q, bad) in [
            (
                RX_QUEUE,
                QueueLayout {
                    desc: HOLE,
                    ..good[0]
                },
            ),
            (
                TX_QUEUE,
                QueueLayout {
                    avail: END_A - 8,
                    ..good[1]
                },
            ),
            (
                CTRL_QUEUE,
                QueueLayout {
                    used: FAR,
                    ..good[2]
                },
            ),
        ] {
            assert!(r.drv.negotiate(all()));
            for (i, l) in good.iter().enumerate() {
                r.drv.program_queue(i as u32, if i == q { bad } else { *l });
            }
            r.drv.driver_ok();
            r.assert_needs_reset(&format!("queue {q} is not usable"));
            r.drv.write32(reg::INTERRUPT_ACK, u32::MAX);
        }
        // Not set up at all: rx and tx are required.
        assert!(r.drv.negotiate(all()));
        r.drv.driver_ok();
        r.assert_needs_reset("queue 0 is not ready");
    });
}

#[test]
fn transport_reset_mid_traffic_then_reuse() {
    case("transport_reset_mid_traffic", all(), |r| {
        r.post(&[Desc::write(slot(5), 2048)]);
        r.drv.write_mem(slot(6), &[0; 112]);
        r.drv.chain(TX_QUEUE, &[Desc::read(slot(6), 112)]);
        r.ctrl(&[0, 0, 0], OK);
        r.drv.set_status(0);
        assert_eq!(
            (r.drv.status(), r.drv.read32(reg::INTERRUPT_STATUS)),
            (0, 0)
        );
        assert!(!r.net().is_active());
        // Notifications and frames after the reset touch nothing.
        r.arm();
        r.kick(TX_QUEUE);
        r.kick(CTRL_QUEUE);
        r.kick(RX_QUEUE);
        r.sock.send(&frame(MAC, [2, 0, 0, 0, 0, 1], 9, 80)).unwrap();
        r.net().process_rx();
        r.untouched(&[]);
        assert_eq!((r.m().tx_frames, r.m().rx_frames), (0, 0));
        // Filter state went back to the reset defaults.
        assert!(r.net().state().rx_filter.promisc);
    });
}
