//! The virtio-net device model: rx, tx and control queues over a TAP.
//!
//! Everything in the queues is guest-controlled. A descriptor chain that
//! points outside guest memory, loops, has the wrong direction or absurd
//! lengths costs the guest that one request (returned with length 0 and
//! counted); a ring that cannot be read or written at all puts the device
//! in DEVICE_NEEDS_RESET. Nothing here panics on guest input.

use std::sync::Arc;

use net::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, VNET_HDR_LEN};
use net::{Identity, MacAddr, NetBackend, Nic, Tap};
use virtio_bindings::virtio_net::*;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use super::filter::RxFilter;
use super::forward::{BacklogCounts, Capture, CaptureCounts, CaptureLimits, FrameQueue};
use super::persist::NetState;
use crate::virtio::{
    read_config_bytes, wants_interrupt, ActivateError, QueueSnapshot, VirtioDevice,
    VirtioInterrupt, TYPE_NET, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
};
use crate::GuestMemoryMmap;

mod ctrl_queue;
mod rx;
mod tx;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const CTRL_QUEUE: usize = 2;
const QUEUE_SIZES: [u16; 3] = [256, 256, 64];

/// Largest frame with its header: 64 KiB of GSO payload plus Ethernet and
/// VLAN headers.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65_535 + 14 + 4;
/// `num_buffers` inside virtio_net_hdr_v1.
const NUM_BUFFERS_OFFSET: usize = 10;

fn bit(b: u32) -> u64 {
    1 << b
}

/// Whether a chain ends where the driver said it ends. virtio-queue stops
/// iterating silently at a loop (after a queue's worth of descriptors), a
/// next index beyond the table, an unreadable descriptor, a bad or nested
/// indirect table or 4 GiB of length, and would hand back the part before
/// as if it were the whole request.
fn chain_is_whole<M>(chain: &DescriptorChain<M>) -> bool
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    chain.clone().last().is_some_and(|d| !d.has_next())
}

/// A ring the driver made unusable: the device stops and asks for a
/// reset (DEVICE_NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
#[error("{queue} {part}: {source}")]
pub struct RingError {
    pub queue: &'static str,
    /// `ring`, `avail ring`, `used ring`, `ring unreadable`.
    pub part: &'static str,
    #[source]
    pub source: virtio_queue::Error,
}

/// `|source| RingError { queue, part, source }`, for `map_err`.
fn ring_err(
    queue: &'static str,
    part: &'static str,
) -> impl FnOnce(virtio_queue::Error) -> RingError {
    move |source| RingError {
        queue,
        part,
        source,
    }
}

/// How a virtio-net device is made.
pub struct NetOptions<B = Tap> {
    pub id: String,
    /// Where its frames go: a TAP (`IFF_VNET_HDR`), or memory in tests.
    pub backend: B,
    pub mac: MacAddr,
    /// Offer VIRTIO_NET_F_GUEST_ANNOUNCE.
    pub guest_announce: bool,
}

/// Counters for what the device did and refused.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetMetrics {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_filtered: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub bad_descriptors: u64,
    pub ctrl_commands: u64,
    pub ctrl_errors: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    interrupt: VirtioInterrupt,
    queues: Vec<Queue>,
}

/// The device over any [`NetBackend`]; Ferry's is a TAP.
pub struct Net<B: NetBackend = Tap> {
    state: NetState,
    backend: B,
    queue_evts: Vec<Arc<EventFd>>,
    /// Tells the event handler that the device was activated or reset.
    activate_evt: EventFd,
    active: Option<Active>,
    /// A frame read from the TAP that waits for guest buffers.
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    /// No rx buffers for the pending frame: don't read the TAP until the
    /// guest adds some.
    rx_blocked: bool,
    /// Why the device stopped (set once; the transport then reports
    /// DEVICE_NEEDS_RESET).
    broken: Option<RingError>,
    /// The VM is paused: touch neither guest memory nor the TAP.
    paused: bool,
    /// Written when the guest acknowledges an announce (ANNOUNCE_ACK).
    announce_acked: Arc<EventFd>,
    /// Told (with the NIC's id) when the guest changes its receive
    /// filter: QMP's NIC_RX_FILTER_CHANGED.
    rx_filter_notify: Option<RxFilterNotify>,
    /// QEMU's rate rule: one event, then none until `query-rx-filter`
    /// has been asked about this NIC.
    rx_filter_notify_armed: bool,
    metrics: NetMetrics,
    /// The guest's faults and requests, logged at most once a second each.
    guest_log: crate::guest_log::GuestLog,
    /// Stopped for the end of a migration, the TAP is read into this
    /// (see [`super::forward`]).
    capture: Option<Arc<Capture>>,
    /// Frames that go to the guest before the TAP's: forwarded by a
    /// migration's source, or captured here by one that failed.
    backlog: FrameQueue,
    /// The pending frame came from the backlog.
    pending_from_backlog: bool,
    /// Forwarded frames may still come: the TAP's wait in `held`.
    hold: bool,
    held: FrameQueue,
    /// When the oldest held frame came: none waits past [`HOLD_MAX`].
    held_since: Option<std::time::Instant>,
    backlog_counts: BacklogCounts,
}

