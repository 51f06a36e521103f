//! Registers at the first instruction: the GDT, the boot page tables, the
//! segment and control registers each boot protocol requires, the FPU and
//! the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::CpuError;
use crate::boot::BootProtocol;
use crate::layout::*;
use crate::memory::GuestMemoryMmap;

// GDT slots. The Linux 64-bit boot protocol wants __BOOT_CS = 0x10 and
// __BOOT_DS = 0x18; PVH wants any flat 32-bit code and data.
const GDT: [u64; 5] = [
    0,                             // null
    gdt_entry(0xc09b, 0, 0xfffff), // 0x08: 32-bit code (PVH)
    gdt_entry(0xa09b, 0, 0xfffff), // 0x10: 64-bit code
    gdt_entry(0xc093, 0, 0xfffff), // 0x18: data
    gdt_entry(0x808b, 0, 0xfffff), // 0x20: TSS
];
const SEL_CODE32: u16 = 0x08;
const SEL_CODE64: u16 = 0x10;
const SEL_DATA: u16 = 0x18;
const SEL_TSS: u16 = 0x20;

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT_RW: u64 = 0x3;
const PDE_2M_PAGE: u64 = 0x83;

/// Packs a segment descriptor: `flags` holds the access byte in bits 0-7
/// and the granularity/size nibble in bits 12-15.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The segment register KVM loads for a descriptor of [`GDT`].
fn segment(selector: u16) -> kvm_segment {
    let entry = GDT[usize::from(selector >> 3)];
    let access = ((entry >> 40) & 0xff) as u8;
    let flags = ((entry >> 52) & 0xf) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = (flags >> 3) & 1;
    kvm_segment {
        base: 0,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: access & 0xf,
        present: (access >> 7) & 1,
        dpl: (access >> 5) & 3,
        db: (flags >> 2) & 1,
        s: (access >> 4) & 1,
        l: (flags >> 1) & 1,
        g,
        avl: flags & 1,
        unusable: 0,
        padding: 0,
    }
}

fn write_gdt_and_idt(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(CpuError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(CpuError::Memory)
}

/// Identity-maps the first 4 GiB with 2 MiB pages: the kernel, its zero
/// page, command line and initrd are all inside.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    mem.write_obj(PDPTE_START | PTE_PRESENT_RW, GuestAddress(PML4_START))
        .map_err(CpuError::Memory)?;
    for gib in 0..4u64 {
        let pd = PDE_START + gib * 0x1000;
        mem.write_obj(pd | PTE_PRESENT_RW, GuestAddress(PDPTE_START + gib * 8))
            .map_err(CpuError::Memory)?;
        for i in 0..512u64 {
            let addr = ((gib << 9) + i) << 21;
            mem.write_obj(addr | PDE_2M_PAGE, GuestAddress(pd + i * 8))
                .map_err(CpuError::Memory)?;
        }
    }
    Ok(())
}

/// Writes the boot GDT/IDT (and page tables for long mode) to memory and
/// loads the matching segment and control registers.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    vcpu: &VcpuFd,
    protocol: &BootProtocol,
) -> Result<(), CpuError> {
    write_gdt_and_idt(mem)?;
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(CpuError::Sregs)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let code = match protocol {
        BootProtocol::Linux64 { .. } => SEL_CODE64,
        BootProtocol::Pvh => SEL_CODE32,
    };
    sregs.cs = segment(code);
    let data = segment(SEL_DATA);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(SEL_TSS);
    match protocol {
        BootProtocol::Linux64 { .. } => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(CpuError::Sregs)
}

/// General registers at the entry point.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64, protocol: &BootProtocol) -> Result<(), CpuError> {
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is always set
        rip: entry,
        ..Default::default()
    };
    match protocol {
        BootProtocol::Linux64 { .. } => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootProtocol::Pvh => regs.rbx = PVH_INFO_START,
    }
    vcpu.set_regs(&regs).map_err(CpuError::SetRegs)
}

/// x87 control word and MXCSR at their power-on values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(CpuError::SetFpu)
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn set_delivery_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (b, r) in raw.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

/// LINT0 receives the PIC's ExtINT, LINT1 the NMI, as on a PC.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let mut lapic = vcpu.get_lapic().map_err(CpuError::Lapic)?;
    set_delivery_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_delivery_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(CpuError::Lapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode_to_flat_segments() {
        let cs64 = segment(SEL_CODE64);
        assert_eq!(
            (cs64.l, cs64.db, cs64.g, cs64.type_, cs64.present, cs64.s),
            (1, 0, 1, 0xb, 1, 1)
        );
        assert_eq!(cs64.limit, 0xffff_ffff);
        let cs32 = segment(SEL_CODE32);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let ds = segment(SEL_DATA);
        assert_eq!((ds.type_, ds.db, ds.s), (0x3, 1, 1));
        let tr = segment(SEL_TSS);
        assert_eq!((tr.type_, tr.s, tr.present), (0xb, 0, 1));
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }
}
