//! The 16550A UART at 0x3f8 / IRQ 4 (the model is in `uart.rs`), its
//! console output and the host input waiting for room in its FIFO.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

pub mod output;
pub mod persist;
pub mod uart;

use output::OutputQueue;
use uart::{Uart, UartHost};

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// Where the guest's console output goes.
pub enum SerialOutput {
    /// Written straight to the fd (stdout): no buffering, so a crash loses
    /// nothing and the user sees every byte as the guest writes it.
    Fd(File),
    Sink,
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOutput::Fd(f) => f.write(buf),
            SerialOutput::Sink => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Tells the VMM thread when the guest has drained the receive FIFO, so it
/// can feed the next input bytes (the 16550 FIFO holds only 64).
pub struct InputDrained(pub EventFd);

/// Where the guest's bytes go once the UART has them.
enum Out {
    /// Through the queue and its writer thread (stdout, a file).
    Queue(Arc<OutputQueue>, i32),
    Sink,
}

/// What the UART reaches: its irqfd, the drained signal, the output.
struct Wires {
    interrupt: EventFd,
    drained: Arc<InputDrained>,
    out: Out,
}

impl UartHost for Wires {
    fn interrupt(&mut self) {
        if let Err(e) = self.interrupt.write(1) {
            log::warn!("serial: cannot raise IRQ 4: {e}");
        }
    }

    fn input_drained(&mut self) {
        if let Err(e) = self.drained.0.write(1) {
            log::warn!("serial: cannot signal drained input: {e}");
        }
    }

    fn output(&mut self, byte: u8) -> bool {
        match &self.out {
            Out::Queue(q, _) => q.push(byte),
            Out::Sink => true,
        }
    }

    fn can_send(&self) -> bool {
        match &self.out {
            Out::Queue(q, _) => q.has_room(),
            _ => true,
        }
    }
}

/// The UART plus the input bytes still waiting for room in its FIFO.
pub struct Serial {
    uart: Uart,
    wires: Wires,
    pending_input: VecDeque<u8>,
}

impl Serial {
    /// `interrupt` is registered by the VMM as the irqfd of IRQ 4;
    /// `drained` wakes the VMM thread when the guest emptied the FIFO.
    pub fn new(interrupt: EventFd, drained: Arc<InputDrained>, out: SerialOutput) -> Self {
        let out = match out {
            SerialOutput::Fd(file) => {
                let fd = file.as_raw_fd();
                Out::Queue(OutputQueue::new(file), fd)
            }
            SerialOutput::Sink => Out::Sink,
        };
        Self {
            uart: Uart::default(),
            wires: Wires {
                interrupt,
                drained,
                out,
            },
            pending_input: VecDeque::new(),
        }
    }

    /// Starts writing the guest's output (its writer thread): as the VM
    /// starts to run.
    pub fn start_output(serial: &Arc<std::sync::Mutex<Serial>>) -> io::Result<()> {
        let queue = crate::bus::lock(serial).output_queue();
        queue.map_or(Ok(()), |q| q.start(serial))
    }

    /// The queue the guest's output waits in, if it has one (to flush it
    /// before the process ends).
    pub fn output_queue(&self) -> Option<Arc<OutputQueue>> {
        match &self.wires.out {
            Out::Queue(q, _) => Some(q.clone()),
            _ => None,
        }
    }

    /// The output queue has room again.
    pub(crate) fn transmitter_free(&mut self) {
        self.uart.transmitter_free(&mut self.wires);
    }

    /// Queues host input for the guest and moves as much as fits into the
    /// FIFO. Returns how many bytes still wait for the guest to read.
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        self.pending_input.extend(bytes);
        self.feed();
        self.pending_input.len()
    }

    /// Moves waiting input into the FIFO; call when the guest drained it.
    pub fn feed(&mut self) -> usize {
        let room = self.uart.room().min(self.pending_input.len());
        if room > 0 {
            let chunk: Vec<u8> = self.pending_input.drain(..room).collect();
            self.uart.receive(&chunk, &mut self.wires);
        }
        self.pending_input.len()
    }

    /// The raw fd the output goes to, if any (for terminal handling).
    pub fn output_fd(&self) -> Option<i32> {
        match &self.wires.out {
            Out::Queue(_, fd) => Some(*fd),
            Out::Sink => None,
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match u8::try_from(offset.saturating_add(i as u64)) {
                Ok(reg) if reg < COM1_LEN as u8 => self.uart.read(reg, &mut self.wires),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            let Ok(reg) = u8::try_from(offset.saturating_add(i as u64)) else {
                continue;
            };
            if reg >= COM1_LEN as u8 {
                continue;
            }
            self.uart.write(reg, byte, &mut self.wires);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serial() -> (Serial, EventFd, Arc<InputDrained>) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = Arc::new(InputDrained(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let s = Serial::new(
            irq.try_clone().unwrap(),
            drained.clone(),
            SerialOutput::Sink,
        );
        (s, irq, drained)
    }

    #[test]
    fn input_beyond_the_fifo_waits_and_is_fed_when_drained() {
        let (mut s, irq, drained) = serial();
        s.write(1, &[0x01]); // IER: received-data interrupt on
        let input: Vec<u8> = (0..100u8).collect();
        assert_eq!(s.push_input(&input), 100 - 64);
        assert!(irq.read().unwrap() >= 1);
        let mut got = vec![];
        let mut b = [0u8];
        for _ in 0..64 {
            s.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(drained.0.read().unwrap(), 1);
        assert_eq!(s.feed(), 0);
        for _ in 0..36 {
            s.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
    }

    #[test]
    fn out_of_range_and_wide_accesses_do_not_panic() {
        let (mut s, _irq, _d) = serial();
        let mut wide = [0u8; 8];
        s.read(4, &mut wide);
        assert_eq!(&wide[4..], &[0xff; 4]);
        s.write(u64::MAX, &[1, 2]);
        s.write(7, &[1, 2, 3]);
    }
}
