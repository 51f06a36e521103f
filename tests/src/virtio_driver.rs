//! A deliberately untrustworthy virtio-mmio driver for tests: it programs a
//! transport register by register, lays out split rings and descriptors in
//! guest memory itself, and can put anything it likes there. Hostile-input
//! tests use it to feed a device what no well-behaved driver would, then
//! check that guest memory outside what the device was given is untouched
//! ([`Snapshot`]) and that the device said why it refused ([`logcap`]).

use std::ops::Range;

pub mod net_rig;

use devices::BusDevice;
pub use devices::GuestMemoryMmap;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// Register offsets of the virtio-mmio v2 window: Linux's, through
/// virtio-bindings (the table the device uses too).
pub use devices::virtio::mmio::regs as reg;

pub use devices::virtio::status;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// Guest memory made of `(start, size)` ranges (holes between them are
/// "outside guest memory").
pub fn guest_memory(ranges: &[(u64, usize)]) -> GuestMemoryMmap {
    let ranges: Vec<_> = ranges
        .iter()
        .map(|&(start, size)| (GuestAddress(start), size))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
}

/// One split-ring descriptor, exactly as the driver writes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    /// A device-readable buffer.
    pub fn read(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            ..Desc::default()
        }
    }

    /// A device-writable buffer.
    pub fn write(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: DESC_F_WRITE,
            next: 0,
        }
    }

    /// The same, chained on to descriptor `next`.
    pub fn then(self, next: u16) -> Desc {
        Desc {
            flags: self.flags | DESC_F_NEXT,
            next,
            ..self
        }
    }

    /// A descriptor pointing at an indirect table of `len` bytes.
    pub fn indirect(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: DESC_F_INDIRECT,
            next: 0,
        }
    }

    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; 16]) -> Desc {
        Desc {
            addr: u64::from_le_bytes(b[..8].try_into().unwrap_or_default()),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }

    /// The guest range a writable descriptor hands the device.
    pub fn range(&self) -> Range<u64> {
        self.addr..self.addr.saturating_add(u64::from(self.len))
    }
}

/// Where one queue's table and rings live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl QueueLayout {
    /// Table at `base`, the avail ring right after it, the used ring after
    /// that (4-byte aligned).
    pub fn at(base: u64, size: u16) -> QueueLayout {
        let n = u64::from(size);
        let avail = base + 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        QueueLayout {
            size,
            desc: base,
            avail,
            used,
        }
    }

    /// The used ring, flags to avail_event: the only ring bytes a device
    /// may write.
    pub fn used_range(&self) -> Range<u64> {
        self.used..self.used + 6 + 8 * u64::from(self.size)
    }

    /// The table and both rings.
    pub fn whole(&self) -> Range<u64> {
        self.desc..self.used_range().end
    }
}

/// What the driver remembers of one queue.
#[derive(Clone, Copy, Debug)]
pub struct DriverQueue {
    pub layout: QueueLayout,
    /// The avail index the driver published last.
    pub avail_idx: u16,
    /// How far the driver has read the used ring.
    pub used_seen: u16,
    /// The next free descriptor (chains are laid out consecutively).
    pub next_desc: u16,
}

/// A driver acting on a transport `T` (anything on the MMIO bus).
pub struct Driver<T: BusDevice> {
    pub dev: T,
    pub mem: GuestMemoryMmap,
    pub queues: Vec<DriverQueue>,
}

impl<T: BusDevice> Driver<T> {
    pub fn new(dev: T, mem: GuestMemoryMmap) -> Self {
        Self {
            dev,
            mem,
            queues: Vec::new(),
        }
    }

    pub fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write32(&mut self, offset: u64, value: u32) {
        self.dev.write(offset, &value.to_le_bytes());
    }

    pub fn status(&mut self) -> u32 {
        self.read32(reg::STATUS)
    }

    pub fn set_status(&mut self, value: u32) {
        self.write32(reg::STATUS, value);
    }

