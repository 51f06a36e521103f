//! The destination's report: once it has acknowledged, the guest runs
//! there and is announced, which the source cannot see. When the source
//! asks (`report` in the config section), the destination keeps the
//! connection after its ACK and, once the announce is done (or after
//! [`REPORT_BY`]), sends when the guest first ran and every announce
//! event (ack::send_report), in ms from its ACK; the source puts them on
//! its timeline.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migration::Channel;

use super::ack::send_report;
use super::forward;
use super::job::MigrationJob;
use crate::announce::Announcer;
use crate::builder::VmParts;

/// The report goes at the latest this long after the ACK.
pub const REPORT_BY: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(10);

/// Where and from when to report.
pub struct ReportTo {
    pub channel: Box<dyn Channel>,
    pub acked: Instant,
    /// The source forwards frames first, for up to this many ms.
    pub forward_ms: Option<u64>,
    /// The source wants the report.
    pub report: bool,
    /// The destination's own migration job (`query-migrate` here).
    pub job: Arc<MigrationJob>,
}

/// Sends the report on a thread of its own.
pub fn spawn(to: ReportTo, announcer: Arc<Mutex<Announcer>>, parts: Arc<VmParts>) {
    let spawned = std::thread::Builder::new()
        .name("ferry-report".into())
        .spawn(move || send(to, &announcer, &parts));
    if let Err(e) = spawned {
        log::debug!("migration report: {e}");
    }
}

fn send(mut to: ReportTo, announcer: &Mutex<Announcer>, parts: &VmParts) {
    if let Some(ms) = to.forward_ms {
        forward::receive(&mut *to.channel, parts, Duration::from_millis(ms));
        to.job.update(|i| i.frames = forward::received(parts));
    }
    if !to.report {
        return;
    }
    let deadline = to.acked + REPORT_BY;
    while Instant::now() < deadline {
        let started = parts.started_at.get().is_some();
        if started && devices::bus::lock(announcer).idle() {
            break;
        }
        std::thread::sleep(POLL);
    }
    let ms = |t: Instant| {
        if t >= to.acked {
            (t - to.acked).as_secs_f64() * 1e3
        } else {
            -((to.acked - t).as_secs_f64() * 1e3)
        }
    };
    let log = devices::bus::lock(announcer).log();
    let frames = forward::received(parts);
    if to.forward_ms.is_some() {
        to.job.update(|i| i.frames = frames.clone());
    }
    let report = timeline::Destination {
        resumed_ms: parts.started_at.get().map(|&t| ms(t)),
        announce: log
            .events
            .iter()
            .map(|e| timeline::AnnounceFrame {
                at_ms: ms(e.at),
                nic: e.nic.clone(),
                kind: e.kind.into(),
                mac: e.identity.map(|i| i.0.to_string()).unwrap_or_default(),
                vlan: e.identity.and_then(|i| i.1),
            })
            .collect(),
        announce_left_out: log.events_left_out,
        forwarded: frames
            .into_iter()
            .map(|f| timeline::Delivered {
                nic: f.nic,
                received: f.received,
                delivered: f.delivered,
                filtered: f.filtered,
                dropped: f.dropped,
                held: f.held,
            })
            .collect(),
    };
    let Ok(json) = serde_json::to_vec(&report) else {
        return;
    };
    if let Err(e) = send_report(&mut to.channel, &json) {
        log::debug!("migration report: {e}");
    }
}
