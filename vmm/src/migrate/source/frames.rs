//! The source's part in forwarding frames (super::super::forward): its
//! NICs capture their TAPs from the stop, the frames go to the
//! destination after the ACK, or back to the guest here if the migration
//! fails.

use devices::bus::lock;
use devices::virtio::net::forward::CaptureLimits;

use super::*;
use crate::migrate::forward::{self, NicFrames};

impl Outgoing<'_> {
    /// Whether this migration forwards frames: over a connection (a file
    /// has nobody to forward to), not a local hand-over (the TAP itself
    /// moves, with the frames it holds), with `x-forward-frames` on.
    pub(super) fn forwards_frames(&self, handover: bool) -> bool {
        self.params.forward_frames && !self.to_file && !handover && !self.parts().nets.is_empty()
    }

    /// The guest has stopped: every NIC keeps what its TAP receives.
    pub(super) fn start_captures(&mut self) {
        if !self.forwarding || !self.captures.is_empty() {
            return;
        }
        let limits = CaptureLimits {
            max_bytes: self.params.forward_max_bytes,
        };
        self.captures = self
            .parts()
            .nets
            .iter()
            .map(|n| lock(n).device_mut().start_capture(limits))
            .collect();
    }

    /// The migration failed: the frames captured go to the guest when it
    /// runs here again (before anything its TAP brings later).
    pub(super) fn give_back_frames(&mut self) {
        if self.captures.is_empty() {
            return;
        }
        self.captures.clear();
        let stats: Vec<NicFrames> = self
            .parts()
            .nets
            .iter()
            .map(|n| {
                let mut t = lock(n);
                let nic = t.device().state().id.clone();
                let c = t.device_mut().stop_capture(true).unwrap_or_default();
                NicFrames {
                    nic,
                    captured: c.captured,
                    given_back: c.captured.saturating_sub(c.dropped),
                    dropped: c.dropped,
                    flooded: c.flooded,
                    own: c.own,
                    ..Default::default()
                }
            })
            .collect();
        log::info!("migration failed: captured frames go back to the guest: {stats:?}");
        self.job.update(|i| i.frames = stats);
    }

    /// After the ACK: the captured frames, and those still coming, go to
    /// the destination on the main connection until the switch has moved
    /// (or a bound). On the timeline and in `query-migrate`.
    pub(super) fn forward_frames(&mut self, out: &mut dyn std::io::Write) {
        if self.captures.is_empty() {
            return;
        }
        let captures = std::mem::take(&mut self.captures);
        self.job.set_forwarding(true);
        let start_ms = self.job.now_ms();
        let job = self.job;
        let max_time = Duration::from_millis(self.params.forward_max_ms);
        let stats = forward::send(out, self.parts(), &captures, max_time, |frames| {
            let at_ms = job.now_ms();
            job.record(|t| {
                t.forward_batches
                    .push(timeline::ForwardBatch { at_ms, frames })
            });
        });
        self.job.set_forwarding(false);
        let end_ms = self.job.now_ms();
        log::info!(
            "forwarded frames for {:.1} ms: {}",
            end_ms - start_ms,
            stats
                .iter()
                .map(|s| format!(
                    "{} captured {} forwarded {} dropped {} ({:?})",
                    s.nic, s.captured, s.forwarded, s.dropped, s.ended_by
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        self.job.record(|t| {
            t.forward = stats
                .iter()
                .map(|s| timeline::Forward {
                    nic: s.nic.clone(),
                    start_ms,
                    end_ms,
                    captured: s.captured,
                    forwarded: s.forwarded,
                    dropped: s.dropped,
                    ended_by: s.ended_by.map(|e| e.name().to_string()).unwrap_or_default(),
                })
                .collect();
        });
        self.job.update(|i| i.frames = stats);
    }
}