    pub fn device_features(&mut self) -> u64 {
        self.write32(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read32(reg::DEVICE_FEATURES);
        self.write32(reg::DEVICE_FEATURES_SEL, 1);
        u64::from(low) | (u64::from(self.read32(reg::DEVICE_FEATURES)) << 32)
    }

    /// Reset, ACKNOWLEDGE|DRIVER, `features`, FEATURES_OK; whether the
    /// device kept FEATURES_OK.
    pub fn negotiate(&mut self, features: u64) -> bool {
        self.set_status(0);
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.write_features(features);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        self.status() & status::FEATURES_OK != 0
    }

    pub fn write_features(&mut self, features: u64) {
        self.write32(reg::DRIVER_FEATURES_SEL, 0);
        self.write32(reg::DRIVER_FEATURES, features as u32);
        self.write32(reg::DRIVER_FEATURES_SEL, 1);
        self.write32(reg::DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// Zeroes the rings of `layout` in memory and hands them to queue `i`.
    pub fn setup_queue(&mut self, i: u32, layout: QueueLayout) {
        let n = layout.size as usize;
        let zeros = vec![0u8; 6 + 8 * n];
        self.mem
            .write_slice(&zeros[..6 + 2 * n], GuestAddress(layout.avail))
            .expect("avail ring in memory");
        self.mem
            .write_slice(&zeros, GuestAddress(layout.used))
            .expect("used ring in memory");
        self.program_queue(i, layout);
        let q = DriverQueue {
            layout,
            avail_idx: 0,
            used_seen: 0,
            next_desc: 0,
        };
        let i = i as usize;
        if self.queues.len() <= i {
            self.queues.resize(i + 1, q);
        }
        self.queues[i] = q;
    }

    /// Writes queue `i`'s registers only (any addresses, no memory touched).
    pub fn program_queue(&mut self, i: u32, layout: QueueLayout) {
        self.write32(reg::QUEUE_SEL, i);
        self.write32(reg::QUEUE_NUM, u32::from(layout.size));
        for (low, addr) in [
            (reg::QUEUE_DESC_LOW, layout.desc),
            (reg::QUEUE_DRIVER_LOW, layout.avail),
            (reg::QUEUE_DEVICE_LOW, layout.used),
        ] {
            self.write32(low, addr as u32);
            self.write32(low + 4, (addr >> 32) as u32);
        }
        self.write32(reg::QUEUE_READY, 1);
    }

    pub fn driver_ok(&mut self) {
        let s = self.status();
        self.set_status(s | status::DRIVER_OK);
    }

    /// The whole handshake; an error says which step the device refused.
    pub fn init(&mut self, features: u64, layouts: &[QueueLayout]) -> Result<(), String> {
        if self.read32(reg::MAGIC) != 0x7472_6976 || self.read32(reg::VERSION) != 2 {
            return Err("not a virtio-mmio v2 device".into());
        }
        if !self.negotiate(features) {
            return Err(format!("features {features:#x} refused"));
        }
        self.queues.clear();
        for (i, l) in layouts.iter().enumerate() {
            self.setup_queue(i as u32, *l);
        }
        self.driver_ok();
        match self.status() {
            s if s & status::DEVICE_NEEDS_RESET != 0 => Err("device needs reset".into()),
            _ => Ok(()),
        }
    }

    pub fn put_desc(&self, table: u64, index: u16, d: Desc) {
        let addr = table.wrapping_add(16 * u64::from(index));
        self.mem
            .write_slice(&d.to_bytes(), GuestAddress(addr))
            .expect("descriptor table in memory");
    }

    pub fn get_desc(&self, table: u64, index: u16) -> Option<Desc> {
        let mut b = [0u8; 16];
        let addr = table.checked_add(16 * u64::from(index))?;
        self.mem.read_slice(&mut b, GuestAddress(addr)).ok()?;
        Some(Desc::from_bytes(&b))
    }

    /// The readable leading part of a table of `n` descriptors at `table`
    /// (read in chunks: tables can be long).
    pub fn get_descs(&self, table: u64, n: u16) -> Vec<Desc> {
        let mut out = Vec::new();
        for first in (0..n).step_by(256) {
            let count = (n - first).min(256);
            let mut bytes = vec![0u8; 16 * usize::from(count)];
            let addr = table.checked_add(16 * u64::from(first));
            match addr.map(|a| self.mem.read_slice(&mut bytes, GuestAddress(a))) {
                Some(Ok(())) => out.extend(bytes.chunks_exact(16).map(|c| {
                    let mut b = [0u8; 16];
                    b.copy_from_slice(c);
                    Desc::from_bytes(&b)
                })),
                _ => {
                    out.extend((first..first + count).map_while(|i| self.get_desc(table, i)));
                    break;
                }
            }
        }
        out
    }

    /// Lays `descs` out consecutively in queue `q`'s table, chained with
    /// NEXT (their own flags kept), publishes the head; returns it.
    pub fn chain(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let l = self.queues[q].layout;
        let n = descs.len() as u16;
        assert!(
            n >= 1 && n <= l.size,
            "chain of {n} in a queue of {}",
            l.size
        );
        if self.queues[q].next_desc + n > l.size {
            self.queues[q].next_desc = 0;
        }
        let head = self.queues[q].next_desc;
        for (k, d) in descs.iter().enumerate() {
            let i = head + k as u16;
            let mut d = *d;
            if (k as u16) + 1 < n {
                d.flags |= DESC_F_NEXT;
                d.next = i + 1;
            }
            self.put_desc(l.desc, i, d);
        }
        self.queues[q].next_desc = (head + n) % l.size;
        self.publish(q, head);
        head
    }

    /// Puts `head` in the next avail slot and bumps the avail index.
    pub fn publish(&mut self, q: usize, head: u16) {
        let dq = &mut self.queues[q];
        let l = dq.layout;
        let slot = l.avail + 4 + 2 * u64::from(dq.avail_idx % l.size);
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        let idx = dq.avail_idx;
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .expect("avail ring");
        self.set_avail_idx(q, idx);
    }

    /// Writes the avail index, whatever it is.
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        self.queues[q].avail_idx = idx;
        let addr = self.queues[q].layout.avail + 2;
        self.mem
            .write_obj(idx.to_le(), GuestAddress(addr))
            .expect("avail ring");
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        let addr = self.queues[q].layout.used + 2;
        u16::from_le(self.mem.read_obj(GuestAddress(addr)).expect("used ring"))
    }

    /// The used entries `(id, len)` added since the last call.
    pub fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let idx = self.used_idx(q);
        let l = self.queues[q].layout;
        let mut out = Vec::new();
        while self.queues[q].used_seen != idx && out.len() <= usize::from(l.size) {
            let slot = u64::from(self.queues[q].used_seen % l.size);
            let mut e = [0u8; 8];
            self.mem
                .read_slice(&mut e, GuestAddress(l.used + 4 + 8 * slot))
                .expect("used ring");
            out.push((
                u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            ));
            self.queues[q].used_seen = self.queues[q].used_seen.wrapping_add(1);
        }
        out
    }

    pub fn notify(&mut self, q: u32) {
        self.write32(reg::QUEUE_NOTIFY, q);
    }

    pub fn write_mem(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("in guest memory");
    }

    pub fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem
            .read_slice(&mut b, GuestAddress(addr))
            .expect("in guest memory");
        b
    }
}

