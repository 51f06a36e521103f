//! Peers that are not a destination's source, for the tests and the bench
//! that check a waiting destination drops them and listens on: raw TCP
//! connections from a namespace host (garbage, silence), and a count of
//! the destination's "dropped a connection" lines.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::ferry::FerryVm;
use crate::netns::Netns;

/// Connects from `ns` to `addr:port`, sends `bytes`, and returns how long
/// the destination took to close the connection; panics if it kept it
/// open for `within`.
pub fn poke(ns: &Netns, addr: &str, port: u16, bytes: Vec<u8>, within: Duration) -> Duration {
    let addr = addr.to_string();
    ns.enter(move || {
        let started = Instant::now();
        let mut s = TcpStream::connect((addr.as_str(), port)).expect("connect to the destination");
        s.write_all(&bytes).expect("send");
        s.set_read_timeout(Some(within)).expect("timeout");
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return started.elapsed(),
                // A NAK, a TLS alert: read on until it closes.
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return started.elapsed()
                }
                Err(e) => panic!("the destination kept the connection open: {e}"),
            }
        }
    })
    .expect("namespace")
}

/// `n` bytes of a xorshift stream from `seed`: garbage that is the same
/// every run.
pub fn garbage(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The destination's lines about connections it dropped.
pub fn dropped_lines(vm: &FerryVm) -> usize {
    vm.stderr()
        .lines()
        .filter(|l| l.contains("dropped a connection"))
        .count()
}

/// Waits until the destination has logged `n` dropped connections.
pub fn wait_dropped(vm: &FerryVm, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while dropped_lines(vm) < n {
        assert!(
            Instant::now() < deadline,
            "expected {n} dropped connections; stderr: {}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
