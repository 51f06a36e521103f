//! Seccomp on a running VM: every thread filtered (`Seccomp: 2`) with
//! `no_new_privs`, on a guest that booted and on one that arrived by a
//! migration; a forbidden call stopped and reported in one line naming the
//! thread and the call; `--seccomp off` installs nothing.

use std::time::Duration;

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root, TempPath};
use ferry_tests::hosts::{
    assert_completed, migrate, wait_migration, TwoHosts, A_TAP, B_ADDR, B_TAP, GUEST_ADDR,
};
use ferry_tests::probe::heartbeat::wait_heartbeats;
use ferry_tests::probe::{Cmdline, READY};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

/// (thread name, Seccomp, NoNewPrivs, CapEff, Seccomp_filters) of every
/// thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String, String, String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((
            field("Name:"),
            field("Seccomp:"),
            field("NoNewPrivs:"),
            field("CapEff:"),
            field("Seccomp_filters:"),
        ));
    }
    out
}

fn assert_all_filtered(vm: &FerryVm, what: &str) {
    let all = threads(vm.pid());
    assert!(
        all.iter().any(|t| t.0.starts_with("ferry-vcpu")),
        "{what}: no vCPU thread in {all:?}"
    );
    for (name, seccomp, nnp, caps, _) in &all {
        assert_eq!(
            caps, "0000000000000000",
            "{what}: thread {name} kept capabilities: {all:?}"
        );
        assert_eq!(
            seccomp, "2",
            "{what}: thread {name} is not filtered: {all:?}"
        );
        assert_eq!(
            nnp, "1",
            "{what}: thread {name} lacks no_new_privs: {all:?}"
        );
    }
    // A vCPU narrows the process's filter with its own (and the one
    // that makes a file's open fail): two more than the event loop's.
    let filters = |name: &str| -> u32 {
        let t = all.iter().find(|t| t.0 == name);
        t.and_then(|t| t.4.parse().ok())
            .unwrap_or_else(|| panic!("{what}: no {name} thread in {all:?}"))
    };
    assert_eq!(
        filters("ferry-vcpu-0"),
        filters("ferry") + 2,
        "{what}: the vCPU's own filters: {all:?}"
    );
    eprintln!(
        "{what}: {} threads, all Seccomp 2, NoNewPrivs 1, no capabilities: {:?}",
        all.len(),
        all.iter().map(|t| (&t.0, &t.4)).collect::<Vec<_>>()
    );
}

fn spec(cmdline: &str, seccomp: &str) -> VmSpec {
    let mut spec = VmSpec::probe(cmdline);
    spec.memory = "128M".into();
    spec.extra = vec!["--seccomp".into(), seccomp.into()];
    spec
}

#[test]
fn every_thread_is_filtered_on_a_booted_and_an_arrived_vm() {
    let test = "every_thread_is_filtered_on_a_booted_and_an_arrived_vm";
    if require_kvm(test).is_none() || !require_root(test) {
        return;
    }
    let hosts = TwoHosts::new("seccomp");
    let cmdline = Cmdline::new()
        .identity(0, None, None, &format!("{GUEST_ADDR}/24"))
        .heartbeat_ms(50)
        .pattern(4, "16M");
    let mut src_spec = spec(&cmdline.build(), "on");
    src_spec.cpus = 2;
    src_spec.nets = vec![format!("tap={A_TAP}")];
    let src = FerryVm::spawn("seccomp-src", &src_spec, Some(&hosts.a));
    src.console.expect(READY, T);
    assert_all_filtered(&src, "booted");

    let mut dst_spec = VmSpec::incoming(&format!("tcp:{B_ADDR}:4444"));
    dst_spec.nets = vec![format!("tap={B_TAP}")];
    dst_spec.extra = vec!["--seccomp".into(), "on".into()];
    let dst = FerryVm::spawn("seccomp-dst", &dst_spec, Some(&hosts.b));
    // Waiting, before a source has sent a byte: already filtered.
    for (name, seccomp, nnp, ..) in threads(dst.pid()) {
        assert_eq!(
            (seccomp.as_str(), nnp.as_str()),
            ("2", "1"),
            "waiting: {name}"
        );
    }
    migrate(&src, &format!("tcp:{B_ADDR}:4444"));
    let info = wait_migration(&src, T);
    assert_completed(&info, &src, &dst);
    wait_heartbeats(&dst.console, 3, T);
    dst.console.assert_pattern_intact(T);
    assert_all_filtered(&dst, "arrived");
    // The source made its migration under the filter, and runs on to
    // answer QMP; a snapshot of the arrived guest, restored, is filtered
    // too (its file's lease has a thread of its own).
    assert_eq!(
        src.execute("query-status", json!({})).expect("status")["status"],
        "postmigrate"
    );
    let file = TempPath::new("seccomp.fm");
    migrate(&dst, &format!("file:{}", file.display()));
    assert_eq!(wait_migration(&dst, T)["status"], "completed");
    drop(dst);
    let mut spec = VmSpec::incoming(&format!("file:{}", file.display()));
    spec.nets = vec![format!("tap={B_TAP}")];
    spec.extra = vec!["--seccomp".into(), "on".into()];
    let restored = FerryVm::spawn("seccomp-restored", &spec, Some(&hosts.b));
    ferry_tests::hosts::wait_status(&restored, "running", T);
    restored.console.assert_pattern_intact(T);
    assert_all_filtered(&restored, "restored");
}

#[test]
fn a_forbidden_call_stops_ferry_with_one_line_naming_it() {
    let test = "a_forbidden_call_stops_ferry_with_one_line_naming_it";
    if require_kvm(test).is_none() {
        return;
    }
    let mut vm = FerryVm::spawn("seccomp-trap", &spec("probe.heartbeat=50", "on"), None);
    vm.console.expect(READY, T);
    // The call is made on the event loop's thread, while it handles QMP:
    // no reply comes.
    let _ = vm.execute("x-ferry-seccomp-trigger", json!({}));
    let status = vm.wait(T);
    let err = vm.stderr();
    assert_eq!(status.code(), Some(128 + 31), "{err}");
    assert!(
        err.contains(
            "ferry: seccomp: thread 'ferry' made a forbidden system call: getpgrp (111); stopping"
        ),
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.contains("seccomp")).count(),
        1,
        "{err}"
    );
}

#[test]
fn seccomp_off_installs_nothing() {
    let test = "seccomp_off_installs_nothing";
    if require_kvm(test).is_none() {
        return;
    }
    let vm = FerryVm::spawn("seccomp-off", &spec("probe.heartbeat=50", "off"), None);
    vm.console.expect(READY, T);
    assert!(threads(vm.pid()).iter().all(|t| t.1 == "0"));
    vm.execute("x-ferry-seccomp-trigger", json!({}))
        .expect("the call is allowed");
    assert_eq!(
        vm.execute("query-status", json!({})).expect("status")["status"],
        "running"
    );
}
