//! Live migration, snapshot and restore with the probe guest between two
//! network-namespace "hosts" joined by a veth, over real TCP.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root, TempPath};
use ferry_tests::hosts::{
    assert_completed, migrate, status, wait_migration, wait_status, TwoHosts, A_TAP, B_ADDR, B_TAP,
    GUEST_ADDR,
};
use ferry_tests::netns::Netns;
use ferry_tests::probe::heartbeat::{heartbeats, wait_heartbeats};
use ferry_tests::probe::{Cmdline, READY};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn can_run(test: &str) -> bool {
    require_kvm(test).is_some() && require_root(test)
}

fn probe_cmdline() -> Cmdline {
    Cmdline::new()
        .identity(0, None, None, &format!("{GUEST_ADDR}/24"))
        .heartbeat_ms(100)
        .pattern(1234, "64M")
        .dirty("8M", "16M")
}

fn source(test: &str, ns: &Netns, memory: &str) -> FerryVm {
    let mut spec = VmSpec::probe(&probe_cmdline().build());
    spec.memory = memory.into();
    spec.nets = vec![format!("tap={A_TAP}")];
    let vm = FerryVm::spawn(test, &spec, Some(ns));
    vm.console.expect(READY, T);
    vm.console.expect_seen("probe: pattern written");
    vm
}

/// `ferry run --incoming URI` in `ns` with this host's TAP.
fn destination(test: &str, ns: &Netns, uri: &str, extra: &[&str]) -> FerryVm {
    let mut spec = VmSpec::incoming(uri);
    spec.nets = vec![format!("tap={B_TAP}")];
    spec.extra = extra.iter().map(|s| s.to_string()).collect();
    FerryVm::spawn(test, &spec, Some(ns))
}

