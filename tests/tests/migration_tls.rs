//! TLS migration between two namespace hosts, configured as libvirt
//! configures QEMU (`tls-creds-x509` objects, `tls-creds` and
//! `tls-hostname` parameters, `-incoming defer`), over one stream and over
//! multifd; and a TLS destination that drops every peer that is not its
//! source (garbage, silence, plaintext, another CA, an expired
//! certificate, a subject `tls-authz` does not name) and then takes the
//! real one.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root};
use ferry_tests::hosts::{
    assert_completed, heartbeat_goes_on, migrate, set_multifd, status, wait_migration, TwoHosts,
    A_TAP, B_ADDR, B_TAP, GUEST_ADDR,
};
use ferry_tests::netns::Netns;
use ferry_tests::probe::heartbeat::wait_heartbeats;
use ferry_tests::probe::{Cmdline, READY};
use ferry_tests::strangers::{dropped_lines, garbage, poke, wait_dropped};
use ferry_tests::tlscerts::{Side, TestCa};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(120);
const PORT: u16 = 4444;
/// The name the destination's certificate carries beside its address.
const DEST_NAME: &str = "dest.ferry.test";

fn can_run(test: &str) -> bool {
    require_kvm(test).is_some() && require_root(test)
}

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-mtls-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// `--object` for credentials in `dir`.
fn object(id: &str, dir: &Path, endpoint: &str) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id={id},dir={},endpoint={endpoint},verify-peer=on",
            dir.display()
        ),
    ]
}

fn source(test: &str, ns: &Netns, creds: &Path, pattern: &str) -> FerryVm {
    let cmdline = Cmdline::new()
        .identity(0, None, None, &format!("{GUEST_ADDR}/24"))
        .heartbeat_ms(100)
        .pattern(23, pattern);
    let mut spec = VmSpec::probe(&cmdline.build());
    spec.memory = "1G".into();
    spec.nets = vec![format!("tap={A_TAP}")];
    spec.extra = object("tls0", creds, "client");
    let vm = FerryVm::spawn(test, &spec, Some(ns));
    vm.console.expect(READY, T);
    vm.console.expect_seen("probe: pattern written");
    vm
}

/// libvirt's destination: `-incoming defer`, the credentials, the
/// parameters, then `migrate-incoming`.
fn destination(test: &str, ns: &Netns, creds: &Path, params: Value) -> FerryVm {
    let mut spec = VmSpec::incoming("defer");
    spec.qemu_spelling = true;
    spec.nets = vec![format!("tap={B_TAP}")];
    spec.extra = object("tls0", creds, "server");
    let vm = FerryVm::spawn(test, &spec, Some(ns));
    let mut p = json!({ "tls-creds": "tls0" });
    if let (Some(p), Some(extra)) = (p.as_object_mut(), params.as_object()) {
        p.extend(extra.clone());
    }
    vm.execute("migrate-set-parameters", p)
        .expect("destination parameters");
    vm.execute(
        "migrate-incoming",
        json!({ "uri": format!("tcp:{B_ADDR}:{PORT}") }),
    )
    .expect("migrate-incoming");
    vm
}

struct Pki {
    ca: TestCa,
    server: PathBuf,
    client: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    let ca = TestCa::new("Ferry test CA");
    let server = ca.write_dir(
        &dir.join("server"),
        Side::Server,
        &[DEST_NAME, B_ADDR],
        false,
    );
    let client = ca.write_dir(&dir.join("client"), Side::Client, &["source"], false);
    Pki { ca, server, client }
}

