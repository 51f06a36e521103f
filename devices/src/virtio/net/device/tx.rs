//! The transmit queue: the guest's frames out to the TAP.
//!
//! A frame goes to the TAP straight from guest memory, one writev over the
//! chain's buffers: no copy, and the chain is walked once (it was walked
//! three times — whole-chain check, reader, copy — which cost guest→host
//! throughput a few percent against QEMU).

use net::tap::VNET_HDR_LEN;
use net::NetBackend;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryBackend;

use super::{ring_err, Net, MAX_FRAME_LEN, TX_QUEUE};
use crate::GuestMemoryMmap;

/// Most pieces a frame may be in; more is refused (Linux sends at most
/// MAX_SKB_FRAGS + 2, i.e. 19).
const MAX_TX_PIECES: usize = libc::UIO_MAXIOV as usize;

impl<B: NetBackend> Net<B> {
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
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(32);
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                self.broken = Some(ring_err("tx", "ring")(e));
                break;
            }
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                match frame_pieces(mem, chain, &mut iovs) {
                    Some(len) => {
                        let mut header = [0u8; 16];
                        // SAFETY: as for write_iovecs below: every iovec
                        // is a checked, mapped slice of guest memory.
                        let n = unsafe { peek(&iovs, VNET_HDR_LEN, &mut header) };
                        self.state.senders.record_frame(&header[..n]);
                        // SAFETY: each iovec is a slice of guest memory
                        // that `frame_pieces` checked lies inside a region
                        // of `mem`, which stays mapped while `mem` (held
                        // by this device) lives.
                        match unsafe { self.backend.write_iovecs(&iovs) } {
                            Ok(_) => {
                                self.metrics.tx_frames += 1;
                                self.metrics.tx_bytes += (len - VNET_HDR_LEN) as u64;
                            }
                            Err(e) => {
                                self.metrics.tx_dropped += 1;
                                log::debug!("{}: TAP write: {e}", self.state.id);
                            }
                        }
                    }
                    None => self.metrics.bad_descriptors += 1,
                }
                if let Err(e) = queue.add_used(mem, head, 0) {
                    self.broken = Some(ring_err("tx", "used ring")(e));
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
                self.broken = Some(ring_err("tx", "avail ring")(e));
                break;
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue, // more arrived meanwhile
                Ok(false) => break,
                Err(e) => {
                    self.broken = Some(ring_err("tx", "ring")(e));
                    break;
                }
            }
        }
        if let Some(why) = self.broken.take() {
            self.set_broken(why);
            return;
        }
        if sent {
            self.signal(TX_QUEUE);
        }
    }
}

/// The frame of a tx chain as host pieces of guest memory in `iovs`, and
/// its length with the vnet header; `None` for a chain to refuse: one
/// that ends early (a next index beyond the table, an unreadable
/// descriptor, a bad or nested indirect table, a loop — the iterator stops
/// without reaching a descriptor lacking NEXT), a buffer outside guest
/// memory, a frame shorter than its header or longer than any frame, or
/// too many pieces. Device-writable buffers carry nothing to send and are
/// skipped, as virtio-queue's Reader does.
fn frame_pieces<'m>(
    mem: &'m GuestMemoryMmap,
    chain: DescriptorChain<&'m GuestMemoryMmap>,
    iovs: &mut Vec<libc::iovec>,
) -> Option<usize> {
    iovs.clear();
    let mut len = 0usize;
    let mut whole = false;
    for desc in chain {
        whole = !desc.has_next();
        if desc.is_write_only() {
            continue;
        }
        len = len.checked_add(desc.len() as usize)?;
        if len > MAX_FRAME_LEN {
            return None;
        }
        for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), desc.len() as usize) {
            let slice = slice.ok()?;
            if iovs.len() == MAX_TX_PIECES {
                return None;
            }
            iovs.push(libc::iovec {
                iov_base: slice.ptr_guard().as_ptr() as *mut libc::c_void,
                iov_len: slice.len(),
            });
        }
    }
    (whole && len >= VNET_HDR_LEN).then_some(len)
}

/// Copies up to `out.len()` bytes that follow the first `skip` bytes of
/// the frame in `iovs`; returns how many.
///
/// # Safety
/// Every iovec must describe readable memory that stays mapped for the
/// call (here: slices of guest memory checked by [`frame_pieces`]).
unsafe fn peek(iovs: &[libc::iovec], mut skip: usize, out: &mut [u8]) -> usize {
    let mut n = 0;
    for iov in iovs {
        if n == out.len() {
            break;
        }
        if skip >= iov.iov_len {
            skip -= iov.iov_len;
            continue;
        }
        let take = (iov.iov_len - skip).min(out.len() - n);
        // SAFETY: `skip + take <= iov_len`, inside the iovec the caller
        // vouches for; `out[n..n + take]` is in bounds. The guest may
        // write the bytes meanwhile: they are copied as they are, and
        // only ever read as an Ethernet header.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (iov.iov_base as *const u8).add(skip),
                out.as_mut_ptr().add(n),
                take,
            );
        }
        n += take;
        skip = 0;
    }
    n
}
