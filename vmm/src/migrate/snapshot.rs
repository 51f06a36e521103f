//! The source's side of a snapshot in the file form
//! (`migration::snapshot`): guest pages written straight to their place
//! in the file's RAM image, contiguous data pages with one write.

use migration::snapshot::SnapshotFile;
use migration::PAGE_SIZE;

use super::ram::{PageOut, RamError};

/// Data pages gathered for one write.
const BATCH_PAGES: usize = 256;

/// Pages into a snapshot's RAM image. Zero pages are holes: in the first
/// pass over a fresh file nothing is written for them; in a later pass
/// a page that became zero is punched out.
pub struct ImagePages<'a> {
    file: &'a SnapshotFile,
    first_pass: bool,
    buf: Vec<u8>,
    /// Guest address of `buf`'s first page.
    at: u64,
    bandwidth: Option<migration::Bandwidth>,
}

impl<'a> ImagePages<'a> {
    /// `bandwidth`: `max-bandwidth`, which a snapshot honours too.
    pub fn new(
        file: &'a SnapshotFile,
        first_pass: bool,
        bandwidth: Option<migration::Bandwidth>,
    ) -> Self {
        Self {
            file,
            first_pass,
            buf: Vec::with_capacity(BATCH_PAGES * PAGE_SIZE),
            at: 0,
            bandwidth,
        }
    }

    /// Writes what is gathered.
    pub fn finish(&mut self) -> Result<(), RamError> {
        if !self.buf.is_empty() {
            if let Some(b) = &self.bandwidth {
                b.wait(self.buf.len());
            }
            self.file
                .write_pages(self.at, &self.buf)
                .map_err(RamError::Image)?;
            self.buf.clear();
        }
        Ok(())
    }
}

impl PageOut for ImagePages<'_> {
    fn zero_pages(&mut self, gpa: u64, pages: u32) -> Result<(), RamError> {
        if self.first_pass {
            return Ok(());
        }
        self.finish()?;
        self.file
            .zero_pages(gpa, u64::from(pages))
            .map_err(RamError::Image)
    }

    fn page_or_zero<F>(&mut self, gpa: u64, fill: F) -> Result<bool, RamError>
    where
        F: FnOnce(&mut [u8]) -> std::io::Result<bool>,
    {
        let follows = self.at + self.buf.len() as u64 == gpa;
        if !follows || self.buf.len() == BATCH_PAGES * PAGE_SIZE {
            self.finish()?;
            self.at = gpa;
        }
        let from = self.buf.len();
        self.buf.resize(from + PAGE_SIZE, 0);
        let zero = fill(&mut self.buf[from..]).map_err(RamError::Image)?;
        if zero {
            self.buf.truncate(from);
            self.zero_pages(gpa, 1)?;
            return Ok(false);
        }
        Ok(true)
    }
}

// <fcntl.h> values the libc crate does not carry.
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;
#[repr(C)]
struct FOwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

/// The signal a lease break on a mapped snapshot file is told with.
fn lease_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

