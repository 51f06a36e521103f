//! A virtio-net behind its virtio-mmio transport, driven as a hostile
//! guest would: register reads and writes of any width and offset, bytes
//! written anywhere in its 64 KiB of guest memory (rings, descriptor
//! tables, frames), queue notifications, frames arriving from the host,
//! and the transport's and the NIC's saved state restored from bytes (a
//! stream or a file). The device must neither panic nor touch anything
//! outside guest memory (the sanitizer watches).
#![no_main]

use std::sync::Arc;

use devices::virtio::mmio::MmioTransport;
use devices::virtio::net::{Net, NetOptions};
use devices::virtio::VirtioInterrupt;
use devices::{BusDevice, GuestMemoryMmap};
use libfuzzer_sys::fuzz_target;
use net::{MacAddr, MemBackend};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEMORY: u64 = 64 << 10;
/// The register file and the config space after it.
const WINDOW: u16 = 0x200;

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, rest) = data.split_at(n.min(data.len()));
    *data = rest;
    head
}

fn number(data: &mut &[u8], n: usize) -> u64 {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(take(data, n)) {
        *d = *s;
    }
    u64::from_le_bytes(b)
}

fn transport() -> Option<MmioTransport<Net<MemBackend>>> {
    let net = Net::new(NetOptions {
        id: "net0".into(),
        backend: MemBackend::default(),
        mac: MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        guest_announce: true,
    })
    .ok()?;
    let evts: Vec<Arc<EventFd>> = net.queue_evts().to_vec();
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY as usize)]).ok()?;
    let irq = VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).ok()?);
    MmioTransport::new(net, memory, irq, evts).ok()
}

fuzz_target!(|input: &[u8]| {
    let Some(mut t) = transport() else {
        return;
    };
    let mut data = input;
    while let Some((&op, rest)) = data.split_first() {
        data = rest;
        match op % 8 {
            0 | 1 => {
                let offset = number(&mut data, 2) % u64::from(WINDOW);
                let width = [1, 2, 4, 8][(op >> 3) as usize % 4];
                let value = take(&mut data, width).to_vec();
                t.write(offset, &value);
            }
            2 => {
                let offset = number(&mut data, 2) % u64::from(WINDOW);
                let mut buf = vec![0u8; [1, 2, 4, 8][(op >> 3) as usize % 4]];
                t.read(offset, &mut buf);
            }
            // The guest's memory: a ring index, a descriptor, a frame.
            3 => {
                let addr = number(&mut data, 2);
                let len = number(&mut data, 1) as usize;
                let bytes = take(&mut data, len);
                let _ = t.memory().write_slice(bytes, GuestAddress(addr % MEMORY));
            }
            // What the event loop does when a queue's eventfd fires.
            4 => match op >> 3 & 3 {
                0 => t.device_mut().process_rx_queue_event(),
                1 => t.device_mut().process_tx(),
                _ => t.device_mut().process_ctrl(),
            },
            // A frame from the host's side (the TAP).
            5 => {
                let len = number(&mut data, 2) as usize % 2048;
                let frame = take(&mut data, len).to_vec();
                let net = t.device_mut();
                net.backend_mut().to_guest.push_back(frame);
                net.process_rx();
            }
            // Saved state from bytes, as a destination restores it.
            6 => {
                let len = number(&mut data, 2) as usize;
                let bytes = take(&mut data, len);
                if let Ok(s) = serde_json::from_slice(bytes) {
                    let _ = t.restore(&s);
                }
            }
            _ => {
                let len = number(&mut data, 2) as usize;
                let bytes = take(&mut data, len);
                if let Ok(s) = serde_json::from_slice(bytes) {
                    t.device_mut().restore_state(&s);
                }
            }
        }
        // Whatever state it is in, it can be saved.
        let _ = t.snapshot();
    }
});
