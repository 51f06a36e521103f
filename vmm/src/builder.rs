//! Putting a machine together: the KVM VM, guest memory, devices and
//! vCPUs (`build`), and loading a kernel into it (`boot`). A fresh boot
//! does both; an incoming migration builds the same machine and fills it
//! from the stream instead of booting it.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};

use devices::acpi_ged::{AcpiGed, GED_LEN};
use devices::acpi_pm::{AcpiPm, ACPI_PM_BASE, ACPI_PM_LEN};
use devices::legacy::i8042::{I8042_BASE, I8042_LEN};
use devices::legacy::serial::{InputDrained, COM1_BASE, COM1_IRQ, COM1_LEN};
use devices::legacy::{Serial, SerialOutput, I8042};
use devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use devices::virtio::net::{Net, NetOptions};
use devices::virtio::VirtioInterrupt;
use devices::{Bus, BusBuilder};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use migration::SavedState;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::VirtioMmioDevice;
use crate::boot::{self, BootProtocol};
use crate::check::KvmKind;
use crate::config::{BootConfig, MachineConfig, NetDescriptor, SerialConfig};
use crate::cpu::{self, cpuid, msr, regs};
use crate::exit::ExitState;
use crate::layout::*;
use crate::memory::{self, GuestMemoryMmap, MemoryBackend};
use crate::vcpu::{Vcpu, VcpuCommand, VcpuControl};
use crate::VmmError;

/// A virtio-net device behind its MMIO transport, shared by the bus, the
/// event loop, QMP and migration.
pub type NetTransport = Arc<Mutex<MmioTransport<Net>>>;

/// The parts of a built VM that outlive its construction and are shared
/// by the event loop, QMP and migration.
pub struct VmParts {
    pub kvm: Kvm,
    pub vm_fd: VmFd,
    pub memory: GuestMemoryMmap,
    pub kind: KvmKind,
    pub machine: MachineConfig,
    pub nets_desc: Vec<NetDescriptor>,
    pub serial: Arc<Mutex<Serial>>,
    pub drained: Arc<InputDrained>,
    pub nets: Vec<NetTransport>,
    /// Every device with saved state, in stream order: the migration
    /// source and destination loop over this list and name no device.
    pub devices: Vec<Arc<Mutex<dyn SavedState>>>,
    pub virtio: Vec<VirtioMmioDevice>,
    pub vcpus: Vec<Arc<VcpuControl>>,
    pub exit: Arc<ExitState>,
    /// The power button.
    pub ged: Arc<Mutex<AcpiGed>>,
    /// Guest RAM's memfd, when RAM is memfd-backed (handed over in a local
    /// migration).
    pub memfd: Option<File>,
    /// When the guest first ran (a migration's destination reports it).
    pub started_at: std::sync::OnceLock<std::time::Instant>,
    /// The memory slots, until they are registered (see
    /// [`memory::PendingMemslots`]).
    pub memslots: Mutex<Option<memory::PendingMemslots>>,
}

impl VmParts {
    /// Guest memory is registered with KVM once this returns Ok.
    pub fn wait_for_memslots(&self) -> Result<(), memory::MemoryError> {
        let pending = self
            .memslots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        pending.map_or(Ok(()), memory::PendingMemslots::wait)
    }
}

/// Host resources a machine may be given instead of making its own: a
/// local migration's destination receives the source's TAPs and memfd.
#[derive(Default)]
pub struct HostBackends {
    pub memory: MemoryBackend,
    /// Guest RAM to map (a memfd received from the source).
    pub memfd: Option<File>,
    /// Per NIC, an already open TAP (received), else `None`: open by name.
    pub taps: Vec<Option<net::Tap>>,
    /// Guest RAM to map privately from a snapshot file's RAM image.
    pub image: Option<(File, migration::snapshot::ImageLayout)>,
}

