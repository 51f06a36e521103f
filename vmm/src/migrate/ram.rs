//! Guest RAM in the stream: dirty tracking on the source (KVM's dirty log
//! merged with the pages the VMM itself wrote, which KVM cannot see) and
//! sending pages as zero or data runs; applying runs on the destination.

use std::io::Write;

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use migration::{RamRun, RamSectionWriter, Section, StreamError, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use crate::builder::VmParts;
use crate::memory::{register_with_kvm, GuestMemoryMmap};

const PAGE: u64 = PAGE_SIZE as u64;

#[derive(Debug, thiserror::Error)]
pub enum RamError {
    #[error("dirty logging: {0}")]
    DirtyLog(String),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("reading guest memory at {gpa:#x}: {why}")]
    Read { gpa: u64, why: String },
    #[error(
        "RAM run at {gpa:#x} ({pages} pages) in section at byte {offset} lies outside guest memory"
    )]
    OutsideMemory { gpa: u64, pages: u64, offset: u64 },
    #[error("cancelled")]
    Cancelled,
}

/// Turns KVM's dirty logging on or off for every memory slot.
pub fn set_dirty_logging(parts: &VmParts, on: bool) -> Result<(), RamError> {
    let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
    register_with_kvm(&parts.vm_fd, &parts.memory, flags)
        .map_err(|e| RamError::DirtyLog(e.to_string()))
}

/// A set of pages per memory region: one bit per page.
pub struct DirtyPages {
    pub regions: Vec<Vec<u64>>,
}

impl DirtyPages {
    /// Every page of guest memory.
    pub fn all(memory: &GuestMemoryMmap) -> Self {
        let regions = memory
            .iter()
            .map(|r| {
                let pages = (r.len() / PAGE) as usize;
                let mut words = vec![u64::MAX; pages.div_ceil(64)];
                if !pages.is_multiple_of(64) {
                    if let Some(last) = words.last_mut() {
                        *last = (1u64 << (pages % 64)) - 1;
                    }
                }
                words
            })
            .collect();
        Self { regions }
    }

    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }
}

/// Takes and clears the dirty pages since the last call: KVM's log of
/// guest writes, or'ed with the vm-memory bitmap of the VMM's own writes
/// (virtio rx buffers, used rings).
pub fn take_dirty(parts: &VmParts) -> Result<DirtyPages, RamError> {
    let mut regions = Vec::new();
    for (slot, region) in parts.memory.iter().enumerate() {
        let mut kvm_log = parts
            .vm_fd
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|e| RamError::DirtyLog(format!("KVM_GET_DIRTY_LOG slot {slot}: {e}")))?;
        let mmap: &MmapRegion<_> = region;
        let vmm_log = mmap.bitmap().get_and_reset();
        for (k, v) in kvm_log.iter_mut().zip(vmm_log) {
            *k |= v;
        }
        regions.push(kvm_log);
    }
    Ok(DirtyPages { regions })
}

/// What a call to [`send_pages`] sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct SentPages {
    pub zero: u64,
    pub data: u64,
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only splits
        // the slice into aligned parts.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Sends the pages of `set` as runs: all-zero pages without data, the
/// others with their contents. `cancelled` is polled between chunks.
pub fn send_pages<W: Write>(
    ram: &mut RamSectionWriter<'_, W>,
    memory: &GuestMemoryMmap,
    set: &DirtyPages,
    cancelled: &dyn Fn() -> bool,
) -> Result<SentPages, RamError> {
    let mut sent = SentPages::default();
    let mut page = [0u8; PAGE_SIZE];
    for (region, bits) in memory.iter().zip(&set.regions) {
        let base = region.start_addr().0;
        for (w, &word) in bits.iter().enumerate() {
            if word == 0 {
                continue;
            }
            if w % 64 == 0 && cancelled() {
                return Err(RamError::Cancelled);
            }
            let mut word = word;
            while word != 0 {
                let bit = word.trailing_zeros() as u64;
                word &= word - 1;
                let gpa = base + (w as u64 * 64 + bit) * PAGE;
                memory
                    .read_slice(&mut page, GuestAddress(gpa))
                    .map_err(|e| RamError::Read {
                        gpa,
                        why: e.to_string(),
                    })?;
                if is_zero(&page) {
                    ram.zero_pages(gpa, 1)?;
                    sent.zero += 1;
                } else {
                    ram.data_pages(gpa, &page)?;
                    sent.data += 1;
                }
            }
        }
    }
    Ok(sent)
}

/// Pages the destination has written so far: a zero run over a page never
/// written costs nothing (fresh memory is zero), over one written before
/// it must clear it.
pub struct WrittenPages {
    bits: Vec<u64>,
}

impl WrittenPages {
    pub fn new(memory: &GuestMemoryMmap) -> Self {
        let pages = memory.last_addr().0 / PAGE + 1;
        Self {
            bits: vec![0; (pages as usize).div_ceil(64)],
        }
    }

    fn mark(&mut self, page: u64, on: bool) -> bool {
        let (w, b) = ((page / 64) as usize, page % 64);
        let Some(word) = self.bits.get_mut(w) else {
            return false;
        };
        let was = *word & (1 << b) != 0;
        if on {
            *word |= 1 << b;
        } else {
            *word &= !(1 << b);
        }
        was
    }
}

/// Writes a `ram` section's runs into guest memory. Every run is checked
/// to lie inside guest memory before anything of it is written.
pub fn apply_ram(
    section: &Section,
    memory: &GuestMemoryMmap,
    written: &mut WrittenPages,
) -> Result<u64, RamError> {
    let mut pages = 0;
    let zeros = [0u8; PAGE_SIZE];
    for run in section.ram_runs()? {
        let run = run?;
        let (gpa, count) = (run.gpa(), run.pages());
        let end = gpa.checked_add(run.len()).and_then(|e| e.checked_sub(1));
        let inside = end.is_some_and(|end| {
            memory.address_in_range(GuestAddress(gpa))
                && memory.address_in_range(GuestAddress(end))
                && memory
                    .find_region(GuestAddress(gpa))
                    .map(|r| r.start_addr())
                    == memory
                        .find_region(GuestAddress(end))
                        .map(|r| r.start_addr())
        });
        if !inside {
            return Err(RamError::OutsideMemory {
                gpa,
                pages: count,
                offset: section.payload_offset(),
            });
        }
        match run {
            RamRun::Zero { .. } => {
                for p in 0..count {
                    if written.mark(gpa / PAGE + p, false) {
                        memory
                            .write_slice(&zeros, GuestAddress(gpa + p * PAGE))
                            .map_err(|e| RamError::Read {
                                gpa,
                                why: e.to_string(),
                            })?;
                    }
                }
            }
            RamRun::Data { data, .. } => {
                memory
                    .write_slice(data, GuestAddress(gpa))
                    .map_err(|e| RamError::Read {
                        gpa,
                        why: e.to_string(),
                    })?;
                for p in 0..count {
                    written.mark(gpa / PAGE + p, true);
                }
            }
        }
        pages += count;
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_pages_and_zero_detection() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let all = DirtyPages::all(&mem);
        assert_eq!(all.count(), (64 << 20) / PAGE);
        assert!(is_zero(&[0u8; PAGE_SIZE]));
        let mut p = [0u8; PAGE_SIZE];
        p[4095] = 1;
        assert!(!is_zero(&p));
    }
}