/// Longest a frame of this host's TAP waits behind forwarded ones. In a
/// switched network the source's end record comes a few ms after the
/// switch moved; where the source never sees the move (no switch floods
/// the announce back to it) it may forward for seconds, and this host's
/// traffic must not wait that long.
pub const HOLD_MAX: std::time::Duration = std::time::Duration::from_millis(20);

/// Most frames (and bytes) a backlog and a hold keep.
pub const BACKLOG_FRAMES: usize = 65_536;
pub const BACKLOG_BYTES: usize = 32 << 20;

/// Called with the NIC's id when its guest changed the receive filter.
pub type RxFilterNotify = Arc<dyn Fn(&str) + Send + Sync>;

fn offered_features(guest_announce: bool) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_F_RING_EVENT_IDX)
        | bit(VIRTIO_F_RING_INDIRECT_DESC)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_CTRL_VQ)
        | bit(VIRTIO_NET_F_CTRL_RX)
        | bit(VIRTIO_NET_F_CTRL_RX_EXTRA)
        | bit(VIRTIO_NET_F_CTRL_VLAN)
        | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
        | bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_GUEST_ECN)
        | bit(VIRTIO_NET_F_HOST_TSO4)
        | bit(VIRTIO_NET_F_HOST_TSO6)
        | bit(VIRTIO_NET_F_HOST_ECN);
    if guest_announce {
        f |= bit(VIRTIO_NET_F_GUEST_ANNOUNCE);
    }
    f
}

