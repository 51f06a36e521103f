//! The 16550A's registers and interrupt logic, as the part's datasheet
//! has them — in particular the transmitter-empty interrupt (THRE):
//! pending when the holding register is empty and ETBEI is on, cleared by
//! reading IIR while it is the source shown or by writing THR. Here a
//! byte written leaves at once, so a write to THR clears THRE and sets it
//! again: a new edge on the (edge-triggered, ISA) IRQ line, as the real
//! part gives once the byte moved to its shift register. A driver that
//! feeds the UART from its THRE interrupt without reading IIR (the probe
//! does; vm-superio's model waits for an IIR read before it signals THRE
//! again, so such a driver fell back to its 10 ms timer) is kept moving.
//!
//! The interrupt output is a level (enabled and pending conditions); the
//! irqfd is written on each rising edge of it.

use std::collections::VecDeque;

/// The receive FIFO's depth.
pub const FIFO_SIZE: usize = 64;

pub const DATA: u8 = 0;
pub const IER: u8 = 1;
pub const IIR: u8 = 2;
pub const LCR: u8 = 3;
pub const MCR: u8 = 4;
pub const LSR: u8 = 5;
pub const MSR: u8 = 6;
pub const SCR: u8 = 7;

pub const IER_RDA: u8 = 0x01;
pub const IER_THRE: u8 = 0x02;
const IER_VALID: u8 = 0x0f;

pub const IIR_NONE: u8 = 0x01;
pub const IIR_THRE: u8 = 0x02;
pub const IIR_RDA: u8 = 0x04;
/// FIFOs enabled: what a 16550A (not a 16450) shows.
const IIR_FIFO: u8 = 0xc0;

const LCR_DLAB: u8 = 0x80;
const MCR_LOOP: u8 = 0x10;

pub const LSR_DR: u8 = 0x01;
/// Holding register and transmitter empty: a byte written leaves at once.
pub const LSR_IDLE: u8 = 0x60;

const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;
/// DCD, DSR and CTS: a line with a peer on it.
pub const MSR_DEFAULT: u8 = MSR_DCD | MSR_DSR | MSR_CTS;

/// What the UART asks of the host as the guest uses it.
pub trait UartHost {
    /// A rising edge of the interrupt output.
    fn interrupt(&mut self);
    /// The receive FIFO went empty: room for more input.
    fn input_drained(&mut self);
    /// A byte the guest sent; returns `can_send()` after it.
    fn output(&mut self, byte: u8) -> bool;
    /// The transmitter can take a byte (the host's output has room).
    fn can_send(&self) -> bool;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uart {
    pub divisor_low: u8,
    pub divisor_high: u8,
    pub ier: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub msr: u8,
    pub scr: u8,
    /// THRE is pending (set when the holding register empties).
    pub thre_pending: bool,
    pub rx: VecDeque<u8>,
}

impl Default for Uart {
    fn default() -> Self {
        Self {
            // 115200 baud.
            divisor_low: 1,
            divisor_high: 0,
            ier: 0,
            lcr: 0x03,
            mcr: 0x08,
            msr: MSR_DEFAULT,
            scr: 0,
            thre_pending: false,
            rx: VecDeque::new(),
        }
    }
}

impl Uart {
    fn rda(&self) -> bool {
        self.ier & IER_RDA != 0 && !self.rx.is_empty()
    }

    fn thre(&self) -> bool {
        self.ier & IER_THRE != 0 && self.thre_pending
    }

    /// The interrupt output.
    pub fn line(&self) -> bool {
        self.rda() || self.thre()
    }

    /// IIR without the FIFO bits: the highest-priority source, or none.
    pub fn identification(&self) -> u8 {
        if self.rda() {
            IIR_RDA
        } else if self.thre() {
            IIR_THRE
        } else {
            IIR_NONE
        }
    }

    /// LSR: THRE and TEMT while the host's output has room.
    pub fn line_status(&self, can_send: bool) -> u8 {
        (if can_send { LSR_IDLE } else { 0 }) | if self.rx.is_empty() { 0 } else { LSR_DR }
    }

