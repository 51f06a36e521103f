//! Why a VM stopped, and the one place that records it.

use std::fmt;
use std::sync::Mutex;

use devices::{ExitRequester, GuestExitRequest};
use vmm_sys_util::eventfd::EventFd;

/// The reason `ferry run` ends. The first reason recorded wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5 or a KVM shutdown system event).
    PowerOff,
    /// The guest reset the machine (`reboot`).
    Reset,
    /// The user typed Ctrl-A x on the console.
    UserQuit,
    /// A QMP client asked (`quit`).
    QmpQuit,
    /// A QMP client reset the machine (`system_reset`); Ferry ends the VM
    /// on a reset, as it does for the guest's own.
    QmpReset,
    /// Ferry received a termination signal.
    Signal(i32),
    /// A vCPU triple-faulted.
    TripleFault { vcpu: u8, rip: u64 },
    /// KVM could not go on with a vCPU (e.g. an instruction its emulator
    /// cannot handle, as on kvm_pvm).
    InternalError { vcpu: u8, detail: String },
    /// KVM refused to enter the guest.
    EntryFailure { vcpu: u8, reason: u64 },
    /// The guest reported a crash (KVM system event).
    GuestCrash { vcpu: u8 },
    /// A vCPU stopped on an exit Ferry does not handle, or an ioctl failed.
    VcpuError { vcpu: u8, detail: String },
}

impl VmExit {
    /// Whether this is an orderly end (exit status 0). Like QEMU, a
    /// termination signal is one: it is how supervisors stop a VM.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            VmExit::PowerOff
                | VmExit::Reset
                | VmExit::UserQuit
                | VmExit::QmpQuit
                | VmExit::QmpReset
                | VmExit::Signal(_)
        )
    }
}

impl VmExit {
    /// QMP's SHUTDOWN event data for this exit: who caused it and why.
    pub fn shutdown_cause(&self) -> (bool, &'static str) {
        match self {
            VmExit::PowerOff => (true, "guest-shutdown"),
            VmExit::Reset | VmExit::TripleFault { .. } => (true, "guest-reset"),
            VmExit::GuestCrash { .. }
            | VmExit::InternalError { .. }
            | VmExit::EntryFailure { .. } => (true, "guest-panic"),
            VmExit::UserQuit => (false, "host-ui"),
            VmExit::QmpQuit => (false, "host-qmp-quit"),
            VmExit::QmpReset => (false, "host-qmp-system-reset"),
            VmExit::Signal(_) => (false, "host-signal"),
            VmExit::VcpuError { .. } => (false, "host-error"),
        }
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::PowerOff => write!(f, "guest powered off"),
            VmExit::Reset => write!(f, "guest reset the machine"),
            VmExit::UserQuit => write!(f, "quit from the console (Ctrl-A x)"),
            VmExit::QmpQuit => write!(f, "quit by a QMP client"),
            VmExit::QmpReset => write!(f, "reset by a QMP client"),
            VmExit::Signal(s) => write!(f, "terminated by signal {s}"),
            VmExit::TripleFault { vcpu, rip } => {
                write!(f, "guest triple fault on vCPU {vcpu} at RIP {rip:#x}")
            }
            VmExit::InternalError { vcpu, detail } => {
                write!(f, "KVM internal error on vCPU {vcpu}: {detail}")
            }
            VmExit::EntryFailure { vcpu, reason } => {
                write!(f, "KVM could not enter the guest on vCPU {vcpu} (hardware entry failure reason {reason:#x})")
            }
            VmExit::GuestCrash { vcpu } => write!(f, "guest reported a crash on vCPU {vcpu}"),
            VmExit::VcpuError { vcpu, detail } => write!(f, "vCPU {vcpu}: {detail}"),
        }
    }
}

/// Holds the exit reason and wakes the VMM thread when one is recorded.
pub struct ExitState {
    reason: Mutex<Option<VmExit>>,
    pub evt: EventFd,
}

impl ExitState {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `exit` unless an earlier reason is already there.
    pub fn record(&self, exit: VmExit) {
        let mut reason = devices::bus::lock(&self.reason);
        if reason.is_none() {
            log::info!("VM exit: {exit}");
            *reason = Some(exit);
        }
        drop(reason);
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot wake the VMM thread: {e}");
        }
    }

    pub fn reason(&self) -> Option<VmExit> {
        devices::bus::lock(&self.reason).clone()
    }
}

impl ExitRequester for ExitState {
    fn request_exit(&self, request: GuestExitRequest) {
        self.record(match request {
            GuestExitRequest::PowerOff => VmExit::PowerOff,
            GuestExitRequest::Reset => VmExit::Reset,
        });
    }
}
