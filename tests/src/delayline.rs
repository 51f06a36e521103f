//! A link with a rate and a round-trip time, for migration tests and
//! benches: this project's kernel has `tc`'s token bucket but not
//! `sch_netem`, so the delay is added in user space.
//!
//! Host A's veth and host B's veth both end in a middle namespace, where
//! two threads per direction move every frame from one side to the other:
//! each frame leaves after the frames before it at `rate` (serialization)
//! and arrives `one_way` later; a frame that would wait more than
//! [`MAX_QUEUE`] in the queue is dropped, as a router's tail drop. A and
//! B keep their addresses on one subnet (198.18.1.0/24), so the pair reads
//! like [`crate::hosts::TwoHosts::linked`]. Frames move with their virtio
//! net header (`PACKET_VNET_HDR`): the veths' 64 KiB segmentation-offload
//! frames cross whole, so the forwarder handles ~2,000 frames/s per
//! Gbit/s, not ~85,000.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::hosts::{TwoHosts, A_ADDR, B_ADDR};
use crate::netns::Netns;

/// Longest a frame may queue before it is dropped.
pub const MAX_QUEUE: Duration = Duration::from_millis(20);
const ETH_P_ALL: u16 = 0x0003;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// The running forwarder; stops (and joins) on drop.
pub struct DelayLine {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Frames dropped by the queue bound, both directions.
    pub dropped: Arc<AtomicU64>,
    _middle: Netns,
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// An AF_PACKET socket on `ifname` with virtio net headers, not seeing
/// its own sends. Must run inside the namespace.
fn packet_socket(ifname: &str) -> io::Result<OwnedFd> {
    let name = std::ffi::CString::new(ifname).map_err(|_| io::Error::other("name"))?;
    // SAFETY: plain libc calls with checked results; the fd is owned
    // right after creation; the option values live across each call.
    unsafe {
        let index = libc::if_nametoindex(name.as_ptr());
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, ETH_P_ALL.to_be() as i32);
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let one: libc::c_int = 1;
        for opt in [PACKET_VNET_HDR, PACKET_IGNORE_OUTGOING] {
            if libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                opt,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        let big: libc::c_int = 8 << 20;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &big as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ALL.to_be();
        addr.sll_ifindex = index as i32;
        if libc::bind(
            fd.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// Frames in flight one way: (when it arrives at the far end, bytes).
struct Queue {
    frames: Mutex<VecDeque<(Instant, Vec<u8>)>>,
    ready: Condvar,
}

/// One direction: read from `from`, deliver to `to`.
fn direction(
    from: OwnedFd,
    to: OwnedFd,
    rate_bps: u64,
    one_way: Duration,
    stop: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
) -> [JoinHandle<()>; 2] {
    let q = Arc::new(Queue {
        frames: Mutex::new(VecDeque::new()),
        ready: Condvar::new(),
    });
    let reader = {
        let (q, stop) = (q.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last_departure = Instant::now();
            let mut buf = vec![0u8; 70_000];
            while !stop.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: from.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
                    continue;
                }
                // SAFETY: reading into our buffer from our socket.
                let n =
                    unsafe { libc::recv(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n <= 0 {
                    continue;
                }
                let now = Instant::now();
                // The wire carries the frame without the 10-byte header.
                let wire = (n as u64).saturating_sub(10) + 24;
                let serialize = Duration::from_nanos(wire * 8 * 1_000_000_000 / rate_bps);
                let departure = last_departure.max(now) + serialize;
                if departure - now > MAX_QUEUE {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                last_departure = departure;
                let mut frames = q.frames.lock().unwrap_or_else(|p| p.into_inner());
                frames.push_back((departure + one_way, buf[..n as usize].to_vec()));
                q.ready.notify_one();
            }
        })
    };
    let writer = std::thread::spawn(move || loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let next = {
            let mut frames = q.frames.lock().unwrap_or_else(|p| p.into_inner());
            if frames.is_empty() {
                let (f, _) = q
                    .ready
                    .wait_timeout(frames, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner());
                frames = f;
            }
            match frames.front() {
                Some((due, _)) if *due <= Instant::now() => frames.pop_front(),
                Some((due, _)) => {
                    let wait = *due - Instant::now();
                    drop(frames);
                    std::thread::sleep(wait.min(Duration::from_millis(1)));
                    None
                }
                None => None,
            }
        };
        if let Some((_, frame)) = next {
            // SAFETY: sending from our buffer on our socket.
            unsafe { libc::send(to.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        }
    });
    [reader, writer]
}

impl TwoHosts {
    /// Hosts A and B (no TAPs) joined through a middle namespace by a
    /// link of `rate_bps` with `rtt` round-trip time.
    pub fn delayed(test: &str, rate_bps: u64, rtt: Duration) -> (TwoHosts, DelayLine) {
        let a = Netns::new(&format!("{test}a")).expect("netns A");
        let b = Netns::new(&format!("{test}b")).expect("netns B");
        let m = Netns::new(&format!("{test}m")).expect("netns M");
        Netns::veth_pair(&a, "vha", &m, "dla").expect("veth A-M");
        Netns::veth_pair(&b, "vhb", &m, "dlb").expect("veth B-M");
        a.add_addr("vha", &format!("{A_ADDR}/24")).expect("addr A");
        b.add_addr("vhb", &format!("{B_ADDR}/24")).expect("addr B");
        for dev in ["dla", "dlb"] {
            m.set_up(dev).expect("up");
            let _ = m.run(&["ip", "link", "set", dev, "promisc", "on"]);
        }
        let (fa, fb) = m
            .enter(|| Ok::<_, io::Error>((packet_socket("dla")?, packet_socket("dlb")?)))
            .expect("enter M")
            .expect("packet sockets");
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let one_way = rtt / 2;
        let (fa2, fb2) = (fa.try_clone().expect("dup"), fb.try_clone().expect("dup"));
        let mut threads = Vec::new();
        threads.extend(direction(
            fa,
            fb,
            rate_bps,
            one_way,
            stop.clone(),
            dropped.clone(),
        ));
        threads.extend(direction(
            fb2,
            fa2,
            rate_bps,
            one_way,
            stop.clone(),
            dropped.clone(),
        ));
        let line = DelayLine {
            stop,
            threads,
            dropped,
            _middle: m,
        };
        (TwoHosts { a, b }, line)
    }
}
