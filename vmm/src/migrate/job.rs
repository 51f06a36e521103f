//! A migration in progress (or done): its parameters, its status and
//! figures as QMP's `query-migrate` reports them, and the cancel flag.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{json, Map, Value};

use crate::qmp::QmpError;

/// QMP's migration parameters that Ferry uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationParameters {
    /// Longest the guest may stay stopped at the end, in ms.
    pub downtime_limit_ms: u64,
    /// Bytes per second the stream may use; 0: no limit.
    pub max_bandwidth: u64,
    /// Announce schedule after the guest runs on the destination (#7).
    pub announce_initial_ms: u64,
    pub announce_max_ms: u64,
    pub announce_rounds: u64,
    pub announce_step_ms: u64,
    /// Ferry's bound on dirty passes before it gives up on a guest that
    /// dirties memory faster than the link carries it.
    pub max_passes: u64,
    /// Local migration over unix:: hand the TAPs (and a memfd's RAM) to
    /// the destination instead of making it open and copy its own.
    pub backend_transfer: bool,
    /// QEMU's `auto-converge` capability: throttle the vCPUs of a guest
    /// that dirties memory faster than the link carries it. On by default
    /// in Ferry (QEMU's is off): a migration asked for should complete.
    pub auto_converge: bool,
    pub throttle_trigger_threshold: u64,
    pub cpu_throttle_initial: u64,
    pub cpu_throttle_increment: u64,
    pub max_cpu_throttle: u64,
}

impl Default for MigrationParameters {
    fn default() -> Self {
        Self {
            downtime_limit_ms: 300,
            max_bandwidth: 0,
            announce_initial_ms: 50,
            announce_max_ms: 550,
            announce_rounds: 5,
            announce_step_ms: 100,
            max_passes: 30,
            backend_transfer: false,
            auto_converge: true,
            throttle_trigger_threshold: 50,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            max_cpu_throttle: 99,
        }
    }
}

/// The migration capabilities Ferry knows (`migrate-set-capabilities`).
pub const CAPABILITIES: &[&str] = &["auto-converge"];

/// (QMP name, setter) of every parameter, so query and set agree.
type Setter = fn(&mut MigrationParameters) -> &mut u64;
const PARAMETERS: &[(&str, Setter, u64, u64)] = &[
    ("downtime-limit", |p| &mut p.downtime_limit_ms, 0, 2_000_000),
    ("max-bandwidth", |p| &mut p.max_bandwidth, 0, u64::MAX),
    (
        "announce-initial",
        |p| &mut p.announce_initial_ms,
        1,
        100_000,
    ),
    ("announce-max", |p| &mut p.announce_max_ms, 1, 100_000),
    ("announce-rounds", |p| &mut p.announce_rounds, 0, 1000),
    ("announce-step", |p| &mut p.announce_step_ms, 0, 10_000),
    ("x-max-passes", |p| &mut p.max_passes, 1, 10_000),
    (
        "throttle-trigger-threshold",
        |p| &mut p.throttle_trigger_threshold,
        1,
        100,
    ),
    (
        "cpu-throttle-initial",
        |p| &mut p.cpu_throttle_initial,
        1,
        99,
    ),
    (
        "cpu-throttle-increment",
        |p| &mut p.cpu_throttle_increment,
        1,
        99,
    ),
    ("max-cpu-throttle", |p| &mut p.max_cpu_throttle, 1, 99),
];

impl MigrationParameters {
    /// The announce schedule these parameters describe.
    pub fn announce(&self) -> net::AnnounceParams {
        net::AnnounceParams {
            initial_ms: self.announce_initial_ms,
            max_ms: self.announce_max_ms,
            rounds: self.announce_rounds,
            step_ms: self.announce_step_ms,
        }
    }

    pub fn set_announce(&mut self, p: net::AnnounceParams) {
        self.announce_initial_ms = p.initial_ms;
        self.announce_max_ms = p.max_ms;
        self.announce_rounds = p.rounds;
        self.announce_step_ms = p.step_ms;
    }

    /// The auto-converge throttle these parameters describe.
    pub fn throttle(&self) -> super::throttle::ThrottlePolicy {
        super::throttle::ThrottlePolicy {
            trigger_threshold: self.throttle_trigger_threshold,
            initial: self.cpu_throttle_initial,
            increment: self.cpu_throttle_increment,
            max: self.max_cpu_throttle,
        }
    }

    /// `query-migrate-capabilities`' answer.
    pub fn capabilities_to_qmp(&self) -> Value {
        json!([{ "capability": "auto-converge", "state": self.auto_converge }])
    }

    /// Applies `migrate-set-capabilities`' list; all or nothing.
    pub fn apply_capabilities(&mut self, list: &[Value]) -> Result<(), QmpError> {
        let mut next = self.clone();
        for entry in list {
            let name = entry.get("capability").and_then(Value::as_str);
            let state = entry.get("state").and_then(Value::as_bool);
            let (Some(name), Some(state)) = (name, state) else {
                return Err(QmpError::generic(
                    "each capability is {\"capability\": NAME, \"state\": BOOL}",
                ));
            };
            match name {
                "auto-converge" => next.auto_converge = state,
                other => {
                    return Err(QmpError::generic(format!(
                        "Capability '{other}' is not supported by Ferry (known: {})",
                        CAPABILITIES.join(", ")
                    )))
                }
            }
        }
        *self = next;
        Ok(())
    }

