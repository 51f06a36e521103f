//! The migration's QMP commands (QEMU's names): `migrate`,
//! `migrate_cancel`, `query-migrate`, the parameters and capabilities.
//! They drive the VM through [`VmControl`]; control.rs knows nothing of
//! migration.

use std::sync::{Arc, Mutex};

use devices::bus::lock;
use serde_json::{json, Map, Value};

use super::job::{MigrationJob, MigrationStatus};
use super::params::MigrationParameters;
use crate::control::VmControl;
use crate::qmp::{ArgSpec, ArgType, CommandSpec, EventEmitter, QmpError};
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
    CommandSpec::new(
        "migrate-continue",
        &[ArgSpec::required("state", ArgType::String)],
    ),
    CommandSpec::new(
        "migrate-incoming",
        &[
            ArgSpec::required("uri", ArgType::String),
            ArgSpec::optional("channels", ArgType::Array),
        ],
    ),
    CommandSpec::no_args("query-migrate"),
    CommandSpec::no_args("x-ferry-query-migrate-timeline"),
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
            ArgSpec::optional("x-incoming-timeout", ArgType::Int),
            ArgSpec::optional("backend-transfer", ArgType::Bool),
            ArgSpec::optional("throttle-trigger-threshold", ArgType::Int),
            ArgSpec::optional("cpu-throttle-initial", ArgType::Int),
            ArgSpec::optional("cpu-throttle-increment", ArgType::Int),
            ArgSpec::optional("max-cpu-throttle", ArgType::Int),
            ArgSpec::optional("multifd-channels", ArgType::Int),
            ArgSpec::optional("x-forward-max-bytes", ArgType::Int),
            ArgSpec::optional("x-forward-max-time", ArgType::Int),
            ArgSpec::optional("tls-creds", ArgType::Any),
            ArgSpec::optional("tls-hostname", ArgType::Any),
            ArgSpec::optional("tls-authz", ArgType::Any),
        ],
    ),
    CommandSpec::no_args("query-migrate-parameters"),
    CommandSpec::new(
        "migrate-set-capabilities",
        &[ArgSpec::required("capabilities", ArgType::Array)],
    ),
    CommandSpec::no_args("query-migrate-capabilities"),
];

/// Whether this VM can be given `migrate-incoming` (QEMU's words when
/// it cannot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IncomingMode {
    /// Booted: no incoming migration at all.
    #[default]
    None,
    /// `--incoming URI`: listening already, nothing to defer.
    Uri,
    /// `--incoming defer`, still waiting for `migrate-incoming`.
    Deferred,
    /// `migrate-incoming` was given (or the VM has arrived since).
    Started,
}

/// The migration parameters and capabilities of this end, and the last
/// (or current) migration: outgoing, or the incoming one that brought
/// the VM here. Made before an incoming VM arrives, so what an
/// orchestrator sets while it waits stays set.
#[derive(Default)]
pub struct Migrations {
    pub params: MigrationParameters,
    job: Option<Arc<MigrationJob>>,
    pub incoming_mode: IncomingMode,
    /// A destination's listening address as QEMU's `query-migrate`
    /// reports it before the source connects (`socket-address`).
    pub listening: Option<Value>,
}

/// QEMU's SocketAddress for where a destination listens; `None` for a
/// file.
pub fn socket_address(uri: &migration::MigrationUri) -> Option<Value> {
    match uri {
        migration::MigrationUri::Tcp { host, port } => {
            let v6 = host.contains(':');
            let mut a = json!({ "type": "inet", "host": host, "port": port.to_string() });
            a[if v6 { "ipv6" } else { "ipv4" }] = json!(true);
            Some(a)
        }
        migration::MigrationUri::Unix(path) => {
            Some(json!({ "type": "unix", "path": path.display().to_string() }))
        }
        migration::MigrationUri::File(_) => None,
    }
}

pub type SharedMigrations = Arc<Mutex<Migrations>>;

