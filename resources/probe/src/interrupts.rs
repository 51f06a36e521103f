//! Interrupt vectors and the ring-0 interrupt dispatcher.
//!
//! Handlers do the minimum that needs ring 0 or must happen before the EOI
//! (read and acknowledge a virtio device's InterruptStatus, move bytes
//! between the UART and the console rings) and leave the rest to ring 3,
//! which sees their effects through atomics.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::{apic, serial, virtio_mmio};

pub const VECTOR_TIMER: u8 = 0x20;
pub const VECTOR_SERIAL: u8 = 0x21;
/// Self-IPI that asks ring 0 to drain the console TX ring into the UART.
pub const VECTOR_SERIAL_KICK: u8 = 0x22;
/// NIC n interrupts on VECTOR_NIC_BASE + n.
pub const VECTOR_NIC_BASE: u8 = 0x30;
pub const MAX_NICS: usize = 4;
/// The ACPI GED (power button), when configured.
pub const VECTOR_GED: u8 = 0x28;
pub const VECTOR_SPURIOUS: u8 = 0xFF;

/// Registers saved by the entry stub, then what the CPU pushed.
#[repr(C)]
pub struct InterruptFrame {
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Per NIC: its virtio-mmio base (0 = none) and the InterruptStatus bits the
/// handler acknowledged that ring 3 has not yet taken.
pub static NIC_MMIO_BASE: [AtomicU64; MAX_NICS] = [const { AtomicU64::new(0) }; MAX_NICS];
pub static NIC_PENDING: [AtomicU32; MAX_NICS] = [const { AtomicU32::new(0) }; MAX_NICS];
pub static NIC_IRQS: [AtomicU64; MAX_NICS] = [const { AtomicU64::new(0) }; MAX_NICS];
/// IOAPIC pin per NIC, so ring 0 can mask a device that storms.
pub static NIC_PIN: [AtomicU32; MAX_NICS] = [const { AtomicU32::new(u32::MAX) }; MAX_NICS];
/// Interrupts since ring 3 last looked; ring 3 zeroes it every pass.
pub static NIC_IRQS_UNSEEN: [AtomicU32; MAX_NICS] = [const { AtomicU32::new(0) }; MAX_NICS];
/// Set when ring 0 masked a NIC's pin because it would not stop.
pub static NIC_STORM_MASKED: [AtomicU32; MAX_NICS] = [const { AtomicU32::new(0) }; MAX_NICS];
/// A device that interrupts this often without ring 3 getting a pass in
/// between is broken (its status never clears): mask it, say so.
const STORM_LIMIT: u32 = 20_000;
/// Ring-3 service calls: `ud2` followed by one of these bytes. The #UD
/// handler does the service and resumes after the byte. kvm_pvm forces
/// this: `int n` from ring 3 raises #UD there whatever the gate's DPL, and
/// `cli`/`sti` fault because IOPL 3 does not reach ring 3; exceptions do
/// reach ring 0 and come back, on both kinds of KVM.
pub const SERVICE_CONSOLE_FLUSH: u8 = 0xC1;
/// Return with IF=1 (ring 3 cannot `sti` itself).
pub const SERVICE_ENABLE_INTERRUPTS: u8 = 0xC2;
/// RAX = the `IRQ_GENERATION` ring 3 last saw: `sti; hlt` unless an
/// interrupt came since (for hardware KVM; on kvm_pvm the probe spins).
pub const SERVICE_IDLE: u8 = 0xC3;
/// ACPI S5 through the sleep control register the FADT names (Ferry's
/// hardware-reduced PM block at port 0x600): the VM ends.
pub const SERVICE_POWER_OFF: u8 = 0xC4;
const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// SLP_TYP 5 (the DSDT's `_S5_`) with SLP_EN.
const ACPI_SLEEP_S5: u8 = (5 << 2) | (1 << 5);
const UD2: [u8; 2] = [0x0F, 0x0B];

/// Calls ring-0 service `code` (one of the SERVICE_* constants).
#[macro_export]
macro_rules! ring0_service {
    ($code:expr) => {{
        const CODE: u8 = $code;
        // SAFETY: the #UD handler recognises `ud2; .byte code`, performs
        // the service and resumes after it; registers are preserved.
        unsafe { core::arch::asm!("ud2", ".byte {c}", c = const CODE) }
    }};
    ($code:expr, $rax:expr) => {{
        const CODE: u8 = $code;
        let rax: u64 = $rax;
        // SAFETY: as above, with RAX as the argument.
        unsafe { core::arch::asm!("ud2", ".byte {c}", c = const CODE, in("rax") rax) }
    }};
}

/// Counts every hardware interrupt, so the idle call can tell whether one
/// arrived after ring 3 last looked.
#[no_mangle]
pub static IRQ_GENERATION: AtomicU64 = AtomicU64::new(0);
pub static TIMER_TICKS: AtomicU64 = AtomicU64::new(0);
pub static SERIAL_IRQS: AtomicU64 = AtomicU64::new(0);
pub static OTHER_IRQS: AtomicU64 = AtomicU64::new(0);
/// GED interrupts taken: ring 3 reads the event register when it moves.
pub static GED_IRQS: AtomicU64 = AtomicU64::new(0);

#[link_section = ".text.ring0.handlers"]
pub extern "C" fn ring0_interrupt(frame: &mut InterruptFrame) {
    let vector = frame.vector as u8;
    if frame.vector == 6 && frame.cs & 3 == 3 && ring0_service_call(frame) {
        return;
    }
    if frame.vector < 32 {
        fatal_exception(frame);
    }
    if vector == VECTOR_SPURIOUS {
        return;
    }
    IRQ_GENERATION.fetch_add(1, Ordering::Relaxed);
    if vector == VECTOR_TIMER {
        TIMER_TICKS.fetch_add(1, Ordering::Relaxed);
        // Also a safety net for a lost UART interrupt (edge-triggered).
        serial::ring0_service();
    } else if vector == VECTOR_SERIAL || vector == VECTOR_SERIAL_KICK {
        if vector == VECTOR_SERIAL {
            SERIAL_IRQS.fetch_add(1, Ordering::Relaxed);
        }
        serial::ring0_service();
    } else if vector >= VECTOR_NIC_BASE && vector < VECTOR_NIC_BASE + MAX_NICS as u8 {
        let nic = (vector - VECTOR_NIC_BASE) as usize;
        NIC_IRQS[nic].fetch_add(1, Ordering::Relaxed);
        let base = NIC_MMIO_BASE[nic].load(Ordering::Relaxed);
        let unseen = NIC_IRQS_UNSEEN[nic].fetch_add(1, Ordering::Relaxed);
        if base != 0 {
            // Acknowledge before the EOI: the line is level-triggered and
            // would fire again at once otherwise.
            let status = virtio_mmio::ring0_ack_interrupt(base);
            NIC_PENDING[nic].fetch_or(status, Ordering::Release);
        }
        if base == 0 || unseen > STORM_LIMIT {
            apic::ring0_mask(NIC_PIN[nic].load(Ordering::Relaxed));
            NIC_STORM_MASKED[nic].store(1, Ordering::Release);
        }
    } else if vector == VECTOR_GED {
        // Edge-triggered: nothing to acknowledge at the device.
        GED_IRQS.fetch_add(1, Ordering::Release);
    } else {
        OTHER_IRQS.fetch_add(1, Ordering::Relaxed);
    }
    apic::ring0_eoi();
}

/// A #UD from ring 3 at `ud2; .byte code` is a service call.
#[link_section = ".text.ring0.handlers"]
fn ring0_service_call(frame: &mut InterruptFrame) -> bool {
    let at = frame.rip as *const u8;
    // SAFETY: RIP points at the faulting instruction in ring-3 code, which
    // is mapped (the fetch just happened); three bytes stay in the image.
    let (b0, b1, code) = unsafe {
        (
            at.read_volatile(),
            at.add(1).read_volatile(),
            at.add(2).read_volatile(),
        )
    };
    if [b0, b1] != UD2 {
        return false;
    }
    match code {
        SERVICE_CONSOLE_FLUSH => serial::ring0_flush(),
        SERVICE_ENABLE_INTERRUPTS => frame.rflags |= 1 << 9,
        SERVICE_IDLE => {
            if frame.rax == IRQ_GENERATION.load(Ordering::Relaxed) {
                // No `nostack`: the compiler keeps nothing in the red zone
                // across this, which a nested ring-0 interrupt would
                // overwrite.
                // SAFETY: waits for the next interrupt, then IF=0 again.
                unsafe { core::arch::asm!("sti", "hlt", "cli") };
            }
        }
        SERVICE_POWER_OFF => {
            serial::ring0_flush();
            // SAFETY: ring 0; the port is the ACPI sleep control register.
            unsafe {
                core::arch::asm!("out dx, al", in("dx") ACPI_SLEEP_CONTROL_PORT,
                    in("al") ACPI_SLEEP_S5, options(nomem, nostack))
            };
        }
        _ => return false,
    }
    frame.rip += 3;
    true
}

/// An exception means a bug: say where, then stop this CPU for good. The
/// line goes straight to the UART (the console ring may be what broke).
#[link_section = ".text.ring0.handlers"]
fn fatal_exception(frame: &InterruptFrame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    serial::ring0_raw_str("\nprobe: fatal exception vector=");
    serial::ring0_raw_hex(frame.vector);
    serial::ring0_raw_str(" error=");
    serial::ring0_raw_hex(frame.error_code);
    serial::ring0_raw_str(" rip=");
    serial::ring0_raw_hex(frame.rip);
    serial::ring0_raw_str(" cs=");
    serial::ring0_raw_hex(frame.cs);
    serial::ring0_raw_str(" rsp=");
    serial::ring0_raw_hex(frame.rsp);
    serial::ring0_raw_str(" rflags=");
    serial::ring0_raw_hex(frame.rflags);
    serial::ring0_raw_str(" cr2=");
    serial::ring0_raw_hex(cr2);
    serial::ring0_raw_str("\n");
    loop {
        // SAFETY: stopping the CPU with interrupts off is the intent.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}
