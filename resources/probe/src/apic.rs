//! Local APIC (0xFEE00000) and IOAPIC (0xFEC00000), programmed from ring 3
//! through MMIO (which works from ring 3 on kvm_pvm too). Ring 0 only writes
//! the EOI register.

use core::sync::atomic::{AtomicU32, Ordering};

pub const LAPIC_BASE: u64 = 0xFEE0_0000;
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;

const LAPIC_ID: u64 = 0x20;
const LAPIC_VERSION: u64 = 0x30;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_EOI: u64 = 0xB0;
const LAPIC_SVR: u64 = 0xF0;
const LAPIC_ICR_LOW: u64 = 0x300;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_LVT_LINT0: u64 = 0x350;
const LAPIC_LVT_LINT1: u64 = 0x360;
const LAPIC_LVT_ERROR: u64 = 0x370;
const LAPIC_TIMER_INITIAL: u64 = 0x380;
const LAPIC_TIMER_CURRENT: u64 = 0x390;
const LAPIC_TIMER_DIVIDE: u64 = 0x3E0;
const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_PERIODIC: u32 = 1 << 17;

const IOAPIC_VERSION: u32 = 1;
const IOAPIC_REDIRECTION: u32 = 0x10;
const REDIRECTION_LEVEL: u32 = 1 << 15;
const REDIRECTION_MASKED: u32 = 1 << 16;

static LAPIC_ID_VALUE: AtomicU32 = AtomicU32::new(0);
static IOAPIC_PINS: AtomicU32 = AtomicU32::new(0);
static TIMER_COUNT_PER_MS: AtomicU32 = AtomicU32::new(0);

#[inline(always)]
fn lapic_read(reg: u64) -> u32 {
    // SAFETY: the LAPIC page is identity-mapped (uncached) and always there.
    unsafe { ((LAPIC_BASE + reg) as *const u32).read_volatile() }
}

#[inline(always)]
fn lapic_write(reg: u64, value: u32) {
    // SAFETY: as for `lapic_read`.
    unsafe { ((LAPIC_BASE + reg) as *mut u32).write_volatile(value) }
}

#[link_section = ".text.ring0.handlers"]
pub fn ring0_eoi() {
    lapic_write(LAPIC_EOI, 0);
}

/// Enables the local APIC with the spurious vector, masks LINT0/LINT1 (the
/// legacy PIC is masked too: everything comes through the IOAPIC).
pub fn init_lapic() -> (u32, u32) {
    lapic_write(LAPIC_SVR, 0x100 | crate::interrupts::VECTOR_SPURIOUS as u32);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
    lapic_write(LAPIC_LVT_LINT1, LVT_MASKED);
    lapic_write(LAPIC_LVT_ERROR, LVT_MASKED);
    let id = lapic_read(LAPIC_ID) >> 24;
    LAPIC_ID_VALUE.store(id, Ordering::Relaxed);
    (id, lapic_read(LAPIC_VERSION) & 0xFF)
}

/// Everything comes through the IOAPIC: the 8259 stays masked.
#[link_section = ".text.ring0.setup"]
pub fn ring0_mask_legacy_pic() {
    // SAFETY: the 8259 data ports, from ring 0 during setup.
    unsafe {
        core::arch::asm!("out 0x21, al", "out 0xA1, al", in("al") 0xFFu8, options(nomem, nostack));
    }
}

