//! What the guest touches: the port-I/O and MMIO buses and the devices on
//! them (16550 serial, i8042 reset line, the ACPI sleep/reset registers;
//! the virtio-mmio transport and virtio-net arrive with issue #4).

pub mod acpi_pm;
pub mod bus;
pub mod legacy;

pub use bus::{Bus, BusBuilder, BusDevice, BusError};

/// Why the guest asked the machine to stop. Devices report it; the VMM
/// decides what it means for the process (Ferry exits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExitRequest {
    /// ACPI S5 (`poweroff -f`).
    PowerOff,
    /// ACPI reset register or the i8042 reset line (`reboot -f`).
    Reset,
}

/// Where devices send a [`GuestExitRequest`]. Implemented by the VMM.
pub trait ExitRequester: Send + Sync {
    fn request_exit(&self, request: GuestExitRequest);
}
