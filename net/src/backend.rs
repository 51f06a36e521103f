//! Where a NIC's frames leave the guest and come in: the host side of a
//! NIC model. A TAP in Ferry; frames in memory for the data path's unit
//! tests ([`MemBackend`], after Firecracker's test utilities). Frames
//! carry the 12-byte virtio_net_hdr_v1 in front (`IFF_VNET_HDR`).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};

use crate::tap::Tap;

pub trait NetBackend: Send {
    /// For logs: the TAP's name.
    fn name(&self) -> &str;
    /// One frame into `buf`; `WouldBlock` when none waits.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame gathered from `bufs`.
    fn write_frame(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Sends one frame gathered from raw `iovs`: memory that may not be
    /// borrowed as `&[u8]`, like guest memory the guest can write while it
    /// is read.
    ///
    /// # Safety
    /// Each iovec must point to `iov_len` bytes that stay mapped and
    /// readable for the duration of the call.
    unsafe fn write_iovecs(&mut self, iovs: &[libc::iovec]) -> io::Result<usize>;
    /// The offloads (`TUN_F_*`) the guest's buffers can take.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
    /// Readable when a frame waits: what the event loop watches.
    fn ready_fd(&self) -> RawFd;
}

impl NetBackend for Tap {
    fn name(&self) -> &str {
        Tap::name(self)
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }

    fn write_frame(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.write_vectored(bufs)
    }

    unsafe fn write_iovecs(&mut self, iovs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller vouches for the buffers, as Tap's own asks.
        unsafe { Tap::write_iovecs(self, iovs) }
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags).map_err(io::Error::other)
    }

    fn ready_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

/// Frames in memory: what the host sends the guest waits in `to_guest`,
/// what the guest sent lands in `from_guest`.
#[derive(Debug, Default)]
pub struct MemBackend {
    pub to_guest: VecDeque<Vec<u8>>,
    pub from_guest: Vec<Vec<u8>>,
    /// The last offloads set.
    pub offloads: u32,
}

impl NetBackend for MemBackend {
    fn name(&self) -> &str {
        "memory"
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self
            .to_guest
            .pop_front()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        // Like a TAP read into a short buffer: the frame is cut.
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn write_frame(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let frame: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let n = frame.len();
        self.from_guest.push(frame);
        Ok(n)
    }

    unsafe fn write_iovecs(&mut self, iovs: &[libc::iovec]) -> io::Result<usize> {
        let mut frame = Vec::new();
        for iov in iovs {
            // SAFETY: the caller vouches that each iovec is readable for
            // its length during this call.
            let part =
                unsafe { std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len) };
            frame.extend_from_slice(part);
        }
        let n = frame.len();
        self.from_guest.push(frame);
        Ok(n)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.offloads = flags;
        Ok(())
    }

    /// Never readable: a test drives the device by hand.
    fn ready_fd(&self) -> RawFd {
        -1
    }
}
