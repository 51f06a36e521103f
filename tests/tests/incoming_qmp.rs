//! The destination's QMP socket answers while the VM arrives (runstate
//! `inmigrate`, as in QEMU), its connections carry over to the running
//! VM, and `quit` before anything arrived ends the process cleanly.

use std::time::Duration;

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::require_kvm;
use ferry_tests::hosts::{migrate, wait_migration};
use ferry_tests::probe::heartbeat::{last_heartbeat, wait_heartbeat_beyond};
use ferry_tests::probe::{Cmdline, READY};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn socket_path(test: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("ferry-{test}-{}.sock", std::process::id()))
}

#[test]
fn qmp_answers_while_the_vm_arrives_and_stays_connected() {
    let test = "qmp_answers_while_the_vm_arrives_and_stays_connected";
    if require_kvm(test).is_none() {
        return;
    }
    let path = socket_path("arrive");
    let uri = format!("unix:{}", path.display());
    let dst = FerryVm::spawn("arrive-dst", &VmSpec::incoming(&uri), None);
    let mut client = dst.qmp();
    let status = client.execute("query-status", None).expect("query-status");
    assert_eq!(status["status"], "inmigrate", "{status}");
    assert_eq!(status["running"], false);
    let err = client
        .execute("query-cpus-fast", None)
        .expect_err("no VM yet");
    assert!(
        err.to_string().contains("GenericError") && err.to_string().contains("inmigrate"),
        "{err}"
    );

    let mut spec = VmSpec::probe(&Cmdline::new().heartbeat_ms(50).build());
    spec.memory = "64M".into();
    let src = FerryVm::spawn("arrive-src", &spec, None);
    src.console.expect(READY, T);
    migrate(&src, &uri);
    let info = wait_migration(&src, T);
    assert_eq!(info["status"], "completed", "{info}\n{}", dst.stderr());

    // The same connection, now answered by the VM.
    client
        .wait_for_event("RESUME")
        .expect("RESUME on the early client");
    let status = client.execute("query-status", None).expect("query-status");
    assert_eq!(status["status"], "running", "{status}");
    dst.console.expect("probe: heartbeat", T);
    let cpus = client
        .execute("query-cpus-fast", None)
        .expect("query-cpus-fast");
    assert_eq!(cpus.as_array().map(Vec::len), Some(1), "{cpus}");
}

#[test]
fn quit_while_arriving_ends_the_destination_cleanly() {
    let test = "quit_while_arriving_ends_the_destination_cleanly";
    if require_kvm(test).is_none() {
        return;
    }
    let path = socket_path("quit");
    let uri = format!("unix:{}", path.display());
    let mut dst = FerryVm::spawn("quit-dst", &VmSpec::incoming(&uri), None);
    assert!(path.exists(), "the migration socket is there");
    let mut watcher = dst.qmp();
    let reply = dst.execute("quit", json!({})).expect("quit");
    assert_eq!(reply, json!({}));
    let shutdown = watcher.wait_for_event("SHUTDOWN").expect("SHUTDOWN");
    assert_eq!(
        shutdown.data,
        Some(json!({ "guest": false, "reason": "host-qmp-quit" }))
    );
    assert_eq!(dst.wait(T).code(), Some(0), "{}", dst.stderr());
    assert!(!path.exists(), "the migration socket was left behind");
    assert!(!dst.qmp_path().exists(), "the QMP socket was left behind");
}

#[test]
fn quit_mid_stream_gives_up_and_the_source_runs_on() {
    let test = "quit_mid_stream_gives_up_and_the_source_runs_on";
    if require_kvm(test).is_none() {
        return;
    }
    let path = socket_path("quitmid");
    let uri = format!("unix:{}", path.display());
    let mut dst = FerryVm::spawn("quitmid-dst", &VmSpec::incoming(&uri), None);
    let mut spec = VmSpec::probe(&Cmdline::new().heartbeat_ms(50).pattern(3, "32M").build());
    spec.memory = "128M".into();
    let src = FerryVm::spawn("quitmid-src", &spec, None);
    src.console.expect("probe: pattern written", T);
    // 4 MB/s: the 32 MiB pattern alone keeps the stream going for seconds.
    src.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 4 << 20 }),
    )
    .expect("parameters");
    migrate(&src, &uri);
    let mut c = src.qmp();
    loop {
        let info = c.execute("query-migrate", None).expect("query-migrate");
        if info["ram"]["transferred"].as_u64().unwrap_or(0) > 1 << 20 {
            break;
        }
        assert!(
            info["status"] == "setup" || info["status"] == "active",
            "{info}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        dst.execute("query-status", json!({}))
            .expect("query-status")["status"],
        "inmigrate"
    );
    dst.execute("quit", json!({})).expect("quit");
    assert_eq!(dst.wait(T).code(), Some(0), "{}", dst.stderr());
    let info = wait_migration(&src, T);
    assert_eq!(info["status"], "failed", "{info}");
    let status = src
        .execute("query-status", json!({}))
        .expect("query-status");
    assert_eq!(status["status"], "running", "{status}");
    let n = last_heartbeat(&src.console);
    wait_heartbeat_beyond(&src.console, n + 3, T);
    assert!(!path.exists(), "the migration socket was left behind");
}
