//! Every QMP command a VM answers: the run-state ones (control.rs), the
//! migration ones (migrate/qmp.rs) and the objects (objects.rs), behind
//! one handler.

use std::sync::{Arc, Mutex};

use devices::bus::lock;
use serde_json::{Map, Value};

use crate::control::{self, VmControl};
use crate::migrate::qmp::{self as migration_qmp, MigrationCommands, SharedMigrations};
use crate::objects::{self, Objects};
use crate::qmp::{CommandSpec, QmpError, QmpHandler};

/// The schema of every command (the server adds qmp_capabilities,
/// query-commands and query-version).
pub fn all() -> Vec<CommandSpec> {
    [
        control::COMMANDS,
        migration_qmp::COMMANDS,
        objects::COMMANDS,
        &[CommandSpec::no_args(SECCOMP_TRIGGER)],
    ]
    .concat()
}

/// What an orchestrator configured on this end that outlives a handler:
/// made before an incoming VM arrives (`-incoming defer`), kept by the VM
/// once it has.
#[derive(Clone, Default)]
pub struct Configured {
    pub migrations: SharedMigrations,
    pub objects: Arc<Mutex<Objects>>,
}

impl Configured {
    /// Starting from the command line's `--object`s.
    pub fn with_objects(objects: Objects) -> Self {
        Self {
            objects: Arc::new(Mutex::new(objects)),
            ..Self::default()
        }
    }
}

#[derive(Clone)]
pub struct VmCommands {
    control: VmControl,
    migration: MigrationCommands,
    objects: Arc<Mutex<Objects>>,
}

impl VmCommands {
    pub fn new(control: VmControl, configured: Configured) -> Self {
        let migration = MigrationCommands::new(
            control.clone(),
            configured.migrations,
            configured.objects.clone(),
        );
        Self {
            control,
            migration,
            objects: configured.objects,
        }
    }
}

/// For the test that seccomp stops and reports a forbidden call: the
/// event loop's thread makes one (and the process ends, with `on`).
const SECCOMP_TRIGGER: &str = "x-ferry-seccomp-trigger";

impl QmpHandler for VmCommands {
    fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        if command == SECCOMP_TRIGGER {
            crate::seccomp::make_a_forbidden_call();
            return Ok(Value::Object(Map::new()));
        }
        if let Some(answer) = self.migration.execute(command, args) {
            return answer;
        }
        if let Some(answer) = lock(&self.objects).execute(command, args) {
            return answer;
        }
        self.control.execute(command, args)
    }
}
