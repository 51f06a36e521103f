//! Every QMP command a VM answers: the run-state ones (control.rs) and
//! the migration ones (migrate/qmp.rs), behind one handler.

use serde_json::{Map, Value};

use crate::control::{self, VmControl};
use crate::migrate::qmp::{self as migration_qmp, MigrationCommands};
use crate::qmp::{CommandSpec, QmpError, QmpHandler};

/// The schema of every command (the server adds qmp_capabilities,
/// query-commands and query-version).
pub fn all() -> Vec<CommandSpec> {
    [control::COMMANDS, migration_qmp::COMMANDS].concat()
}

#[derive(Clone)]
pub struct VmCommands {
    control: VmControl,
    migration: MigrationCommands,
}

impl VmCommands {
    pub fn new(control: VmControl) -> Self {
        let migration = MigrationCommands::new(control.clone());
        Self { control, migration }
    }
}

impl QmpHandler for VmCommands {
    fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match self.migration.execute(command, args) {
            Some(answer) => answer,
            None => self.control.execute(command, args),
        }
    }
}
