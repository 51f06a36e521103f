//! Host resources come from the destination's own command line, never
//! from the stream: a NIC the stream carries without a `--net` here is
//! refused, naming the NIC and the option to add, and the TAP the source
//! used is not opened (nor created) here; the same for a snapshot file.

use std::time::Duration;

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root, TempPath};
use ferry_tests::hosts::{migrate, status, wait_migration, TwoHosts, A_TAP, B_ADDR, GUEST_ADDR};
use ferry_tests::netns::Netns;
use ferry_tests::probe::{Cmdline, READY};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn can_run(test: &str) -> bool {
    require_kvm(test).is_some() && require_root(test)
}

fn source(test: &str, ns: &Netns) -> FerryVm {
    let cmdline = Cmdline::new()
        .identity(0, None, None, &format!("{GUEST_ADDR}/24"))
        .heartbeat_ms(100)
        .pattern(5, "8M");
    let mut spec = VmSpec::probe(&cmdline.build());
    spec.memory = "64M".into();
    spec.nets = vec![format!("tap={A_TAP},id=uplink")];
    let vm = FerryVm::spawn(test, &spec, Some(ns));
    vm.console.expect(READY, T);
    vm
}

/// The line naming the NIC and what to add.
fn assert_names_the_nic(stderr: &str) {
    assert!(
        stderr.contains("NIC uplink") && stderr.contains("add --net tap=NAME,id=uplink"),
        "the refusal should name the NIC and the --net to add: {stderr}"
    );
}

fn has_link(ns: &Netns, name: &str) -> bool {
    ns.exec(&["ip", "link", "show", name])
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn a_stream_nic_without_a_net_here_is_refused_by_name() {
    let test = "a_stream_nic_without_a_net_here_is_refused_by_name";
    if !can_run(test) {
        return;
    }
    let hosts = TwoHosts::new("nicnet");
    let src = source("nicnet-src", &hosts.a);
    let mut dst = FerryVm::spawn(
        "nicnet-dst",
        &VmSpec::incoming(&format!("tcp:{B_ADDR}:4444")),
        Some(&hosts.b),
    );
    migrate(&src, &format!("tcp:{B_ADDR}:4444"));
    let info = wait_migration(&src, T);
    assert_eq!(info["status"], "failed", "{info}");
    assert!(
        info["error-desc"].as_str().unwrap_or("").contains("uplink"),
        "the source hears why: {info}"
    );
    assert_eq!(dst.wait(T).code(), Some(1));
    assert_names_the_nic(&dst.stderr());
    assert!(
        !has_link(&hosts.b, A_TAP),
        "the destination opened (and so created) the TAP the stream named"
    );
    assert_eq!(status(&src), "running", "the source runs on");
    src.console.assert_pattern_intact(T);
}

#[test]
fn a_snapshot_nic_without_a_net_here_is_refused_by_name() {
    let test = "a_snapshot_nic_without_a_net_here_is_refused_by_name";
    if !can_run(test) {
        return;
    }
    let hosts = TwoHosts::new("nicfile");
    let src = source("nicfile-src", &hosts.a);
    let file = TempPath::new("nicfile.fm");
    src.execute("stop", json!({})).expect("stop");
    migrate(&src, &format!("file:{}", file.display()));
    assert_eq!(wait_migration(&src, T)["status"], "completed");
    drop(src);
    // Restored on host B, where no TAP of that name exists. No QMP: the
    // refusal may come before its socket would.
    let mut spec = VmSpec::incoming(&format!("file:{}", file.display()));
    spec.qmp = false;
    let mut restored = FerryVm::spawn("nicfile-restore", &spec, Some(&hosts.b));
    assert_eq!(restored.wait(T).code(), Some(1));
    assert_names_the_nic(&restored.stderr());
    assert!(!has_link(&hosts.b, A_TAP), "the snapshot's TAP was opened");
    // With its --net, the same file restores.
    let mut spec = VmSpec::incoming(&format!("file:{}", file.display()));
    spec.nets = vec!["tap=tapb,id=uplink".into()];
    let restored = FerryVm::spawn("nicfile-restore2", &spec, Some(&hosts.b));
    ferry_tests::hosts::wait_status(&restored, "paused", T);
    restored.execute("cont", json!({})).expect("cont");
    restored.console.assert_pattern_intact(T);
}
