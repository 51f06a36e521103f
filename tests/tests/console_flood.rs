//! A guest that floods its console faster than the host reads it: the
//! probe prints numbered lines (waiting for room, never dropping) while
//! this test reads Ferry's stdout, and once stops reading for longer
//! than Ferry's output queue and the pipe can absorb. Every line arrives once and in order: the UART's transmitter
//! says busy while Ferry's output queue is full, and nothing is lost.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::ferry::ferry_bin;
use ferry_tests::host::require_kvm;
use ferry_tests::probe::probe_elf;

/// 270 KB: more than Ferry's output queue and the pipe hold together
/// (128 KiB), so the stall below holds the guest back.
const LINES: usize = 6_000;
/// How long the reader stops: the probe writes ~30 KB/s here (its console
/// is interrupt-driven, 16 bytes per THRE), so this fills both.
const STALL: Duration = Duration::from_secs(6);

#[test]
fn a_console_flood_into_a_slow_reader_loses_no_byte() {
    let test = "a_console_flood_into_a_slow_reader_loses_no_byte";
    if require_kvm(test).is_none() {
        return;
    }
    let elf = probe_elf();
    let mut child = Command::new(ferry_bin())
        .args(["run", "--kernel"])
        .arg(&elf)
        .args(["--memory", "64M", "--serial", "stdio", "--cmdline"])
        .arg(format!("probe.flood={LINES}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry");
    let mut out = child.stdout.take().expect("stdout");
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    let started = Instant::now();
    let mut stalled = false;
    while !text.ends_with(b"\n") || !String::from_utf8_lossy(&text).contains("probe: flood done") {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no end of the flood after 2 minutes"
        );
        let n = out.read(&mut buf).expect("read console");
        assert!(n > 0, "ferry ended: {}", String::from_utf8_lossy(&text));
        text.extend_from_slice(&buf[..n]);
        // Once, not at all for a while.
        if !stalled && text.len() > 10_000 {
            stalled = true;
            std::thread::sleep(STALL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = String::from_utf8_lossy(&text);
    let flood: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("probe: flood ") && !l.starts_with("probe: flood done"))
        .collect();
    assert_eq!(flood.len(), LINES, "lines lost or doubled");
    for (i, line) in flood.iter().enumerate() {
        assert_eq!(
            *line,
            format!("probe: flood {i:08} abcdefghijklmnopqrstuvwxyz"),
            "line {i}"
        );
    }
    let done = text
        .lines()
        .find(|l| l.starts_with("probe: flood done"))
        .unwrap_or_default();
    eprintln!(
        "{LINES} lines ({} KB) through a slow reader in {:.1} s: {done}",
        text.len() / 1000,
        started.elapsed().as_secs_f64()
    );
}
