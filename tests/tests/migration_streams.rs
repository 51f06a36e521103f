//! Bad streams for `ferry run --incoming`: each is refused with one line
//! naming what was wrong and where, exit status 1, no panic — truncated,
//! a flipped byte in RAM and in a device section, wrong magic, a future
//! version, an unknown section.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use ferry_tests::ferry::{command, run_with_timeout, FerryVm, VmSpec};
use ferry_tests::host::require_kvm;
use ferry_tests::hosts::wait_migration;
use ferry_tests::probe::{Cmdline, READY};
use ferry_tests::stream::{crc32, sections};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

/// A snapshot of a small probe guest, made once per test process: the
/// plain stream in the file, as on the wire (not the file form, whose
/// map header has tests of its own).
fn snapshot() -> &'static [u8] {
    static SNAPSHOT: OnceLock<Vec<u8>> = OnceLock::new();
    SNAPSHOT.get_or_init(|| take_snapshot("streams", false))
}

/// The snapshot file of a small probe guest, in the file form with
/// `mapped_ram` (the `mapped-ram` capability), else the plain stream.
fn take_snapshot(name: &str, mapped_ram: bool) -> Vec<u8> {
    let mut spec = VmSpec::probe(&Cmdline::new().heartbeat_ms(100).pattern(5, "4M").build());
    spec.memory = "64M".into();
    let vm = FerryVm::spawn(&format!("{name}-src"), &spec, None);
    vm.console.expect(READY, T);
    let file = std::env::temp_dir().join(format!("ferry-{name}-{}.fm", std::process::id()));
    vm.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "mapped-ram", "state": mapped_ram }] }),
    )
    .expect("mapped-ram");
    vm.execute(
        "migrate",
        json!({ "uri": format!("file:{}", file.display()) }),
    )
    .expect("migrate");
    let info = wait_migration(&vm, T);
    assert_eq!(info["status"], "completed", "{info}");
    let bytes = std::fs::read(&file).expect("read snapshot");
    let _ = std::fs::remove_file(&file);
    bytes
}

fn restore(test: &str, stream: &[u8]) -> (Option<i32>, String) {
    let path: PathBuf =
        std::env::temp_dir().join(format!("ferry-bad-{test}-{}.fm", std::process::id()));
    std::fs::write(&path, stream).unwrap();
    let out = run_with_timeout(
        command(&["run", "--incoming", &format!("file:{}", path.display())]),
        T,
    );
    let _ = std::fs::remove_file(&path);
    (out.status.code(), out.stderr)
}

fn assert_refused(test: &str, stream: &[u8], words: &[&str]) {
    let (code, stderr) = restore(test, stream);
    assert_eq!(code, Some(1), "{test}: {stderr}");
    let line = stderr.trim_end();
    assert!(
        !line.contains('\n') && line.starts_with("ferry: "),
        "{test}: one line expected: {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    for w in words {
        assert!(line.contains(w), "{test}: {line:?} should mention {w:?}");
    }
}

fn can_run(test: &str) -> bool {
    require_kvm(test).is_some()
}

#[test]
fn the_snapshot_itself_restores() {
    if !can_run("the_snapshot_itself_restores") {
        return;
    }
    let path = std::env::temp_dir().join(format!("ferry-good-{}.fm", std::process::id()));
    std::fs::write(&path, snapshot()).unwrap();
    let vm = FerryVm::spawn(
        "good",
        &VmSpec::incoming(&format!("file:{}", path.display())),
        None,
    );
    vm.console.expect("probe: heartbeat", T);
    let _ = std::fs::remove_file(Path::new(&path));
}

#[test]
fn truncated_stream() {
    if !can_run("truncated_stream") {
        return;
    }
    let s = snapshot();
    assert_refused("truncated", &s[..s.len() / 2], &["truncated", "byte"]);
    assert_refused("truncated-header", &s[..10], &["truncated"]);
}

#[test]
fn flipped_byte_in_ram_and_in_a_device_section() {
    if !can_run("flipped_byte_in_ram_and_in_a_device_section") {
        return;
    }
    let s = snapshot();
    let secs = sections(s);
    let ram = secs
        .iter()
        .find(|x| x.kind == 2 && x.len > 20_000)
        .expect("a RAM section with data");
    let mut bad = s.to_vec();
    bad[ram.payload + ram.len / 2] ^= 0x10;
    assert_refused(
        "flip-ram",
        &bad,
        &["checksum mismatch", "section ram", "byte"],
    );

    let dev = secs.iter().find(|x| x.kind == 5).expect("a device section");
    let mut bad = s.to_vec();
    bad[dev.payload + dev.len / 2] ^= 0x01;
    assert_refused(
        "flip-device",
        &bad,
        &["checksum mismatch", &format!("section {}", dev.name)],
    );
}

#[test]
fn wrong_magic_future_version_unknown_section() {
    if !can_run("wrong_magic_future_version_unknown_section") {
        return;
    }
    let s = snapshot();
    let mut bad = s.to_vec();
    bad[..8].copy_from_slice(b"QEVMMIGR");
    assert_refused("magic", &bad, &["magic"]);

    let mut bad = s.to_vec();
    bad[8..12].copy_from_slice(&2u32.to_le_bytes());
    assert_refused("version", &bad, &["version 2"]);

    // A section of a kind this build does not know, with a valid CRC, right
    // after the config: refused by kind, not by checksum.
    let secs = sections(s);
    let after_config = secs[1].start;
    let mut unknown = vec![0x42u8, 5];
    unknown.extend(b"bogus");
    unknown.extend(1u32.to_le_bytes());
    unknown.extend(3u64.to_le_bytes());
    unknown.extend([1, 2, 3]);
    let crc = crc32(&unknown);
    unknown.extend(crc.to_le_bytes());
    let mut bad = s[..after_config].to_vec();
    bad.extend(&unknown);
    bad.extend(&s[after_config..]);
    assert_refused("unknown", &bad, &["unknown", "bogus"]);
}

/// The file form (RAM mapped on restore) refuses a damaged map header or
/// a file cut short of its stream with one line too.
#[test]
fn file_form_cut_short_or_with_a_bad_map() {
    if !can_run("file_form_cut_short_or_with_a_bad_map") {
        return;
    }
    let bytes = take_snapshot("file-form", true);
    assert_eq!(&bytes[..8], b"FERRYMAP");
    // Inside the RAM image: shorter than the map says.
    assert_refused(
        "file-short",
        &bytes[..1 << 20],
        &["snapshot map header", "shorter"],
    );
    let mut bad = bytes.clone();
    bad[30] ^= 0x40;
    assert_refused("file-map-crc", &bad, &["snapshot map header", "checksum"]);
    // The stream after the image cut short: the stream's own refusal.
    assert_refused(
        "file-stream-cut",
        &bytes[..bytes.len() - 10],
        &["truncated"],
    );
}
