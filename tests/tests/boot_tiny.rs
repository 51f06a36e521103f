//! How a guest ends a VM, with tiny hand-assembled PVH guests: power-off
//! and reset end `ferry run` with 0, a triple fault or an instruction KVM
//! cannot emulate with 2 and one line that says what happened.

use std::time::{Duration, Instant};

use ferry_tests::ferry::{command, run_with_timeout, wait_with_timeout, Finished};
use ferry_tests::host::{require_kvm, KvmKind};
use ferry_tests::tiny::{write_guest, Ending};

const TIMEOUT: Duration = Duration::from_secs(30);

fn boot(name: &str, ending: Ending, extra: &[&str]) -> Finished {
    let guest = write_guest(name, format!("hello from {name}\n").as_bytes(), ending);
    let mut args = vec![
        "run",
        "--kernel",
        guest.to_str().unwrap(),
        "--memory",
        "64M",
    ];
    args.extend(extra);
    let out = run_with_timeout(command(&args), TIMEOUT);
    let _ = std::fs::remove_file(guest);
    out
}

fn assert_clean(out: &Finished, name: &str) {
    assert_eq!(out.status.code(), Some(0), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, format!("hello from {name}\n"));
}

#[test]
fn acpi_poweroff_exits_zero() {
    if require_kvm("acpi_poweroff_exits_zero").is_none() {
        return;
    }
    assert_clean(&boot("poweroff", Ending::AcpiPowerOff, &[]), "poweroff");
}

#[test]
fn acpi_reset_exits_zero() {
    if require_kvm("acpi_reset_exits_zero").is_none() {
        return;
    }
    assert_clean(&boot("acpireset", Ending::AcpiReset, &[]), "acpireset");
}

#[test]
fn i8042_reset_exits_zero() {
    if require_kvm("i8042_reset_exits_zero").is_none() {
        return;
    }
    assert_clean(&boot("kbdreset", Ending::I8042Reset, &[]), "kbdreset");
}

#[test]
fn two_vcpus_boot_and_power_off() {
    if require_kvm("two_vcpus_boot_and_power_off").is_none() {
        return;
    }
    assert_clean(&boot("smp", Ending::AcpiPowerOff, &["--cpus", "2"]), "smp");
}

#[test]
fn triple_fault_is_reported_with_rip() {
    if require_kvm("triple_fault_is_reported_with_rip").is_none() {
        return;
    }
    let out = boot("triple", Ending::TripleFault, &[]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "hello from triple\n");
    let line = out.stderr.trim_end();
    assert!(!line.contains('\n'), "one line expected: {line:?}");
    assert!(
        line.starts_with("ferry: guest triple fault on vCPU 0 at RIP 0x1"),
        "{line:?}"
    );
}

#[test]
fn emulation_failure_names_the_instruction() {
    match require_kvm("emulation_failure_names_the_instruction") {
        Some(KvmKind::Pvm) => {}
        Some(KvmKind::Hardware) => {
            ferry_tests::host::skip(
                "emulation_failure_names_the_instruction",
                "hardware virtualization runs popcnt natively; only kvm_pvm fails to emulate it",
            );
            return;
        }
        None => return,
    }
    let out = boot("popcnt", Ending::Popcnt, &[]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", out.stderr);
    let line = out.stderr.trim_end();
    assert!(!line.contains('\n'), "one line expected: {line:?}");
    assert!(
        line.contains("emulation failure at RIP 0x1")
            && line.contains("instruction bytes [f3 0f b8 c3"),
        "{line:?}"
    );
}

#[test]
fn serial_to_file_and_none() {
    if require_kvm("serial_to_file_and_none").is_none() {
        return;
    }
    let path = std::env::temp_dir().join(format!("ferry-serial-{}.log", std::process::id()));
    let spec = format!("file:{}", path.display());
    let out = boot("tofile", Ending::AcpiPowerOff, &["--serial", &spec]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", out.stderr);
    assert!(out.stdout.is_empty());
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "hello from tofile\n"
    );
    let _ = std::fs::remove_file(&path);

    let out = boot("silent", Ending::AcpiPowerOff, &["--serial", "none"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", out.stderr);
    assert!(out.stdout.is_empty());
}

#[test]
fn sigterm_ends_the_vm_cleanly() {
    if require_kvm("sigterm_ends_the_vm_cleanly").is_none() {
        return;
    }
    let guest = write_guest("spin", b"spinning\n", Ending::Spin);
    let child = command(&[
        "run",
        "--kernel",
        guest.to_str().unwrap(),
        "--memory",
        "64M",
    ])
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = wait_with_timeout(child, TIMEOUT, Instant::now());
    let _ = std::fs::remove_file(guest);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "spinning\n");
    assert_eq!(out.stderr.trim_end(), "ferry: terminated by signal 15");
}
