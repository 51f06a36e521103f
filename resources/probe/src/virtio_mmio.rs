//! virtio-mmio transport (version 2, "modern") and split virtqueues.
//!
//! The device is not trusted: every index it hands back is range-checked,
//! every wait is bounded, and a device that breaks the rules is reported
//! with a reason and left alone instead of taking the probe down.

use core::sync::atomic::{fence, Ordering};

// The register offsets are the probe's own: virtio-bindings, where the
// VMM and the test driver take them from, links std, and the probe is a
// no_std program for a bare machine.

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC: u64 = 0x080;
const REG_QUEUE_DRIVER: u64 = 0x090;
const REG_QUEUE_DEVICE: u64 = 0x0a0;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

const MAGIC: u32 = 0x7472_6976; // "virt"
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 128;

pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

pub const VIRTIO_ID_NET: u32 = 1;

/// Ring 0: read InterruptStatus and acknowledge exactly those bits.
#[link_section = ".text.ring0.handlers"]
pub fn ring0_ack_interrupt(base: u64) -> u32 {
    // SAFETY: `base` is a virtio-mmio window from the command line, mapped
    // uncached; reading status and writing ack have no other effects.
    unsafe {
        let status = ((base + REG_INTERRUPT_STATUS) as *const u32).read_volatile();
        if status != 0 {
            ((base + REG_INTERRUPT_ACK) as *mut u32).write_volatile(status);
        }
        status
    }
}

/// One virtio-mmio register window.
#[derive(Clone, Copy)]
pub struct Transport {
    pub base: u64,
}

impl Transport {
    fn read(&self, reg: u64) -> u32 {
        // SAFETY: the window comes from the command line and lies in the
        // identity map; MMIO reads have no effect beyond the device.
        unsafe { ((self.base + reg) as *const u32).read_volatile() }
    }

    fn write(&self, reg: u64, value: u32) {
        // SAFETY: as for `read`.
        unsafe { ((self.base + reg) as *mut u32).write_volatile(value) }
    }

    /// Checks magic, version and device type.
    pub fn identify(&self, expected_device: u32) -> Result<(), &'static str> {
        if self.read(REG_MAGIC) != MAGIC {
            return Err("no virtio-mmio device (bad magic)");
        }
        match self.read(REG_VERSION) {
            2 => {}
            1 => return Err("legacy virtio-mmio device (version 1) not supported: need version 2 (QEMU: -global virtio-mmio.force-legacy=false)"),
            _ => return Err("unknown virtio-mmio version"),
        }
        match self.read(REG_DEVICE_ID) {
            0 => Err("no device behind the virtio-mmio window (device id 0)"),
            id if id == expected_device => Ok(()),
            _ => Err("not a network device"),
        }
    }

    pub fn status(&self) -> u32 {
        self.read(REG_STATUS)
    }

    pub fn set_status(&self, bits: u32) {
        self.write(REG_STATUS, bits);
    }

    /// Resets the device; false if it does not come back to status 0.
    pub fn reset(&self) -> bool {
        self.write(REG_STATUS, 0);
        for _ in 0..100_000 {
            if self.read(REG_STATUS) == 0 {
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }

    pub fn device_features(&self) -> u64 {
        self.write(REG_DEVICE_FEATURES_SEL, 0);
        let low = self.read(REG_DEVICE_FEATURES) as u64;
        self.write(REG_DEVICE_FEATURES_SEL, 1);
        let high = self.read(REG_DEVICE_FEATURES) as u64;
        low | (high << 32)
    }

    /// Writes the driver's features and sets FEATURES_OK; errors if the
    /// device does not keep FEATURES_OK set (it refused the subset).
    pub fn accept_features(&self, features: u64) -> Result<(), &'static str> {
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, features as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (features >> 32) as u32);
        let status = self.status();
        self.set_status(status | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            return Err("device refused the feature set (FEATURES_OK not kept)");
        }
        Ok(())
    }

    pub fn notify(&self, queue: u16) {
        self.write(REG_QUEUE_NOTIFY, queue as u32);
    }

    pub fn interrupt_status(&self) -> u32 {
        self.read(REG_INTERRUPT_STATUS)
    }

    pub fn ack_interrupt(&self, bits: u32) {
        self.write(REG_INTERRUPT_ACK, bits);
    }

    /// Reads `out.len()` config bytes at `offset`, retrying while the
    /// generation changes (bounded: a device that never settles gets an
    /// error).
    pub fn read_config(&self, offset: u64, out: &mut [u8]) -> Result<(), &'static str> {
        for _ in 0..1000 {
            let before = self.read(REG_CONFIG_GENERATION);
            for (i, byte) in out.iter_mut().enumerate() {
                // SAFETY: config space is byte-addressable MMIO in the window.
                *byte = unsafe {
                    ((self.base + REG_CONFIG + offset + i as u64) as *const u8).read_volatile()
                };
            }
            if self.read(REG_CONFIG_GENERATION) == before {
                return Ok(());
            }
        }
        Err("config generation never settles")
    }

    /// Programs queue `index` with the rings in `memory`; returns the size.
    pub fn setup_queue(
        &self,
        index: u16,
        memory: &'static mut QueueMemory,
    ) -> Result<SplitQueue, &'static str> {
        self.write(REG_QUEUE_SEL, index as u32);
        if self.read(REG_QUEUE_READY) != 0 {
            return Err("queue already live after reset");
        }
        let max = self.read(REG_QUEUE_NUM_MAX);
        if max == 0 {
            return Err("queue not available (QueueNumMax 0)");
        }
        // The largest power of two both sides can do.
        let mut size = QUEUE_SIZE_MAX as u32;
        while size > max {
            size /= 2;
        }
        self.write(REG_QUEUE_NUM, size);
        let desc = memory.desc.as_mut_ptr() as u64;
        let avail = memory.avail.as_mut_ptr() as u64;
        let used = memory.used.as_mut_ptr() as u64;
        self.write(REG_QUEUE_DESC, desc as u32);
        self.write(REG_QUEUE_DESC + 4, (desc >> 32) as u32);
        self.write(REG_QUEUE_DRIVER, avail as u32);
        self.write(REG_QUEUE_DRIVER + 4, (avail >> 32) as u32);
        self.write(REG_QUEUE_DEVICE, used as u32);
        self.write(REG_QUEUE_DEVICE + 4, (used >> 32) as u32);
        self.write(REG_QUEUE_READY, 1);
        Ok(SplitQueue::new(index, size as u16, memory))
    }
}

