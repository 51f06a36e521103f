//! One thread per vCPU: the KVM_RUN loop and what each exit means.
//!
//! Port and MMIO exits go to the device buses on this thread. A vCPU is
//! kicked out of KVM_RUN by a signal whose handler sets `immediate_exit`
//! in this thread's kvm_run, so a kick that lands just before KVM_RUN is
//! not lost.

use std::cell::Cell;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use devices::Bus;
use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::exit::{ExitState, VmExit};

/// KVM_INTERNAL_ERROR_EMULATION and the flag saying the instruction bytes
/// follow in `data`.
const INTERNAL_ERROR_EMULATION: u32 = 1;
const EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;
const INT3_OPCODE: u8 = 0xcc;
const BP_VECTOR: u8 = 3;
const FWAIT_OPCODE: u8 = 0x9b;

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set
        // before the thread first enters KVM_RUN and valid until the
        // thread ends; a byte store is async-signal-safe.
        unsafe { (*run).immediate_exit = 1 };
        fence(Ordering::Release);
    }
}

/// Installs the kick handler (process-wide, once).
pub fn register_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
}

/// What the VMM wants a vCPU thread to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuCommand {
    Run,
    Pause,
    Exit,
}

struct ControlState {
    command: VcpuCommand,
    /// The thread is waiting in `wait_runnable`, outside KVM_RUN.
    parked: bool,
    /// The thread has left its loop for good.
    exited: bool,
    /// The thread's pthread (for kicking) and kernel thread id.
    pthread: Option<libc::pthread_t>,
    tid: i32,
    /// Work to run on the vCPU's own thread while it is parked (state
    /// capture): KVM wants vCPU ioctls from the thread that runs it.
    job: Option<VcpuJob>,
    /// Time the thread owes a migration's CPU throttle: it sleeps that
    /// long at its next exit (crate::throttle).
    throttle_owed: std::time::Duration,
}

type VcpuJob = Box<dyn FnOnce(&VcpuFd) + Send>;

