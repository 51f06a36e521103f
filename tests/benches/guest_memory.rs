//! How fast the guest walks its own memory under each VMM: the probe's
//! dirtier (`dirty max SIZE`: one word into each page of SIZE, round and
//! round, as fast as the guest runs) for 2 s, page writes per second from
//! its own counter. This is where the backing of guest RAM shows: with
//! transparent huge pages KVM maps the guest 2 MiB at a time, without
//! them every 4 KiB page costs the (on kvm_pvm, shadow) MMU an entry.
//! Ferry beside QEMU 7.2 microvm on the same probe ELF, 1 GiB guests, the
//! VMMs taking turns; medians of FERRY_BENCH_RUNS runs (default 5).
//!
//! `cargo bench -p ferry-tests --bench guest_memory` (KVM, QEMU).

use std::time::{Duration, Instant};

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_tool};
use ferry_tests::probe::{Console, Qemu, QemuConfig, READY};

const MIB: u32 = 1024;
const WARM_UP: Duration = Duration::from_millis(500);
const MEASURE: Duration = Duration::from_secs(2);
const T: Duration = Duration::from_secs(60);

enum Running {
    Ferry(FerryVm),
    Qemu(Qemu),
}

impl Running {
    fn start(qemu: bool) -> Running {
        if qemu {
            let mut config = QemuConfig::new("");
            config.memory_mib = MIB;
            let q = Qemu::spawn(&config).expect("start QEMU");
            q.wait_ready(T);
            Running::Qemu(q)
        } else {
            let mut spec = VmSpec::probe("");
            spec.memory = format!("{MIB}M");
            let vm = FerryVm::spawn("bench-memory", &spec, None);
            vm.console.expect(READY, T);
            Running::Ferry(vm)
        }
    }

    fn console(&self) -> &Console {
        match self {
            Running::Ferry(vm) => &vm.console,
            Running::Qemu(q) => &q.console,
        }
    }
}

/// Page writes per second of the dirtier over `size`.
fn walk_rate(qemu: bool, size: &str) -> f64 {
    let guest = Running::start(qemu);
    let c = guest.console();
    c.send_command(&format!("dirty max {size}"), T);
    std::thread::sleep(WARM_UP);
    let written = || {
        c.send_command("workloads", T)
            .number("pages_written")
            .expect("pages_written")
    };
    let (t0, w0) = (Instant::now(), written());
    std::thread::sleep(MEASURE);
    let (t1, w1) = (Instant::now(), written());
    (w1 - w0) as f64 / (t1 - t0).as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if require_kvm("guest_memory").is_none() || !require_tool("guest_memory", "qemu-system-x86_64")
    {
        return;
    }
    let runs: usize = std::env::var("FERRY_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    println!(
        "\nGuest memory walk: the probe's `dirty max SIZE` in a {MIB} MiB guest, page writes/s over {} s; medians of {runs}.",
        MEASURE.as_secs()
    );
    println!("| region | Ferry | QEMU | Ferry/QEMU |");
    println!("|---|---:|---:|---:|");
    for size in ["256M", "768M"] {
        let (mut ferry, mut qemu) = (Vec::new(), Vec::new());
        for run in 0..runs {
            // Taking turns: which goes first alternates.
            for q in [run % 2 == 1, run % 2 == 0] {
                let rate = walk_rate(q, size);
                if q {
                    qemu.push(rate);
                } else {
                    ferry.push(rate);
                }
            }
        }
        let (f, q) = (median(ferry), median(qemu));
        println!(
            "| {size} | {:.0} M/s | {:.0} M/s | {:.2} |",
            f / 1e6,
            q / 1e6,
            f / q
        );
    }
}
