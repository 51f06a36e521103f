//! Ferry driven as libvirt drives QEMU (its QEMU driver's migration
//! conversation, qemu_migration.c): `-S -incoming defer` on the
//! destination, set-up over QMP on both ends, `migrate-incoming`, the
//! source's `pause-before-switchover` stop and `migrate-continue`, the
//! MIGRATION events on both ends, and the ways it ends — completed and
//! `cont` on the destination, cancelled at `pre-switchover`, the
//! destination lost after `completed` and the source resumed with `cont`.
//! The probe guest, real KVM, TCP between two namespace hosts.

use std::time::{Duration, Instant};

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root, TempPath};
use ferry_tests::hosts::{status, wait_status, TwoHosts, A_TAP, B_ADDR, B_TAP, GUEST_ADDR};
use ferry_tests::netns::Netns;
use ferry_tests::probe::heartbeat::{heartbeats, wait_heartbeats};
use ferry_tests::probe::{Cmdline, READY};
use qmp::client::{ClientError, QmpClient};
use qmp::QmpEvent;
use serde_json::{json, Map, Value};

const T: Duration = Duration::from_secs(60);

fn can_run(test: &str) -> bool {
    require_kvm(test).is_some() && require_root(test)
}

fn source(test: &str, ns: &Netns) -> FerryVm {
    let cmdline = Cmdline::new()
        .identity(0, None, None, &format!("{GUEST_ADDR}/24"))
        .heartbeat_ms(100)
        .pattern(77, "32M")
        .dirty("4M", "8M");
    let mut spec = VmSpec::probe(&cmdline.build());
    spec.nets = vec![format!("tap={A_TAP}")];
    let vm = FerryVm::spawn(test, &spec, Some(ns));
    vm.console.expect(READY, T);
    vm.console.expect_seen("probe: pattern written");
    vm
}

/// `ferry run -S -incoming defer` (QEMU's spelling, as libvirt passes it).
fn deferred_destination(test: &str, ns: &Netns) -> FerryVm {
    let mut spec = VmSpec::incoming("defer");
    spec.nets = vec![format!("tap={B_TAP}")];
    spec.paused = true;
    spec.qemu_spelling = true;
    FerryVm::spawn(test, &spec, Some(ns))
}

fn args(v: Value) -> Option<Map<String, Value>> {
    match v {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

fn run(qmp: &mut QmpClient, command: &str, arguments: Value) -> Value {
    qmp.execute(command, args(arguments))
        .unwrap_or_else(|e| panic!("{command}: {e}"))
}

fn refused(qmp: &mut QmpClient, command: &str, arguments: Value) -> String {
    match qmp.execute(command, args(arguments)) {
        Err(ClientError::Command(e)) => {
            assert_eq!(e.class.as_str(), "GenericError", "{command}: {e:?}");
            e.desc
        }
        other => panic!("{command} was not refused: {other:?}"),
    }
}

fn capabilities(names: &[&str]) -> Value {
    let list: Vec<Value> = names
        .iter()
        .map(|n| json!({ "capability": n, "state": true }))
        .collect();
    json!({ "capabilities": list })
}

/// MIGRATION events until (and with) one whose status is in `last`.
fn migration_statuses(qmp: &mut QmpClient, last: &[&str]) -> (Vec<String>, Vec<QmpEvent>) {
    let mut statuses = Vec::new();
    let mut all = Vec::new();
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        let e = qmp.next_event().expect("an event");
        all.push(e.clone());
        if e.event != "MIGRATION" {
            continue;
        }
        let s = e
            .data
            .as_ref()
            .map_or("", |d| d["status"].as_str().unwrap_or(""));
        statuses.push(s.to_string());
        if last.contains(&s) {
            return (statuses, all);
        }
    }
    panic!("no MIGRATION {last:?} within {T:?}: {statuses:?}");
}

fn passes(events: &[QmpEvent]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e.event == "MIGRATION_PASS")
        .filter_map(|e| e.data.as_ref()?["pass"].as_u64())
        .collect()
}

