//! Building a machine from a [`VmConfig`] and running it to its end.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::acpi_pm::{AcpiPm, ACPI_PM_BASE, ACPI_PM_LEN};
use devices::legacy::i8042::{I8042_BASE, I8042_LEN};
use devices::legacy::serial::{InputDrained, COM1_BASE, COM1_IRQ, COM1_LEN};
use devices::legacy::{Serial, SerialOutput, I8042};
use devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use devices::virtio::net::{Net, NetEventHandler, NetOptions};
use devices::virtio::VirtioInterrupt;
use devices::{Bus, BusBuilder};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::VirtioMmioDevice;
use crate::boot::{self, BootProtocol, LoadedKernel};
use crate::check::{kvm_kind, KvmKind};
use crate::config::{resolve_nets, SerialConfig, VmConfig};
use crate::console::{ConsoleInput, RawTerminal};
use crate::control::{VmControl, COMMANDS};
use crate::cpu::{self, cpuid, msr, regs};
use crate::exit::{ExitState, VmExit};
use crate::layout::*;
use crate::memory::{self, GuestMemoryMmap};
use crate::qmp::{EventEmitter, QmpListener, QmpServer};
use crate::runstate::{RunState, RunStateMachine};
use crate::vcpu::{self, Vcpu, VcpuCommand, VcpuControl};
use crate::VmmError;