#[test]
fn tls_migration_over_one_stream_and_over_multifd() {
    let test = "tls_migration_over_one_stream_and_over_multifd";
    if !can_run(test) {
        return;
    }
    let dir = scratch(test);
    let pki = pki(&dir);
    // One stream checked against the URI's address (an IP SAN); two
    // channels checked against tls-hostname.
    for (channels, hostname) in [(1, ""), (2, DEST_NAME)] {
        let hosts = TwoHosts::new(&format!("tls{channels}"));
        let src = source(&format!("tls{channels}-src"), &hosts.a, &pki.client, "256M");
        let dst = destination(
            &format!("tls{channels}-dst"),
            &hosts.b,
            &pki.server,
            json!({}),
        );
        if channels > 1 {
            set_multifd(&src, Some(channels));
            set_multifd(&dst, Some(channels));
        }
        src.execute(
            "migrate-set-parameters",
            json!({ "tls-creds": "tls0", "tls-hostname": hostname }),
        )
        .expect("source parameters");
        migrate(&src, &format!("tcp:{B_ADDR}:{PORT}"));
        let info = wait_migration(&src, T);
        assert_completed(&info, &src, &dst);
        assert!(
            info["ram"]["normal"].as_u64().unwrap_or(0) >= (256 << 20) / 4096,
            "the pattern went over TLS with its data: {info}"
        );
        wait_heartbeats(&dst.console, 2, T);
        assert_eq!(status(&dst), "running");
        dst.console.assert_pattern_intact(T);
        heartbeat_goes_on(&dst);
        eprintln!(
            "TLS, {channels} channel(s): total {} ms, downtime {} ms, {} MB",
            info["total-time"],
            info["downtime"],
            info["ram"]["transferred"].as_u64().unwrap_or(0) / 1_000_000
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A source that fails: its error names `words`, it runs on.
fn refused(vm: &FerryVm, words: &[&str]) {
    vm.execute("migrate", json!({ "uri": format!("tcp:{B_ADDR}:{PORT}") }))
        .expect("migrate");
    let info = wait_migration(vm, T);
    assert_eq!(info["status"], "failed", "{info}");
    let desc = info["error-desc"].as_str().unwrap_or("");
    for w in words {
        assert!(desc.contains(w), "error {desc:?} should say {w:?}");
    }
    assert_eq!(status(vm), "running", "a refused source runs on");
}

#[test]
fn a_tls_destination_drops_every_stranger_and_takes_its_source() {
    let test = "a_tls_destination_drops_every_stranger_and_takes_its_source";
    if !can_run(test) {
        return;
    }
    let dir = scratch(test);
    let pki = pki(&dir);
    let hosts = TwoHosts::new("tlsbad");
    let deadline_ms = 1000;
    let dst = destination(
        "tlsbad-dst",
        &hosts.b,
        &pki.server,
        json!({ "x-incoming-timeout": deadline_ms, "tls-authz": "auth0" }),
    );
    // Only the source's subject gets in (QEMU's authz-simple), looked up
    // as each peer connects.
    dst.execute(
        "object-add",
        json!({ "qom-type": "authz-simple", "id": "auth0",
                "identity": ferry_tests::tlscerts::subject("source") }),
    )
    .expect("authz-simple");
    let mut dropped = 0;

    // Garbage, 20 times: each is dropped at once (no TLS hello in it).
    for seed in 0..20 {
        poke(
            &hosts.a,
            B_ADDR,
            PORT,
            garbage(seed, 1000),
            Duration::from_secs(5),
        );
        dropped += 1;
    }
    wait_dropped(&dst, dropped);

    // Silence: dropped once the deadline has passed, not before.
    let took = poke(&hosts.a, B_ADDR, PORT, Vec::new(), Duration::from_secs(10));
    dropped += 1;
    assert!(
        took >= Duration::from_millis(deadline_ms - 50),
        "an idle peer was dropped after {took:?}, before the deadline"
    );
    wait_dropped(&dst, dropped);

    // Ferry sources that are not this destination's: plaintext, another
    // CA, an expired certificate, and one that asks for another name.
    let mut stranger_spec = VmSpec::probe(&Cmdline::new().heartbeat_ms(100).build());
    stranger_spec.memory = "64M".into();
    let stranger = FerryVm::spawn("tlsbad-stranger", &stranger_spec, Some(&hosts.a));
    stranger.console.expect(READY, T);
    refused(&stranger, &[]);
    dropped += 1;
    wait_dropped(&dst, dropped);

    let other = TestCa::new("Some other CA");
    let other_dir = other.write_dir(&dir.join("other"), Side::Client, &["source"], false);
    let expired_dir = pki
        .ca
        .write_dir(&dir.join("expired"), Side::Client, &["source"], true);
    // The right CA, another subject: tls-authz keeps it out.
    let intruder_dir = pki
        .ca
        .write_dir(&dir.join("intruder"), Side::Client, &["intruder"], false);
    // Another CA's client cannot trust this server either, and says so;
    // an expired client learns of it from the destination's alert.
    for (id, creds, words) in [
        ("other", &other_dir, &["TLS"][..]),
        ("expired", &expired_dir, &[][..]),
        ("intruder", &intruder_dir, &[][..]),
    ] {
        stranger
            .execute(
                "object-add",
                json!({ "qom-type": "tls-creds-x509", "id": id, "dir": creds,
                        "endpoint": "client", "verify-peer": true }),
            )
            .expect("object-add");
        stranger
            .execute("migrate-set-parameters", json!({ "tls-creds": id }))
            .expect("tls-creds");
        refused(&stranger, words);
        dropped += 1;
        wait_dropped(&dst, dropped);
    }
    stranger
        .execute(
            "object-add",
            json!({ "qom-type": "tls-creds-x509", "id": "right", "dir": pki.client,
                    "endpoint": "client" }),
        )
        .expect("object-add");
    stranger
        .execute(
            "migrate-set-parameters",
            json!({ "tls-creds": "right", "tls-hostname": "elsewhere.ferry.test" }),
        )
        .expect("tls-hostname");
    refused(&stranger, &["not valid for name"]);
    dropped += 1;
    wait_dropped(&dst, dropped);
    assert_eq!(status(&stranger), "running");

    // An idle connection made first holds the door only until the
    // deadline; then the real source migrates.
    let src = source("tlsbad-src", &hosts.a, &pki.client, "64M");
    src.execute("migrate-set-parameters", json!({ "tls-creds": "tls0" }))
        .expect("source parameters");
    let idle = hosts.a.spawn_in(|| {
        TcpStream::connect((B_ADDR, PORT)).map(|s| {
            std::thread::sleep(Duration::from_secs(5));
            drop(s)
        })
    });
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    migrate(&src, &format!("tcp:{B_ADDR}:{PORT}"));
    let info = wait_migration(&src, T);
    assert_completed(&info, &src, &dst);
    let _ = idle.join();
    eprintln!(
        "the real source migrated {} ms after it started, behind an idle peer",
        started.elapsed().as_millis()
    );
    wait_heartbeats(&dst.console, 2, T);
    assert_eq!(status(&dst), "running");
    dst.console.assert_pattern_intact(T);
    // Every stranger cost the destination one line.
    let stderr = dst.stderr();
    assert_eq!(dropped_lines(&dst), dropped + 1, "{stderr}");
    for line in stderr
        .lines()
        .filter(|l| l.contains("dropped a connection"))
    {
        assert!(line.contains("still listening"), "{line}");
    }
    let denied = format!(
        "TLS x509 authz check for {} is denied",
        ferry_tests::tlscerts::subject("intruder")
    );
    assert!(stderr.contains(&denied), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_plaintext_destination_refuses_a_tls_source() {
    let test = "a_plaintext_destination_refuses_a_tls_source";
    if !can_run(test) {
        return;
    }
    let dir = scratch(test);
    let pki = pki(&dir);
    let hosts = TwoHosts::new("tlsplain");
    let mut spec = VmSpec::incoming(&format!("tcp:{B_ADDR}:{PORT}"));
    spec.nets = vec![format!("tap={B_TAP}")];
    let dst = FerryVm::spawn("tlsplain-dst", &spec, Some(&hosts.b));
    let src = source("tlsplain-src", &hosts.a, &pki.client, "16M");
    src.execute("migrate-set-parameters", json!({ "tls-creds": "tls0" }))
        .expect("source parameters");
    refused(&src, &["TLS"]);
    wait_dropped(&dst, 1);
    src.console.assert_pattern_intact(T);
    let _ = std::fs::remove_dir_all(&dir);
}
