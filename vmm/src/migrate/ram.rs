//! Guest RAM in the stream: dirty tracking on the source (KVM's dirty log
//! merged with the pages the VMM itself wrote, which KVM cannot see) and
//! sending pages as zero or data runs; applying runs on the destination.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use migration::{OutsideMemory, RamSectionWriter, StreamError, PAGE_SIZE};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress, MmapRegion,
};

use super::pagemap::{private_anonymous, Pagemap};
use crate::builder::VmParts;
use crate::memory::{register_with_kvm, GuestMemoryMmap};

const PAGE: u64 = PAGE_SIZE as u64;

#[derive(Debug, thiserror::Error)]
pub enum RamError {
    #[error("turning dirty logging on or off: {0}")]
    SetDirtyLog(#[source] crate::memory::MemoryError),
    #[error("KVM_GET_DIRTY_LOG slot {slot}: {source}")]
    GetDirtyLog {
        slot: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("cancelled")]
    Cancelled,
    #[error("writing the snapshot's RAM image: {0}")]
    Image(#[source] std::io::Error),
}

/// Turns KVM's dirty logging on or off for every memory slot.
pub fn set_dirty_logging(parts: &VmParts, on: bool) -> Result<(), RamError> {
    let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
    // The first registration must be done before its flags change.
    parts.wait_for_memslots().map_err(RamError::SetDirtyLog)?;
    register_with_kvm(&parts.vm_fd, &parts.memory, flags).map_err(RamError::SetDirtyLog)
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

    /// Adds the pages of `other` (over the same memory).
    pub fn merge(&mut self, other: DirtyPages) {
        for (ra, rb) in self.regions.iter_mut().zip(other.regions) {
            for (wa, wb) in ra.iter_mut().zip(rb) {
                *wa |= wb;
            }
        }
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
            .map_err(|source| RamError::GetDirtyLog { slot, source })?;
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

impl std::ops::AddAssign for SentPages {
    fn add_assign(&mut self, other: Self) {
        self.zero += other.zero;
        self.data += other.data;
    }
}

/// Whether `page` is all zero; looks at 256 bytes at a time, so a page
/// with data near its start costs little.
fn is_zero(page: &[u8]) -> bool {
    page.chunks(256)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Dirty-bitmap words looked at together: one pagemap read covers them,
/// and the channels of a multifd migration take work in these units
/// (4096 pages, 16 MiB of guest memory).
const CHUNK_WORDS: usize = 64;

/// The chunks of a dirty set that have pages to send, handed out one at a
/// time to whichever channel asks next: channels that find more zero or
/// untouched memory simply take more chunks.
pub struct ChunkQueue<'a> {
    set: &'a DirtyPages,
    /// (region, chunk) pairs with at least one page set.
    chunks: Vec<(usize, usize)>,
    next: std::sync::atomic::AtomicUsize,
}

impl<'a> ChunkQueue<'a> {
    pub fn new(set: &'a DirtyPages) -> Self {
        let mut chunks = Vec::new();
        for (r, bits) in set.regions.iter().enumerate() {
            for (c, chunk) in bits.chunks(CHUNK_WORDS).enumerate() {
                if chunk.iter().any(|&w| w != 0) {
                    chunks.push((r, c));
                }
            }
        }
        Self {
            set,
            chunks,
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn claim(&self) -> Option<(usize, usize, &'a [u64])> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let &(r, c) = self.chunks.get(i)?;
        let bits = self.set.regions.get(r)?;
        let words = bits.get(c * CHUNK_WORDS..)?;
        Some((r, c, &words[..words.len().min(CHUNK_WORDS)]))
    }
}

/// Where [`send_pages`] puts pages: a stream's RAM sections, or a
/// snapshot file's RAM image ([`super::snapshot::ImagePages`]).
pub trait PageOut {
    /// `pages` zero pages from `gpa`.
    fn zero_pages(&mut self, gpa: u64, pages: u32) -> Result<(), RamError>;
    /// One page at `gpa`, read by `fill` into the place it goes; `fill`
    /// says whether it was all zero (it then goes as a zero page).
    /// Returns whether it went as data.
    fn page_or_zero<F>(&mut self, gpa: u64, fill: F) -> Result<bool, RamError>
    where
        F: FnOnce(&mut [u8]) -> std::io::Result<bool>;
}

impl<W: Write> PageOut for RamSectionWriter<'_, W> {
    fn zero_pages(&mut self, gpa: u64, pages: u32) -> Result<(), RamError> {
        Ok(RamSectionWriter::zero_pages(self, gpa, pages)?)
    }

    fn page_or_zero<F>(&mut self, gpa: u64, fill: F) -> Result<bool, RamError>
    where
        F: FnOnce(&mut [u8]) -> std::io::Result<bool>,
    {
        Ok(RamSectionWriter::page_or_zero(self, gpa, fill)?)
    }
}

/// Sends pages of `queue`'s set as runs until the queue is empty: all-zero
/// pages without data, the others with their contents, consecutive pages
/// of a kind as one run. Pages of private anonymous memory that were
/// never touched are zero without being read (see
/// [`Pagemap`](super::pagemap::Pagemap)). Several channels may call this
/// with one queue at once, each with its own writer. `cancelled` is
/// polled between chunks. `pagemap` is the caller's, opened before a
/// channel thread narrows its seccomp filter (no file is opened after).
pub(super) fn send_pages<O: PageOut>(
    ram: &mut O,
    memory: &GuestMemoryMmap,
    queue: &ChunkQueue<'_>,
    cancelled: &dyn Fn() -> bool,
    mut pagemap: Option<Pagemap>,
) -> Result<SentPages, RamError> {
    let mut sent = SentPages::default();
    let mut touched = Vec::with_capacity(CHUNK_WORDS);
    let regions: Vec<_> = memory.iter().collect();
    while let Some((r, c, chunk)) = queue.claim() {
        if cancelled() {
            return Err(RamError::Cancelled);
        }
        let Some(region) = regions.get(r) else {
            continue;
        };
        let base = region.start_addr().0;
        let host = region.as_ptr();
        let region_pages = (region.len() / PAGE) as usize;
        let mmap: &MmapRegion<_> = region;
        let first_word = c * CHUNK_WORDS;
        // Never more words than the region has pages for: the bitmap of a
        // region whose size is not a multiple of 64 pages ends in a
        // partial word.
        let words = chunk
            .len()
            .min((region_pages - first_word * 64).div_ceil(64));
        let known = match pagemap.as_mut() {
            Some(pm) if private_anonymous(mmap) => {
                // SAFETY: only the address is computed, inside the region.
                let addr = unsafe { host.add(first_word * 64 * PAGE_SIZE) } as usize;
                match pm.touched(addr, words, &mut touched) {
                    Ok(()) => true,
                    Err(e) => {
                        log::debug!("pagemap read failed ({e}): every page is read");
                        pagemap = None;
                        false
                    }
                }
            }
            _ => false,
        };
        for (i, &word) in chunk.iter().enumerate().take(words) {
            let first_page = (first_word + i) * 64;
            // Only the region's pages (a last, partial word).
            let left = region_pages.saturating_sub(first_page);
            let mut word = if left >= 64 {
                word
            } else {
                word & ((1u64 << left) - 1)
            };
            let untouched = match touched.get(i) {
                Some(t) if known => !t,
                _ => 0,
            };
            while word != 0 {
                let bit = word.trailing_zeros();
                let page = first_page + bit as usize;
                let gpa = base + page as u64 * PAGE;
                if untouched >> bit & 1 != 0 {
                    // Consecutive never-touched pages: zero, unread.
                    let n = ((word & untouched) >> bit).trailing_ones();
                    ram.zero_pages(gpa, n)?;
                    sent.zero += u64::from(n);
                    word &= if n == 64 {
                        0
                    } else {
                        !(((1u64 << n) - 1) << bit)
                    };
                } else {
                    // The guest may be writing the page (live passes): a
                    // torn copy only decides how this copy travels; the
                    // write is in the dirty log and the page goes again in
                    // the next pass. The page is read once, into the
                    // section, and checked for zero there.
                    let at = MemoryRegionAddress(page as u64 * PAGE);
                    let data = ram.page_or_zero(gpa, |dst| {
                        region.read_slice(dst, at).map_err(std::io::Error::other)?;
                        Ok(is_zero(dst))
                    })?;
                    if data {
                        sent.data += 1;
                    } else {
                        sent.zero += 1;
                    }
                    word &= word - 1;
                }
            }
        }
    }
    Ok(sent)
}

/// Pages the destination has written so far: a zero run over a page never
/// written costs nothing (fresh memory is zero), over one written before
/// it must clear it. Shared by the channels of a multifd migration, which
/// write disjoint pages of one pass at once (neighbouring pages share a
/// word, hence the atomics).
pub struct WrittenPages {
    bits: Vec<AtomicU64>,
}

impl WrittenPages {
    pub fn new(memory: &GuestMemoryMmap) -> Self {
        let pages = memory.last_addr().0 / PAGE + 1;
        Self {
            bits: (0..(pages as usize).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// Sets (`on`) or clears the bits of pages `first..first + count`;
    /// calls `was_set` with each page whose bit was set before.
    fn mark_range(&self, first: u64, count: u64, on: bool, mut was_set: impl FnMut(u64)) {
        let end = first + count;
        let mut page = first;
        while page < end {
            let (w, b) = ((page / 64) as usize, page % 64);
            let n = (64 - b).min(end - page);
            let Some(word) = self.bits.get(w) else {
                return;
            };
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << b
            };
            let old = if on {
                word.fetch_or(mask, Ordering::Relaxed)
            } else {
                word.fetch_and(!mask, Ordering::Relaxed)
            };
            let mut before = old & mask;
            while before != 0 {
                was_set(w as u64 * 64 + u64::from(before.trailing_zeros()));
                before &= before - 1;
            }
            page += n;
        }
    }
}

/// Puts the runs of `ram` sections into guest memory as the stream is
/// read ([`migration::StreamReader::next_section_with_ram`]): page data
/// goes from the connection straight into guest memory, without a copy
/// out of a section buffer. Every run is checked to lie inside one region
/// of guest memory before anything of it is written; a zero run clears
/// only pages an earlier run wrote ([`WrittenPages`]).
pub struct GuestRamSink<'a> {
    memory: &'a GuestMemoryMmap,
    written: &'a WrittenPages,
}

impl<'a> GuestRamSink<'a> {
    /// A sink into `memory`.
    ///
    /// # Safety
    /// Nothing else may read or write `memory` while the sink is in use:
    /// no vCPU has run and no device is active (an incoming VM being
    /// loaded). The sink hands out `&mut` slices of it. Several sinks
    /// sharing `written` may be used at once only for disjoint pages: the
    /// channels of one pass (a page is in a pass once, and the source
    /// starts a pass only once the destination has taken in the last).
    pub unsafe fn new(memory: &'a GuestMemoryMmap, written: &'a WrittenPages) -> Self {
        Self { memory, written }
    }

    /// The host address of `pages` pages from `gpa`, all in one region.
    fn host_range(&mut self, gpa: u64, pages: u64) -> Result<*mut u8, OutsideMemory> {
        let inside = pages
            .checked_mul(PAGE)
            .and_then(|len| gpa.checked_add(len))
            .and_then(|end| end.checked_sub(1))
            .and_then(|last| {
                let region = self.memory.find_region(GuestAddress(gpa))?;
                (last <= region.last_addr().0).then_some(region)
            })
            .and_then(|region| {
                region
                    .get_host_address(vm_memory::MemoryRegionAddress(gpa - region.start_addr().0))
                    .ok()
            });
        inside.ok_or(OutsideMemory { gpa, pages })
    }
}

impl migration::RamSink for GuestRamSink<'_> {
    fn zero_pages(&mut self, gpa: u64, pages: u32) -> Result<(), OutsideMemory> {
        let host = self.host_range(gpa, u64::from(pages))?;
        self.written
            .mark_range(gpa / PAGE, u64::from(pages), false, |page| {
                let at = (page * PAGE - gpa) as usize;
                // SAFETY: `page` is one of the run's pages, which
                // host_range found inside one mapped region; nothing else
                // touches guest memory while the sink is in use (`new`).
                unsafe { std::ptr::write_bytes(host.add(at), 0, PAGE_SIZE) };
            });
        Ok(())
    }

    fn data_pages(&mut self, gpa: u64, len: usize) -> Result<&mut [u8], OutsideMemory> {
        let pages = (len / PAGE_SIZE) as u64;
        let host = self.host_range(gpa, pages)?;
        let mut before = 0;
        self.written
            .mark_range(gpa / PAGE, pages, true, |_| before += 1);
        if before < pages {
            // Fresh pages: fault them in with one call rather than one
            // trap per page as the read fills them (the kernel allocates
            // and clears them either way). Best effort: before Linux 5.14
            // this fails and the read faults them in as before.
            // SAFETY: madvise on a range inside one region of guest
            // memory (host_range); populating changes no contents.
            unsafe { libc::madvise(host.cast(), len, libc::MADV_POPULATE_WRITE) };
        }
        // SAFETY: `len` bytes from `host` lie inside one mapped region of
        // guest memory, which outlives the sink (host_range); nothing else
        // touches guest memory while the sink is in use (`new`), the slice
        // borrows the sink mutably, so no two of its slices coexist, and
        // other sinks in use at once write other pages (`new`).
        Ok(unsafe { std::slice::from_raw_parts_mut(host, len) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration::RamRun;

    #[test]
    fn all_pages_and_zero_detection() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let all = DirtyPages::all(&mem);
        assert_eq!(all.count(), (64 << 20) / PAGE);
        let mut p = [0u8; PAGE_SIZE];
        assert!(is_zero(&p));
        for at in [0, 1, 255, 256, 2048, 4095] {
            p.fill(0);
            p[at] = 0x80;
            assert!(!is_zero(&p));
        }
    }

    /// Whether the page at `host` is mapped in this process.
    fn resident(host: *const u8) -> bool {
        let mut vec = 0u8;
        // SAFETY: mincore on one page of a live mapping, one output byte.
        let r = unsafe { libc::mincore(host as *mut libc::c_void, PAGE_SIZE, &mut vec) };
        assert_eq!(r, 0);
        vec & 1 != 0
    }

    #[test]
    fn pages_go_as_runs_and_untouched_memory_is_not_read() {
        // Two regions, as a guest bigger than the MMIO gap has.
        let ranges = [(GuestAddress(0), 8 << 20), (GuestAddress(1 << 32), 8 << 20)];
        let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        let data = |gpa: u64| vec![(gpa >> 12) as u8 | 1; PAGE_SIZE];
        let written = [0x1000u64, 0x2000, 0x3000, 0x10_0000, (1 << 32) + 0x7f_f000];
        for gpa in written {
            mem.write_slice(&data(gpa), GuestAddress(gpa)).unwrap();
        }
        // Touched, but zero: read, found zero.
        mem.write_slice(&[0u8; PAGE_SIZE], GuestAddress(0x20_0000))
            .unwrap();
        let untouched = mem.get_host_address(GuestAddress(0x40_0000)).unwrap();
        assert!(!resident(untouched));

        let mut w = migration::StreamWriter::new(Vec::new()).unwrap();
        let mut ram = w.ram();
        let all = DirtyPages::all(&mem);
        let sent = send_pages(
            &mut ram,
            &mem,
            &ChunkQueue::new(&all),
            &|| false,
            Pagemap::open(),
        )
        .unwrap();
        ram.finish().unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(sent.data, written.len() as u64);
        assert_eq!(sent.zero, DirtyPages::all(&mem).count() - sent.data);
        assert!(!resident(untouched), "a never-touched page was read");

        let mut r = migration::StreamReader::new(&bytes[..]).unwrap();
        let mut runs = Vec::new();
        loop {
            let section = r.next_section().unwrap();
            if section.kind == migration::SectionKind::End {
                break;
            }
            for run in section.ram_runs().unwrap() {
                match run.unwrap() {
                    RamRun::Zero { gpa, pages } => runs.push((gpa, u64::from(pages), None)),
                    RamRun::Data { gpa, data } => {
                        for (i, page) in data.chunks(PAGE_SIZE).enumerate() {
                            assert_eq!(page, &data_of(gpa + i as u64 * PAGE)[..]);
                        }
                        runs.push((gpa, (data.len() / PAGE_SIZE) as u64, Some(())))
                    }
                }
            }
        }
        fn data_of(gpa: u64) -> Vec<u8> {
            vec![(gpa >> 12) as u8 | 1; PAGE_SIZE]
        }
        // Consecutive data pages travel as one run; so do zero pages.
        assert_eq!(
            runs,
            vec![
                (0, 1, None),
                (0x1000, 3, Some(())),
                (0x4000, 0xfc, None),
                (0x10_0000, 1, Some(())),
                (0x10_1000, 0x6ff, None),
                (1 << 32, 0x7ff, None),
                ((1 << 32) + 0x7f_f000, 1, Some(())),
            ]
        );
    }

    #[test]
    fn the_sink_writes_runs_into_guest_memory_and_refuses_runs_outside() {
        let mem = crate::memory::create_guest_memory(8 << 20).unwrap();
        let mut w = migration::StreamWriter::new(Vec::new()).unwrap();
        let mut ram = w.ram();
        ram.data_pages(0x1000, &[7u8; 2 * PAGE_SIZE]).unwrap();
        ram.finish().unwrap();
        let mut ram = w.ram();
        // Over a page written before: cleared. Over pages never written:
        // nothing to do, they stay unmapped.
        ram.zero_pages(0x1000, 1).unwrap();
        ram.zero_pages(0x10_0000, 16).unwrap();
        ram.finish().unwrap();
        let bytes = w.finish().unwrap();
        // SAFETY: nothing else uses `mem`.
        let written = WrittenPages::new(&mem);
        let mut sink = unsafe { GuestRamSink::new(&mem, &written) };
        let mut r = migration::StreamReader::new(&bytes[..]).unwrap();
        while r.next_section_with_ram(&mut sink).unwrap().kind != migration::SectionKind::End {}
        let mut page = [1u8; PAGE_SIZE];
        mem.read_slice(&mut page, GuestAddress(0x1000)).unwrap();
        assert_eq!(page, [0u8; PAGE_SIZE]);
        mem.read_slice(&mut page, GuestAddress(0x2000)).unwrap();
        assert_eq!(page, [7u8; PAGE_SIZE]);
        let untouched = mem.get_host_address(GuestAddress(0x10_0000)).unwrap();
        assert!(!resident(untouched));

        let mut w = migration::StreamWriter::new(Vec::new()).unwrap();
        let mut ram = w.ram();
        ram.data_pages(0x7f_f000, &[1u8; 2 * PAGE_SIZE]).unwrap();
        ram.finish().unwrap();
        let bytes = w.finish().unwrap();
        // SAFETY: as above.
        let written = WrittenPages::new(&mem);
        let mut sink = unsafe { GuestRamSink::new(&mem, &written) };
        let mut r = migration::StreamReader::new(&bytes[..]).unwrap();
        let e = r.next_section_with_ram(&mut sink).unwrap_err();
        assert_eq!(
            e.to_string(),
            "migration stream: bad RAM run in section ram at byte 33: RAM run at 0x7ff000 (2 pages) lies outside guest memory"
        );
    }

    #[test]
    fn pagemap_scan_and_entries_agree() {
        let mem = crate::memory::create_guest_memory(8 << 20).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap();
        let data = [1u8; PAGE_SIZE];
        let written: Vec<usize> = [1, 2, 3, 100].into_iter().chain(64..128).collect();
        for &page in &written {
            mem.write_slice(&data, GuestAddress(page as u64 * PAGE))
                .unwrap();
        }
        // Read, never written: mapped to the shared zero page.
        let mut page = [1u8; PAGE_SIZE];
        mem.read_slice(&mut page, GuestAddress(200 * PAGE)).unwrap();
        assert!(is_zero(&page));
        let bits = |pages: &[usize]| {
            let mut words = vec![0u64; 32];
            for &p in pages {
                words[p / 64] |= 1 << (p % 64);
            }
            words
        };
        let mut pm = Pagemap::open().unwrap();
        let mut entries = Vec::new();
        pm.read_touched(host as usize, 32, &mut entries).unwrap();
        let mut with_zero_page = written.clone();
        with_zero_page.push(200);
        assert_eq!(entries, bits(&with_zero_page));
        let mut scanned = Vec::new();
        match pm.scan_touched(host as usize, 32, &mut scanned) {
            // The zero page's mapping reads as zero: not touched.
            Ok(()) => assert_eq!(scanned, bits(&written)),
            Err(e) => eprintln!("no PAGEMAP_SCAN on this kernel: {e}"),
        }
    }
}