/// Shared between a vCPU thread and the VMM thread: the command, and the
/// thread's acknowledgment that it is parked.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl VcpuControl {
    pub fn new(initial: VcpuCommand) -> Self {
        Self {
            state: Mutex::new(ControlState {
                command: initial,
                parked: false,
                exited: false,
                pthread: None,
                tid: 0,
                job: None,
                throttle_owed: std::time::Duration::ZERO,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        devices::bus::lock(&self.state)
    }

    pub fn set(&self, command: VcpuCommand) {
        self.lock().command = command;
        self.changed.notify_all();
    }

    fn current(&self) -> VcpuCommand {
        self.lock().command
    }

    /// Interrupts KVM_RUN on the vCPU's thread (a no-op once it exited).
    pub fn kick(&self) {
        let state = self.lock();
        if let (Some(thread), false) = (state.pthread, state.exited) {
            // SAFETY: the thread is alive (not `exited`, checked under the
            // lock it takes before leaving) and the kick handler is
            // installed before any vCPU thread starts.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// Waits until the thread is parked or gone; false on timeout.
    pub fn wait_parked(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut state = self.lock();
        while !(state.parked || state.exited) {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }

    /// Makes the thread sleep `d` at its next exit (replacing what it
    /// owed); kick it to make that now.
    pub fn owe_sleep(&self, d: std::time::Duration) {
        self.lock().throttle_owed = d;
    }

    /// Sleeps what the throttle says this thread owes, cut short by any
    /// new command (a pause or exit must not wait behind a throttle).
    fn pay_throttle(&self) {
        let mut state = self.lock();
        let owed = std::mem::take(&mut state.throttle_owed);
        if owed.is_zero() {
            return;
        }
        let deadline = std::time::Instant::now() + owed;
        while state.command == VcpuCommand::Run {
            let now = std::time::Instant::now();
            if now >= deadline {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// The vCPU thread's kernel thread id (0 before it started).
    pub fn thread_id(&self) -> i32 {
        self.lock().tid
    }

    fn started(&self) {
        let mut state = self.lock();
        // SAFETY: pthread_self and gettid have no preconditions.
        state.pthread = Some(unsafe { libc::pthread_self() });
        // SAFETY: as above.
        state.tid = unsafe { libc::gettid() };
    }

    fn exited(&self) {
        self.lock().exited = true;
        self.changed.notify_all();
    }

    /// Runs `f` on the parked vCPU's thread and returns its result; None
    /// if the vCPU is not parked or does not answer within `timeout`.
    pub fn run_on_vcpu<T: Send + 'static>(
        &self,
        timeout: std::time::Duration,
        f: impl FnOnce(&VcpuFd) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut state = self.lock();
            if !state.parked || state.exited || state.command != VcpuCommand::Pause {
                return None;
            }
            state.job = Some(Box::new(move |fd| {
                let _ = tx.send(f(fd));
            }));
        }
        self.changed.notify_all();
        rx.recv_timeout(timeout).ok()
    }

    /// Blocks while paused, telling waiters it is parked and running jobs
    /// it is given; returns Run or Exit.
    fn wait_runnable(&self, fd: &VcpuFd) -> VcpuCommand {
        let mut state = self.lock();
        while state.command == VcpuCommand::Pause {
            if let Some(job) = state.job.take() {
                drop(state);
                job(fd);
                state = self.lock();
                continue;
            }
            if !state.parked {
                state.parked = true;
                self.changed.notify_all();
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.parked = false;
        state.command
    }
}

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitState>,
    control: Arc<VcpuControl>,
}

impl Vcpu {
    pub fn new(
        id: u8,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitState>,
        control: Arc<VcpuControl>,
    ) -> Self {
        Self {
            id,
            fd,
            pio,
            mmio,
            exit,
            control,
        }
    }

    /// The vCPU thread's body: run until told to exit or the VM ends.
    pub fn run_loop(mut self) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|r| r.set(run_ptr));
        self.control.started();
        loop {
            if self.control.wait_runnable(&self.fd) == VcpuCommand::Exit {
                break;
            }
            let step = match self.fd.run() {
                Ok(exit) => handle_exit(self.id, exit, &self.pio, &self.mmio),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked: clear the flag, sleep if a throttle asked,
                    // and look at the command again.
                    self.fd.set_kvm_immediate_exit(0);
                    self.control.pay_throttle();
                    Ok(())
                }
                Err(e) => Err(VmExit::VcpuError {
                    vcpu: self.id,
                    detail: format!("KVM_RUN: {e}"),
                }),
            };
            let step = match step {
                Err(VmExit::InternalError { detail, .. }) if self.fix_up_unemulated() => {
                    log::debug!(
                        "vcpu {}: completed an instruction KVM could not emulate ({detail})",
                        self.id
                    );
                    Ok(())
                }
                Err(VmExit::InternalError { detail, .. }) => {
                    Err(self.describe_internal_error(detail))
                }
                Err(VmExit::TripleFault { .. }) => {
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    Err(VmExit::TripleFault { vcpu: self.id, rip })
                }
                other => other,
            };
            if let Err(exit) = step {
                self.exit.record(exit);
                break;
            }
            if self.control.current() == VcpuCommand::Exit {
                break;
            }
        }
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
        self.control.exited();
    }

    fn internal_error(&mut self) -> (u32, Vec<u64>) {
        let run = self.fd.get_kvm_run();
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR, the `internal` member is
        // the active one of kvm_run's exit union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        (internal.suberror, internal.data[..n].to_vec())
    }

    /// The bytes of the instruction KVM failed to emulate, if it said.
    /// Layout (KVM API, emulation_failure): data[0] = flags, then one
    /// byte of instruction size followed by up to 15 instruction bytes.
    fn failed_instruction(&mut self) -> Option<Vec<u8>> {
        let (suberror, data) = self.internal_error();
        if suberror != INTERNAL_ERROR_EMULATION
            || data.first()? & EMULATION_FLAG_INSTRUCTION_BYTES == 0
        {
            return None;
        }
        let raw: Vec<u8> = data
            .get(1..3)?
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let len = usize::from(*raw.first()?).min(15);
        let mut bytes = raw[1..=len].to_vec();
        // kvm_pvm reports 15 bytes whatever the instruction's length;
        // trailing zeros are not part of it.
        while bytes.len() > 1 && bytes.last() == Some(&0) {
            bytes.pop();
        }
        Some(bytes)
    }

    /// Completes an instruction kvm_pvm's ring-0 emulator gave up on,
    /// when doing so needs nothing but registers: `int3` (Linux runs one
    /// as a self-test) raises #BP after it; `fwait` with no x87 exception
    /// pending is a no-op; `clac`/`stac` clear/set RFLAGS.AC. Anything
    /// else stays an error.
    fn fix_up_unemulated(&mut self) -> bool {
        const RFLAGS_AC: u64 = 1 << 18;
        let Some(bytes) = self.failed_instruction() else {
            return false;
        };
        let Ok(mut regs) = self.fd.get_regs() else {
            return false;
        };
        match bytes.as_slice() {
            [INT3_OPCODE, ..] => {
                let Ok(mut events) = self.fd.get_vcpu_events() else {
                    return false;
                };
                regs.rip += 1;
                events.exception.injected = 1;
                events.exception.nr = BP_VECTOR;
                events.exception.has_error_code = 0;
                self.fd.set_regs(&regs).is_ok() && self.fd.set_vcpu_events(&events).is_ok()
            }
            [FWAIT_OPCODE, ..] => {
                regs.rip += 1;
                self.fd.set_regs(&regs).is_ok()
            }
            [0x0f, 0x01, op @ (0xca | 0xcb), ..] => {
                regs.rflags = if *op == 0xca {
                    regs.rflags & !RFLAGS_AC
                } else {
                    regs.rflags | RFLAGS_AC
                };
                regs.rip += 3;
                self.fd.set_regs(&regs).is_ok()
            }
            _ => false,
        }
    }

    fn describe_internal_error(&mut self, fallback: String) -> VmExit {
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let (suberror, data) = self.internal_error();
        let detail = match self.failed_instruction() {
            Some(bytes) => {
                let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                format!(
                    "emulation failure at RIP {rip:#x}, instruction bytes [{}]",
                    hex.join(" ")
                )
            }
            None if suberror == INTERNAL_ERROR_EMULATION => {
                format!("emulation failure at RIP {rip:#x}")
            }
            None => format!("suberror {suberror} at RIP {rip:#x}, data {data:x?} ({fallback})"),
        };
        VmExit::InternalError {
            vcpu: self.id,
            detail,
        }
    }
}

fn handle_exit(id: u8, exit: VcpuExit<'_>, pio: &Bus, mmio: &Bus) -> Result<(), VmExit> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                data.fill(0);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            mmio.write(addr, data);
        }
        // With the in-kernel LAPIC, HLT waits in KVM; an exit here is spurious.
        VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => {}
        VcpuExit::Shutdown => return Err(VmExit::TripleFault { vcpu: id, rip: 0 }),
        VcpuExit::SystemEvent(kind, _) => {
            return Err(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                KVM_SYSTEM_EVENT_CRASH => VmExit::GuestCrash { vcpu: id },
                other => VmExit::VcpuError {
                    vcpu: id,
                    detail: format!("unknown system event {other}"),
                },
            })
        }
        VcpuExit::InternalError => {
            return Err(VmExit::InternalError {
                vcpu: id,
                detail: String::new(),
            })
        }
        VcpuExit::FailEntry(reason, _) => return Err(VmExit::EntryFailure { vcpu: id, reason }),
        other => {
            return Err(VmExit::VcpuError {
                vcpu: id,
                detail: format!("unexpected KVM exit {other:?}"),
            })
        }
    }
    Ok(())
}
