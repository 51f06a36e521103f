//! The transmit queue: the guest's frames out to the TAP.

use std::io::Read;

use net::tap::VNET_HDR_LEN;
use virtio_queue::{QueueOwnedT, QueueT, Reader};

use super::{chain_is_whole, Net, MAX_FRAME_LEN, TX_QUEUE};

impl Net {
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
}
