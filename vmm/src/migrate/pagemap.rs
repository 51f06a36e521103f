//! Which pages of guest RAM were never touched, so a migration pass can
//! send them as zero without reading them.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use migration::PAGE_SIZE;
use vm_memory::MmapRegion;

/// `/proc/self/pagemap`: which pages of a private anonymous mapping have
/// ever been faulted in.
///
/// A page of private anonymous memory that is neither present nor
/// swapped out (nor being migrated, which the kernel reports as swapped)
/// has never been written since the mapping was made, or was discarded
/// (MADV_DONTNEED): either way it reads as zero, and the stream can say so
/// without reading it — reading it would fault in a page-table entry for
/// the zero page, which is most of the cost of a full pass over a big,
/// mostly untouched guest. This holds only for private anonymous memory:
/// a shared or file mapping (a memfd) may hold data in the page cache
/// that this process never mapped, so such regions are always read. A
/// page the guest (or the VMM) writes after the pagemap was read is in
/// the dirty log, whose pass started before: it goes again in the next
/// pass, like any page written during a pass.
pub(super) struct Pagemap {
    file: File,
    entries: Vec<u64>,
    /// PAGEMAP_SCAN works here (Linux 6.7+): it reports the populated
    /// ranges only, and pages mapped to the shared zero page apart.
    scan: bool,
    regions: Vec<PageRegion>,
}

/// `struct pm_scan_arg` of linux/fs.h.
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region` of linux/fs.h.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;

/// Pagemap entry: page present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// Pagemap entry: page swapped out (or any other non-present swap-type
/// entry, e.g. a page being migrated).
const PM_SWAP: u64 = 1 << 62;

impl Pagemap {
    pub(super) fn open() -> Option<Pagemap> {
        match File::open("/proc/self/pagemap") {
            Ok(file) => Some(Pagemap {
                file,
                entries: Vec::new(),
                scan: true,
                regions: vec![PageRegion::default(); 256],
            }),
            Err(e) => {
                log::debug!("no pagemap ({e}): every page is read");
                None
            }
        }
    }

    /// For the `words * 64` pages from host address `addr`: a bit per
    /// page, set where the page may hold data (present, except mapped to
    /// the shared zero page, or swapped).
    pub(super) fn touched(
        &mut self,
        addr: usize,
        words: usize,
        out: &mut Vec<u64>,
    ) -> io::Result<()> {
        if self.scan {
            match self.scan_touched(addr, words, out) {
                Ok(()) => return Ok(()),
                // Not this kernel's: read the entries from now on.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {
                    log::debug!("no PAGEMAP_SCAN ({e}): pagemap entries are read");
                    self.scan = false;
                }
                Err(e) => return Err(e),
            }
        }
        self.read_touched(addr, words, out)
    }

    /// [`Self::touched`] with PAGEMAP_SCAN: the kernel walks only the
    /// populated page tables and returns ranges.
    pub(super) fn scan_touched(
        &mut self,
        addr: usize,
        words: usize,
        out: &mut Vec<u64>,
    ) -> io::Result<()> {
        out.clear();
        out.resize(words, 0);
        let end = (addr + words * 64 * PAGE_SIZE) as u64;
        let mut start = addr as u64;
        while start < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: 0,
                start,
                end,
                walk_end: 0,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: 0,
                category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO,
            };
            // SAFETY: PAGEMAP_SCAN on our own pagemap with a pm_scan_arg
            // of the size it states, whose vec points to vec_len
            // page_regions we own; the kernel writes only those and
            // walk_end.
            let n = unsafe { libc::ioctl(self.file.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            for r in self.regions.iter().take(n as usize) {
                if r.categories & (PAGE_IS_PFNZERO | PAGE_IS_SWAPPED) == PAGE_IS_PFNZERO {
                    // Mapped to the shared zero page: reads as zero.
                    continue;
                }
                let first = (r.start.max(addr as u64) - addr as u64) as usize / PAGE_SIZE;
                let last = (r.end.min(end) - addr as u64) as usize / PAGE_SIZE;
                for page in first..last {
                    out[page / 64] |= 1 << (page % 64);
                }
            }
            if arg.walk_end <= start {
                // No progress: whatever is left may hold data.
                let from = (start - addr as u64) as usize / PAGE_SIZE;
                for page in from..words * 64 {
                    out[page / 64] |= 1 << (page % 64);
                }
                break;
            }
            start = arg.walk_end;
        }
        Ok(())
    }

    /// [`Self::touched`] from the pagemap's entries, one per page.
    pub(super) fn read_touched(
        &mut self,
        addr: usize,
        words: usize,
        out: &mut Vec<u64>,
    ) -> io::Result<()> {
        self.entries.resize(words * 64, 0);
        let bytes = {
            let (head, bytes, tail) = {
                // SAFETY: any bytes are a valid u8; align_to_mut only
                // views the u64 buffer as bytes (no head or tail: u8
                // has alignment 1).
                unsafe { self.entries.align_to_mut::<u8>() }
            };
            debug_assert!(head.is_empty() && tail.is_empty());
            bytes
        };
        self.file
            .read_exact_at(bytes, (addr / PAGE_SIZE * 8) as u64)?;
        out.clear();
        out.extend(self.entries.chunks_exact(64).map(|entries| {
            entries.iter().enumerate().fold(0u64, |acc, (i, e)| {
                acc | u64::from(e & (PM_PRESENT | PM_SWAP) != 0) << i
            })
        }));
        Ok(())
    }
}

/// Whether `region` is private anonymous memory (see [`Pagemap`]).
pub(super) fn private_anonymous(region: &MmapRegion<vm_memory::bitmap::AtomicBitmap>) -> bool {
    region.file_offset().is_none()
        && region.flags() & libc::MAP_PRIVATE != 0
        && region.flags() & libc::MAP_ANONYMOUS != 0
}
