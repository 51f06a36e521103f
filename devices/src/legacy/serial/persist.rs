//! The UART's saved state: its registers and receive FIFO (vm-superio's
//! `SerialState`, made serde), in the `serial/com1` section.

use migration::persist::{decode, encode};
use migration::{SavedState, SavedStateError};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::{EventFdTrigger, Serial, SerialOutput};

pub const SECTION: &str = "serial/com1";
pub const VERSION: u32 = 1;
/// vm-superio's FIFO size: a longer saved FIFO is refused.
const FIFO_SIZE: usize = 64;

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
    #[error("cannot hand the UART its interrupt line: {0}")]
    Interrupt(#[source] std::io::Error),
}

impl Serial {
    pub fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Replaces the UART's registers with `saved`, keeping its interrupt
    /// line, events and output.
    pub fn restore(&mut self, saved: &SerialState) -> Result<(), SerialRestoreError> {
        if saved.in_buffer.len() > FIFO_SIZE {
            return Err(SerialRestoreError::FifoTooLong(saved.in_buffer.len()));
        }
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        // vm-superio builds a UART only from parts it owns: take ours out
        // (a placeholder stands in for the moment) and build anew.
        let trigger = self
            .uart
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(SerialRestoreError::Interrupt)?;
        let placeholder = vm_superio::Serial::with_events(
            EventFdTrigger(
                EventFd::new(libc::EFD_NONBLOCK).map_err(SerialRestoreError::Interrupt)?,
            ),
            self.uart.events().clone(),
            SerialOutput::Sink,
        );
        let old = std::mem::replace(&mut self.uart, placeholder);
        let events = old.events().clone();
        let out = old.into_writer();
        // The FIFO length, the one thing from_state checks, is checked above.
        self.uart = vm_superio::Serial::from_state(&state, EventFdTrigger(trigger), events, out)
            .map_err(|_| SerialRestoreError::FifoTooLong(saved.in_buffer.len()))?;
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
    use crate::legacy::serial::InputDrained;

    fn serial() -> Serial {
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
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
