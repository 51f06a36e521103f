//! What kind of machine the probe runs on, and its clock.
//!
//! Time comes from kvmclock (a pvclock page the hypervisor keeps up to date,
//! read from ring 3 with `rdtsc`): it needs no calibration and stays right
//! across live migration. Without kvmclock the TSC frequency comes from the
//! hypervisor's CPUID leaf 0x40000010 or leaf 0x15/0x16.
//!
//! The ring-0 speed check tells kvm_pvm (ring 0 emulated, hundreds of times
//! slower than ring 3) from hardware virtualization, measured rather than
//! guessed from CPUID, which kvm_pvm does not mark.

use core::arch::asm;
use core::arch::x86_64::{__cpuid_count, _rdtsc};
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{AtomicU64, Ordering};

#[repr(C, align(64))]
struct PvclockTimeInfo {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

static mut PVCLOCK: PvclockTimeInfo = PvclockTimeInfo {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};

const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
const KVM_FEATURE_CLOCKSOURCE: u32 = 1 << 0;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// Iterations of the speed-check loop, in ring 0 and then in ring 3.
const SPEED_LOOP: u64 = 2000;

static KVMCLOCK_ON: AtomicU64 = AtomicU64::new(0);
static RING0_LOOP_CYCLES: AtomicU64 = AtomicU64::new(0);
static RING3_LOOP_CYCLES: AtomicU64 = AtomicU64::new(0);
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static BOOT_NS: AtomicU64 = AtomicU64::new(0);

#[link_section = ".text.ring0.setup"]
pub fn ring0_cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = __cpuid_count(leaf, 0);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Whether the hypervisor leaves say KVM; returns its feature bits.
#[link_section = ".text.ring0.setup"]
fn kvm_features() -> Option<u32> {
    let (_, b, c, d) = ring0_cpuid(0x4000_0000);
    let sig = [b.to_le_bytes(), c.to_le_bytes(), d.to_le_bytes()];
    if sig[0] == *b"KVMK" && sig[1] == *b"VMKV" && &sig[2][..2] == b"M\0" {
        Some(ring0_cpuid(0x4000_0001).0)
    } else {
        None
    }
}

#[inline(always)]
fn timed_loop() -> u64 {
    // SAFETY: rdtsc and a register-only loop; no memory is touched.
    unsafe {
        let start = _rdtsc();
        asm!("2: dec {n}", "jnz 2b", n = inout(reg) SPEED_LOOP => _, options(nomem, nostack));
        _rdtsc().wrapping_sub(start)
    }
}

/// Ring 0: turn kvmclock on (a wrmsr, which ring 3 cannot do) and time the
/// speed-check loop.
#[link_section = ".text.ring0.setup"]
pub fn ring0_setup_clock_and_measure() {
    let features = kvm_features().unwrap_or(0);
    let msr = if features & KVM_FEATURE_CLOCKSOURCE2 != 0 {
        Some(MSR_KVM_SYSTEM_TIME_NEW)
    } else if features & KVM_FEATURE_CLOCKSOURCE != 0 {
        Some(MSR_KVM_SYSTEM_TIME)
    } else {
        None
    };
    if let Some(msr) = msr {
        let value = addr_of!(PVCLOCK) as u64 | 1;
        // SAFETY: the MSR exists (CPUID said so); the page is ours.
        unsafe {
            asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
                 options(nostack));
        }
        KVMCLOCK_ON.store(1, Ordering::Relaxed);
    }
    RING0_LOOP_CYCLES.store(timed_loop(), Ordering::Relaxed);
}

/// Ring 3, once at start: the ring-3 half of the speed check and the TSC
/// frequency fallback.
pub fn init_ring3() {
    RING3_LOOP_CYCLES.store(timed_loop().max(1), Ordering::Relaxed);
    let khz = if kvmclock_on() {
        0
    } else {
        tsc_khz_from_cpuid()
    };
    TSC_KHZ.store(khz, Ordering::Relaxed);
    BOOT_NS.store(raw_ns(), Ordering::Relaxed);
}

fn tsc_khz_from_cpuid() -> u64 {
    if kvm_features().is_some() && ring0_cpuid(0x4000_0000).0 >= 0x4000_0010 {
        let khz = ring0_cpuid(0x4000_0010).0 as u64;
        if khz != 0 {
            return khz;
        }
    }
    let max = ring0_cpuid(0).0;
    if max >= 0x15 {
        let (den, num, hz, _) = ring0_cpuid(0x15);
        if den != 0 && num != 0 && hz != 0 {
            return hz as u64 * num as u64 / den as u64 / 1000;
        }
    }
    if max >= 0x16 {
        let mhz = ring0_cpuid(0x16).0 as u64 & 0xFFFF;
        if mhz != 0 {
            return mhz * 1000;
        }
    }
    // Nothing says: assume 2 GHz so time still advances (documented).
    2_000_000
}

pub fn kvmclock_on() -> bool {
    KVMCLOCK_ON.load(Ordering::Relaxed) != 0
}

/// Where ring 0 is emulated (kvm_pvm): the same loop ran far slower there.
pub fn ring0_is_emulated() -> bool {
    RING0_LOOP_CYCLES.load(Ordering::Relaxed) > 20 * RING3_LOOP_CYCLES.load(Ordering::Relaxed)
}

pub fn speed_check() -> (u64, u64) {
    (
        RING0_LOOP_CYCLES.load(Ordering::Relaxed),
        RING3_LOOP_CYCLES.load(Ordering::Relaxed),
    )
}

fn raw_ns() -> u64 {
    if !kvmclock_on() {
        // SAFETY: rdtsc has no preconditions.
        let tsc = unsafe { _rdtsc() } as u128;
        return (tsc * 1_000_000 / TSC_KHZ.load(Ordering::Relaxed).max(1) as u128) as u64;
    }
    let clock = addr_of_mut!(PVCLOCK);
    loop {
        // SAFETY: the hypervisor updates this page under the version
        // protocol (odd = update in progress); volatile reads follow it.
        unsafe {
            let version = addr_of!((*clock).version).read_volatile();
            core::sync::atomic::compiler_fence(Ordering::Acquire);
            let tsc_timestamp = addr_of!((*clock).tsc_timestamp).read_volatile();
            let system_time = addr_of!((*clock).system_time).read_volatile();
            let mul = addr_of!((*clock).tsc_to_system_mul).read_volatile();
            let shift = addr_of!((*clock).tsc_shift).read_volatile();
            let tsc = _rdtsc();
            core::sync::atomic::compiler_fence(Ordering::Acquire);
            if version & 1 != 0 || addr_of!((*clock).version).read_volatile() != version {
                core::hint::spin_loop();
                continue;
            }
            let mut delta = tsc.wrapping_sub(tsc_timestamp);
            if shift >= 0 {
                delta <<= shift as u32;
            } else {
                delta >>= (-(shift as i32)) as u32;
            }
            let scaled = ((delta as u128 * mul as u128) >> 32) as u64;
            return system_time.wrapping_add(scaled);
        }
    }
}

/// Nanoseconds since the probe reached ring 3.
pub fn now_ns() -> u64 {
    raw_ns().saturating_sub(BOOT_NS.load(Ordering::Relaxed))
}

pub fn now_ms() -> u64 {
    now_ns() / 1_000_000
}

/// Spins for `us` microseconds (ring 3).
pub fn delay_us(us: u64) {
    let end = now_ns() + us * 1000;
    while now_ns() < end {
        core::hint::spin_loop();
    }
}
