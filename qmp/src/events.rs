//! Asynchronous events: queued from any thread, sent by the VMM thread.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use vmm_sys_util::eventfd::EventFd;

use super::error::QmpSetupError;

/// Events waiting for the VMM thread. The loop drains them on every wake,
/// so this only fills when the loop is not running (before it starts, or
/// wedged); the oldest are dropped then, because the newest state is what
/// a client needs.
const QUEUE_LIMIT: usize = 1024;

/// When an event happened, as QMP sends it: host wall-clock time since the
/// Unix epoch, -1/-1 when the clock cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

impl Timestamp {
    pub fn now() -> Self {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => Self {
                seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                microseconds: i64::from(d.subsec_micros()),
            },
            Err(_) => Self {
                seconds: -1,
                microseconds: -1,
            },
        }
    }
}

/// `{"event": NAME, "data": {...}, "timestamp": {...}}`; `data` is left
/// out when the event has none (QEMU's STOP, RESUME, POWERDOWN).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    pub timestamp: Timestamp,
}

impl QmpEvent {
    /// An event that happens now.
    pub fn new(name: impl Into<String>, data: Option<Value>) -> Self {
        Self {
            event: name.into(),
            data,
            timestamp: Timestamp::now(),
        }
    }
}

struct Shared {
    queue: Mutex<VecDeque<QmpEvent>>,
    /// Wakes the server's subscriber in the event loop.
    wake: EventFd,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, VecDeque<QmpEvent>> {
        // A thread that panicked while pushing left a valid VecDeque
        // behind; events are still worth delivering.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A handle that queues QMP events for every client in command mode.
/// Clone it into whatever thread has something to report (vCPU threads,
/// the migration thread, the QMP handler itself); the timestamp is taken
/// when [`emit`](Self::emit) is called, not when the event is sent.
///
/// Events emitted while a command runs are sent before that command's
/// reply, as in QEMU (`stop` → STOP event, then `{"return": {}}`).
#[derive(Clone)]
pub struct EventEmitter {
    shared: Arc<Shared>,
}

impl fmt::Debug for EventEmitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventEmitter")
            .field("queued", &self.shared.queue().len())
            .finish()
    }
}

impl EventEmitter {
    pub fn new() -> Result<Self, QmpSetupError> {
        let wake =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(QmpSetupError::EventFd)?;
        Ok(Self {
            shared: Arc::new(Shared {
                queue: Mutex::new(VecDeque::new()),
                wake,
            }),
        })
    }

    /// Queues event `name` with optional `data` (a JSON object by QMP's
    /// rules) and wakes the server.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        self.emit_event(QmpEvent::new(name, data));
    }

    pub fn emit_event(&self, event: QmpEvent) {
        {
            let mut queue = self.shared.queue();
            if queue.len() >= QUEUE_LIMIT {
                if let Some(old) = queue.pop_front() {
                    log::warn!("qmp: event queue full; dropped {} event", old.event);
                }
            }
            queue.push_back(event);
        }
        // Only fails when the counter would overflow, i.e. when it is
        // already non-zero and the loop will wake anyway.
        let _ = self.shared.wake.write(1);
    }

    /// Everything queued so far, oldest first (the server takes them; a
    /// test without a server may).
    pub fn take(&self) -> VecDeque<QmpEvent> {
        // Clear the wake-up before taking, so an event queued in between
        // leaves the eventfd readable rather than being missed.
        let _ = self.shared.wake.read();
        std::mem::take(&mut *self.shared.queue())
    }

    pub(crate) fn wake_fd(&self) -> &EventFd {
        &self.shared.wake
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::fd::AsRawFd;

    fn readable(fd: &EventFd) -> bool {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    #[test]
    fn event_encoding() {
        let e = QmpEvent {
            event: "SHUTDOWN".into(),
            data: Some(json!({"guest": false, "reason": "host-qmp-quit"})),
            timestamp: Timestamp {
                seconds: 1258551470,
                microseconds: 802384,
            },
        };
        let line = crate::json::encode_line(&e);
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": false, \"reason\": \"host-qmp-quit\"}, \
             \"timestamp\": {\"seconds\": 1258551470, \"microseconds\": 802384}}\r\n"
        );
        let stop = QmpEvent {
            data: None,
            event: "STOP".into(),
            ..e
        };
        let line = crate::json::encode_line(&stop);
        assert!(!std::str::from_utf8(&line).unwrap().contains("data"));
    }

    #[test]
    fn timestamp_is_taken_at_emit() {
        let emitter = EventEmitter::new().unwrap();
        let before = Timestamp::now();
        emitter.emit("STOP", None);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let got = emitter.take();
        assert_eq!(got.len(), 1);
        let t = got[0].timestamp;
        let at = |t: Timestamp| t.seconds * 1_000_000 + t.microseconds;
        assert!(at(t) >= at(before));
        assert!(at(t) < at(Timestamp::now()) - 10_000);
    }

    #[test]
    fn emit_from_other_threads_wakes_and_keeps_order() {
        let emitter = EventEmitter::new().unwrap();
        assert!(!readable(emitter.wake_fd()));
        let e2 = emitter.clone();
        std::thread::spawn(move || {
            for i in 0..10 {
                e2.emit("TICK", Some(json!({ "i": i })));
            }
        })
        .join()
        .unwrap();
        assert!(readable(emitter.wake_fd()));
        let got: Vec<_> = emitter.take().into_iter().collect();
        assert!(!readable(emitter.wake_fd()));
        let order: Vec<_> = got
            .iter()
            .map(|e| e.data.clone().unwrap()["i"].clone())
            .collect();
        assert_eq!(order, (0..10).map(|i| json!(i)).collect::<Vec<_>>());
    }

    #[test]
    fn a_full_queue_drops_the_oldest() {
        let emitter = EventEmitter::new().unwrap();
        for i in 0..QUEUE_LIMIT + 5 {
            emitter.emit("TICK", Some(json!({ "i": i })));
        }
        let got = emitter.take();
        assert_eq!(got.len(), QUEUE_LIMIT);
        assert_eq!(got[0].data.as_ref().unwrap()["i"], json!(5));
    }
}
