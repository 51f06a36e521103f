//! The QMP server as an event-manager subscriber: the listening socket,
//! every client, and the event queue's wake-up, all non-blocking on the
//! VMM thread.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::error::{QmpError, QmpSetupError};
use super::events::EventEmitter;
use super::framing::{Frame, Framer};
use super::json::encode_line;
use super::protocol::{Dispatcher, Mode, QmpHandler, QmpVersion, Reply};
use super::schema::CommandSpec;
use super::socket::QmpListener;

/// Bounds that keep one client from costing the VMM unbounded memory or
/// time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest JSON text a client may send; a longer one gets an error and
    /// the connection is closed (there is no resynchronising inside it).
    pub max_request: usize,
    /// Replies and events a client may leave unread; past this it is
    /// disconnected, so a stuck client never holds up the others.
    pub max_output: usize,
    /// Above this much unread output, the server stops reading a client's
    /// requests until it reads its replies (QEMU's monitor does the same).
    pub output_high_water: usize,
    /// Clients connected at once; more are told so and closed.
    pub max_clients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request: 1 << 20,
            max_output: 1 << 20,
            output_high_water: 64 << 10,
            max_clients: 64,
        }
    }
}

const READ_CHUNK: usize = 16 << 10;

struct Client {
    stream: UnixStream,
    /// For log lines: fds are reused, numbers are not.
    number: u64,
    mode: Mode,
    framer: Framer,
    /// Requests read but not yet answered (only while output is backed up).
    pending: VecDeque<Frame>,
    out: VecDeque<u8>,
    /// What epoll watches for this client now.
    registered: EventSet,
    /// The client will send nothing more: it shut down its side, or it
    /// sent something that ends the connection.
    eof: bool,
    /// Sent once every pending request has been answered; then close.
    last_words: Option<QmpError>,
    /// Set when the client must go; the reason is logged.
    dead: Option<String>,
}

