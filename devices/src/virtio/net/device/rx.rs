//! The receive queue: frames from the TAP into the guest's buffers.

use net::{NetBackend, Nic};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Instant;

use net::tap::VNET_HDR_LEN;
use virtio_bindings::virtio_net::*;
use virtio_queue::{QueueOwnedT, QueueT, Writer};

use super::{chain_is_whole, ring_err, Net, RingError, NUM_BUFFERS_OFFSET, RX_QUEUE};

/// Frames from the backlog or the hold delivered in one go before the
/// transmit queue gets its turn.
const QUEUED_BURST: usize = 64;

impl<B: NetBackend> Net<B> {
    /// The guest added rx buffers.
    pub fn process_rx_queue_event(&mut self) {
        if self.paused {
            return;
        }
        // The guest has buffers again: it need not tell us about more
        // until we run out ([`Net::arm_rx_kick`]); QEMU does the same.
        if let Some(active) = self.active.as_mut() {
            if let Err(e) = active.queues[RX_QUEUE].disable_notification(&active.mem) {
                self.set_broken(ring_err("rx", "ring")(e));
                return;
            }
        }
        self.rx_blocked = false;
        self.process_rx();
    }

    /// Out of rx buffers: asks the guest to notify us when it adds the
    /// next one (VRING_USED_F_NO_NOTIFY cleared, or with EVENT_IDX
    /// avail_event set to the current avail index). Ok(true) when buffers
    /// were added meanwhile, which the guest may not notify.
    fn arm_rx_kick(&mut self) -> Result<bool, RingError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(false);
        };
        let queue = &mut active.queues[RX_QUEUE];
        let start = queue.next_avail();
        let avail = queue
            .avail_idx(&active.mem, Ordering::Acquire)
            .map_err(ring_err("rx", "ring"))?;
        // enable_notification asks for a kick past next_avail; buffers too
        // few for the pending frame may sit between the two, so ask for
        // one past the avail index, then put next_avail back.
        queue.set_next_avail(avail.0);
        let more = queue.enable_notification(&active.mem);
        queue.set_next_avail(start);
        more.map_err(ring_err("rx", "ring"))
    }

    /// Moves frames into guest buffers until none is left or the guest has
    /// no buffers left: the backlog's first, then the TAP's. While the VM
    /// is paused nothing reaches the guest; a capture (a migration's end)
    /// then takes the TAP's frames.
    pub fn process_rx(&mut self) {
        if self.active.is_none() {
            return;
        }
        if self.paused {
            self.capture_rx();
            return;
        }
        let mut delivered = false;
        let mut queued = 0;
        loop {
            let from_queue = self.rx_pending.is_none()
                && (!self.backlog.is_empty() || (!self.hold && !self.held.is_empty()));
            if from_queue && queued >= QUEUED_BURST {
                // The rest after the guest's transmit queue has been
                // served: a guest that answers each frame (an echo, a
                // TCP ACK) must not find it full after a burst of
                // thousands. The event loop comes back at once.
                self.notify_handler();
                break;
            }
            queued += usize::from(from_queue);
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.next_frame() {
                    Some(len) => len,
                    None => break,
                },
            };
            if len <= VNET_HDR_LEN
                || !self
                    .state
                    .rx_filter
                    .accepts(&self.state.mac, &self.rx_frame[VNET_HDR_LEN..len])
            {
                self.metrics.rx_filtered += 1;
                if std::mem::take(&mut self.pending_from_backlog) {
                    self.backlog_counts.filtered += 1;
                }
                self.rx_pending = None;
                continue;
            }
            match self.deliver_rx(len) {
                Ok(true) => {
                    delivered = true;
                    self.rx_pending = None;
                    if std::mem::take(&mut self.pending_from_backlog) {
                        self.backlog_counts.delivered += 1;
                    }
                    self.metrics.rx_frames += 1;
                    self.metrics.rx_bytes += (len - VNET_HDR_LEN) as u64;
                }
                Ok(false) => {
                    self.rx_pending = Some(len);
                    match self.arm_rx_kick() {
                        Ok(true) => continue,
                        Ok(false) => {
                            self.rx_blocked = true;
                            break;
                        }
                        Err(why) => {
                            self.set_broken(why);
                            return;
                        }
                    }
                }
                Err(why) => {
                    self.set_broken(why);
                    return;
                }
            }
        }
        if delivered {
            self.signal(RX_QUEUE);
        }
    }

    /// The next frame for the guest, into `rx_frame`: the backlog's, then
    /// (once no more can be forwarded) the held TAP frames, then the
    /// TAP's. While frames may still be forwarded, the TAP's go to the
    /// hold instead, until it is full.
    fn next_frame(&mut self) -> Option<usize> {
        if let Some(f) = self.backlog.pop() {
            self.pending_from_backlog = true;
            return Some(self.load_frame(&f));
        }
        if self.hold && self.hold_deadline().is_some_and(|d| Instant::now() >= d) {
            self.hold = false;
            self.backlog_counts.hold_expired += 1;
            self.backlog_counts.longest_hold_us = super::HOLD_MAX.as_micros() as u64;
        }
        if !self.hold {
            self.held_since = None;
            if let Some(f) = self.held.pop() {
                return Some(self.load_frame(&f));
            }
        }
        loop {
            if self.hold && self.held.is_full() {
                return None;
            }
            match self.backend.read_frame(&mut self.rx_frame) {
                Ok(len) if self.hold => {
                    if self.held.push(self.rx_frame[..len].to_vec()) {
                        self.held_since.get_or_insert_with(Instant::now);
                        self.backlog_counts.held += 1;
                    } else {
                        self.metrics.rx_dropped += 1;
                    }
                }
                Ok(len) => return Some(len),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                Err(e) => {
                    log::warn!("{}: TAP read: {e}", self.state.id);
                    return None;
                }
            }
        }
    }

    /// Puts a queued frame where the TAP's are read to; its length (0 for
    /// one longer than any frame, which the filter then drops).
    fn load_frame(&mut self, frame: &[u8]) -> usize {
        match self.rx_frame.get_mut(..frame.len()) {
            Some(dst) => {
                dst.copy_from_slice(frame);
                frame.len()
            }
            None => 0,
        }
    }

    /// The VM is paused with a capture on: the TAP's frames go to it, a
    /// batch at a time (the TAP stays readable and brings the loop back).
    fn capture_rx(&mut self) {
        const BATCH: usize = 256;
        let Some(capture) = self.capture.clone() else {
            return;
        };
        let macs = self.macs();
        for _ in 0..BATCH {
            match self.backend.read_frame(&mut self.rx_frame) {
                Ok(len) => capture.offer(&self.rx_frame[..len], &macs),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("{}: TAP read: {e}", self.state.id);
                    return;
                }
            }
        }
    }

    /// Writes the pending frame into one (or, with MRG_RXBUF, several)
    /// guest buffers. Ok(false): not enough buffers; nothing was consumed.
    fn deliver_rx(&mut self, len: usize) -> Result<bool, RingError> {
        let mergeable = self.acked(VIRTIO_NET_F_MRG_RXBUF);
        let Some(active) = self.active.as_mut() else {
            return Ok(false);
        };
        let mem = &active.mem;
        let queue = &mut active.queues[RX_QUEUE];
        let start = queue.next_avail();
        // Each popped chain: its head and, if usable, a writer and the
        // bytes it will take.
        let mut chains: Vec<(u16, Option<(Writer<'_, _>, usize)>)> = Vec::new();
        let mut room = 0usize;
        let mut good = 0u16;
        while room < len {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                if let Err(e) = queue.iter(mem) {
                    return Err(ring_err("rx", "ring unreadable")(e));
                }
                queue.set_next_avail(start);
                return Ok(false);
            };
            let head = chain.head_index();
            let whole = chain_is_whole(&chain);
            let usable = Writer::new(mem, chain).ok().filter(|w| {
                let cap = w.available_bytes();
                // The first buffer must hold the whole header.
                whole && cap > 0 && (good > 0 || cap >= VNET_HDR_LEN)
            });
            match usable {
                Some(w) => {
                    let take = w.available_bytes().min(len - room);
                    room += take;
                    good += 1;
                    chains.push((head, Some((w, take))));
                    if !mergeable && room < len {
                        // Without MRG_RXBUF a frame must fit one buffer.
                        break;
                    }
                }
                None => {
                    self.metrics.bad_descriptors += 1;
                    chains.push((head, None));
                }
            }
        }
        let fits = room >= len;
        if fits {
            self.rx_frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
                .copy_from_slice(&good.to_le_bytes());
        } else {
            self.metrics.rx_dropped += 1;
        }
        let mut offset = 0;
        for (head, writer) in chains {
            let used = match writer {
                Some((mut w, take)) if fits => {
                    if w.write_all(&self.rx_frame[offset..offset + take]).is_err() {
                        self.metrics.bad_descriptors += 1;
                    }
                    offset += take;
                    take as u32
                }
                _ => 0,
            };
            queue
                .add_used(mem, head, used)
                .map_err(ring_err("rx", "used ring"))?;
        }
        // A frame that could not fit (no MRG_RXBUF, small buffer) is gone:
        // report it delivered so the next one is tried.
        Ok(true)
    }
}
