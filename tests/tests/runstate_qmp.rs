//! Run states and QMP on a running probe guest: `stop` freezes it (its
//! heartbeat stops) and `cont` resumes it, every client sees STOP/RESUME,
//! `-S` holds it in prelaunch, bad input gets QMP errors and changes
//! nothing, `quit` reaches every client, and 1,000 pause/resume cycles
//! leave the guest healthy.

use std::time::Duration;

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::require_kvm;
use ferry_tests::probe::heartbeat::{last_heartbeat, wait_heartbeat_beyond};
use ferry_tests::probe::{BOOT, READY};
use qmp::client::ClientError;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

fn status(vm: &FerryVm) -> (String, bool) {
    let s = vm.execute("query-status", json!({})).expect("query-status");
    (
        s["status"].as_str().unwrap_or("").to_string(),
        s["running"].as_bool().unwrap_or(true),
    )
}

fn error_class(r: Result<Value, ClientError>) -> (String, String) {
    match r {
        Err(ClientError::Command(e)) => (e.class.as_str().to_string(), e.desc),
        other => panic!("expected a QMP error, got {other:?}"),
    }
}

#[test]
fn stop_freezes_the_guest_and_cont_resumes_it_for_every_client() {
    if require_kvm("stop_freezes_the_guest_and_cont_resumes_it_for_every_client").is_none() {
        return;
    }
    let vm = FerryVm::spawn("stopcont", &VmSpec::probe("probe.heartbeat=50"), None);
    vm.console.expect(READY, T);
    let mut a = vm.qmp();
    let mut b = vm.qmp();
    wait_heartbeat_beyond(&vm.console, 2, T);

    a.execute("stop", None).expect("stop");
    for client in [&mut a, &mut b] {
        client
            .wait_for_event("STOP")
            .expect("STOP reaches every client");
    }
    assert_eq!(status(&vm), ("paused".into(), false));
    let frozen = last_heartbeat(&vm.console);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        last_heartbeat(&vm.console),
        frozen,
        "no heartbeat while paused"
    );
    // stop when already paused is a no-op, as in QEMU.
    a.execute("stop", None).expect("second stop");

    b.execute("cont", None).expect("cont");
    for client in [&mut a, &mut b] {
        client
            .wait_for_event("RESUME")
            .expect("RESUME reaches every client");
    }
    assert_eq!(status(&vm), ("running".into(), true));
    wait_heartbeat_beyond(&vm.console, frozen, Duration::from_secs(5));
}

#[test]
fn paused_start_runs_nothing_until_cont() {
    if require_kvm("paused_start_runs_nothing_until_cont").is_none() {
        return;
    }
    let mut spec = VmSpec::probe("probe.heartbeat=100");
    spec.paused = true;
    let vm = FerryVm::spawn("prelaunch", &spec, None);
    assert_eq!(status(&vm), ("prelaunch".into(), false));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vm.console.output(), "", "the guest printed before cont");
    let mut c = vm.qmp();
    c.execute("cont", None).expect("cont");
    c.wait_for_event("RESUME").expect("RESUME");
    vm.console.expect(BOOT, T);
    vm.console.expect(READY, T);
    assert_eq!(status(&vm).0, "running");
}

#[test]
fn bad_input_gets_qmp_errors_and_the_vm_keeps_running() {
    if require_kvm("bad_input_gets_qmp_errors_and_the_vm_keeps_running").is_none() {
        return;
    }
    let vm = FerryVm::spawn("badqmp", &VmSpec::probe("probe.heartbeat=50"), None);
    vm.console.expect(READY, T);
    let mut c = vm.qmp();
    let mut raw = |bytes: &[u8]| -> Value {
        c.send_raw(bytes).expect("send");
        loop {
            let m = c.read_message().expect("reply");
            if m.get("event").is_none() {
                return m;
            }
        }
    };
    let invalid = raw(b"{\"execute\" 1}\n");
    assert_eq!(invalid["error"]["class"], "GenericError", "{invalid}");
    let not_object = raw(b"[1, 2, 3]\n");
    assert_eq!(not_object["error"]["class"], "GenericError", "{not_object}");
    let no_execute = raw(b"{\"arguments\": {}}\n");
    assert_eq!(no_execute["error"]["class"], "GenericError", "{no_execute}");
    let unknown = raw(b"{\"execute\": \"frobnicate\", \"id\": 7}\n");
    assert_eq!(unknown["error"]["class"], "CommandNotFound", "{unknown}");
    assert_eq!(unknown["id"], 7);

    let (class, desc) = error_class(vm.execute("stop", json!({"now": true})));
    assert_eq!(
        (class.as_str(), desc.as_str()),
        ("GenericError", "Parameter 'now' is unexpected")
    );
    let (class, desc) = error_class(vm.execute("query-rx-filter", json!({"name": 5})));
    assert_eq!(class, "GenericError");
    assert!(desc.contains("'name'") && desc.contains("string"), "{desc}");
    // QEMU 7.2's class and words.
    let (class, desc) = error_class(vm.execute("query-rx-filter", json!({"name": "nope"})));
    assert_eq!(
        (class.as_str(), desc.as_str()),
        ("GenericError", "invalid net client name: nope")
    );

    // The same connection still works, and the guest never stopped.
    assert_eq!(status(&vm), ("running".into(), true));
    let n = last_heartbeat(&vm.console);
    wait_heartbeat_beyond(&vm.console, n, Duration::from_secs(5));
}