    /// The host's output has room again: the holding register is empty.
    pub fn transmitter_free(&mut self, host: &mut dyn UartHost) {
        if !self.thre_pending {
            self.edge(host, |u| u.thre_pending = true);
        }
    }

    /// Runs `change`, then signals a rising edge of the output.
    fn edge(&mut self, host: &mut dyn UartHost, change: impl FnOnce(&mut Self)) {
        let before = self.line();
        change(self);
        if self.line() && !before {
            host.interrupt();
        }
    }

    /// Host input into the receive FIFO, as much as fits; returns how
    /// many bytes were taken.
    pub fn receive(&mut self, bytes: &[u8], host: &mut dyn UartHost) -> usize {
        let n = bytes.len().min(FIFO_SIZE - self.rx.len().min(FIFO_SIZE));
        if n > 0 {
            self.edge(host, |u| u.rx.extend(&bytes[..n]));
        }
        n
    }

    pub fn room(&self) -> usize {
        FIFO_SIZE.saturating_sub(self.rx.len())
    }

    pub fn write(&mut self, reg: u8, value: u8, host: &mut dyn UartHost) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match reg {
            DATA if dlab => self.divisor_low = value,
            IER if dlab => self.divisor_high = value,
            DATA => {
                let room = if self.mcr & MCR_LOOP != 0 {
                    if self.rx.len() < FIFO_SIZE {
                        self.edge(host, |u| u.rx.push_back(value));
                    }
                    host.can_send()
                } else {
                    host.output(value)
                };
                // THR written: THRE clears, and is set again as the byte
                // leaves — a new edge unless another source holds the line;
                // with the host's output full, once it has room.
                self.thre_pending = false;
                if room {
                    self.edge(host, |u| u.thre_pending = true);
                }
            }
            IER => {
                // ETBEI turned on with the holding register empty: THRE.
                let empty = host.can_send();
                self.edge(host, |u| {
                    let enabling = value & IER_THRE != 0 && u.ier & IER_THRE == 0;
                    u.ier = value & IER_VALID;
                    if enabling && empty {
                        u.thre_pending = true;
                    }
                });
            }
            LCR => self.lcr = value,
            MCR => self.mcr = value,
            SCR => self.scr = value,
            // FCR: the FIFOs are always on; LSR and MSR are read-only.
            _ => {}
        }
    }

