//! A VM from its configuration to its end: built and booted (or filled
//! from an incoming migration), then run on the event loop until the guest
//! or a user ends it.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::virtio::net::NetEventHandler;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::announce::{Announcer, AnnouncerHandler, SharedNic};
use crate::builder::{self, VmParts};
use crate::check::{kvm_kind, KvmKind};
use crate::commands::Configured;
use crate::config::{resolve_nets, SerialConfig, VmConfig};
use crate::console::{ConsoleInput, RawTerminal};
use crate::control::VmControl;
use crate::exit::{ExitState, VmExit};
use crate::migrate::arriving::{QmpEndpoint, SharedServer};
use crate::qmp::{EventEmitter, QmpListener, QmpSocketSpec};
use crate::runstate::{RunState, RunStateMachine};
use crate::vcpu::{self, Vcpu, VcpuCommand};
use crate::{boot, VmmError};

/// A machine built and ready to run.
pub struct Vm {
    pub(crate) parts: Arc<VmParts>,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) runstate: Arc<Mutex<RunStateMachine>>,
    pub(crate) stdio_console: bool,
    pub(crate) qmp: Option<QmpEndpoint>,
    pub(crate) start_paused: bool,
    /// The announce schedule an incoming migration brought.
    pub(crate) announce: Option<net::AnnounceParams>,
    /// What QMP set up before the VM arrived (parameters, objects).
    pub(crate) configured: Configured,
    /// The source asked for the destination's report, and where it goes
    /// (crate::migrate::report).
    pub(crate) report_wanted: bool,
    pub(crate) report_to: Option<crate::migrate::report::ReportTo>,
    /// The source forwards frames after the ACK, for up to this many ms
    /// (crate::migrate::forward).
    pub(crate) forward_frames_ms: Option<u64>,
    /// `--seccomp`: installed as the VM starts to run.
    pub(crate) seccomp: crate::seccomp::SeccompMode,
}

/// Binds the control socket: a bad --qmp fails before anything is built.
pub(crate) fn bind_qmp_spec(spec: Option<&QmpSocketSpec>) -> Result<Option<QmpListener>, VmmError> {
    Ok(spec.map(QmpListener::bind).transpose()?)
}

impl Vm {
    /// Builds the machine and boots the kernel of `config`.
    pub fn new(config: &VmConfig) -> Result<Self, VmmError> {
        config.machine.validate()?;
        let kind = kvm_kind();
        if kind == KvmKind::Pvm
            && !config.allow_no_userspace
            && boot::is_linux_kernel(&config.boot.kernel)?
        {
            return Err(VmmError::LinuxNeedsHardwareVirt);
        }
        let qmp = bind_qmp_spec(config.qmp.as_ref())?;
        let nets = resolve_nets(&config.nets)?;
        let host = builder::HostBackends {
            memory: config.memory_backend,
            ..Default::default()
        };
        let machine = builder::build(&config.machine, &nets, &config.serial, kind, host)?;
        if config.memory_backend == crate::memory::MemoryBackend::Anonymous {
            crate::memory::advise_huge_pages(&machine.parts.memory);
        }
        builder::boot(&machine, &config.boot)?;
        Ok(Self {
            parts: Arc::new(machine.parts),
            vcpus: machine.vcpus,
            runstate: Arc::new(Mutex::new(RunStateMachine::new(RunState::Prelaunch))),
            stdio_console: config.serial == SerialConfig::Stdio,
            qmp: qmp.map(QmpEndpoint::Bound),
            start_paused: config.start_paused,
            announce: None,
            configured: Configured::with_objects(config.objects.clone()),
            report_wanted: false,
            report_to: None,
            forward_frames_ms: None,
            seccomp: Default::default(),
        })
    }

