//! The hardware-reduced ACPI sleep control, sleep status and reset
//! registers the FADT points at. Writing SLP_EN with SLP_TYP 5 (the `_S5_`
//! value in the DSDT) powers off; writing the reset value resets.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::{ExitRequester, GuestExitRequest};

/// Port of the sleep control register (1 byte); status is the next byte,
/// the reset register the one after.
pub const ACPI_PM_BASE: u64 = 0x600;
pub const ACPI_PM_LEN: u64 = 4;
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
pub const SLEEP_STATUS_OFFSET: u64 = 1;
pub const RESET_OFFSET: u64 = 2;
/// The value the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 0x01;
/// SLP_TYP for S5 as advertised by `\_S5_` in the DSDT.
pub const S5_SLEEP_TYPE: u8 = 5;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
/// Wake status, bit 7 of the sleep status register.
const WAK_STS: u8 = 1 << 7;

pub struct AcpiPm {
    exit: Arc<dyn ExitRequester>,
}

impl AcpiPm {
    pub fn new(exit: Arc<dyn ExitRequester>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The guest polls WAK_STS after a sleep request; we never sleep
        // without exiting, so report "awake" and nothing else.
        let value = if offset == SLEEP_STATUS_OFFSET {
            WAK_STS
        } else {
            0
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            SLEEP_CONTROL_OFFSET if value & SLP_EN != 0 => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if sleep_type == S5_SLEEP_TYPE {
                    self.exit.request_exit(GuestExitRequest::PowerOff);
                } else {
                    log::info!("acpi: guest asked for sleep type {sleep_type}, not supported");
                }
            }
            RESET_OFFSET if value == RESET_VALUE => self.exit.request_exit(GuestExitRequest::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Requests(Mutex<Vec<GuestExitRequest>>);
    impl ExitRequester for Requests {
        fn request_exit(&self, r: GuestExitRequest) {
            self.0.lock().unwrap().push(r);
        }
    }

    #[test]
    fn s5_and_reset_are_recognised_and_other_writes_ignored() {
        let requests = Arc::new(Requests::default());
        let mut pm = AcpiPm::new(requests.clone());
        pm.write(SLEEP_CONTROL_OFFSET, &[S5_SLEEP_TYPE << 2]); // no SLP_EN
        pm.write(SLEEP_CONTROL_OFFSET, &[(3 << 2) | SLP_EN]); // S3
        pm.write(RESET_OFFSET, &[0x02]);
        pm.write(3, &[0xff]);
        pm.write(SLEEP_CONTROL_OFFSET, &[]);
        assert!(requests.0.lock().unwrap().is_empty());
        // What Linux writes for S5: (SLP_TYP << 2) | SLP_EN.
        pm.write(SLEEP_CONTROL_OFFSET, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        pm.write(RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(
            *requests.0.lock().unwrap(),
            vec![GuestExitRequest::PowerOff, GuestExitRequest::Reset]
        );
        let mut status = [0u8; 2];
        pm.read(SLEEP_STATUS_OFFSET, &mut status);
        assert_eq!(status, [WAK_STS, 0]);
    }
}
