//! Downtime as libvirt sees it with `pause-before-switchover`: the source
//! stops the guest after its live passes and waits in `pre-switchover`;
//! libvirt then says `migrate-continue` and waits for the destination
//! (started `-S`) to have the whole VM, ready for `cont`. Measured: from
//! `migrate-continue` on the source to the destination's MIGRATION
//! `completed` event (its own timestamp; one host, one clock), Ferry
//! beside QEMU 7.2 (`-M microvm`), the same probe guest holding data
//! (256 MiB, 64 MiB of pattern, 8 MiB/s dirtied), TCP between two
//! namespace hosts, `events` on both ends. Also the downtime each source
//! reports (QEMU's includes the pre-switchover wait).
//!
//! FERRY_BENCH_RUNS (default 5) runs each, the VMMs in turn (the first
//! run after start-up counts); median and worst.
//! `cargo bench -p ferry-tests --bench switchover` (root, KVM, QEMU).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_tests::bench_net::{env_or, median};
use ferry_tests::host::{require_kvm, require_root, require_tool};
use ferry_tests::hosts::{TwoHosts, B_ADDR, GUEST_ADDR};
use ferry_tests::probe::checks::GUEST_MAC;
use ferry_tests::probe::Cmdline;
use ferry_tests::vmms::{Guest, GuestNet, Vmm};
use serde_json::{json, Value};

const MIB: u32 = 256;
const T: Duration = Duration::from_secs(120);

fn caps(names: &[&str]) -> Value {
    let list: Vec<Value> = names
        .iter()
        .map(|n| json!({ "capability": n, "state": true }))
        .collect();
    json!({ "capabilities": list })
}

fn event_time(e: &qmp::QmpEvent) -> SystemTime {
    UNIX_EPOCH
        + Duration::from_secs(e.timestamp.seconds as u64)
        + Duration::from_micros(e.timestamp.microseconds as u64)
}

/// (continue → destination ready, the source's reported downtime), ms.
fn once(vmm: Vmm, run: usize) -> (f64, f64) {
    let hosts = TwoHosts::new(&format!("sw{run}{}", &vmm.name()[..1]));
    let cmdline = Cmdline::new()
        .identity(0, None, None, &format!("{GUEST_ADDR}/24"))
        .heartbeat_ms(100)
        .pattern(5, "64M")
        .dirty("8M", "16M")
        .build();
    let (a, b) = GuestNet::on_both_hosts(&hosts, GUEST_MAC);
    let name = vmm.name();
    let uri = format!("tcp:{B_ADDR}:4470");
    let mut src = Guest::boot(vmm, &format!("sw-{name}-src"), &a, MIB, &cmdline);
    src.console().expect_seen("probe: pattern written");
    let mut dst = Guest::incoming_with(
        vmm,
        &format!("sw-{name}-dst"),
        &b,
        MIB,
        &cmdline,
        &uri,
        true,
    );
    dst.exec("migrate-set-capabilities", caps(&["events"]))
        .expect("destination capabilities");
    src.exec(
        "migrate-set-capabilities",
        caps(&["events", "pause-before-switchover"]),
    )
    .expect("source capabilities");
    src.exec(
        "migrate-set-parameters",
        json!({ "downtime-limit": 300, "max-bandwidth": 1u64 << 40 }),
    )
    .expect("parameters");
    std::thread::sleep(Duration::from_millis(300));
    src.exec("migrate", json!({ "uri": uri })).expect("migrate");
    let t0 = Instant::now();
    loop {
        let info = src.exec("query-migrate", json!({})).expect("query-migrate");
        match info["status"].as_str() {
            Some("pre-switchover") => break,
            Some("failed" | "cancelled" | "completed") => panic!("{name}: {info}"),
            _ => {}
        }
        assert!(t0.elapsed() < T, "{name}: {info}");
        std::thread::sleep(Duration::from_millis(1));
    }
    let continued = SystemTime::now();
    src.exec("migrate-continue", json!({ "state": "pre-switchover" }))
        .expect("migrate-continue");
    let ready = loop {
        let e = dst.wait_event("MIGRATION").expect("destination event");
        if e.data.as_ref().and_then(|d| d["status"].as_str()) == Some("completed") {
            break event_time(&e);
        }
    };
    let info = loop {
        let info = src.exec("query-migrate", json!({})).expect("query-migrate");
        if info["status"] == "completed" {
            break info;
        }
        assert!(t0.elapsed() < T, "{name}: {info}");
        std::thread::sleep(Duration::from_millis(2));
    };
    let status = dst.status();
    assert_eq!(
        status, "paused",
        "{name}: the -S destination after the stream"
    );
    let switch_ms = ready
        .duration_since(continued)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    (switch_ms, info["downtime"].as_f64().unwrap_or(f64::NAN))
}

fn main() {
    let test = "bench switchover";
    if require_kvm(test).is_none()
        || !require_root(test)
        || !require_tool(test, "qemu-system-x86_64")
    {
        return;
    }
    let runs: usize = env_or("FERRY_BENCH_RUNS", 5);
    let mut got: Vec<(Vmm, Vec<(f64, f64)>)> = vec![(Vmm::Ferry, vec![]), (Vmm::Qemu, vec![])];
    for run in 0..runs {
        for (vmm, samples) in got.iter_mut() {
            samples.push(once(*vmm, run));
        }
    }
    println!(
        "\npause-before-switchover, probe guest {MIB} MiB holding 64 MiB, TCP between namespace hosts, {runs} runs\n"
    );
    println!("| VMM | migrate-continue → destination ready, median (worst) ms | first run | source's reported downtime, median ms |");
    println!("| --- | --- | --- | --- |");
    for (vmm, samples) in &got {
        let switch: Vec<f64> = samples.iter().map(|s| s.0).collect();
        let worst = switch.iter().copied().fold(f64::MIN, f64::max);
        let down: Vec<f64> = samples.iter().map(|s| s.1).collect();
        println!(
            "| {} | {:.1} ({worst:.1}) | {:.1} | {:.0} |",
            vmm.name(),
            median(switch.clone()),
            switch[0],
            median(down)
        );
    }
}
