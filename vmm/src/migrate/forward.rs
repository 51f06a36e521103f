//! No frame lost across a live migration (issue #17): what the source's
//! TAPs receive after the guest stopped goes to the destination on the
//! migration connection, after the destination's ACK.
//!
//! The source's NICs capture their TAPs from the moment the guest stops
//! (devices::virtio::net::forward). Once the destination has acknowledged,
//! the source sends every captured frame as a record
//!
//! ```text
//! "FERRYFRM"  u16 LE NIC index  u32 LE length  frame (virtio-net header + Ethernet)
//! ```
//!
//! and goes on doing so as frames arrive, until, for every NIC, one of:
//! - the switch has moved: a frame from one of the guest's MACs came in
//!   (its announce from the new port, flooded back here) and then no
//!   frame for the guest for [`QUIET_AFTER_MOVE`];
//! - no frame for the guest for [`QUIET`] (a switch that does not flood
//!   the announce back);
//! - the time bound (`x-forward-max-time`, from the ACK).
//!
//! Past the byte bound (`x-forward-max-bytes` captured per NIC, which is
//! also all the memory a capture takes) frames are read, counted as
//! dropped and not kept, until forwarding ends by one of the above.
//!
//! Then `"FERRYFEN"`. The destination puts each frame in its NIC's
//! backlog, which the guest gets before its own TAP's frames; those wait
//! (held, bounded) until the end record, or the connection's end.

use std::io::{self, BufReader, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::bus::lock;
use devices::virtio::net::device::MAX_FRAME_LEN;
use devices::virtio::net::forward::{Capture, CaptureView};
use serde::Serialize;

use crate::builder::VmParts;

const FRAME: &[u8; 8] = b"FERRYFRM";
const END: &[u8; 8] = b"FERRYFEN";

/// The switch has moved and no frame for the guest came for this long.
pub const QUIET_AFTER_MOVE: Duration = Duration::from_millis(3);
/// No frame for the guest came for this long (the move unseen).
pub const QUIET: Duration = Duration::from_millis(200);
/// Longest an exit (`quit`, SIGTERM) of a source waits for its forwarding
/// to end: past `x-forward-max-time`'s default.
pub const EXIT_WAIT: Duration = Duration::from_millis(2500);
/// How long the sender waits for a frame before it checks the bounds.
const POLL: Duration = Duration::from_millis(1);
/// How long the destination waits for the source beyond its time bound.
const SLACK: Duration = Duration::from_secs(2);

/// Why a NIC's forwarding ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndedBy {
    SwitchMoved,
    Quiet,
    TimeBound,
    /// The connection failed.
    Broken,
}

impl EndedBy {
    /// As `query-migrate` and the timeline name it.
    pub fn name(self) -> &'static str {
        match self {
            EndedBy::SwitchMoved => "switch-moved",
            EndedBy::Quiet => "quiet",
            EndedBy::TimeBound => "time-bound",
            EndedBy::Broken => "broken",
        }
    }
}

/// One NIC's frames across the migration's end, as `query-migrate`
/// (`x-frames`) and the timeline show them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NicFrames {
    pub nic: String,
    /// Source: kept while the guest was stopped, sent on, dropped (past a
    /// bound, or a failed migration's that did not fit back), flooded
    /// frames left to the switch, and frames of the guest's own announce.
    pub captured: u64,
    pub captured_bytes: u64,
    pub forwarded: u64,
    pub dropped: u64,
    pub flooded: u64,
    pub own: u64,
    /// Source, after a failed migration: frames the guest gets here.
    pub given_back: u64,
    /// Destination: frames received from the source, delivered to the
    /// guest, refused by its receive filter, of its own TAP held behind.
    pub received: u64,
    pub delivered: u64,
    pub filtered: u64,
    pub held: u64,
    /// Holds that ended by their own bound before the end record.
    pub hold_expired: u64,
    pub longest_hold_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<EndedBy>,
}

/// Appends one frame record for NIC `nic` to `buf`.
pub fn encode_frame(buf: &mut Vec<u8>, nic: u16, frame: &[u8]) {
    buf.extend_from_slice(FRAME);
    buf.extend_from_slice(&nic.to_le_bytes());
    buf.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    buf.extend_from_slice(frame);
}

pub fn encode_end(buf: &mut Vec<u8>) {
    buf.extend_from_slice(END);
}

/// One record as the destination reads it.
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    Frame { nic: u16, frame: Vec<u8> },
    End,
}

