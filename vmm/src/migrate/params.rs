//! The migration's knobs, with QEMU's names: the parameters
//! (`migrate-set-parameters`) and the capabilities
//! (`migrate-set-capabilities`), set on either end before a migration.

use serde_json::{json, Map, Value};

use crate::qmp::QmpError;

/// QMP's migration parameters and capabilities that Ferry uses.
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
    /// An `announce-*` parameter was set here: on a destination, its own
    /// schedule then wins over the one the source's stream carries.
    pub announce_set: bool,
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
    /// QEMU's `events`: MIGRATION and MIGRATION_PASS events, on each end
    /// that has it on (off by default, as in QEMU).
    pub events: bool,
    /// QEMU's `pause-before-switchover`: the source stops the guest after
    /// the live passes and waits in `pre-switchover` for
    /// `migrate-continue` (libvirt hands storage over in between).
    pub pause_before_switchover: bool,
    pub throttle_trigger_threshold: u64,
    pub cpu_throttle_initial: u64,
    pub cpu_throttle_increment: u64,
    pub max_cpu_throttle: u64,
    /// `tls-creds`, `tls-hostname`, `tls-authz`: listed (libvirt clears
    /// them before a plain migration) but only empty until TLS lands.
    pub tls_creds: String,
    pub tls_hostname: String,
    pub tls_authz: String,
    /// `x-incoming-timeout` (ms): how long a connection to a waiting
    /// destination may take to finish its TLS handshake and send a valid
    /// stream header and config before it is dropped (and the destination
    /// listens on).
    pub incoming_timeout_ms: u64,
    /// QEMU's `multifd` capability: guest RAM travels over
    /// `multifd_channels` connections of its own besides the main one.
    /// Both ends must have it, with the same count.
    pub multifd: bool,
    pub multifd_channels: u64,
    /// QEMU 9's `mapped-ram`: a `file:` snapshot lays guest RAM out at
    /// fixed offsets so a restore maps it (migration::snapshot). On by
    /// default in Ferry (QEMU's is off): a restore then runs at once.
    pub mapped_ram: bool,
    /// Ferry's `x-forward-frames`: frames the source's TAPs receive after
    /// the guest stopped go to the destination (migrate::forward), within
    /// `x-forward-max-bytes` per NIC and `x-forward-max-time` ms after the
    /// destination's ACK.
    pub forward_frames: bool,
    pub forward_max_bytes: u64,
    pub forward_max_ms: u64,
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
            announce_set: false,
            max_passes: 30,
            backend_transfer: false,
            auto_converge: true,
            events: false,
            pause_before_switchover: false,
            throttle_trigger_threshold: 50,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            max_cpu_throttle: 99,
            tls_creds: String::new(),
            tls_hostname: String::new(),
            tls_authz: String::new(),
            incoming_timeout_ms: 5000,
            multifd: false,
            // QEMU's default, and this project's machine's core count:
            // one sending and one receiving thread per channel.
            multifd_channels: 2,
            mapped_ram: true,
            forward_frames: true,
            forward_max_bytes: 16 << 20,
            forward_max_ms: 2000,
        }
    }
}

type Flag = fn(&mut MigrationParameters) -> &mut bool;

/// The capabilities Ferry implements, in `query-migrate-capabilities`'
/// order.
const CAPABILITIES: &[(&str, Flag)] = &[
    ("auto-converge", |p| &mut p.auto_converge),
    ("events", |p| &mut p.events),
    ("pause-before-switchover", |p| {
        &mut p.pause_before_switchover
    }),
    ("multifd", |p| &mut p.multifd),
    ("mapped-ram", |p| &mut p.mapped_ram),
    ("x-forward-frames", |p| &mut p.forward_frames),
];

/// QEMU 7.2's other capabilities: Ferry knows them and does not do them.
/// Turning one off is accepted (it is off); turning it on is an error
/// naming it. `query-migrate-capabilities` does not list them, so an
/// orchestrator that asks first (libvirt does) never tries.
const NOT_IMPLEMENTED: &[&str] = &[
    "xbzrle",
    "rdma-pin-all",
    "zero-blocks",
    "compress",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "block",
    "return-path",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
];

/// (QMP name, field, min, max) of every integer parameter, so query and
/// set agree.
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
        "x-incoming-timeout",
        |p| &mut p.incoming_timeout_ms,
        100,
        3_600_000,
    ),
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
    ("multifd-channels", |p| &mut p.multifd_channels, 1, 255),
    (
        "x-forward-max-bytes",
        |p| &mut p.forward_max_bytes,
        0,
        1 << 30,
    ),
    ("x-forward-max-time", |p| &mut p.forward_max_ms, 1, 60_000),
];

type Text = fn(&mut MigrationParameters) -> &mut String;
const TEXT_PARAMETERS: &[(&str, Text)] = &[
    ("tls-creds", |p| &mut p.tls_creds),
    ("tls-hostname", |p| &mut p.tls_hostname),
    ("tls-authz", |p| &mut p.tls_authz),
];

impl MigrationParameters {
    /// Connections RAM travels on besides the main one: 0 without multifd.
    pub fn ram_channels(&self) -> u32 {
        if self.multifd {
            self.multifd_channels as u32
        } else {
            0
        }
    }

    /// The announce schedule these parameters describe.
    pub fn announce(&self) -> net::AnnounceParams {
        net::AnnounceParams {
            initial_ms: self.announce_initial_ms,
            max_ms: self.announce_max_ms,
            rounds: self.announce_rounds,
            step_ms: self.announce_step_ms,
        }
    }

