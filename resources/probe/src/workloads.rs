//! Workloads: the heartbeat, memory dirtying at a set rate, and the seeded
//! memory pattern the migration tests verify.
//!
//! Both memory workloads use the "arena": the largest RAM range from the
//! PVH memory map, above the probe's own image. The pattern sits at the
//! arena's start, the dirtying region at its end, so both can run at once.

use crate::pvh::{MemRange, E820_RAM};

const PAGE: u64 = 4096;

#[derive(Clone, Copy, Default)]
pub struct Arena {
    pub start: u64,
    pub end: u64,
}

impl Arena {
    pub fn find(memmap: &[MemRange]) -> Arena {
        extern "C" {
            static __image_end: u8;
        }
        let image_end = core::ptr::addr_of!(__image_end) as u64;
        let floor = (image_end + (2 << 20) - 1) & !((2 << 20) - 1);
        let mut best = Arena::default();
        for r in memmap.iter().filter(|r| r.kind == E820_RAM) {
            let start = ((r.addr.max(floor)) + PAGE - 1) & !(PAGE - 1);
            let end = r.addr.saturating_add(r.size) & !(PAGE - 1);
            if end > start && end - start > best.end - best.start {
                best = Arena { start, end };
            }
        }
        best
    }

    pub fn size(&self) -> u64 {
        self.end - self.start
    }

    pub fn pattern_region(&self, size: u64) -> Result<u64, &'static str> {
        if size == 0 || !size.is_multiple_of(8) {
            return Err("pattern size must be a nonzero multiple of 8");
        }
        if size > self.size() {
            return Err("pattern larger than free RAM");
        }
        Ok(self.start)
    }

    pub fn dirty_region(&self, size: u64) -> Result<u64, &'static str> {
        if size < PAGE {
            return Err("dirty region must be at least a page");
        }
        if size > self.size() {
            return Err("dirty region larger than free RAM");
        }
        Ok((self.end - size) & !(PAGE - 1))
    }
}

fn pattern_word(seed: u64, index: u64) -> u64 {
    // splitmix64 of (seed, index): cheap, and every word differs.
    let mut z = seed.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fold(checksum: u64, word: u64) -> u64 {
    (checksum ^ word).wrapping_mul(0x0000_0100_0000_01B3)
}

pub const CHECKSUM_START: u64 = 0xcbf2_9ce4_8422_2325;

#[derive(Clone, Copy, Default)]
pub struct PatternReport {
    pub base: u64,
    pub size: u64,
    pub seed: u64,
    pub checksum: u64,
    pub bad_pages: u64,
    pub first_bad: Option<u64>,
}

/// Fills `size` bytes at `base` with the pattern of `seed`.
pub fn write_pattern(base: u64, size: u64, seed: u64) -> PatternReport {
    let words = base as *mut u64;
    let mut checksum = CHECKSUM_START;
    for i in 0..size / 8 {
        let w = pattern_word(seed, i);
        // SAFETY: the region lies in the arena (RAM, identity-mapped, not
        // used by the image, the stacks or the driver buffers).
        unsafe { words.add(i as usize).write_volatile(w) };
        checksum = fold(checksum, w);
    }
    PatternReport {
        base,
        size,
        seed,
        checksum,
        bad_pages: 0,
        first_bad: None,
    }
}

/// Checks the pattern; the checksum is of what memory holds now.
pub fn verify_pattern(base: u64, size: u64, seed: u64) -> PatternReport {
    let words = base as *const u64;
    let mut report = PatternReport {
        base,
        size,
        seed,
        checksum: CHECKSUM_START,
        ..Default::default()
    };
    let mut last_bad_page = u64::MAX;
    for i in 0..size / 8 {
        // SAFETY: as in `write_pattern`.
        let w = unsafe { words.add(i as usize).read_volatile() };
        report.checksum = fold(report.checksum, w);
        if w != pattern_word(seed, i) {
            let page = i * 8 / PAGE;
            if page != last_bad_page {
                last_bad_page = page;
                report.bad_pages += 1;
            }
            if report.first_bad.is_none() {
                report.first_bad = Some(base + i * 8);
            }
        }
    }
    report
}

/// Writes one word in each page of a region, round and round, at a rate.
#[derive(Clone, Copy)]
pub struct Dirtier {
    pub base: u64,
    pub pages: u64,
    /// Bytes per second; 0 = as fast as the main loop allows.
    pub rate: u64,
    started_ns: u64,
    pub pages_written: u64,
    cursor: u64,
}

impl Dirtier {
    pub fn new(base: u64, size: u64, rate: u64, now_ns: u64) -> Dirtier {
        Dirtier {
            base,
            pages: size / PAGE,
            rate,
            started_ns: now_ns,
            pages_written: 0,
            cursor: 0,
        }
    }

    /// Dirties the pages due by now (at most a bounded batch, so the rest
    /// of the probe stays responsive). Returns pages written.
    pub fn step(&mut self, now_ns: u64) -> u64 {
        let due = if self.rate == 0 {
            self.pages_written + 4096
        } else {
            let elapsed = now_ns.saturating_sub(self.started_ns) as u128;
            (elapsed * self.rate as u128 / 1_000_000_000 / PAGE as u128) as u64
        };
        let batch = due.saturating_sub(self.pages_written).min(4096);
        for _ in 0..batch {
            let addr = self.base + self.cursor * PAGE + (self.pages_written % 512) * 8;
            // SAFETY: inside the dirty region, which lies in the arena.
            unsafe { (addr as *mut u64).write_volatile(self.pages_written) };
            self.pages_written += 1;
            self.cursor = (self.cursor + 1) % self.pages.max(1);
        }
        batch
    }
}

/// Prints a heartbeat line every `period_ms`.
#[derive(Clone, Copy, Default)]
pub struct Heartbeat {
    pub period_ms: u64,
    next_ms: u64,
    pub count: u64,
}

impl Heartbeat {
    pub fn set(&mut self, period_ms: u64, now_ms: u64) {
        self.period_ms = period_ms;
        self.next_ms = now_ms + period_ms;
    }

    /// The counter value to print, when one is due.
    pub fn due(&mut self, now_ms: u64) -> Option<u64> {
        if self.period_ms == 0 || now_ms < self.next_ms {
            return None;
        }
        self.count += 1;
        // Skip missed beats (e.g. after a pause) rather than print a burst.
        self.next_ms += self.period_ms;
        if self.next_ms <= now_ms {
            self.next_ms = now_ms + self.period_ms;
        }
        Some(self.count)
    }
}
