//! The 16550 UART at 0x3f8 (IRQ 4) and the console byte rings.
//!
//! Ring 3 writes console output into `TX` and reads input from `RX`; only
//! ring 0 touches the UART once interrupts are on. kvm_pvm forces this: an
//! `out` from ring 3 with IF=1 faults there even with IOPL 3 (and `in`
//! likewise), so ring 3 asks ring 0 to drain `TX` with a self-IPI (an MMIO
//! write to the local APIC, which works from ring 3), and the UART's own
//! interrupt moves received bytes into `RX` and refills the transmitter.
//! Before interrupts are on (early boot, IF=0) ring 3 writes the UART
//! directly, which works with IF=0.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

pub const COM1: u16 = 0x3f8;
pub const COM1_IRQ: u8 = 4;
const REG_DATA: u16 = 0;
const REG_IER: u16 = 1;
const REG_FCR: u16 = 2;
const REG_LCR: u16 = 3;
const REG_MCR: u16 = 4;
const REG_LSR: u16 = 5;
const LSR_DATA_READY: u8 = 1;
const LSR_THR_EMPTY: u8 = 1 << 5;
const IER_RX: u8 = 1;
const IER_TX_EMPTY: u8 = 1 << 1;
/// The UART's transmit FIFO depth: how many bytes one THRE event allows.
const TX_FIFO: usize = 16;

/// Single-producer single-consumer byte ring shared between ring 3 and the
/// ring-0 handlers of the same CPU.
pub struct ByteRing<const N: usize> {
    bytes: UnsafeCell<[u8; N]>,
    /// Next slot the producer writes (free-running).
    head: AtomicUsize,
    /// Next slot the consumer reads (free-running).
    tail: AtomicUsize,
}

// SAFETY: one producer and one consumer; each slot is written before `head`
// publishes it (Release) and read after `head` is observed (Acquire).
unsafe impl<const N: usize> Sync for ByteRing<N> {}

impl<const N: usize> ByteRing<N> {
    pub const fn new() -> Self {
        ByteRing {
            bytes: UnsafeCell::new([0; N]),
            head: AtomicUsize::new(0),
            tail: AtomicUsize::new(0),
        }
    }

    #[inline(always)]
    pub fn push(&self, byte: u8) -> bool {
        let head = self.head.load(Ordering::Relaxed);
        if head.wrapping_sub(self.tail.load(Ordering::Acquire)) >= N {
            return false;
        }
        // SAFETY: the slot is free (checked above) and only the producer
        // writes slots.
        unsafe {
            (self.bytes.get() as *mut u8)
                .add(head % N)
                .write_volatile(byte)
        };
        self.head.store(head.wrapping_add(1), Ordering::Release);
        true
    }

    #[inline(always)]
    pub fn pop(&self) -> Option<u8> {
        let tail = self.tail.load(Ordering::Relaxed);
        if tail == self.head.load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: the slot was published by the producer's Release store.
        let byte = unsafe {
            (self.bytes.get() as *const u8)
                .add(tail % N)
                .read_volatile()
        };
        self.tail.store(tail.wrapping_add(1), Ordering::Release);
        Some(byte)
    }

    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.tail.load(Ordering::Acquire) == self.head.load(Ordering::Acquire)
    }

    pub fn free(&self) -> usize {
        N - self
            .head
            .load(Ordering::Relaxed)
            .wrapping_sub(self.tail.load(Ordering::Acquire))
    }
}

pub static TX: ByteRing<65536> = ByteRing::new();
pub static RX: ByteRing<4096> = ByteRing::new();
/// Set once the UART interrupt and the kick vector are live.
static INTERRUPT_DRIVEN: AtomicBool = AtomicBool::new(false);

#[inline(always)]
fn outb(port: u16, value: u8) {
    // SAFETY: the UART's ports; callers run in ring 0 or in ring 3 with
    // IOPL 3 and IF=0.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

#[inline(always)]
fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack)) };
    value
}

/// Programs the UART: 115200 8N1, FIFOs on, interrupts off (ring 0 setup).
#[link_section = ".text.ring0.setup"]
pub fn ring0_init() {
    outb(COM1 + REG_IER, 0);
    outb(COM1 + REG_LCR, 0x80);
    outb(COM1 + REG_DATA, 1);
    outb(COM1 + REG_IER, 0);
    outb(COM1 + REG_LCR, 0x03);
    outb(COM1 + REG_FCR, 0xC7);
    // DTR, RTS and OUT2 (which gates the IRQ line on a PC).
    outb(COM1 + REG_MCR, 0x0B);
}

