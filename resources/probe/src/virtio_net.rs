//! virtio-net over virtio-mmio: feature negotiation, rx/tx/ctrl split
//! queues, and the control commands Linux's driver sends (RX mode, MAC
//! table, VLAN filter, announce ack).

use ferry_probe_packets::MacAddr;

use crate::interrupts::MAX_NICS;
use crate::virtio_mmio::{
    QueueMemory, SplitQueue, Transport, QUEUE_SIZE_MAX, STATUS_ACKNOWLEDGE, STATUS_DRIVER,
    STATUS_DRIVER_OK, STATUS_FAILED, VIRTIO_F_VERSION_1, VIRTIO_ID_NET,
};

pub const F_MAC: u64 = 1 << 5;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
pub const F_CTRL_VQ: u64 = 1 << 17;
pub const F_CTRL_RX: u64 = 1 << 18;
pub const F_CTRL_VLAN: u64 = 1 << 19;
pub const F_GUEST_ANNOUNCE: u64 = 1 << 21;
pub const F_CTRL_MAC_ADDR: u64 = 1 << 23;

pub const S_LINK_UP: u16 = 1;
pub const S_ANNOUNCE: u16 = 2;

const CTRL_RX: u8 = 0;
const CTRL_RX_PROMISC: u8 = 0;
const CTRL_RX_ALLMULTI: u8 = 1;
const CTRL_MAC: u8 = 1;
const CTRL_MAC_TABLE_SET: u8 = 0;
const CTRL_MAC_ADDR_SET: u8 = 1;
const CTRL_VLAN: u8 = 2;
const CTRL_VLAN_ADD: u8 = 0;
const CTRL_VLAN_DEL: u8 = 1;
const CTRL_ANNOUNCE: u8 = 3;
const CTRL_ANNOUNCE_ACK: u8 = 0;
const CTRL_OK: u8 = 0;

/// virtio_net_hdr_v1: with VERSION_1 the header is always 12 bytes.
pub const NET_HDR_LEN: usize = 12;
pub const BUF_SIZE: usize = 2048;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const CTRL_QUEUE: u16 = 2;

/// Memory the device reads and writes, per NIC. Identity-mapped, so a
/// virtual address is the guest-physical address the device wants.
#[repr(C, align(4096))]
pub struct NicMemory {
    rxq: QueueMemory,
    txq: QueueMemory,
    ctrlq: QueueMemory,
    rx: [[u8; BUF_SIZE]; QUEUE_SIZE_MAX],
    tx: [[u8; BUF_SIZE]; QUEUE_SIZE_MAX],
    ctrl: [u8; 4096],
}

static mut NIC_MEMORY: [NicMemory; MAX_NICS] = [const {
    NicMemory {
        rxq: QueueMemory::new(),
        txq: QueueMemory::new(),
        ctrlq: QueueMemory::new(),
        rx: [[0; BUF_SIZE]; QUEUE_SIZE_MAX],
        tx: [[0; BUF_SIZE]; QUEUE_SIZE_MAX],
        ctrl: [0; 4096],
    }
}; MAX_NICS];

/// The transmit side: what protocol code needs to send frames.
pub struct TxSide {
    transport: Transport,
    queue: SplitQueue,
    buffers: &'static mut [[u8; BUF_SIZE]; QUEUE_SIZE_MAX],
    pending_notify: bool,
    pub frames: u64,
    pub bytes: u64,
    pub dropped: u64,
    pub error: Option<&'static str>,
}

impl TxSide {
    /// Builds a frame with `build` (which gets the frame area and returns
    /// the length, or None to send nothing) and queues it. Never waits: a
    /// full queue drops the frame (counted).
    pub fn send(&mut self, build: impl FnOnce(&mut [u8]) -> Option<usize>) -> bool {
        if self.error.is_some() {
            return false;
        }
        if self.queue.free_descriptors() == 0 {
            self.reclaim();
        }
        let Some(id) = self.queue.peek_free() else {
            self.dropped += 1;
            return false;
        };
        let buffer = &mut self.buffers[id as usize];
        buffer[..NET_HDR_LEN].fill(0);
        let Some(len) = build(&mut buffer[NET_HDR_LEN..]) else {
            return false;
        };
        let len = len.min(BUF_SIZE - NET_HDR_LEN);
        let addr = buffer.as_ptr() as u64;
        if self
            .queue
            .push_chain(&[(addr, (NET_HDR_LEN + len) as u32, false)])
            .is_none()
        {
            self.dropped += 1;
            return false;
        }
        self.frames += 1;
        self.bytes += len as u64;
        self.pending_notify = true;
        true
    }

