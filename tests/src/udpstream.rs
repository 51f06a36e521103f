//! A numbered UDP stream to the guest's echo port at a steady rate, from
//! inside a namespace, and what came back: which sequence numbers, in
//! which order, after how long (issue #17's loss test and bench).
//!
//! Each datagram carries its sequence number and the time it was sent
//! (ns since the stream began), padded to the size asked for; the probe
//! echoes it unchanged.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// One echo: its sequence number, and its round trip.
#[derive(Clone, Copy, Debug)]
pub struct Echo {
    pub seq: u64,
    pub rtt: Duration,
    /// When it came back, from the stream's start.
    pub at: Duration,
}

pub struct UdpStream {
    /// The sender's and the receiver's stop.
    stop_tx: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    echoes: Arc<Mutex<Vec<Echo>>>,
    start: Instant,
    sender: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    receiver: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

/// What a stream's echoes say.
#[derive(Debug)]
pub struct StreamReport {
    pub sent: u64,
    pub echoed: u64,
    /// Sequence numbers never echoed.
    pub lost: Vec<u64>,
    /// Echoed more than once.
    pub duplicated: Vec<u64>,
    /// Echoes that came back after a higher sequence number's.
    pub reordered: u64,
    pub rtt_median: Duration,
    pub rtt_max: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl UdpStream {
    /// Starts sending `rate` datagrams/s of `size` bytes (≥ 16) from
    /// `from` (an address of `ns`) to `to` (`ip:port`).
    pub fn start(ns: &Netns, from: &str, to: &str, rate: u64, size: usize) -> UdpStream {
        let bind = format!("{from}:0");
        let sock = ns
            .enter(move || UdpSocket::bind(bind))
            .expect("enter the namespace")
            .expect("bind the stream's socket");
        // Room for the echoes while the receiving thread waits for a core
        // (a 2-core host running the guest, the VMM and the sender): what
        // the kernel drops here would count as the VMM's loss.
        set_receive_buffer(&sock, 16 << 20);
        let receiver = sock.try_clone().expect("clone the socket");
        let stop = Arc::new(AtomicBool::new(false));
        let stop_tx = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let echoes = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let to = to.to_string();
        let size = size.max(16);
        let rx = {
            let (stop, echoes) = (stop.clone(), echoes.clone());
            std::thread::spawn(move || -> std::io::Result<()> {
                receiver.set_read_timeout(Some(Duration::from_millis(20)))?;
                let mut buf = vec![0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = receiver.recv(&mut buf) else {
                        continue;
                    };
                    if n < 16 {
                        continue;
                    }
                    let at = start.elapsed();
                    let seq = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default());
                    let sent_ns = u64::from_le_bytes(buf[8..16].try_into().unwrap_or_default());
                    let rtt = at.saturating_sub(Duration::from_nanos(sent_ns));
                    lock(&echoes).push(Echo { seq, rtt, at });
                }
                Ok(())
            })
        };
        let tx = {
            let (stop, sent) = (stop_tx.clone(), sent.clone());
            std::thread::spawn(move || -> std::io::Result<()> {
                sock.connect(&to)?;
                let mut buf = vec![0u8; size];
                let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Every datagram due by now: the rate holds on
                    // average whatever the sleeps' granularity.
                    let due = (start.elapsed().as_secs_f64() / period.as_secs_f64()) as u64 + 1;
                    while seq < due {
                        buf[..8].copy_from_slice(&seq.to_le_bytes());
                        let now = start.elapsed().as_nanos() as u64;
                        buf[8..16].copy_from_slice(&now.to_le_bytes());
                        // A send that fails (ENOBUFS, no route for a
                        // moment) is a datagram lost: it counts as sent.
                        let _ = sock.send(&buf);
                        seq += 1;
                        sent.store(seq, Ordering::Relaxed);
                    }
                    std::thread::sleep(period.min(Duration::from_micros(200)));
                }
                Ok(())
            })
        };
        UdpStream {
            stop_tx,
            stop,
            sent,
            echoes,
            start,
            sender: Some(tx),
            receiver: Some(rx),
        }
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn echoed(&self) -> usize {
        lock(&self.echoes).len()
    }

    /// Waits until at least `n` echoes came back.
    pub fn wait_echoes(&self, n: usize, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if self.echoed() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Stops sending, waits `drain` for the last echoes, and sums up.
    pub fn stop(mut self, drain: Duration) -> StreamReport {
        self.stop_sending();
        std::thread::sleep(drain);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.receiver.take() {
            let _ = r.join();
        }
        let echoes = std::mem::take(&mut *lock(&self.echoes));
        report(self.sent(), &echoes)
    }

    fn stop_sending(&mut self) {
        self.stop_tx.store(true, Ordering::Relaxed);
        if let Some(s) = self.sender.take() {
            let _ = s.join();
        }
    }

    /// Echoes so far (a copy).
    pub fn echoes(&self) -> Vec<Echo> {
        lock(&self.echoes).clone()
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop_tx.store(true, Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// SO_RCVBUFFORCE (root), else SO_RCVBUF up to the system's limit.
fn set_receive_buffer(sock: &UdpSocket, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a socket we own, with a live c_int and
        // its size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// Loss, duplicates and order of `echoes` for `sent` datagrams.
pub fn report(sent: u64, echoes: &[Echo]) -> StreamReport {
    let mut seen = vec![0u32; sent as usize];
    let mut reordered = 0;
    let mut highest: Option<u64> = None;
    for e in echoes {
        if let Some(n) = seen.get_mut(e.seq as usize) {
            *n += 1;
        }
        if highest.is_some_and(|h| e.seq < h) {
            reordered += 1;
        }
        highest = highest.max(Some(e.seq));
    }
    let lost = (0..sent).filter(|&s| seen[s as usize] == 0).collect();
    let duplicated = (0..sent).filter(|&s| seen[s as usize] > 1).collect();
    let mut rtts: Vec<Duration> = echoes.iter().map(|e| e.rtt).collect();
    rtts.sort();
    StreamReport {
        sent,
        echoed: echoes.len() as u64,
        lost,
        duplicated,
        reordered,
        rtt_median: rtts.get(rtts.len() / 2).copied().unwrap_or_default(),
        rtt_max: rtts.last().copied().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(seq: u64) -> Echo {
        Echo {
            seq,
            rtt: Duration::from_micros(100 + seq),
            at: Duration::ZERO,
        }
    }

    #[test]
    fn loss_duplicates_and_order_are_counted() {
        let echoes: Vec<Echo> = [0, 1, 3, 2, 2, 5].into_iter().map(echo).collect();
        let r = report(7, &echoes);
        assert_eq!(r.lost, vec![4, 6]);
        assert_eq!(r.duplicated, vec![2]);
        assert_eq!(r.reordered, 2);
        assert_eq!(r.rtt_max, Duration::from_micros(105));
    }
}
