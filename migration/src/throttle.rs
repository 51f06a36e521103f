//! Token-bucket throttle for the stream writer (`max-bandwidth`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How much unused time the bucket may bank: a writer that was idle (or
/// slower than the limit) may burst this long at full speed.
const BURST: Duration = Duration::from_millis(20);

/// Limits writes to `rate` bytes per second.
#[derive(Debug)]
pub(crate) struct Throttle {
    rate: u64,
    /// When the bytes accounted so far may all have left.
    next: Instant,
}

impl Throttle {
    /// A throttle at `rate` bytes/s (`rate > 0`), starting with an empty
    /// bucket.
    pub(crate) fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1),
            next: Instant::now(),
        }
    }

    /// Largest write to issue at once: about 1/50 s of traffic, so the
    /// rate is smooth at the scale of a few tens of milliseconds.
    pub(crate) fn chunk(&self) -> usize {
        let per_tick = self.rate / 50;
        usize::try_from(per_tick)
            .unwrap_or(usize::MAX)
            .clamp(4096, 1 << 20)
    }

    /// Accounts `bytes`; how long to wait before they may go.
    fn reserve(&mut self, bytes: usize) -> Option<Duration> {
        let now = Instant::now();
        if let Some(earliest) = now.checked_sub(BURST) {
            if self.next < earliest {
                self.next = earliest;
            }
        }
        let secs = bytes as f64 / self.rate as f64;
        self.next += Duration::from_secs_f64(secs);
        (self.next > now).then(|| self.next - now)
    }
}

/// A byte rate shared by every stream writer that holds a clone: QEMU's
/// `max-bandwidth` is for the whole migration, over all its channels.
#[derive(Clone, Debug)]
pub struct Bandwidth(Arc<Mutex<Throttle>>);

impl Bandwidth {
    /// At most `bytes_per_sec` (> 0) over all holders together.
    pub fn new(bytes_per_sec: u64) -> Self {
        Self(Arc::new(Mutex::new(Throttle::new(bytes_per_sec))))
    }

    /// Largest write to issue at once (see [`Throttle::chunk`]).
    pub(crate) fn chunk(&self) -> usize {
        self.0.lock().map_or(4096, |t| t.chunk())
    }

    /// Accounts `bytes` and sleeps until the rate allows them; the other
    /// holders are not held up meanwhile.
    pub fn wait(&self, bytes: usize) {
        let sleep = match self.0.lock() {
            Ok(mut t) => t.reserve(bytes),
            Err(poisoned) => poisoned.into_inner().reserve(bytes),
        };
        if let Some(d) = sleep {
            std::thread::sleep(d);
        }
    }
}