    /// Tells the device about queued frames (once per batch).
    pub fn flush(&mut self) {
        if self.pending_notify {
            self.pending_notify = false;
            if self.queue.needs_notify() {
                self.transport.notify(TX_QUEUE);
            }
        }
    }

    /// Takes back what the device has sent.
    pub fn reclaim(&mut self) {
        loop {
            match self.queue.pop_used(false) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    self.error = Some(e);
                    break;
                }
            }
        }
    }

    pub fn free_slots(&self) -> usize {
        self.queue.free_descriptors()
    }
}

pub struct VirtioNet {
    pub index: usize,
    pub transport: Transport,
    pub features: u64,
    pub offered: u64,
    pub mac: MacAddr,
    pub device_has_mac: bool,
    rxq: SplitQueue,
    rx: &'static mut [[u8; BUF_SIZE]; QUEUE_SIZE_MAX],
    /// Used rx buffers still to skip: the rest of a frame that spanned
    /// several buffers (never expected without GSO; dropped if it happens).
    rx_skip: u16,
    pub tx: TxSide,
    ctrlq: Option<SplitQueue>,
    ctrl: &'static mut [u8; 4096],
    pub error: Option<&'static str>,
}

/// Takes NIC `index`'s memory; None if it was taken already.
fn take_memory(index: usize) -> Option<&'static mut NicMemory> {
    use core::sync::atomic::{AtomicU32, Ordering};
    static TAKEN: AtomicU32 = AtomicU32::new(0);
    if index >= MAX_NICS || TAKEN.fetch_or(1 << index, Ordering::Relaxed) & (1 << index) != 0 {
        return None;
    }
    // SAFETY: each index is handed out once (checked above), so this is the
    // only reference to that element.
    Some(unsafe { &mut *core::ptr::addr_of_mut!(NIC_MEMORY[index]) })
}