/// send(2) with MSG_NOSIGNAL: a client that vanished must be an EPIPE for
/// that client, not a SIGPIPE for the VMM.
fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live slice of `buf.len()` bytes and the fd is
    // owned by `stream` for the duration of the call.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl Client {
    /// Appends a message; a client this far behind is dropped instead.
    fn queue(&mut self, message: &[u8], limits: &Limits) {
        if self.dead.is_some() {
            return;
        }
        if self.out.len() + message.len() > limits.max_output {
            self.dead = Some(format!(
                "it left {} bytes of replies and events unread",
                self.out.len()
            ));
            return;
        }
        self.out.extend(message);
    }

    /// Writes what the socket takes now.
    fn flush(&mut self) {
        while self.dead.is_none() && !self.out.is_empty() {
            let (head, _) = self.out.as_slices();
            match send_nosignal(&self.stream, head) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.dead = Some(format!("write: {e}")),
            }
        }
    }

    fn read_some(&mut self) {
        let mut buf = [0u8; READ_CHUNK];
        match (&self.stream).read(&mut buf) {
            Ok(0) => self.eof = true,
            Ok(n) => {
                if let Err(too_large) = self.framer.feed(&buf[..n], &mut self.pending) {
                    self.eof = true;
                    self.last_words = Some(QmpError::generic(format!(
                        "QMP input exceeds the limit of {} bytes for one JSON value; \
                         closing the connection",
                        too_large.limit
                    )));
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => self.dead = Some(format!("read: {e}")),
        }
    }

    fn backlogged(&self, limits: &Limits) -> bool {
        self.out.len() >= limits.output_high_water
    }

    /// Nothing more will come in or go out.
    fn finished(&self) -> bool {
        self.eof && self.pending.is_empty() && self.out.is_empty() && self.last_words.is_none()
    }

    fn wanted(&self, limits: &Limits) -> EventSet {
        let mut set = EventSet::empty();
        if !self.eof && self.pending.is_empty() && !self.backlogged(limits) {
            set |= EventSet::IN;
        }
        if !self.out.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }
}

/// A QMP server: add it to the VMM's `EventManager` as a subscriber.
///
/// ```ignore
/// let emitter = EventEmitter::new()?;
/// let listener = QmpListener::bind(&"unix:/run/vm.qmp".parse()?)?;
/// let server = Arc::new(Mutex::new(QmpServer::new(
///     listener, &COMMANDS, handler, emitter.clone())?));
/// event_manager.add_subscriber(server.clone());
/// // ... loop until exit ...
/// emitter.emit("SHUTDOWN", Some(json!({"guest": false, "reason": "host-qmp-quit"})));
/// server.lock().unwrap().flush_all(Duration::from_millis(500));
/// ```
pub struct QmpServer<H> {
    listener: QmpListener,
    listening: bool,
    dispatcher: Dispatcher<H>,
    emitter: EventEmitter,
    clients: HashMap<RawFd, Client>,
    limits: Limits,
    connections: u64,
}

impl<H: QmpHandler> QmpServer<H> {
    /// A server for the commands in `commands` (besides the built-in
    /// `qmp_capabilities`, `query-commands` and `query-version`), run by
    /// `handler`, sending the events queued on `emitter`.
    pub fn new(
        listener: QmpListener,
        commands: &[CommandSpec],
        handler: H,
        emitter: EventEmitter,
    ) -> Result<Self, QmpSetupError> {
        Ok(Self {
            listener,
            listening: true,
            dispatcher: Dispatcher::new(commands, handler, QmpVersion::ferry())?,
            emitter,
            clients: HashMap::new(),
            limits: Limits::default(),
            connections: 0,
        })
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn with_version(mut self, version: QmpVersion) -> Self {
        self.dispatcher.set_version(version);
        self
    }

    pub fn path(&self) -> &Path {
        self.listener.path()
    }

    pub fn emitter(&self) -> &EventEmitter {
        &self.emitter
    }

    pub fn handler(&self) -> &H {
        &self.dispatcher.handler
    }

    pub fn handler_mut(&mut self) -> &mut H {
        &mut self.dispatcher.handler
    }

    /// Clients connected now.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// Clients past capabilities negotiation: the ones events reach.
    pub fn negotiated_count(&self) -> usize {
        self.clients
            .values()
            .filter(|c| c.mode == Mode::Command)
            .count()
    }

    /// For the VMM's way out: sends the events still queued (SHUTDOWN) and
    /// every unsent reply (to `quit`), waiting at most `timeout` for slow
    /// readers. Connections stay open; they close when the server is
    /// dropped.
    pub fn flush_all(&mut self, timeout: Duration) {
        self.broadcast_queued();
        let deadline = Instant::now() + timeout;
        loop {
            let mut fds: Vec<libc::pollfd> = self
                .clients
                .values()
                .filter(|c| c.dead.is_none() && !c.out.is_empty())
                .map(|c| libc::pollfd {
                    fd: c.stream.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                })
                .collect();
            if fds.is_empty() {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!(
                    "qmp: {} client(s) did not read their last replies in time",
                    fds.len()
                );
                return;
            }
            let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
            // SAFETY: `fds` is a live array of `fds.len()` pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    log::warn!("qmp: flush: poll: {e}");
                    return;
                }
            }
            for pfd in fds.iter().filter(|p| p.revents != 0) {
                if let Some(client) = self.clients.get_mut(&pfd.fd) {
                    client.flush();
                    if client.dead.is_some() {
                        // Nothing will be read from it any more either.
                        client.out.clear();
                    }
                }
            }
        }
    }

    fn accept_all(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of fds or memory: the listener stays readable, so
                    // stop watching it until a client leaves rather than
                    // spin on it.
                    log::warn!("qmp: accept: {e}; not accepting clients for now");
                    let _ = ops.remove(Events::new(&self.listener, EventSet::IN));
                    self.listening = false;
                    return;
                }
            };
            self.connections += 1;
            let number = self.connections;
            if self.clients.len() >= self.limits.max_clients {
                log::warn!(
                    "qmp: refusing client {number}: {} clients already connected",
                    self.clients.len()
                );
                let refusal = Reply {
                    id: None,
                    result: Err(QmpError::generic(format!(
                        "Too many QMP clients (at most {}); try again later",
                        self.limits.max_clients
                    ))),
                };
                let _ = send_nosignal(&stream, &refusal.encode());
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("qmp: client {number}: {e}");
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::warn!("qmp: client {number}: cannot watch it: {e:?}");
                continue;
            }
            log::info!("qmp: client {number} connected");
            let mut client = Client {
                stream,
                number,
                mode: Mode::Negotiation,
                framer: Framer::new(self.limits.max_request),
                pending: VecDeque::new(),
                out: VecDeque::new(),
                registered: EventSet::IN,
                eof: false,
                last_words: None,
                dead: None,
            };
            client.queue(&self.dispatcher.greeting(), &self.limits);
            client.flush();
            self.clients.insert(fd, client);
        }
    }

    fn on_client(&mut self, fd: RawFd, events: EventSet) {
        let Some(client) = self.clients.get_mut(&fd) else {
            return;
        };
        if events.contains(EventSet::OUT) {
            client.flush();
        }
        let readable = events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR);
        if readable && client.dead.is_none() && !client.eof && client.pending.is_empty() {
            client.read_some();
        }
        self.answer_pending(fd);
    }

    /// Runs the client's queued requests, in order, while its output is
    /// not backed up. Events the handler emits while a command runs are
    /// sent (to everyone) before that command's reply, as in QEMU.
    fn answer_pending(&mut self, fd: RawFd) {
        let limits = self.limits;
        loop {
            let Some(client) = self.clients.get_mut(&fd) else {
                return;
            };
            if client.dead.is_some() || client.backlogged(&limits) {
                return;
            }
            let Some(frame) = client.pending.pop_front() else {
                if let Some(error) = client.last_words.take() {
                    let line = Reply {
                        id: None,
                        result: Err(error),
                    }
                    .encode();
                    client.queue(&line, &limits);
                    client.flush();
                    client.dead = Some("its request was over the size limit".into());
                }
                return;
            };
            let mut mode = client.mode;
            let reply = self.dispatcher.handle(&mut mode, frame);
            self.broadcast_queued();
            let Some(client) = self.clients.get_mut(&fd) else {
                return;
            };
            client.mode = mode;
            client.queue(&reply.encode(), &limits);
            client.flush();
        }
    }

    /// Sends every queued event to every client in command mode.
    fn broadcast_queued(&mut self) {
        let events = self.emitter.take();
        if events.is_empty() {
            return;
        }
        let lines: Vec<Vec<u8>> = events.iter().map(encode_line).collect();
        for client in self.clients.values_mut() {
            if client.mode != Mode::Command {
                continue;
            }
            for line in &lines {
                client.queue(line, &self.limits);
            }
            client.flush();
        }
    }

    /// Brings epoll in line with each client's state and closes the ones
    /// that are done.
    fn sync(&mut self, ops: &mut EventOps) {
        let limits = self.limits;
        let mut closed = Vec::new();
        for (&fd, client) in self.clients.iter_mut() {
            let wanted = client.wanted(&limits);
            if client.dead.is_some() || client.finished() || wanted.is_empty() {
                closed.push(fd);
                continue;
            }
            if wanted != client.registered {
                match ops.modify(Events::new_raw(fd, wanted)) {
                    Ok(()) => client.registered = wanted,
                    Err(e) => client.dead = Some(format!("cannot watch it: {e:?}")),
                }
            }
        }
        let closed_any = !closed.is_empty();
        for fd in closed {
            let Some(client) = self.clients.remove(&fd) else {
                continue;
            };
            // Removing also drops any event for this fd still waiting in
            // this round of the loop, before the fd number can be reused.
            let _ = ops.remove(Events::new_raw(fd, EventSet::empty()));
            match client.dead {
                Some(why) => log::warn!("qmp: dropping client {}: {why}", client.number),
                None => log::info!("qmp: client {} disconnected", client.number),
            }
        }
        if !closed_any {
            return;
        }
        self.resume_listening(ops);
    }

    /// After accept failed for lack of resources: try again once a client
    /// has left (freeing an fd) or an event came by, never in a loop.
    fn resume_listening(&mut self, ops: &mut EventOps) {
        if !self.listening && ops.add(Events::new(&self.listener, EventSet::IN)).is_ok() {
            log::info!("qmp: accepting clients again");
            self.listening = true;
        }
    }
}

impl<H: QmpHandler> MutEventSubscriber for QmpServer<H> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::error!(
                "qmp: cannot watch {}: {e:?}",
                self.listener.path().display()
            );
            self.listening = false;
        }
        if let Err(e) = ops.add(Events::new(self.emitter.wake_fd(), EventSet::IN)) {
            log::error!("qmp: cannot watch the event queue: {e:?}");
        }
        // Clients already connected when the server moves to another event
        // loop (from an incoming VM's arrival to its run).
        for (&fd, client) in self.clients.iter_mut() {
            if let Err(e) = ops.add(Events::new_raw(fd, client.registered)) {
                client.dead = Some(format!("cannot watch it: {e:?}"));
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept_all(ops);
        } else if fd == self.emitter.wake_fd().as_raw_fd() {
            self.broadcast_queued();
            self.resume_listening(ops);
        } else if self.clients.contains_key(&fd) {
            self.on_client(fd, events.event_set());
        } else {
            log::debug!("qmp: event for fd {fd}, which is no client any more");
        }
        self.sync(ops);
    }
}
