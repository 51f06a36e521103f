//! What this host's KVM can do. `ferry check` prints it, `ferry run` uses it
//! to refuse a Linux guest that could never reach userspace, and the test
//! suite uses it to decide what to skip: one probe, one answer.

use std::fmt;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// How the host runs guest code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmKind {
    /// VT-x or AMD-V: guests run natively at every privilege level.
    Hardware,
    /// kvm_pvm: guest ring 3 runs natively, guest ring 0 is emulated and
    /// SYSCALL from ring 3 does not reach ring 0 (no Linux userspace).
    Pvm,
}

impl fmt::Display for KvmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvmKind::Hardware => "hardware virtualization",
            KvmKind::Pvm => "kvm_pvm (ring 0 emulated, no hardware virtualization)",
        })
    }
}

/// One KVM capability Ferry relies on, and whether the host has it.
#[derive(Clone, Debug)]
pub struct Capability {
    pub name: &'static str,
    pub present: bool,
    /// Ferry cannot run a guest at all without it.
    pub required: bool,
}

/// The answer of [`probe`].
#[derive(Clone, Debug)]
pub struct HostReport {
    pub kind: KvmKind,
    pub api_version: i32,
    pub max_vcpus: usize,
    pub capabilities: Vec<Capability>,
}

impl HostReport {
    /// Whether a stock Linux guest can be expected to reach userspace.
    pub fn linux_userspace(&self) -> bool {
        self.kind == KvmKind::Hardware
    }

    /// The first required capability this host lacks, if any.
    pub fn missing_required(&self) -> Option<&'static str> {
        self.capabilities
            .iter()
            .find(|c| c.required && !c.present)
            .map(|c| c.name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled and are you allowed to use it?)")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM API version is {0}, Ferry needs 12")]
    ApiVersion(i32),
}

/// The kind of KVM as seen from the host, without opening /dev/kvm.
pub fn kvm_kind() -> KvmKind {
    if Path::new("/sys/module/kvm_pvm").exists() || !cpu_has_hw_virt() {
        KvmKind::Pvm
    } else {
        KvmKind::Hardware
    }
}

fn cpu_has_hw_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| {
            info.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// Opens /dev/kvm and reports what it offers.
pub fn probe() -> Result<HostReport, CheckError> {
    let kvm = Kvm::new().map_err(CheckError::Open)?;
    let api_version = kvm.get_api_version();
    if api_version != 12 {
        return Err(CheckError::ApiVersion(api_version));
    }
    let cap = |name, c, required| Capability {
        name,
        present: kvm.check_extension(c),
        required,
    };
    let capabilities = vec![
        cap(
            "irqchip (in-kernel PIC + IOAPIC + LAPIC)",
            Cap::Irqchip,
            true,
        ),
        cap("pit2 (in-kernel PIT)", Cap::Pit2, true),
        cap("user memory", Cap::UserMemory, true),
        cap("irqfd", Cap::Irqfd, true),
        cap("ioeventfd", Cap::Ioeventfd, true),
        cap("immediate exit (pause)", Cap::ImmediateExit, true),
        cap("set TSS address", Cap::SetTssAddr, true),
        cap("extended CPUID", Cap::ExtCpuid, true),
        cap("xsave state", Cap::Xsave, false),
        cap("xcrs state", Cap::Xcrs, false),
        cap("vcpu events state", Cap::VcpuEvents, false),
        cap("debug registers state", Cap::Debugregs, false),
        cap("mp state", Cap::MpState, false),
        cap("kvmclock adjust", Cap::AdjustClock, false),
        cap("TSC deadline timer", Cap::TscDeadlineTimer, false),
        cap("read-only memory", Cap::ReadonlyMem, false),
        cap("internal error data", Cap::InternalErrorData, false),
    ];
    Ok(HostReport {
        kind: kvm_kind(),
        api_version,
        max_vcpus: kvm.get_max_vcpus(),
        capabilities,
    })
}
