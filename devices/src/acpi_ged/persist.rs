//! The GED's saved state: a power-button press the guest has not read
//! yet, in the `acpi-ged` section. Optional on load: streams written
//! before the GED existed have none.

use migration::persist::{decode, encode};
use migration::{SavedState, SavedStateError};
use serde::{Deserialize, Serialize};

use super::AcpiGed;

pub const SECTION: &str = "acpi-ged";
pub const VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GedState {
    pub pending: u8,
}

impl SavedState for AcpiGed {
    fn section_name(&self) -> String {
        SECTION.into()
    }

    fn section_version(&self) -> u32 {
        VERSION
    }

    fn optional(&self) -> bool {
        true
    }

    fn save_state(&self) -> Result<Vec<u8>, SavedStateError> {
        encode(&GedState {
            pending: self.pending,
        })
    }

    /// The interrupt that went with a pending event travels in the
    /// irqchip's state, so none is raised here.
    fn restore_state(&mut self, _version: u32, payload: &[u8]) -> Result<(), SavedStateError> {
        let state: GedState = decode(payload)?;
        self.pending = state.pending;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi_ged::EVENT_POWER_BUTTON;
    use crate::bus::BusDevice;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn a_pending_press_survives_save_and_restore() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ged = AcpiGed::new(irq.try_clone().unwrap());
        ged.trigger(EVENT_POWER_BUTTON).unwrap();
        let state = ged.save_state().unwrap();
        let mut other = AcpiGed::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        other.restore_state(VERSION, &state).unwrap();
        let mut b = [0u8];
        other.read(0, &mut b);
        assert_eq!(b[0], EVENT_POWER_BUTTON);
        assert!(other.restore_state(VERSION, b"{\"pending\": -1}").is_err());
    }
}