/// Reads one record; anything but a record is an error naming it.
pub fn read_record(r: &mut impl Read) -> io::Result<Record> {
    let mut tag = [0u8; 8];
    r.read_exact(&mut tag)?;
    if &tag == END {
        return Ok(Record::End);
    }
    if &tag != FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "expected a forwarded frame, got {:?}",
                String::from_utf8_lossy(&tag)
            ),
        ));
    }
    let mut head = [0u8; 6];
    r.read_exact(&mut head)?;
    let nic = u16::from_le_bytes([head[0], head[1]]);
    let len = u32::from_le_bytes([head[2], head[3], head[4], head[5]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a forwarded frame of {len} bytes (at most {MAX_FRAME_LEN})"),
        ));
    }
    let mut frame = vec![0u8; len];
    r.read_exact(&mut frame)?;
    Ok(Record::Frame { nic, frame })
}

/// Whether a NIC's forwarding is over, and why.
fn ended(view: &CaptureView, since: Instant, now: Instant, max_time: Duration) -> Option<EndedBy> {
    let last = view.last_for_guest.map_or(since, |t| t.max(since));
    if let Some(moved) = view.moved_at {
        if now.saturating_duration_since(last.max(moved)) >= QUIET_AFTER_MOVE {
            return Some(EndedBy::SwitchMoved);
        }
    }
    if now.saturating_duration_since(since) >= max_time {
        return Some(EndedBy::TimeBound);
    }
    if now.saturating_duration_since(last) >= QUIET {
        return Some(EndedBy::Quiet);
    }
    None
}

/// The source, after the ACK: forwards every NIC's captured frames on
/// `out` until each NIC's forwarding ends (see the module), then the end
/// record. `on_batch` hears of each batch sent (ms are the caller's).
pub fn send(
    out: &mut dyn Write,
    parts: &VmParts,
    captures: &[Arc<Capture>],
    max_time: Duration,
    mut on_batch: impl FnMut(u64),
) -> Vec<NicFrames> {
    let since = Instant::now();
    let mut stats: Vec<NicFrames> = parts
        .nets
        .iter()
        .map(|n| NicFrames {
            nic: lock(n).device().state().id.clone(),
            ..Default::default()
        })
        .collect();
    let mut done: Vec<bool> = captures.iter().map(|_| false).collect();
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let mut broken = false;
    let mut batch_frames = 0u64;
    while !broken && done.iter().any(|d| !d) {
        let mut waited = false;
        for (i, capture) in captures.iter().enumerate() {
            if done[i] {
                continue;
            }
            let wait = if waited { Duration::ZERO } else { POLL };
            waited = true;
            let view = capture.take(&mut frames, wait);
            let end = ended(&view, since, Instant::now(), max_time);
            if end.is_some() {
                // Whatever arrived up to now still goes.
                frames.extend(capture.close());
            }
            for f in frames.drain(..) {
                encode_frame(&mut buf, i as u16, &f);
                stats[i].forwarded += 1;
                batch_frames += 1;
            }
            if let Some(why) = end {
                done[i] = true;
                stats[i].ended_by = Some(why);
            }
        }
        if !buf.is_empty() {
            if let Err(e) = out.write_all(&buf).and_then(|()| out.flush()) {
                log::warn!("forwarding frames to the destination: {e}");
                broken = true;
            } else {
                on_batch(std::mem::take(&mut batch_frames));
            }
            buf.clear();
        }
    }
    if !broken {
        encode_end(&mut buf);
        if let Err(e) = out.write_all(&buf).and_then(|()| out.flush()) {
            log::warn!("ending the forwarded frames: {e}");
        }
    }
    for (i, net) in parts.nets.iter().enumerate() {
        let counts = lock(net).device_mut().stop_capture(false);
        let s = &mut stats[i];
        if let Some(c) = counts {
            s.captured = c.captured;
            s.captured_bytes = c.captured_bytes;
            s.dropped = c.dropped;
            s.flooded = c.flooded;
            s.own = c.own;
        }
        if broken && !done.get(i).copied().unwrap_or(true) {
            s.ended_by = Some(EndedBy::Broken);
        }
    }
    stats
}

