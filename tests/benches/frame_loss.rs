//! Frames lost across one live migration (issue #17), Ferry beside QEMU
//! 7.2 on the same topology and probe: the switch namespace of
//! `ferry_tests::switch` (hosts A and B, a client), a numbered UDP stream
//! from the client to the probe's echo port, one migration A → B per run
//! over TCP, the stream going on for 0.7 s after the source completes.
//! Two counts per run: datagrams that never reached the guest (sent, less
//! the UDP frames the probe's counters say it received — they travel in
//! its memory to B), and echoes that never came back (those, plus answers
//! the probe could not queue itself and losses on the way back). On this
//! 2-core host a 50k/s stream loses frames without any migration too: the
//! control row says how many.
//!
//! Rows: 1k, 10k and 50k datagrams/s of 64 and 1400 bytes; columns:
//! Ferry (forwarding on, the default), Ferry with `x-forward-frames` off,
//! QEMU; median and worst of FERRY_BENCH_RUNS (default 10), the VMMs in
//! turn, and the same stream without a migration under Ferry (what the
//! probe itself drops at that rate). Also the forwarded frames' extra
//! latency: the worst round trip of a run minus its median, Ferry's.
//!
//! `cargo bench -p ferry-tests --bench frame_loss` (root, KVM, QEMU).
//! FERRY_BENCH_RATES=1000,10000 and FERRY_BENCH_SIZES=64 pick rows.

use std::time::{Duration, Instant};

use ferry_tests::bench_net::{env_or, median};
use ferry_tests::host::{require_kvm, require_root, require_tool};
use ferry_tests::hosts::B_ADDR;
use ferry_tests::probe::checks::GUEST_MAC;
use ferry_tests::probe::Cmdline;
use ferry_tests::switch::{Switch, CLIENT_ADDR};
use ferry_tests::udpstream::{StreamReport, UdpStream};
use ferry_tests::vmms::{Guest, GuestNet, Vmm};
use serde_json::json;

const MIB: u32 = 256;
const GUEST_IP: &str = "198.18.0.2";
const T: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    Ferry,
    FerryNoForward,
    Qemu,
    /// The stream alone, no migration (Ferry).
    Baseline,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Ferry => "ferry",
            Setup::FerryNoForward => "ferry, x-forward-frames off",
            Setup::Qemu => "qemu",
            Setup::Baseline => "no migration (ferry)",
        }
    }
}

fn stream(sw: &Switch, rate: u64, size: usize) -> UdpStream {
    let s = UdpStream::start(
        &sw.client,
        CLIENT_ADDR,
        &format!("{GUEST_IP}:7"),
        rate,
        size,
    );
    assert!(
        s.wait_echoes(200, Duration::from_secs(20)),
        "no echoes from the probe"
    );
    s
}

/// One run's figures.
struct Run {
    stream: StreamReport,
    /// Datagrams that never reached the guest.
    not_delivered: u64,
    /// Answers the probe could not queue (its tx ring was full).
    probe_tx_dropped: u64,
    downtime_ms: f64,
}

/// UDP frames the probe received so far, and answers it dropped (its
/// counters).
fn guest_counts(g: &Guest) -> (u64, u64) {
    let c = g.console().send_command("counters 0", T);
    let n = |k: &str| c.number(k).unwrap_or(0);
    (
        n("rx_frames").saturating_sub(n("arp_replies") + n("ignored") + n("malformed")),
        n("tx_dropped"),
    )
}

