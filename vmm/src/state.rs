//! The architectural state of a VM that the migration stream carries:
//! each vCPU's registers, FPU/xsave, LAPIC, MSRs, events and CPUID, and
//! the VM's interrupt controllers, PIT and clock. Plain serde structs
//! around KVM's own types (kvm-bindings serializes them as bytes).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the host's xsave area needs {0} bytes, more than the 4096 Ferry saves")]
    XsaveTooLarge(usize),
    #[error("KVM restored only {set} of {wanted} MSRs (first refused: {index:#x})")]
    MsrsPartial {
        set: usize,
        wanted: usize,
        index: u32,
    },
    #[error("building a KVM list: {0}")]
    List(#[source] vmm_sys_util::fam::Error),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// Everything one vCPU needs to continue elsewhere.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
}

/// The MSRs worth saving: KVM's list, minus those this host's KVM will
/// not read back (found by asking once).
pub fn saveable_msrs(kvm_fd: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let list = kvm_fd
        .get_msr_index_list()
        .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    let mut indices: Vec<u32> = list.as_slice().to_vec();
    let mut good = Vec::with_capacity(indices.len());
    // KVM_GET_MSRS stops at the first MSR it cannot read: keep what was
    // read, drop the failing one, go on from there.
    while !indices.is_empty() {
        let mut msrs = empty_msrs(&indices)?;
        let read = vcpu.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        good.extend_from_slice(&indices[..read]);
        indices.drain(..(read + 1).min(indices.len()));
    }
    Ok(good)
}

/// A KVM_GET_MSRS request for `indices`, values to be filled in.
fn empty_msrs(indices: &[u32]) -> Result<Msrs, StateError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(StateError::List)
}

/// Whether KVM_GET/SET_XSAVE's 4 KiB area holds this host's whole xsave
/// state (it does unless AMX-like features are enabled).
pub fn check_xsave_size(kvm: &Kvm) -> Result<(), StateError> {
    let size = kvm.check_extension_int(Cap::Xsave2);
    if size > 4096 {
        return Err(StateError::XsaveTooLarge(size as usize));
    }
    Ok(())
}

impl VcpuState {
    /// Reads the vCPU's state; the vCPU must be out of KVM_RUN.
    pub fn save(id: u8, vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self, StateError> {
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_CPUID2"))?;
        let mut msrs = empty_msrs(msr_indices)?;
        let read = vcpu.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        Ok(Self {
            id,
            cpuid: cpuid.as_slice().to_vec(),
            msrs: msrs.as_slice()[..read].to_vec(),
            // mp_state first: reading it makes KVM settle pending APIC
            // events into the state read below.
            mp_state: vcpu.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?,
            regs: vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?,
            lapic: vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?,
            events: vcpu
                .get_vcpu_events()
                .map_err(ioctl("KVM_GET_VCPU_EVENTS"))?,
            debugregs: vcpu.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Loads the state into a fresh vCPU, in the order KVM needs: CPUID
    /// before anything that depends on features, MSRs after sregs (EFER),
    /// events last.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(StateError::List)?;
        vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(ioctl("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(ioctl("KVM_SET_SREGS"))?;
        // SAFETY: the caller checked with `check_xsave_size` that this
        // host's xsave state fits the 4 KiB kvm_xsave, so KVM reads no
        // more than the struct holds.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(ioctl("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(StateError::List)?;
        let set = vcpu.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if set != self.msrs.len() {
            return Err(StateError::MsrsPartial {
                set,
                wanted: self.msrs.len(),
                index: self.msrs[set].index,
            });
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// The VM-wide devices KVM emulates.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(ioctl("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

impl VmState {
    pub fn save(vm: &VmFd) -> Result<Self, StateError> {
        Ok(Self {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?,
        })
    }

    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(ioctl("KVM_SET_PIT2"))?;
        // KVM_SET_CLOCK accepts only the realtime flag; the guest's clock
        // continues from the saved value.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))?;
        Ok(())
    }
}
