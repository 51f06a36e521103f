//! virtio-net throughput and latency, Ferry beside QEMU, on the same probe
//! guest, the same namespace and the same TAP.
//!
//! QEMU: `-M microvm,acpi=off,ioapic2=off -enable-kvm`, `virtio-net-device`
//! on a TAP without vhost. Ferry: `ferry run --net tap=tap0`. Both guests
//! get 256 MiB and the same MAC.
//!
//! - host → guest UDP into the probe's sink (port 9), as fast as one host
//!   thread sends, 1400- and 64-byte payloads; counted by the probe
//! - guest → host UDP (the probe's udp-blast), counted by the host socket
//! - UDP echo (port 7), 64 bytes, one in flight; ping RTT (`ping -i 0.01`)
//! - the VMM's CPU time (all threads, from /proc/PID/task/*/schedstat) per
//!   GB of payload moved, each direction
//!
//! Each run boots each VMM fresh and measures everything; the VMMs take
//! turns (which goes first alternates), so machine noise hits both alike.
//! The table has the medians over the runs, their ratio, and the median of
//! each run's own Ferry/QEMU (steadier when the machine's load drifts),
//! with the host's load average: on a shared machine every figure moves
//! with it.
//!
//! `cargo bench -p ferry-tests --bench net_throughput`; environment:
//! FERRY_BENCH_RUNS (default 5), FERRY_BENCH_SECONDS per throughput
//! measurement (default 2), FERRY_BENCH_VERBOSE=1 for every run's figures
//! and per-thread CPU, FERRY_BENCH_ONLY=ferry|qemu to measure one side.

use std::time::{Duration, Instant};

use ferry_tests::bench_net::env_or;
use ferry_tests::bench_net::{
    echo, median, namespace, ping, sink, source, EchoResult, ProbeVm, SinkResult, SourceResult,
    GUEST_CIDR, GUEST_IP, GUEST_MAC,
};
use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root, require_tool};
use ferry_tests::netns::Netns;
use ferry_tests::probe::{Cmdline, Qemu, QemuConfig, QemuNic, READY};

const PING_COUNT: u32 = 200;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vmm {
    Ferry,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Ferry => "ferry",
            Vmm::Qemu => "qemu",
        }
    }
}

/// One run's figures for one VMM.
struct Run {
    sink_big: SinkResult,
    sink_small: SinkResult,
    source_big: SourceResult,
    source_small: SourceResult,
    echo: EchoResult,
    ping_us: f64,
}

enum Guest {
    Ferry(FerryVm),
    Qemu(Qemu),
}

impl Guest {
    fn vm(&self) -> &dyn ProbeVm {
        match self {
            Guest::Ferry(f) => f,
            Guest::Qemu(q) => q,
        }
    }
}

fn cmdline() -> String {
    Cmdline::new().identity(0, None, None, GUEST_CIDR).build()
}

fn boot(vmm: Vmm, ns: &Netns) -> Guest {
    match vmm {
        Vmm::Ferry => {
            let mut spec = VmSpec::probe(&cmdline());
            spec.qmp = false;
            spec.nets = vec![format!("tap=tap0,mac={GUEST_MAC}")];
            let vm = FerryVm::spawn("netbench", &spec, Some(ns));
            vm.console.expect(READY, Duration::from_secs(30));
            Guest::Ferry(vm)
        }
        Vmm::Qemu => {
            let mut config = QemuConfig::new(&cmdline());
            config.memory_mib = 256;
            config.nics.push(QemuNic {
                tap: "tap0".into(),
                mac: Some(GUEST_MAC.into()),
            });
            config.netns = Some(ns.name().to_string());
            let qemu = Qemu::spawn(&config).expect("start qemu");
            qemu.wait_ready(Duration::from_secs(30));
            Guest::Qemu(qemu)
        }
    }
}

