//! The control queue: RX modes, the MAC table, the VLAN filter, the
//! announce acknowledgement — what the host learns of the guest's
//! addresses.

use net::NetBackend;
use std::io::{Read, Write};

use net::MacAddr;
use virtio_bindings::virtio_net::*;
use virtio_queue::{QueueOwnedT, QueueT, Reader, Writer};

use super::super::ctrl::{self, CtrlCommand, CtrlError, RxMode};
use super::{chain_is_whole, ring_err, Net, CTRL_QUEUE};

impl<B: NetBackend> Net<B> {
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
                    crate::guest_log!(
                        self.guest_log,
                        Info,
                        "{}: control command refused: {e}",
                        self.state.id
                    );
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
                self.set_broken(ring_err("ctrl", "used ring")(e));
                return;
            }
            done = true;
        }
        if done {
            self.signal(CTRL_QUEUE);
        }
        if let Some(e) = ring_error {
            self.set_broken(ring_err("ctrl", "avail ring")(e));
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
                return Ok(());
            }
        }
        // Every other command changed the receive filter (MAC, MAC
        // table, VLANs, rx mode): QMP hears of it.
        self.rx_filter_changed();
        Ok(())
    }
}

fn join(macs: &[MacAddr]) -> String {
    macs.iter()
        .map(|m| m.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
