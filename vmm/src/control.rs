//! Controlling a running VM: pause and resume that mean it, the run-state
//! machine, and the QMP commands built on them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::acpi_ged::EVENT_POWER_BUTTON;
use devices::bus::lock;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::net::Net;
use net::Nic;
use serde_json::{json, Map, Value};

use crate::announce::Announcer;
use crate::builder::VmParts;
use crate::exit::VmExit;
use crate::qmp::{ArgSpec, ArgType, CommandSpec, EventEmitter, QmpError, QmpHandler};
use crate::runstate::{IllegalTransition, RunState, RunStateMachine};
use crate::vcpu::{VcpuCommand, VcpuControl};

/// How long a vCPU may take to leave KVM_RUN after a kick before `stop`
/// gives up and says so.
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Transition(#[from] IllegalTransition),
    #[error("vCPU {0} did not stop within {PARK_TIMEOUT:?}")]
    VcpuStuck(usize),
}

impl From<ControlError> for QmpError {
    fn from(e: ControlError) -> Self {
        QmpError::generic(e.to_string())
    }
}

/// What control reaches: the VM's parts, its run state, the event
/// emitter. Cheap to clone (QMP handler, migration thread).
#[derive(Clone)]
pub struct VmControl {
    pub(crate) parts: Arc<VmParts>,
    pub(crate) runstate: Arc<Mutex<RunStateMachine>>,
    pub(crate) emitter: EventEmitter,
    pub(crate) announcer: Arc<Mutex<Announcer>>,
    /// The announce schedule: of the announce after an incoming
    /// migration, and announce-self's defaults (the migration parameters
    /// `announce-*` set it).
    announce: Arc<Mutex<net::AnnounceParams>>,
}

impl VmControl {
    pub fn new(
        parts: Arc<VmParts>,
        runstate: Arc<Mutex<RunStateMachine>>,
        emitter: EventEmitter,
        announcer: Arc<Mutex<Announcer>>,
    ) -> Self {
        Self {
            parts,
            runstate,
            emitter,
            announcer,
            announce: Arc::default(),
        }
    }

    /// The announce schedule to use after an incoming migration.
    pub fn set_announce_params(&self, params: net::AnnounceParams) {
        *lock(&self.announce) = params;
    }

    pub fn announce_params(&self) -> net::AnnounceParams {
        *lock(&self.announce)
    }

    /// Moves to `to` without touching vCPUs or devices (they are already
    /// as `to` needs them: stopped for paused and postmigrate).
    pub fn set_state(&self, to: RunState) -> Result<RunState, ControlError> {
        Ok(lock(&self.runstate).transition(to)?)
    }

    fn vcpus(&self) -> &[Arc<VcpuControl>] {
        &self.parts.vcpus
    }

    fn nets(&self) -> &[Arc<Mutex<MmioTransport<Net>>>] {
        &self.parts.nets
    }

    pub fn state(&self) -> RunState {
        lock(&self.runstate).state()
    }

    /// Parks every vCPU outside KVM_RUN and stops device processing.
    /// Runs on the event-loop thread, so once it returns no device work
    /// is under way and none starts until [`VmControl::resume_vcpus`].
    fn pause_vcpus(&self) -> Result<(), ControlError> {
        for v in self.vcpus() {
            v.set(VcpuCommand::Pause);
            v.kick();
        }
        for (i, v) in self.vcpus().iter().enumerate() {
            if !v.wait_parked(PARK_TIMEOUT) {
                return Err(ControlError::VcpuStuck(i));
            }
        }
        for net in self.nets() {
            lock(net).device_mut().pause();
        }
        Ok(())
    }

    fn resume_vcpus(&self) {
        self.resume_devices();
        self.run_vcpus();
    }

    fn resume_devices(&self) {
        for net in self.nets() {
            lock(net).device_mut().resume();
        }
    }

    fn run_vcpus(&self) {
        for v in self.vcpus() {
            v.set(VcpuCommand::Run);
        }
    }

