//! Network measurements with the probe guest, shared by the benchmarks:
//! `probe_baseline` (QEMU alone) and `net_throughput` (Ferry beside QEMU).
//!
//! The guest is the probe (docs/probe.md) at [`GUEST_IP`] behind TAP
//! `tap0` in a namespace whose side of the TAP is [`HOST_IP`]; every
//! socket here is opened inside that namespace ([`Netns::enter`]).
//! Throughput is counted where the data lands: host → guest by the
//! probe's own counters (not by what the host offered), guest → host by
//! the receiving socket. Each measurement also takes the VMM process's
//! CPU time over its window ([`CpuSample`]), so cost per byte can be
//! compared as well as speed.

use std::fs;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::ferry::FerryVm;
use crate::netns::Netns;
use crate::probe::{Console, Qemu};

pub const HOST_IP: &str = "198.18.0.1";
pub const HOST_CIDR: &str = "198.18.0.1/24";
pub const GUEST_IP: &str = "198.18.0.2";
pub const GUEST_CIDR: &str = "198.18.0.2/24";
/// The same MAC under both VMMs, so the namespace's neighbour entry stays
/// right when one VMM replaces the other on the TAP.
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
/// Where the host receives the probe's udp-blast.
pub const SINK_PORT: u16 = 5009;
const REPLY: Duration = Duration::from_secs(10);

/// A probe guest under some VMM: its console and the VMM's process.
pub trait ProbeVm {
    fn console(&self) -> &Console;
    fn pid(&self) -> u32;
}

impl ProbeVm for Qemu {
    fn console(&self) -> &Console {
        &self.console
    }
    fn pid(&self) -> u32 {
        Qemu::pid(self)
    }
}

impl ProbeVm for FerryVm {
    fn console(&self) -> &Console {
        &self.console
    }
    fn pid(&self) -> u32 {
        FerryVm::pid(self)
    }
}

/// The environment variable `key` parsed, or `default` (unset or not
/// parsable): the benches' knobs (FERRY_BENCH_RUNS, ...).
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// On-CPU time of every thread of a process, by thread.
#[derive(Clone, Debug, Default)]
pub struct CpuSample {
    /// (tid, thread name, nanoseconds on CPU).
    pub threads: Vec<(u32, String, u64)>,
}

fn thread_ns(task: &std::path::Path) -> Option<u64> {
    // schedstat: nanoseconds on CPU first; stat (utime + stime in clock
    // ticks) where the kernel has no schedstat.
    if let Ok(s) = fs::read_to_string(task.join("schedstat")) {
        if let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok()) {
            return Some(ns);
        }
    }
    let stat = fs::read_to_string(task.join("stat")).ok()?;
    // Fields after the parenthesised name; utime and stime are the 14th
    // and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1_000_000_000 / hz)
}

impl CpuSample {
    /// Reads /proc/PID/task/*/{comm,schedstat}.
    pub fn take(pid: u32) -> CpuSample {
        let mut threads = Vec::new();
        if let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) {
            for entry in dir.flatten() {
                let path = entry.path();
                let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
                    continue;
                };
                let name = fs::read_to_string(path.join("comm"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default();
                if let Some(ns) = thread_ns(&path) {
                    threads.push((tid, name, ns));
                }
            }
        }
        threads.sort();
        CpuSample { threads }
    }

    pub fn total_ns(&self) -> u64 {
        self.threads.iter().map(|t| t.2).sum()
    }

    /// What each thread used since `earlier` (threads born since count
    /// from zero), as (name/tid, seconds).
    pub fn since(&self, earlier: &CpuSample) -> Vec<(String, f64)> {
        self.threads
            .iter()
            .map(|(tid, name, ns)| {
                let before = earlier
                    .threads
                    .iter()
                    .find(|t| t.0 == *tid)
                    .map_or(0, |t| t.2);
                (
                    format!("{name}/{tid}"),
                    ns.saturating_sub(before) as f64 / 1e9,
                )
            })
            .collect()
    }
}

/// The VMM's CPU over one measurement window.
#[derive(Clone, Debug, Default)]
pub struct CpuUse {
    /// Seconds of CPU, all threads.
    pub seconds: f64,
    /// Wall-clock seconds of the window.
    pub wall: f64,
    /// Per thread (name/tid, seconds), for finding what limits a VMM.
    pub threads: Vec<(String, f64)>,
}

impl CpuUse {
    /// Cores busy on average over the window.
    pub fn cores(&self) -> f64 {
        self.seconds / self.wall.max(1e-9)
    }

