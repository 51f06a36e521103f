//! Controlling a running VM: pause and resume that mean it, the run-state
//! machine, and the QMP commands built on them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::bus::lock;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::net::Net;
use net::Nic;
use serde_json::{json, Map, Value};

use crate::exit::{ExitState, VmExit};
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

/// The parts of a VM that control reaches: vCPUs, devices, run state.
#[derive(Clone)]
pub struct VmControl {
    runstate: Arc<Mutex<RunStateMachine>>,
    vcpus: Vec<Arc<VcpuControl>>,
    nets: Vec<Arc<Mutex<MmioTransport<Net>>>>,
    exit: Arc<ExitState>,
    emitter: EventEmitter,
}

impl VmControl {
    pub fn new(
        runstate: Arc<Mutex<RunStateMachine>>,
        vcpus: Vec<Arc<VcpuControl>>,
        nets: Vec<Arc<Mutex<MmioTransport<Net>>>>,
        exit: Arc<ExitState>,
        emitter: EventEmitter,
    ) -> Self {
        Self {
            runstate,
            vcpus,
            nets,
            exit,
            emitter,
        }
    }

    pub fn state(&self) -> RunState {
        lock(&self.runstate).state()
    }

    /// Parks every vCPU outside KVM_RUN and stops device processing.
    /// Runs on the event-loop thread, so once it returns no device work
    /// is under way and none starts until [`VmControl::resume_vcpus`].
    fn pause_vcpus(&self) -> Result<(), ControlError> {
        for v in &self.vcpus {
            v.set(VcpuCommand::Pause);
            v.kick();
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if !v.wait_parked(PARK_TIMEOUT) {
                return Err(ControlError::VcpuStuck(i));
            }
        }
        for net in &self.nets {
            lock(net).device_mut().pause();
        }
        Ok(())
    }

    fn resume_vcpus(&self) {
        for net in &self.nets {
            lock(net).device_mut().resume();
        }
        for v in &self.vcpus {
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

    /// Starts or resumes the guest. Emits RESUME.
    pub fn start(&self) -> Result<(), ControlError> {
        let mut rs = lock(&self.runstate);
        rs.transition(RunState::Running)?;
        self.resume_vcpus();
        self.emitter.emit("RESUME", None);
        Ok(())
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
            RunState::FinishMigrate
            | RunState::SaveVm
            | RunState::RestoreVm
            | RunState::Inmigrate => Err(QmpError::generic(format!(
                "cannot continue while the VM is in state {}",
                self.state()
            ))),
            _ => {
                self.start()?;
                Ok(json!({}))
            }
        }
    }

    fn query_cpus_fast(&self) -> Value {
        let cpus: Vec<Value> = self
            .vcpus
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
        for net in &self.nets {
            let t = lock(net);
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
            return Err(QmpError::device_not_found(format!(
                "network client {n} not found"
            )));
        }
        Ok(Value::Array(out))
    }
}

/// The VM commands Ferry answers (the server adds qmp_capabilities,
/// query-commands and query-version).
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
];

impl QmpHandler for VmControl {
    fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match command {
            "query-status" => {
                let state = self.state();
                Ok(json!({ "status": state.name(), "running": state.is_running(), "singlestep": false }))
            }
            "stop" => self.qmp_stop(),
            "cont" => self.qmp_cont(),
            "quit" => {
                self.exit.record(VmExit::QmpQuit);
                Ok(json!({}))
            }
            "system_reset" => {
                self.emitter.emit("RESET", Some(json!({ "guest": false, "reason": "host-qmp-system-reset" })));
                self.exit.record(VmExit::QmpReset);
                Ok(json!({}))
            }
            "system_powerdown" => Err(QmpError::generic(
                "Ferry's hardware-reduced ACPI machine has no power button; use quit, or power off from the guest",
            )),
            "query-cpus-fast" => Ok(self.query_cpus_fast()),
            "query-rx-filter" => self.query_rx_filter(args.get("name").and_then(Value::as_str)),
            other => Err(QmpError::command_not_found(other)),
        }
    }
}