/// Keeps a guest restored by mapping safe from its snapshot file being
/// written in place. The guest's pages that it has not written yet are
/// the file's (MAP_PRIVATE), so a program that opened the file to write
/// it (or truncate it) would change or unmap them under the guest.
/// A read lease on the file makes the kernel tell this thread first and
/// hold that `open` back (up to /proc/sys/fs/lease-break-time, 45 s by
/// default); the thread then copies every page of guest memory out of
/// the file (a write fault per page: copy on write) and lets the lease
/// go. Renaming over the file or deleting it needs none of this (the
/// mapping keeps its inode) and does not wake the thread.
///
/// Without a lease (a file system or ownership that refuses it) the
/// guest still runs; the log says the file must then not be written.
pub fn guard_image(file: &std::fs::File, memory: crate::memory::GuestMemoryMmap) {
    use std::os::fd::AsRawFd;
    let fd = match file.try_clone() {
        Ok(f) => f,
        Err(e) => {
            log::warn!("snapshot lease: {e}; do not write the snapshot file while this guest runs");
            return;
        }
    };
    // The thread must give up its capabilities before the process's
    // seccomp filter arrives (it forbids capset): the caller waits for it.
    let (set_up, wait_set_up) = std::sync::mpsc::sync_channel::<()>(1);
    let spawned = std::thread::Builder::new()
        .name("ferry-snapshot-lease".into())
        .spawn(move || {
            let sig = lease_signal();
            // SAFETY: plain libc calls on a signal set on this thread's
            // stack and on the file this thread owns.
            let set = unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                set
            };
            let raw = fd.as_raw_fd();
            let owner = FOwnerEx {
                kind: F_OWNER_TID,
                // SAFETY: gettid has no preconditions.
                pid: unsafe { libc::gettid() },
            };
            // SAFETY: fcntl on an open descriptor; `owner` outlives the call.
            let ok = unsafe {
                libc::fcntl(raw, F_SETSIG, sig) == 0
                    && libc::fcntl(raw, F_SETOWN_EX, &owner) == 0
                    && libc::fcntl(raw, libc::F_SETLEASE, libc::F_RDLCK) == 0
            };
            let refused = std::io::Error::last_os_error();
            // Made before the VM runs, this thread gives up its
            // capabilities itself (the VM's threads do as it starts).
            if let Err(e) = crate::privileges::drop_all() {
                log::warn!("snapshot lease thread: {e}");
            }
            let _ = set_up.send(());
            if !ok {
                log::warn!(
                    "snapshot lease refused ({refused}): do not write the snapshot file while this guest runs"
                );
                return;
            }
            loop {
                // SAFETY: waits for the blocked signal; the info is ours.
                let got = unsafe {
                    let mut info: libc::siginfo_t = std::mem::zeroed();
                    libc::sigwaitinfo(&set, &mut info)
                };
                if got == sig {
                    break;
                }
            }
            let start = std::time::Instant::now();
            let mut bytes = 0u64;
            for region in vm_memory::GuestMemoryBackend::iter(&memory) {
                let len = vm_memory::GuestMemoryRegion::len(region) as usize;
                // SAFETY: a populating madvise over one live mapping of
                // guest memory (kept alive by `memory`); contents are
                // unchanged, only copied out of the file.
                unsafe { libc::madvise(region.as_ptr().cast(), len, libc::MADV_POPULATE_WRITE) };
                bytes += len as u64;
            }
            // SAFETY: fcntl on the descriptor this thread owns.
            unsafe { libc::fcntl(raw, libc::F_SETLEASE, libc::F_UNLCK) };
            log::warn!(
                "the snapshot file is being written: the guest's {} MiB were copied out of it in {:.0} ms",
                bytes >> 20,
                start.elapsed().as_secs_f64() * 1e3
            );
        });
    match spawned {
        // Err only if the thread ended without sending: nothing to wait for.
        Ok(_) => {
            let _ = wait_set_up.recv();
        }
        Err(e) => {
            log::warn!("snapshot lease: {e}; do not write the snapshot file while this guest runs")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration::snapshot::ImageLayout;
    use std::os::unix::fs::FileExt;

    #[test]
    fn pages_land_at_their_offsets_and_zeroed_pages_read_zero() {
        let dir = std::env::temp_dir().join(format!("ferry-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("snap");
        let layout = ImageLayout::for_regions(&[(0, 1 << 20), (4 << 30, 1 << 20)]);
        let (file, _stream) = SnapshotFile::create(&path, layout.clone()).unwrap();
        let page = |b: u8| vec![b; PAGE_SIZE];
        let mut out = ImagePages::new(&file, true, None);
        for (gpa, b) in [(0x1000u64, 1u8), (0x2000, 2), (0x5000, 0), (4 << 30, 3)] {
            out.page_or_zero(gpa, |dst| {
                dst.copy_from_slice(&page(b));
                Ok(b == 0)
            })
            .unwrap();
        }
        out.finish().unwrap();
        // A later pass: the page at 0x2000 became zero.
        let mut out = ImagePages::new(&file, false, None);
        out.page_or_zero(0x2000, |dst| {
            dst.fill(0);
            Ok(true)
        })
        .unwrap();
        out.finish().unwrap();
        file.commit().unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let read = |gpa: u64| {
            let mut b = vec![9u8; PAGE_SIZE];
            f.read_exact_at(&mut b, layout.offset_of(gpa, PAGE_SIZE as u64).unwrap())
                .unwrap();
            b
        };
        assert_eq!(read(0x1000), page(1));
        assert_eq!(read(0x2000), page(0));
        assert_eq!(read(0x5000), page(0));
        assert_eq!(read(4 << 30), page(3));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
