//! The virtio-mmio transport, version 2 (virtio 1.x, 4.2.2): the register
//! file a driver programs to negotiate features and hand over its queues.
//!
//! Every register access comes from a vCPU and carries guest data: wrong
//! sizes, unaligned offsets, writes in the wrong state and out-of-range
//! queue numbers are ignored (and logged), never trusted.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{status, QueueSnapshot, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::GuestMemoryMmap;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const TRANSPORT_VERSION: u32 = 2;
const FERRY_VENDOR_ID: u32 = 0x5952_5246; // "FRRY"

/// The register offsets (virtio 1.x, 4.2.2), as virtio-bindings has them
/// from Linux's virtio_mmio.h; the driver-side names (`QUEUE_DRIVER` for
/// the avail ring, `QUEUE_DEVICE` for the used ring) are the spec's.
pub mod regs {
    use virtio_bindings::virtio_mmio::*;

    pub const MAGIC: u64 = VIRTIO_MMIO_MAGIC_VALUE as u64;
    pub const VERSION: u64 = VIRTIO_MMIO_VERSION as u64;
    pub const DEVICE_ID: u64 = VIRTIO_MMIO_DEVICE_ID as u64;
    pub const VENDOR_ID: u64 = VIRTIO_MMIO_VENDOR_ID as u64;
    pub const DEVICE_FEATURES: u64 = VIRTIO_MMIO_DEVICE_FEATURES as u64;
    pub const DEVICE_FEATURES_SEL: u64 = VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
    pub const DRIVER_FEATURES: u64 = VIRTIO_MMIO_DRIVER_FEATURES as u64;
    pub const DRIVER_FEATURES_SEL: u64 = VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
    pub const QUEUE_SEL: u64 = VIRTIO_MMIO_QUEUE_SEL as u64;
    pub const QUEUE_NUM_MAX: u64 = VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
    pub const QUEUE_NUM: u64 = VIRTIO_MMIO_QUEUE_NUM as u64;
    pub const QUEUE_READY: u64 = VIRTIO_MMIO_QUEUE_READY as u64;
    pub const QUEUE_NOTIFY: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
    pub const INTERRUPT_STATUS: u64 = VIRTIO_MMIO_INTERRUPT_STATUS as u64;
    pub const INTERRUPT_ACK: u64 = VIRTIO_MMIO_INTERRUPT_ACK as u64;
    pub const STATUS: u64 = VIRTIO_MMIO_STATUS as u64;
    pub const QUEUE_DESC_LOW: u64 = VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
    pub const QUEUE_DESC_HIGH: u64 = VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
    pub const QUEUE_DRIVER_LOW: u64 = VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
    pub const QUEUE_DRIVER_HIGH: u64 = VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
    pub const QUEUE_DEVICE_LOW: u64 = VIRTIO_MMIO_QUEUE_USED_LOW as u64;
    pub const QUEUE_DEVICE_HIGH: u64 = VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
    pub const SHM_SEL: u64 = VIRTIO_MMIO_SHM_SEL as u64;
    pub const SHM_LEN_LOW: u64 = VIRTIO_MMIO_SHM_LEN_LOW as u64;
    pub const SHM_LEN_HIGH: u64 = VIRTIO_MMIO_SHM_LEN_HIGH as u64;
    pub const CONFIG_GENERATION: u64 = VIRTIO_MMIO_CONFIG_GENERATION as u64;
    pub const CONFIG_SPACE: u64 = VIRTIO_MMIO_CONFIG as u64;
}
use regs::{
    CONFIG_GENERATION, CONFIG_SPACE, DEVICE_FEATURES, DEVICE_FEATURES_SEL, DEVICE_ID,
    DRIVER_FEATURES, DRIVER_FEATURES_SEL, INTERRUPT_ACK, INTERRUPT_STATUS, MAGIC, QUEUE_DESC_HIGH,
    QUEUE_DESC_LOW, QUEUE_DEVICE_HIGH, QUEUE_DEVICE_LOW, QUEUE_DRIVER_HIGH, QUEUE_DRIVER_LOW,
    QUEUE_NOTIFY, QUEUE_NUM, QUEUE_NUM_MAX, QUEUE_READY, QUEUE_SEL, SHM_LEN_HIGH, SHM_LEN_LOW,
    SHM_SEL, STATUS, VENDOR_ID, VERSION,
};

/// Offset of QueueNotify in the window: the VMM registers an ioeventfd
/// there, one per queue (datamatch = queue index).
pub const QUEUE_NOTIFY_OFFSET: u64 = QUEUE_NOTIFY;

/// What the transport remembers of a driver's configuration, to be saved
/// with the device (issue #6).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioTransportState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
}

/// The transport's part of a device's saved state: its registers and
/// the queues (live positions when the device runs).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioTransportSnapshot {
    pub state: MmioTransportState,
    pub queues: Vec<QueueSnapshot>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("saved transport has {saved} queues, the device has {have}")]
    QueueCount { saved: usize, have: usize },
    #[error("saved queue {index} is invalid: {source:?}")]
    BadQueue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("restarting the device: {0}")]
    Activate(#[from] super::ActivateError),
}

pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    interrupt: VirtioInterrupt,
    queues: Vec<Queue>,
    /// One per queue: the fallback for a notify that reaches userspace
    /// instead of the ioeventfd (they share the same eventfd).
    queue_evts: Vec<Arc<EventFd>>,
    state: MmioTransportState,
    /// The guest's faults, logged at most once a second each.
    guest_log: crate::guest_log::GuestLog,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(
        device: D,
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        queue_evts: Vec<Arc<EventFd>>,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            queue_evts,
            state: MmioTransportState::default(),
            guest_log: Default::default(),
        })
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn state(&self) -> MmioTransportState {
        MmioTransportState {
            interrupt_status: self.interrupt.status(),
            ..self.state.clone()
        }
    }

    pub fn interrupt(&self) -> &VirtioInterrupt {
        &self.interrupt
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let sel = self.state.queue_sel as usize;
        self.queues.get_mut(sel)
    }

    fn driver_ok(&self) -> bool {
        self.state.status & status::DRIVER_OK != 0
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.state.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            MAGIC => MAGIC_VALUE,
            VERSION => TRANSPORT_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => FERRY_VENDOR_ID,
            DEVICE_FEATURES => match self.state.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.state.status,
            // No shared memory regions: length all ones.
            SHM_LEN_LOW | SHM_LEN_HIGH => u32::MAX,
            CONFIG_GENERATION => self.device.config_generation(),
            _ => {
                crate::guest_log!(
                    self.guest_log,
                    Debug,
                    "virtio-mmio: read of write-only or unknown register {offset:#x}"
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.state.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.state.driver_features_sel = value,
            DRIVER_FEATURES => {
                if self.state.status & (status::FEATURES_OK | status::DRIVER_OK) != 0
                    || self.state.status & status::DRIVER == 0
                {
                    crate::guest_log!(
                        self.guest_log,
                        Warn,
                        "virtio-mmio: driver features written in status {:#x}, ignored",
                        self.state.status
                    );
                    return;
                }
                let f = &mut self.state.driver_features;
                match self.state.driver_features_sel {
                    0 => *f = (*f & !0xffff_ffff) | u64::from(value),
                    1 => *f = (*f & 0xffff_ffff) | (u64::from(value) << 32),
                    _ => crate::guest_log!(
                        self.guest_log,
                        Debug,
                        "virtio-mmio: driver features word {} ignored",
                        self.state.driver_features_sel
                    ),
                }
            }
            QUEUE_SEL => self.state.queue_sel = value,
            QUEUE_NUM | QUEUE_READY | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW
            | QUEUE_DRIVER_HIGH | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => {
                self.write_queue_reg(offset, value)
            }
            QUEUE_NOTIFY => match self.queue_evts.get(value as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        log::error!("virtio-mmio: queue notify: {e}");
                    }
                }
                None => crate::guest_log!(
                    self.guest_log,
                    Debug,
                    "virtio-mmio: notify for queue {value} that does not exist"
                ),
            },
            INTERRUPT_ACK => self.interrupt.ack(value),
            STATUS => self.write_status(value),
            SHM_SEL => {}
            _ => crate::guest_log!(
                self.guest_log,
                Debug,
                "virtio-mmio: write {value:#x} to read-only or unknown register {offset:#x}"
            ),
        }
    }

    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        if !self.queue_config_allowed() {
            crate::guest_log!(
                self.guest_log,
                Warn,
                "virtio-mmio: queue register {offset:#x} written in status {:#x}, ignored",
                self.state.status
            );
            return;
        }
        let Some(q) = self.selected_queue() else {
            crate::guest_log!(
                self.guest_log,
                Debug,
                "virtio-mmio: queue register for a queue that does not exist"
            );
            return;
        };
        if q.ready() && offset != QUEUE_READY {
            crate::guest_log!(
                self.guest_log,
                Warn,
                "virtio-mmio: queue register {offset:#x} written while the queue is ready, ignored"
            );
            return;
        }
        match offset {
            QUEUE_NUM => {
                if let Err(e) = q.try_set_size(value.min(u32::from(u16::MAX)) as u16) {
                    crate::guest_log!(
                        self.guest_log,
                        Warn,
                        "virtio-mmio: queue size {value}: {e:?}"
                    );
                }
            }
            QUEUE_READY => q.set_ready(value == 1),
            QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
            QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
            QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
            QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.state.status;
        // The driver may only add bits (besides resetting with 0).
        if value & old != old {
            crate::guest_log!(
                self.guest_log,
                Warn,
                "virtio-mmio: status {old:#x} -> {value:#x} clears bits, ignored"
            );
            return;
        }
        let added = value & !old;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.device_features();
            let wanted = self.state.driver_features;
            if wanted & !offered != 0 || wanted & (1 << VIRTIO_F_VERSION_1) == 0 {
                // Leave FEATURES_OK clear: the driver reads it back and
                // gives up (virtio 1.x, 3.1.1).
                crate::guest_log!(self.guest_log, Warn, "virtio-mmio: driver asked for features {wanted:#x} of {offered:#x} (VERSION_1 is required)");
                self.state.status = value & !status::FEATURES_OK;
                return;
            }
            self.device.set_acked_features(wanted);
        }
        self.state.status = value;
        if added & status::DRIVER_OK != 0 && value & status::FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                crate::guest_log!(
                    self.guest_log,
                    Warn,
                    "virtio-mmio: queue {i} is not usable; device needs reset"
                );
                self.needs_reset();
                return;
            }
            match Queue::try_from(q.state()) {
                Ok(copy) => queues.push(copy),
                Err(e) => {
                    crate::guest_log!(
                        self.guest_log,
                        Warn,
                        "virtio-mmio: queue {i}: {e:?}; device needs reset"
                    );
                    self.needs_reset();
                    return;
                }
            }
        }
        if let Err(e) = self
            .device
            .activate(self.mem.clone(), self.interrupt.clone(), queues)
        {
            crate::guest_log!(self.guest_log, Warn, "virtio-mmio: activation failed: {e}");
            self.needs_reset();
        }
    }

    /// Registers and queues, for the migration stream. The device must
    /// not be processing (the VM is paused).
    pub fn snapshot(&self) -> MmioTransportSnapshot {
        let queues = self.device.live_queues().unwrap_or_else(|| {
            self.queues
                .iter()
                .map(|q| QueueSnapshot::from(q.state()))
                .collect()
        });
        MmioTransportSnapshot {
            state: self.state(),
            queues,
        }
    }

    /// Puts the transport back as it was saved and, when the driver had
    /// started the device, starts it again with the saved queues. The
    /// device's own state must be restored first.
    pub fn restore(&mut self, snapshot: &MmioTransportSnapshot) -> Result<(), RestoreError> {
        if snapshot.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: snapshot.queues.len(),
                have: self.queues.len(),
            });
        }
        // Two copies of each queue: the transport's register view and the
        // device's working queue (Queue is not Clone).
        let build = || -> Result<Vec<Queue>, RestoreError> {
            snapshot
                .queues
                .iter()
                .enumerate()
                .map(|(index, q)| {
                    q.to_queue()
                        .map_err(|source| RestoreError::BadQueue { index, source })
                })
                .collect()
        };
        let queues = build()?;
        self.queues = build()?;
        self.state = snapshot.state.clone();
        self.interrupt.clear();
        if self.driver_ok() && self.state.status & status::DEVICE_NEEDS_RESET == 0 {
            self.device
                .activate_restored(self.mem.clone(), self.interrupt.clone(), queues)?;
        }
        // An interrupt the guest had not yet acknowledged: raise it again
        // (a spurious one is harmless, a lost one hangs the driver).
        let pending = snapshot.state.interrupt_status;
        if pending & super::INT_USED_RING != 0 {
            self.interrupt.signal_used_queue();
        }
        if pending & super::INT_CONFIG_CHANGE != 0 {
            self.interrupt.signal_config_change();
        }
        Ok(())
    }

    /// The device found the driver's rings unusable: tell the driver.
    pub fn set_needs_reset(&mut self, why: &str) {
        crate::guest_log!(
            self.guest_log,
            Warn,
            "virtio-mmio: device needs reset: {why}"
        );
        self.needs_reset();
    }

    fn needs_reset(&mut self) {
        self.state.status |= status::DEVICE_NEEDS_RESET;
        if self.driver_ok() {
            self.interrupt.signal_config_change();
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.clear();
        self.state = MmioTransportState::default();
    }

    /// The memory the device works on (replaced when memory moves).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    #[cfg(test)]
    pub fn queue(&self, i: usize) -> &Queue {
        &self.queues[i]
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            crate::guest_log!(
                self.guest_log,
                Debug,
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::guest_log!(
                self.guest_log,
                Debug,
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

/// A NIC behind the transport is announced through it: the announcer
/// holds the transport (the lock the bus and the event loop share), not
/// the device model.
impl<D: VirtioDevice + net::Nic> net::Nic for MmioTransport<D> {
    fn id(&self) -> &str {
        self.device.id()
    }
    fn macs(&self) -> Vec<net::MacAddr> {
        self.device.macs()
    }
    fn vlans(&self) -> Vec<u16> {
        self.device.vlans()
    }
    fn send_raw(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.device.send_raw(frame)
    }
    fn ask_guest_to_announce(&mut self) -> bool {
        self.device.ask_guest_to_announce()
    }
    fn rarp_plan(&self) -> (Vec<net::Identity>, usize) {
        self.device.rarp_plan()
    }
    fn mark_senders(&mut self) -> u64 {
        self.device.mark_senders()
    }
    fn senders_since(&self, mark: u64) -> Vec<net::Identity> {
        self.device.senders_since(mark)
    }
    fn announce_rounds_left(&self) -> u64 {
        self.device.announce_rounds_left()
    }
    fn set_announce_rounds_left(&mut self, rounds: u64) {
        self.device.set_announce_rounds_left(rounds)
    }
    fn cancel_announce(&mut self) {
        self.device.cancel_announce()
    }
    fn announce_ack_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.announce_ack_fd()
    }
}

#[cfg(test)]
mod tests;