/// A built machine: its shared parts and its vCPUs, not yet running.
pub struct Machine {
    pub parts: VmParts,
    pub vcpus: Vec<Vcpu>,
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Io { what, source }
}

fn serial_output(config: &SerialConfig) -> Result<SerialOutput, VmmError> {
    Ok(match config {
        SerialConfig::Stdio => {
            // SAFETY: dup of stdout has no preconditions; the new fd is
            // owned by the File from here on.
            let fd = unsafe { libc::dup(libc::STDOUT_FILENO) };
            if fd < 0 {
                return Err(io_err("dup stdout")(std::io::Error::last_os_error()));
            }
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            SerialOutput::Fd(unsafe { File::from_raw_fd(fd) })
        }
        SerialConfig::File(path) => {
            SerialOutput::Fd(File::create(path).map_err(|source| VmmError::SerialFile {
                path: path.clone(),
                source,
            })?)
        }
        SerialConfig::None => SerialOutput::Sink,
    })
}

/// Builds the VM: KVM with its in-kernel irqchip and PIT, guest memory,
/// the legacy devices, one virtio-net per NIC (window, GSI, ioeventfds),
/// and the vCPUs with this host's CPUID and boot MSRs.
pub fn build(
    machine: &MachineConfig,
    nets: &[NetDescriptor],
    serial: &SerialConfig,
    kind: KvmKind,
    mut host: HostBackends,
) -> Result<Machine, VmmError> {
    let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
    let max = kvm.get_max_vcpus();
    if usize::from(machine.vcpus) > max {
        return Err(VmmError::TooManyVcpus {
            asked: machine.vcpus,
            max,
        });
    }
    let vm_fd = create_vm(&kvm)?;
    let memfd = match (host.memfd.take(), host.memory) {
        (Some(file), _) => Some(file),
        (None, MemoryBackend::Memfd) => Some(memory::create_memfd(machine.memory_bytes)?),
        (None, MemoryBackend::Anonymous) => None,
    };
    let memory = match (&memfd, &host.image) {
        (Some(file), _) => memory::map_memfd(file, machine.memory_bytes)?,
        (None, Some((file, layout))) => memory::map_image(file, layout, machine.memory_bytes)?,
        (None, None) => memory::create_guest_memory(machine.memory_bytes)?,
    };
    let memslots = memory::PendingMemslots::start(&kvm, &vm_fd, &memory)?;

    let exit = Arc::new(ExitState::new().map_err(io_err("eventfd"))?);
    let legacy = legacy_devices(&vm_fd, &exit, serial)?;
    let ged_irq = irqfd(&vm_fd, GED_IRQ, "KVM_IRQFD (GED)")?;
    let ged = Arc::new(Mutex::new(AcpiGed::new(ged_irq)));
    let mut mmio = BusBuilder::new();
    mmio.insert(ged.clone(), GED_START, GED_LEN)?;
    let mut virtio = Vec::new();
    let mut transports = Vec::new();
    for (i, nic) in nets.iter().enumerate() {
        let tap = host.taps.get_mut(i).and_then(Option::take);
        let (dev, transport) = virtio_net(&vm_fd, &memory, i, nic, tap)?;
        mmio.insert(transport.clone(), dev.base, dev.size)?;
        virtio.push(dev);
        transports.push(transport);
    }
    let mmio: Arc<Bus> = Arc::new(mmio.build());
    let (vcpus, controls) =
        create_vcpus(&kvm, &vm_fd, machine.vcpus, kind, &legacy.pio, &mmio, &exit)?;

    // Every device with state, in the order the stream carries them.
    let mut devices: Vec<Arc<Mutex<dyn SavedState>>> = vec![legacy.serial.clone(), ged.clone()];
    devices.extend(
        transports
            .iter()
            .map(|t| t.clone() as Arc<Mutex<dyn SavedState>>),
    );
    Ok(Machine {
        parts: VmParts {
            kvm,
            vm_fd,
            memory,
            kind,
            machine: machine.clone(),
            nets_desc: nets.to_vec(),
            serial: legacy.serial,
            drained: legacy.drained,
            nets: transports,
            devices,
            virtio,
            vcpus: controls,
            exit,
            ged,
            memfd,
            started_at: std::sync::OnceLock::new(),
            memslots: Mutex::new(Some(memslots)),
        },
        vcpus,
    })
}

