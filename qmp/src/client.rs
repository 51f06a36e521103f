//! A small blocking QMP client: what `ferry ctl` and the tests use to talk
//! to a running Ferry (or any QMP server).

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::error::{ErrorClass, QmpError};
use super::events::QmpEvent;

/// QMP servers end every message with a line end; a line this long is
/// not a QMP message.
const MAX_LINE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QMP connection: {0}")]
    Io(#[from] io::Error),
    #[error("no answer from the QMP server in time")]
    Timeout,
    #[error("the QMP server closed the connection")]
    Closed,
    #[error("the QMP server sent something that is not QMP: expected the greeting, got {0}")]
    NoGreeting(Value),
    #[error("the QMP server sent something that is not QMP: a message too long")]
    TooLong,
    #[error("the QMP server sent something that is not QMP: {source}: {line}")]
    NotJson {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the QMP server sent something that is not QMP: bad event ({source}): {message}")]
    BadEvent {
        message: Value,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the QMP server sent something that is not QMP: a reply with neither return nor error: {0}"
    )]
    NoAnswer(Value),
    /// The server answered with an error.
    #[error(transparent)]
    Command(QmpError),
}

/// One connection, greeting read. Events that arrive while waiting for a
/// reply are kept, in order, for [`next_event`](Self::next_event).
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// A line read in part when a timeout struck, kept for the next read.
    partial: Vec<u8>,
    greeting: Value,
    events: VecDeque<QmpEvent>,
    next_id: u64,
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities (none),
    /// leaving the connection in command mode.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        Self::connect_with_timeout(path, None)
    }

    /// [`Self::connect`], each read and write (the greeting's too) bounded
    /// by `timeout`, which stays set: a server that accepts and never
    /// speaks is an error, not a hang.
    pub fn connect_with_timeout(
        path: impl AsRef<Path>,
        timeout: Option<Duration>,
    ) -> Result<Self, ClientError> {
        let mut client = Self::open(path.as_ref(), timeout)?;
        client.negotiate()?;
        Ok(client)
    }

    /// Connects and reads the greeting only.
    pub fn connect_without_negotiation(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        Self::open(path.as_ref(), None)
    }

    fn open(path: &Path, timeout: Option<Duration>) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        stream.set_read_timeout(timeout)?;
        stream.set_write_timeout(timeout)?;
        let writer = stream.try_clone()?;
        let mut client = Self {
            reader: BufReader::new(stream),
            writer,
            partial: Vec::new(),
            greeting: Value::Null,
            events: VecDeque::new(),
            next_id: 1,
        };
        let greeting = client.read_message()?;
        if !greeting.get("QMP").is_some_and(Value::is_object) {
            return Err(ClientError::NoGreeting(greeting));
        }
        client.greeting = greeting;
        Ok(client)
    }

    /// `{"QMP": {"version": ..., "capabilities": [...]}}` as received.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Leaves capabilities negotiation mode.
    pub fn negotiate(&mut self) -> Result<(), ClientError> {
        self.execute("qmp_capabilities", None).map(|_| ())
    }

    /// How long a read may block; `None` waits forever.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.writer.set_read_timeout(timeout)?;
        self.writer.set_write_timeout(timeout)?;
        Ok(())
    }

    /// Runs `command` and returns what it returned; an error reply is
    /// [`ClientError::Command`].
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Map<String, Value>>,
    ) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            request["arguments"] = Value::Object(args);
        }
        self.send_raw(format!("{request}\n").as_bytes())?;
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                self.keep_event(message)?;
                continue;
            }
            // Replies to other ids are not ours (QMP's spec: drop them).
            if message.get("id") != Some(&json!(id)) {
                continue;
            }
            if let Some(ret) = message.get("return") {
                return Ok(ret.clone());
            }
            return Err(ClientError::Command(parse_error(&message)?));
        }
    }

    /// Writes bytes as they are: for tests of what the server does with
    /// malformed input.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.writer.write_all(bytes).map_err(map_timeout)?;
        Ok(())
    }

    /// The next message of any kind (reply or event), as received.
    pub fn read_message(&mut self) -> Result<Value, ClientError> {
        loop {
            let mut limited = (&mut self.reader).take(MAX_LINE);
            let n = limited
                .read_until(b'\n', &mut self.partial)
                .map_err(map_timeout)?;
            if n == 0 && self.partial.is_empty() {
                return Err(ClientError::Closed);
            }
            if self.partial.last() != Some(&b'\n') {
                if n == 0 {
                    return Err(ClientError::Closed);
                }
                if self.partial.len() as u64 >= MAX_LINE {
                    return Err(ClientError::TooLong);
                }
                continue;
            }
            let line = std::mem::take(&mut self.partial);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return serde_json::from_slice(&line).map_err(|source| ClientError::NotJson {
                line: String::from_utf8_lossy(&line).trim_end().to_string(),
                source,
            });
        }
    }

    /// The next event, waiting for one if none has arrived yet.
    pub fn next_event(&mut self) -> Result<QmpEvent, ClientError> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(event);
            }
            let message = self.read_message()?;
            if message.get("event").is_some() {
                self.keep_event(message)?;
            }
        }
    }

    /// The next event called `name`, waiting for it; other events that
    /// arrive meanwhile stay queued.
    pub fn wait_for_event(&mut self, name: &str) -> Result<QmpEvent, ClientError> {
        if let Some(event) = self
            .events
            .iter()
            .position(|e| e.event == name)
            .and_then(|at| self.events.remove(at))
        {
            return Ok(event);
        }
        loop {
            let message = self.read_message()?;
            if message.get("event").is_none() {
                continue;
            }
            let event = parse_event(message)?;
            if event.event == name {
                return Ok(event);
            }
            self.events.push_back(event);
        }
    }

    /// Events received so far and not yet taken.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    fn keep_event(&mut self, message: Value) -> Result<(), ClientError> {
        let event = parse_event(message)?;
        self.events.push_back(event);
        Ok(())
    }
}

fn map_timeout(e: io::Error) -> ClientError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout,
        _ => ClientError::Io(e),
    }
}

fn parse_event(message: Value) -> Result<QmpEvent, ClientError> {
    serde_json::from_value(message.clone())
        .map_err(|source| ClientError::BadEvent { message, source })
}

/// `{"error": {"class", "desc"}}`. A class that is not one of QEMU's
/// (another server's extension) is reported as GenericError with the
/// class kept in the text.
fn parse_error(message: &Value) -> Result<QmpError, ClientError> {
    let error = &message["error"];
    let (Some(class), Some(desc)) = (error["class"].as_str(), error["desc"].as_str()) else {
        return Err(ClientError::NoAnswer(message.clone()));
    };
    Ok(match ErrorClass::from_name(class) {
        Some(class) => QmpError::new(class, desc),
        None => QmpError::generic(format!("{class}: {desc}")),
    })
}