impl<B: NetBackend> Net<B> {
    pub fn new(options: NetOptions<B>) -> std::io::Result<Self> {
        let queue_evts = (0..QUEUE_SIZES.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            state: NetState {
                id: options.id,
                mac: options.mac,
                status: VIRTIO_NET_S_LINK_UP as u16,
                avail_features: offered_features(options.guest_announce),
                acked_features: 0,
                config_generation: 0,
                rx_filter: RxFilter::default(),
                announce: Default::default(),
                senders: Default::default(),
            },
            backend: options.backend,
            queue_evts,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            active: None,
            rx_frame: vec![0; MAX_FRAME_LEN],
            rx_pending: None,
            rx_blocked: false,
            broken: None,
            paused: false,
            announce_acked: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
            rx_filter_notify: None,
            rx_filter_notify_armed: true,
            metrics: NetMetrics::default(),
            guest_log: Default::default(),
            capture: None,
            backlog: FrameQueue::new(BACKLOG_FRAMES, BACKLOG_BYTES),
            pending_from_backlog: false,
            hold: false,
            held: FrameQueue::new(BACKLOG_FRAMES, BACKLOG_BYTES),
            held_since: None,
            backlog_counts: BacklogCounts::default(),
        })
    }

    /// Who hears of receive-filter changes (the VMM's QMP events).
    pub fn set_rx_filter_notify(&mut self, notify: RxFilterNotify) {
        self.rx_filter_notify = Some(notify);
    }

    /// `query-rx-filter` read this NIC's filter: the next change is told.
    pub fn rearm_rx_filter_notify(&mut self) {
        self.rx_filter_notify_armed = true;
    }

    fn rx_filter_changed(&mut self) {
        if !std::mem::replace(&mut self.rx_filter_notify_armed, false) {
            return;
        }
        if let Some(notify) = &self.rx_filter_notify {
            notify(&self.state.id);
        }
    }

    pub fn state(&self) -> &NetState {
        &self.state
    }

    pub fn metrics(&self) -> &NetMetrics {
        &self.metrics
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Eventfds the guest's queue notifications arrive on, by queue index.
    pub fn queue_evts(&self) -> &[Arc<EventFd>] {
        &self.queue_evts
    }

    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn acked(&self, b: u32) -> bool {
        self.state.acked_features & bit(b) != 0
    }

    /// Whether the TAP should be watched for frames now.
    pub fn wants_tap(&self) -> bool {
        if self.active.is_none() || self.broken.is_some() {
            return false;
        }
        if self.paused {
            return self.capture.is_some();
        }
        let hold_full = self.hold && self.held.is_full();
        !self.rx_blocked && !hold_full
    }

    /// The guest is stopped for a migration's end: from now on the TAP's
    /// frames are kept in order (the one waiting for rx buffers first)
    /// for the migration thread to forward.
    pub fn start_capture(&mut self, limits: CaptureLimits) -> Arc<Capture> {
        let capture = Arc::new(Capture::new(limits));
        let macs = self.macs();
        // In the order the guest would have had them: the frame waiting
        // for rx buffers, the backlog, the held TAP frames.
        if let Some(len) = self.rx_pending.take() {
            self.pending_from_backlog = false;
            capture.offer(&self.rx_frame[..len], &macs);
        }
        while let Some(f) = self.backlog.pop().or_else(|| self.held.pop()) {
            capture.offer(&f, &macs);
        }
        self.capture = Some(capture.clone());
        self.notify_handler();
        capture
    }

    /// Ends the capture. `give_back`: the migration failed, and the guest
    /// gets every frame still kept when it resumes here; otherwise they
    /// are counted as dropped. The capture's counts.
    pub fn stop_capture(&mut self, give_back: bool) -> Option<CaptureCounts> {
        let capture = self.capture.take()?;
        let left = capture.close();
        if give_back {
            let mut refused = 0;
            for f in left {
                if self.backlog.push(f) {
                    self.backlog_counts.received += 1;
                } else {
                    refused += 1;
                }
            }
            capture.count_dropped(refused);
        } else {
            capture.count_dropped(left.len() as u64);
        }
        self.notify_handler();
        Some(capture.view().counts)
    }

    /// A destination of a migration that forwards frames: this TAP's
    /// frames wait behind the forwarded ones until [`Net::release_hold`].
    pub fn hold_tap(&mut self) {
        self.hold = true;
    }

    /// Frames the source forwarded, for the guest before any of this
    /// TAP's that arrived after them.
    pub fn push_forwarded(&mut self, frames: impl IntoIterator<Item = Vec<u8>>) {
        for f in frames {
            if self.backlog.push(f) {
                self.backlog_counts.received += 1;
            } else {
                self.backlog_counts.dropped += 1;
            }
        }
        self.notify_handler();
    }

    /// No more frames will be forwarded: the held TAP frames follow.
    pub fn release_hold(&mut self) {
        self.hold = false;
        if let Some(t) = self.held_since.take() {
            self.backlog_counts.longest_hold_us = self
                .backlog_counts
                .longest_hold_us
                .max(t.elapsed().as_micros() as u64);
        }
        self.notify_handler();
    }

    /// When the hold must end at the latest (a frame is held): the event
    /// loop's timer brings [`Net::process_rx`] back then.
    pub fn hold_deadline(&self) -> Option<std::time::Instant> {
        self.held_since.filter(|_| self.hold).map(|t| t + HOLD_MAX)
    }

    pub fn backlog_counts(&self) -> BacklogCounts {
        self.backlog_counts
    }

    /// Stops all queue processing and TAP reads until [`Net::resume`].
    /// Called on the event-loop thread, so when it returns no processing
    /// is under way.
    pub fn pause(&mut self) {
        self.paused = true;
        // Let the handler drop its TAP interest now, not at the next frame.
        self.notify_handler();
    }

    /// Picks up whatever the guest queued while paused.
    pub fn resume(&mut self) {
        self.paused = false;
        self.rx_blocked = false;
        self.notify_handler();
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The reason the device broke, once.
    pub fn take_broken(&mut self) -> Option<RingError> {
        self.broken.take()
    }

    fn set_broken(&mut self, why: RingError) {
        if self.broken.is_none() {
            crate::guest_log!(
                self.guest_log,
                Warn,
                "{}: device needs reset: {why}",
                self.state.id
            );
            self.broken = Some(why);
        }
        self.active = None;
    }

    fn signal(&mut self, queue: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(q) = active.queues.get_mut(queue) else {
            return;
        };
        if wants_interrupt(q, &active.mem) {
            active.interrupt.signal_used_queue();
        }
    }

    /// Starts processing: a driver's fresh activation (`fresh`: the
    /// receive filter starts over) or a restore (it is kept as saved).
    fn start(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        mut queues: Vec<Queue>,
        fresh: bool,
    ) -> Result<(), ActivateError> {
        let event_idx = self.acked(VIRTIO_F_RING_EVENT_IDX);
        for (i, q) in queues.iter_mut().enumerate() {
            if i != CTRL_QUEUE && !q.ready() {
                return Err(ActivateError::BadQueue(i));
            }
            q.set_event_idx(event_idx);
        }
        // The TAP may be new (a destination host): tell it the offloads.
        let offloads = self.tap_offloads();
        self.backend
            .set_offload(offloads)
            .map_err(ActivateError::Offloads)?;
        if fresh {
            self.state.rx_filter =
                RxFilter::with_vlan_filtering(self.acked(VIRTIO_NET_F_CTRL_VLAN));
        }
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
        });
        self.rx_blocked = false;
        log::info!(
            "{}: {} on TAP {} (features {:#x}, TAP offloads {:#x})",
            self.state.id,
            if fresh { "activated" } else { "restored" },
            self.backend.name(),
            self.state.acked_features,
            self.tap_offloads()
        );
        self.notify_handler();
        Ok(())
    }

    /// Replaces the guest-visible state with a saved one (before the
    /// transport restarts the queues). The NIC keeps its own TAP.
    pub fn restore_state(&mut self, state: &NetState) {
        let id = self.state.id.clone();
        self.state = state.clone();
        // The id names this NIC on this host (its --net), not the saved one.
        self.state.id = id;
    }

    fn tap_offloads(&self) -> u32 {
        let mut flags = 0;
        if self.acked(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= TUN_F_CSUM;
            if self.acked(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= TUN_F_TSO4;
            }
            if self.acked(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= TUN_F_TSO6;
            }
            if self.acked(VIRTIO_NET_F_GUEST_ECN) {
                flags |= TUN_F_TSO_ECN;
            }
        }
        flags
    }

    fn notify_handler(&self) {
        if let Err(e) = self.activate_evt.write(1) {
            log::error!("{}: cannot wake the event loop: {e}", self.state.id);
        }
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        self.state.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.state.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.state.mac.0);
        config[6..].copy_from_slice(&self.state.status.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The config space of a VERSION_1 device is read-only for drivers.
        log::debug!(
            "{}: config write of {} bytes at {offset} ignored",
            self.state.id,
            data.len()
        );
    }

    fn config_generation(&self) -> u32 {
        self.state.config_generation
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.start(mem, interrupt, queues, true)
    }

    fn activate_restored(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.start(mem, interrupt, queues, false)
    }

    fn live_queues(&self) -> Option<Vec<QueueSnapshot>> {
        self.active.as_ref().map(|a| {
            a.queues
                .iter()
                .map(|q| QueueSnapshot::from(q.state()))
                .collect()
        })
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_pending = None;
        self.pending_from_backlog = false;
        self.backlog_counts.dropped += self.backlog.clear() as u64;
        self.held.clear();
        self.rx_blocked = false;
        self.broken = None;
        self.state.acked_features = 0;
        self.state.rx_filter = RxFilter::default();
        self.cancel_announce();
        self.notify_handler();
    }
}

