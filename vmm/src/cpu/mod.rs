//! A vCPU's architectural state at boot: CPUID, MSRs, registers, FPU,
//! local APIC.

pub mod cpuid;
pub mod msr;
pub mod regs;

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_CPUID2: {0}")]
    SetCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS: {0}")]
    SetMsrs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS set only {set} of {wanted} boot MSRs")]
    MsrsPartial { set: usize, wanted: usize },
    #[error("KVM_SET_REGS: {0}")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_SREGS / KVM_SET_SREGS: {0}")]
    Sregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_FPU: {0}")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("local APIC state: {0}")]
    Lapic(#[source] kvm_ioctls::Error),
    #[error("cannot write boot page tables or GDT: {0}")]
    Memory(#[source] vm_memory::GuestMemoryError),
    #[error("building the MSR list: {0}")]
    MsrList(#[source] vmm_sys_util::fam::Error),
}
