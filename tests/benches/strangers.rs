//! A waiting TLS destination against peers that are not its source, 20
//! trials of each: 1000 bytes of garbage, an idle connection, a plaintext
//! Ferry source, a source whose CA is another, one with an expired
//! certificate, one that expects another name. Each must be dropped with
//! one line while the destination listens on; then the real source
//! migrates and its pattern verifies. Prints, per kind, the trials
//! survived and the time from connecting to being dropped (median,
//! worst).
//!
//! `cargo bench -p ferry-tests --bench strangers` (root, KVM);
//! FERRY_BENCH_TRIALS (default 20), FERRY_BENCH_DEADLINE_MS (the
//! destination's x-incoming-timeout, default 1000).

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::bench_net::{env_or, median};
use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root};
use ferry_tests::hosts::{wait_migration, TwoHosts, A_TAP, B_ADDR, B_TAP, GUEST_ADDR};
use ferry_tests::probe::{Cmdline, READY};
use ferry_tests::strangers::{dropped_lines, garbage, poke, wait_dropped};
use ferry_tests::tlscerts::{Side, TestCa};
use serde_json::json;

const T: Duration = Duration::from_secs(120);
const PORT: u16 = 4444;

fn creds(vm: &FerryVm, id: &str, dir: &Path, endpoint: &str) {
    vm.execute(
        "object-add",
        json!({ "qom-type": "tls-creds-x509", "id": id, "dir": dir, "endpoint": endpoint }),
    )
    .expect("object-add");
}

/// A Ferry source's failed attempt: how long until `failed`.
fn attempt(vm: &FerryVm) -> Duration {
    let started = Instant::now();
    vm.execute("migrate", json!({ "uri": format!("tcp:{B_ADDR}:{PORT}") }))
        .expect("migrate");
    let info = wait_migration(vm, T);
    assert_eq!(info["status"], "failed", "a stranger got through: {info}");
    started.elapsed()
}

fn main() {
    let name = "strangers";
    if require_kvm(name).is_none() || !require_root(name) {
        return;
    }
    let trials = env_or("FERRY_BENCH_TRIALS", 20) as usize;
    let deadline_ms = env_or("FERRY_BENCH_DEADLINE_MS", 1000);
    let root = std::env::temp_dir().join(format!("ferry-bench-strangers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let ca = TestCa::new("Ferry bench CA");
    let server = ca.write_dir(&root.join("server"), Side::Server, &[B_ADDR], false);
    let client = ca.write_dir(&root.join("client"), Side::Client, &["source"], false);
    let expired = ca.write_dir(&root.join("expired"), Side::Client, &["source"], true);
    let other =
        TestCa::new("Another CA").write_dir(&root.join("other"), Side::Client, &["source"], false);

    let hosts = TwoHosts::new("strangers");
    let mut spec = VmSpec::incoming("defer");
    spec.nets = vec![format!("tap={B_TAP}")];
    let dst = FerryVm::spawn("strangers-dst", &spec, Some(&hosts.b));
    creds(&dst, "tls0", &server, "server");
    dst.execute(
        "migrate-set-parameters",
        json!({ "tls-creds": "tls0", "x-incoming-timeout": deadline_ms }),
    )
    .expect("parameters");
    dst.execute(
        "migrate-incoming",
        json!({ "uri": format!("tcp:{B_ADDR}:{PORT}") }),
    )
    .expect("migrate-incoming");

    let mut stranger_spec = VmSpec::probe(&Cmdline::new().heartbeat_ms(100).build());
    stranger_spec.memory = "64M".into();
    let stranger = FerryVm::spawn("strangers-src", &stranger_spec, Some(&hosts.a));
    stranger.console.expect(READY, T);
    creds(&stranger, "other", &other, "client");
    creds(&stranger, "expired", &expired, "client");
    creds(&stranger, "right", &client, "client");

    let mut rows: Vec<(&str, usize, Vec<f64>)> = Vec::new();
    let mut dropped = 0;
    let mut run = |label: &'static str, f: &mut dyn FnMut(usize) -> Duration| {
        let mut times = Vec::new();
        let mut survived = 0;
        for i in 0..trials {
            let took = f(i);
            dropped += 1;
            wait_dropped(&dst, dropped);
            assert!(!dst.exited(), "the destination exited: {}", dst.stderr());
            survived += 1;
            times.push(took.as_secs_f64() * 1e3);
        }
        rows.push((label, survived, times));
    };
    let within = Duration::from_millis(deadline_ms * 3);
    run("1000 bytes of garbage", &mut |i| {
        poke(&hosts.a, B_ADDR, PORT, garbage(i as u64, 1000), within)
    });
    run("an idle connection", &mut |_| {
        poke(&hosts.a, B_ADDR, PORT, Vec::new(), within)
    });
    let params = |p: serde_json::Value| {
        stranger
            .execute("migrate-set-parameters", p)
            .expect("parameters");
    };
    params(json!({ "tls-creds": "" }));
    run("a plaintext Ferry source", &mut |_| attempt(&stranger));
    params(json!({ "tls-creds": "other" }));
    run("a source whose CA is another", &mut |_| attempt(&stranger));
    params(json!({ "tls-creds": "expired" }));
    run("a source with an expired certificate", &mut |_| {
        attempt(&stranger)
    });
    params(json!({ "tls-creds": "right", "tls-hostname": "elsewhere.ferry.test" }));
    run("a source expecting another name", &mut |_| {
        attempt(&stranger)
    });
    drop(stranger);

    // Then the real source.
    let cmdline = Cmdline::new()
        .identity(0, None, None, &format!("{GUEST_ADDR}/24"))
        .heartbeat_ms(100)
        .pattern(9, "64M");
    let mut spec = VmSpec::probe(&cmdline.build());
    spec.nets = vec![format!("tap={A_TAP}")];
    let src = FerryVm::spawn("strangers-real", &spec, Some(&hosts.a));
    src.console.expect(READY, T);
    creds(&src, "tls0", &client, "client");
    src.execute("migrate-set-parameters", json!({ "tls-creds": "tls0" }))
        .expect("parameters");
    src.execute("migrate", json!({ "uri": format!("tcp:{B_ADDR}:{PORT}") }))
        .expect("migrate");
    let info = wait_migration(&src, T);
    assert_eq!(info["status"], "completed", "{info}\n{}", dst.stderr());
    dst.console.assert_pattern_intact(T);

    println!();
    println!(
        "A TLS destination (x-incoming-timeout {deadline_ms} ms) against {trials} trials of each \
         stranger, then its real source: completed, pattern verified; {} lines logged for {} \
         strangers.",
        dropped_lines(&dst),
        rows.iter().map(|r| r.1).sum::<usize>()
    );
    println!();
    println!("| stranger | survived | dropped after: median | worst |");
    println!("|---|---:|---:|---:|");
    for (label, survived, times) in rows {
        let worst = times.iter().copied().fold(0.0, f64::max);
        println!(
            "| {label} | {survived}/{trials} | {:.1} ms | {worst:.1} ms |",
            median(times)
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}