/// Measures the LAPIC timer against the clock and starts it periodic at
/// `period_ms`. Returns the count per millisecond.
pub fn start_timer(period_ms: u32) -> u32 {
    lapic_write(LAPIC_TIMER_DIVIDE, 0x3); // divide by 16
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
    lapic_write(LAPIC_TIMER_INITIAL, u32::MAX);
    let start = crate::platform::now_ns();
    crate::platform::delay_us(2000);
    let elapsed_ns = crate::platform::now_ns() - start;
    let counted = u32::MAX - lapic_read(LAPIC_TIMER_CURRENT);
    let per_ms =
        ((counted as u64 * 1_000_000) / elapsed_ns.max(1)).clamp(1, u32::MAX as u64) as u32;
    TIMER_COUNT_PER_MS.store(per_ms, Ordering::Relaxed);
    lapic_write(
        LAPIC_LVT_TIMER,
        LVT_TIMER_PERIODIC | crate::interrupts::VECTOR_TIMER as u32,
    );
    lapic_write(LAPIC_TIMER_INITIAL, per_ms.saturating_mul(period_ms.max(1)));
    per_ms
}

/// Sends `vector` to this CPU (ICR, destination shorthand "self").
pub fn self_ipi(vector: u8) {
    lapic_write(LAPIC_ICR_LOW, (1 << 18) | (1 << 14) | vector as u32);
}

fn ioapic_read(reg: u32) -> u32 {
    // SAFETY: the IOAPIC's select/window registers, identity-mapped; only
    // ring 3 uses them, so the select-then-access pair is not interleaved.
    unsafe {
        (IOAPIC_BASE as *mut u32).write_volatile(reg);
        ((IOAPIC_BASE + 0x10) as *const u32).read_volatile()
    }
}

fn ioapic_write(reg: u32, value: u32) {
    // SAFETY: as for `ioapic_read`.
    unsafe {
        (IOAPIC_BASE as *mut u32).write_volatile(reg);
        ((IOAPIC_BASE + 0x10) as *mut u32).write_volatile(value);
    }
}

/// Reads the IOAPIC's pin count and masks every pin.
pub fn init_ioapic() -> u32 {
    let version = ioapic_read(IOAPIC_VERSION);
    let pins = if version == u32::MAX {
        0
    } else {
        ((version >> 16) & 0xFF) + 1
    };
    IOAPIC_PINS.store(pins, Ordering::Relaxed);
    for pin in 0..pins {
        ioapic_write(IOAPIC_REDIRECTION + 2 * pin, REDIRECTION_MASKED);
        ioapic_write(IOAPIC_REDIRECTION + 2 * pin + 1, 0);
    }
    pins
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Edge,
    Level,
}

/// Routes IOAPIC `pin` (= GSI) to `vector` on this CPU, active high.
pub fn route(pin: u32, vector: u8, trigger: Trigger) -> Result<(), &'static str> {
    if pin >= IOAPIC_PINS.load(Ordering::Relaxed) {
        return Err("irq beyond the ioapic's pins");
    }
    let dest = LAPIC_ID_VALUE.load(Ordering::Relaxed);
    let mut low = vector as u32;
    if trigger == Trigger::Level {
        low |= REDIRECTION_LEVEL;
    }
    ioapic_write(IOAPIC_REDIRECTION + 2 * pin + 1, dest << 24);
    ioapic_write(IOAPIC_REDIRECTION + 2 * pin, low);
    Ok(())
}

/// Masks `pin` (ring 3: a NIC given up on).
pub fn mask(pin: u32) {
    if pin < IOAPIC_PINS.load(Ordering::Relaxed) {
        ioapic_write(IOAPIC_REDIRECTION + 2 * pin, REDIRECTION_MASKED);
    }
}

/// Masks `pin` from an interrupt handler (a device that will not stop).
#[link_section = ".text.ring0.handlers"]
pub fn ring0_mask(pin: u32) {
    if pin < IOAPIC_PINS.load(Ordering::Relaxed) {
        // SAFETY: IOAPIC select/window; ring 3 only uses them during
        // bring-up, and a lost race costs at most a wrongly-written
        // redirection entry of a device that is being given up on.
        unsafe {
            (IOAPIC_BASE as *mut u32).write_volatile(IOAPIC_REDIRECTION + 2 * pin);
            ((IOAPIC_BASE + 0x10) as *mut u32).write_volatile(REDIRECTION_MASKED);
        }
    }
}
