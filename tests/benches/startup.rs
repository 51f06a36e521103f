//! Start-up and memory overhead, Ferry against QEMU (`-M microvm
//! -enable-kvm`) on the same guest: a tiny PVH ELF that prints one line at
//! its first instructions.
//!
//! - time to first guest byte: process spawn → first console byte read,
//!   median of N runs (default 20; FERRY_BENCH_RUNS overrides);
//! - VMM CPU time until then: all threads' on-CPU time (schedstat);
//! - memory: the process's RSS minus what its guest-memory mapping holds,
//!   and peak RSS (VmHWM).
//!
//! The probe guest too, beside QEMU (`-M microvm`, the probe's
//! configuration): spawn → first console byte, spawn → the probe's
//! `ready` line on the host (its console is interrupt-driven by then, so
//! this is the UART's THRE path), VMM CPU time at `ready`, RSS − guest;
//! medians and worst of N.
//!
//! Run with `cargo bench -p ferry-tests --bench startup`.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::ferry::ferry_bin;
use ferry_tests::probe::qemu::QemuConfig;
use ferry_tests::probe::{probe_elf, READY};
use ferry_tests::tiny::{write_guest, Ending};

const GUEST_MEMORY_MIB: u64 = 64;

struct Sample {
    first_byte: Duration,
    cpu: Duration,
    rss_kib: u64,
    guest_rss_kib: u64,
    hwm_kib: u64,
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// RSS of guest memory: the run of adjacent anonymous mappings whose
/// sizes add up to exactly the guest's (the kernel may split it, e.g. where
/// only part of it is advised for huge pages).
fn guest_rss_kib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    // (start, end, rss KiB) of each anonymous read-write mapping.
    let mut maps: Vec<(u64, u64, u64)> = Vec::new();
    let mut current: Option<(u64, u64)> = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            let perms = words.next().unwrap_or("");
            let inode = words.nth(2).unwrap_or("0");
            let path = words.next();
            current = match (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                (Ok(lo), Ok(hi)) if perms == "rw-p" && inode == "0" && path.is_none() => {
                    Some((lo, hi))
                }
                _ => None,
            };
        } else if first == "Rss:" {
            if let Some((lo, hi)) = current.take() {
                let kib = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                maps.push((lo, hi, kib));
            }
        }
    }
    let want = GUEST_MEMORY_MIB << 20;
    for i in 0..maps.len() {
        let (mut end, mut size, mut rss) = (maps[i].1, maps[i].1 - maps[i].0, maps[i].2);
        let mut j = i + 1;
        while size < want && j < maps.len() && maps[j].0 == end {
            end = maps[j].1;
            size += maps[j].1 - maps[j].0;
            rss += maps[j].2;
            j += 1;
        }
        if size == want {
            return rss;
        }
    }
    0
}

/// On-CPU time of every thread of `pid` (ns precision from schedstat).
fn cpu_time(pid: u32) -> Duration {
    let mut ns = 0u64;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(ns)
}

fn measure(mut cmd: Command) -> Sample {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn VMM");
    let mut out = child.stdout.take().expect("stdout");
    let mut byte = [0u8; 1];
    let n = out.read(&mut byte).expect("read console");
    let first_byte = start.elapsed();
    assert_eq!(n, 1, "VMM ended before the guest printed");
    let pid = child.id();
    let cpu = cpu_time(pid);
    // Let the guest finish its line, then look at memory.
    std::thread::sleep(Duration::from_millis(50));
    let sample = Sample {
        first_byte,
        cpu,
        rss_kib: proc_status_kib(pid, "VmRSS:"),
        guest_rss_kib: guest_rss_kib(pid),
        hwm_kib: proc_status_kib(pid, "VmHWM:"),
    };
    let _ = child.kill();
    let _ = child.wait();
    sample
}

struct ProbeSample {
    first_byte: Duration,
    ready: Duration,
    cpu: Duration,
    overhead_kib: u64,
}

/// Spawn → first byte, and → the probe's `ready` line.
fn measure_probe(mut cmd: Command) -> ProbeSample {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn VMM");
    let mut out = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let mut first_byte = None;
    let ready = loop {
        let n = out.read(&mut buf).expect("read console");
        assert!(n > 0, "VMM ended before the probe was ready: {seen:?}");
        first_byte.get_or_insert_with(|| start.elapsed());
        seen.extend_from_slice(&buf[..n]);
        if seen.windows(READY.len()).any(|w| w == READY.as_bytes()) {
            break start.elapsed();
        }
    };
    let pid = child.id();
    let sample = ProbeSample {
        first_byte: first_byte.unwrap_or(ready),
        ready,
        cpu: cpu_time(pid),
        overhead_kib: proc_status_kib(pid, "VmRSS:").saturating_sub(guest_rss_kib(pid)),
    };
    let _ = child.kill();
    let _ = child.wait();
    sample
}