    /// running → `to` with everything stopped (paused, finish-migrate,
    /// save-vm). Emits STOP.
    pub fn stop_into(&self, to: RunState) -> Result<(), ControlError> {
        let mut rs = lock(&self.runstate);
        let from = rs.state();
        if !crate::runstate::allowed(from, to) {
            return Err(IllegalTransition { from, to }.into());
        }
        if from.is_running() {
            if let Err(e) = self.pause_vcpus() {
                // Leave nothing half-stopped.
                self.resume_vcpus();
                return Err(e);
            }
            self.emitter.emit("STOP", None);
        }
        rs.transition(to)?;
        Ok(())
    }

    /// Starts or resumes the guest. Emits RESUME. A guest that starts
    /// running on this host where the network last saw it elsewhere is
    /// announced at once: leaving prelaunch-migrate (it arrived by a
    /// migration or restore), and leaving postmigrate (the destination
    /// failed after taking it over, maybe after announcing it there, and
    /// an orchestrator resumes it here). No other start announces.
    pub fn start(&self) -> Result<(), ControlError> {
        let mut rs = lock(&self.runstate);
        let from = rs.transition(RunState::Running)?;
        self.resume_devices();
        if matches!(from, RunState::PrelaunchMigrate | RunState::Postmigrate) {
            // The first round goes out before the vCPUs run (QEMU too
            // announces before vm_start): a vCPU thread just woken on a
            // busy host must not get between its frames. For a guest
            // announce the config interrupt waits for the vCPU.
            let params = *lock(&self.announce);
            let mut a = lock(&self.announcer);
            let nics = a.nic_indexes(&[]).unwrap_or_default();
            a.start(crate::announce::MIGRATION_SCHEDULE, &nics, params);
        }
        self.run_vcpus();
        let _ = self.parts.started_at.set(std::time::Instant::now());
        drop(rs);
        self.emitter.emit("RESUME", None);
        Ok(())
    }

    fn qmp_announce_self(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut params = *lock(&self.announce);
        let int = |k: &str| args.get(k).and_then(Value::as_u64);
        if let Some(v) = int("initial") {
            params.initial_ms = v;
        }
        if let Some(v) = int("max") {
            params.max_ms = v;
        }
        if let Some(v) = int("rounds") {
            params.rounds = v;
        }
        if let Some(v) = int("step") {
            params.step_ms = v;
        }
        let interfaces: Vec<String> = match args.get("interfaces") {
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    QmpError::generic(
                        "Invalid parameter type for 'interfaces', expected: array of strings",
                    )
                })?,
            _ => Vec::new(),
        };
        let id = args.get("id").and_then(Value::as_str).unwrap_or("");
        let mut a = lock(&self.announcer);
        let nics = a
            .nic_indexes(&interfaces)
            .map_err(QmpError::device_not_found)?;
        a.start(id, &nics, params);
        Ok(json!({}))
    }

    fn qmp_stop(&self) -> Result<Value, QmpError> {
        // Not running: nothing to stop (QEMU does the same).
        if self.state() == RunState::Running {
            self.stop_into(RunState::Paused)?;
        }
        Ok(json!({}))
    }

    fn qmp_cont(&self) -> Result<Value, QmpError> {
        match self.state() {
            RunState::Running => Ok(json!({})),
            RunState::Shutdown | RunState::InternalError => Err(QmpError::generic(
                "Resetting the Virtual Machine is required",
            )),
            // QEMU's words for a stop before the switch-over.
            RunState::FinishMigrate => Err(QmpError::generic("Migration is not finalized yet")),
            RunState::SaveVm | RunState::RestoreVm | RunState::Inmigrate => {
                Err(QmpError::generic(format!(
                    "cannot continue while the VM is in state {}",
                    self.state().qmp_name()
                )))
            }
            // Postmigrate too, as QEMU: an orchestrator whose destination
            // failed after the stream completed resumes the guest here
            // (making sure the destination is gone is its job).
            _ => {
                self.start()?;
                Ok(json!({}))
            }
        }
    }

    fn query_cpus_fast(&self) -> Value {
        let cpus: Vec<Value> = self
            .vcpus()
            .iter()
            .enumerate()
            .map(|(i, v)| {
                json!({
                    "cpu-index": i,
                    "qom-path": format!("/machine/unattached/device[{i}]"),
                    "thread-id": v.thread_id(),
                    "target": "x86_64",
                    "props": { "node-id": 0, "socket-id": 0, "core-id": i, "thread-id": 0 },
                })
            })
            .collect();
        Value::Array(cpus)
    }

    /// QEMU's `query-rx-filter`: what each NIC's guest driver programmed.
    fn query_rx_filter(&self, name: Option<&str>) -> Result<Value, QmpError> {
        let mut out = Vec::new();
        for net in self.nets() {
            let mut t = lock(net);
            if name.is_some_and(|n| n != t.device().state().id) {
                continue;
            }
            // QEMU's rate rule: asking re-arms NIC_RX_FILTER_CHANGED.
            t.device_mut().rearm_rx_filter_notify();
            let dev = t.device();
            let s = dev.state();
            if name.is_some_and(|n| n != s.id) {
                continue;
            }
            let f = &s.rx_filter;
            let mode = |none: bool, all: bool| {
                if none {
                    "none"
                } else if all {
                    "all"
                } else {
                    "normal"
                }
            };
            let vlans = dev.vlans();
            out.push(json!({
                "name": s.id,
                "promiscuous": f.promisc,
                "multicast": mode(f.nomulti, f.allmulti),
                "unicast": mode(f.nouni, f.alluni),
                "vlan": if vlans.is_empty() { "all" } else { "normal" },
                "broadcast-allowed": !f.nobcast,
                "multicast-overflow": f.multicast_overflow,
                "unicast-overflow": f.unicast_overflow,
                "main-mac": s.mac.to_string(),
                "vlan-table": vlans,
                "unicast-table": f.unicast.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
                "multicast-table": f.multicast.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            }));
        }
        if let (Some(n), true) = (name, out.is_empty()) {
            return Err(QmpError::generic(format!("invalid net client name: {n}")));
        }
        Ok(Value::Array(out))
    }
}