impl Migrations {
    /// Starts a migration with `start` (which spawns its thread) unless
    /// one is in progress. A migration that could not start is failed at
    /// once, so the next `migrate` is not refused as "in progress".
    pub fn begin(
        &mut self,
        emitter: &EventEmitter,
        start: impl FnOnce(Arc<MigrationJob>) -> std::io::Result<()>,
    ) -> Result<(), QmpError> {
        self.refuse_if_active()?;
        let job = self.new_job(emitter);
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

    /// A job (in `setup`) that emits events when the `events`
    /// capability is on now; it is the one `query-migrate` reports.
    pub fn new_job(&mut self, emitter: &EventEmitter) -> Arc<MigrationJob> {
        let events = self.params.events.then(|| emitter.clone());
        let job = Arc::new(MigrationJob::new(events));
        self.job = Some(job.clone());
        job
    }

    fn refuse_if_active(&self) -> Result<(), QmpError> {
        if self.job.as_ref().is_some_and(|j| !j.status().is_finished()) {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        Ok(())
    }

    pub fn job(&self) -> Option<&Arc<MigrationJob>> {
        self.job.as_ref()
    }

    /// Why `migrate-incoming` cannot be given now (QEMU's words); `None`
    /// for a `--incoming defer` destination still waiting for it.
    pub fn incoming_refused(&self) -> Option<QmpError> {
        let why = match self.incoming_mode {
            IncomingMode::Deferred => return None,
            IncomingMode::None => "'-incoming' was not specified on the command line",
            IncomingMode::Uri => "For use with '-incoming defer'",
            IncomingMode::Started => "The incoming migration has already been started",
        };
        Some(QmpError::generic(why))
    }

    /// The MIGRATION event `status`, if the `events` capability is on.
    pub fn emit(&self, emitter: &EventEmitter, status: MigrationStatus) {
        if self.params.events {
            super::job::emit_status(emitter, status);
        }
    }

    /// The commands either end answers, before and after a VM arrives;
    /// `None`: not one of them.
    pub fn execute(
        &mut self,
        command: &str,
        args: &Map<String, Value>,
    ) -> Option<Result<Value, QmpError>> {
        let done = |r: Result<(), QmpError>| r.map(|()| json!({}));
        Some(match command {
            "migrate_cancel" => {
                if let Some(job) = self.job().filter(|j| !j.status().is_finished()) {
                    job.cancel();
                }
                Ok(json!({}))
            }
            "migrate-continue" => {
                let state = args.get("state").and_then(Value::as_str).unwrap_or("");
                match self.job() {
                    Some(job) => job.continue_from(state).map(|()| json!({})),
                    None => Err(QmpError::generic("Migration not in expected state: none")),
                }
            }
            "query-migrate" => Ok(match (self.job(), &self.listening) {
                (Some(j), _) => j.to_qmp(),
                (None, Some(a)) => json!({ "socket-address": [a] }),
                (None, None) => json!({}),
            }),
            // Ferry's own: the last migration's timeline (the timeline
            // crate's JSON), `{}` before any.
            "x-ferry-query-migrate-timeline" => match self.job() {
                Some(j) => {
                    serde_json::to_value(j.timeline()).map_err(|e| QmpError::generic(e.to_string()))
                }
                None => Ok(json!({})),
            },
            "migrate-set-parameters" => done(self.params.apply(args)),
            "query-migrate-parameters" => Ok(self.params.to_qmp()),
            "migrate-set-capabilities" => done(self.refuse_if_active().and_then(|()| {
                let list = args.get("capabilities").and_then(Value::as_array);
                self.params
                    .apply_capabilities(list.map_or(&[], |l| l.as_slice()))
            })),
            "query-migrate-capabilities" => Ok(self.params.capabilities_to_qmp()),
            "migrate-incoming" => Err(self
                .incoming_refused()
                .unwrap_or_else(|| QmpError::generic("migrate-incoming is the arriving VM's"))),
            _ => return None,
        })
    }
}

/// The commands above, for one VM.
#[derive(Clone)]
pub struct MigrationCommands {
    control: VmControl,
    migrations: SharedMigrations,
    /// Where `tls-creds` is looked up as a migration starts.
    objects: Arc<Mutex<crate::objects::Objects>>,
}

impl MigrationCommands {
    /// The announce schedule: this end's when an `announce-*` parameter
    /// was set here (before `migrate-incoming` too), else the control's
    /// (an incoming VM's: the source's, from the stream).
    pub fn new(
        control: VmControl,
        migrations: SharedMigrations,
        objects: Arc<Mutex<crate::objects::Objects>>,
    ) -> Self {
        {
            let mut m = lock(&migrations);
            if m.params.announce_set {
                control.set_announce_params(m.params.announce());
            } else {
                m.params.set_announce(control.announce_params());
            }
        }
        Self {
            control,
            migrations,
            objects,
        }
    }

    /// `None`: not a migration command.
    pub fn execute(
        &self,
        command: &str,
        args: &Map<String, Value>,
    ) -> Option<Result<Value, QmpError>> {
        let mut m = lock(&self.migrations);
        if command == "migrate" {
            return Some(self.migrate(&mut m, args));
        }
        let answer = m.execute(command, args)?;
        if command == "migrate-set-parameters" && answer.is_ok() {
            // The destination announces with these after a migration.
            self.control.set_announce_params(m.params.announce());
        }
        Some(answer)
    }

    fn migrate(&self, m: &mut Migrations, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let uri: migration::MigrationUri = args
            .get("uri")
            .and_then(Value::as_str)
            .unwrap_or("")
            .parse()
            .map_err(|e: migration::UriError| QmpError::generic(e.to_string()))?;
        let state = self.control.state();
        if !matches!(
            state,
            RunState::Running | RunState::Paused | RunState::PrelaunchMigrate
        ) {
            return Err(QmpError::generic(format!(
                "cannot migrate a VM in state {}",
                state.qmp_name()
            )));
        }
        if m.params.backend_transfer && !uri.can_pass_fds() {
            return Err(QmpError::generic(format!(
                "backend-transfer hands over file descriptors, which only a unix: migration can carry (not {}:)",
                uri.scheme()
            )));
        }
        let params = m.params.clone();
        // A wrong or unreadable tls-creds fails the migration (not the
        // command), as in QEMU.
        let tls = super::tls::client(&lock(&self.objects), &params, &uri);
        let control = self.control.clone();
        let emitter = control.emitter.clone();
        m.begin(&emitter, |job| {
            // A new migration cancels an announce still in flight.
            lock(&control.announcer).cancel_all();
            super::source::spawn(control, uri, params, tls, job)
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
        let emitter = EventEmitter::new().unwrap();
        let e = m
            .begin(&emitter, |_| {
                Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
            })
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
        m.begin(&emitter, |_| Ok(())).unwrap();
        assert_eq!(m.job().unwrap().status(), MigrationStatus::Setup);
        // And while it runs, another is refused.
        let e = m.begin(&emitter, |_| Ok(())).unwrap_err();
        assert!(e.desc.contains("in progress"), "{}", e.desc);
    }
}
