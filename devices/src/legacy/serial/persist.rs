//! The UART's saved state: its registers and receive FIFO, in the
//! `serial/com1` section. The fields (and version 1) are those Ferry
//! saved when vm-superio modelled the UART: streams from then load.

use super::uart::{Uart, UartHost, FIFO_SIZE, IIR_THRE};
use super::Serial;
use migration::persist::{decode, encode};
use migration::{SavedState, SavedStateError};
use serde::{Deserialize, Serialize};

pub const SECTION: &str = "serial/com1";
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SerialRestoreError {
    #[error("the saved receive FIFO holds {0} bytes, the UART's only {FIFO_SIZE}")]
    FifoTooLong(usize),
}

impl Serial {
    pub fn save(&self) -> SerialState {
        let u = &self.uart;
        SerialState {
            baud_divisor_low: u.divisor_low,
            baud_divisor_high: u.divisor_high,
            interrupt_enable: u.ier,
            // Pending THRE is kept even while ETBEI is off.
            interrupt_identification: u.identification()
                | if u.thre_pending { IIR_THRE } else { 0 },
            line_control: u.lcr,
            line_status: u.line_status(true),
            modem_control: u.mcr,
            modem_status: u.msr,
            scratch: u.scr,
            in_buffer: u.rx.iter().copied().collect(),
        }
    }

    /// Replaces the UART's registers with `saved`, keeping its interrupt
    /// line, events and output; a pending interrupt is raised again.
    pub fn restore(&mut self, saved: &SerialState) -> Result<(), SerialRestoreError> {
        if saved.in_buffer.len() > FIFO_SIZE {
            return Err(SerialRestoreError::FifoTooLong(saved.in_buffer.len()));
        }
        self.uart = Uart {
            divisor_low: saved.baud_divisor_low,
            divisor_high: saved.baud_divisor_high,
            ier: saved.interrupt_enable,
            lcr: saved.line_control,
            mcr: saved.modem_control,
            msr: saved.modem_status,
            scr: saved.scratch,
            thre_pending: saved.interrupt_identification & IIR_THRE != 0,
            rx: saved.in_buffer.iter().copied().collect(),
        };
        if self.uart.line() {
            self.wires.interrupt();
        }
        Ok(())
    }
}

impl SavedState for Serial {
    fn section_name(&self) -> String {
        SECTION.into()
    }

    fn section_version(&self) -> u32 {
        VERSION
    }

    fn save_state(&self) -> Result<Vec<u8>, SavedStateError> {
        encode(&self.save())
    }

    fn restore_state(&mut self, _version: u32, payload: &[u8]) -> Result<(), SavedStateError> {
        self.restore(&decode(payload)?)
            .map_err(SavedStateError::refused)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::bus::BusDevice;
    use crate::legacy::serial::{InputDrained, SerialOutput};

    fn serial() -> Serial {
        let evt = || vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Serial::new(evt(), Arc::new(InputDrained(evt())), SerialOutput::Sink)
    }

    #[test]
    fn registers_and_fifo_survive_save_and_restore() {
        let mut a = serial();
        a.write(3, &[0x03]); // LCR: 8 bits
        a.write(7, &[0x5a]); // scratch
        a.push_input(b"hi");
        let saved = a.save_state().unwrap();
        let mut b = serial();
        b.restore_state(VERSION, &saved).unwrap();
        let mut r = [0u8];
        b.read(7, &mut r);
        assert_eq!(r[0], 0x5a);
        b.read(0, &mut r);
        assert_eq!(r[0], b'h');
        let mut long = a.save();
        long.in_buffer = vec![0; 65];
        let e = b
            .restore_state(VERSION, &encode(&long).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("65 bytes"), "{e}");
        assert!(matches!(
            b.restore_state(VERSION, b"[]"),
            Err(SavedStateError::Decode(_))
        ));
    }
}