fn once(setup: Setup, rate: u64, size: usize, run: usize) -> Run {
    let sw = Switch::new(&format!("fl{run}{}", rate / 1000));
    let cmdline = Cmdline::new()
        .identity(0, None, None, &format!("{GUEST_IP}/24"))
        .build();
    let (a, b) = GuestNet::on_both_hosts(&sw.hosts, GUEST_MAC);
    let vmm = if setup == Setup::Qemu {
        Vmm::Qemu
    } else {
        Vmm::Ferry
    };
    let mut src = Guest::boot(vmm, &format!("fl-{}-src", vmm.name()), &a, MIB, &cmdline);
    if setup == Setup::Baseline {
        let s = stream(&sw, rate, size);
        std::thread::sleep(Duration::from_millis(1500));
        let stream = s.stop(Duration::from_millis(300));
        let (received, probe_tx_dropped) = guest_counts(&src);
        return Run {
            not_delivered: stream.sent.saturating_sub(received),
            probe_tx_dropped,
            stream,
            downtime_ms: 0.0,
        };
    }
    let uri = format!("tcp:{B_ADDR}:4452");
    let dst = Guest::incoming(
        vmm,
        &format!("fl-{}-dst", vmm.name()),
        &b,
        MIB,
        &cmdline,
        &uri,
    );
    if setup == Setup::FerryNoForward {
        src.exec(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "x-forward-frames", "state": false }] }),
        )
        .expect("capability");
    }
    let s = stream(&sw, rate, size);
    std::thread::sleep(Duration::from_millis(300));
    src.exec("migrate", json!({ "uri": uri })).expect("migrate");
    let t0 = Instant::now();
    let info = loop {
        let info = src.exec("query-migrate", json!({})).expect("query-migrate");
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed" | "cancelled") => panic!("{}: {info}", setup.name()),
            _ => {}
        }
        assert!(t0.elapsed() < T, "{info}");
        std::thread::sleep(Duration::from_millis(5));
    };
    std::thread::sleep(Duration::from_millis(700));
    let stream = s.stop(Duration::from_millis(300));
    let (received, probe_tx_dropped) = guest_counts(&dst);
    Run {
        not_delivered: stream.sent.saturating_sub(received),
        probe_tx_dropped,
        stream,
        downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
    }
}

fn list(var: &str, default: &[u64]) -> Vec<u64> {
    std::env::var(var)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn main() {
    let test = "bench frame_loss";
    if require_kvm(test).is_none()
        || !require_root(test)
        || !require_tool(test, "qemu-system-x86_64")
    {
        return;
    }
    let runs: usize = env_or("FERRY_BENCH_RUNS", 10);
    let rates = list("FERRY_BENCH_RATES", &[1000, 10_000, 50_000]);
    let sizes = list("FERRY_BENCH_SIZES", &[64, 1400]);
    let setups = [
        Setup::Ferry,
        Setup::FerryNoForward,
        Setup::Qemu,
        Setup::Baseline,
    ];
    let mut rows = Vec::new();
    for &rate in &rates {
        for &size in &sizes {
            let mut got: Vec<Vec<Run>> = setups.iter().map(|_| Vec::new()).collect();
            for run in 0..runs {
                for (i, &setup) in setups.iter().enumerate() {
                    // The control needs fewer runs.
                    if setup == Setup::Baseline && run >= runs.div_ceil(3) {
                        continue;
                    }
                    let r = once(setup, rate, size as usize, run);
                    eprintln!(
                        "{rate}/s {size} B run {run} {}: {} of {} never reached the guest, {} echoes lost, {} of them dropped by the probe itself (downtime {} ms, rtt max {:?})",
                        setup.name(),
                        r.not_delivered,
                        r.stream.sent,
                        r.stream.lost.len(),
                        r.probe_tx_dropped,
                        r.downtime_ms,
                        r.stream.rtt_max
                    );
                    got[i].push(r);
                }
            }
            rows.push((rate, size, got));
        }
    }
    println!("\nFrames lost across one live migration, probe guest {MIB} MiB, TCP between namespace hosts behind one switch, {runs} runs (the no-migration control {})\n", runs.div_ceil(3));
    print!("| datagrams/s | size |");
    for s in setups {
        print!(
            " {}: not delivered / echoes lost / of them dropped by the probe, median (worst) |",
            s.name()
        );
    }
    println!(" ferry downtime, median ms | ferry extra latency, median (worst) ms |");
    println!("| --- | --- |{}", " --- |".repeat(setups.len() + 2));
    let med_worst = |v: Vec<f64>| {
        let worst = v.iter().copied().fold(0.0, f64::max);
        format!("{:.0} ({worst:.0})", median(v))
    };
    for (rate, size, got) in &rows {
        print!("| {rate} | {size} B |");
        for samples in got {
            let nd = samples.iter().map(|r| r.not_delivered as f64).collect();
            let lost = samples.iter().map(|r| r.stream.lost.len() as f64).collect();
            let own = samples.iter().map(|r| r.probe_tx_dropped as f64).collect();
            print!(
                " {} / {} / {} |",
                med_worst(nd),
                med_worst(lost),
                med_worst(own)
            );
        }
        let ferry = &got[0];
        let down = median(ferry.iter().map(|r| r.downtime_ms).collect());
        let extra: Vec<f64> = ferry
            .iter()
            .map(|r| (r.stream.rtt_max.as_secs_f64() - r.stream.rtt_median.as_secs_f64()) * 1e3)
            .collect();
        let worst = extra.iter().copied().fold(0.0, f64::max);
        println!(" {down:.0} | {:.1} ({worst:.1}) |", median(extra));
    }
}
