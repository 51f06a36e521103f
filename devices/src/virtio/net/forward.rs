//! Frames that must not die while the guest moves (issue #17).
//!
//! On the source, once the guest is stopped for the end of a migration,
//! the NIC goes on reading its TAP into a [`Capture`]: every frame that
//! arrives for the guest, in order, bounded in bytes. The migration thread
//! takes them and sends them to the destination; if the migration fails
//! they go back into the NIC's own backlog and the guest gets them when it
//! resumes here.
//!
//! On the destination, forwarded frames go into the NIC's backlog
//! ([`FrameQueue`]) and reach the guest before anything its own TAP
//! carries: while frames may still be forwarded, the TAP's frames wait in
//! a second queue (the hold) behind them.
//!
//! Which frames are forwarded: unicast ones. A broadcast or multicast
//! frame is flooded by the switch to the destination's port too, so
//! forwarding it would hand the guest a second copy. A frame *from* one of
//! the guest's MACs is the guest announcing itself from its new port (a
//! RARP or gratuitous ARP flooded back to the old one): not forwarded, and
//! the sign that the switch has moved.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use net::tap::VNET_HDR_LEN;
use net::MacAddr;

/// What a capture takes at most, in all: past this, frames are counted
/// and dropped (never unbounded memory, nor an endless stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureLimits {
    pub max_bytes: u64,
}

/// Counts of a capture, for `query-migrate` and the timeline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CaptureCounts {
    /// Frames kept for the destination (or for the guest, after a failure).
    pub captured: u64,
    pub captured_bytes: u64,
    /// Past the byte bound, or left when forwarding ended.
    pub dropped: u64,
    /// Broadcast and multicast frames: the switch floods them to the
    /// destination too.
    pub flooded: u64,
    /// Frames from the guest's own MACs: its announce from the new port.
    pub own: u64,
}

/// What the migration thread sees of a capture.
#[derive(Clone, Copy, Debug, Default)]
pub struct CaptureView {
    pub counts: CaptureCounts,
    /// The last unicast frame for one of the guest's MACs arrived then.
    pub last_for_guest: Option<Instant>,
    /// The first frame from one of the guest's MACs arrived then: the
    /// switch has learned the guest's new port.
    pub moved_at: Option<Instant>,
}

#[derive(Default)]
struct CaptureState {
    frames: VecDeque<Vec<u8>>,
    view: CaptureView,
    closed: bool,
}

/// Frames read from the TAP of a stopped guest, shared by the event loop
/// (which reads them) and the migration thread (which sends them on).
pub struct Capture {
    limits: CaptureLimits,
    state: Mutex<CaptureState>,
    arrived: Condvar,
}

/// How a frame (with its virtio-net header) relates to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// Unicast to one of the guest's MACs.
    ForGuest,
    /// Unicast to another MAC (the guest may be promiscuous).
    OtherUnicast,
    /// Broadcast or multicast.
    Flooded,
    /// Sent from one of the guest's MACs.
    Own,
    /// Too short to carry an Ethernet header.
    Runt,
}

/// Classifies `frame` (virtio-net header, then Ethernet) for a guest
/// answering to `macs`.
pub fn classify(frame: &[u8], macs: &[MacAddr]) -> FrameKind {
    let Some(eth) = frame.get(VNET_HDR_LEN..).filter(|e| e.len() >= 14) else {
        return FrameKind::Runt;
    };
    let mac_at = |at: usize| {
        let mut m = [0u8; 6];
        m.copy_from_slice(&eth[at..at + 6]);
        MacAddr(m)
    };
    let (dst, src) = (mac_at(0), mac_at(6));
    if macs.contains(&src) {
        FrameKind::Own
    } else if dst.is_multicast() {
        FrameKind::Flooded
    } else if macs.contains(&dst) {
        FrameKind::ForGuest
    } else {
        FrameKind::OtherUnicast
    }
}

