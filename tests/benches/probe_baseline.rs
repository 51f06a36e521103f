//! Baselines for Ferry to be compared against: the probe guest under QEMU
//! (`-M microvm -enable-kvm`, virtio-net on a TAP in a namespace).
//!
//! - boot: QEMU spawn to the probe's ready line (median of several runs)
//! - UDP sink: host -> probe port 9, 1400-byte datagrams, as fast as the
//!   host sends, counted by the probe
//! - UDP echo: host -> probe port 7 with one datagram in flight, replies/s
//! - UDP source: probe -> host (udp-blast), counted by the host
//!
//! `cargo bench -p ferry-tests --bench probe_baseline`; prints a table.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use ferry_tests::host::{require_kvm, require_root, require_tool};
use ferry_tests::netns::Netns;
use ferry_tests::probe::{Cmdline, Qemu, QemuConfig, QemuNic};

const BOOT_RUNS: usize = 7;
const NET_RUNS: usize = 3;
const NET_SECONDS: f64 = 2.0;
const PAYLOAD: usize = 1400;
const REPLY: Duration = Duration::from_secs(10);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn start(ns: &Netns) -> (Qemu, Duration) {
    let cmdline = Cmdline::new().identity(0, None, None, "198.18.0.2/24");
    let mut config = QemuConfig::new(&cmdline.build());
    config.nics.push(QemuNic {
        tap: "tap0".into(),
        mac: Some("52:54:00:12:34:56".into()),
    });
    config.netns = Some(ns.name().to_string());
    let started = Instant::now();
    let qemu = Qemu::spawn(&config).expect("start qemu");
    qemu.wait_ready(Duration::from_secs(60));
    (qemu, started.elapsed())
}

fn sink_run(ns: &Netns, qemu: &Qemu) -> (f64, f64, f64) {
    qemu.console.send_command("counters-reset 0", REPLY);
    let sent = ns
        .enter(|| {
            let sock = UdpSocket::bind("198.18.0.1:0").unwrap();
            let buf = [0x5au8; PAYLOAD];
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed().as_secs_f64() < NET_SECONDS {
                for _ in 0..64 {
                    if sock.send_to(&buf, "198.18.0.2:9").is_ok() {
                        sent += 1;
                    }
                }
            }
            (sent, start.elapsed().as_secs_f64())
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let counters = qemu.console.send_command("counters 0", REPLY);
    let frames = counters.number("udp_sink_frames").unwrap_or(0) as f64;
    let bytes = counters.number("udp_sink_bytes").unwrap_or(0) as f64;
    let (sent, secs) = sent;
    (
        frames / secs,
        bytes * 8.0 / secs / 1e6,
        frames / sent.max(1) as f64,
    )
}

fn echo_run(ns: &Netns) -> (f64, f64) {
    ns.enter(|| {
        let sock = UdpSocket::bind("198.18.0.1:0").unwrap();
        sock.connect("198.18.0.2:7").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let payload = [0x11u8; 64];
        let mut buf = [0u8; 2048];
        let start = Instant::now();
        let mut rtts = Vec::new();
        while start.elapsed().as_secs_f64() < NET_SECONDS {
            let t = Instant::now();
            sock.send(&payload).unwrap();
            if sock.recv(&mut buf).is_ok() {
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        let rate = rtts.len() as f64 / start.elapsed().as_secs_f64();
        (rate, median(rtts))
    })
    .unwrap()
}

fn source_run(ns: &Netns, qemu: &Qemu) -> (f64, f64) {
    let count = 50_000u64;
    let receiver = ns
        .enter(|| {
            let sock = UdpSocket::bind("198.18.0.1:5009").unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            sock
        })
        .unwrap();
    let counting = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut frames = 0u64;
        let mut first = None;
        let mut last = Instant::now();
        while receiver.recv_from(&mut buf).is_ok() {
            first.get_or_insert_with(Instant::now);
            last = Instant::now();
            frames += 1;
        }
        let secs = first.map_or(1.0, |f| (last - f).as_secs_f64().max(1e-3));
        (frames, secs)
    });
    qemu.console.send_command(
        &format!("udp-blast 0 198.18.0.2 198.18.0.1:5009 {PAYLOAD} 0 {count}"),
        REPLY,
    );
    qemu.console
        .expect("probe: udp-blast done", Duration::from_secs(60));
    let (frames, secs) = counting.join().unwrap();
    (
        frames as f64 / secs,
        frames as f64 * PAYLOAD as f64 * 8.0 / secs / 1e6,
    )
}

fn main() {
    let name = "probe_baseline";
    if require_kvm(name).is_none()
        || !require_root(name)
        || !require_tool(name, "qemu-system-x86_64")
    {
        return;
    }
    let ns = Netns::new("bench").expect("netns");
    ns.add_tap("tap0").expect("tap");
    ns.add_addr("tap0", "198.18.0.1/24").expect("addr");

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
        let (pps, mbps, ratio) = sink_run(&ns, &qemu);
        sink_pps.push(pps);
        sink_mbps.push(mbps);
        delivered.push(ratio * 100.0);
        let (rate, rtt) = echo_run(&ns);
        echo_rate.push(rate);
        echo_rtt.push(rtt);
        let (pps, mbps) = source_run(&ns, &qemu);
        source_pps.push(pps);
        source_mbps.push(mbps);
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
