//! The i8042 keyboard controller at 0x60/0x64, kept for its reset line:
//! writing 0xFE to the command port is how `reboot=k` resets a PC.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::bus::BusDevice;
use crate::{ExitRequester, GuestExitRequest};

pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

pub struct I8042 {
    inner: vm_superio::I8042Device<EventFdTrigger>,
    reset_evt: EventFd,
    exit: Arc<dyn ExitRequester>,
}

impl I8042 {
    pub fn new(exit: Arc<dyn ExitRequester>) -> std::io::Result<Self> {
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        Ok(Self {
            inner: vm_superio::I8042Device::new(EventFdTrigger(reset_evt.try_clone()?)),
            reset_evt,
            exit,
        })
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0xff, |o| self.inner.read(o));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.inner.write(offset, value) {
            log::warn!("i8042: {e}");
        }
        // The device signals the reset through its eventfd; turn that into
        // an exit request at once, on this vCPU, before it runs on.
        if self.reset_evt.read().is_ok() {
            self.exit.request_exit(GuestExitRequest::Reset);
        }
    }
}
