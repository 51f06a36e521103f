//! Tiny hand-assembled PVH guests for the VMM's own edge cases: they start
//! in 32-bit protected mode (the PVH entry state), print a message on COM1
//! and then power off, reset, fault or hit an instruction kvm_pvm's
//! emulator lacks. Each is a few dozen bytes of ring-0 code, so they run
//! in microseconds even where ring 0 is emulated, and QEMU boots them too.

/// Where the image is loaded and its code starts.
const LOAD_ADDR: u64 = 0x10_0000;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// What the guest does after printing its message.
#[derive(Clone, Copy, Debug)]
pub enum Ending {
    /// ACPI S5 through Ferry's sleep control register (port 0x600).
    AcpiPowerOff,
    /// ACPI reset register (port 0x602, value 1).
    AcpiReset,
    /// Pulse the i8042 reset line (0xfe to port 0x64).
    I8042Reset,
    /// `ud2` with no usable IDT: #UD → #GP → #DF → triple fault.
    TripleFault,
    /// `popcnt eax, ebx`, which kvm_pvm cannot emulate in ring 0.
    Popcnt,
    /// Spin forever with interrupts off.
    Spin,
}

/// 32-bit machine code: print `message` on COM1, then `ending`.
pub fn code(message: &[u8], ending: Ending) -> Vec<u8> {
    let mut c = vec![0xfa]; // cli
    c.extend([0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    for &b in message {
        c.extend([0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    match ending {
        Ending::AcpiPowerOff => c.extend([0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee]),
        Ending::AcpiReset => c.extend([0x66, 0xba, 0x02, 0x06, 0xb0, 0x01, 0xee]),
        Ending::I8042Reset => c.extend([0xb0, 0xfe, 0xe6, 0x64]),
        Ending::TripleFault => c.extend([0x0f, 0x0b]),
        Ending::Popcnt => c.extend([0xf3, 0x0f, 0xb8, 0xc3]),
        Ending::Spin => {}
    }
    c.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp back to the hlt
    c
}

/// An ELF64 image with one loadable segment and a PVH entry note.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note_off = EHDR + 2 * PHDR;
    let mut note = Vec::new();
    note.extend(4u32.to_le_bytes()); // namesz ("Xen\0")
    note.extend(4u32.to_le_bytes()); // descsz
    note.extend(XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    note.extend(*b"Xen\0");
    let code_off = note_off + note.len() + 4;
    let entry = LOAD_ADDR + code_off as u64;
    note.extend((entry as u32).to_le_bytes());
    let file_len = code_off + code.len();

    let mut elf = Vec::with_capacity(file_len);
    elf.extend(*b"\x7fELF");
    elf.extend([2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    elf.extend([0u8; 8]);
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(62u16.to_le_bytes()); // EM_X86_64
    elf.extend(1u32.to_le_bytes());
    elf.extend(entry.to_le_bytes());
    elf.extend((EHDR as u64).to_le_bytes()); // phoff
    elf.extend(0u64.to_le_bytes()); // shoff
    elf.extend(0u32.to_le_bytes()); // flags
    elf.extend((EHDR as u16).to_le_bytes());
    elf.extend((PHDR as u16).to_le_bytes());
    elf.extend(2u16.to_le_bytes()); // phnum
    elf.extend([0u8; 6]); // shentsize, shnum, shstrndx
                          // PT_LOAD: the whole file at LOAD_ADDR, RWX.
    elf.extend(1u32.to_le_bytes());
    elf.extend(7u32.to_le_bytes());
    elf.extend(0u64.to_le_bytes());
    elf.extend(LOAD_ADDR.to_le_bytes());
    elf.extend(LOAD_ADDR.to_le_bytes());
    elf.extend((file_len as u64).to_le_bytes());
    elf.extend((file_len as u64).to_le_bytes());
    elf.extend(0x1000u64.to_le_bytes());
    // PT_NOTE.
    elf.extend(4u32.to_le_bytes());
    elf.extend(4u32.to_le_bytes());
    elf.extend((note_off as u64).to_le_bytes());
    elf.extend(0u64.to_le_bytes());
    elf.extend(0u64.to_le_bytes());
    elf.extend((note.len() as u64).to_le_bytes());
    elf.extend((note.len() as u64).to_le_bytes());
    elf.extend(4u64.to_le_bytes());
    elf.extend(note);
    elf.extend(code);
    debug_assert_eq!(elf.len(), file_len);
    elf
}

/// Writes a tiny guest to a fresh file under the target directory and
/// returns its path; the file goes when that is dropped.
pub fn write_guest(name: &str, message: &[u8], ending: Ending) -> crate::host::TempPath {
    let dir = crate::host::workspace_root()
        .join("target")
        .join("tiny-guests");
    std::fs::create_dir_all(&dir).expect("create target/tiny-guests");
    // Tests in one process run in parallel: a per-call number keeps one
    // test from truncating the file another is booting.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{name}-{}-{n}.elf", std::process::id()));
    std::fs::write(&path, pvh_elf(&code(message, ending))).expect("write tiny guest");
    crate::host::TempPath::at(path)
}