/// A copy of all guest memory, to prove what a device did not write.
pub struct Snapshot {
    regions: Vec<(u64, Vec<u8>)>,
}

impl Snapshot {
    pub fn take(mem: &GuestMemoryMmap) -> Snapshot {
        let regions = mem
            .iter()
            .map(|r| (r.start_addr().0, region_bytes(r).to_vec()))
            .collect();
        Snapshot { regions }
    }

    /// Addresses (at most 16) whose bytes changed outside `allowed`.
    pub fn changed_outside(&self, mem: &GuestMemoryMmap, allowed: &[Range<u64>]) -> Vec<u64> {
        let mut out = Vec::new();
        for ((start, before), r) in self.regions.iter().zip(mem.iter()) {
            let now = region_bytes(r);
            // Whole chunks compare fast; only differing ones byte by byte.
            for (c, (a, b)) in before.chunks(4096).zip(now.chunks(4096)).enumerate() {
                if a == b {
                    continue;
                }
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    let addr = start + (c * 4096 + i) as u64;
                    if x != y && !allowed.iter().any(|r| r.contains(&addr)) {
                        out.push(addr);
                        if out.len() == 16 {
                            return out;
                        }
                    }
                }
            }
        }
        out
    }
}

/// A region's bytes as a slice (vm-memory's volatile copies are slow in
/// debug builds, and a fuzz loop compares all of memory each round).
fn region_bytes(r: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &[u8] {
    let ptr = r
        .get_host_address(MemoryRegionAddress(0))
        .expect("mapped region");
    // SAFETY: the mapping is `r.len()` bytes long and lives as long as the
    // borrowed region; devices under test run on the caller's thread, so
    // nothing writes guest memory while the slice is in use.
    unsafe { std::slice::from_raw_parts(ptr, r.len() as usize) }
}

/// Fills every region with bytes from `rng`, so any stray write shows.
pub fn scribble(mem: &GuestMemoryMmap, rng: &mut Prng) {
    let regions: Vec<(u64, usize)> = mem
        .iter()
        .map(|r| (r.start_addr().0, r.len() as usize))
        .collect();
    for (start, len) in regions {
        let mut bytes = vec![0u8; len];
        rng.fill(&mut bytes);
        mem.write_slice(&bytes, GuestAddress(start))
            .expect("region writable");
    }
}

/// A small deterministic PRNG (xorshift64*): fuzzing with a fixed seed
/// and no extra crates.
#[derive(Clone, Debug)]
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `num`/`den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Captures `log` records per thread, so a test can check that a device
/// said why it refused something.
pub mod logcap {
    use std::cell::RefCell;
    use std::sync::Once;

    const KEEP: usize = 4096;

    thread_local! {
        static LINES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }

        fn log(&self, record: &log::Record<'_>) {
            LINES.with(|l| {
                let mut l = l.borrow_mut();
                if l.len() >= KEEP {
                    l.drain(..KEEP / 2);
                }
                l.push(format!("{} {}", record.level(), record.args()));
            });
        }

        fn flush(&self) {}
    }

    static CAPTURE: Capture = Capture;

    /// Installs the capturing logger (once per process).
    pub fn install() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            if log::set_logger(&CAPTURE).is_ok() {
                log::set_max_level(log::LevelFilter::Debug);
            }
        });
    }

    /// This thread's records since the last call.
    pub fn take() -> Vec<String> {
        LINES.with(|l| std::mem::take(&mut *l.borrow_mut()))
    }
}