/// The destination, after its ACK: reads forwarded frames from `input`
/// into the NICs' backlogs until the end record, then lets their held
/// TAP frames follow (also when the source goes away). `max_time`: the
/// source's time bound.
pub fn receive(input: &mut dyn migration::Channel, parts: &VmParts, max_time: Duration) {
    if let Err(e) = input.set_timeouts(Some(max_time + SLACK), None) {
        log::debug!("forwarded frames: {e}");
    }
    let mut r = BufReader::with_capacity(1 << 16, &mut *input);
    let mut batch: Vec<Vec<Vec<u8>>> = parts.nets.iter().map(|_| Vec::new()).collect();
    let flush = |batch: &mut Vec<Vec<Vec<u8>>>| {
        for (i, frames) in batch.iter_mut().enumerate() {
            if !frames.is_empty() {
                lock(&parts.nets[i])
                    .device_mut()
                    .push_forwarded(frames.drain(..));
            }
        }
    };
    loop {
        match read_record(&mut r) {
            Ok(Record::Frame { nic, frame }) => match batch.get_mut(nic as usize) {
                Some(b) => b.push(frame),
                None => {
                    log::warn!("forwarded frames: a frame for NIC {nic}, which is not here");
                    break;
                }
            },
            Ok(Record::End) => break,
            Err(e) => {
                log::warn!("forwarded frames: {e}");
                break;
            }
        }
        // Frames go to the guest as soon as nothing more is buffered.
        if r.buffer().is_empty() {
            flush(&mut batch);
        }
    }
    flush(&mut batch);
    for net in &parts.nets {
        lock(net).device_mut().release_hold();
    }
    if let Err(e) = input.set_timeouts(None, None) {
        log::debug!("forwarded frames: {e}");
    }
}

/// The destination's counts, per NIC.
pub fn received(parts: &VmParts) -> Vec<NicFrames> {
    parts
        .nets
        .iter()
        .map(|n| {
            let t = lock(n);
            let c = t.device().backlog_counts();
            NicFrames {
                nic: t.device().state().id.clone(),
                received: c.received,
                delivered: c.delivered,
                filtered: c.filtered,
                dropped: c.dropped,
                held: c.held,
                hold_expired: c.hold_expired,
                longest_hold_us: c.longest_hold_us,
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::net::forward::CaptureCounts;

    #[test]
    fn records_round_trip_and_garbage_is_named() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 1, &[7; 70]);
        encode_end(&mut buf);
        let mut r = &buf[..];
        assert_eq!(
            read_record(&mut r).unwrap(),
            Record::Frame {
                nic: 1,
                frame: vec![7; 70]
            }
        );
        assert_eq!(read_record(&mut r).unwrap(), Record::End);
        let e = read_record(&mut &b"FERRYACK"[..]).unwrap_err();
        assert!(e.to_string().contains("FERRYACK"), "{e}");
        let mut big = Vec::new();
        big.extend_from_slice(FRAME);
        big.extend_from_slice(&0u16.to_le_bytes());
        big.extend_from_slice(&u32::MAX.to_le_bytes());
        let e = read_record(&mut &big[..]).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        // Truncated in the middle of a frame.
        assert!(read_record(&mut &buf[..20]).is_err());
    }

    #[test]
    fn why_it_ended_is_named_alike_in_query_migrate_and_the_timeline() {
        for e in [
            EndedBy::SwitchMoved,
            EndedBy::Quiet,
            EndedBy::TimeBound,
            EndedBy::Broken,
        ] {
            assert_eq!(serde_json::to_value(e).unwrap(), e.name());
        }
    }

    #[test]
    fn forwarding_ends_by_the_first_rule_that_holds() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let bounds = Duration::from_millis(1000);
        let view = |last: Option<u64>, moved: Option<u64>, dropped| CaptureView {
            counts: CaptureCounts {
                dropped,
                ..Default::default()
            },
            last_for_guest: last.map(ms),
            moved_at: moved.map(ms),
        };
        // Frames still coming, the switch not moved.
        assert_eq!(ended(&view(Some(99), None, 0), t0, ms(100), bounds), None);
        // Moved, then 3 ms without a frame for the guest.
        assert_eq!(
            ended(&view(Some(100), Some(98), 0), t0, ms(102), bounds),
            None
        );
        assert_eq!(
            ended(&view(Some(100), Some(98), 0), t0, ms(103), bounds),
            Some(EndedBy::SwitchMoved)
        );
        assert_eq!(
            ended(&view(Some(100), None, 0), t0, ms(300), bounds),
            Some(EndedBy::Quiet)
        );
        // A frame captured before forwarding began counts from its start.
        assert_eq!(
            ended(&view(Some(0), None, 0), ms(50), ms(249), bounds),
            None
        );
        assert_eq!(
            ended(&view(Some(995), None, 0), t0, ms(1000), bounds),
            Some(EndedBy::TimeBound)
        );
        // Past the byte bound frames are counted, and forwarding goes on.
        assert_eq!(ended(&view(Some(10), None, 3), t0, ms(11), bounds), None);
    }
}
