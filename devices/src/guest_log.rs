//! Log lines a guest can cause. A guest that hammers a bad register or
//! sends broken frames in a loop must not fill the host's disk: each call
//! site logs at most one line per second per device, and the next line it
//! logs counts the ones held back meanwhile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often one kind of guest fault is logged.
pub const INTERVAL: Duration = Duration::from_secs(1);

static INTERVAL_US: AtomicU64 = AtomicU64::new(INTERVAL.as_micros() as u64);

/// Changes the interval for every device of this process. Hostile-input
/// tests that check the text of each line set it to zero (every line
/// logged); nothing else should.
pub fn set_interval(interval: Duration) {
    INTERVAL_US.store(interval.as_micros() as u64, Ordering::Relaxed);
}

fn interval() -> Duration {
    Duration::from_micros(INTERVAL_US.load(Ordering::Relaxed))
}

/// One device's limiter: a slot per call site (the kinds of fault).
#[derive(Default)]
pub struct GuestLog {
    slots: Mutex<Vec<Slot>>,
}

struct Slot {
    site: &'static str,
    last: Instant,
    held: u64,
}

impl GuestLog {
    /// Whether a line from `site` may go out now: `Some(held)`, the lines
    /// from that site held back since the last one, or `None` (this one
    /// is held back and counted).
    pub fn admit(&self, site: &'static str) -> Option<u64> {
        self.admit_at(site, Instant::now())
    }

    fn admit_at(&self, site: &'static str, now: Instant) -> Option<u64> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        match slots.iter_mut().find(|s| s.site == site) {
            None => {
                slots.push(Slot {
                    site,
                    last: now,
                    held: 0,
                });
                Some(0)
            }
            Some(s) if now.saturating_duration_since(s.last) >= interval() => {
                s.last = now;
                Some(std::mem::take(&mut s.held))
            }
            Some(s) => {
                s.held += 1;
                None
            }
        }
    }
}

/// `guest_log!(limiter, Level, "format", args...)`: a log line caused by
/// the guest, limited per call site by `limiter` (a [`GuestLog`]).
#[macro_export]
macro_rules! guest_log {
    ($limiter:expr, $level:ident, $($arg:tt)+) => {{
        if log::log_enabled!(log::Level::$level) {
            const SITE: &str = concat!(file!(), ":", line!());
            match $limiter.admit(SITE) {
                Some(0) => log::log!(log::Level::$level, $($arg)+),
                Some(held) => log::log!(
                    log::Level::$level,
                    "{} ({held} more like it not logged since the last)",
                    format_args!($($arg)+)
                ),
                None => {}
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_site_per_second_with_the_count_held_back() {
        let g = GuestLog::default();
        let t0 = Instant::now();
        const A: &str = "a.rs:1";
        const B: &str = "b.rs:2";
        assert_eq!(g.admit_at(A, t0), Some(0));
        assert_eq!(g.admit_at(B, t0), Some(0), "sites are counted apart");
        for i in 1..1000 {
            assert_eq!(g.admit_at(A, t0 + Duration::from_micros(i)), None);
        }
        let t1 = t0 + INTERVAL;
        assert_eq!(g.admit_at(A, t1), Some(999));
        assert_eq!(g.admit_at(A, t1), None);
        assert_eq!(g.admit_at(A, t1 + INTERVAL), Some(1));
        assert_eq!(g.admit_at(B, t1), Some(0));
    }
}