pub const QUEUE_SIZE_MAX: usize = 256;

/// Descriptor table, available ring and used ring of one queue, each in
/// its own page (more than the alignment the spec asks for).
#[repr(C, align(4096))]
pub struct QueueMemory {
    desc: [u8; 4096],
    avail: [u8; 4096],
    used: [u8; 4096],
}

impl QueueMemory {
    pub const fn new() -> Self {
        QueueMemory {
            desc: [0; 4096],
            avail: [0; 4096],
            used: [0; 4096],
        }
    }
}

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// Why the device's used ring cannot be trusted any more.
pub const ERR_BAD_USED_ID: &str = "device returned a descriptor id it does not own";
pub const ERR_USED_OVERRUN: &str = "device's used index ran ahead of what was made available";

/// A split virtqueue. Descriptor chains are allocated from a free list; the
/// driver remembers which head ids are in flight and rejects any other id
/// the device returns.
pub struct SplitQueue {
    pub index: u16,
    pub size: u16,
    memory: &'static mut QueueMemory,
    avail_idx: u16,
    last_used: u16,
    free: [u16; QUEUE_SIZE_MAX],
    free_len: usize,
    /// Chain length per in-flight head id (0 = not in flight).
    in_flight: [u8; QUEUE_SIZE_MAX],
}

impl SplitQueue {
    fn new(index: u16, size: u16, memory: &'static mut QueueMemory) -> SplitQueue {
        memory.desc.fill(0);
        memory.avail.fill(0);
        memory.used.fill(0);
        let mut free = [0u16; QUEUE_SIZE_MAX];
        for (i, slot) in free.iter_mut().enumerate().take(size as usize) {
            // Pop order: low ids first.
            *slot = size - 1 - i as u16;
        }
        SplitQueue {
            index,
            size,
            memory,
            avail_idx: 0,
            last_used: 0,
            free,
            free_len: size as usize,
            in_flight: [0; QUEUE_SIZE_MAX],
        }
    }

    pub fn free_descriptors(&self) -> usize {
        self.free_len
    }

    /// The id a single-buffer `push_chain` would use next (so the caller
    /// can fill the buffer that belongs to that id first).
    pub fn peek_free(&self) -> Option<u16> {
        self.free_len.checked_sub(1).map(|top| self.free[top])
    }