    pub fn read(&mut self, reg: u8, host: &mut dyn UartHost) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match reg {
            DATA if dlab => self.divisor_low,
            IER if dlab => self.divisor_high,
            DATA => {
                let byte = self.rx.pop_front().unwrap_or(0);
                if self.rx.is_empty() {
                    host.input_drained();
                }
                byte
            }
            IER => self.ier,
            IIR => {
                let id = self.identification();
                if id == IIR_THRE {
                    self.thre_pending = false;
                }
                id | IIR_FIFO
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => self.line_status(host.can_send()),
            MSR => {
                if self.mcr & MCR_LOOP != 0 {
                    // Loopback: RTS→CTS, DTR→DSR, OUT1→RI, OUT2→DCD.
                    let m = self.mcr;
                    let bit = |on: bool, b: u8| if on { b } else { 0 };
                    bit(m & 0x02 != 0, MSR_CTS)
                        | bit(m & 0x01 != 0, MSR_DSR)
                        | bit(m & 0x04 != 0, MSR_RI)
                        | bit(m & 0x08 != 0, MSR_DCD)
                } else {
                    self.msr
                }
            }
            SCR => self.scr,
            _ => 0xff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Host {
        edges: u32,
        drained: u32,
        out: Vec<u8>,
        full: bool,
    }

    impl UartHost for Host {
        fn interrupt(&mut self) {
            self.edges += 1;
        }
        fn input_drained(&mut self) {
            self.drained += 1;
        }
        fn output(&mut self, byte: u8) -> bool {
            self.out.push(byte);
            !self.full
        }
        fn can_send(&self) -> bool {
            !self.full
        }
    }

    #[test]
    fn a_full_output_holds_thre_until_there_is_room() {
        let (mut u, mut h) = (Uart::default(), Host::default());
        u.write(IER, IER_THRE, &mut h);
        assert_eq!(u.read(IIR, &mut h) & 0x0f, IIR_THRE);
        h.full = true;
        u.write(DATA, b'a', &mut h);
        assert_eq!(u.read(LSR, &mut h) & LSR_IDLE, 0, "transmitter busy");
        assert_eq!(u.read(IIR, &mut h) & 0x0f, IIR_NONE, "no THRE while full");
        let before = h.edges;
        h.full = false;
        u.transmitter_free(&mut h);
        assert_eq!(h.edges, before + 1, "THRE once there is room");
        assert_eq!(u.read(LSR, &mut h) & LSR_IDLE, LSR_IDLE);
        assert_eq!(u.read(IIR, &mut h) & 0x0f, IIR_THRE);
    }

    #[test]
    fn a_driver_that_never_reads_iir_gets_an_edge_per_refill() {
        // The probe's way: on each THRE interrupt write a FIFO's worth,
        // then IER with ETBEI while output remains.
        let (mut u, mut h) = (Uart::default(), Host::default());
        u.write(IER, IER_RDA | IER_THRE, &mut h);
        assert_eq!(h.edges, 1, "ETBEI on with THR empty");
        for round in 0..3 {
            let before = h.edges;
            for b in b"0123456789abcdef" {
                u.write(DATA, *b, &mut h);
            }
            u.write(IER, IER_RDA | IER_THRE, &mut h);
            assert!(h.edges > before, "round {round}: no new THRE edge");
        }
        assert_eq!(h.out.len(), 48);
        // Done: ETBEI off, the line drops, nothing more.
        u.write(IER, IER_RDA, &mut h);
        assert!(!u.line());
    }

    #[test]
    fn iir_shows_rda_before_thre_and_clears_thre_when_shown() {
        let (mut u, mut h) = (Uart::default(), Host::default());
        u.write(IER, IER_RDA | IER_THRE, &mut h);
        assert_eq!(u.receive(b"x", &mut h), 1);
        assert_eq!(u.read(IIR, &mut h) & 0x0f, IIR_RDA);
        assert_eq!(u.read(DATA, &mut h), b'x');
        assert_eq!(h.drained, 1);
        assert_eq!(u.read(IIR, &mut h) & 0x0f, IIR_THRE);
        assert_eq!(
            u.read(IIR, &mut h) & 0x0f,
            IIR_NONE,
            "THRE cleared by its IIR read"
        );
        assert_eq!(u.read(IIR, &mut h) & 0xc0, 0xc0, "a 16550A's FIFOs");
        assert!(!u.line());
        // A THR write sets it again.
        u.write(DATA, b'y', &mut h);
        assert_eq!(u.read(IIR, &mut h) & 0x0f, IIR_THRE);
    }

    #[test]
    fn the_fifo_takes_64_and_loopback_echoes() {
        let (mut u, mut h) = (Uart::default(), Host::default());
        assert_eq!(u.receive(&[1; 100], &mut h), 64);
        assert_eq!(u.room(), 0);
        assert_eq!(u.line_status(true) & LSR_DR, LSR_DR);
        assert_eq!(h.edges, 0, "RDA not enabled");
        let mut u = Uart::default();
        u.write(MCR, MCR_LOOP | 0x0b, &mut h);
        u.write(DATA, 0x55, &mut h);
        assert!(h.out.is_empty());
        assert_eq!(u.read(DATA, &mut h), 0x55);
        assert_eq!(u.read(MSR, &mut h) & MSR_DCD, MSR_DCD);
    }

    #[test]
    fn the_divisor_hides_behind_dlab() {
        let (mut u, mut h) = (Uart::default(), Host::default());
        u.write(LCR, LCR_DLAB | 0x03, &mut h);
        u.write(DATA, 12, &mut h);
        u.write(IER, 0, &mut h);
        assert_eq!(u.read(DATA, &mut h), 12);
        u.write(LCR, 0x03, &mut h);
        assert_eq!(u.ier, 0);
        assert!(h.out.is_empty());
    }
}
