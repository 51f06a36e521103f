//! Where things live in guest-physical memory. One table, so boot code,
//! ACPI, the e820 map and the device allocator cannot disagree.

/// GDT used at boot (Linux 64-bit and PVH entry).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the guest installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Top of the stack the Linux 64-bit entry starts on.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4, one PDPT, four PDs mapping the first 4 GiB with
/// 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line, and the most of it we accept.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;

/// End of conventional RAM in the e820 map; the EBDA (MP table) follows.
pub const EBDA_START: u64 = 0x9fc00;
/// The BIOS area where a guest scans for the RSDP and the MP floating
/// pointer: ACPI tables in its first 64 KiB, the MP table in the second.
pub const BIOS_AREA_START: u64 = 0xe0000;
pub const RSDP_START: u64 = BIOS_AREA_START;
pub const MPTABLE_START: u64 = 0xf0000;
pub const BIOS_AREA_END: u64 = 0x10_0000;
/// Kernels load at 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit hole for devices: RAM beyond it moves above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows, one page each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI handed to virtio devices (0-4 are legacy, 4 is COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last usable IOAPIC pin of KVM's 24-pin IOAPIC.
pub const IRQ_MAX: u32 = 23;
/// The ACPI Generic Event Device (the power button): its event register,
/// just below the virtio windows, and the last IOAPIC pin (virtio devices
/// take the pins below it).
pub const GED_START: u64 = VIRTIO_MMIO_START - 0x1000;
pub const GED_IRQ: u32 = IRQ_MAX;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's real-mode TSS and identity-map pages (VT-x needs them).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Hard upper bound on guest RAM: keeps physical addresses well inside what
/// every x86-64 CPU can map.
pub const MAX_MEMORY: u64 = 1 << 40;