    /// Takes `p` as the announce schedule (not as one set by the user).
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
        let mut copy = self.clone();
        CAPABILITIES
            .iter()
            .map(|(name, flag)| json!({ "capability": name, "state": *flag(&mut copy) }))
            .collect()
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
            if let Some((_, flag)) = CAPABILITIES.iter().find(|c| c.0 == name) {
                *flag(&mut next) = state;
            } else if NOT_IMPLEMENTED.contains(&name) {
                if state {
                    return Err(QmpError::generic(format!(
                        "Migration capability '{name}' is not supported by Ferry"
                    )));
                }
            } else {
                // QAPI's wording for a value outside the enum.
                return Err(QmpError::generic(format!(
                    "Parameter 'capability' does not accept value '{name}'"
                )));
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
        for (name, field) in TEXT_PARAMETERS {
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
            if let Some((name, field)) = TEXT_PARAMETERS.iter().find(|p| p.0 == key) {
                // QEMU takes a StrOrNull here; null means "".
                let text = match value {
                    Value::Null => "",
                    Value::String(s) => s.as_str(),
                    _ => {
                        return Err(QmpError::generic(format!(
                            "Invalid parameter type for '{name}', expected: string"
                        )))
                    }
                };
                // As QEMU: the object is looked up when a migration starts.
                let _ = name;
                *field(&mut next) = text.to_string();
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
            if *name == "multifd-channels" {
                // QEMU 7.2's words: a uint8 in QAPI, then its own check
                // (which names the field with underscores).
                if v > 255 {
                    return Err(QmpError::generic(
                        "Parameter 'multifd-channels' expects uint8_t",
                    ));
                }
                if v == 0 {
                    return Err(QmpError::generic(
                        "Parameter 'multifd_channels' expects a value between 1 and 255",
                    ));
                }
            }
            if v < *min || v > *max {
                return Err(QmpError::generic(format!(
                    "Parameter '{name}' expects a value between {min} and {max}"
                )));
            }
            *field(&mut next) = v;
            if name.starts_with("announce-") {
                next.announce_set = true;
            }
        }
        *self = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(text: &str) -> Vec<Value> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn parameters_set_all_or_nothing() {
        let mut p = MigrationParameters::default();
        assert_eq!(p.to_qmp()["downtime-limit"], 300);
        assert_eq!(p.to_qmp()["tls-creds"], "");
        let args: Map<String, Value> =
            serde_json::from_str(r#"{"downtime-limit": 50, "announce-rounds": 3}"#).unwrap();
        p.apply(&args).unwrap();
        assert_eq!((p.downtime_limit_ms, p.announce_rounds), (50, 3));
        assert!(p.announce_set);
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
        // QEMU 7.2's texts, as it answers here.
        for (v, desc) in [
            (
                0,
                "Parameter 'multifd_channels' expects a value between 1 and 255",
            ),
            (256, "Parameter 'multifd-channels' expects uint8_t"),
        ] {
            let args: Map<String, Value> =
                serde_json::from_str(&format!(r#"{{"multifd-channels": {v}}}"#)).unwrap();
            assert_eq!(p.apply(&args).unwrap_err().desc, desc);
        }
    }

    #[test]
    fn tls_parameters_are_cleared_as_libvirt_does_and_set() {
        let mut p = MigrationParameters::default();
        let clear: Map<String, Value> =
            serde_json::from_str(r#"{"tls-creds": "", "tls-hostname": null}"#).unwrap();
        p.apply(&clear).unwrap();
        assert!(!p.announce_set);
        let set: Map<String, Value> =
            serde_json::from_str(r#"{"tls-creds": "tls0", "tls-hostname": "b.example"}"#).unwrap();
        p.apply(&set).unwrap();
        assert_eq!(p.to_qmp()["tls-creds"], "tls0");
        assert_eq!(p.to_qmp()["tls-hostname"], "b.example");
        let bad: Map<String, Value> = serde_json::from_str(r#"{"tls-creds": 7}"#).unwrap();
        let e = p.apply(&bad).unwrap_err();
        assert!(e.desc.contains("tls-creds"), "{}", e.desc);
    }

    #[test]
    fn capabilities_set_all_or_nothing() {
        let mut p = MigrationParameters::default();
        assert!(p.auto_converge, "Ferry converges by default");
        assert!(!p.events && !p.pause_before_switchover, "QEMU's defaults");
        p.apply_capabilities(&caps(
            r#"[{"capability": "auto-converge", "state": false},
                {"capability": "events", "state": true},
                {"capability": "pause-before-switchover", "state": true}]"#,
        ))
        .unwrap();
        assert_eq!(
            p.capabilities_to_qmp(),
            json!([
                { "capability": "auto-converge", "state": false },
                { "capability": "events", "state": true },
                { "capability": "pause-before-switchover", "state": true },
                { "capability": "multifd", "state": false },
                { "capability": "mapped-ram", "state": true },
                { "capability": "x-forward-frames", "state": true },
            ])
        );
        let mixed = caps(
            r#"[{"capability": "auto-converge", "state": true}, {"capability": "postcopy-ram", "state": true}]"#,
        );
        let e = p.apply_capabilities(&mixed).unwrap_err();
        assert_eq!(
            e.desc,
            "Migration capability 'postcopy-ram' is not supported by Ferry"
        );
        assert!(!p.auto_converge, "nothing applied from a rejected call");
        // Off is what it is: accepted.
        p.apply_capabilities(&caps(r#"[{"capability": "xbzrle", "state": false}]"#))
            .unwrap();
        let e = p
            .apply_capabilities(&caps(r#"[{"capability": "frobnicate", "state": true}]"#))
            .unwrap_err();
        assert_eq!(
            e.desc,
            "Parameter 'capability' does not accept value 'frobnicate'"
        );
        assert!(p
            .apply_capabilities(&caps(r#"[{"capability": 1}]"#))
            .is_err());
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