/// Switches the console to interrupt-driven mode (the UART's receive
/// interrupt is enabled by the next ring-0 service). Call once the IOAPIC
/// routes IRQ 4 and interrupts are on.
pub fn enable_interrupts() {
    INTERRUPT_DRIVEN.store(true, Ordering::Release);
    kick();
}

/// Ring 3: queues console output. Drops what does not fit (counted by the
/// caller through the return value) rather than wait forever on a console
/// nobody reads.
pub fn write(bytes: &[u8]) -> usize {
    let mut written = 0;
    for &b in bytes {
        // Output must never block the probe for long: when the ring is full,
        // give ring 0 a chance to drain it, then drop.
        if !TX.push(b) {
            kick();
            let mut spins = 0;
            while TX.free() == 0 && spins < 1_000_000 {
                core::hint::spin_loop();
                spins += 1;
            }
            if !TX.push(b) {
                break;
            }
        }
        written += 1;
    }
    kick();
    written
}

/// Ring 3: queues console output, waiting (kicking ring 0) while the
/// ring is full instead of dropping: for output that must all arrive.
pub fn write_waiting(bytes: &[u8]) {
    for &b in bytes {
        while !TX.push(b) {
            kick();
            core::hint::spin_loop();
        }
    }
    kick();
}

/// Gets queued output moving: a self-IPI once interrupts are on, else a
/// synchronous flush through a ring-0 gate.
fn kick() {
    if INTERRUPT_DRIVEN.load(Ordering::Acquire) {
        crate::apic::self_ipi(crate::interrupts::VECTOR_SERIAL_KICK);
    } else {
        flush();
    }
}

/// Ring 3: drain the TX ring synchronously (early boot, panics).
pub fn flush() {
    crate::ring0_service!(crate::interrupts::SERVICE_CONSOLE_FLUSH);
}

/// Ring 0: everything queued goes out now, polling the UART.
#[link_section = ".text.ring0.handlers"]
pub fn ring0_flush() {
    while let Some(b) = TX.pop() {
        ring0_raw_byte(b);
    }
    if INTERRUPT_DRIVEN.load(Ordering::Acquire) {
        outb(COM1 + REG_IER, IER_RX);
    }
}

/// Ring 0 (UART interrupt or kick): move received bytes into `RX`, move up
/// to a FIFO's worth of output into the UART, and ask for a THRE interrupt
/// only while output remains.
#[link_section = ".text.ring0.handlers"]
pub fn ring0_service() {
    let mut guard = 0;
    while inb(COM1 + REG_LSR) & LSR_DATA_READY != 0 && guard < 64 {
        let byte = inb(COM1 + REG_DATA);
        // A full RX ring drops input: the console protocol is line-based and
        // the host waits for replies, so this only happens to garbage.
        let _ = RX.push(byte);
        guard += 1;
    }
    if inb(COM1 + REG_LSR) & LSR_THR_EMPTY != 0 {
        let mut sent = 0;
        while sent < TX_FIFO {
            match TX.pop() {
                Some(b) => outb(COM1 + REG_DATA, b),
                None => break,
            }
            sent += 1;
        }
    }
    if !INTERRUPT_DRIVEN.load(Ordering::Acquire) {
        return;
    }
    let ier = if TX.is_empty() {
        IER_RX
    } else {
        IER_RX | IER_TX_EMPTY
    };
    outb(COM1 + REG_IER, ier);
}

/// Ring 0, for fatal paths: write straight to the UART, polling.
#[link_section = ".text.ring0.handlers"]
pub fn ring0_raw_str(s: &str) {
    for &b in s.as_bytes() {
        ring0_raw_byte(b);
    }
}

#[link_section = ".text.ring0.handlers"]
fn ring0_raw_byte(b: u8) {
    let mut spins = 0;
    while inb(COM1 + REG_LSR) & LSR_THR_EMPTY == 0 && spins < 100_000 {
        spins += 1;
    }
    outb(COM1 + REG_DATA, b);
}

#[link_section = ".text.ring0.handlers"]
pub fn ring0_raw_hex(value: u64) {
    ring0_raw_str("0x");
    let mut shift = 64;
    while shift > 0 {
        shift -= 4;
        let nibble = ((value >> shift) & 0xF) as u8;
        ring0_raw_byte(if nibble < 10 {
            b'0' + nibble
        } else {
            b'a' + nibble - 10
        });
    }
}