impl VirtioNet {
    /// Brings the device up to DRIVER_OK with its rx ring full. On error
    /// the device is marked FAILED and the reason returned.
    pub fn init(
        index: usize,
        base: u64,
        want_announce: bool,
        fallback_mac: MacAddr,
    ) -> Result<VirtioNet, &'static str> {
        let transport = Transport { base };
        transport.identify(VIRTIO_ID_NET)?;
        let memory = take_memory(index).ok_or("no driver memory for this NIC")?;
        let result = Self::bring_up(index, transport, memory, want_announce, fallback_mac);
        if result.is_err() {
            transport.set_status(transport.status() | STATUS_FAILED);
        }
        result
    }

    fn bring_up(
        index: usize,
        transport: Transport,
        memory: &'static mut NicMemory,
        want_announce: bool,
        fallback_mac: MacAddr,
    ) -> Result<VirtioNet, &'static str> {
        if !transport.reset() {
            return Err("device does not reset (status stays nonzero)");
        }
        transport.set_status(STATUS_ACKNOWLEDGE);
        transport.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let offered = transport.device_features();
        let mut wanted = VIRTIO_F_VERSION_1
            | F_MAC
            | F_MRG_RXBUF
            | F_STATUS
            | F_CTRL_VQ
            | F_CTRL_RX
            | F_CTRL_VLAN
            | F_CTRL_MAC_ADDR;
        if want_announce {
            wanted |= F_GUEST_ANNOUNCE;
        }
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err("device does not offer VIRTIO_F_VERSION_1");
        }
        let mut features = offered & wanted;
        if features & F_CTRL_VQ == 0 {
            // These ride on the control queue (spec 5.1.3.1).
            features &= !(F_CTRL_RX | F_CTRL_VLAN | F_GUEST_ANNOUNCE | F_CTRL_MAC_ADDR);
        }
        if features & F_STATUS == 0 {
            features &= !F_GUEST_ANNOUNCE;
        }
        transport.accept_features(features)?;

        let NicMemory {
            rxq,
            txq,
            ctrlq,
            rx,
            tx,
            ctrl,
        } = memory;
        let rx_queue = transport.setup_queue(RX_QUEUE, rxq)?;
        let tx_queue = transport.setup_queue(TX_QUEUE, txq)?;
        let ctrl_queue = if features & F_CTRL_VQ != 0 {
            Some(transport.setup_queue(CTRL_QUEUE, ctrlq)?)
        } else {
            None
        };
        let mut mac = fallback_mac;
        let device_has_mac = features & F_MAC != 0;
        if device_has_mac {
            let mut bytes = [0u8; 6];
            transport.read_config(0, &mut bytes)?;
            mac = MacAddr(bytes);
        }
        let mut nic = VirtioNet {
            index,
            transport,
            features,
            offered,
            mac,
            device_has_mac,
            rxq: rx_queue,
            rx,
            rx_skip: 0,
            tx: TxSide {
                transport,
                queue: tx_queue,
                buffers: tx,
                pending_notify: false,
                frames: 0,
                bytes: 0,
                dropped: 0,
                error: None,
            },
            ctrlq: ctrl_queue,
            ctrl,
            error: None,
        };
        // We reclaim transmitted buffers by polling; no tx interrupts.
        nic.tx.queue.set_interrupts(false);
        for i in 0..nic.rxq.size as usize {
            let addr = nic.rx[i].as_ptr() as u64;
            // Heads come off the free list in order, so head i <-> buffer i.
            if nic.rxq.push_chain(&[(addr, BUF_SIZE as u32, true)]) != Some(i as u16) {
                return Err("rx ring setup went wrong");
            }
        }
        transport.set_status(transport.status() | STATUS_DRIVER_OK);
        if transport.status() & STATUS_FAILED != 0 {
            return Err("device set FAILED after DRIVER_OK");
        }
        transport.notify(RX_QUEUE);
        if !device_has_mac && features & F_CTRL_MAC_ADDR != 0 {
            nic.ctrl_command(CTRL_MAC, CTRL_MAC_ADDR_SET, &[&mac.0])?;
        }
        if features & F_CTRL_RX != 0 {
            nic.ctrl_command(CTRL_RX, CTRL_RX_PROMISC, &[&[0]])?;
            nic.ctrl_command(CTRL_RX, CTRL_RX_ALLMULTI, &[&[0]])?;
        }
        Ok(nic)
    }

    pub fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    /// The config status field (LINK_UP, ANNOUNCE), 0 without F_STATUS.
    pub fn config_status(&self) -> u16 {
        if !self.has(F_STATUS) {
            return 0;
        }
        let mut bytes = [0u8; 2];
        match self.transport.read_config(6, &mut bytes) {
            Ok(()) => u16::from_le_bytes(bytes),
            Err(_) => 0,
        }
    }

    /// Sends one control command (header, data pieces, ack) and waits for
    /// the device's answer, bounded.
    pub fn ctrl_command(&mut self, class: u8, cmd: u8, data: &[&[u8]]) -> Result<(), &'static str> {
        let queue = self.ctrlq.as_mut().ok_or("no control queue")?;
        let base = self.ctrl.as_ptr() as u64;
        self.ctrl[0] = class;
        self.ctrl[1] = cmd;
        let mut chain = [(0u64, 0u32, false); 6];
        chain[0] = (base, 2, false);
        let mut offset = 64usize;
        let mut n = 1;
        for piece in data.iter().take(4) {
            if offset + piece.len() > self.ctrl.len() - 64 {
                return Err("control command too large");
            }
            self.ctrl[offset..offset + piece.len()].copy_from_slice(piece);
            chain[n] = (base + offset as u64, piece.len() as u32, false);
            offset = (offset + piece.len() + 15) & !15;
            n += 1;
        }
        let ack_at = self.ctrl.len() - 16;
        self.ctrl[ack_at] = 0xFF;
        chain[n] = (base + ack_at as u64, 1, true);
        n += 1;
        queue.push_chain(&chain[..n]).ok_or("control queue full")?;
        self.transport.notify(CTRL_QUEUE);
        let deadline = crate::platform::now_ns() + 2_000_000_000;
        loop {
            match queue.pop_used(false)? {
                Some(_) => break,
                None if crate::platform::now_ns() > deadline => {
                    return Err("control command timed out");
                }
                None => core::hint::spin_loop(),
            }
        }
        // SAFETY: a byte of our control buffer the device wrote.
        let ack = unsafe { (self.ctrl.as_ptr().add(ack_at)).read_volatile() };
        if ack == CTRL_OK {
            Ok(())
        } else {
            Err("device answered VIRTIO_NET_ERR")
        }
    }

    /// MAC_TABLE_SET: the unicast MACs besides the primary; no multicast.
    pub fn set_mac_table(&mut self, extra: &[MacAddr]) -> Result<(), &'static str> {
        if !self.has(F_CTRL_RX) {
            return Err("no VIRTIO_NET_F_CTRL_RX");
        }
        let mut unicast = [0u8; 4 + 6 * 16];
        let count = extra.len().min(16);
        unicast[..4].copy_from_slice(&(count as u32).to_le_bytes());
        for (i, mac) in extra.iter().take(count).enumerate() {
            unicast[4 + 6 * i..10 + 6 * i].copy_from_slice(&mac.0);
        }
        let multicast = 0u32.to_le_bytes();
        self.ctrl_command(
            CTRL_MAC,
            CTRL_MAC_TABLE_SET,
            &[&unicast[..4 + 6 * count], &multicast],
        )
    }

    pub fn vlan(&mut self, vid: u16, add: bool) -> Result<(), &'static str> {
        if !self.has(F_CTRL_VLAN) {
            return Err("no VIRTIO_NET_F_CTRL_VLAN");
        }
        let cmd = if add { CTRL_VLAN_ADD } else { CTRL_VLAN_DEL };
        self.ctrl_command(CTRL_VLAN, cmd, &[&vid.to_le_bytes()])
    }

    pub fn announce_ack(&mut self) -> Result<(), &'static str> {
        self.ctrl_command(CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK, &[])
    }

    /// Hands each received frame to `handle` (with the transmit side for
    /// replies) and gives the buffers back. Returns frames seen.
    pub fn poll_rx(&mut self, budget: usize, mut handle: impl FnMut(&[u8], &mut TxSide)) -> usize {
        let mut seen = 0;
        let mut reposted = false;
        while seen < budget && self.error.is_none() {
            let (head, len) = match self.rxq.pop_used(true) {
                Ok(Some(used)) => used,
                Ok(None) => break,
                Err(e) => {
                    self.error = Some(e);
                    break;
                }
            };
            seen += 1;
            let len = (len as usize).min(BUF_SIZE);
            let buffer = &self.rx[head as usize];
            if self.rx_skip > 0 {
                self.rx_skip -= 1;
            } else if len >= NET_HDR_LEN {
                let num_buffers = u16::from_le_bytes([buffer[10], buffer[11]]);
                if self.has(F_MRG_RXBUF) && num_buffers > 1 {
                    self.rx_skip = num_buffers - 1;
                    handle(&[], &mut self.tx); // counted as malformed
                } else {
                    handle(&buffer[NET_HDR_LEN..len], &mut self.tx);
                }
            } else {
                handle(&[], &mut self.tx);
            }
            self.rxq.repost(head);
            reposted = true;
        }
        if reposted && self.rxq.needs_notify() {
            self.transport.notify(RX_QUEUE);
        }
        self.tx.flush();
        seen
    }

    pub fn rx_pending(&self) -> bool {
        self.rxq.has_used()
    }

    /// Asks for (or stops) rx interrupts; polling picks up the rest.
    pub fn set_rx_interrupts(&mut self, enabled: bool) {
        self.rxq.set_interrupts(enabled);
    }

    pub fn queue_sizes(&self) -> (u16, u16, u16) {
        (
            self.rxq.size,
            self.tx.queue.size,
            self.ctrlq.as_ref().map_or(0, |q| q.size),
        )
    }
}
