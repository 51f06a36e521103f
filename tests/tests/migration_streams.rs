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
use serde_json::json;

const T: Duration = Duration::from_secs(60);

/// A snapshot of a small probe guest, made once per test process.
fn snapshot() -> &'static [u8] {
    static SNAPSHOT: OnceLock<Vec<u8>> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let mut spec = VmSpec::probe(&Cmdline::new().heartbeat_ms(100).pattern(5, "4M").build());
        spec.memory = "64M".into();
        let vm = FerryVm::spawn("streams-src", &spec, None);
        vm.console.expect(READY, T);
        let file = std::env::temp_dir().join(format!("ferry-streams-{}.fm", std::process::id()));
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
    })
}

/// (kind, name, section start, payload start, payload length) of each
/// section, walking the documented format (docs/migration-stream.md).
fn sections(stream: &[u8]) -> Vec<(u8, String, usize, usize, usize)> {
    let mut out = Vec::new();
    let mut at = 16;
    while at < stream.len() {
        let kind = stream[at];
        let name_len = stream[at + 1] as usize;
        let name = String::from_utf8_lossy(&stream[at + 2..at + 2 + name_len]).into_owned();
        let len_at = at + 2 + name_len + 4;
        let len = u64::from_le_bytes(stream[len_at..len_at + 8].try_into().unwrap()) as usize;
        let payload = len_at + 8;
        out.push((kind, name, at, payload, len));
        at = payload + len + 4;
    }
    out
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
    let (_, _, _, ram_payload, ram_len) = *secs
        .iter()
        .find(|x| x.0 == 2 && x.4 > 20_000)
        .expect("a RAM section with data");
    let mut bad = s.to_vec();
    bad[ram_payload + ram_len / 2] ^= 0x10;
    assert_refused(
        "flip-ram",
        &bad,
        &["checksum mismatch", "section ram", "byte"],
    );

    let (_, name, _, dev_payload, dev_len) = secs
        .iter()
        .find(|x| x.0 == 5)
        .cloned()
        .expect("a device section");
    let mut bad = s.to_vec();
    bad[dev_payload + dev_len / 2] ^= 0x01;
    assert_refused(
        "flip-device",
        &bad,
        &["checksum mismatch", &format!("section {name}")],
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
    let after_config = secs[1].2;
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

/// CRC-32 (IEEE), bit by bit: the test's own, independent of the crate.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