fn ping(ns: &Netns, addr: &str) -> bool {
    ns.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", addr])
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The guest after a move: its heartbeat went on from where it was (no
/// reboot), its pattern is intact, its NIC works on the new host.
fn assert_moved_intact(dst: &FerryVm, last_on_source: (u64, u64), ns: &Netns) {
    let after = wait_heartbeats(&dst.console, 3, T);
    let (n, up) = after[0];
    assert!(
        n > last_on_source.0 && n <= last_on_source.0 + 30,
        "heartbeat restarted: {after:?} after {last_on_source:?}"
    );
    assert!(
        up > last_on_source.1,
        "uptime went back: {after:?} after {last_on_source:?}"
    );
    dst.console.assert_pattern_intact(T);
    assert!(
        ping(ns, GUEST_ADDR),
        "no ping on the new host; console:\n{}",
        dst.console.output()
    );
    let counters = dst.console.send_command("counters 0", T);
    assert_eq!(
        counters.number("malformed"),
        Some(0),
        "{:?}",
        counters.lines
    );
    assert!(
        !dst.console.output().contains("probe: error"),
        "{}",
        dst.console.output()
    );
}

#[test]
fn live_migration_between_two_hosts_with_traffic_flowing() {
    let test = "live_migration_between_two_hosts_with_traffic_flowing";
    if !can_run(test) {
        return;
    }
    let hosts = TwoHosts::new("live");
    let src = source("live-src", &hosts.a, "512M");
    let dst = destination("live-dst", &hosts.b, &format!("tcp:{B_ADDR}:4444"), &[]);
    wait_heartbeats(&src.console, 3, T);

    // UDP into the guest the whole time: the device writes rx buffers and
    // used rings while memory is being sent.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        hosts.a.spawn_in(move || {
            let sock = UdpSocket::bind("198.18.0.1:0").unwrap();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = sock.send_to(&sent.to_le_bytes().repeat(64), format!("{GUEST_ADDR}:9"));
                sent += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    migrate(&src, &format!("tcp:{B_ADDR}:4444"));
    let info = wait_migration(&src, T);
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap().unwrap();
    assert_completed(&info, &src, &dst);
    assert!(
        sent > 100,
        "traffic flowed during the migration ({sent} datagrams)"
    );
    assert_eq!(status(&src), "postmigrate");
    assert_eq!(status(&dst), "running");
    let last = *heartbeats(&src.console)
        .last()
        .expect("heartbeats on the source");
    assert_moved_intact(&dst, last, &hosts.b);
    let sunk = dst
        .console
        .send_command("counters 0", T)
        .number("udp_sink_frames")
        .unwrap_or(0);
    assert!(sunk > 0, "the guest received the UDP stream");

    // The source stays in postmigrate until told to quit (or, as libvirt
    // does when the destination fails, `cont`: see orchestrated.rs).
    let err = src
        .execute("migrate", json!({}))
        .expect_err("migrate without a uri");
    assert!(
        err.to_string().contains("Parameter 'uri' is missing"),
        "{err}"
    );
    assert_eq!(status(&src), "postmigrate");
    let mut src = src;
    src.execute("quit", json!({})).expect("quit");
    assert_eq!(src.wait(T).code(), Some(0));
}

#[test]
fn snapshot_then_restore_twice_into_new_processes() {
    let test = "snapshot_then_restore_twice_into_new_processes";
    if !can_run(test) {
        return;
    }
    let hosts = TwoHosts::new("snap");
    let src = source("snap-src", &hosts.a, "256M");
    wait_heartbeats(&src.console, 3, T);
    let file = TempPath::new("snapshot.fm");
    migrate(&src, &format!("file:{}", file.display()));
    let info = wait_migration(&src, T);
    assert_eq!(info["status"], "completed", "{info}");
    // The source paused for the save and runs on.
    assert_eq!(status(&src), "running");
    let at_snapshot = *heartbeats(&src.console).last().unwrap();
    let before = heartbeats(&src.console).len();
    wait_heartbeats(&src.console, before + 2, T);

    let other = Netns::new("snap2").expect("netns");
    other.add_tap(B_TAP).unwrap();
    other.add_addr(B_TAP, "198.18.0.1/24").unwrap();
    for (ns, name) in [(&hosts.b, "restore-1"), (&other, "restore-2")] {
        let dst = destination(name, ns, &format!("file:{}", file.display()), &[]);
        wait_status(&dst, "running", T);
        // Restored at the moment of the snapshot: the heartbeat continues
        // from there.
        assert_moved_intact(
            &dst,
            (
                at_snapshot.0.saturating_sub(1),
                at_snapshot.1.saturating_sub(200),
            ),
            ns,
        );
    }
}

#[test]
fn a_running_guest_is_snapshotted_live() {
    let test = "a_running_guest_is_snapshotted_live";
    if require_kvm(test).is_none() {
        return;
    }
    let mut spec = VmSpec::probe(&Cmdline::new().heartbeat_ms(20).pattern(8, "32M").build());
    spec.memory = "128M".into();
    let vm = FerryVm::spawn("snaplive", &spec, None);
    vm.console.expect("probe: pattern written", T);
    // 16 MB/s: the save takes about two seconds, which the guest runs
    // through.
    vm.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 16 << 20 }),
    )
    .expect("parameters");
    let file = TempPath::new("snaplive.fm");
    migrate(&vm, &format!("file:{}", file.display()));
    let during = heartbeats(&vm.console).len();
    std::thread::sleep(Duration::from_millis(1000));
    let mut c = vm.qmp();
    let info = c.execute("query-migrate", None).expect("query-migrate");
    assert_eq!(info["status"], "active", "{info}");
    assert_eq!(status(&vm), "running");
    assert!(
        heartbeats(&vm.console).len() >= during + 10,
        "the guest did not run during the save"
    );
    let info = wait_migration(&vm, T);
    assert_eq!(info["status"], "completed", "{info}");
    assert!(
        info["downtime"].as_u64().is_some_and(|d| d < 500),
        "stopped for the whole save: {info}"
    );
    assert_eq!(status(&vm), "running");

    let restored = FerryVm::spawn(
        "snaplive-restore",
        &VmSpec::incoming(&format!("file:{}", file.display())),
        None,
    );
    wait_status(&restored, "running", T);
    restored.console.assert_pattern_intact(T);
}

#[test]
fn a_power_button_press_travels_with_a_snapshot() {
    let test = "a_power_button_press_travels_with_a_snapshot";
    if require_kvm(test).is_none() {
        return;
    }
    let cmdline = format!(
        "probe.heartbeat=50 probe.ged={:#x},{}",
        vmm::layout::GED_START,
        vmm::layout::GED_IRQ
    );
    let mut spec = VmSpec::probe(&cmdline);
    spec.memory = "64M".into();
    let vm = FerryVm::spawn("ged-src", &spec, None);
    vm.console.expect(READY, T);
    // Pressed while paused: the guest has not taken it when it is saved.
    vm.execute("stop", json!({})).expect("stop");
    vm.execute("system_powerdown", json!({}))
        .expect("system_powerdown");
    let file = TempPath::new("ged.fm");
    migrate(&vm, &format!("file:{}", file.display()));
    assert_eq!(wait_migration(&vm, T)["status"], "completed");
    drop(vm);

    let mut restored = FerryVm::spawn(
        "ged-restore",
        &VmSpec::incoming(&format!("file:{}", file.display())),
        None,
    );
    // Saved paused, restored paused (the stream's global state): the
    // press is taken once the guest runs again.
    wait_status(&restored, "paused", T);
    restored.execute("cont", json!({})).expect("cont");
    restored.console.expect("probe: power button", T);
    assert_eq!(restored.wait(T).code(), Some(0), "{}", restored.stderr());
}
