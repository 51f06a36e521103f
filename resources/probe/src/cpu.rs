//! GDT, TSS, IDT, the interrupt entry stubs and the little ring-0 code.
//!
//! Ring 0 runs only `ring0_setup` (once) and short interrupt handlers, always
//! with IF=0 (interrupt gates clear it; nothing in ring 0 sets it except the
//! hardware-KVM idle stub, which is plain assembly). That matters twice: the
//! host target's code uses the red zone below RSP, which an interrupt nested
//! in ring 0 would clobber; and kvm_pvm emulates ring 0, slowly, with an
//! emulator that lacks SSE arithmetic, so ring-0 Rust code lives in
//! `.text.ring0` and the test suite checks that section for SSE registers.

use core::arch::{asm, global_asm};
use core::ptr::addr_of_mut;

use crate::boot::{self, PageTable, PTE_LARGE, PTE_PRESENT_RW_USER};
use crate::interrupts;

/// Selectors, fixed by the GDT layout below.
pub const KERNEL_CS: u16 = 0x08;
pub const USER_DS: u16 = 0x1b;
pub const USER_CS: u16 = 0x23;
pub const TSS_SEL: u16 = 0x28;

/// RFLAGS for ring 3 at entry: IOPL 3 (port I/O and cli/sti allowed in
/// ring 3), IF=0 until the APICs are programmed, bit 1 reserved-one.
pub const RING3_INITIAL_RFLAGS: u64 = 0x3002;

#[repr(C, packed)]
pub struct DescriptorPointer {
    pub limit: u16,
    pub base: u64,
}

/// null, kernel code64, kernel data, user data, user code64, TSS (2 slots).
#[no_mangle]
pub static mut GDT: [u64; 7] = [
    0,
    0x00AF_9A00_0000_FFFF,
    0x00CF_9200_0000_FFFF,
    0x00CF_F200_0000_FFFF,
    0x00AF_FA00_0000_FFFF,
    0,
    0,
];

// The GDT pointer needs the GDT's address as a link-time constant, which
// only the assembler can express.
global_asm!(
    r#"
    .section .data.gdt_pointer, "aw"
    .balign 8
    .global GDT_POINTER
GDT_POINTER:
    .word 7 * 8 - 1
    .quad GDT
    .section .text
    "#
);

#[repr(C, packed)]
pub struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

#[no_mangle]
pub static mut TSS: Tss = Tss {
    reserved0: 0,
    rsp: [0; 3],
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    // No I/O permission bitmap: with IOPL 3 ring 3 needs none.
    iomap_base: core::mem::size_of::<Tss>() as u16,
};

#[derive(Clone, Copy)]
#[repr(C)]
pub struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

pub static mut IDT: [IdtEntry; 256] = [IdtEntry {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
}; 256];

/// Interrupt gate, DPL 0 (hardware interrupts and exceptions only).
const GATE_INTERRUPT_DPL0: u8 = 0x8E;

/// Stack for double faults and NMIs (IST 1), so a broken ring-0 stack still
/// ends in a readable console line instead of a triple fault.
const IST_STACK_SIZE: usize = 8192;
static mut IST_STACK: boot::Stack<IST_STACK_SIZE> = boot::Stack([0; IST_STACK_SIZE]);

/// What the entry stub needs to drop to ring 3 (returned in rax:rdx).
#[repr(C)]
pub struct Ring3Entry {
    pub rip: u64,
    pub rsp: u64,
}

extern "C" {
    static BOOT_STACK_TOP: u8;
    static RING3_STACK_TOP: u8;
    static INTERRUPT_STUBS: [u8; 256 * 16];
}

/// One-time ring-0 setup: TSS, IDT, the page tables for RAM above 4 GiB,
/// kvmclock; measures how fast ring 0 runs (see [`crate::platform`]).
#[link_section = ".text.ring0.setup"]
#[no_mangle]
pub extern "C" fn ring0_setup(start_info_paddr: u32) -> Ring3Entry {
    // SAFETY: single CPU, interrupts off, nothing else runs yet; the statics
    // are only touched here and by the CPU itself once loaded.
    unsafe {
        let tss = addr_of_mut!(TSS);
        let rsp0 = core::ptr::addr_of!(BOOT_STACK_TOP) as u64;
        let ist1 = addr_of_mut!(IST_STACK) as u64 + IST_STACK_SIZE as u64;
        core::ptr::write_volatile(addr_of_mut!((*tss).rsp[0]), rsp0);
        core::ptr::write_volatile(addr_of_mut!((*tss).ist[0]), ist1);

        let tss_base = tss as u64;
        let tss_limit = (core::mem::size_of::<Tss>() - 1) as u64;
        let low = (tss_limit & 0xFFFF)
            | ((tss_base & 0xFF_FFFF) << 16)
            | (0x89u64 << 40)
            | (((tss_base >> 24) & 0xFF) << 56);
        let gdt = addr_of_mut!(GDT) as *mut u64;
        core::ptr::write_volatile(gdt.add(5), low);
        core::ptr::write_volatile(gdt.add(6), tss_base >> 32);
        asm!("ltr {0:x}", in(reg) TSS_SEL, options(nostack));

        let stubs = core::ptr::addr_of!(INTERRUPT_STUBS) as u64;
        let idt = addr_of_mut!(IDT) as *mut IdtEntry;
        let mut vector = 0usize;
        while vector < 256 {
            let handler = stubs + (vector as u64) * 16;
            let ist = match vector {
                2 | 8 | 18 => 1, // NMI, #DF, #MC
                _ => 0,
            };
            core::ptr::write_volatile(
                idt.add(vector),
                IdtEntry {
                    offset_low: handler as u16,
                    selector: KERNEL_CS,
                    ist,
                    type_attr: GATE_INTERRUPT_DPL0,
                    offset_mid: (handler >> 16) as u16,
                    offset_high: (handler >> 32) as u32,
                    reserved: 0,
                },
            );
            vector += 1;
        }
        let idt_pointer = DescriptorPointer {
            limit: (256 * 16 - 1) as u16,
            base: idt as u64,
        };
        asm!("lidt [{0}]", in(reg) &idt_pointer, options(nostack));

        map_high_ram(start_info_paddr);
        crate::platform::ring0_setup_clock_and_measure();
        crate::serial::ring0_init();
        crate::apic::ring0_mask_legacy_pic();

        Ring3Entry {
            rip: crate::probe_main as *const () as u64,
            // As if `probe_main` had been called: RSP+8 16-byte aligned.
            rsp: core::ptr::addr_of!(RING3_STACK_TOP) as u64 - 8,
        }
    }
}

