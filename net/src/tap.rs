//! A TAP device opened for a virtio-net backend: `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`, non-blocking, with the 12-byte virtio-net header
//! (`virtio_net_hdr_v1`) in front of every frame in both directions.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

/// Offload flags for [`Tap::set_offload`] (what the TAP may hand us).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

/// Size of `virtio_net_hdr_v1` (with `num_buffers`), the header every
/// VERSION_1 virtio-net device uses.
pub const VNET_HDR_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} is empty or longer than 15 bytes")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    #[error("cannot create or attach TAP {name}: {source}")]
    SetIff {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("TAP {name}: {what}: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq`: a 16-byte name and a 24-byte union of which only the
/// leading short (flags) or int (ifindex) is used here.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

impl IfReq {
    fn named(name: &str) -> Result<Self, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() > 15 || bytes.contains(&0) {
            return Err(TapError::BadName(name.to_string()));
        }
        let mut req = IfReq::default();
        req.name[..bytes.len()].copy_from_slice(bytes);
        Ok(req)
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// An open TAP queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ioctl_ptr<T>(fd: RawFd, request: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    // SAFETY: every caller passes a request whose argument is exactly the
    // pointed-to type, which lives for the duration of the call.
    let rc = unsafe { libc::ioctl(fd, request, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Opens TAP `name`, creating it if it does not exist; an existing one
    /// is used as it is (addresses, bridge, up/down state untouched).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let mut req = IfReq::named(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        req.data[..2].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
        ioctl_ptr(file.as_raw_fd(), TUNSETIFF, &mut req).map_err(|source| TapError::SetIff {
            name: name.to_string(),
            source,
        })?;
        let tap = Tap {
            file,
            name: req.name(),
        };
        tap.set_vnet_hdr_len(VNET_HDR_LEN)?;
        Ok(tap)
    }

    /// Wraps a TAP fd received from another process (local migration):
    /// its name and flags come from the kernel.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let file = File::from(fd);
        let mut req = IfReq::default();
        ioctl_ptr(file.as_raw_fd(), TUNGETIFF, &mut req).map_err(|source| TapError::Ioctl {
            name: "<received fd>".into(),
            what: "TUNGETIFF",
            source,
        })?;
        Ok(Tap {
            file,
            name: req.name(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn ioctl_err(&self, what: &'static str) -> impl FnOnce(io::Error) -> TapError + '_ {
        move |source| TapError::Ioctl {
            name: self.name.clone(),
            what,
            source,
        }
    }

    pub fn set_vnet_hdr_len(&self, len: usize) -> Result<(), TapError> {
        let mut len = len as libc::c_int;
        ioctl_ptr(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &mut len)
            .map_err(self.ioctl_err("TUNSETVNETHDRSZ"))
    }

    /// Tells the kernel which offloads the guest accepts on receive
    /// (`TUN_F_*`); frames needing others are finished by the kernel.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let rc =
            unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
        if rc < 0 {
            return Err(self.ioctl_err("TUNSETOFFLOAD")(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The interface index of the TAP (stable across a local migration
    /// that hands the fd over).
    pub fn ifindex(&self) -> io::Result<i32> {
        let mut req = IfReq::named(&self.name).map_err(io::Error::other)?;
        // SAFETY: a plain datagram socket used only for the ioctl below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `sock` was just created and is owned here.
        let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(sock) };
        ioctl_ptr(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut req)?;
        Ok(i32::from_ne_bytes([
            req.data[0],
            req.data[1],
            req.data[2],
            req.data[3],
        ]))
    }

    /// Reads one frame (with its vnet header). `WouldBlock` when empty.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads at most buf.len() bytes into a live buffer.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame (vnet header first) gathered from `bufs`.
    pub fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let count = bufs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: IoSlice is ABI-compatible with iovec; `count` slices
        // are live for the call.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), bufs.as_ptr().cast(), count) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame (vnet header first) gathered from raw `iovs`: for
    /// memory that may not be borrowed as `&[u8]`, like guest memory the
    /// guest can write while the kernel reads it.
    ///
    /// # Safety
    /// Each iovec must point to `iov_len` bytes that stay mapped and
    /// readable for the duration of the call.
    pub unsafe fn write_iovecs(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        if iovs.len() > libc::UIO_MAXIOV as usize {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: the caller vouches for the buffers; the count is the
        // slice's own (at most UIO_MAXIOV).
        let n = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                iovs.as_ptr(),
                iovs.len() as libc::c_int,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// Duplicates the fd (for handing the TAP to another process).
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        Ok(self.file.try_clone()?.into())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(matches!(IfReq::named(""), Err(TapError::BadName(_))));
        assert!(matches!(
            IfReq::named("a-very-long-tap-name"),
            Err(TapError::BadName(_))
        ));
        assert_eq!(IfReq::named("tap0").unwrap().name(), "tap0");
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