/// A machine built and ready to run.
pub struct Vm {
    _kvm: Kvm,
    _vm_fd: VmFd,
    _memory: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    controls: Vec<Arc<VcpuControl>>,
    serial: Arc<Mutex<Serial>>,
    drained: Arc<InputDrained>,
    exit: Arc<ExitState>,
    stdio_console: bool,
    nets: Vec<Arc<Mutex<MmioTransport<Net>>>>,
    qmp: Option<QmpListener>,
    start_paused: bool,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

fn serial_output(config: &SerialConfig) -> Result<SerialOutput, VmmError> {
    Ok(match config {
        SerialConfig::Stdio => {
            // SAFETY: dup of stdout has no preconditions; the new fd is
            // owned by the File from here on.
            let fd = unsafe { libc::dup(libc::STDOUT_FILENO) };
            if fd < 0 {
                return Err(VmmError::Io {
                    what: "dup stdout",
                    source: std::io::Error::last_os_error(),
                });
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

/// The kernel command line: the user's, then what Ferry adds for its
/// devices (the `virtio_mmio.device=` form for kernels without ACPI).
fn full_cmdline(config: &VmConfig, virtio: &[VirtioMmioDevice]) -> String {
    let mut cmdline = config.boot.cmdline.trim().to_string();
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

impl Vm {
    pub fn new(config: &VmConfig) -> Result<Self, VmmError> {
        config.machine.validate()?;
        let kind = kvm_kind();
        if kind == KvmKind::Pvm
            && !config.allow_no_userspace
            && boot::is_linux_kernel(&config.boot.kernel)?
        {
            return Err(VmmError::LinuxNeedsHardwareVirt);
        }
        let vcpu_count = config.machine.vcpus;
        // Bind the control socket first: a bad --qmp fails before anything
        // is built.
        let qmp = match &config.qmp {
            Some(spec) => Some(QmpListener::bind(spec).map_err(|e| VmmError::Qmp(e.to_string()))?),
            None => None,
        };

        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let max = kvm.get_max_vcpus();
        if usize::from(vcpu_count) > max {
            return Err(VmmError::TooManyVcpus {
                asked: vcpu_count,
                max,
            });
        }
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

        let memory = memory::create_guest_memory(config.machine.memory_bytes)?;
        memory::register_with_kvm(&vm_fd, &memory, 0)?;

        // Devices.
        let exit = Arc::new(ExitState::new().map_err(|source| VmmError::Io {
            what: "eventfd",
            source,
        })?);
        let io_err = |what| move |source| VmmError::Io { what, source };
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let drained = Arc::new(InputDrained(
            EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?,
        ));
        let serial = Arc::new(Mutex::new(Serial::new(
            serial_irq,
            drained.clone(),
            serial_output(&config.serial)?,
        )));
        let i8042 = Arc::new(Mutex::new(
            I8042::new(exit.clone()).map_err(io_err("eventfd"))?,
        ));
        let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(exit.clone())));
        let mut pio = BusBuilder::new();
        pio.insert(serial.clone(), COM1_BASE, COM1_LEN)?;
        pio.insert(i8042, I8042_BASE, I8042_LEN)?;
        pio.insert(acpi_pm, ACPI_PM_BASE, ACPI_PM_LEN)?;
        let pio: Arc<Bus> = Arc::new(pio.build());

        // virtio-net devices, one MMIO window and GSI each.
        let mut mmio = BusBuilder::new();
        let mut virtio_devices = Vec::new();
        let mut nets = Vec::new();
        for (i, (id, mac, net)) in resolve_nets(&config.nets)?.into_iter().enumerate() {
            let dev = VirtioMmioDevice {
                base: VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE,
                size: VIRTIO_MMIO_SIZE,
                irq: VIRTIO_IRQ_BASE + i as u32,
            };
            if dev.irq > IRQ_MAX {
                return Err(VmmError::TooManyDevices(i + 1));
            }
            let tap = net::Tap::open(&net.tap)?;
            let device = Net::new(NetOptions {
                id,
                tap,
                mac,
                guest_announce: net.guest_announce,
            })
            .map_err(io_err("eventfd"))?;
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
            vm_fd
                .register_irqfd(&irqfd, dev.irq)
                .map_err(kvm_err("KVM_IRQFD (virtio)"))?;
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
            .map_err(|e| VmmError::Virtio(format!("{e:?}")))?;
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(transport.clone(), dev.base, dev.size)?;
            virtio_devices.push(dev);
            nets.push(transport);
        }
        let mmio: Arc<Bus> = Arc::new(mmio.build());

        // Boot data.
        let kernel = boot::load_kernel(&memory, &config.boot.kernel)?;
        let (cmdline_max, initrd_max) = match kernel.protocol {
            BootProtocol::Linux64 { header } => (
                boot::linux::cmdline_limit(header),
                boot::linux::initrd_addr_max(header),
            ),
            BootProtocol::Pvh => (CMDLINE_MAX_SIZE, MMIO_GAP_START - 1),
        };
        let initrd = match &config.boot.initrd {
            Some(path) => Some(boot::load_initrd(&memory, path, kernel.end, initrd_max)?),
            None => None,
        };
        let cmdline = full_cmdline(config, &virtio_devices);
        boot::write_cmdline(&memory, &cmdline, cmdline_max)?;
        let rsdp = crate::acpi::write(&memory, vcpu_count, &virtio_devices)?;
        crate::mptable::write(&memory, vcpu_count)?;
        match kernel.protocol {
            BootProtocol::Linux64 { header } => boot::linux::write_zero_page(
                &memory,
                header,
                cmdline.len(),
                initrd,
                rsdp,
                config.machine.memory_bytes,
            )?,
            BootProtocol::Pvh => {
                boot::pvh::write_start_info(&memory, initrd, rsdp, config.machine.memory_bytes)?
            }
        }

        // vCPUs.
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(cpu::CpuError::SupportedCpuid)?;
        let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));
        let mut controls = Vec::with_capacity(usize::from(vcpu_count));
        for id in 0..vcpu_count {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let mut cpuid = supported.clone();
            cpuid::patch(&mut cpuid, id, vcpu_count, kind);
            fd.set_cpuid2(&cpuid).map_err(cpu::CpuError::SetCpuid)?;
            msr::setup(&fd)?;
            regs::setup_fpu(&fd)?;
            regs::setup_lapic(&fd)?;
            if id == 0 {
                configure_boot_vcpu(&memory, &fd, &kernel)?;
            }
            // Every vCPU waits parked until the VM is started (at once, or
            // at `cont` with -S).
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

        Ok(Self {
            _kvm: kvm,
            _vm_fd: vm_fd,
            _memory: memory,
            vcpus,
            controls,
            serial,
            drained,
            exit,
            stdio_console: config.serial == SerialConfig::Stdio,
            nets,
            qmp,
            start_paused: config.start_paused,
        })
    }

    /// Runs the guest until it powers off, resets, fails, or the user or
    /// a signal ends it.
    pub fn run(mut self) -> Result<VmExit, VmmError> {
        vcpu::register_kick_handler().map_err(|e| VmmError::Io {
            what: "kick signal handler",
            source: e.into(),
        })?;
        let signals =
            Arc::new(
                EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::Io {
                    what: "eventfd",
                    source,
                })?,
            );
        install_termination_handlers(&signals)?;

        let _raw_terminal = if self.stdio_console {
            RawTerminal::enable(libc::STDIN_FILENO).map_err(|source| VmmError::Io {
                what: "terminal raw mode",
                source,
            })?
        } else {
            None
        };

        let mut event_manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(|e| VmmError::EventLoop(format!("{e:?}")))?;
        event_manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
            exit: self.exit.clone(),
            signals,
        })));
        if self.stdio_console {
            event_manager.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
                libc::STDIN_FILENO,
                _raw_terminal.is_some(),
                self.serial.clone(),
                self.drained.clone(),
                self.exit.clone(),
            ))));
        }

        for net in &self.nets {
            event_manager.add_subscriber(Arc::new(Mutex::new(NetEventHandler::new(net.clone()))));
        }

        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for vcpu in self.vcpus.drain(..) {
            let name = format!("ferry-vcpu-{}", vcpu.id);
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || vcpu.run_loop())
                .map_err(|source| VmmError::Io {
                    what: "spawn vCPU thread",
                    source,
                })?;
            threads.push(handle);
        }

        let runstate = Arc::new(Mutex::new(RunStateMachine::new(RunState::Prelaunch)));
        let emitter = EventEmitter::new().map_err(|e| VmmError::Qmp(e.to_string()))?;
        let control = VmControl::new(
            runstate.clone(),
            self.controls.clone(),
            self.nets.clone(),
            self.exit.clone(),
            emitter.clone(),
        );
        let qmp = match self.qmp.take() {
            Some(listener) => {
                let server = QmpServer::new(listener, COMMANDS, control.clone(), emitter.clone())
                    .map_err(|e| VmmError::Qmp(e.to_string()))?;
                let server = Arc::new(Mutex::new(server));
                event_manager.add_subscriber(server.clone());
                Some(server)
            }
            None => None,
        };
        if !self.start_paused {
            control.start().map_err(|e| VmmError::Qmp(e.to_string()))?;
        }

        let reason = loop {
            if let Some(reason) = self.exit.reason() {
                break reason;
            }
            if let Err(e) = event_manager.run() {
                break VmExit::VcpuError {
                    vcpu: 0,
                    detail: format!("event loop: {e:?}"),
                };
            }
        };

        for control in &self.controls {
            control.set(VcpuCommand::Exit);
            control.kick();
        }
        for handle in threads {
            let _ = handle.join();
        }
        let end_state = match reason {
            VmExit::InternalError { .. }
            | VmExit::EntryFailure { .. }
            | VmExit::VcpuError { .. } => RunState::InternalError,
            _ => RunState::Shutdown,
        };
        if let Err(e) = devices::bus::lock(&runstate).transition(end_state) {
            log::debug!("at exit: {e}");
        }
        let (guest, cause) = reason.shutdown_cause();
        emitter.emit(
            "SHUTDOWN",
            Some(serde_json::json!({ "guest": guest, "reason": cause })),
        );
        if let Some(server) = qmp {
            // Deliver the last replies and SHUTDOWN before the socket goes.
            let mut server = devices::bus::lock(&server);
            server.flush_all(std::time::Duration::from_millis(500));
        }
        Ok(reason)
    }
}