impl<B: NetBackend> Nic for Net<B> {
    fn id(&self) -> &str {
        &self.state.id
    }

    fn macs(&self) -> Vec<MacAddr> {
        let mut macs = vec![self.state.mac];
        for m in &self.state.rx_filter.unicast {
            if !macs.contains(m) {
                macs.push(*m);
            }
        }
        macs
    }

    fn vlans(&self) -> Vec<u16> {
        self.state.rx_filter.vlan_list()
    }

    fn send_raw(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let header = [0u8; VNET_HDR_LEN];
        self.backend
            .write_frame(&[std::io::IoSlice::new(&header), std::io::IoSlice::new(frame)])
            .map(|_| ())
    }

    fn announce_rounds_left(&self) -> u64 {
        self.state.announce.rounds_left
    }

    fn set_announce_rounds_left(&mut self, rounds: u64) {
        self.state.announce.rounds_left = rounds;
    }

    fn cancel_announce(&mut self) {
        self.state.announce = Default::default();
        self.state.status &= !(VIRTIO_NET_S_ANNOUNCE as u16);
    }

    fn announce_ack_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.announce_acked.as_raw_fd())
    }

    /// Asks the guest when it can announce itself — it alone knows every
    /// address on every VLAN (seeds 001/002) — by setting S_ANNOUNCE and
    /// raising the config interrupt.
    fn ask_guest_to_announce(&mut self) -> bool {
        let asks_guest =
            self.acked(VIRTIO_NET_F_GUEST_ANNOUNCE) && self.acked(VIRTIO_NET_F_CTRL_VQ);
        match self.active.as_ref() {
            Some(active) if asks_guest && self.broken.is_none() => {
                self.state.status |= VIRTIO_NET_S_ANNOUNCE as u16;
                self.state.announce.awaiting_ack = true;
                self.state.config_generation = self.state.config_generation.wrapping_add(1);
                active.interrupt.signal_config_change();
                true
            }
            _ => false,
        }
    }

    /// The identities the guest sends from, the primary MAC untagged, and
    /// the filter's cross product (capped) for MACs it never sent from.
    fn rarp_plan(&self) -> (Vec<Identity>, usize) {
        net::rarp_plan(
            self.state.mac,
            &self.macs(),
            &self.vlans(),
            &self.state.senders.all(),
        )
    }

    fn mark_senders(&mut self) -> u64 {
        self.state.senders.mark()
    }

    fn senders_since(&self, mark: u64) -> Vec<Identity> {
        self.state.senders.seen_since(mark)
    }
}

#[cfg(test)]
mod tests;
