//! Migration over a real link: 1 Gbit/s with a 2 ms round trip (a
//! user-space delay line, tests/src/delayline.rs: this kernel has no
//! sch_netem). The link is what it claims (ping's RTT, the migration's
//! time against its bytes), and a populated guest with multifd arrives
//! intact.

use std::time::Duration;

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root};
use ferry_tests::hosts::{
    assert_completed, migrate, status, wait_migration, TwoHosts, A_TAP, B_ADDR, B_TAP, GUEST_ADDR,
};
use ferry_tests::probe::{Cmdline, READY};
use serde_json::json;

const T: Duration = Duration::from_secs(120);
const RATE: u64 = 1_000_000_000;

#[test]
fn a_populated_guest_crosses_a_1_gbit_link_with_2_ms_rtt() {
    let test = "a_populated_guest_crosses_a_1_gbit_link_with_2_ms_rtt";
    if require_kvm(test).is_none() || !require_root(test) {
        return;
    }
    let (hosts, line) = TwoHosts::delayed("dline", RATE, Duration::from_millis(2));
    hosts.add_taps();
    let ping = hosts
        .a
        .run(&["ping", "-c", "5", "-i", "0.2", "-q", B_ADDR])
        .expect("ping across the delay line");
    let avg: f64 = ping
        .lines()
        .find_map(|l| l.split(" = ").nth(1))
        .and_then(|v| v.split('/').nth(1))
        .and_then(|v| v.parse().ok())
        .expect("ping's rtt line");
    assert!((1.9..6.0).contains(&avg), "RTT {avg} ms: {ping}");

    let cmdline = Cmdline::new()
        .identity(0, None, None, &format!("{GUEST_ADDR}/24"))
        .heartbeat_ms(100)
        .pattern(21, "128M");
    let mut spec = VmSpec::probe(&cmdline.build());
    spec.nets = vec![format!("tap={A_TAP}")];
    let src = FerryVm::spawn("dline-src", &spec, Some(&hosts.a));
    src.console.expect(READY, T);
    let mut dspec = VmSpec::incoming(&format!("tcp:{B_ADDR}:4444"));
    dspec.nets = vec![format!("tap={B_TAP}")];
    let dst = FerryVm::spawn("dline-dst", &dspec, Some(&hosts.b));
    for vm in [&src, &dst] {
        vm.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "multifd", "state": true }] }),
        )
        .expect("multifd");
    }
    migrate(&src, &format!("tcp:{B_ADDR}:4444"));
    let info = wait_migration(&src, T);
    assert_completed(&info, &src, &dst);
    assert_eq!(status(&src), "postmigrate");
    dst.console.assert_pattern_intact(T);
    let bytes = info["ram"]["transferred"].as_u64().unwrap_or(0) as f64;
    let total_s = info["total-time"].as_f64().unwrap_or(0.0) / 1e3;
    let at_link_rate = bytes * 8.0 / RATE as f64;
    assert!(
        total_s >= 0.9 * at_link_rate,
        "{bytes} bytes in {total_s} s: faster than the link ({at_link_rate} s)"
    );
    eprintln!(
        "1 Gbit/s, 2 ms RTT: {:.0} MB in {total_s:.2} s ({:.2}x bytes/link rate), downtime {} ms, {} frames dropped by the queue",
        bytes / 1e6,
        total_s / at_link_rate,
        info["downtime"],
        line.dropped.load(std::sync::atomic::Ordering::Relaxed)
    );
}