    fn write_desc(&mut self, id: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = id as usize * 16;
        let d = &mut self.memory.desc[at..at + 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
    }

    /// Makes a chain of buffers (address, length, device-writable)
    /// available; returns the head id, or None when descriptors are short.
    pub fn push_chain(&mut self, buffers: &[(u64, u32, bool)]) -> Option<u16> {
        if buffers.is_empty() || buffers.len() > self.free_len || buffers.len() > u8::MAX as usize {
            return None;
        }
        let mut ids = [0u16; 8];
        let n = buffers.len().min(ids.len());
        for id in ids.iter_mut().take(n) {
            self.free_len -= 1;
            *id = self.free[self.free_len];
        }
        for i in 0..n {
            let (addr, len, writable) = buffers[i];
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            let next = if i + 1 < n {
                flags |= DESC_F_NEXT;
                ids[i + 1]
            } else {
                0
            };
            self.write_desc(ids[i], addr, len, flags, next);
        }
        let head = ids[0];
        self.in_flight[head as usize] = n as u8;
        self.publish(head);
        Some(head)
    }

    /// Re-offers a single-descriptor buffer the device returned (rx).
    pub fn repost(&mut self, head: u16) {
        if (head as usize) < self.size as usize && self.in_flight[head as usize] == 0 {
            self.in_flight[head as usize] = 1;
            self.publish(head);
        }
    }

    fn publish(&mut self, head: u16) {
        let slot = 4 + (self.avail_idx % self.size) as usize * 2;
        self.memory.avail[slot..slot + 2].copy_from_slice(&head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The ring entry must be visible before the index that publishes it.
        fence(Ordering::Release);
        // SAFETY: an aligned u16 inside our avail page, read by the device.
        unsafe {
            (self.memory.avail.as_mut_ptr().add(2) as *mut u16).write_volatile(self.avail_idx)
        };
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: an aligned u16 the device writes; read volatile.
        unsafe { (self.memory.used.as_ptr().add(2) as *const u16).read_volatile() }
    }

    /// Whether the device asked not to be notified (VRING_USED_F_NO_NOTIFY).
    pub fn needs_notify(&self) -> bool {
        fence(Ordering::SeqCst);
        // SAFETY: as for `used_idx`.
        let flags = unsafe { (self.memory.used.as_ptr() as *const u16).read_volatile() };
        flags & USED_F_NO_NOTIFY == 0
    }

    /// Asks the device not to interrupt for this queue (a hint).
    pub fn set_interrupts(&mut self, enabled: bool) {
        let flags: u16 = if enabled { 0 } else { AVAIL_F_NO_INTERRUPT };
        // SAFETY: aligned u16 at the start of our avail page.
        unsafe { (self.memory.avail.as_mut_ptr() as *mut u16).write_volatile(flags) };
        fence(Ordering::SeqCst);
    }

    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// The next used element: (head id, bytes written). Chains are freed
    /// here, except heads the caller keeps (rx) by calling `repost`.
    pub fn pop_used(&mut self, keep_allocated: bool) -> Result<Option<(u16, u32)>, &'static str> {
        let used_idx = self.used_idx();
        if used_idx == self.last_used {
            return Ok(None);
        }
        if used_idx.wrapping_sub(self.last_used) > self.size {
            return Err(ERR_USED_OVERRUN);
        }
        fence(Ordering::Acquire);
        let at = 4 + (self.last_used % self.size) as usize * 8;
        let e = &self.memory.used[at..at + 8];
        let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        self.last_used = self.last_used.wrapping_add(1);
        if id >= self.size as u32 || self.in_flight[id as usize] == 0 {
            return Err(ERR_BAD_USED_ID);
        }
        let head = id as u16;
        let chain = self.in_flight[head as usize];
        self.in_flight[head as usize] = 0;
        if !keep_allocated {
            // Walk the chain we built (not what the device may have
            // scribbled): our ids are in the descriptors' next fields, which
            // the device must not write, but bound the walk regardless.
            let mut id = head;
            for _ in 0..chain {
                if self.free_len < self.size as usize {
                    self.free[self.free_len] = id;
                    self.free_len += 1;
                }
                let at = id as usize * 16;
                let next =
                    u16::from_le_bytes([self.memory.desc[at + 14], self.memory.desc[at + 15]]);
                id = next % self.size;
            }
        }
        Ok(Some((head, len)))
    }
}
