//! Guest RAM: how it is laid out around the MMIO gap, how it is mapped in
//! the VMM, and the e820 view of it the guest boots with.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::*;

pub use devices::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot register guest memory with KVM: {0}")]
    Register(#[source] kvm_ioctls::Error),
    #[error("cannot register guest memory with KVM on a thread of its own: {0}")]
    RegisterThread(#[source] std::io::Error),
    #[error("guest memory memfd: {0}")]
    Memfd(#[source] std::io::Error),
    #[error("the memfd received holds {have} bytes, the guest needs {need}")]
    MemfdTooSmall { have: u64, need: u64 },
    #[error("the snapshot's RAM image has regions {image:?}, a guest of {size} bytes has {need:?} (gpa, bytes)")]
    ImageLayout {
        size: u64,
        image: Vec<(u64, u64)>,
        need: Vec<(u64, u64)>,
    },
    #[error("cannot map the snapshot's RAM image: {0}")]
    MapImage(#[source] vm_memory::mmap::MmapRegionError),
}

/// The RAM ranges of a guest with `size` bytes: below the MMIO gap first,
/// the rest from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), size - low));
    }
    ranges
}

/// Maps guest RAM in this process (anonymous, private, not reserved: pages
/// cost host memory only once the guest touches them).
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(a, s)| (a, s as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { size, source })
}

/// Lets the host back anonymous guest RAM with transparent huge pages, as
/// QEMU does: KVM then maps the guest 2 MiB at a time, and a guest that
/// walks its memory runs ~1.7× faster on kvm_pvm (measured with the
/// probe's dirtier over 768 MiB). Needs the host's THP `enabled` to be
/// `madvise` or `always`; huge guest mappings also need each region to
/// start 2 MiB-aligned (Linux ≥ 6.7 aligns large anonymous mappings).
///
/// An incoming migration calls this for the first (full) pass, where one
/// fault fills 2 MiB instead of 4 KiB (the destination's receive ran
/// ~1.5-3x faster), then [`advise_small_pages`] for the later passes: a
/// huge page first touched by the last pass would be a 2 MiB clear (and
/// under the default THP `defrag` a compaction) on the stopped guest's
/// critical path (idle 1 GiB downtime went from ~2 ms to ~10 ms), and
/// this again once the VM has arrived.
pub fn advise_huge_pages(memory: &GuestMemoryMmap) {
    advise(memory, libc::MADV_HUGEPAGE);
}

/// Back to small pages for memory not yet touched (what is huge stays).
pub fn advise_small_pages(memory: &GuestMemoryMmap) {
    advise(memory, libc::MADV_NOHUGEPAGE);
}

fn advise(memory: &GuestMemoryMmap, advice: libc::c_int) {
    const HUGE: usize = 2 << 20;
    for region in memory.iter() {
        // The first 2 MiB of guest memory hold what boot writes and the
        // guest touches first (boot tables, stacks, a kernel at 1 MiB): a
        // huge page there would be cleared whole before the first guest
        // instruction, for nothing.
        let skip = if region.start_addr().0 == 0 {
            HUGE.min(region.len() as usize)
        } else {
            0
        };
        // SAFETY: `skip` is within the region, so `addr` points into it.
        let addr = unsafe { region.as_ptr().add(skip) };
        let len = region.len() as usize - skip;
        if len == 0 {
            continue;
        }
        // SAFETY: madvise only changes how the kernel backs this live
        // mapping of `len` bytes; its contents stay as they are.
        let rc = unsafe { libc::madvise(addr.cast(), len, advice) };
        if advice != libc::MADV_HUGEPAGE {
            continue;
        }
        if rc != 0 {
            log::info!(
                "guest RAM at {:#x}: no transparent huge pages ({})",
                region.start_addr().0,
                std::io::Error::last_os_error()
            );
        } else if !(addr as usize).is_multiple_of(HUGE) {
            log::info!(
                "guest RAM at {:#x} is mapped at {addr:p}, not 2 MiB-aligned: KVM cannot map it with huge pages",
                region.start_addr().0
            );
        }
    }
}

/// Where guest RAM lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryBackend {
    /// Private anonymous memory (the default).
    #[default]
    Anonymous,
    /// A memfd mapped shared: another process (a local migration's
    /// destination) can map the very same pages.
    Memfd,
}

/// A new memfd of `size` bytes for guest RAM.
pub fn create_memfd(size: u64) -> Result<File, MemoryError> {
    let name = c"ferry-guest-ram";
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is
    // owned by the File from here on.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    Ok(file)
}

