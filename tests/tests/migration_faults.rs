//! Failed migrations leave the source guest running and responsive:
//! destination killed mid-stream, destination refusing the configuration,
//! the link dropped, `migrate_cancel`, and a guest that dirties memory
//! faster than the link carries it.

use std::time::{Duration, Instant};

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root};
use ferry_tests::hosts::{
    migrate, status, wait_migration, TwoHosts, A_TAP, B_ADDR, B_TAP, GUEST_ADDR,
};
use ferry_tests::netns::Netns;
use ferry_tests::probe::heartbeat::last_heartbeat;
use ferry_tests::probe::{Cmdline, READY};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

fn can_run(test: &str) -> bool {
    require_kvm(test).is_some() && require_root(test)
}

fn source(test: &str, ns: &Netns, dirty: Option<(&str, &str)>) -> FerryVm {
    let mut cmdline = Cmdline::new()
        .identity(0, None, None, &format!("{GUEST_ADDR}/24"))
        .heartbeat_ms(100)
        .pattern(99, "32M");
    if let Some((rate, size)) = dirty {
        cmdline = cmdline.dirty(rate, size);
    }
    let mut spec = VmSpec::probe(&cmdline.build());
    spec.nets = vec![format!("tap={A_TAP}")];
    let vm = FerryVm::spawn(test, &spec, Some(ns));
    vm.console.expect(READY, T);
    vm
}

fn destination(test: &str, ns: &Netns, extra: &[&str]) -> FerryVm {
    let mut spec = VmSpec::incoming(&format!("tcp:{B_ADDR}:4444"));
    spec.nets = vec![format!("tap={B_TAP}")];
    spec.extra = extra.iter().map(|s| s.to_string()).collect();
    FerryVm::spawn(test, &spec, Some(ns))
}

