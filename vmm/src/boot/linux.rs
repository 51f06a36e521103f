//! The Linux boot protocol's zero page (`struct boot_params`).

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::{BootError, LoadedInitrd};
use crate::layout::{CMDLINE_START, ZERO_PAGE_START};
use crate::memory::{e820_map, GuestMemoryMmap};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// What an ELF vmlinux expects when there is no setup header to copy.
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// Where a kernel without a header says nothing: assume 2 GiB.
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

/// The header a kernel's setup code would have: copied from a bzImage, or
/// the minimum an ELF vmlinux needs.
fn header_for(bzimage_header: Option<setup_header>) -> setup_header {
    bzimage_header.unwrap_or(setup_header {
        boot_flag: KERNEL_BOOT_FLAG_MAGIC,
        header: KERNEL_HDR_MAGIC,
        kernel_alignment: KERNEL_MIN_ALIGNMENT_BYTES,
        ..Default::default()
    })
}

/// The most command line this kernel accepts, including the NUL.
pub fn cmdline_limit(bzimage_header: Option<setup_header>) -> usize {
    match bzimage_header {
        // Protocol 2.06+ states it; older kernels take 256 bytes.
        Some(h) if h.version >= 0x206 => h.cmdline_size as usize + 1,
        Some(_) => 256,
        None => 2048,
    }
}

/// Highest address the initrd may end at.
pub fn initrd_addr_max(bzimage_header: Option<setup_header>) -> u64 {
    match bzimage_header {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        _ => DEFAULT_INITRD_ADDR_MAX,
    }
}

/// Writes the zero page: header, command line, initrd, e820 map and RSDP.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    bzimage_header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<LoadedInitrd>,
    rsdp: u64,
    memory_size: u64,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr: header_for(bzimage_header),
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    let map = e820_map(memory_size);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootError::Write)
}
