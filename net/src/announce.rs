//! When announces go out: QEMU's schedule (net/announce.c). The first
//! round at once, then after round k (k = 1, 2, ...) a pause of
//! `initial + (k - 1) * step`, at most `max`, for `rounds` rounds in all.
//! Defaults 50 / 550 / 5 / 100 ms give rounds at 0, 50, 200, 450, 800 ms.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceParams {
    pub initial_ms: u64,
    pub max_ms: u64,
    pub rounds: u64,
    pub step_ms: u64,
}

impl Default for AnnounceParams {
    fn default() -> Self {
        Self {
            initial_ms: 50,
            max_ms: 550,
            rounds: 5,
            step_ms: 100,
        }
    }
}

impl AnnounceParams {
    /// The pause after round `done` (1-based) before the next one.
    pub fn pause_after(&self, done: u64) -> Duration {
        let ms = self
            .step_ms
            .checked_mul(done.saturating_sub(1))
            .and_then(|s| s.checked_add(self.initial_ms))
            .map_or(self.max_ms, |ms| ms.min(self.max_ms));
        Duration::from_millis(ms)
    }

    /// When each round goes out, from the start of the schedule.
    pub fn round_times(&self) -> Vec<Duration> {
        let mut at = Duration::ZERO;
        let mut times = Vec::new();
        for round in 1..=self.rounds {
            times.push(at);
            at += self.pause_after(round);
        }
        times
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn qemus_default_schedule() {
        assert_eq!(
            AnnounceParams::default().round_times(),
            ms(&[0, 50, 200, 450, 800])
        );
    }

    #[test]
    fn pauses_are_capped_by_max_and_rounds_bound_it() {
        let p = AnnounceParams {
            initial_ms: 100,
            max_ms: 250,
            rounds: 4,
            step_ms: 100,
        };
        assert_eq!(p.round_times(), ms(&[0, 100, 300, 550]));
        assert_eq!(AnnounceParams { rounds: 1, ..p }.round_times(), ms(&[0]));
        assert!(AnnounceParams { rounds: 0, ..p }.round_times().is_empty());
        let huge = AnnounceParams {
            initial_ms: 1,
            max_ms: 7,
            rounds: 3,
            step_ms: u64::MAX,
        };
        assert_eq!(huge.round_times(), ms(&[0, 1, 8]));
    }
}