impl Capture {
    pub fn new(limits: CaptureLimits) -> Self {
        Self {
            limits,
            state: Mutex::new(CaptureState::default()),
            arrived: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CaptureState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One frame read from the TAP, for a guest answering to `macs`.
    pub fn offer(&self, frame: &[u8], macs: &[MacAddr]) {
        let now = Instant::now();
        let mut s = self.lock();
        match classify(frame, macs) {
            FrameKind::Own => {
                s.view.counts.own += 1;
                s.view.moved_at.get_or_insert(now);
                return;
            }
            FrameKind::Flooded => {
                s.view.counts.flooded += 1;
                return;
            }
            FrameKind::Runt => return,
            FrameKind::ForGuest => s.view.last_for_guest = Some(now),
            FrameKind::OtherUnicast => {}
        }
        let len = frame.len() as u64;
        if s.closed || s.view.counts.captured_bytes + len > self.limits.max_bytes {
            s.view.counts.dropped += 1;
            return;
        }
        s.view.counts.captured += 1;
        s.view.counts.captured_bytes += frame.len() as u64;
        s.frames.push_back(frame.to_vec());
        drop(s);
        self.arrived.notify_all();
    }

    /// Moves every kept frame into `out`, waiting up to `wait` for one if
    /// none is there.
    pub fn take(&self, out: &mut Vec<Vec<u8>>, wait: Duration) -> CaptureView {
        let mut s = self.lock();
        if s.frames.is_empty() && !s.closed && !wait.is_zero() {
            s = self
                .arrived
                .wait_timeout(s, wait)
                .map(|(s, _)| s)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        out.extend(s.frames.drain(..));
        s.view
    }

    pub fn view(&self) -> CaptureView {
        self.lock().view
    }

    /// Ends the capture: the frames still kept, in order.
    pub fn close(&self) -> Vec<Vec<u8>> {
        let mut s = self.lock();
        s.closed = true;
        let left = s.frames.drain(..).collect();
        drop(s);
        self.arrived.notify_all();
        left
    }

    /// Counts `n` kept frames as dropped (forwarding ended before they
    /// could be sent).
    pub fn count_dropped(&self, n: u64) {
        self.lock().view.counts.dropped += n;
    }
}

/// Frames waiting for the guest, in order, bounded in frames and bytes.
#[derive(Debug)]
pub struct FrameQueue {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    max_bytes: usize,
    max_frames: usize,
}

impl FrameQueue {
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        Self {
            frames: VecDeque::new(),
            bytes: 0,
            max_bytes,
            max_frames,
        }
    }

    /// False (and the frame not taken) when the queue is full.
    pub fn push(&mut self, frame: Vec<u8>) -> bool {
        if self.is_full() || self.bytes + frame.len() > self.max_bytes {
            return false;
        }
        self.bytes += frame.len();
        self.frames.push_back(frame);
        true
    }

    pub fn pop(&mut self) -> Option<Vec<u8>> {
        let f = self.frames.pop_front()?;
        self.bytes -= f.len();
        Some(f)
    }

    pub fn is_full(&self) -> bool {
        self.frames.len() >= self.max_frames || self.bytes >= self.max_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn clear(&mut self) -> usize {
        let n = self.frames.len();
        self.frames.clear();
        self.bytes = 0;
        n
    }
}

/// What a NIC did with frames held back for its guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BacklogCounts {
    /// Frames put in the backlog: forwarded by the source, or given back
    /// here by a migration that failed.
    pub received: u64,
    /// Of those, placed in the guest's rx buffers.
    pub delivered: u64,
    /// Refused by the guest's receive filter, as they would have been.
    pub filtered: u64,
    /// The backlog was full, or the device was reset.
    pub dropped: u64,
    /// Frames of this host's TAP that waited behind forwarded ones.
    pub held: u64,
    /// Holds ended by their time bound (`HOLD_MAX`) before the source's
    /// end record.
    pub hold_expired: u64,
    /// The longest any held frame waited, µs.
    pub longest_hold_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    const PEER: MacAddr = MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);

    fn frame(dst: MacAddr, src: MacAddr, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN + len.max(14)];
        f[VNET_HDR_LEN..VNET_HDR_LEN + 6].copy_from_slice(&dst.0);
        f[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12].copy_from_slice(&src.0);
        f
    }

    #[test]
    fn frames_are_told_apart_by_their_addresses() {
        let bcast = MacAddr([0xff; 6]);
        let mcast = MacAddr([0x01, 0, 0x5e, 0, 0, 1]);
        let macs = [GUEST];
        assert_eq!(
            classify(&frame(GUEST, PEER, 60), &macs),
            FrameKind::ForGuest
        );
        assert_eq!(classify(&frame(bcast, PEER, 60), &macs), FrameKind::Flooded);
        assert_eq!(classify(&frame(mcast, PEER, 60), &macs), FrameKind::Flooded);
        // The guest's RARP from its new port, broadcast.
        assert_eq!(classify(&frame(bcast, GUEST, 60), &macs), FrameKind::Own);
        assert_eq!(
            classify(&frame(PEER, PEER, 60), &macs),
            FrameKind::OtherUnicast
        );
        assert_eq!(classify(&[0u8; VNET_HDR_LEN + 13], &macs), FrameKind::Runt);
    }

    #[test]
    fn a_capture_keeps_order_and_its_bound_and_counts_the_rest() {
        let cap = Capture::new(CaptureLimits { max_bytes: 300 });
        for i in 0..5u8 {
            let mut f = frame(GUEST, PEER, 60);
            f[VNET_HDR_LEN + 14] = i;
            cap.offer(&f, &[GUEST]);
        }
        cap.offer(&frame(MacAddr([0xff; 6]), GUEST, 60), &[GUEST]);
        let mut out = Vec::new();
        let view = cap.take(&mut out, Duration::ZERO);
        // 72 bytes each: four fit in 300.
        assert_eq!(out.len(), 4);
        let order: Vec<u8> = out.iter().map(|f| f[VNET_HDR_LEN + 14]).collect();
        assert_eq!(order, [0, 1, 2, 3]);
        assert_eq!(view.counts.captured, 4);
        assert_eq!(view.counts.dropped, 1);
        assert_eq!(view.counts.own, 1);
        assert!(view.moved_at.is_some() && view.last_for_guest.is_some());
        // The bound is on everything captured, taken or not.
        cap.offer(&frame(GUEST, PEER, 60), &[GUEST]);
        assert_eq!(cap.view().counts.dropped, 2);
        let cap = Capture::new(CaptureLimits { max_bytes: 1000 });
        cap.offer(&frame(GUEST, PEER, 60), &[GUEST]);
        assert_eq!(cap.close().len(), 1);
        cap.offer(&frame(GUEST, PEER, 60), &[GUEST]);
        assert_eq!(cap.view().counts.dropped, 1);
    }

    #[test]
    fn a_frame_queue_refuses_past_either_bound() {
        let mut q = FrameQueue::new(2, 1000);
        assert!(q.push(vec![0; 10]) && q.push(vec![1; 10]));
        assert!(!q.push(vec![2; 10]));
        assert_eq!(q.pop().unwrap()[0], 0);
        let mut q = FrameQueue::new(10, 25);
        assert!(q.push(vec![0; 20]));
        assert!(!q.push(vec![0; 10]));
        assert_eq!(q.len(), 1);
    }
}
