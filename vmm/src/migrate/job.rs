//! A migration in progress (or done), on either end: its status and
//! figures as QMP's `query-migrate` reports them, the MIGRATION events,
//! the cancel flag and the `pre-switchover` wait.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use serde_json::{json, Value};

use crate::qmp::{EventEmitter, QmpError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationStatus {
    Setup,
    Active,
    /// Stopped after the live passes, waiting for `migrate-continue`.
    PreSwitchover,
    /// Sending the device state after `migrate-continue`.
    Device,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
}

impl MigrationStatus {
    pub fn name(self) -> &'static str {
        match self {
            MigrationStatus::Setup => "setup",
            MigrationStatus::Active => "active",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::Device => "device",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

/// QMP's MIGRATION {"status"} event.
pub fn emit_status(emitter: &EventEmitter, status: MigrationStatus) {
    emitter.emit("MIGRATION", Some(json!({ "status": status.name() })));
}

/// The figures `query-migrate` reports under `ram`.
#[derive(Clone, Debug, Default)]
pub struct RamFigures {
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    pub duplicate: u64,
    pub normal: u64,
    pub dirty_pages_rate: u64,
    pub mbps: f64,
    pub dirty_sync_count: u64,
    pub pages_per_second: u64,
}

#[derive(Clone, Debug)]
pub struct MigrationInfo {
    pub status: MigrationStatus,
    pub started: Instant,
    pub setup_time_ms: u64,
    pub total_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub expected_downtime_ms: u64,
    /// The auto-converge throttle in force (0: none).
    pub cpu_throttle_percentage: u64,
    pub ram: RamFigures,
    pub error: Option<String>,
    /// Frames per NIC across the migration's end (super::forward).
    pub frames: Vec<super::forward::NicFrames>,
}

/// One migration, shared by its thread and QMP.
pub struct MigrationJob {
    pub info: Mutex<MigrationInfo>,
    /// The `events` capability as it was when the migration began.
    events: Option<EventEmitter>,
    cancel: AtomicBool,
    /// `migrate-continue` came (or a cancel): the `pre-switchover` wait
    /// ends.
    go_on: (Mutex<bool>, Condvar),
    /// A second handle on each connection (the main one and any multifd
    /// channels), so a cancel can unblock the threads' writes.
    channels: Mutex<Vec<Box<dyn migration::Channel>>>,
    /// Bytes put on the wire so far, counted as they are written, so
    /// `query-migrate` moves during a pass, not only between passes.
    wire_bytes: AtomicU64,
    /// What happened when (`x-ferry-query-migrate-timeline`).
    timeline: Mutex<timeline::Timeline>,
    /// The source forwards frames to the destination (super::forward):
    /// an exit asked for meanwhile waits for it, within its bound.
    forwarding: AtomicBool,
}

impl MigrationJob {
    /// A job that emits MIGRATION events to `events` (the `events`
    /// capability on), or none.
    pub fn new(events: Option<EventEmitter>) -> Self {
        Self {
            events,
            go_on: (Mutex::new(false), Condvar::new()),
            info: Mutex::new(MigrationInfo {
                status: MigrationStatus::Setup,
                started: Instant::now(),
                setup_time_ms: 0,
                total_time_ms: None,
                downtime_ms: None,
                expected_downtime_ms: 0,
                cpu_throttle_percentage: 0,
                ram: RamFigures::default(),
                error: None,
                frames: Vec::new(),
            }),
            cancel: AtomicBool::new(false),
            channels: Mutex::new(Vec::new()),
            wire_bytes: AtomicU64::new(0),
            timeline: Mutex::new(timeline::Timeline::default()),
            forwarding: AtomicBool::new(false),
        }
    }

    pub fn add_wire_bytes(&self, n: u64) {
        self.wire_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Asks the thread to stop and shuts the connection so it notices at
    /// once, even in the middle of a write: `cancelling` now, `cancelled`
    /// when the thread has put everything back. Nothing for a finished
    /// migration.
    pub fn cancel(&self) {
        {
            let mut i = devices::bus::lock(&self.info);
            if i.status.is_finished() || i.status == MigrationStatus::Cancelling {
                return;
            }
            i.status = MigrationStatus::Cancelling;
        }
        self.emit(MigrationStatus::Cancelling);
        self.cancel.store(true, Ordering::SeqCst);
        self.shut_channels();
        self.wake();
    }

    /// Moves to `status` and says so (a cancel already asked for keeps
    /// `cancelling`).
    pub fn set_status(&self, status: MigrationStatus) {
        {
            let mut i = devices::bus::lock(&self.info);
            if i.status == MigrationStatus::Cancelling && !status.is_finished() {
                return;
            }
            i.status = status;
        }
        self.emit(status);
    }

    /// MIGRATION {"status"}, when the `events` capability is on.
    pub fn emit(&self, status: MigrationStatus) {
        if let Some(e) = &self.events {
            emit_status(e, status);
        }
    }

    /// MIGRATION_PASS {"pass"} as pass `pass` begins, when the `events`
    /// capability is on.
    pub fn emit_pass(&self, pass: u64) {
        if let Some(e) = &self.events {
            e.emit("MIGRATION_PASS", Some(json!({ "pass": pass })));
        }
    }

    /// `migrate-continue {"state"}`: only in `pre-switchover`, and only
    /// naming it (QEMU's check and wording).
    pub fn continue_from(&self, state: &str) -> Result<(), QmpError> {
        let now = self.status();
        if now != MigrationStatus::PreSwitchover || state != now.name() {
            return Err(QmpError::generic(format!(
                "Migration not in expected state: {}",
                now.name()
            )));
        }
        self.wake();
        Ok(())
    }

    fn wake(&self) {
        *devices::bus::lock(&self.go_on.0) = true;
        self.go_on.1.notify_all();
    }

    /// The thread, in `pre-switchover`: waits for `migrate-continue` or a
    /// cancel; `true` to go on.
    pub fn wait_to_continue(&self) -> bool {
        let mut go = devices::bus::lock(&self.go_on.0);
        while !*go {
            go = match self.go_on.1.wait(go) {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
        !self.cancelled()
    }

    /// Keeps a handle on one more connection of the migration.
    pub fn add_channel(&self, channel: Option<Box<dyn migration::Channel>>) {
        devices::bus::lock(&self.channels).extend(channel);
    }

    /// Shuts every connection down: the threads writing or reading them
    /// return at once (a cancel, or one channel failing the rest).
    pub fn shut_channels(&self) {
        for c in devices::bus::lock(&self.channels).iter() {
            let _ = c.shutdown();
        }
    }

    pub fn forget_channels(&self) {
        devices::bus::lock(&self.channels).clear();
    }

    pub fn elapsed_ms(&self) -> u64 {
        devices::bus::lock(&self.info).started.elapsed().as_millis() as u64
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub fn set_forwarding(&self, on: bool) {
        self.forwarding.store(on, Ordering::SeqCst);
    }

    pub fn forwarding(&self) -> bool {
        self.forwarding.load(Ordering::SeqCst)
    }

    pub fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut devices::bus::lock(&self.info));
    }

    /// Milliseconds since the migration started: the timeline's axis.
    pub fn now_ms(&self) -> f64 {
        self.ms_at(Instant::now())
    }

    pub fn ms_at(&self, t: Instant) -> f64 {
        let started = devices::bus::lock(&self.info).started;
        t.saturating_duration_since(started).as_secs_f64() * 1e3
    }

    pub fn record(&self, f: impl FnOnce(&mut timeline::Timeline)) {
        f(&mut devices::bus::lock(&self.timeline));
    }

    pub fn timeline(&self) -> timeline::Timeline {
        let mut t = devices::bus::lock(&self.timeline).clone();
        if !t.complete {
            t.status = self.status().name().into();
        }
        t
    }

    pub fn status(&self) -> MigrationStatus {
        devices::bus::lock(&self.info).status
    }

    /// `query-migrate`'s answer, with QEMU's field names.
    pub fn to_qmp(&self) -> Value {
        let i = devices::bus::lock(&self.info).clone();
        let elapsed = i.started.elapsed().as_millis() as u64;
        let mut v = json!({
            "status": i.status.name(),
            "setup-time": i.setup_time_ms,
            "total-time": i.total_time_ms.unwrap_or(elapsed),
            "expected-downtime": i.expected_downtime_ms,
            "ram": {
                "transferred": i.ram.transferred.max(self.wire_bytes.load(Ordering::Relaxed)),
                "remaining": i.ram.remaining,
                "total": i.ram.total,
                "duplicate": i.ram.duplicate,
                "normal": i.ram.normal,
                "normal-bytes": i.ram.normal * migration::PAGE_SIZE as u64,
                "dirty-pages-rate": i.ram.dirty_pages_rate,
                "mbps": i.ram.mbps,
                "dirty-sync-count": i.ram.dirty_sync_count,
                "page-size": migration::PAGE_SIZE,
                "pages-per-second": i.ram.pages_per_second,
            },
        });
        if let Some(d) = i.downtime_ms {
            v["downtime"] = json!(d);
        }
        if i.cpu_throttle_percentage > 0 {
            v["cpu-throttle-percentage"] = json!(i.cpu_throttle_percentage);
        }
        if let Some(e) = i.error {
            v["error-desc"] = json!(e);
        }
        if !i.frames.is_empty() {
            v["x-frames"] = json!(i.frames);
        }
        v
    }
}

impl Default for MigrationJob {
    fn default() -> Self {
        Self::new(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrate_continue_only_in_pre_switchover() {
        let job = MigrationJob::new(None);
        job.set_status(MigrationStatus::Active);
        let e = job.continue_from("pre-switchover").unwrap_err();
        assert_eq!(e.desc, "Migration not in expected state: active");
        job.set_status(MigrationStatus::PreSwitchover);
        let e = job.continue_from("active").unwrap_err();
        assert_eq!(e.desc, "Migration not in expected state: pre-switchover");
        job.continue_from("pre-switchover").unwrap();
        assert!(job.wait_to_continue());
    }

    #[test]
    fn a_cancel_ends_the_wait_and_says_cancelling_once() {
        let emitter = EventEmitter::new().unwrap();
        let job = std::sync::Arc::new(MigrationJob::new(Some(emitter.clone())));
        job.set_status(MigrationStatus::PreSwitchover);
        let waiter = {
            let job = job.clone();
            std::thread::spawn(move || job.wait_to_continue())
        };
        job.cancel();
        job.cancel();
        assert!(!waiter.join().unwrap(), "a cancel does not continue");
        // The thread's own `device` is not reported over `cancelling`.
        job.set_status(MigrationStatus::Device);
        assert_eq!(job.status(), MigrationStatus::Cancelling);
        job.set_status(MigrationStatus::Cancelled);
        let names: Vec<String> = emitter
            .take()
            .into_iter()
            .map(|e| e.data.map_or(String::new(), |d| d["status"].to_string()))
            .collect();
        assert_eq!(
            names,
            ["\"pre-switchover\"", "\"cancelling\"", "\"cancelled\""]
        );
    }
}
