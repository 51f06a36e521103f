//! A stream whose state sections say nonsense but carry valid checksums
//! (a buggy or hostile source): the destination refuses it, or runs a
//! guest that may crash, but never panics and never dies of a signal.
//!
//! The snapshot is of a probe guest with a NIC whose driver programmed a
//! MAC table and a VLAN, so the virtio-net section has queues, filters and
//! an announce state to get wrong. Each case changes a few digits inside
//! the JSON of one state section (vCPU, VM, serial, virtio-net), keeps its
//! length, fixes its CRC, and restores it into a new process in a network
//! namespace. FERRY_FUZZ_CASES sets the number of cases (default 48).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::ferry::{ferry_bin, FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root};
use ferry_tests::hosts::wait_migration;
use ferry_tests::netns::Netns;
use ferry_tests::probe::checks::network_cmdline;
use ferry_tests::probe::READY;
use ferry_tests::stream::{fix_crc, sections};
use serde_json::json;

const T: Duration = Duration::from_secs(60);
/// How long a restored guest that did not fail is watched before it is
/// stopped.
const WATCH: Duration = Duration::from_millis(1500);
const SECTION_VCPU: u8 = 3;
const SECTION_VM: u8 = 4;
const SECTION_DEVICE: u8 = 5;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A copy of `stream` with 1 to 3 digits changed in one state section,
/// its CRC fixed; and what was changed, for the failure message.
fn mutate(stream: &[u8], rng: &mut Rng) -> (Vec<u8>, String) {
    let secs: Vec<_> = sections(stream)
        .into_iter()
        .filter(|s| matches!(s.kind, SECTION_VCPU | SECTION_VM | SECTION_DEVICE))
        .collect();
    let section = &secs[rng.below(secs.len())];
    let payload = section.payload;
    let digits: Vec<usize> = (payload..section.crc_at())
        .filter(|&i| stream[i].is_ascii_digit())
        .collect();
    let mut out = stream.to_vec();
    let mut what = format!("section {}:", section.name);
    for _ in 0..1 + rng.below(3) {
        let at = digits[rng.below(digits.len())];
        let to = b'0' + rng.below(10) as u8;
        let around = String::from_utf8_lossy(&stream[at.saturating_sub(24).max(payload)..at]);
        what.push_str(&format!(
            " [...{around}]{}->{}",
            stream[at] as char, to as char
        ));
        out[at] = to;
    }
    fix_crc(&mut out, section);
    (out, what)
}

/// Restores `stream` in `ns` on TAP `tap`; what went wrong, if anything
/// did: a panic, a signal, or an exit status that means one.
fn restore(ns: &Netns, tap: &str, stream: &[u8], file: &std::path::Path) -> Option<String> {
    std::fs::write(file, stream).expect("write stream");
    let mut cmd: Command = ns.command(ferry_bin().to_str().expect("utf-8 path"));
    cmd.args(["run", "--incoming", &format!("file:{}", file.display())])
        .args(["--net", &format!("tap={tap}"), "--serial", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn ferry");
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if start.elapsed() > WATCH {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = reader.join().unwrap_or_default();
    let _ = std::fs::remove_file(file);
    if stderr.contains("panicked") {
        return Some(format!("panicked: {stderr}"));
    }
    match status {
        Some(s) if s.code().is_none() => Some(format!("died of {s}: {stderr}")),
        Some(s) if s.code() == Some(101) => Some(format!("exit 101 (a panic): {stderr}")),
        _ => None,
    }
}

#[test]
fn state_sections_with_nonsense_never_panic_the_destination() {
    let test = "state_sections_with_nonsense_never_panic_the_destination";
    if require_kvm(test).is_none() || !require_root(test) {
        return;
    }
    let ns = Netns::new("fuzz").expect("netns");
    let mut spec = VmSpec::probe(&network_cmdline().heartbeat_ms(100).build());
    spec.memory = "64M".into();
    spec.nets = vec!["tap=fzsrc".into()];
    let src = FerryVm::spawn("fuzz-src", &spec, Some(&ns));
    src.console.expect(READY, T);
    let file = std::env::temp_dir().join(format!("ferry-fuzz-{}.fm", std::process::id()));
    src.execute(
        "migrate",
        json!({ "uri": format!("file:{}", file.display()) }),
    )
    .expect("migrate");
    assert_eq!(wait_migration(&src, T)["status"], "completed");
    drop(src);
    let stream = std::fs::read(&file).expect("read snapshot");
    let _ = std::fs::remove_file(&file);

    let cases: usize = std::env::var("FERRY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    let workers = 4;
    let failures: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (ns, stream) = (&ns, &stream);
                scope.spawn(move || {
                    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1));
                    let mut failed = Vec::new();
                    for case in (w..cases).step_by(workers) {
                        let (bad, what) = mutate(stream, &mut rng);
                        let file = std::env::temp_dir()
                            .join(format!("ferry-fuzz-{}-{case}.fm", std::process::id()));
                        if let Some(e) = restore(ns, &format!("fz{case}"), &bad, &file) {
                            failed.push(format!("case {case} ({what}): {e}"));
                        }
                    }
                    failed
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