    /// CPU seconds per GB (1e9 bytes) moved.
    pub fn per_gb(&self, bytes: f64) -> f64 {
        if bytes <= 0.0 {
            f64::NAN
        } else {
            self.seconds / (bytes / 1e9)
        }
    }

    /// "vcpu0/1234 0.93, fc_vmm/1230 0.41 ..." (cores per thread).
    pub fn describe(&self) -> String {
        let mut v: Vec<_> = self.threads.iter().filter(|t| t.1 > 0.0005).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v.iter()
            .map(|(n, s)| format!("{n} {:.2}", s / self.wall.max(1e-9)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Measures a VMM's CPU across `f`.
pub fn with_cpu<T>(pid: u32, f: impl FnOnce() -> T) -> (T, CpuUse) {
    let before = CpuSample::take(pid);
    let start = Instant::now();
    let out = f();
    let wall = start.elapsed().as_secs_f64();
    let after = CpuSample::take(pid);
    let cpu = CpuUse {
        seconds: after.total_ns().saturating_sub(before.total_ns()) as f64 / 1e9,
        wall,
        threads: after.since(&before),
    };
    (out, cpu)
}

/// Host → guest UDP into the probe's sink (port 9).
#[derive(Clone, Debug, Default)]
pub struct SinkResult {
    /// Datagrams the probe counted, per second of sending.
    pub frames_per_s: f64,
    /// Payload bits the probe counted, per second.
    pub gbps: f64,
    /// Counted / offered.
    pub delivered: f64,
    /// Payload bytes the probe counted.
    pub bytes: f64,
    /// Interrupts the probe took per datagram counted.
    pub irqs_per_frame: f64,
    pub cpu: CpuUse,
}

/// Sends `payload`-byte datagrams to the probe's port 9 as fast as the
/// host can for `secs`, then reads the probe's `udp_sink_*` counters.
pub fn sink(ns: &Netns, vm: &dyn ProbeVm, payload: usize, secs: f64) -> SinkResult {
    vm.console().send_command("counters-reset 0", REPLY);
    let (sent, cpu) = with_cpu(vm.pid(), || {
        let sent = ns
            .enter(move || {
                let sock = UdpSocket::bind(format!("{HOST_IP}:0")).expect("bind");
                sock.connect(format!("{GUEST_IP}:9")).expect("connect");
                let buf = vec![0x5au8; payload];
                let start = Instant::now();
                let mut sent = 0u64;
                while start.elapsed().as_secs_f64() < secs {
                    for _ in 0..64 {
                        if sock.send(&buf).is_ok() {
                            sent += 1;
                        }
                    }
                }
                (sent, start.elapsed().as_secs_f64())
            })
            .expect("netns");
        // Let the device drain what the TAP still holds.
        std::thread::sleep(Duration::from_millis(200));
        sent
    });
    let (sent, secs) = sent;
    let counters = vm.console().send_command("counters 0", REPLY);
    let frames = counters.number("udp_sink_frames").unwrap_or(0) as f64;
    let bytes = counters.number("udp_sink_bytes").unwrap_or(0) as f64;
    let irqs = counters.number("irqs").unwrap_or(0) as f64;
    SinkResult {
        frames_per_s: frames / secs,
        gbps: bytes * 8.0 / secs / 1e9,
        delivered: frames / sent.max(1) as f64,
        bytes,
        irqs_per_frame: irqs / frames.max(1.0),
        cpu,
    }
}

/// Guest → host: the probe's udp-blast into a socket in the namespace.
#[derive(Clone, Debug, Default)]
pub struct SourceResult {
    /// Datagrams the host received per second (first to last).
    pub frames_per_s: f64,
    pub gbps: f64,
    /// Received / what the probe queued.
    pub delivered: f64,
    /// Payload bytes received.
    pub bytes: f64,
    /// Interrupts the probe took per datagram sent.
    pub irqs_per_frame: f64,
    pub cpu: CpuUse,
}

fn grow_rcvbuf(sock: &UdpSocket, bytes: i32) {
    // SO_RCVBUFFORCE (root) goes past net.core.rmem_max; a failure only
    // leaves the default buffer.
    // SAFETY: setsockopt with a valid int on our own socket.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &bytes as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as u32,
        );
    }
}

/// Has the probe send `count` datagrams of `payload` bytes as fast as its
/// queue takes them to HOST_IP:SINK_PORT; counts what arrives.
pub fn source(ns: &Netns, vm: &dyn ProbeVm, payload: usize, count: u64) -> SourceResult {
    let receiver = ns
        .enter(|| {
            let sock = UdpSocket::bind(format!("{HOST_IP}:{SINK_PORT}")).expect("bind sink");
            sock.set_read_timeout(Some(Duration::from_millis(500)))
                .expect("timeout");
            grow_rcvbuf(&sock, 8 << 20);
            sock
        })
        .expect("netns");
    let counting = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut frames = 0u64;
        let mut bytes = 0u64;
        let mut first = None;
        let mut last = Instant::now();
        // Up to 10 s for the first datagram, then 500 ms of silence ends it.
        let start = Instant::now();
        loop {
            match receiver.recv(&mut buf) {
                Ok(n) => {
                    first.get_or_insert_with(Instant::now);
                    last = Instant::now();
                    frames += 1;
                    bytes += n as u64;
                }
                Err(_) if first.is_none() && start.elapsed() < Duration::from_secs(10) => {}
                Err(_) => break,
            }
        }
        let secs = first.map_or(1.0, |f| (last - f).as_secs_f64().max(1e-3));
        (frames, bytes, secs)
    });
    vm.console().send_command("counters-reset 0", REPLY);
    let (_, cpu) = with_cpu(vm.pid(), || {
        vm.console().send_command(
            &format!("udp-blast 0 {GUEST_IP} {HOST_IP}:{SINK_PORT} {payload} 0 {count}"),
            REPLY,
        );
        vm.console()
            .expect("probe: udp-blast done", Duration::from_secs(120));
    });
    let irqs = vm
        .console()
        .send_command("counters 0", REPLY)
        .number("irqs")
        .unwrap_or(0) as f64;
    let (frames, bytes, secs) = counting.join().expect("receiver thread");
    SourceResult {
        frames_per_s: frames as f64 / secs,
        gbps: bytes as f64 * 8.0 / secs / 1e9,
        delivered: frames as f64 / count.max(1) as f64,
        bytes: bytes as f64,
        irqs_per_frame: irqs / count.max(1) as f64,
        cpu,
    }
}

