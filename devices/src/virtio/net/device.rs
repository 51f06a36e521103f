//! The virtio-net device model: rx, tx and control queues over a TAP.
//!
//! Everything in the queues is guest-controlled. A descriptor chain that
//! points outside guest memory, loops, has the wrong direction or absurd
//! lengths costs the guest that one request (returned with length 0 and
//! counted); a ring that cannot be read or written at all puts the device
//! in DEVICE_NEEDS_RESET. Nothing here panics on guest input.

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use net::nic::rarp_announce;
use net::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, VNET_HDR_LEN};
use net::{Announced, MacAddr, Nic, Tap};
use virtio_bindings::virtio_net::*;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use super::ctrl::{self, CtrlCommand, CtrlError, RxMode};
use super::filter::RxFilter;
use super::persist::NetState;
use crate::virtio::{
    read_config_bytes, ActivateError, QueueSnapshot, VirtioDevice, VirtioInterrupt, TYPE_NET,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use crate::GuestMemoryMmap;

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

/// How a virtio-net device is made.
pub struct NetOptions {
    pub id: String,
    pub tap: Tap,
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

pub struct Net {
    state: NetState,
    tap: Tap,
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
    tx_frame: Vec<u8>,
    /// Why the device stopped (set once; the transport then reports
    /// DEVICE_NEEDS_RESET).
    broken: Option<String>,
    /// The VM is paused: touch neither guest memory nor the TAP.
    paused: bool,
    /// Written when the guest acknowledges an announce (ANNOUNCE_ACK).
    announce_acked: Arc<EventFd>,
    metrics: NetMetrics,
}

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

impl Net {
    pub fn new(options: NetOptions) -> std::io::Result<Self> {
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
            },
            tap: options.tap,
            queue_evts,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            active: None,
            rx_frame: vec![0; MAX_FRAME_LEN],
            rx_pending: None,
            rx_blocked: false,
            tx_frame: Vec::with_capacity(MAX_FRAME_LEN),
            broken: None,
            paused: false,
            announce_acked: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
            metrics: NetMetrics::default(),
        })
    }

    pub fn state(&self) -> &NetState {
        &self.state
    }

    pub fn metrics(&self) -> &NetMetrics {
        &self.metrics
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
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
        self.active.is_some() && !self.rx_blocked && self.broken.is_none() && !self.paused
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

    /// Readable after each ANNOUNCE_ACK from the guest.
    pub fn announce_acked_evt(&self) -> &Arc<EventFd> {
        &self.announce_acked
    }

    /// Records how many rounds of the announce schedule remain (part of
    /// the migrated state).
    pub fn set_announce_rounds_left(&mut self, rounds: u64) {
        self.state.announce.rounds_left = rounds;
    }

    /// Drops an announce in flight (a reset, a new migration).
    pub fn cancel_announce(&mut self) {
        self.state.announce = Default::default();
        self.state.status &= !(VIRTIO_NET_S_ANNOUNCE as u16);
    }

    /// The reason the device broke, once.
    pub fn take_broken(&mut self) -> Option<String> {
        self.broken.take()
    }

    fn set_broken(&mut self, why: String) {
        if self.broken.is_none() {
            log::warn!("{}: device needs reset: {why}", self.state.id);
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
        match q.needs_notification(&active.mem) {
            Ok(true) => active.interrupt.signal_used_queue(),
            Ok(false) => {}
            // Cannot read the used-event index: interrupt anyway.
            Err(_) => active.interrupt.signal_used_queue(),
        }
    }

    /// The guest added rx buffers.
    pub fn process_rx_queue_event(&mut self) {
        if self.paused {
            return;
        }
        // The guest has buffers again: it need not tell us about more
        // until we run out ([`Net::arm_rx_kick`]); QEMU does the same.
        if let Some(active) = self.active.as_mut() {
            if let Err(e) = active.queues[RX_QUEUE].disable_notification(&active.mem) {
                self.set_broken(format!("rx ring: {e}"));
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
    fn arm_rx_kick(&mut self) -> Result<bool, String> {
        let Some(active) = self.active.as_mut() else {
            return Ok(false);
        };
        let queue = &mut active.queues[RX_QUEUE];
        let start = queue.next_avail();
        let avail = queue
            .avail_idx(&active.mem, Ordering::Acquire)
            .map_err(|e| format!("rx ring: {e}"))?;
        // enable_notification asks for a kick past next_avail; buffers too
        // few for the pending frame may sit between the two, so ask for
        // one past the avail index, then put next_avail back.
        queue.set_next_avail(avail.0);
        let more = queue.enable_notification(&active.mem);
        queue.set_next_avail(start);
        more.map_err(|e| format!("rx ring: {e}"))
    }

    /// Moves frames from the TAP into guest buffers until the TAP is empty
    /// or the guest has no buffers left.
    pub fn process_rx(&mut self) {
        if self.active.is_none() || self.paused {
            return;
        }
        let mut delivered = false;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.tap.read(&mut self.rx_frame) {
                    Ok(len) => len,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::warn!("{}: TAP read: {e}", self.state.id);
                        break;
                    }
                },
            };
            if len <= VNET_HDR_LEN
                || !self
                    .state
                    .rx_filter
                    .accepts(&self.state.mac, &self.rx_frame[VNET_HDR_LEN..len])
            {
                self.metrics.rx_filtered += 1;
                self.rx_pending = None;
                continue;
            }
            match self.deliver_rx(len) {
                Ok(true) => {
                    delivered = true;
                    self.rx_pending = None;
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

    /// Writes the pending frame into one (or, with MRG_RXBUF, several)
    /// guest buffers. Ok(false): not enough buffers; nothing was consumed.
    fn deliver_rx(&mut self, len: usize) -> Result<bool, String> {
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
                    return Err(format!("rx ring unreadable: {e}"));
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
                .map_err(|e| format!("rx used ring: {e}"))?;
        }
        // A frame that could not fit (no MRG_RXBUF, small buffer) is gone:
        // report it delivered so the next one is tried.
        Ok(true)
    }

    /// Sends every frame the guest queued.
    pub fn process_tx(&mut self) {
        if self.paused {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[TX_QUEUE];
        let mut sent = false;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                self.broken = Some(format!("tx ring: {e}"));
                break;
            }
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let whole = chain_is_whole(&chain);
                match Reader::new(mem, chain) {
                    Ok(mut reader) if whole => {
                        let len = reader.available_bytes();
                        if !(VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&len) {
                            self.metrics.bad_descriptors += 1;
                        } else {
                            self.tx_frame.resize(len, 0);
                            match reader.read_exact(&mut self.tx_frame) {
                                Ok(()) => match self.tap.write(&self.tx_frame) {
                                    Ok(_) => {
                                        self.metrics.tx_frames += 1;
                                        self.metrics.tx_bytes += (len - VNET_HDR_LEN) as u64;
                                    }
                                    Err(e) => {
                                        self.metrics.tx_dropped += 1;
                                        log::debug!("{}: TAP write: {e}", self.state.id);
                                    }
                                },
                                Err(_) => self.metrics.bad_descriptors += 1,
                            }
                        }
                    }
                    _ => self.metrics.bad_descriptors += 1,
                }
                if let Err(e) = queue.add_used(mem, head, 0) {
                    self.broken = Some(format!("tx used ring: {e}"));
                    break;
                }
                sent = true;
            }
            if self.broken.is_some() {
                break;
            }
            // pop_descriptor_chain also ends (logging, returning None) at a
            // corrupt avail ring, an index more than a queue ahead: that is
            // a broken ring, and enable_notification below would report
            // "more work" for it forever.
            if let Err(e) = queue.iter(mem) {
                self.broken = Some(format!("tx avail ring: {e}"));
                break;
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue, // more arrived meanwhile
                Ok(false) => break,
                Err(e) => {
                    self.broken = Some(format!("tx ring: {e}"));
                    break;
                }
            }
        }
        if let Some(why) = self.broken.clone() {
            self.broken = None;
            self.set_broken(why);
            return;
        }
        if sent {
            self.signal(TX_QUEUE);
        }
    }

    /// Executes every control command the guest queued.
    pub fn process_ctrl(&mut self) {
        if self.paused {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut done = false;
        let mut results = Vec::new();
        let ring_error;
        {
            let queue = &mut active.queues[CTRL_QUEUE];
            while let Some(chain) = queue.pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                let whole = chain_is_whole(&chain);
                let command = match Reader::new(&mem, chain.clone()) {
                    Ok(_) if !whole => Err(CtrlError::BadChain),
                    Ok(mut reader) => {
                        let len = reader.available_bytes();
                        if len > ctrl::MAX_COMMAND_LEN {
                            Err(CtrlError::TooLong(len))
                        } else {
                            let mut bytes = vec![0u8; len];
                            match reader.read_exact(&mut bytes) {
                                Ok(()) => ctrl::parse(&bytes),
                                Err(_) => Err(CtrlError::BadChain),
                            }
                        }
                    }
                    Err(_) => Err(CtrlError::BadChain),
                };
                results.push((head, chain, command));
            }
            // As for tx: None from a corrupt avail ring is no empty queue.
            ring_error = if queue.ready() {
                queue.iter(&mem).err()
            } else {
                None
            };
        }
        for (head, chain, command) in results {
            self.metrics.ctrl_commands += 1;
            // A command whose outcome cannot be reported is not carried
            // out: the driver would wait for an answer that never comes.
            let mut status = Writer::new(&mem, chain)
                .ok()
                .filter(|w| w.available_bytes() >= 1);
            let outcome = match status {
                Some(_) => command.and_then(|c| self.apply(c)),
                None => {
                    self.metrics.bad_descriptors += 1;
                    Err(CtrlError::NoStatus)
                }
            };
            let ack = match &outcome {
                Ok(()) => VIRTIO_NET_OK as u8,
                Err(e) => {
                    self.metrics.ctrl_errors += 1;
                    log::info!("{}: control command refused: {e}", self.state.id);
                    VIRTIO_NET_ERR as u8
                }
            };
            let written = match status.as_mut() {
                Some(w) => w.write_all(&[ack]).map(|_| 1u32).unwrap_or(0),
                None => 0,
            };
            let Some(active) = self.active.as_mut() else {
                return;
            };
            if let Err(e) = active.queues[CTRL_QUEUE].add_used(&mem, head, written) {
                self.set_broken(format!("ctrl used ring: {e}"));
                return;
            }
            done = true;
        }
        if done {
            self.signal(CTRL_QUEUE);
        }
        if let Some(e) = ring_error {
            self.set_broken(format!("ctrl avail ring: {e}"));
        }
    }

    fn require(&self, feature: u32, class: u8) -> Result<(), CtrlError> {
        if self.acked(feature) {
            Ok(())
        } else {
            Err(CtrlError::NotNegotiated(class))
        }
    }

    fn apply(&mut self, command: CtrlCommand) -> Result<(), CtrlError> {
        let id = self.state.id.clone();
        match command {
            CtrlCommand::RxMode(mode, on) => {
                self.require(VIRTIO_NET_F_CTRL_RX, 0)?;
                if !matches!(mode, RxMode::Promisc | RxMode::AllMulti) {
                    self.require(VIRTIO_NET_F_CTRL_RX_EXTRA, 0)?;
                }
                let f = &mut self.state.rx_filter;
                let flag = match mode {
                    RxMode::Promisc => &mut f.promisc,
                    RxMode::AllMulti => &mut f.allmulti,
                    RxMode::AllUni => &mut f.alluni,
                    RxMode::NoMulti => &mut f.nomulti,
                    RxMode::NoUni => &mut f.nouni,
                    RxMode::NoBcast => &mut f.nobcast,
                };
                *flag = on;
                log::info!("{id}: rx mode {mode:?} {}", if on { "on" } else { "off" });
            }
            CtrlCommand::MacTableSet { unicast, multicast } => {
                self.require(VIRTIO_NET_F_CTRL_RX, 1)?;
                self.state.rx_filter.set_mac_table(unicast, multicast);
                let f = &self.state.rx_filter;
                log::info!(
                    "{id}: MAC table: unicast [{}]{} multicast [{}]{}",
                    join(&f.unicast),
                    if f.unicast_overflow {
                        " (overflow: all)"
                    } else {
                        ""
                    },
                    join(&f.multicast),
                    if f.multicast_overflow {
                        " (overflow: all)"
                    } else {
                        ""
                    },
                );
            }
            CtrlCommand::MacAddrSet(mac) => {
                self.require(VIRTIO_NET_F_CTRL_MAC_ADDR, 1)?;
                if mac.is_multicast() {
                    return Err(CtrlError::Unknown { class: 1, cmd: 1 });
                }
                self.state.mac = mac;
                self.state.config_generation = self.state.config_generation.wrapping_add(1);
                log::info!("{id}: MAC address now {mac}");
            }
            CtrlCommand::VlanAdd(vid) | CtrlCommand::VlanDel(vid) => {
                self.require(VIRTIO_NET_F_CTRL_VLAN, 2)?;
                let add = matches!(command, CtrlCommand::VlanAdd(_));
                self.state.rx_filter.set_vlan(vid, add);
                log::info!("{id}: VLAN {vid} {}", if add { "added" } else { "removed" });
            }
            CtrlCommand::AnnounceAck => {
                self.require(VIRTIO_NET_F_GUEST_ANNOUNCE, 3)?;
                self.state.status &= !(VIRTIO_NET_S_ANNOUNCE as u16);
                self.state.announce.awaiting_ack = false;
                log::info!("{id}: guest acknowledged the announce");
                // Releases the next round of the schedule.
                if let Err(e) = self.announce_acked.write(1) {
                    log::error!("{id}: cannot signal the announce ack: {e}");
                }
            }
        }
        Ok(())
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
        self.tap
            .set_offload(self.tap_offloads())
            .map_err(|e| ActivateError::Backend(e.to_string()))?;
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
            self.tap.name(),
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

fn join(macs: &[MacAddr]) -> String {
    macs.iter()
        .map(|m| m.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl VirtioDevice for Net {
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
        self.rx_blocked = false;
        self.broken = None;
        self.state.acked_features = 0;
        self.state.rx_filter = RxFilter::default();
        self.cancel_announce();
        self.notify_handler();
    }
}

impl Nic for Net {
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
        self.tap
            .write_vectored(&[std::io::IoSlice::new(&header), std::io::IoSlice::new(frame)])
            .map(|_| ())
    }

    /// Asks the guest when it can announce itself — it alone knows every
    /// address on every VLAN (seeds 001/002) — by setting S_ANNOUNCE and
    /// raising the config interrupt; otherwise falls back to RARPs for
    /// what the control queue taught us.
    fn announce(&mut self) -> std::io::Result<Announced> {
        let asks_guest =
            self.acked(VIRTIO_NET_F_GUEST_ANNOUNCE) && self.acked(VIRTIO_NET_F_CTRL_VQ);
        match self.active.as_ref() {
            Some(active) if asks_guest && self.broken.is_none() => {
                self.state.status |= VIRTIO_NET_S_ANNOUNCE as u16;
                self.state.announce.awaiting_ack = true;
                self.state.config_generation = self.state.config_generation.wrapping_add(1);
                active.interrupt.signal_config_change();
                Ok(Announced::Guest)
            }
            _ => rarp_announce(self),
        }
    }
}
