//! A migration's timeline: what happened when, on one time axis (ms
//! from the start of the migration on the source) — each RAM pass with
//! its bytes, pages and rate, the guest's dirty rate, the auto-converge
//! throttle, the window the guest was stopped, the destination's resume
//! and the announce frames it sent, per identity.
//!
//! The data is plain serde (`ferry ctl migrate --timeline-json`); the
//! picture ([`svg`]) is drawn with plotters: the whole migration on top,
//! the switchover (stop to the last announce frame) zoomed below.

use serde::{Deserialize, Serialize};

mod draw;

pub use draw::{svg, DrawError};

/// Everything the source and (after it acknowledged) the destination
/// recorded about one migration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    pub uri: String,
    /// multifd channels (0: RAM on the main connection).
    pub channels: u32,
    pub passes: Vec<Pass>,
    /// The auto-converge throttle each time it changed.
    pub throttle: Vec<ThrottleStep>,
    /// When the guest was stopped for the last pass.
    pub stop_ms: Option<f64>,
    /// When the destination acknowledged (the source's downtime ends) or,
    /// for a snapshot, when the guest ran again.
    pub resume_ms: Option<f64>,
    pub downtime_ms: Option<f64>,
    pub total_ms: Option<f64>,
    /// The steps of the stop-and-copy phase.
    pub phases: Vec<Phase>,
    pub destination: Option<Destination>,
    /// Frames the source's TAPs received after the stop, sent on to the
    /// destination after its ACK: per NIC, and each batch as it went.
    #[serde(default)]
    pub forward: Vec<Forward>,
    #[serde(default)]
    pub forward_batches: Vec<ForwardBatch>,
    /// `completed`, `failed`, `cancelled`, or the status so far.
    pub status: String,
    /// Nothing more will be added (the destination's report came, or the
    /// wait for it ended).
    pub complete: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Pass {
    /// 1 for the first (full) pass.
    pub pass: u64,
    pub start_ms: f64,
    pub end_ms: f64,
    /// Bytes on the wire (or into the file) for this pass.
    pub bytes: u64,
    pub data_pages: u64,
    pub zero_pages: u64,
    /// Bytes per second over the pass, in MB/s (1e6).
    pub mbytes_per_sec: f64,
    /// Pages the guest dirtied while the pass ran, and at what rate.
    pub dirtied_pages: u64,
    pub dirty_mbytes_per_sec: f64,
    /// Sent while the guest ran (false: the last pass, guest stopped).
    pub live: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ThrottleStep {
    pub at_ms: f64,
    pub percent: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub ms: f64,
}

/// What the destination reported after it acknowledged.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Destination {
    /// When the guest ran there (on the source's axis; None: it did not
    /// within the report's wait, e.g. `-S`).
    pub resumed_ms: Option<f64>,
    pub announce: Vec<AnnounceFrame>,
    /// Frames the report left out (it keeps the first ones).
    pub announce_left_out: u64,
    /// What became of the forwarded frames there, per NIC.
    #[serde(default)]
    pub forwarded: Vec<Delivered>,
}

/// One NIC's forwarding on the source.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Forward {
    pub nic: String,
    /// From the ACK to the end record.
    pub start_ms: f64,
    pub end_ms: f64,
    pub captured: u64,
    pub forwarded: u64,
    pub dropped: u64,
    /// `switch-moved`, `quiet`, `time-bound`, `byte-bound`, `broken`.
    pub ended_by: String,
}

/// Frames sent to the destination in one write.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ForwardBatch {
    pub at_ms: f64,
    pub frames: u64,
}

/// One NIC's forwarded frames on the destination.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Delivered {
    pub nic: String,
    pub received: u64,
    pub delivered: u64,
    pub filtered: u64,
    pub dropped: u64,
    /// Frames of the destination's own TAP that waited behind them.
    pub held: u64,
}

