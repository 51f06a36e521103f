//! Legacy PC devices on the port-I/O bus.

pub mod i8042;
pub mod serial;

pub use i8042::I8042;
pub use serial::{Serial, SerialOutput};

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line raised by writing an eventfd registered as a KVM
/// irqfd (or, for the reset line, read by the VMM).
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