/// Maps guest RAM from `file` (a memfd): the ranges of [`ram_ranges`] at
/// consecutive offsets, shared.
pub fn map_memfd(file: &File, size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let len = file.metadata().map_err(MemoryError::Memfd)?.len();
    if len < size {
        return Err(MemoryError::MemfdTooSmall {
            have: len,
            need: size,
        });
    }
    let mut offset = 0u64;
    let mut ranges = Vec::new();
    for (addr, len) in ram_ranges(size) {
        let clone = file.try_clone().map_err(MemoryError::Memfd)?;
        ranges.push((addr, len as usize, Some(FileOffset::new(clone, offset))));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(ranges)
        .map_err(|source| MemoryError::Map { size, source })
}

/// Guest RAM mapped from a snapshot file's RAM image, privately: the
/// guest starts at once and each page comes from the page cache when
/// first touched; what the guest writes is its own (copy on write), the
/// file never changes. The layout must be exactly the guest's.
pub fn map_image(
    file: &File,
    layout: &migration::snapshot::ImageLayout,
    size: u64,
) -> Result<GuestMemoryMmap, MemoryError> {
    let need: Vec<(u64, u64)> = ram_ranges(size).iter().map(|&(a, l)| (a.0, l)).collect();
    let image: Vec<(u64, u64)> = layout.regions.iter().map(|r| (r.gpa, r.len)).collect();
    if image != need {
        return Err(MemoryError::ImageLayout { size, image, need });
    }
    let mut regions = Vec::new();
    for r in &layout.regions {
        let clone = file.try_clone().map_err(MemoryError::Memfd)?;
        let len = r.len as usize;
        let mapping = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(
            len,
            <vm_memory::bitmap::AtomicBitmap as vm_memory::bitmap::NewBitmap>::with_len(len),
        )
        .with_file_offset(FileOffset::new(clone, r.offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(MemoryError::MapImage)?;
        let region = vm_memory::GuestRegionMmap::new(mapping, GuestAddress(r.gpa)).ok_or(
            MemoryError::Map {
                size,
                source: vm_memory::mmap::FromRangesError::InvalidGuestRegion,
            },
        )?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map {
        size,
        source: e.into(),
    })
}

/// Registers every region with KVM as memory slot 0, 1, ...
pub fn register_with_kvm(
    vm: &kvm_ioctls::VmFd,
    memory: &GuestMemoryMmap,
    flags: u32,
) -> Result<(), MemoryError> {
    for (slot, region) in memory.iter().enumerate() {
        let mem_region = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size`
        // bytes owned by `memory`, which the VMM keeps alive for as long as
        // the VM exists.
        unsafe { vm.set_user_memory_region(mem_region) }.map_err(MemoryError::Register)?;
    }
    Ok(())
}

/// Guest memory being registered with KVM on a thread of its own.
///
/// Each KVM_SET_USER_MEMORY_REGION waits for an SRCU grace period: 4–8 ms
/// here whatever the slot's size, most of what start-up spends before the
/// guest's first instruction. Nothing before that instruction needs the
/// slots (the kernel and boot tables are written through the host's
/// mapping; vCPUs and devices are made without them), so the wait runs
/// beside the rest of the set-up and [`Self::wait`] ends it before the
/// first KVM_RUN.
pub struct PendingMemslots(std::thread::JoinHandle<Result<(), MemoryError>>);

impl PendingMemslots {
    pub fn start(
        kvm: &kvm_ioctls::Kvm,
        vm: &kvm_ioctls::VmFd,
        memory: &GuestMemoryMmap,
    ) -> Result<Self, MemoryError> {
        use std::os::fd::AsRawFd;
        // SAFETY: F_DUPFD_CLOEXEC on the VM's open descriptor; the copy
        // is owned by the VmFd made from it below.
        let dup = unsafe { libc::fcntl(vm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(MemoryError::RegisterThread(std::io::Error::last_os_error()));
        }
        // SAFETY: `dup` is a VM descriptor of our own, owned from here on
        // by the returned VmFd (closed when it drops).
        let vm = unsafe { kvm.create_vmfd_from_rawfd(dup) }.map_err(MemoryError::Register)?;
        // The clone keeps the mapping alive until the thread is done.
        let memory = memory.clone();
        std::thread::Builder::new()
            .name("ferry-memslots".into())
            .spawn(move || register_with_kvm(&vm, &memory, 0))
            .map(Self)
            .map_err(MemoryError::RegisterThread)
    }

    /// Waits until every slot is registered.
    pub fn wait(self) -> Result<(), MemoryError> {
        self.0.join().unwrap_or_else(|_| {
            Err(MemoryError::RegisterThread(std::io::Error::other(
                "the thread panicked",
            )))
        })
    }
}

/// e820 entry types shared by the Linux boot protocol and PVH.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Type,
}

/// The memory map the guest boots with: conventional RAM up to the EBDA,
/// the EBDA and BIOS area (MP table, ACPI tables) reserved, then RAM from
/// 1 MiB, and RAM above 4 GiB when the guest is larger than the gap.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            kind: E820Type::Reserved,
        },
        E820Entry {
            addr: BIOS_AREA_START,
            size: BIOS_AREA_END - BIOS_AREA_START,
            kind: E820Type::Reserved,
        },
    ];
    for (start, len) in ram_ranges(size) {
        let (addr, end) = (start.0.max(HIMEM_START), start.0 + len);
        if end > addr {
            map.push(E820Entry {
                addr,
                size: end - addr,
                kind: E820Type::Ram,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_no_high_ram() {
        let map = e820_map(512 << 20);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[3],
            E820Entry {
                addr: HIMEM_START,
                size: (512 << 20) - HIMEM_START,
                kind: E820Type::Ram
            }
        );
    }

    #[test]
    fn large_guest_moves_ram_above_the_gap() {
        let size = 4u64 << 30;
        let ranges = ram_ranges(size);
        assert_eq!(
            ranges,
            vec![
                (GuestAddress(0), MMIO_GAP_START),
                (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START)
            ]
        );
        let map = e820_map(size);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        // Everything but the legacy hole below 1 MiB is RAM.
        assert_eq!(ram, size - (HIMEM_START - EBDA_START));
        assert_eq!(map.last().unwrap().addr, MMIO_GAP_END);
    }
}
