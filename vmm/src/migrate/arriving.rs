//! QMP while an incoming VM arrives (`inmigrate`): the destination's
//! control socket answers from the start, as QEMU's does, so an
//! orchestrator can set the migration up (`migrate-set-*`, `object-add`,
//! `migrate-incoming` for `--incoming defer`), watch the run state, or
//! give up with `quit` while the stream loads.
//!
//! The server runs on its own thread and event loop for as long as the
//! load takes; then it moves, with its connected clients, to the VM's
//! event loop and its handler becomes the VM's [`VmCommands`]. One socket,
//! one set of connections, from `inmigrate` to the end.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use serde_json::{json, Map, Value};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use devices::bus::lock;
use migration::{Listener, MigrationUri};

use super::error::IncomingError;
use super::job::MigrationStatus;
use super::qmp::IncomingMode;
use crate::commands::{self, Configured, VmCommands};
use crate::control::VmControl;
use crate::qmp::{EventEmitter, QmpError, QmpHandler, QmpListener, QmpServer};
use crate::VmmError;

/// Who answers QMP: the socket alone while the VM arrives, then the VM.
pub enum QmpTarget {
    Arriving(ArrivingCommands),
    Vm(VmCommands),
}

impl QmpHandler for QmpTarget {
    fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match self {
            QmpTarget::Vm(commands) => commands.execute(command, args),
            QmpTarget::Arriving(commands) => commands.execute(command, args),
        }
    }
}

/// What the QMP thread and the thread waiting for the VM share: a `quit`
/// (the eventfd beside the listener wakes the wait, a shutdown of the
/// connection cuts a load short), and the listener `migrate-incoming`
/// opened for `--incoming defer`.
pub struct Arrival {
    requested: AtomicBool,
    pub evt: EventFd,
    channel: Mutex<Option<Box<dyn migration::Channel>>>,
    listener: Mutex<Option<Listener>>,
    /// `cont` (true) or `stop` (false) while arriving; `None`: as `-S`
    /// says.
    autostart: Mutex<Option<bool>>,
}

impl Arrival {
    pub fn new() -> Result<Self, VmmError> {
        Ok(Self {
            requested: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::Io {
                what: "eventfd",
                source,
            })?,
            channel: Mutex::new(None),
            listener: Mutex::new(None),
            autostart: Mutex::new(None),
        })
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// The connection being loaded from, so a quit can cut it.
    pub fn watch(&self, channel: &dyn migration::Channel) {
        if let Ok(c) = channel.try_clone_box() {
            *lock(&self.channel) = Some(c);
        }
    }

    fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.evt.write(1);
        if let Some(c) = lock(&self.channel).as_ref() {
            let _ = c.shutdown();
        }
    }

    fn set_autostart(&self, start: bool) {
        *lock(&self.autostart) = Some(start);
    }

    /// Whether `cont`/`stop` while arriving overrode `-S`.
    pub fn autostart(&self) -> Option<bool> {
        *lock(&self.autostart)
    }

    fn listen(&self, listener: Listener) {
        *lock(&self.listener) = Some(listener);
        let _ = self.evt.write(1);
    }

    /// `--incoming defer`: blocks until `migrate-incoming` has opened a
    /// listener (`Some`) or a `quit` came (`None`).
    pub fn wait_for_listener(&self) -> Result<Option<Listener>, IncomingError> {
        loop {
            if self.requested() {
                return Ok(None);
            }
            if let Some(l) = lock(&self.listener).take() {
                return Ok(Some(l));
            }
            wait_readable(&[self.evt.as_raw_fd()])?;
            let _ = self.evt.read();
        }
    }
}

/// Blocks until one of `fds` is readable.
pub(crate) fn wait_readable(fds: &[RawFd]) -> Result<(), IncomingError> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `polls` is a live array of pollfds whose descriptors
        // the caller keeps open for the call.
        let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, -1) };
        if n >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(IncomingError::Wait(e));
        }
    }
}

/// QMP while the VM arrives: what an orchestrator sets up before the
/// stream (parameters, capabilities, objects, `migrate-incoming`), the
/// run state, `query-migrate`, `quit`.
pub struct ArrivingCommands {
    arrival: Arc<Arrival>,
    configured: Configured,
    emitter: EventEmitter,
}

impl ArrivingCommands {
    pub fn new(arrival: Arc<Arrival>, configured: Configured, emitter: EventEmitter) -> Self {
        Self {
            arrival,
            configured,
            emitter,
        }
    }

    fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match command {
            "query-status" => {
                return Ok(json!({ "status": "inmigrate", "running": false, "singlestep": false }))
            }
            "quit" => {
                self.arrival.request();
                return Ok(json!({}));
            }
            // As QEMU: while arriving, `cont` and `stop` decide whether the
            // guest starts once it has arrived (a guest paused on the
            // source stays paused either way).
            "cont" | "stop" => {
                self.arrival.set_autostart(command == "cont");
                return Ok(json!({}));
            }
            "migrate-incoming" => return self.migrate_incoming(args),
            "migrate" => return Err(QmpError::generic("cannot migrate a VM in state inmigrate")),
            _ => {}
        }
        if let Some(answer) = lock(&self.configured.migrations).execute(command, args) {
            return answer;
        }
        if let Some(answer) = lock(&self.configured.objects).execute(command, args) {
            return answer;
        }
        Err(QmpError::generic(format!(
            "'{command}' is not available while the VM is arriving (inmigrate); it is once the incoming migration has loaded"
        )))
    }

    /// Opens the listener here, so a bad or busy URI is this command's
    /// error; the waiting thread takes it from there.
    fn migrate_incoming(&mut self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut m = lock(&self.configured.migrations);
        if let Some(refused) = m.incoming_refused() {
            return Err(refused);
        }
        let uri = args.get("uri").and_then(Value::as_str).unwrap_or("");
        let uri: MigrationUri = uri
            .parse()
            .map_err(|e: migration::UriError| QmpError::generic(e.to_string()))?;
        let listener = Listener::bind(&uri).map_err(|source| {
            QmpError::generic(
                IncomingError::Listen {
                    uri: uri.to_string(),
                    source,
                }
                .to_string(),
            )
        })?;
        log::info!("migrate-incoming: listening on {}", listener.local_addr());
        m.incoming_mode = IncomingMode::Started;
        m.listening = super::qmp::socket_address(&listener.local_uri());
        // QEMU's destination says `setup` as it starts listening.
        m.emit(&self.emitter, MigrationStatus::Setup);
        self.arrival.listen(listener);
        Ok(json!({}))
    }
}

pub type SharedServer = Arc<Mutex<QmpServer<QmpTarget>>>;

/// The control socket of a VM: bound (nothing served yet), or served.
pub enum QmpEndpoint {
    Bound(QmpListener),
    Serving(SharedServer),
}

impl QmpEndpoint {
    /// The server, answered from now on by the VM's control that
    /// `control_for` makes with the server's event emitter (a server
    /// already serving keeps its clients), and that control.
    pub fn into_server(
        self,
        configured: Configured,
        control_for: impl FnOnce(&EventEmitter) -> VmControl,
    ) -> Result<(SharedServer, VmControl), VmmError> {
        match self {
            QmpEndpoint::Bound(listener) => {
                let emitter = EventEmitter::new()?;
                let control = control_for(&emitter);
                let target = QmpTarget::Vm(VmCommands::new(control.clone(), configured));
                let server = QmpServer::new(listener, &commands::all(), target, emitter)?;
                Ok((Arc::new(Mutex::new(server)), control))
            }
            QmpEndpoint::Serving(server) => {
                let control = {
                    let mut s = lock(&server);
                    let control = control_for(s.emitter());
                    *s.handler_mut() = QmpTarget::Vm(VmCommands::new(control.clone(), configured));
                    control
                };
                Ok((server, control))
            }
        }
    }
}

/// The arriving phase's server thread.
pub struct ArrivingQmp {
    server: SharedServer,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl ArrivingQmp {
    pub fn start(
        listener: QmpListener,
        arrival: Arc<Arrival>,
        configured: Configured,
    ) -> Result<Self, VmmError> {
        let emitter = EventEmitter::new()?;
        let target =
            QmpTarget::Arriving(ArrivingCommands::new(arrival, configured, emitter.clone()));
        let server = QmpServer::new(listener, &commands::all(), target, emitter)?;
        let server: SharedServer = Arc::new(Mutex::new(server));
        let stop = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::Io {
                what: "eventfd",
                source,
            })?,
        );
        let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(VmmError::EventLoop)?;
        em.add_subscriber(server.clone());
        let stopped = Arc::new(Mutex::new(StopWatch {
            evt: stop.clone(),
            stopped: false,
        }));
        em.add_subscriber(stopped.clone());
        let thread = std::thread::Builder::new()
            .name("ferry-qmp-in".into())
            .spawn(move || serve(em, &stopped))
            .map_err(|source| VmmError::Io {
                what: "QMP thread",
                source,
            })?;
        Ok(Self {
            server,
            stop,
            thread: Some(thread),
        })
    }

    /// The server's event emitter (the destination's MIGRATION events).
    pub fn emitter(&self) -> EventEmitter {
        lock(&self.server).emitter().clone()
    }

    /// Stops serving here; the server (and its clients) is the VM's now.
    pub fn hand_over(mut self) -> QmpEndpoint {
        self.finish();
        QmpEndpoint::Serving(self.server.clone())
    }

    fn finish(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ArrivingQmp {
    fn drop(&mut self) {
        self.finish();
    }
}

fn serve(
    mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    stopped: &Mutex<StopWatch>,
) {
    loop {
        if lock(stopped).stopped {
            // Dropping the event loop unregisters everything; the next
            // one registers the listener and the clients again.
            return;
        }
        if let Err(e) = em.run_with_timeout(1000) {
            log::error!("qmp while arriving: {e:?}");
            return;
        }
    }
}

impl ArrivingQmp {
    /// After a `quit`: SHUTDOWN to every client, and the replies out,
    /// before the process ends.
    pub fn say_goodbye(mut self) {
        self.finish();
        let mut s = lock(&self.server);
        s.emitter().emit(
            "SHUTDOWN",
            Some(json!({ "guest": false, "reason": "host-qmp-quit" })),
        );
        s.flush_all(Duration::from_millis(500));
    }

    /// After a failed load: the last events (MIGRATION failed) out
    /// before the process ends with the error.
    pub fn flush(mut self) {
        self.finish();
        lock(&self.server).flush_all(Duration::from_millis(500));
    }
}

struct StopWatch {
    evt: Arc<EventFd>,
    stopped: bool,
}

impl MutEventSubscriber for StopWatch {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&*self.evt, EventSet::IN)) {
            log::error!("qmp while arriving: cannot watch the stop event: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.evt.as_raw_fd() {
            let _ = self.evt.read();
            self.stopped = true;
        }
    }
}
