//! The PVH `hvm_start_info` the loader leaves for us: command line and
//! memory map (read from ring 3; the loader's memory stays where it is).

pub const START_INFO_MAGIC: u32 = 0x336e_c578;
pub const E820_RAM: u32 = 1;
pub const MAX_MEMMAP: usize = 32;

#[derive(Clone, Copy, Default)]
pub struct MemRange {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub struct StartInfo {
    pub cmdline: &'static [u8],
    pub memmap: [MemRange; MAX_MEMMAP],
    pub memmap_len: usize,
}

/// Reads the start_info at `paddr`. Anything missing reads as empty: a bad
/// loader gets a probe that says what it lacks, not a crash.
pub fn read(paddr: u32) -> Result<StartInfo, &'static str> {
    let mut info = StartInfo {
        cmdline: &[],
        memmap: [MemRange::default(); MAX_MEMMAP],
        memmap_len: 0,
    };
    if paddr == 0 {
        return Err("no start_info (EBX was 0)");
    }
    let base = paddr as u64 as *const u32;
    // SAFETY: the loader passed this address; all RAM is identity-mapped and
    // readable, and the reads are bounded by the fields' documented layout.
    unsafe {
        if base.read_volatile() != START_INFO_MAGIC {
            return Err("start_info magic mismatch");
        }
        let version = base.add(1).read_volatile();
        let cmdline_paddr = (base as *const u64).add(3).read_volatile();
        if cmdline_paddr != 0 {
            let start = cmdline_paddr as *const u8;
            let mut len = 0usize;
            while len < 4096 && start.add(len).read_volatile() != 0 {
                len += 1;
            }
            info.cmdline = core::slice::from_raw_parts(start, len);
        }
        if version >= 1 {
            let memmap = (base as *const u64).add(5).read_volatile();
            let entries = base.add(12).read_volatile() as usize;
            for i in 0..entries.min(MAX_MEMMAP) {
                let entry = (memmap + i as u64 * 24) as *const u64;
                info.memmap[i] = MemRange {
                    addr: entry.read_volatile(),
                    size: entry.add(1).read_volatile(),
                    kind: (entry.add(2) as *const u32).read_volatile(),
                };
            }
            info.memmap_len = entries.min(MAX_MEMMAP);
        }
    }
    Ok(info)
}
