//! Virtio over MMIO: the transport (register file, feature negotiation,
//! queues, interrupts) and the devices behind it.

pub mod mmio;
pub mod net;
#[cfg(test)]
pub mod test_utils;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Transport-level feature bits.
pub const VIRTIO_F_RING_INDIRECT_DESC: u32 = 28;
pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Interrupt status bits (InterruptStatus register).
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

pub const TYPE_NET: u32 = 1;

/// How a device raises its interrupt: set a bit in the transport's
/// InterruptStatus and pulse the irqfd.
#[derive(Clone)]
pub struct VirtioInterrupt {
    status: Arc<AtomicU32>,
    irqfd: Arc<EventFd>,
}

impl VirtioInterrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            irqfd: Arc::new(irqfd),
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::error!("virtio: cannot raise interrupt: {e}");
        }
    }

    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }

    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG_CHANGE);
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not ready or its rings are outside guest memory")]
    BadQueue(usize),
    #[error("the backend refuses the offloads: {0}")]
    Offloads(#[source] std::io::Error),
}

/// A device model behind the MMIO transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn device_features(&self) -> u64;
    /// Features the driver accepted (already checked to be a subset of
    /// the offered ones).
    fn set_acked_features(&mut self, features: u64);
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Incremented whenever the device changes its config space.
    fn config_generation(&self) -> u32;
    /// Starts the device with the driver's queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;
    /// Stops the device; the transport forgets the queues.
    fn reset(&mut self);
    /// The device's live queues (their ring positions), when active.
    fn live_queues(&self) -> Option<Vec<QueueSnapshot>>;
    /// Starts the device again after a restore: like `activate`, but what
    /// the driver configured while it ran (filters, tables) is kept.
    fn activate_restored(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.activate(mem, interrupt, queues)
    }
}

/// A virtqueue's configuration and ring positions (virtio-queue's
/// QueueState, made serde).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<virtio_queue::QueueState> for QueueSnapshot {
    fn from(s: virtio_queue::QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl QueueSnapshot {
    /// The queue, checked by virtio-queue (size a power of two within the
    /// maximum, aligned rings).
    pub fn to_queue(self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// `VRING_AVAIL_F_NO_INTERRUPT` in the avail ring's flags.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Whether the driver wants an interrupt for what was just added to the
/// used ring of `queue`. With EVENT_IDX that is the used-event index
/// (`Queue::needs_notification`); without it the driver's
/// `VRING_AVAIL_F_NO_INTERRUPT` flag, which virtio-queue does not look
/// at. Honouring it matters: a driver that polls a queue (a transmit
/// queue it reaps on its next send) sets it, and each interrupt it did not
/// want costs it an interrupt handler — on kvm_pvm an emulated one.
/// When the ring cannot be read, interrupt: a missed one can hang the
/// driver, an extra one cannot.
pub fn wants_interrupt<M: vm_memory::GuestMemory>(queue: &mut Queue, mem: &M) -> bool {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    // The used-ring writes before the flag read (virtio 1.x 2.7.7.2).
    std::sync::atomic::fence(Ordering::SeqCst);
    let flags = vm_memory::GuestAddress(queue.avail_ring());
    match vm_memory::Bytes::load::<u16>(mem, flags, Ordering::Acquire) {
        Ok(flags) => u16::from_le(flags) & AVAIL_F_NO_INTERRUPT == 0,
        Err(_) => true,
    }
}

/// Reads `data.len()` bytes of a config structure at `offset`, padding
/// with zeros beyond its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}