fn configure_boot_vcpu(
    memory: &GuestMemoryMmap,
    fd: &kvm_ioctls::VcpuFd,
    kernel: &LoadedKernel,
) -> Result<(), cpu::CpuError> {
    regs::setup_sregs(memory, fd, &kernel.protocol)?;
    regs::setup_regs(fd, kernel.entry.0, &kernel.protocol)
}

/// Wakes the event loop on vCPU exits and termination signals.
struct ExitWatcher {
    exit: Arc<ExitState>,
    signals: Arc<EventFd>,
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.exit.evt, &*self.signals] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                log::error!("cannot watch exit events: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.signals.as_raw_fd() {
            let _ = self.signals.read();
            self.exit
                .record(VmExit::Signal(LAST_SIGNAL.load(Ordering::Relaxed)));
        } else {
            let _ = self.exit.evt.read();
        }
    }
}

static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn handle_termination(
    signum: libc::c_int,
    _: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    LAST_SIGNAL.store(signum, Ordering::Relaxed);
    let fd = SIGNAL_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) on an eventfd is async-signal-safe; the buffer
        // is a live u64.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// SIGTERM, SIGINT and SIGHUP end the VM through the event loop, so the
/// terminal is restored and the exit is reported like any other.
fn install_termination_handlers(evt: &Arc<EventFd>) -> Result<(), VmmError> {
    SIGNAL_FD.store(evt.as_raw_fd(), Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        vmm_sys_util::signal::register_signal_handler(sig, handle_termination).map_err(|e| {
            VmmError::Io {
                what: "signal handler",
                source: e.into(),
            }
        })?;
    }
    Ok(())
}