/// One announce event on the destination.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AnnounceFrame {
    pub at_ms: f64,
    pub nic: String,
    /// `rarp` (Ferry's frame), `guest-asked` (VIRTIO_NET_S_ANNOUNCE
    /// raised), `guest-acked` (the driver's ANNOUNCE_ACK), `guest` (an
    /// identity the guest sent from after it was asked).
    pub kind: String,
    /// The identity: MAC and VLAN (None: untagged; both empty for the
    /// guest-asked/acked events).
    pub mac: String,
    pub vlan: Option<u16>,
}

impl Timeline {
    /// The data as JSON, for scripts.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A migration of three passes with a throttle step, a downtime of
    /// 2 ms and a destination that announced two identities.
    pub(crate) fn sample() -> Timeline {
        let pass = |n: u64, start: f64, end: f64, bytes: u64, live| Pass {
            pass: n,
            start_ms: start,
            end_ms: end,
            bytes,
            data_pages: bytes / 4096,
            zero_pages: 1000,
            mbytes_per_sec: bytes as f64 / ((end - start) * 1e3),
            dirtied_pages: 5000 / n,
            dirty_mbytes_per_sec: 50.0,
            live,
        };
        Timeline {
            uri: "tcp:198.18.1.2:4444".into(),
            channels: 2,
            passes: vec![
                pass(1, 1.0, 1200.0, 2 << 30, true),
                pass(2, 1200.0, 1260.0, 20 << 20, true),
                pass(3, 1260.5, 1261.5, 1 << 20, false),
            ],
            throttle: vec![ThrottleStep {
                at_ms: 1200.0,
                percent: 20,
            }],
            stop_ms: Some(1260.2),
            resume_ms: Some(1262.2),
            downtime_ms: Some(2.0),
            total_ms: Some(1262.3),
            phases: vec![Phase {
                name: "last pass".into(),
                ms: 1.0,
            }],
            destination: Some(Destination {
                resumed_ms: Some(1262.5),
                announce: vec![
                    AnnounceFrame {
                        at_ms: 1262.6,
                        nic: "net0".into(),
                        kind: "rarp".into(),
                        mac: "02:00:00:00:00:01".into(),
                        vlan: None,
                    },
                    AnnounceFrame {
                        at_ms: 1262.7,
                        nic: "net0".into(),
                        kind: "rarp".into(),
                        mac: "02:00:00:00:00:64".into(),
                        vlan: Some(100),
                    },
                ],
                announce_left_out: 0,
                forwarded: vec![Delivered {
                    nic: "net0".into(),
                    received: 12,
                    delivered: 12,
                    ..Default::default()
                }],
            }),
            forward: vec![Forward {
                nic: "net0".into(),
                start_ms: 1262.2,
                end_ms: 1266.0,
                captured: 12,
                forwarded: 12,
                dropped: 0,
                ended_by: "switch-moved".into(),
            }],
            forward_batches: vec![ForwardBatch {
                at_ms: 1262.3,
                frames: 10,
            }],
            status: "completed".into(),
            complete: true,
        }
    }

    #[test]
    fn json_round_trips() {
        let t = sample();
        let back: Timeline = serde_json::from_str(&t.to_json()).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn the_picture_names_every_part() {
        let picture = svg(&sample()).unwrap();
        assert!(picture.starts_with("<svg"), "{}", &picture[..80]);
        for text in [
            "pass 1",
            "pass 3",
            "guest stopped 2.0 ms, until the ACK",
            "12 captured, 12 forwarded, 0 dropped, 12 delivered there (ended: switch-moved)",
            "resumed",
            "02:00:00:00:00:64 VLAN 100",
            "throttle",
        ] {
            assert!(picture.contains(text), "{text} missing");
        }
        // A timeline with nothing in it still draws (an empty chart).
        let empty = svg(&Timeline::default()).unwrap();
        assert!(empty.contains("</svg>"));
    }
}