#[test]
fn quit_reaches_every_client_and_ferry_exits_zero() {
    if require_kvm("quit_reaches_every_client_and_ferry_exits_zero").is_none() {
        return;
    }
    let mut vm = FerryVm::spawn("quit", &VmSpec::probe(""), None);
    vm.console.expect(READY, T);
    let mut a = vm.qmp();
    let mut b = vm.qmp();
    a.execute("quit", None).expect("quit");
    for client in [&mut a, &mut b] {
        let ev = client
            .wait_for_event("SHUTDOWN")
            .expect("SHUTDOWN reaches every client");
        assert_eq!(
            ev.data,
            Some(json!({"guest": false, "reason": "host-qmp-quit"}))
        );
    }
    let status = vm.wait(T);
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr());
}

#[test]
fn system_powerdown_presses_the_acpi_power_button() {
    if require_kvm("system_powerdown_presses_the_acpi_power_button").is_none() {
        return;
    }
    // The probe listens to the GED where Ferry puts it (Linux finds it in
    // the DSDT); paused first, so the press waits for a guest that runs.
    let ged = format!(
        "probe.heartbeat=50 probe.ged={:#x},{}",
        vmm::layout::GED_START,
        vmm::layout::GED_IRQ
    );
    let mut vm = FerryVm::spawn("powerdown", &VmSpec::probe(&ged), None);
    vm.console.expect(READY, T);
    let mut a = vm.qmp();
    let mut b = vm.qmp();
    a.execute("stop", None).expect("stop");
    assert_eq!(
        a.execute("system_powerdown", None)
            .expect("system_powerdown"),
        json!({})
    );
    for client in [&mut a, &mut b] {
        let ev = client
            .wait_for_event("POWERDOWN")
            .expect("POWERDOWN reaches every client");
        assert_eq!(ev.data, None);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !vm.console.output().contains("probe: power button"),
        "a paused guest saw the press"
    );
    a.execute("cont", None).expect("cont");
    vm.console.expect("probe: power button", T);
    for client in [&mut a, &mut b] {
        let ev = client.wait_for_event("SHUTDOWN").expect("SHUTDOWN");
        assert_eq!(
            ev.data,
            Some(json!({"guest": true, "reason": "guest-shutdown"}))
        );
    }
    assert_eq!(vm.wait(T).code(), Some(0), "stderr: {}", vm.stderr());
}

#[test]
fn a_thousand_pause_resume_cycles_leave_the_guest_healthy() {
    if require_kvm("a_thousand_pause_resume_cycles_leave_the_guest_healthy").is_none() {
        return;
    }
    let mut spec = VmSpec::probe("probe.heartbeat=20 probe.pattern=42,16M");
    spec.cpus = 2;
    let vm = FerryVm::spawn("cycles", &spec, None);
    vm.console.expect(READY, T);
    let mut c = vm.qmp();
    for i in 0..1000 {
        c.execute("stop", None)
            .unwrap_or_else(|e| panic!("stop #{i}: {e}"));
        c.execute("cont", None)
            .unwrap_or_else(|e| panic!("cont #{i}: {e}"));
    }
    assert_eq!(status(&vm), ("running".into(), true));
    let n = last_heartbeat(&vm.console);
    wait_heartbeat_beyond(&vm.console, n + 3, Duration::from_secs(10));
    let reply = vm.console.send_command("pattern-verify", T);
    assert_eq!(
        reply.field("bad_pages").as_deref(),
        Some("0"),
        "{:?}",
        reply.lines
    );
}
