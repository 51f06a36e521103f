//! When a live migration stops copying and stops the guest: a pure
//! decision after each pass, beside the throttle planner (throttle.rs)
//! that acts on it.
//!
//! Stop once what is left fits the downtime limit at the bandwidth just
//! measured — but while passes still halve what is left (the guest
//! dirties far slower than the link carries), one more pass is worth it:
//! what is left is what the stopped guest waits for. With auto-converge,
//! a guest that keeps more than half dirty is throttled one step harder
//! instead, until the last pass is short: the network notices
//! milliseconds, not the limit. After `max_passes` a guest that still
//! does not fit makes the migration give up.

/// A last pass expected to take this long (ms) is not worth another live
/// pass to shrink it.
pub const SHORT_LAST_PASS_MS: f64 = 1.0;

/// What one live pass did, as the decision needs it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PassStats {
    /// 1 for the first (full) pass.
    pub pass: u64,
    /// Pages the pass sent.
    pub sent_pages: u64,
    /// Pages dirtied while it ran: what the next pass would send.
    pub dirty_pages: u64,
    /// How long sending those would take at the pass's rate, in ms.
    pub expected_ms: f64,
}

/// The knobs the decision follows (from the migration parameters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvergePolicy {
    pub downtime_limit_ms: u64,
    pub max_passes: u64,
    /// Auto-converge on, and the throttle below its cap.
    pub can_throttle: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Another live pass. `squeeze`: what is left fits the limit but does
    /// not shrink: throttle one step harder now (not only on the planner's
    /// trigger).
    Continue { squeeze: bool },
    /// Stop the guest and send the rest.
    Stop,
    /// Does not fit after the last allowed pass: fail, guest untouched.
    GiveUp,
}

pub fn next(stats: PassStats, policy: ConvergePolicy) -> Next {
    let under = stats.expected_ms <= policy.downtime_limit_ms as f64;
    let halving = stats.dirty_pages * 2 <= stats.sent_pages;
    let squeeze = under && !halving && policy.can_throttle;
    let last = stats.pass >= policy.max_passes;
    if under && (stats.expected_ms <= SHORT_LAST_PASS_MS || (!halving && !squeeze) || last) {
        return Next::Stop;
    }
    if last {
        return Next::GiveUp;
    }
    Next::Continue { squeeze }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: ConvergePolicy = ConvergePolicy {
        downtime_limit_ms: 300,
        max_passes: 30,
        can_throttle: true,
    };

    fn pass(pass: u64, sent_pages: u64, dirty_pages: u64, expected_ms: f64) -> PassStats {
        PassStats {
            pass,
            sent_pages,
            dirty_pages,
            expected_ms,
        }
    }

    #[test]
    fn an_idle_guest_stops_after_one_pass() {
        assert_eq!(next(pass(1, 262_144, 3, 0.01), POLICY), Next::Stop);
    }

    #[test]
    fn passes_that_halve_go_on_until_the_rest_is_short() {
        assert_eq!(
            next(pass(1, 262_144, 10_000, 40.0), POLICY),
            Next::Continue { squeeze: false }
        );
        assert_eq!(next(pass(2, 10_000, 200, 0.8), POLICY), Next::Stop);
    }

    #[test]
    fn a_guest_that_does_not_shrink_is_squeezed_or_stopped() {
        // Fits the limit but keeps everything dirty: throttle harder...
        assert_eq!(
            next(pass(3, 65_536, 65_536, 100.0), POLICY),
            Next::Continue { squeeze: true }
        );
        // ...unless the throttle is at its cap (or off): then stop, the
        // rest fits the limit.
        let capped = ConvergePolicy {
            can_throttle: false,
            ..POLICY
        };
        assert_eq!(next(pass(3, 65_536, 65_536, 100.0), capped), Next::Stop);
    }

    #[test]
    fn over_the_limit_it_goes_on_then_gives_up() {
        assert_eq!(
            next(pass(29, 196_608, 196_608, 900.0), POLICY),
            Next::Continue { squeeze: false }
        );
        assert_eq!(
            next(pass(30, 196_608, 196_608, 900.0), POLICY),
            Next::GiveUp
        );
        // At the last pass, a rest that fits is sent, halving or not.
        assert_eq!(next(pass(30, 196_608, 10_000, 50.0), POLICY), Next::Stop);
    }
}