fn ping(ns: &Netns) -> bool {
    ns.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", GUEST_ADDR])
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Prepare on the destination as libvirt does; returns its QMP.
fn prepare(dst: &FerryVm, port: u16) -> QmpClient {
    let mut q = dst.qmp();
    let st = run(&mut q, "query-status", json!({}));
    assert_eq!(
        st,
        json!({"status": "inmigrate", "running": false, "singlestep": false})
    );
    assert_eq!(run(&mut q, "query-migrate", json!({})), json!({}));
    let caps = run(&mut q, "query-migrate-capabilities", json!({}));
    assert!(
        caps.to_string().contains("\"pause-before-switchover\""),
        "{caps}"
    );
    run(
        &mut q,
        "migrate-set-capabilities",
        capabilities(&["events", "pause-before-switchover"]),
    );
    let e = refused(
        &mut q,
        "migrate-set-capabilities",
        capabilities(&["postcopy-ram"]),
    );
    assert!(e.contains("'postcopy-ram'"), "{e}");
    run(
        &mut q,
        "migrate-set-parameters",
        json!({"tls-creds": "", "tls-hostname": "", "announce-rounds": 3}),
    );
    assert_eq!(
        run(&mut q, "query-migrate-parameters", json!({}))["announce-rounds"],
        3
    );
    run(
        &mut q,
        "object-add",
        json!({"qom-type": "authz-simple", "id": "auth0", "identity": "CN=src"}),
    );
    run(&mut q, "object-del", json!({"id": "auth0"}));
    let e = refused(&mut q, "migrate-incoming", json!({"uri": "bogus:1"}));
    assert!(e.contains("bogus"), "{e}");
    run(
        &mut q,
        "migrate-incoming",
        json!({"uri": format!("tcp:{B_ADDR}:{port}")}),
    );
    let e = refused(&mut q, "migrate-incoming", json!({"uri": "tcp:0:1"}));
    assert_eq!(e, "The incoming migration has already been started");
    // Listening, before the source connects: QEMU's socket-address.
    let mut listening = json!({});
    for _ in 0..500 {
        listening = run(&mut q, "query-migrate", json!({}));
        if listening != json!({}) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_eq!(
        listening,
        json!({"socket-address": [{"type": "inet", "host": B_ADDR, "port": port.to_string(), "ipv4": true}]})
    );
    q
}

/// Perform on the source up to the `pre-switchover` stop; returns its
/// QMP and the events so far.
fn perform_to_pre_switchover(src: &FerryVm, port: u16) -> (QmpClient, Vec<String>, Vec<QmpEvent>) {
    let mut q = src.qmp();
    run(
        &mut q,
        "migrate-set-capabilities",
        capabilities(&["events", "pause-before-switchover"]),
    );
    run(
        &mut q,
        "migrate-set-parameters",
        json!({"downtime-limit": 300, "max-bandwidth": 1u64 << 30}),
    );
    run(
        &mut q,
        "migrate",
        json!({"uri": format!("tcp:{B_ADDR}:{port}")}),
    );
    let (statuses, events) = migration_statuses(&mut q, &["pre-switchover", "failed"]);
    assert_eq!(
        statuses,
        ["setup", "active", "pre-switchover"],
        "{events:?}"
    );
    let info = run(&mut q, "query-migrate", json!({}));
    assert_eq!(info["status"], "pre-switchover", "{info}");
    let st = run(&mut q, "query-status", json!({}));
    assert_eq!(st["running"], false, "stopped at pre-switchover: {st}");
    (q, statuses, events)
}

#[test]
fn libvirts_conversation_with_pause_before_switchover() {
    let test = "libvirts_conversation_with_pause_before_switchover";
    if !can_run(test) {
        return;
    }
    let hosts = TwoHosts::new("lvok");
    let src = source("lvok-src", &hosts.a);
    let dst = deferred_destination("lvok-dst", &hosts.b);
    let mut dq = prepare(&dst, 4600);
    wait_heartbeats(&src.console, 3, T);

    let (mut sq, _, events) = perform_to_pre_switchover(&src, 4600);
    let passes = passes(&events);
    assert!(
        !passes.is_empty() && passes.windows(2).all(|w| w[1] == w[0] + 1),
        "MIGRATION_PASS 1, 2, ...: {passes:?}"
    );
    // The guest is stopped and nothing has been switched over yet.
    let e = refused(&mut sq, "migrate-continue", json!({"state": "active"}));
    assert_eq!(e, "Migration not in expected state: pre-switchover");
    assert_eq!(status(&dst), "inmigrate");
    run(
        &mut sq,
        "migrate-continue",
        json!({"state": "pre-switchover"}),
    );
    let (statuses, _) = migration_statuses(&mut sq, &["completed", "failed"]);
    assert_eq!(statuses, ["device", "completed"]);
    let info = run(&mut sq, "query-migrate", json!({}));
    for key in ["total-time", "downtime", "setup-time", "expected-downtime"] {
        assert!(info[key].is_u64(), "{key} in {info}");
    }
    for key in [
        "transferred",
        "remaining",
        "total",
        "duplicate",
        "normal",
        "normal-bytes",
        "dirty-pages-rate",
        "mbps",
        "dirty-sync-count",
        "page-size",
        "pages-per-second",
    ] {
        assert!(info["ram"][key].is_number(), "ram.{key} in {info}");
    }
    assert_eq!(
        run(&mut sq, "query-status", json!({}))["status"],
        "postmigrate"
    );

    // Finish: the destination saw active then completed, is stopped
    // (-S), and `cont` starts the guest where it left off.
    let (statuses, _) = migration_statuses(&mut dq, &["completed", "failed"]);
    assert_eq!(statuses, ["setup", "active", "completed"]);
    let st = run(&mut dq, "query-status", json!({}));
    assert_eq!(
        st,
        json!({"status": "paused", "running": false, "singlestep": false})
    );
    assert_eq!(
        run(&mut dq, "query-migrate", json!({}))["status"],
        "completed"
    );
    let last = *heartbeats(&src.console).last().expect("source heartbeats");
    run(&mut dq, "cont", json!({}));
    let after = wait_heartbeats(&dst.console, 2, T);
    assert!(after[0].0 > last.0, "{after:?} after {last:?}");
    dst.console.assert_pattern_intact(T);
    assert!(ping(&hosts.b), "no ping on the destination");
    // The destination's own `announce-rounds` (3, set before
    // migrate-incoming) governed its announce, not the source's 5.
    std::thread::sleep(Duration::from_millis(1000));
    let counters = dst.console.send_command("counters 0", T);
    assert_eq!(
        counters.number("announces"),
        Some(3),
        "{:?}",
        counters.lines
    );

    // Confirm: the source quits cleanly.
    let mut src = src;
    run(&mut sq, "quit", json!({}));
    assert_eq!(src.wait(T).code(), Some(0));
}

#[test]
fn migrate_cancel_at_pre_switchover_resumes_the_source() {
    let test = "migrate_cancel_at_pre_switchover_resumes_the_source";
    if !can_run(test) {
        return;
    }
    let hosts = TwoHosts::new("lvcan");
    let src = source("lvcan-src", &hosts.a);
    let dst = deferred_destination("lvcan-dst", &hosts.b);
    let mut dq = prepare(&dst, 4601);
    let (mut sq, _, _) = perform_to_pre_switchover(&src, 4601);
    let before = heartbeats(&src.console).len();
    run(&mut sq, "migrate_cancel", json!({}));
    let (statuses, _) = migration_statuses(&mut sq, &["cancelled", "failed", "completed"]);
    assert_eq!(statuses, ["cancelling", "cancelled"]);
    assert_eq!(run(&mut sq, "query-status", json!({}))["status"], "running");
    wait_heartbeats(&src.console, before + 3, T);
    assert!(ping(&hosts.a), "the resumed source answers");
    // The destination never got the end of the stream: it failed.
    let (statuses, _) = migration_statuses(&mut dq, &["completed", "failed"]);
    assert_eq!(statuses, ["setup", "active", "failed"]);
}

#[test]
fn destination_lost_after_completed_then_cont_on_the_source() {
    let test = "destination_lost_after_completed_then_cont_on_the_source";
    if !can_run(test) {
        return;
    }
    let hosts = TwoHosts::new("lvlost");
    let src = source("lvlost-src", &hosts.a);
    let dst = deferred_destination("lvlost-dst", &hosts.b);
    let _dq = prepare(&dst, 4602);
    let (mut sq, _, _) = perform_to_pre_switchover(&src, 4602);
    run(
        &mut sq,
        "migrate-continue",
        json!({"state": "pre-switchover"}),
    );
    let (statuses, _) = migration_statuses(&mut sq, &["completed", "failed"]);
    assert_eq!(statuses.last().map(String::as_str), Some("completed"));
    // libvirt's Finish failed: the destination is gone...
    drop(dst);
    let last = *heartbeats(&src.console).last().expect("heartbeats");
    // ...and Confirm resumes the source: postmigrate -> running.
    assert_eq!(
        run(&mut sq, "query-status", json!({}))["status"],
        "postmigrate"
    );
    run(&mut sq, "cont", json!({}));
    assert_eq!(run(&mut sq, "query-status", json!({}))["status"], "running");
    let after = wait_heartbeats(&src.console, heartbeats(&src.console).len() + 3, T);
    let now = *after.last().expect("heartbeats");
    assert!(now.0 > last.0 && now.1 > last.1, "{now:?} after {last:?}");
    src.console.assert_pattern_intact(T);
    assert!(ping(&hosts.a), "the resumed source answers ping");
}

#[test]
fn a_paused_guest_arrives_paused_and_a_snapshot_of_one_restores_paused() {
    let test = "a_paused_guest_arrives_paused_and_a_snapshot_of_one_restores_paused";
    if !can_run(test) {
        return;
    }
    let hosts = TwoHosts::new("lvpause");
    let src = source("lvpause-src", &hosts.a);
    wait_heartbeats(&src.console, 2, T);
    let mut sq = src.qmp();
    run(&mut sq, "stop", json!({}));
    let last = *heartbeats(&src.console).last().expect("heartbeats");

    // A snapshot of the paused guest, then a migration of it, to a
    // destination without -S.
    let file = TempPath::new("paused.fm");
    run(
        &mut sq,
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    ferry_tests::hosts::wait_migration(&src, T);
    assert_eq!(run(&mut sq, "query-status", json!({}))["status"], "paused");
    let mut spec = VmSpec::incoming(&format!("tcp:{B_ADDR}:4603"));
    spec.nets = vec![format!("tap={B_TAP}")];
    let dst = FerryVm::spawn("lvpause-dst", &spec, Some(&hosts.b));
    run(
        &mut sq,
        "migrate",
        json!({"uri": format!("tcp:{B_ADDR}:4603")}),
    );
    let info = ferry_tests::hosts::wait_migration(&src, T);
    assert_eq!(info["status"], "completed", "{info}");
    wait_status(&dst, "paused", T);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        dst.execute("query-status", json!({})).expect("status")["running"],
        false
    );
    assert!(
        heartbeats(&dst.console).is_empty(),
        "a paused guest ran on arrival"
    );
    dst.execute("cont", json!({})).expect("cont");
    let after = wait_heartbeats(&dst.console, 2, T);
    assert!(after[0].0 > last.0, "{after:?} after {last:?}");
    drop(dst);

    let other = Netns::new("lvpauser").expect("netns");
    other.add_tap(B_TAP).unwrap();
    other.add_addr(B_TAP, "198.18.0.1/24").unwrap();
    let mut spec = VmSpec::incoming(&format!("file:{}", file.display()));
    spec.nets = vec![format!("tap={B_TAP}")];
    let restored = FerryVm::spawn("lvpause-restore", &spec, Some(&other));
    wait_status(&restored, "paused", T);
    std::thread::sleep(Duration::from_millis(500));
    assert!(heartbeats(&restored.console).is_empty());
    restored.execute("cont", json!({})).expect("cont");
    wait_heartbeats(&restored.console, 2, T);
}

#[test]
fn nic_rx_filter_changed_once_until_query_rx_filter() {
    let test = "nic_rx_filter_changed_once_until_query_rx_filter";
    if !can_run(test) {
        return;
    }
    let hosts = TwoHosts::new("lvrxf");
    let src = source("lvrxf-src", &hosts.a);
    let mut q = src.qmp();
    // The probe programmed its filter at boot, before anyone listened:
    // that change used the one event. Asking re-arms it.
    run(&mut q, "query-rx-filter", json!({}));
    q.take_events();
    let add = |mac: &str, ip: &str| {
        let r = src
            .console
            .send_command(&format!("id-add 0 {mac} 200 {ip}/24"), T);
        assert!(r.error.is_none(), "{:?} {:?}", r.error, r.lines);
    };
    add("02:00:00:00:02:01", "198.18.200.2");
    let e = q.wait_for_event("NIC_RX_FILTER_CHANGED").expect("event");
    let data = e.data.expect("data");
    assert_eq!(
        data["path"],
        format!(
            "/machine/peripheral/{}",
            data["name"].as_str().unwrap_or("")
        )
    );
    // A second change before anyone asked: no event.
    add("02:00:00:00:02:02", "198.18.200.3");
    std::thread::sleep(Duration::from_millis(300));
    run(&mut q, "query-status", json!({}));
    assert!(
        !q.take_events()
            .iter()
            .any(|e| e.event == "NIC_RX_FILTER_CHANGED"),
        "a second NIC_RX_FILTER_CHANGED before query-rx-filter"
    );
    let filter = run(&mut q, "query-rx-filter", json!({}));
    assert!(filter.to_string().contains("02:00:00:00:02:02"), "{filter}");
    add("02:00:00:00:02:03", "198.18.200.4");
    q.wait_for_event("NIC_RX_FILTER_CHANGED")
        .expect("re-armed event");
}