/// Page directories for RAM above 4 GiB when the CPU has no 1 GiB pages.
const HIGH_PD_POOL: usize = 28;
static mut HIGH_PDS: [PageTable; HIGH_PD_POOL] = [const { PageTable([0; 512]) }; HIGH_PD_POOL];

/// Identity-maps every RAM range above 4 GiB from the start_info memmap
/// (1 GiB pages if the CPU has them, else 2 MiB pages from a small pool).
#[link_section = ".text.ring0.setup"]
unsafe fn map_high_ram(start_info_paddr: u32) {
    let info = start_info_paddr as u64 as *const u32;
    // SAFETY: the loader put a start_info there; the caller checked nothing,
    // so every field is read as plain memory and bounded below.
    let (magic, version) = (info.read_volatile(), info.add(1).read_volatile());
    if magic != crate::pvh::START_INFO_MAGIC || version < 1 {
        return;
    }
    let memmap = (info as *const u64).add(5).read_volatile();
    let entries = info.add(12).read_volatile().min(128);
    let gib_pages = crate::platform::ring0_cpuid(0x8000_0001).3 & (1 << 26) != 0;
    let pdpt = addr_of_mut!(boot::BOOT_PDPT) as *mut u64;
    let mut pool_used = 0usize;
    let mut index = 0u32;
    while index < entries {
        let entry = (memmap + index as u64 * 24) as *const u64;
        let (addr, size, kind) = (
            entry.read_volatile(),
            entry.add(1).read_volatile(),
            (entry.add(2) as *const u32).read_volatile(),
        );
        index += 1;
        if kind != 1 || size == 0 {
            continue;
        }
        let end = addr.saturating_add(size).min(512 << 30);
        let mut gib = (addr >> 30).max(4);
        while gib << 30 < end {
            let slot = pdpt.add(gib as usize);
            if slot.read_volatile() == 0 {
                if gib_pages {
                    slot.write_volatile((gib << 30) | PTE_PRESENT_RW_USER | PTE_LARGE);
                } else if pool_used < HIGH_PD_POOL {
                    let pd = addr_of_mut!(HIGH_PDS[pool_used]) as *mut u64;
                    pool_used += 1;
                    let mut i = 0u64;
                    while i < 512 {
                        pd.add(i as usize).write_volatile(
                            ((gib << 30) + (i << 21)) | PTE_PRESENT_RW_USER | PTE_LARGE,
                        );
                        i += 1;
                    }
                    slot.write_volatile(pd as u64 | PTE_PRESENT_RW_USER);
                }
            }
            gib += 1;
        }
    }
}

// One 16-byte stub per vector: push a zero error code where the CPU pushes
// none, push the vector, jump to the common path. The common path saves the
// caller-saved registers and calls `ring0_interrupt(frame)`, whose return
// value says whether to resume.
global_asm!(
    r#"
    .section .text.ring0.stubs, "ax"
    .balign 16
    .global INTERRUPT_STUBS
INTERRUPT_STUBS:
    .set vector, 0
    .rept 256
    .balign 16
    .if (vector == 8) || (vector == 10) || (vector == 11) || (vector == 12) || (vector == 13) || (vector == 14) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
    .else
    push 0
    .endif
    push vector
    jmp interrupt_common
    .set vector, vector + 1
    .endr

interrupt_common:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    /* 5 qwords from the CPU, error code, vector and 9 registers: RSP is
       16-byte aligned here, as the call needs. */
    mov rdi, rsp
    call {handler}
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    add rsp, 16
    iretq

    .section .text
    "#,
    handler = sym interrupts::ring0_interrupt,
);

/// Ring-3 stack.
pub const RING3_STACK_SIZE: usize = 256 * 1024;
global_asm!(
    r#"
    .section .bss.ring3_stack, "aw", @nobits
    .balign 16
    .skip {size}
    .global RING3_STACK_TOP
RING3_STACK_TOP:
    .section .text
    "#,
    size = const RING3_STACK_SIZE,
);
