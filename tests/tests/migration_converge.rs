//! A guest that dirties memory faster than the link carries it: with
//! auto-converge off the migration gives up and the guest runs on; with
//! it (Ferry's default) the vCPUs are throttled until the passes shrink,
//! the migration completes within the downtime limit and the guest moves
//! intact.

use std::time::{Duration, Instant};

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root};
use ferry_tests::hosts::{
    assert_completed, migrate, status, wait_migration, TwoHosts, A_TAP, B_ADDR, B_TAP, GUEST_ADDR,
};
use ferry_tests::probe::heartbeat::{heartbeats, last_heartbeat, wait_heartbeats};
use ferry_tests::probe::{Cmdline, READY};
use serde_json::json;

const T: Duration = Duration::from_secs(60);
/// Small enough that the whole dirty region (16 MiB) never fits it at the
/// rate a debug build sends over a veth (~150 MB/s; a release build
/// ~1 GB/s): without a throttle this guest cannot converge.
const DOWNTIME_LIMIT_MS: u64 = 10;

fn destination(test: &str, hosts: &TwoHosts, port: u16) -> FerryVm {
    let mut spec = VmSpec::incoming(&format!("tcp:{B_ADDR}:{port}"));
    spec.nets = vec![format!("tap={B_TAP}")];
    FerryVm::spawn(test, &spec, Some(&hosts.b))
}

fn set_auto_converge(vm: &FerryVm, on: bool) {
    vm.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "auto-converge", "state": on }] }),
    )
    .expect("migrate-set-capabilities");
    let caps = vm
        .execute("query-migrate-capabilities", json!({}))
        .expect("query-migrate-capabilities");
    assert_eq!(
        caps[0],
        json!({ "capability": "auto-converge", "state": on }),
        "{caps}"
    );
}

#[test]
fn an_unconverging_guest_fails_unthrottled_and_moves_throttled() {
    let test = "an_unconverging_guest_fails_unthrottled_and_moves_throttled";
    if require_kvm(test).is_none() || !require_root(test) {
        return;
    }
    let hosts = TwoHosts::new("conv");
    let cmdline = Cmdline::new()
        .identity(0, None, None, &format!("{GUEST_ADDR}/24"))
        .heartbeat_ms(100)
        .pattern(77, "16M")
        .dirty("max", "16M");
    let mut spec = VmSpec::probe(&cmdline.build());
    spec.nets = vec![format!("tap={A_TAP}")];
    let src = FerryVm::spawn("conv-src", &spec, Some(&hosts.a));
    src.console.expect(READY, T);
    src.console.expect_seen("probe: pattern written");
    wait_heartbeats(&src.console, 2, T);
    src.execute(
        "migrate-set-parameters",
        json!({ "downtime-limit": DOWNTIME_LIMIT_MS, "x-max-passes": 8 }),
    )
    .expect("parameters");

    // Auto-converge off: the guest outruns every pass. The link is
    // capped well below the guest's dirtying rate (~200 MB/s here): an
    // uncapped link on a fast host carries 16 MiB a pass quicker than the
    // guest rewrites it, and then it would converge after all.
    set_auto_converge(&src, false);
    src.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 32 << 20 }),
    )
    .expect("parameters");
    let _first = destination("conv-dst1", &hosts, 4444);
    migrate(&src, &format!("tcp:{B_ADDR}:4444"));
    let info = wait_migration(&src, T);
    assert_eq!(info["status"], "failed", "{info}");
    let desc = info["error-desc"].as_str().unwrap_or("");
    assert!(
        desc.contains("did not converge after 8 passes") && desc.contains("auto-converge off"),
        "{desc}"
    );
    assert!(info.get("cpu-throttle-percentage").is_none(), "{info}");
    assert_eq!(status(&src), "running");
    let n = last_heartbeat(&src.console);
    let deadline = Instant::now() + T;
    while last_heartbeat(&src.console) < n + 2 {
        assert!(Instant::now() < deadline, "heartbeat stuck at {n}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // On: the throttle shrinks the passes until the rest fits the limit.
    set_auto_converge(&src, true);
    src.execute(
        "migrate-set-parameters",
        json!({ "x-max-passes": 40, "cpu-throttle-increment": 20, "max-bandwidth": 0 }),
    )
    .expect("parameters");
    let dst = destination("conv-dst2", &hosts, 4445);
    migrate(&src, &format!("tcp:{B_ADDR}:4445"));
    let info = wait_migration(&src, T);
    assert_completed(&info, &src, &dst);
    let throttle = info["cpu-throttle-percentage"].as_u64().unwrap_or(0);
    assert!((1..=99).contains(&throttle), "throttled: {info}");
    assert_eq!(status(&dst), "running");
    let last = *heartbeats(&src.console).last().expect("heartbeats");
    let after = wait_heartbeats(&dst.console, 3, T);
    assert!(after[0].0 > last.0, "heartbeat restarted: {after:?}");
    dst.console.assert_pattern_intact(T);
    // The workload goes on where it was on the destination.
    let dirty = dst.console.send_command("workloads", T);
    assert!(
        dirty.lines.iter().any(|l| l.contains("dirty=on")),
        "{:?}",
        dirty.lines
    );
}
