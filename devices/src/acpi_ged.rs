//! The Generic Event Device (`ACPI0013`) of the hardware-reduced ACPI
//! machine: how the host presses the power button. The host sets an event
//! bit and pulses the GED's interrupt; the guest's `_EVT` method (in the
//! DSDT) reads the event register — which hands over and clears the
//! pending bits — and notifies `\_SB_.PWRB` (`PNP0C0C`), which Linux turns
//! into a power-button press (an orderly shutdown where userspace listens).

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

pub mod persist;

/// Bytes of the event register window (one byte is used).
pub const GED_LEN: u64 = 1;
/// The power button, bit 0 of the event register.
pub const EVENT_POWER_BUTTON: u8 = 1;

pub struct AcpiGed {
    pending: u8,
    irq: EventFd,
}

impl AcpiGed {
    /// A GED whose interrupt is `irq` (an irqfd).
    pub fn new(irq: EventFd) -> Self {
        Self { pending: 0, irq }
    }

    /// Raises `event` and the interrupt.
    pub fn trigger(&mut self, event: u8) -> std::io::Result<()> {
        self.pending |= event;
        self.irq.write(1)
    }

    /// Events raised and not yet read by the guest.
    pub fn pending(&self) -> u8 {
        self.pending
    }
}

impl BusDevice for AcpiGed {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(b) = data.first_mut() {
                *b = std::mem::take(&mut self.pending);
            }
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_press_is_read_once_and_pulses_the_interrupt() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ged = AcpiGed::new(irq.try_clone().unwrap());
        ged.trigger(EVENT_POWER_BUTTON).unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        let mut b = [0xffu8; 4];
        ged.read(0, &mut b);
        assert_eq!(b, [EVENT_POWER_BUTTON, 0, 0, 0]);
        ged.read(0, &mut b);
        assert_eq!(b[0], 0, "read clears");
        ged.read(7, &mut b);
        assert_eq!(b, [0; 4], "no other register");
        ged.write(0, &[0xff]);
        assert_eq!(ged.pending(), 0, "writes change nothing");
    }
}
