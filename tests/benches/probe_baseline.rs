//! Baselines for Ferry to be compared against: the probe guest under QEMU
//! (`-M microvm -enable-kvm`, virtio-net on a TAP in a namespace).
//!
//! - boot: QEMU spawn to the probe's ready line (median of several runs)
//! - UDP sink: host -> probe port 9, 1400-byte datagrams, as fast as the
//!   host sends, counted by the probe
//! - UDP echo: host -> probe port 7 with one datagram in flight, replies/s
//! - UDP source: probe -> host (udp-blast), counted by the host
//!
//! The measurements are `ferry_tests::bench_net`'s, shared with the
//! `net_throughput` bench that puts Ferry beside QEMU.
//!
//! `cargo bench -p ferry-tests --bench probe_baseline`; prints a table.

use std::time::{Duration, Instant};

use ferry_tests::bench_net::{self, median, GUEST_CIDR, GUEST_MAC};
use ferry_tests::host::{require_kvm, require_root, require_tool};
use ferry_tests::netns::Netns;
use ferry_tests::probe::{Cmdline, Qemu, QemuConfig, QemuNic};

const BOOT_RUNS: usize = 7;
const NET_RUNS: usize = 3;
const NET_SECONDS: f64 = 2.0;
const PAYLOAD: usize = 1400;

fn start(ns: &Netns) -> (Qemu, Duration) {
    let cmdline = Cmdline::new().identity(0, None, None, GUEST_CIDR);
    let mut config = QemuConfig::new(&cmdline.build());
    config.nics.push(QemuNic {
        tap: "tap0".into(),
        mac: Some(GUEST_MAC.into()),
    });
    config.netns = Some(ns.name().to_string());
    let started = Instant::now();
    let qemu = Qemu::spawn(&config).expect("start qemu");
    qemu.wait_ready(Duration::from_secs(60));
    (qemu, started.elapsed())
}

fn main() {
    let name = "probe_baseline";
    if require_kvm(name).is_none()
        || !require_root(name)
        || !require_tool(name, "qemu-system-x86_64")
    {
        return;
    }
    let ns = bench_net::namespace("bench");

    let mut boots = Vec::new();
    for _ in 0..BOOT_RUNS {
        let (qemu, took) = start(&ns);
        boots.push(took.as_secs_f64() * 1e3);
        drop(qemu);
    }
    let (qemu, _) = start(&ns);
    let ping = ns
        .exec(&["ping", "-c", "2", "-W", "2", "198.18.0.2"])
        .expect("ping");
    assert!(ping.status.success(), "probe does not answer ping");

    let mut sink_pps = Vec::new();
    let mut sink_mbps = Vec::new();
    let mut delivered = Vec::new();
    let mut echo_rate = Vec::new();
    let mut echo_rtt = Vec::new();
    let mut source_pps = Vec::new();
    let mut source_mbps = Vec::new();
    for _ in 0..NET_RUNS {
        let sink = bench_net::sink(&ns, &qemu, PAYLOAD, NET_SECONDS);
        sink_pps.push(sink.frames_per_s);
        sink_mbps.push(sink.gbps * 1e3);
        delivered.push(sink.delivered * 100.0);
        let echo = bench_net::echo(&ns, 64, NET_SECONDS);
        echo_rate.push(echo.round_trips_per_s);
        echo_rtt.push(echo.median_rtt_us);
        let source = bench_net::source(&ns, &qemu, PAYLOAD, 50_000);
        source_pps.push(source.frames_per_s);
        source_mbps.push(source.gbps * 1e3);
    }
    let kind = qemu
        .console
        .seen("probe: cpu kvm=")
        .and_then(|l| ferry_tests::probe::fields(&l).remove("kvm"))
        .unwrap_or_else(|| "?".into());
    println!();
    println!("probe guest under QEMU microvm (kvm={kind}), medians");
    println!("{:<44} {:>14}", "measure", "value");
    println!(
        "{:<44} {:>11.1} ms",
        format!("boot to ready line ({BOOT_RUNS} runs)"),
        median(boots)
    );
    println!(
        "{:<44} {:>10.0} f/s",
        format!("UDP sink host->probe, {PAYLOAD} B"),
        median(sink_pps)
    );
    println!(
        "{:<44} {:>9.1} Mb/s",
        "UDP sink host->probe, payload",
        median(sink_mbps)
    );
    println!(
        "{:<44} {:>12.1} %",
        "UDP sink: share of sent datagrams counted",
        median(delivered)
    );
    println!(
        "{:<44} {:>10.0} r/s",
        "UDP echo round trips, 64 B, 1 in flight",
        median(echo_rate)
    );
    println!(
        "{:<44} {:>11.1} us",
        "UDP echo round-trip time",
        median(echo_rtt)
    );
    println!(
        "{:<44} {:>10.0} f/s",
        format!("UDP source probe->host, {PAYLOAD} B"),
        median(source_pps)
    );
    println!(
        "{:<44} {:>9.1} Mb/s",
        "UDP source probe->host, payload",
        median(source_mbps)
    );
}