/// The KVM VM with its TSS, identity map, in-kernel irqchip and PIT.
fn create_vm(kvm: &Kvm) -> Result<VmFd, VmmError> {
    let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm_fd
        .set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm_fd
        .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(vm_fd)
}

/// An eventfd registered as the irqfd of `gsi`.
fn irqfd(vm_fd: &VmFd, gsi: u32, what: &'static str) -> Result<EventFd, VmmError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
    vm_fd.register_irqfd(&evt, gsi).map_err(kvm_err(what))?;
    Ok(evt)
}

/// The port-I/O devices: COM1, the i8042 reset line, ACPI PM.
struct Legacy {
    serial: Arc<Mutex<Serial>>,
    drained: Arc<InputDrained>,
    pio: Arc<Bus>,
}

fn legacy_devices(
    vm_fd: &VmFd,
    exit: &Arc<ExitState>,
    serial: &SerialConfig,
) -> Result<Legacy, VmmError> {
    let serial_irq = irqfd(vm_fd, COM1_IRQ, "KVM_IRQFD (serial)")?;
    let drained = Arc::new(InputDrained(
        EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?,
    ));
    let serial = Arc::new(Mutex::new(Serial::new(
        serial_irq,
        drained.clone(),
        serial_output(serial)?,
    )));
    let i8042 = Arc::new(Mutex::new(
        I8042::new(exit.clone()).map_err(io_err("eventfd"))?,
    ));
    let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(exit.clone())));
    let mut pio = BusBuilder::new();
    pio.insert(serial.clone(), COM1_BASE, COM1_LEN)?;
    pio.insert(i8042, I8042_BASE, I8042_LEN)?;
    pio.insert(acpi_pm, ACPI_PM_BASE, ACPI_PM_LEN)?;
    Ok(Legacy {
        serial,
        drained,
        pio: Arc::new(pio.build()),
    })
}

/// NIC `i`: its window and GSI, its TAP (`tap`, received, or opened by
/// name), its irqfd and one ioeventfd per queue.
fn virtio_net(
    vm_fd: &VmFd,
    memory: &GuestMemoryMmap,
    i: usize,
    nic: &NetDescriptor,
    tap: Option<net::Tap>,
) -> Result<(VirtioMmioDevice, NetTransport), VmmError> {
    let dev = VirtioMmioDevice {
        base: VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE,
        size: VIRTIO_MMIO_SIZE,
        irq: VIRTIO_IRQ_BASE + i as u32,
    };
    if dev.irq >= GED_IRQ {
        return Err(VmmError::TooManyDevices(i + 1));
    }
    let tap = match tap {
        Some(tap) => tap,
        None => net::Tap::open(&nic.tap)?,
    };
    let device = Net::new(NetOptions {
        id: nic.id.clone(),
        backend: tap,
        mac: nic.mac,
        guest_announce: nic.guest_announce,
    })
    .map_err(io_err("eventfd"))?;
    let irqfd = irqfd(vm_fd, dev.irq, "KVM_IRQFD (virtio)")?;
    let queue_evts = device.queue_evts().to_vec();
    for (q, evt) in queue_evts.iter().enumerate() {
        let addr = IoEventAddress::Mmio(dev.base + QUEUE_NOTIFY_OFFSET);
        vm_fd
            .register_ioevent(evt.as_ref(), &addr, q as u32)
            .map_err(kvm_err("KVM_IOEVENTFD"))?;
    }
    let transport = MmioTransport::new(
        device,
        memory.clone(),
        VirtioInterrupt::new(irqfd),
        queue_evts,
    )
    .map_err(VmmError::Virtio)?;
    Ok((dev, Arc::new(Mutex::new(transport))))
}

