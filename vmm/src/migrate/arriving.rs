//! QMP while an incoming VM arrives (`inmigrate`): the destination's
//! control socket answers from the start, as QEMU's does, so a supervisor
//! can watch the runstate or give up with `quit` while the stream loads.
//!
//! The server runs on its own thread and event loop for as long as the
//! load takes; then it moves, with its connected clients, to the VM's
//! event loop and its handler becomes the VM's [`VmCommands`]. One socket,
//! one set of connections, from `inmigrate` to the end.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use serde_json::{json, Map, Value};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::commands::{self, VmCommands};
use crate::control::VmControl;
use crate::qmp::{EventEmitter, QmpError, QmpHandler, QmpListener, QmpServer};
use crate::VmmError;

/// Who answers QMP: the socket alone while the VM arrives, then the VM.
pub enum QmpTarget {
    Arriving(Arc<Abort>),
    Vm(VmCommands),
}

impl QmpHandler for QmpTarget {
    fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match self {
            QmpTarget::Vm(commands) => commands.execute(command, args),
            QmpTarget::Arriving(abort) => arriving(abort, command),
        }
    }
}

/// `quit` while arriving: the waiting or loading thread is woken (the
/// eventfd beside the listener, a shutdown of the connection) and gives
/// up; the process ends as after any `quit`.
pub struct Abort {
    requested: AtomicBool,
    pub evt: EventFd,
    channel: Mutex<Option<Box<dyn migration::Channel>>>,
}

impl Abort {
    pub fn new() -> Result<Self, VmmError> {
        Ok(Self {
            requested: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::Io {
                what: "eventfd",
                source,
            })?,
            channel: Mutex::new(None),
        })
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// The connection being loaded from, so a quit can cut it.
    pub fn watch(&self, channel: &dyn migration::Channel) {
        if let Ok(c) = channel.try_clone_box() {
            *devices::bus::lock(&self.channel) = Some(c);
        }
    }

    fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.evt.write(1);
        if let Some(c) = devices::bus::lock(&self.channel).as_ref() {
            let _ = c.shutdown();
        }
    }
}

fn arriving(abort: &Abort, command: &str) -> Result<Value, QmpError> {
    match command {
        "query-status" => Ok(json!({ "status": "inmigrate", "running": false, "singlestep": false })),
        "query-migrate" => Ok(json!({})),
        "quit" => {
            abort.request();
            Ok(json!({}))
        }
        other => Err(QmpError::generic(format!(
            "'{other}' is not available while the VM is arriving (inmigrate); it is once the incoming migration has loaded"
        ))),
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
        control_for: impl FnOnce(&EventEmitter) -> VmControl,
    ) -> Result<(SharedServer, VmControl), VmmError> {
        match self {
            QmpEndpoint::Bound(listener) => {
                let emitter = EventEmitter::new()?;
                let control = control_for(&emitter);
                let target = QmpTarget::Vm(VmCommands::new(control.clone()));
                let server = QmpServer::new(listener, &commands::all(), target, emitter)?;
                Ok((Arc::new(Mutex::new(server)), control))
            }
            QmpEndpoint::Serving(server) => {
                let control = {
                    let mut s = devices::bus::lock(&server);
                    let control = control_for(s.emitter());
                    *s.handler_mut() = QmpTarget::Vm(VmCommands::new(control.clone()));
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
    pub fn start(listener: QmpListener, abort: Arc<Abort>) -> Result<Self, VmmError> {
        let emitter = EventEmitter::new()?;
        let target = QmpTarget::Arriving(abort);
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
        if devices::bus::lock(stopped).stopped {
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
        let mut s = devices::bus::lock(&self.server);
        s.emitter().emit(
            "SHUTDOWN",
            Some(json!({ "guest": false, "reason": "host-qmp-quit" })),
        );
        s.flush_all(Duration::from_millis(500));
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
