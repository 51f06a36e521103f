//! Bad input to `ferry run`: each is one clear line on stderr and a
//! non-zero exit, never a panic and never a guest.

use std::time::Duration;

use ferry_tests::ferry::{command, run_with_timeout, Finished};
use ferry_tests::host::TempPath;
use ferry_tests::tiny::{write_guest, Ending};

fn ferry(args: &[&str]) -> Finished {
    run_with_timeout(command(args), Duration::from_secs(30))
}

/// Asserts a one-line error mentioning every word of `expect`.
fn assert_one_line_error(out: &Finished, expect: &[&str]) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit status; stderr: {}",
        out.stderr
    );
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr, got: {:?}",
        out.stderr
    );
    assert!(lines[0].starts_with("ferry: "), "{:?}", lines[0]);
    for word in expect {
        assert!(
            lines[0].contains(word),
            "{:?} should mention {word:?}",
            lines[0]
        );
    }
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert!(
        out.stdout.is_empty(),
        "no guest output expected: {:?}",
        out.stdout
    );
}

fn guest() -> TempPath {
    write_guest("errors", b"X", Ending::AcpiPowerOff)
}

#[test]
fn missing_kernel() {
    let out = ferry(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert_one_line_error(&out, &["/nonexistent/vmlinux", "No such file"]);
}

#[test]
fn file_that_is_not_a_kernel() {
    let path = std::env::temp_dir().join(format!("ferry-not-a-kernel-{}", std::process::id()));
    std::fs::write(&path, b"#!/bin/sh\necho this is not a kernel\n").unwrap();
    let out = ferry(&["run", "--kernel", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_one_line_error(&out, &["is not a kernel"]);
}

#[test]
fn missing_initrd() {
    let out = ferry(&[
        "run",
        "--kernel",
        guest().arg(),
        "--initrd",
        "/nonexistent/initrd.img",
    ]);
    assert_one_line_error(&out, &["initrd", "/nonexistent/initrd.img"]);
}

#[test]
fn zero_memory() {
    let out = ferry(&["run", "--kernel", guest().arg(), "--memory", "0"]);
    assert_one_line_error(&out, &["--memory"]);
}

#[test]
fn memory_larger_than_the_host() {
    let out = ferry(&["run", "--kernel", guest().arg(), "--memory", "900T"]);
    assert_one_line_error(&out, &["--memory", "more than this host"]);
}

#[test]
fn malformed_memory() {
    let out = ferry(&["run", "--kernel", guest().arg(), "--memory", "lots"]);
    assert_one_line_error(&out, &["--memory", "lots"]);
}

#[test]
fn zero_cpus() {
    let out = ferry(&["run", "--kernel", guest().arg(), "--cpus", "0"]);
    assert_one_line_error(&out, &["--cpus"]);
}

#[test]
fn unknown_flag() {
    let out = ferry(&["run", "--kernel", guest().arg(), "--frobnicate"]);
    assert_one_line_error(&out, &["--frobnicate"]);
}

#[test]
fn bad_serial() {
    let out = ferry(&["run", "--kernel", guest().arg(), "--serial", "tcp:1234"]);
    assert_one_line_error(&out, &["--serial"]);
}

#[test]
fn command_line_too_long() {
    let long = "x".repeat(70_000);
    let out = ferry(&["run", "--kernel", guest().arg(), "--cmdline", &long]);
    assert_one_line_error(&out, &["command line", "bytes"]);
}
