//! The console's transmit side: bytes the guest sent wait in a bounded
//! queue that a thread of their own writes to stdout (or the file), so a
//! vCPU never blocks on a slow or stalled reader. While the queue is full
//! the UART reports its transmitter busy (LSR without THRE), as a real
//! 16550 on a slow line does: the guest's driver waits, nothing is lost,
//! and once the writer has made room the UART raises THRE again. A reader
//! that never reads stalls the guest's console, not the guest.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::Serial;

/// Bytes the queue holds.
pub const CAPACITY: usize = 64 << 10;
/// What a driver may write after one look at THRE: the 16550A's transmit
/// FIFO. The transmitter reports busy while less room than this is left,
/// so such a burst always fits.
pub const BURST: usize = 16;
/// Most bytes one write(2) takes from the queue.
const CHUNK: usize = 16 << 10;

#[derive(Default)]
struct State {
    bytes: VecDeque<u8>,
    /// The writer waits for bytes.
    idle: bool,
    /// The queue filled: the UART must hear when there is room again.
    was_full: bool,
    /// The output failed (a closed pipe): what follows is dropped.
    broken: bool,
    /// Bytes taken out but not yet written.
    writing: usize,
}

/// The queue shared by the UART (producer) and the writer thread.
pub struct OutputQueue {
    state: Mutex<State>,
    changed: Condvar,
    /// The UART, told when room frees up.
    serial: std::sync::OnceLock<Weak<Mutex<Serial>>>,
    /// The output, until the writer thread takes it.
    out: Mutex<Option<File>>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl OutputQueue {
    /// A queue for `out`; its writer starts with [`Self::start`].
    pub fn new(out: File) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            serial: std::sync::OnceLock::new(),
            out: Mutex::new(Some(out)),
        })
    }

    /// Starts the writer thread for the UART `serial` (told when room
    /// frees up). Called as the VM starts to run, once the process gave
    /// up its capabilities (the thread has none either); again, a no-op.
    pub fn start(self: &Arc<Self>, serial: &Arc<Mutex<Serial>>) -> std::io::Result<()> {
        let _ = self.serial.set(Arc::downgrade(serial));
        let Some(out) = self.out.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Ok(());
        };
        let q = self.clone();
        std::thread::Builder::new()
            .name("ferry-console".into())
            .spawn(move || q.write_out(out))
            .map(|_| ())
    }

    /// Room for a FIFO's worth of bytes.
    pub fn has_room(&self) -> bool {
        let s = lock(&self.state);
        s.broken || s.bytes.len() + BURST <= CAPACITY
    }

    /// Queues a byte (dropped, as on the real part, if the guest wrote
    /// while the transmitter said busy); returns whether a FIFO's worth of
    /// room is still left (the UART's THRE).
    pub fn push(&self, byte: u8) -> bool {
        let mut s = lock(&self.state);
        if s.broken {
            return true;
        }
        if s.bytes.len() < CAPACITY {
            s.bytes.push_back(byte);
        } else {
            log::debug!("serial: the guest wrote while the transmitter was busy");
        }
        let room = s.bytes.len() + BURST <= CAPACITY;
        if !room {
            s.was_full = true;
        }
        if s.idle {
            s.idle = false;
            self.changed.notify_all();
        }
        room
    }

    /// Waits up to `limit` for every queued byte to be written (before the
    /// process exits).
    pub fn flush(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut s = lock(&self.state);
        while !s.broken && (!s.bytes.is_empty() || s.writing > 0) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn write_out(&self, mut out: File) {
        let mut chunk = Vec::with_capacity(CHUNK);
        loop {
            let was_full = {
                let mut s = lock(&self.state);
                s.writing = 0;
                self.changed.notify_all();
                while s.bytes.is_empty() {
                    s.idle = true;
                    s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
                }
                let n = s.bytes.len().min(CHUNK);
                chunk.clear();
                chunk.extend(s.bytes.drain(..n));
                s.writing = n;
                std::mem::take(&mut s.was_full)
            };
            // Room again: the UART's transmitter is free.
            if was_full {
                if let Some(serial) = self.serial.get().and_then(Weak::upgrade) {
                    crate::bus::lock(&serial).transmitter_free();
                }
            }
            if let Err(e) = out.write_all(&chunk) {
                log::debug!("serial: console output stopped: {e}");
                let mut s = lock(&self.state);
                s.broken = true;
                s.bytes.clear();
                s.writing = 0;
                self.changed.notify_all();
                drop(s);
                // Nothing waits for room any more.
                if let Some(serial) = self.serial.get().and_then(Weak::upgrade) {
                    crate::bus::lock(&serial).transmitter_free();
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use vmm_sys_util::eventfd::EventFd;

    use crate::bus::BusDevice;
    use crate::legacy::serial::{InputDrained, Serial, SerialOutput};

    const LSR: u64 = 5;
    const THRE: u8 = 0x20;

    /// A guest's driver floods a console whose reader is slower than it:
    /// it waits whenever the transmitter says busy, no THR write blocks,
    /// and every byte arrives, in order.
    #[test]
    fn a_flood_into_a_slow_pipe_loses_nothing_and_never_blocks_the_vcpu() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors, owned by the Files below.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors nobody else owns.
        let (mut rd, wr) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = Arc::new(InputDrained(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let serial = Arc::new(std::sync::Mutex::new(Serial::new(
            irq.try_clone().unwrap(),
            drained,
            SerialOutput::Fd(wr),
        )));
        Serial::start_output(&serial).unwrap();
        const TOTAL: usize = 512 << 10;
        let reader = std::thread::spawn(move || {
            let mut got = Vec::with_capacity(TOTAL);
            let mut buf = [0u8; 4096];
            while got.len() < TOTAL {
                let n = rd.read(&mut buf).unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
                // Slower than the guest writes.
                std::thread::sleep(Duration::from_millis(10));
            }
            got
        });
        let (mut busy, mut slowest) = (0u64, Duration::ZERO);
        let mut lsr = [0u8];
        // As a driver with the 16550A's FIFO does: one look at THRE, then
        // up to 16 bytes.
        for burst in (0..TOTAL).collect::<Vec<_>>().chunks(16) {
            loop {
                crate::bus::lock(&serial).read(LSR, &mut lsr);
                if lsr[0] & THRE != 0 {
                    break;
                }
                busy += 1;
                std::thread::sleep(Duration::from_micros(50));
            }
            for &i in burst {
                let t = Instant::now();
                crate::bus::lock(&serial).write(0, &[(i % 251) as u8]);
                slowest = slowest.max(t.elapsed());
            }
        }
        let got = reader.join().unwrap();
        assert_eq!(got.len(), TOTAL);
        assert!(
            got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8),
            "bytes lost or reordered"
        );
        assert!(
            busy > 0,
            "the transmitter never said busy: the reader was not slower"
        );
        assert!(
            slowest < Duration::from_millis(50),
            "a THR write blocked for {slowest:?}"
        );
    }
}
