//! The migration's QMP commands (QEMU's names): `migrate`,
//! `migrate_cancel`, `query-migrate`, the parameters and capabilities.
//! They drive the VM through [`VmControl`]; control.rs knows nothing of
//! migration.

use std::sync::{Arc, Mutex};

use devices::bus::lock;
use serde_json::{json, Map, Value};

use super::job::{MigrationJob, MigrationParameters, MigrationStatus};
use crate::control::VmControl;
use crate::qmp::{ArgSpec, ArgType, CommandSpec, QmpError};
use crate::runstate::RunState;

pub const COMMANDS: &[CommandSpec] = &[
    CommandSpec::new(
        "migrate",
        &[
            ArgSpec::required("uri", ArgType::String),
            ArgSpec::optional("detach", ArgType::Bool),
            ArgSpec::optional("blk", ArgType::Bool),
            ArgSpec::optional("inc", ArgType::Bool),
            ArgSpec::optional("resume", ArgType::Bool),
        ],
    ),
    CommandSpec::no_args("migrate_cancel"),
    CommandSpec::no_args("query-migrate"),
    CommandSpec::new(
        "migrate-set-parameters",
        &[
            ArgSpec::optional("downtime-limit", ArgType::Int),
            ArgSpec::optional("max-bandwidth", ArgType::Int),
            ArgSpec::optional("announce-initial", ArgType::Int),
            ArgSpec::optional("announce-max", ArgType::Int),
            ArgSpec::optional("announce-rounds", ArgType::Int),
            ArgSpec::optional("announce-step", ArgType::Int),
            ArgSpec::optional("x-max-passes", ArgType::Int),
            ArgSpec::optional("backend-transfer", ArgType::Bool),
            ArgSpec::optional("throttle-trigger-threshold", ArgType::Int),
            ArgSpec::optional("cpu-throttle-initial", ArgType::Int),
            ArgSpec::optional("cpu-throttle-increment", ArgType::Int),
            ArgSpec::optional("max-cpu-throttle", ArgType::Int),
        ],
    ),
    CommandSpec::no_args("query-migrate-parameters"),
    CommandSpec::new(
        "migrate-set-capabilities",
        &[ArgSpec::required("capabilities", ArgType::Array)],
    ),
    CommandSpec::no_args("query-migrate-capabilities"),
];

/// The migration parameters and the last (or current) migration.
#[derive(Default)]
pub struct Migrations {
    pub params: MigrationParameters,
    job: Option<Arc<MigrationJob>>,
}

impl Migrations {
    /// Starts a migration with `start` (which spawns its thread) unless
    /// one is in progress. A migration that could not start is failed at
    /// once, so the next `migrate` is not refused as "in progress".
    pub fn begin(
        &mut self,
        start: impl FnOnce(Arc<MigrationJob>) -> std::io::Result<()>,
    ) -> Result<(), QmpError> {
        if self.job.as_ref().is_some_and(|j| !j.status().is_finished()) {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        let job = Arc::new(MigrationJob::new());
        self.job = Some(job.clone());
        start(job.clone()).map_err(|e| {
            let why = format!("cannot start the migration thread: {e}");
            job.update(|i| {
                i.status = MigrationStatus::Failed;
                i.total_time_ms = Some(0);
                i.error = Some(why.clone());
            });
            QmpError::generic(why)
        })
    }

    pub fn job(&self) -> Option<&Arc<MigrationJob>> {
        self.job.as_ref()
    }
}

/// The commands above, for one VM.
#[derive(Clone)]
pub struct MigrationCommands {
    control: VmControl,
    migrations: Arc<Mutex<Migrations>>,
}

impl MigrationCommands {
    /// The announce parameters start as the control's (an incoming
    /// VM's: the source's).
    pub fn new(control: VmControl) -> Self {
        let mut migrations = Migrations::default();
        migrations.params.set_announce(control.announce_params());
        Self {
            control,
            migrations: Arc::new(Mutex::new(migrations)),
        }
    }

    /// `None`: not a migration command.
    pub fn execute(
        &self,
        command: &str,
        args: &Map<String, Value>,
    ) -> Option<Result<Value, QmpError>> {
        let mut m = lock(&self.migrations);
        Some(match command {
            "migrate" => self.migrate(&mut m, args),
            "migrate_cancel" => {
                if let Some(job) = m.job().filter(|j| !j.status().is_finished()) {
                    job.cancel();
                }
                Ok(json!({}))
            }
            "query-migrate" => Ok(m.job().map_or(json!({}), |j| j.to_qmp())),
            "migrate-set-parameters" => m.params.apply(args).map(|()| {
                // The destination announces with these after a migration.
                self.control.set_announce_params(m.params.announce());
                json!({})
            }),
            "query-migrate-parameters" => Ok(m.params.to_qmp()),
            "migrate-set-capabilities" => {
                let list = args.get("capabilities").and_then(Value::as_array);
                m.params
                    .apply_capabilities(list.map_or(&[], |l| l.as_slice()))
                    .map(|()| json!({}))
            }
            "query-migrate-capabilities" => Ok(m.params.capabilities_to_qmp()),
            _ => return None,
        })
    }

    fn migrate(&self, m: &mut Migrations, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let uri: migration::MigrationUri = args
            .get("uri")
            .and_then(Value::as_str)
            .unwrap_or("")
            .parse()
            .map_err(|e: migration::UriError| QmpError::generic(e.to_string()))?;
        let state = self.control.state();
        if !matches!(state, RunState::Running | RunState::Paused) {
            return Err(QmpError::generic(format!(
                "cannot migrate a VM in state {state}"
            )));
        }
        if m.params.backend_transfer && !uri.can_pass_fds() {
            return Err(QmpError::generic(format!(
                "backend-transfer hands over file descriptors, which only a unix: migration can carry (not {}:)",
                uri.scheme()
            )));
        }
        let params = m.params.clone();
        let control = self.control.clone();
        m.begin(|job| {
            // A new migration cancels an announce still in flight.
            lock(&control.announcer).cancel_all();
            super::source::spawn(control, uri, params, job)
        })?;
        Ok(json!({}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migration_that_cannot_start_does_not_block_the_next() {
        let mut m = Migrations::default();
        let e = m
            .begin(|_| Err(std::io::Error::from_raw_os_error(libc::EAGAIN)))
            .unwrap_err();
        assert!(
            e.desc.contains("cannot start the migration thread"),
            "{}",
            e.desc
        );
        let job = m.job().unwrap().to_qmp();
        assert_eq!(job["status"], "failed", "{job}");
        assert!(job["error-desc"]
            .as_str()
            .unwrap()
            .contains("migration thread"));
        // The next one starts.
        m.begin(|_| Ok(())).unwrap();
        assert_eq!(m.job().unwrap().status(), MigrationStatus::Setup);
        // And while it runs, another is refused.
        let e = m.begin(|_| Ok(())).unwrap_err();
        assert!(e.desc.contains("in progress"), "{}", e.desc);
    }
}