/// `runs` samples of Ferry and (when it is there) QEMU, alternated so the
/// machine's noise hits both alike.
fn interleaved<S>(
    runs: usize,
    have_qemu: bool,
    ferry: impl Fn() -> Command,
    qemu: impl Fn() -> Command,
    measure: fn(Command) -> S,
) -> (Vec<S>, Vec<S>) {
    let (mut f, mut q) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        f.push(measure(ferry()));
        if have_qemu {
            q.push(measure(qemu()));
        }
    }
    (f, q)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report_probe(name: &str, samples: &[ProbeSample]) -> Duration {
    let med = |f: &dyn Fn(&ProbeSample) -> Duration| median(samples.iter().map(f).collect());
    let worst =
        |f: &dyn Fn(&ProbeSample) -> Duration| samples.iter().map(f).max().unwrap_or_default();
    let ready = med(&|s| s.ready);
    println!(
        "| {name:<8} | {:>6.2} ({:>6.2}) ms | {:>6.2} ({:>6.2}) ms | {:>6.2} ms | {:>6.2} MiB |",
        ms(med(&|s| s.first_byte)),
        ms(worst(&|s| s.first_byte)),
        ms(ready),
        ms(worst(&|s| s.ready)),
        ms(med(&|s| s.cpu)),
        median(samples.iter().map(|s| s.overhead_kib).collect()) as f64 / 1024.0,
    );
    ready
}

fn probe_part(runs: usize, have_qemu: bool) {
    let elf = probe_elf();
    let mem = format!("{GUEST_MEMORY_MIB}M");
    let ferry = ferry_bin();
    let ferry_cmd = || {
        let mut c = Command::new(&ferry);
        c.args(["run", "--kernel", elf.to_str().unwrap(), "--memory", &mem]);
        c.args(["--serial", "stdio"]);
        c
    };
    let qemu_cmd = || {
        let mut config = QemuConfig::new("");
        config.memory_mib = GUEST_MEMORY_MIB as u32;
        config.command(std::path::Path::new("/nonexistent"))
    };
    // The first run after start-up counts too: no warm-up is thrown away.
    let (f, q) = interleaved(runs, have_qemu, ferry_cmd, qemu_cmd, measure_probe);
    println!("\nThe probe guest: spawn → first byte and → its `ready` line on the host, median (worst) of {runs}; VMM CPU at ready; RSS − guest at ready.");
    println!("| VMM      | first byte          | ready line          | VMM CPU   | RSS − guest |");
    println!("|----------|---------------------|---------------------|-----------|-------------|");
    let ferry_ready = report_probe("ferry", &f);
    if have_qemu {
        let qemu_ready = report_probe("qemu", &q);
        println!(
            "\nferry's probe is ready on the host {:.1}x sooner than under QEMU microvm.",
            ms(qemu_ready) / ms(ferry_ready)
        );
    }
}

fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

fn report(name: &str, samples: &[Sample]) -> Duration {
    let first = median(samples.iter().map(|s| s.first_byte).collect());
    let cpu = median(samples.iter().map(|s| s.cpu).collect());
    let overhead = median(
        samples
            .iter()
            .map(|s| s.rss_kib.saturating_sub(s.guest_rss_kib))
            .collect(),
    );
    let hwm = median(samples.iter().map(|s| s.hwm_kib).collect());
    let guest = median(samples.iter().map(|s| s.guest_rss_kib).collect());
    println!(
        "| {name:<8} | {:>10.2} ms | {:>10.2} ms | {:>9.2} MiB | {:>9.2} MiB | {:>9.2} MiB |",
        first.as_secs_f64() * 1e3,
        cpu.as_secs_f64() * 1e3,
        overhead as f64 / 1024.0,
        hwm as f64 / 1024.0,
        guest as f64 / 1024.0,
    );
    first
}

fn main() {
    let runs: usize = std::env::var("FERRY_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let guest = write_guest("bench-startup", b"first byte\n", Ending::Spin);
    let ferry = ferry_bin();
    let mem = format!("{GUEST_MEMORY_MIB}M");

    let ferry_cmd = || {
        let mut c = Command::new(&ferry);
        c.args(["run", "--kernel", guest.to_str().unwrap(), "--memory", &mem]);
        c
    };
    let qemu_cmd = || {
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-M",
            "microvm",
            "-enable-kvm",
            "-m",
            &mem,
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
        ]);
        c.args([
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-kernel",
            guest.to_str().unwrap(),
        ]);
        c
    };
    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);

    // Warm the page cache and both binaries once, then interleave runs so
    // machine noise hits both alike.
    measure(ferry_cmd());
    if have_qemu {
        measure(qemu_cmd());
    }
    let (f, q) = interleaved(runs, have_qemu, ferry_cmd, qemu_cmd, measure);

    println!("\nStart-up: spawn → first guest byte on the console; median of {runs} runs; guest memory {mem}.");
    println!("| VMM      | first byte    | VMM CPU time  | RSS − guest   | peak RSS      | guest RSS     |");
    println!("|----------|---------------|---------------|---------------|---------------|---------------|");
    let ferry_first = report("ferry", &f);
    if have_qemu {
        let qemu_first = report("qemu", &q);
        println!(
            "\nferry reaches the guest's first byte {:.1}x faster than QEMU microvm.",
            qemu_first.as_secs_f64() / ferry_first.as_secs_f64()
        );
    } else {
        println!("\n(qemu-system-x86_64 not installed: no comparison)");
    }
    probe_part(runs, have_qemu);
}
