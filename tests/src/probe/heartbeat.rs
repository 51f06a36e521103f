//! The probe's heartbeat lines (`probe: heartbeat n=N uptime_ms=MS`): the
//! tests' evidence that a guest runs, stopped, or went on without a reboot.

use std::time::{Duration, Instant};

use super::{fields, Console};

/// Every heartbeat so far as (n, uptime_ms).
pub fn heartbeats(c: &Console) -> Vec<(u64, u64)> {
    c.lines()
        .iter()
        .filter(|l| l.starts_with("probe: heartbeat "))
        .filter_map(|l| {
            let f = fields(l);
            Some((f.get("n")?.parse().ok()?, f.get("uptime_ms")?.parse().ok()?))
        })
        .collect()
}

/// The counter of the last heartbeat, 0 before the first.
pub fn last_heartbeat(c: &Console) -> u64 {
    heartbeats(c).last().map_or(0, |h| h.0)
}

/// Waits until the counter passes `n`; returns it. Panics after `timeout`.
pub fn wait_heartbeat_beyond(c: &Console, n: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let now = last_heartbeat(c);
        if now > n {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "heartbeat stuck at {now}; console:\n{}",
            c.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for at least `count` heartbeats; returns them all.
pub fn wait_heartbeats(c: &Console, count: usize, timeout: Duration) -> Vec<(u64, u64)> {
    let deadline = Instant::now() + timeout;
    loop {
        let h = heartbeats(c);
        if h.len() >= count {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "{} heartbeats of {count}; console:\n{}",
            h.len(),
            c.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