/// The vCPUs with this host's CPUID (patched for the topology), boot
/// MSRs, FPU and LAPIC, each parked until the VM starts.
fn create_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    count: u8,
    kind: KvmKind,
    pio: &Arc<Bus>,
    mmio: &Arc<Bus>,
    exit: &Arc<ExitState>,
) -> Result<(Vec<Vcpu>, Vec<Arc<VcpuControl>>), VmmError> {
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(cpu::CpuError::SupportedCpuid)?;
    let mut vcpus = Vec::with_capacity(usize::from(count));
    let mut controls = Vec::with_capacity(usize::from(count));
    for id in 0..count {
        let fd = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut cpuid = supported.clone();
        cpuid::patch(&mut cpuid, id, count, kind);
        fd.set_cpuid2(&cpuid).map_err(cpu::CpuError::SetCpuid)?;
        msr::setup(&fd)?;
        regs::setup_fpu(&fd)?;
        regs::setup_lapic(&fd)?;
        // Every vCPU waits parked until the VM is started (at once, at
        // `cont` with -S, or after an incoming migration).
        let control = Arc::new(VcpuControl::new(VcpuCommand::Pause));
        controls.push(control.clone());
        vcpus.push(Vcpu::new(
            id,
            fd,
            pio.clone(),
            mmio.clone(),
            exit.clone(),
            control,
        ));
    }
    Ok((vcpus, controls))
}

/// The kernel command line: the user's, then what Ferry adds for its
/// devices (the `virtio_mmio.device=` form for kernels without ACPI).
fn full_cmdline(cmdline: &str, virtio: &[VirtioMmioDevice]) -> String {
    let mut cmdline = cmdline.trim().to_string();
    for dev in virtio {
        cmdline.push_str(&format!(
            " virtio_mmio.device={}K@{:#x}:{}",
            dev.size >> 10,
            dev.base,
            dev.irq
        ));
    }
    cmdline.trim().to_string()
}

/// Loads the kernel, initrd, command line, ACPI and MP tables and the
/// protocol's boot structure, and points the first vCPU at the entry.
pub fn boot(machine: &Machine, config: &BootConfig) -> Result<(), VmmError> {
    let parts = &machine.parts;
    let memory = &parts.memory;
    let vcpu_count = parts.machine.vcpus;
    let kernel = boot::load_kernel(memory, &config.kernel)?;
    let (cmdline_max, initrd_max) = match kernel.protocol {
        BootProtocol::Linux64 { header } => (
            boot::linux::cmdline_limit(header),
            boot::linux::initrd_addr_max(header),
        ),
        BootProtocol::Pvh => (CMDLINE_MAX_SIZE, MMIO_GAP_START - 1),
    };
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(memory, path, kernel.end, initrd_max)?),
        None => None,
    };
    let cmdline = full_cmdline(&config.cmdline, &parts.virtio);
    boot::write_cmdline(memory, &cmdline, cmdline_max)?;
    let rsdp = crate::acpi::write(memory, vcpu_count, &parts.virtio)?;
    crate::mptable::write(memory, vcpu_count)?;
    let size = parts.machine.memory_bytes;
    match kernel.protocol {
        BootProtocol::Linux64 { header } => {
            boot::linux::write_zero_page(memory, header, cmdline.len(), initrd, rsdp, size)?
        }
        BootProtocol::Pvh => boot::pvh::write_start_info(memory, initrd, rsdp, size)?,
    }
    let bsp = machine
        .vcpus
        .first()
        .ok_or(VmmError::TooManyVcpus { asked: 0, max: 0 })?;
    regs::setup_sregs(memory, &bsp.fd, &kernel.protocol)?;
    regs::setup_regs(&bsp.fd, kernel.entry.0, &kernel.protocol)?;
    Ok(())
}