/// The source guest runs on after a failed migration: running state,
/// heartbeat advancing, answering ping, pattern intact.
fn assert_source_unharmed(vm: &FerryVm, ns: &Netns) {
    assert_eq!(status(vm), "running", "stderr: {}", vm.stderr());
    let n = last_heartbeat(&vm.console);
    let deadline = Instant::now() + Duration::from_secs(10);
    while last_heartbeat(&vm.console) <= n + 2 {
        assert!(Instant::now() < deadline, "heartbeat stuck at {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ping = ns
        .exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", GUEST_ADDR])
        .unwrap();
    assert!(
        ping.status.success(),
        "the source guest stopped answering ping"
    );
    vm.console.assert_pattern_intact(T);
}

fn slow_down(vm: &FerryVm, bytes_per_sec: u64) {
    vm.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": bytes_per_sec }),
    )
    .expect("parameters");
}

fn assert_failed(info: &Value, words: &[&str]) {
    assert_eq!(info["status"], "failed", "{info}");
    let desc = info["error-desc"].as_str().unwrap_or("");
    for w in words {
        assert!(desc.contains(w), "error {desc:?} should mention {w:?}");
    }
}

#[test]
fn destination_killed_mid_stream() {
    if !can_run("destination_killed_mid_stream") {
        return;
    }
    let hosts = TwoHosts::new("kill");
    let src = source("kill-src", &hosts.a, None);
    let dst = destination("kill-dst", &hosts.b, &[]);
    slow_down(&src, 16 << 20);
    migrate(&src, &format!("tcp:{B_ADDR}:4444"));
    std::thread::sleep(Duration::from_millis(700));
    drop(dst); // SIGKILL
    let info = wait_migration(&src, T);
    assert_eq!(info["status"], "failed", "{info}");
    assert_source_unharmed(&src, &hosts.a);
}

#[test]
fn destination_refuses_the_configuration() {
    if !can_run("destination_refuses_the_configuration") {
        return;
    }
    let hosts = TwoHosts::new("refuse");
    let src = source("refuse-src", &hosts.a, None);
    let mut dst = destination("refuse-dst", &hosts.b, &["--memory", "1G"]);
    migrate(&src, &format!("tcp:{B_ADDR}:4444"));
    let info = wait_migration(&src, T);
    assert_failed(&info, &["refused", "--memory 1G"]);
    assert_source_unharmed(&src, &hosts.a);
    let status = dst.wait(T);
    assert_eq!(status.code(), Some(1));
    let err = dst.stderr();
    assert!(
        err.trim_end().lines().count() == 1 && err.contains("--memory 1G disagrees"),
        "{err}"
    );
}

#[test]
fn link_dropped_mid_stream() {
    if !can_run("link_dropped_mid_stream") {
        return;
    }
    let hosts = TwoHosts::new("link");
    let src = source("link-src", &hosts.a, None);
    let _dst = destination("link-dst", &hosts.b, &[]);
    slow_down(&src, 16 << 20);
    migrate(&src, &format!("tcp:{B_ADDR}:4444"));
    std::thread::sleep(Duration::from_millis(700));
    hosts.a.run(&["ip", "link", "set", "vha", "down"]).unwrap();
    let info = wait_migration(&src, T);
    assert_eq!(info["status"], "failed", "{info}");
    assert_source_unharmed(&src, &hosts.a);
}

#[test]
fn migrate_cancel_mid_way() {
    if !can_run("migrate_cancel_mid_way") {
        return;
    }
    let hosts = TwoHosts::new("cancel");
    let src = source("cancel-src", &hosts.a, None);
    let _dst = destination("cancel-dst", &hosts.b, &[]);
    slow_down(&src, 16 << 20);
    // MIGRATION events come with the `events` capability, as in QEMU.
    src.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "events", "state": true }] }),
    )
    .expect("events capability");
    let mut events = src.qmp();
    migrate(&src, &format!("tcp:{B_ADDR}:4444"));
    std::thread::sleep(Duration::from_millis(500));
    src.execute("migrate_cancel", json!({}))
        .expect("migrate_cancel");
    let info = wait_migration(&src, T);
    assert_eq!(info["status"], "cancelled", "{info}");
    // MIGRATION events told every step.
    let mut seen = Vec::new();
    while !seen.contains(&"cancelled".to_string()) {
        let ev = events.wait_for_event("MIGRATION").expect("MIGRATION event");
        seen.push(
            ev.data
                .and_then(|d| d["status"].as_str().map(str::to_string))
                .unwrap_or_default(),
        );
    }
    assert_eq!(seen, ["setup", "active", "cancelling", "cancelled"]);
    assert_source_unharmed(&src, &hosts.a);
}

#[test]
fn a_guest_dirtying_faster_than_the_link_fails_clearly_and_runs_on() {
    if !can_run("a_guest_dirtying_faster_than_the_link_fails_clearly_and_runs_on") {
        return;
    }
    let hosts = TwoHosts::new("dirty");
    let src = source("dirty-src", &hosts.a, Some(("64M", "64M")));
    let _dst = destination("dirty-dst", &hosts.b, &[]);
    // Auto-converge (on by default) starts at the harshest throttle, so
    // one left behind would show: the guest would run 1% of the time.
    src.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 8 << 20, "x-max-passes": 3, "downtime-limit": 10,
                "cpu-throttle-initial": 99 }),
    )
    .expect("parameters");
    migrate(&src, &format!("tcp:{B_ADDR}:4444"));
    let info = wait_migration(&src, T);
    assert_failed(
        &info,
        &[
            "did not converge after 3 passes",
            "MB/s",
            "throttled by 99%",
        ],
    );
    assert_source_unharmed(&src, &hosts.a);
    // Heartbeats every 100 ms at full speed: 10 of them in well under the
    // 100 s a 99% throttle would take.
    let n = last_heartbeat(&src.console);
    let t0 = Instant::now();
    while last_heartbeat(&src.console) < n + 10 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the guest still runs throttled after the failed migration"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