fn measure(vmm: Vmm, ns: &Netns, secs: f64, verbose: bool) -> Run {
    let guest = boot(vmm, ns);
    let vm = guest.vm();
    // Neighbour entries both ways before anything is timed.
    let warm = ns
        .exec(&["ping", "-c", "3", "-i", "0.05", "-W", "2", GUEST_IP])
        .expect("ping");
    assert!(
        warm.status.success(),
        "{}: the probe does not answer ping:\n{}",
        vmm.name(),
        vm.console().output()
    );
    let big_count = (100_000.0 * secs) as u64;
    let small_count = (150_000.0 * secs) as u64;
    let run = Run {
        sink_big: sink(ns, vm, 1400, secs),
        sink_small: sink(ns, vm, 64, secs),
        source_big: source(ns, vm, 1400, big_count),
        source_small: source(ns, vm, 64, small_count),
        echo: echo(ns, 64, secs.min(2.0)),
        ping_us: ping(ns, PING_COUNT).0,
    };
    if verbose {
        let r = &run;
        eprintln!(
            "[{}] sink1400 {:.0} f/s ({:.0}% of offered, {:.3} irq/f, cpu {:.2} cores: {}) | \
             sink64 {:.0} f/s ({:.3} irq/f) | \
             source1400 {:.0} f/s ({:.1}% arrived, {:.3} irq/f, cpu {:.2} cores: {}) | \
             source64 {:.0} f/s ({:.1}%, {:.3} irq/f) | \
             echo {:.0}/s p50 {:.0} p90 {:.0} p99 {:.0} us lost {} | ping {:.0} us",
            vmm.name(),
            r.sink_big.frames_per_s,
            r.sink_big.delivered * 100.0,
            r.sink_big.irqs_per_frame,
            r.sink_big.cpu.cores(),
            r.sink_big.cpu.describe(),
            r.sink_small.frames_per_s,
            r.sink_small.irqs_per_frame,
            r.source_big.frames_per_s,
            r.source_big.delivered * 100.0,
            r.source_big.irqs_per_frame,
            r.source_big.cpu.cores(),
            r.source_big.cpu.describe(),
            r.source_small.frames_per_s,
            r.source_small.delivered * 100.0,
            r.source_small.irqs_per_frame,
            r.echo.round_trips_per_s,
            r.echo.median_rtt_us,
            r.echo.p90_rtt_us,
            r.echo.p99_rtt_us,
            r.echo.lost,
            r.ping_us
        );
    }
    run
}

/// The 1-minute load average: how busy the machine was (on a shared
/// machine every figure here moves with it).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// A table row: the measure, its unit, whether higher is better, and the
/// figure of one run.
type Row = (&'static str, &'static str, bool, fn(&Run) -> f64);

fn rows() -> Vec<Row> {
    vec![
        ("host→guest UDP 1400 B", "kf/s", true, |r| {
            r.sink_big.frames_per_s / 1e3
        }),
        ("host→guest UDP 1400 B", "Gb/s", true, |r| r.sink_big.gbps),
        (
            "host→guest UDP 1400 B, share of offered",
            "%",
            true,
            |r| r.sink_big.delivered * 100.0,
        ),
        ("host→guest UDP 64 B", "kf/s", true, |r| {
            r.sink_small.frames_per_s / 1e3
        }),
        ("guest→host UDP 1400 B", "kf/s", true, |r| {
            r.source_big.frames_per_s / 1e3
        }),
        ("guest→host UDP 1400 B", "Gb/s", true, |r| {
            r.source_big.gbps
        }),
        ("guest→host UDP 64 B", "kf/s", true, |r| {
            r.source_small.frames_per_s / 1e3
        }),
        ("UDP echo 64 B, 1 in flight", "rt/s", true, |r| {
            r.echo.round_trips_per_s
        }),
        ("UDP echo round trip (median)", "µs", false, |r| {
            r.echo.median_rtt_us
        }),
        ("UDP echo round trip (p99)", "µs", false, |r| {
            r.echo.p99_rtt_us
        }),
        ("ping RTT (median)", "µs", false, |r| r.ping_us),
        ("VMM CPU per GB, host→guest 1400 B", "s/GB", false, |r| {
            r.sink_big.cpu.per_gb(r.sink_big.bytes)
        }),
        ("VMM CPU per GB, guest→host 1400 B", "s/GB", false, |r| {
            r.source_big.cpu.per_gb(r.source_big.bytes)
        }),
        ("VMM cores busy, host→guest 1400 B", "cores", false, |r| {
            r.sink_big.cpu.cores()
        }),
        ("VMM cores busy, guest→host 1400 B", "cores", false, |r| {
            r.source_big.cpu.cores()
        }),
    ]
}

