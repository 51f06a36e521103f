//! Auto-converge: slowing the guest's vCPUs down when it dirties memory
//! faster than the migration can send it (QEMU's `auto-converge`, with its
//! parameters and its trigger).
//!
//! Each vCPU is made to sleep `pct / (100 - pct)` of a 10 ms timeslice for
//! every timeslice it runs: a ticker thread kicks every vCPU once a period
//! and the vCPU pays the sleep on its own thread (vcpu.rs), so a pause or
//! the end of the VM is never held up by it. The ticker lives as long as
//! the [`CpuThrottle`] does: whatever ends the migration — success,
//! failure or cancel — drops it, and the guest runs at full speed again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::vcpu::VcpuControl;

/// How long a vCPU runs between two throttle sleeps (QEMU's
/// CPU_THROTTLE_TIMESLICE_NS).
pub const TIMESLICE: Duration = Duration::from_millis(10);

/// When to throttle and by how much: QEMU's `throttle-trigger-threshold`,
/// `cpu-throttle-initial`, `cpu-throttle-increment`, `max-cpu-throttle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThrottlePolicy {
    /// A pass is "too dirty" when the guest dirtied more than this share
    /// (percent) of what the pass sent.
    pub trigger_threshold: u64,
    pub initial: u64,
    pub increment: u64,
    pub max: u64,
}

/// Decides, pass by pass, the throttle percentage. Like QEMU: two
/// too-dirty passes (not necessarily in a row) raise it one step.
#[derive(Debug)]
pub struct ThrottlePlanner {
    policy: ThrottlePolicy,
    too_dirty: u32,
    percent: u64,
}

impl ThrottlePlanner {
    pub fn new(policy: ThrottlePolicy) -> Self {
        Self {
            policy,
            too_dirty: 0,
            percent: 0,
        }
    }

    /// After a pass that put `sent` bytes on the wire while the guest
    /// dirtied `dirtied` bytes: the new percentage if it changes.
    pub fn after_pass(&mut self, sent: u64, dirtied: u64) -> Option<u64> {
        let limit = u128::from(sent) * u128::from(self.policy.trigger_threshold) / 100;
        if u128::from(dirtied) <= limit {
            return None;
        }
        self.too_dirty += 1;
        if self.too_dirty < 2 {
            return None;
        }
        self.too_dirty = 0;
        self.raise()
    }

    /// Raises the throttle one step now; the new percentage, or None at
    /// the cap.
    pub fn raise(&mut self) -> Option<u64> {
        let next = if self.percent == 0 {
            self.policy.initial
        } else {
            self.percent + self.policy.increment
        }
        .min(self.policy.max);
        (next != self.percent).then(|| {
            self.percent = next;
            next
        })
    }

    pub fn can_raise(&self) -> bool {
        self.percent < self.policy.max
    }

    pub fn percent(&self) -> u64 {
        self.percent
    }
}

/// The running throttle: a ticker thread making every vCPU sleep its share.
pub struct CpuThrottle {
    shared: Arc<Shared>,
    ticker: Option<JoinHandle<()>>,
}

struct Shared {
    percent: AtomicU64,
    stop: AtomicBool,
    vcpus: Vec<Arc<VcpuControl>>,
}

impl CpuThrottle {
    /// Starts throttling `vcpus` by `percent` (1..=99).
    pub fn start(vcpus: &[Arc<VcpuControl>], percent: u64) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            percent: AtomicU64::new(percent.clamp(1, 99)),
            stop: AtomicBool::new(false),
            vcpus: vcpus.to_vec(),
        });
        let s = shared.clone();
        let ticker = std::thread::Builder::new()
            .name("ferry-throttle".into())
            .spawn(move || tick(&s))?;
        Ok(Self {
            shared,
            ticker: Some(ticker),
        })
    }

    pub fn set(&self, percent: u64) {
        self.shared
            .percent
            .store(percent.clamp(1, 99), Ordering::Relaxed);
    }
}

/// The sleep that leaves a vCPU running `100 - percent` % of the time.
pub fn sleep_per_timeslice(percent: u64) -> Duration {
    let p = percent.min(99) as u32;
    TIMESLICE * p / (100 - p)
}

fn tick(shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) {
        let sleep = sleep_per_timeslice(shared.percent.load(Ordering::Relaxed));
        for vcpu in &shared.vcpus {
            vcpu.owe_sleep(sleep);
            vcpu.kick();
        }
        // One period: the vCPU's sleep, then its timeslice.
        std::thread::park_timeout(sleep + TIMESLICE);
    }
}

impl Drop for CpuThrottle {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        // A sleep owed but not yet paid is forgiven.
        for vcpu in &self.shared.vcpus {
            vcpu.owe_sleep(Duration::ZERO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU: ThrottlePolicy = ThrottlePolicy {
        trigger_threshold: 50,
        initial: 20,
        increment: 10,
        max: 99,
    };

    #[test]
    fn two_dirty_passes_start_the_throttle_then_each_two_raise_it() {
        let mut p = ThrottlePlanner::new(QEMU);
        assert_eq!(p.after_pass(100, 80), None);
        assert_eq!(p.after_pass(100, 80), Some(20));
        assert_eq!(p.after_pass(100, 80), None);
        assert_eq!(p.after_pass(100, 80), Some(30));
        for _ in 0..14 {
            p.after_pass(100, 100);
        }
        assert_eq!(p.percent(), 99, "capped at max-cpu-throttle");
        assert_eq!(p.after_pass(100, 100), None);
        assert_eq!(p.after_pass(100, 100), None, "at the cap nothing changes");
        assert!(!p.can_raise());
        assert_eq!(p.raise(), None);
    }

    #[test]
    fn raise_steps_at_once() {
        let mut p = ThrottlePlanner::new(QEMU);
        assert!(p.can_raise());
        assert_eq!(p.raise(), Some(20));
        assert_eq!(p.raise(), Some(30));
        assert_eq!(p.after_pass(100, 80), None, "the pass count starts again");
    }

    #[test]
    fn passes_under_the_threshold_never_throttle() {
        let mut p = ThrottlePlanner::new(QEMU);
        for _ in 0..10 {
            assert_eq!(p.after_pass(100, 50), None);
        }
        assert_eq!(p.percent(), 0);
        // Too-dirty passes count even when not consecutive (as in QEMU).
        assert_eq!(p.after_pass(100, 51), None);
        assert_eq!(p.after_pass(100, 10), None);
        assert_eq!(p.after_pass(100, 51), Some(20));
    }

    #[test]
    fn a_pass_that_sent_nothing_but_saw_dirt_counts() {
        let mut p = ThrottlePlanner::new(QEMU);
        p.after_pass(0, 1);
        assert_eq!(p.after_pass(0, 1), Some(20));
        assert_eq!(p.after_pass(u64::MAX, u64::MAX), None, "no overflow");
    }

    #[test]
    fn sleep_leaves_the_vcpu_its_share() {
        assert_eq!(sleep_per_timeslice(50), TIMESLICE);
        assert_eq!(sleep_per_timeslice(20), TIMESLICE / 4);
        assert_eq!(sleep_per_timeslice(99), TIMESLICE * 99);
        assert_eq!(sleep_per_timeslice(0), Duration::ZERO);
    }
}
