//! What the guest touches: the port-I/O and MMIO buses and the devices on
//! them (16550 serial, i8042 reset line, the ACPI sleep/reset registers,
//! the virtio-mmio transport and virtio-net).

pub mod acpi_ged;
pub mod acpi_pm;
pub mod bus;
pub mod guest_log;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusBuilder, BusDevice, BusError};

/// Guest memory as devices and the VMM see it. The bitmap records the
/// pages the VMM itself writes (rx buffers, used rings), which KVM's
/// dirty log cannot see.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

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