/// The run-state commands (migrate/qmp.rs has the migration ones; the
/// server adds qmp_capabilities, query-commands and query-version).
pub const COMMANDS: &[CommandSpec] = &[
    CommandSpec::no_args("query-status"),
    CommandSpec::no_args("stop"),
    CommandSpec::no_args("cont"),
    CommandSpec::no_args("quit"),
    CommandSpec::no_args("system_reset"),
    CommandSpec::no_args("system_powerdown"),
    CommandSpec::no_args("query-cpus-fast"),
    CommandSpec::new(
        "query-rx-filter",
        &[ArgSpec::optional("name", ArgType::String)],
    ),
    CommandSpec::new(
        "announce-self",
        &[
            ArgSpec::optional("initial", ArgType::Int),
            ArgSpec::optional("max", ArgType::Int),
            ArgSpec::optional("rounds", ArgType::Int),
            ArgSpec::optional("step", ArgType::Int),
            ArgSpec::optional("interfaces", ArgType::Array),
            ArgSpec::optional("id", ArgType::String),
        ],
    ),
];

impl QmpHandler for VmControl {
    fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match command {
            "query-status" => {
                let state = self.state();
                Ok(
                    json!({ "status": state.qmp_name(), "running": state.is_running(), "singlestep": false }),
                )
            }
            "stop" => self.qmp_stop(),
            "cont" => self.qmp_cont(),
            "quit" => {
                self.parts.exit.record(VmExit::QmpQuit);
                Ok(json!({}))
            }
            "system_reset" => {
                self.emitter.emit(
                    "RESET",
                    Some(json!({ "guest": false, "reason": "host-qmp-system-reset" })),
                );
                self.parts.exit.record(VmExit::QmpReset);
                Ok(json!({}))
            }
            "system_powerdown" => {
                lock(&self.parts.ged)
                    .trigger(EVENT_POWER_BUTTON)
                    .map_err(|e| {
                        QmpError::generic(format!("cannot press the power button: {e}"))
                    })?;
                self.emitter.emit("POWERDOWN", None);
                Ok(json!({}))
            }
            "query-cpus-fast" => Ok(self.query_cpus_fast()),
            "query-rx-filter" => self.query_rx_filter(args.get("name").and_then(Value::as_str)),
            "announce-self" => self.qmp_announce_self(args),
            other => Err(QmpError::command_not_found(other)),
        }
    }
}