fn main() {
    let name = "net_throughput";
    if require_kvm(name).is_none()
        || !require_root(name)
        || !require_tool(name, "qemu-system-x86_64")
        || !require_tool(name, "ping")
    {
        return;
    }
    let runs: usize = env_or("FERRY_BENCH_RUNS", 5).max(1);
    let secs: f64 = env_or("FERRY_BENCH_SECONDS", 2.0);
    let verbose = std::env::var("FERRY_BENCH_VERBOSE").is_ok_and(|v| v == "1");
    let only = std::env::var("FERRY_BENCH_ONLY").ok();
    let vmms: Vec<Vmm> = [Vmm::Ferry, Vmm::Qemu]
        .into_iter()
        .filter(|v| only.as_deref().is_none_or(|o| o == v.name()))
        .collect();
    // Build both guests' pieces before the clock matters.
    let _ = ferry_tests::probe::probe_elf();
    let _ = ferry_tests::ferry::ferry_bin();

    let ns = namespace("netbench");
    let started = Instant::now();
    let load_before = loadavg();
    // results[run] = (Ferry's, QEMU's) figures of that run.
    let mut results: Vec<(Option<Run>, Option<Run>)> = Vec::new();
    for run in 0..runs {
        let mut order = vmms.clone();
        if run % 2 == 1 {
            order.reverse();
        }
        let (mut ferry, mut qemu) = (None, None);
        for vmm in order {
            let r = Some(measure(vmm, &ns, secs, verbose));
            match vmm {
                Vmm::Ferry => ferry = r,
                Vmm::Qemu => qemu = r,
            }
        }
        results.push((ferry, qemu));
    }
    let med = |vmm: Vmm, f: fn(&Run) -> f64| {
        median(
            results
                .iter()
                .filter_map(|(a, b)| if vmm == Vmm::Ferry { a } else { b }.as_ref())
                .map(f)
                .collect(),
        )
    };
    // Each run's own Ferry/QEMU: the two were measured within seconds of
    // each other, so drift in the machine's load cancels out of these
    // better than out of the ratio of the medians.
    let paired = |f: fn(&Run) -> f64| {
        median(
            results
                .iter()
                .filter_map(|(a, b)| Some(f(a.as_ref()?) / f(b.as_ref()?)))
                .collect(),
        )
    };
    let kind = match require_kvm(name) {
        Some(k) => format!("{k:?}"),
        None => "?".into(),
    };
    println!();
    println!(
        "virtio-net, probe guest, Ferry vs QEMU 7.2 microvm (TAP, no vhost); KVM {kind}, {} CPUs; \
         medians of {runs} runs, {secs} s per throughput figure ({:.0} s in all); \
         host load average {load_before} before, {} after",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    println!();
    println!("| measure | unit | Ferry | QEMU | Ferry/QEMU | per-run Ferry/QEMU, median |");
    println!("|---|---|---:|---:|---:|---:|");
    let ratio_text = |ratio: f64, higher_better: bool| {
        if !ratio.is_finite() {
            "-".to_string()
        } else if higher_better {
            format!("{ratio:.2}")
        } else {
            format!("{ratio:.2} (lower is better)")
        }
    };
    let fmt = |v: f64| {
        if v.is_nan() {
            "-".to_string()
        } else if v >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        }
    };
    for (label, unit, higher_better, f) in rows() {
        let ferry = med(Vmm::Ferry, f);
        let qemu = med(Vmm::Qemu, f);
        println!(
            "| {label} | {unit} | {} | {} | {} | {} |",
            fmt(ferry),
            fmt(qemu),
            ratio_text(ferry / qemu, higher_better),
            ratio_text(paired(f), higher_better)
        );
    }
}
