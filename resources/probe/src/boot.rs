//! From the PVH entry (32-bit protected mode, paging off) to ring 3.
//!
//! The PVH loader jumps to `pvh_entry32` with EBX = physical address of the
//! `hvm_start_info`. The assembly below builds the identity map of the first
//! 4 GiB (2 MiB pages, every level user-accessible so ring 3 reaches all RAM
//! and the device windows), enables SSE, PAE and long mode, and calls
//! [`crate::cpu::ring0_setup`], which loads the GDT/IDT/TSS and returns the
//! ring-3 entry state. `enter_ring3` then `iretq`s into `probe_main`.
//!
//! Everything here runs in ring 0, which kvm_pvm emulates at a few million
//! instructions per second, so it is kept short: no bss clearing (the loader
//! hands us zeroed RAM, as an ELF loader must for bss), four page-directory
//! pages filled by a tight loop, and nothing else.

use core::arch::global_asm;

/// XEN_ELFNOTE_PHYS32_ENTRY: the note type a PVH loader looks for.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Page-table flags: present, writable, user.
pub const PTE_PRESENT_RW_USER: u64 = 0x7;
/// Large page (2 MiB in a PD entry, 1 GiB in a PDPT entry).
pub const PTE_LARGE: u64 = 0x80;
/// Uncached (PCD | PWT), used for the 3-4 GiB window where the device
/// registers live.
pub const PTE_UNCACHED: u64 = 0x18;

#[repr(C, align(4096))]
pub struct PageTable(pub [u64; 512]);

/// PML4, PDPT and the four page directories of the first 4 GiB, then a pool
/// of page directories for RAM above 4 GiB when 1 GiB pages are missing.
#[no_mangle]
pub static mut BOOT_PML4: PageTable = PageTable([0; 512]);
#[no_mangle]
pub static mut BOOT_PDPT: PageTable = PageTable([0; 512]);
#[no_mangle]
pub static mut BOOT_PD_LOW: [PageTable; 4] = [const { PageTable([0; 512]) }; 4];

/// Physical address of the hvm_start_info, saved from EBX.
#[no_mangle]
pub static mut START_INFO_PADDR: u32 = 0;

global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long {note_type}
    .asciz "Xen"
    .balign 4
    .quad pvh_entry32
    .balign 4

    .section .text.pvh_entry, "ax"
    .code32
    .global pvh_entry32
pvh_entry32:
    cli
    cld
    mov dword ptr [START_INFO_PADDR], ebx
    mov esp, offset BOOT_STACK_TOP

    /* PML4[0] -> PDPT; PDPT[0..4] -> the four page directories. */
    mov eax, offset BOOT_PDPT
    or eax, {rw_user}
    mov dword ptr [BOOT_PML4], eax
    mov dword ptr [BOOT_PML4 + 4], 0
    mov edi, offset BOOT_PDPT
    mov eax, offset BOOT_PD_LOW
    or eax, {rw_user}
    mov ecx, 4
1:
    mov dword ptr [edi], eax
    mov dword ptr [edi + 4], 0
    add edi, 8
    add eax, 4096
    dec ecx
    jnz 1b

    /* 2048 entries of 2 MiB: identity map 0-4 GiB; 3-4 GiB uncached. */
    mov edi, offset BOOT_PD_LOW
    xor ecx, ecx
2:
    mov eax, ecx
    shl eax, 21
    or eax, {large_rw_user}
    cmp ecx, 1536
    jb 3f
    or eax, {uncached}
3:
    mov dword ptr [edi + ecx * 8], eax
    mov dword ptr [edi + ecx * 8 + 4], 0
    inc ecx
    cmp ecx, 2048
    jb 2b

    /* CR4: PAE, OSFXSR, OSXMMEXCPT. */
    mov eax, cr4
    or eax, (1 << 5) | (1 << 9) | (1 << 10)
    mov cr4, eax
    mov eax, offset BOOT_PML4
    mov cr3, eax
    /* EFER.LME */
    mov ecx, 0xC0000080
    rdmsr
    or eax, (1 << 8)
    wrmsr
    /* CR0: PG, PE, MP, NE, WP; EM off (SSE). */
    mov eax, cr0
    and eax, ~(1 << 2)
    or eax, (1 << 31) | (1 << 0) | (1 << 1) | (1 << 5) | (1 << 16)
    mov cr0, eax

    lgdt [GDT_POINTER]
    /* ljmp 0x08:long_entry64, spelled out: the assembler's 32-bit far
       jump syntax differs between dialects. */
    .byte 0xEA
    .long long_entry64
    .word 0x08

    .code64
long_entry64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov rsp, offset BOOT_STACK_TOP
    mov edi, dword ptr [START_INFO_PADDR]
    call {ring0_setup}
    /* rax = ring-3 entry point, rdx = ring-3 stack top (Ring3Entry). */
    mov ecx, {rflags}
    jmp enter_ring3

    /* enter_ring3(rip = rax, rsp = rdx, rflags = rcx): build an iretq frame. */
    .global enter_ring3
enter_ring3:
    /* Raise IOPL in ring 0 first too: iretq alone did not carry IOPL 3
       into ring 3 on kvm_pvm. */
    push rcx
    popfq
    push {user_ds}
    push rdx
    push rcx
    push {user_cs}
    push rax
    mov cx, {user_ds}
    mov ds, cx
    mov es, cx
    iretq

    .section .text
    "#,
    note_type = const XEN_ELFNOTE_PHYS32_ENTRY,
    rw_user = const PTE_PRESENT_RW_USER,
    large_rw_user = const PTE_PRESENT_RW_USER | PTE_LARGE,
    uncached = const PTE_UNCACHED,
    ring0_setup = sym crate::cpu::ring0_setup,
    rflags = const crate::cpu::RING3_INITIAL_RFLAGS,
    user_ds = const crate::cpu::USER_DS,
    user_cs = const crate::cpu::USER_CS,
);

/// Size of the boot (and later interrupt) stack; ring-0 code is short.
pub const BOOT_STACK_SIZE: usize = 32 * 1024;

#[repr(C, align(16))]
pub struct Stack<const N: usize>(pub [u8; N]);

global_asm!(
    r#"
    .section .bss.boot_stack, "aw", @nobits
    .balign 16
    .global BOOT_STACK_BOTTOM
BOOT_STACK_BOTTOM:
    .skip {size}
    .global BOOT_STACK_TOP
BOOT_STACK_TOP:
    .section .text
    "#,
    size = const BOOT_STACK_SIZE,
);
