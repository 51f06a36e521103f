//! Downtime seen from outside: a UDP echo stream to the guest from both
//! hosts at once, and the silences in its answers.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_tests::bench_net::HOST_IP;
use ferry_tests::hosts::{TwoHosts, GUEST_ADDR};

/// Echo stream period.
const ECHO_EVERY: Duration = Duration::from_millis(1);

/// When an answer arrived, and on which host ('A' or 'B').
pub type Reply = (Instant, char);

/// UDP echo requests every [`ECHO_EVERY`] from both hosts to the guest;
/// the times the answers arrived.
pub struct EchoStream {
    stop: Arc<AtomicBool>,
    replies: Arc<Mutex<Vec<Reply>>>,
    threads: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl EchoStream {
    pub fn start(hosts: &TwoHosts) -> EchoStream {
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for (ns, side) in [(&hosts.a, 'A'), (&hosts.b, 'B')] {
            let (stop, replies) = (stop.clone(), replies.clone());
            let sock = ns
                .enter(|| UdpSocket::bind(format!("{HOST_IP}:0")))
                .expect("netns")
                .expect("bind the echo socket");
            let receiver = sock.try_clone().expect("clone the echo socket");
            let stop_rx = stop.clone();
            // Answers, on a thread of their own: a receive timeout is
            // rounded to the kernel's tick, a sleep is not.
            threads.push(std::thread::spawn(move || -> std::io::Result<()> {
                receiver.set_read_timeout(Some(Duration::from_millis(20)))?;
                let mut buf = [0u8; 64];
                while !stop_rx.load(Ordering::Relaxed) {
                    if let Ok((8, _)) = receiver.recv_from(&mut buf) {
                        let at = Instant::now();
                        replies
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((at, side));
                    }
                }
                Ok(())
            }));
            threads.push(std::thread::spawn(move || -> std::io::Result<()> {
                let to = format!("{GUEST_ADDR}:7");
                let mut next = Instant::now();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Errors (no carrier on B's TAP before the guest
                    // arrives) are expected: the datagram is lost.
                    let _ = sock.send_to(&seq.to_le_bytes(), &to);
                    seq += 1;
                    next += ECHO_EVERY;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
                Ok(())
            }));
        }
        EchoStream {
            stop,
            replies,
            threads,
        }
    }

    fn replies(&self) -> Vec<Reply> {
        self.replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits up to `timeout` for an answer from host B after `after`.
    pub fn wait_b(&self, after: Instant, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .replies()
                .iter()
                .any(|&(t, side)| side == 'B' && t > after)
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Stops the stream; every answer, in the order they came.
    pub fn stop(self) -> Vec<Reply> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let mut r = self
            .replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        r.sort();
        r
    }
}

/// The silence across the move: from the last answer on host A before
/// the first answer on host B after `from`, to that first answer.
pub fn switch_gap(replies: &[Reply], from: Instant) -> Option<Duration> {
    let first_b = replies
        .iter()
        .filter(|&&(t, side)| side == 'B' && t > from)
        .map(|&(t, _)| t)
        .min()?;
    let last_a = replies
        .iter()
        .filter(|&&(t, side)| side == 'A' && t < first_b)
        .map(|&(t, _)| t)
        .max()?;
    Some(first_b - last_a)
}

/// Longest gap between consecutive answers whose later one is in
/// (from, to].
pub fn longest_gap(replies: &[Reply], from: Instant, to: Instant) -> Option<Duration> {
    replies
        .windows(2)
        .filter(|w| w[1].0 > from && w[1].0 <= to)
        .map(|w| w[1].0 - w[0].0)
        .max()
}