    /// `--seccomp`: what [`Vm::run`] installs once the VM is set up.
    pub fn set_seccomp(&mut self, mode: crate::seccomp::SeccompMode) {
        self.seccomp = mode;
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

        let parts = self.parts.clone();
        let mut event_manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(VmmError::EventLoop)?;
        event_manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
            exit: parts.exit.clone(),
            signals,
        })));
        if self.stdio_console {
            event_manager.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
                libc::STDIN_FILENO,
                _raw_terminal.is_some(),
                parts.serial.clone(),
                parts.drained.clone(),
                parts.exit.clone(),
            ))));
        }

        for net in &parts.nets {
            event_manager.add_subscriber(Arc::new(Mutex::new(NetEventHandler::new(net.clone()))));
        }

        // Set up: from here on no capability, and only the calls a
        // running VM makes.
        parts.wait_for_memslots()?;
        crate::privileges::drop_all()?;
        // Threads made from here on have no capability either.
        devices::legacy::Serial::start_output(&parts.serial).map_err(|source| VmmError::Io {
            what: "console writer thread",
            source,
        })?;
        crate::seccomp::install_process(crate::seccomp::ThreadKind::Process, self.seccomp)?;
        let threads = spawn_vcpus(self.vcpus.drain(..), self.seccomp)?;

        let runstate = self.runstate.clone();
        let nics = parts.nets.iter().map(|n| n.clone() as SharedNic).collect();
        let announcer = Announcer::new(nics).map_err(|source| VmmError::Io {
            what: "announce timer",
            source,
        })?;
        let announcer = Arc::new(Mutex::new(announcer));
        event_manager.add_subscriber(Arc::new(Mutex::new(AnnouncerHandler::new(
            announcer.clone(),
        ))));
        let announce = self.announce;
        if let Some(to) = self.report_to.take() {
            crate::migrate::report::spawn(to, announcer.clone(), parts.clone());
        }
        let make_control = |emitter: &EventEmitter| {
            for net in &parts.nets {
                let emitter = emitter.clone();
                let notify: devices::virtio::net::RxFilterNotify = Arc::new(move |id: &str| {
                    emitter.emit(
                        "NIC_RX_FILTER_CHANGED",
                        Some(serde_json::json!({
                            "name": id,
                            "path": format!("/machine/peripheral/{id}"),
                        })),
                    )
                });
                devices::bus::lock(net)
                    .device_mut()
                    .set_rx_filter_notify(notify);
            }
            let control =
                VmControl::new(parts.clone(), runstate.clone(), emitter.clone(), announcer);
            if let Some(params) = announce {
                control.set_announce_params(params);
            }
            control
        };
        // The control socket: bound now, or served since the VM began to
        // arrive (its clients stay connected).
        let (control, qmp, emitter) = match self.qmp.take() {
            Some(endpoint) => {
                let (server, control) =
                    endpoint.into_server(self.configured.clone(), make_control)?;
                event_manager.add_subscriber(server.clone());
                let emitter = devices::bus::lock(&server).emitter().clone();
                (control, Some(server), emitter)
            }
            None => {
                let emitter = EventEmitter::new()?;
                (make_control(&emitter), None, emitter)
            }
        };
        if !self.start_paused {
            control.start()?;
        }

        let migrations = self.configured.migrations.clone();
        let forwarding = move || {
            devices::bus::lock(&migrations)
                .job()
                .is_some_and(|j| j.forwarding())
        };
        let mut drain_until = None;
        let reason = loop {
            if let Some(reason) = parts.exit.reason() {
                // A source still forwarding frames to where its guest runs
                // now (migrate::forward) ends when that does: its event
                // loop reads the TAPs. Bounded by the forwarding's own.
                let until = *drain_until.get_or_insert_with(|| {
                    std::time::Instant::now() + crate::migrate::forward::EXIT_WAIT
                });
                if !forwarding() || std::time::Instant::now() >= until {
                    break reason;
                }
                let _ = event_manager.run_with_timeout(10);
                continue;
            }
            if let Err(e) = event_manager.run() {
                break VmExit::VcpuError {
                    vcpu: 0,
                    detail: format!("event loop: {e:?}"),
                };
            }
        };

        for control in &parts.vcpus {
            control.set(VcpuCommand::Exit);
            control.kick();
        }
        for handle in threads {
            let _ = handle.join();
        }
        // What the guest wrote last reaches the console before Ferry ends
        // (not forever, for a reader that stopped reading).
        let queue = devices::bus::lock(&parts.serial).output_queue();
        if let Some(q) = queue {
            q.flush(std::time::Duration::from_secs(2));
        }
        shut_down(&reason, &runstate, &emitter, qmp.as_ref());
        Ok(reason)
    }
}

fn spawn_vcpus(
    vcpus: impl Iterator<Item = Vcpu>,
    seccomp: crate::seccomp::SeccompMode,
) -> Result<Vec<JoinHandle<()>>, VmmError> {
    vcpus
        .map(|vcpu| {
            std::thread::Builder::new()
                .name(format!("ferry-vcpu-{}", vcpu.id))
                .spawn(move || {
                    // Its own filter, narrower than the process's; should
                    // it fail, the process's still holds.
                    if let Err(e) = crate::seccomp::install_vcpu(seccomp) {
                        log::error!("vCPU {}: {e}", vcpu.id);
                    }
                    vcpu.run_loop()
                })
                .map_err(|source| VmmError::Io {
                    what: "spawn vCPU thread",
                    source,
                })
        })
        .collect()
}

/// The VM has ended (`reason`), its vCPUs joined: the final run state,
/// SHUTDOWN to every QMP client, and their last replies out before the
/// socket goes.
fn shut_down(
    reason: &VmExit,
    runstate: &Mutex<RunStateMachine>,
    emitter: &EventEmitter,
    qmp: Option<&SharedServer>,
) {
    let end_state = match reason {
        VmExit::InternalError { .. } | VmExit::EntryFailure { .. } | VmExit::VcpuError { .. } => {
            RunState::InternalError
        }
        _ => RunState::Shutdown,
    };
    if let Err(e) = devices::bus::lock(runstate).transition(end_state) {
        log::debug!("at exit: {e}");
    }
    let (guest, cause) = reason.shutdown_cause();
    emitter.emit(
        "SHUTDOWN",
        Some(serde_json::json!({ "guest": guest, "reason": cause })),
    );
    if let Some(server) = qmp {
        devices::bus::lock(server).flush_all(std::time::Duration::from_millis(500));
    }
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
