//! Guest RAM is eligible for transparent huge pages, as under QEMU (the
//! guest walks its memory ~1.7× faster with them on kvm_pvm): from boot,
//! and on a migration's destination once the VM has arrived.

use std::time::Duration;

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, skip};
use ferry_tests::hosts::{migrate, wait_migration, wait_status};
use ferry_tests::probe::{Cmdline, READY};

const T: Duration = Duration::from_secs(60);
const GUEST_MIB: u64 = 192;

/// The host lets a process ask for huge pages (`madvise` or `always`).
fn thp_available(test: &str) -> bool {
    let mode =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if mode.contains("[never]") || mode.is_empty() {
        skip(test, "transparent huge pages are off on this host");
        return false;
    }
    true
}

/// `THPeligible` of the mapping of guest RAM in `pid`'s smaps: all of it
/// but its first 2 MiB, which boot touches first (memory.rs).
fn guest_ram_thp_eligible(pid: u32) -> Option<bool> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let want = format!("{} kB", GUEST_MIB * 1024 - 2048);
    let mut in_guest_ram = false;
    for line in smaps.lines() {
        if let Some(size) = line.strip_prefix("Size:") {
            in_guest_ram = size.trim() == want;
        } else if in_guest_ram {
            if let Some(v) = line.strip_prefix("THPeligible:") {
                return Some(v.trim() == "1");
            }
        }
    }
    None
}

#[test]
fn guest_ram_may_use_huge_pages_from_boot_and_after_arrival() {
    let test = "guest_ram_may_use_huge_pages_from_boot_and_after_arrival";
    if require_kvm(test).is_none() || !thp_available(test) {
        return;
    }
    let mut spec = VmSpec::probe(&Cmdline::new().heartbeat_ms(100).build());
    spec.memory = format!("{GUEST_MIB}M");
    let src = FerryVm::spawn("thp-src", &spec, None);
    src.console.expect(READY, T);
    assert_eq!(guest_ram_thp_eligible(src.pid()), Some(true));

    let sock = std::env::temp_dir().join(format!("ferry-thp-{}.sock", std::process::id()));
    let uri = format!("unix:{}", sock.display());
    let dst = FerryVm::spawn("thp-dst", &VmSpec::incoming(&uri), None);
    migrate(&src, &uri);
    assert_eq!(wait_migration(&src, T)["status"], "completed");
    wait_status(&dst, "running", T);
    assert_eq!(guest_ram_thp_eligible(dst.pid()), Some(true));
}