/// UDP echo (port 7), one datagram in flight.
#[derive(Clone, Debug, Default)]
pub struct EchoResult {
    pub round_trips_per_s: f64,
    pub median_rtt_us: f64,
    pub p90_rtt_us: f64,
    pub p99_rtt_us: f64,
    pub lost: u64,
}

/// The `q`-quantile (0..=1) of `v`.
pub fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

pub fn echo(ns: &Netns, payload: usize, secs: f64) -> EchoResult {
    ns.enter(move || {
        let sock = UdpSocket::bind(format!("{HOST_IP}:0")).expect("bind");
        sock.connect(format!("{GUEST_IP}:7")).expect("connect");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let out = vec![0x11u8; payload];
        let mut buf = [0u8; 2048];
        let start = Instant::now();
        let mut rtts = Vec::new();
        let mut lost = 0;
        while start.elapsed().as_secs_f64() < secs {
            let t = Instant::now();
            sock.send(&out).expect("send");
            match sock.recv(&mut buf) {
                Ok(_) => rtts.push(t.elapsed().as_secs_f64() * 1e6),
                Err(_) => lost += 1,
            }
        }
        EchoResult {
            round_trips_per_s: rtts.len() as f64 / start.elapsed().as_secs_f64(),
            median_rtt_us: median(rtts.clone()),
            p90_rtt_us: quantile(rtts.clone(), 0.9),
            p99_rtt_us: quantile(rtts, 0.99),
            lost,
        }
    })
    .expect("netns")
}

/// `ping -c COUNT -i 0.01` from the namespace: median RTT in µs and the
/// replies counted.
pub fn ping(ns: &Netns, count: u32) -> (f64, usize) {
    let out = ns
        .exec(&[
            "ping",
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            "0.01",
            "-W",
            "1",
            GUEST_IP,
        ])
        .expect("run ping");
    let text = String::from_utf8_lossy(&out.stdout);
    let rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1e3)
        .collect();
    let n = rtts.len();
    (median(rtts), n)
}

/// A namespace with `tap0` up at HOST_CIDR, for a probe at GUEST_IP.
pub fn namespace(what: &str) -> Netns {
    let ns = Netns::new(what).expect("create netns");
    ns.add_tap("tap0").expect("tap0");
    ns.add_addr("tap0", HOST_CIDR).expect("address");
    ns
}
