//! PVH boot: `hvm_start_info`, its memory map and module list
//! (xen/include/public/arch-x86/hvm/start_info.h).

use linux_loader::loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress};

use super::{BootError, LoadedInitrd};
use crate::layout::{CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, ZERO_PAGE_START};
use crate::memory::{e820_map, GuestMemoryMmap};

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Version 1 carries the memory map.
const START_INFO_VERSION: u32 = 1;

/// Writes start_info at [`PVH_INFO_START`]; EBX points there at entry.
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<LoadedInitrd>,
    rsdp: u64,
    memory_size: u64,
) -> Result<(), BootError> {
    let map = e820_map(memory_size);
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        };
        mem.write_obj(
            entry,
            GuestAddress(PVH_MEMMAP_START + i as u64 * entry_size),
        )
        .map_err(BootError::Write)?;
    }
    let modlist_addr = PVH_MEMMAP_START + map.len() as u64 * entry_size;
    debug_assert!(modlist_addr + 32 <= ZERO_PAGE_START);
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            cmdline_paddr: 0,
            reserved: 0,
        };
        mem.write_obj(module, GuestAddress(modlist_addr))
            .map_err(BootError::Write)?;
    }
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        flags: 0,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { modlist_addr } else { 0 },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        reserved: 0,
    };
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(BootError::Write)
}