    pub fn names() -> impl Iterator<Item = &'static str> {
        PARAMETERS.iter().map(|p| p.0)
    }

    pub fn to_qmp(&self) -> Value {
        let mut copy = self.clone();
        let mut map = Map::new();
        for (name, field, _, _) in PARAMETERS {
            map.insert((*name).to_string(), json!(*field(&mut copy)));
        }
        map.insert("backend-transfer".into(), json!(self.backend_transfer));
        Value::Object(map)
    }

    /// Applies `migrate-set-parameters` arguments; all or nothing.
    pub fn apply(&mut self, args: &Map<String, Value>) -> Result<(), QmpError> {
        let mut next = self.clone();
        for (key, value) in args {
            if key == "backend-transfer" {
                next.backend_transfer = value.as_bool().ok_or_else(|| {
                    QmpError::generic(
                        "Invalid parameter type for 'backend-transfer', expected: boolean",
                    )
                })?;
                continue;
            }
            let Some((name, field, min, max)) = PARAMETERS.iter().find(|p| p.0 == key) else {
                return Err(QmpError::generic(format!(
                    "Parameter '{key}' is unexpected"
                )));
            };
            let v = value.as_u64().ok_or_else(|| {
                QmpError::generic(format!(
                    "Invalid parameter type for '{name}', expected: integer"
                ))
            })?;
            if v < *min || v > *max {
                return Err(QmpError::generic(format!(
                    "Parameter '{name}' expects a value between {min} and {max}"
                )));
            }
            *field(&mut next) = v;
        }
        *self = next;
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationStatus {
    Setup,
    Active,
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
}

/// One migration, shared by its thread and QMP.
pub struct MigrationJob {
    pub info: Mutex<MigrationInfo>,
    cancel: AtomicBool,
    /// A second handle on the connection, so a cancel can unblock the
    /// thread's writes.
    channel: Mutex<Option<Box<dyn migration::Channel>>>,
    /// Bytes put on the wire so far, counted as they are written, so
    /// `query-migrate` moves during a pass, not only between passes.
    wire_bytes: AtomicU64,
}

impl MigrationJob {
    pub fn new() -> Self {
        Self {
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
            }),
            cancel: AtomicBool::new(false),
            channel: Mutex::new(None),
            wire_bytes: AtomicU64::new(0),
        }
    }

    pub fn add_wire_bytes(&self, n: u64) {
        self.wire_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Asks the thread to stop and shuts the connection so it notices at
    /// once, even in the middle of a write.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(c) = devices::bus::lock(&self.channel).as_ref() {
            let _ = c.shutdown();
        }
    }

    pub fn set_channel(&self, channel: Option<Box<dyn migration::Channel>>) {
        *devices::bus::lock(&self.channel) = channel;
    }

    pub fn forget_channel(&self) {
        *devices::bus::lock(&self.channel) = None;
    }

    pub fn elapsed_ms(&self) -> u64 {
        devices::bus::lock(&self.info).started.elapsed().as_millis() as u64
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut devices::bus::lock(&self.info));
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
        v
    }
}

impl Default for MigrationJob {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_set_all_or_nothing() {
        let mut p = MigrationParameters::default();
        assert_eq!(p.to_qmp()["downtime-limit"], 300);
        let args: Map<String, Value> =
            serde_json::from_str(r#"{"downtime-limit": 50, "announce-rounds": 3}"#).unwrap();
        p.apply(&args).unwrap();
        assert_eq!((p.downtime_limit_ms, p.announce_rounds), (50, 3));
        let bad: Map<String, Value> =
            serde_json::from_str(r#"{"downtime-limit": 10, "announce-step": "x"}"#).unwrap();
        assert!(p.apply(&bad).is_err());
        assert_eq!(
            p.downtime_limit_ms, 50,
            "nothing applied from a rejected call"
        );
        let unknown: Map<String, Value> = serde_json::from_str(r#"{"frobs": 1}"#).unwrap();
        assert!(p.apply(&unknown).unwrap_err().desc.contains("unexpected"));
        let range: Map<String, Value> = serde_json::from_str(r#"{"announce-initial": 0}"#).unwrap();
        assert!(p.apply(&range).is_err());
    }

    #[test]
    fn capabilities_set_all_or_nothing() {
        let mut p = MigrationParameters::default();
        assert!(p.auto_converge, "Ferry converges by default");
        let off: Vec<Value> =
            serde_json::from_str(r#"[{"capability": "auto-converge", "state": false}]"#).unwrap();
        p.apply_capabilities(&off).unwrap();
        assert_eq!(
            p.capabilities_to_qmp(),
            json!([{ "capability": "auto-converge", "state": false }])
        );
        let mixed: Vec<Value> = serde_json::from_str(
            r#"[{"capability": "auto-converge", "state": true}, {"capability": "postcopy-ram", "state": true}]"#,
        )
        .unwrap();
        let e = p.apply_capabilities(&mixed).unwrap_err();
        assert!(e.desc.contains("postcopy-ram"), "{}", e.desc);
        assert!(!p.auto_converge, "nothing applied from a rejected call");
        let malformed: Vec<Value> = serde_json::from_str(r#"[{"capability": 1}]"#).unwrap();
        assert!(p.apply_capabilities(&malformed).is_err());
        let throttle: Map<String, Value> =
            serde_json::from_str(r#"{"cpu-throttle-initial": 30, "max-cpu-throttle": 90}"#)
                .unwrap();
        p.apply(&throttle).unwrap();
        assert_eq!((p.throttle().initial, p.throttle().max), (30, 90));
        let over: Map<String, Value> =
            serde_json::from_str(r#"{"max-cpu-throttle": 100}"#).unwrap();
        assert!(p.apply(&over).is_err());
    }
}
