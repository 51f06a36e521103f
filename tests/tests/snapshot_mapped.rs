//! Snapshots that restore at once: a `file:` snapshot of a guest holding
//! data is laid out so the restore maps its RAM (docs/migration-stream.md,
//! "The file form"). Two guests restored from one file are independent,
//! a new snapshot to the same path and a program writing the old file in
//! place leave a guest restored from it intact.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, TempPath};
use ferry_tests::hosts::{migrate, wait_migration, wait_status};
use ferry_tests::probe::heartbeat::wait_heartbeats;
use ferry_tests::probe::{Cmdline, READY};

const T: Duration = Duration::from_secs(120);

fn restore(name: &str, file: &TempPath) -> FerryVm {
    let mut spec = VmSpec::incoming(&format!("file:{}", file.display()));
    spec.env = vec![("FERRY_LOG".into(), "info".into())];
    let vm = FerryVm::spawn(name, &spec, None);
    wait_status(&vm, "running", T);
    vm
}

fn snapshot(vm: &FerryVm, file: &TempPath) {
    migrate(vm, &format!("file:{}", file.display()));
    let info = wait_migration(vm, T);
    assert_eq!(info["status"], "completed", "{info}");
}

#[test]
fn a_populated_snapshot_restores_by_mapping_and_its_guests_stay_their_own() {
    let test = "a_populated_snapshot_restores_by_mapping_and_its_guests_stay_their_own";
    if require_kvm(test).is_none() {
        return;
    }
    let mut spec = VmSpec::probe(&Cmdline::new().heartbeat_ms(20).pattern(5, "512M").build());
    spec.memory = "1G".into();
    let src = FerryVm::spawn("mapped-src", &spec, None);
    src.console.expect(READY, T);
    src.console.expect_seen("probe: pattern written");
    let file = TempPath::new("mapped.snap");
    snapshot(&src, &file);

    // The file form: the map header first, the RAM image sparse (the
    // pattern's pages and little else take room).
    let bytes = std::fs::read(&*file).map(|b| b[..8].to_vec()).unwrap();
    assert_eq!(&bytes, b"FERRYMAP");
    let meta = std::fs::metadata(&*file).unwrap();
    let used = meta.blocks() * 512;
    assert!(
        meta.len() > 1 << 30,
        "the image spans guest RAM: {}",
        meta.len()
    );
    assert!(
        (512 << 20..640 << 20).contains(&used),
        "only the pattern takes room: {used} bytes"
    );

    let a = restore("mapped-a", &file);
    let b = restore("mapped-b", &file);
    for vm in [&a, &b] {
        assert!(
            vm.stderr().contains("RAM mapped from the snapshot"),
            "{}",
            vm.stderr()
        );
        wait_heartbeats(&vm.console, 2, T);
        vm.console.assert_pattern_intact(T);
    }
    // A's writes are A's own: B still holds the snapshot's pattern.
    a.console.send_command("pattern-write 6 512M", T);
    a.console.assert_pattern_intact(T);
    b.console.assert_pattern_intact(T);

    // A new snapshot to the same path replaces the file (a new inode):
    // B's mapping keeps the old one.
    src.console.send_command("pattern-write 7 512M", T);
    snapshot(&src, &file);
    b.console.assert_pattern_intact(T);
    let c = restore("mapped-c", &file);
    let verify = c.console.send_command("pattern-verify", T);
    assert_eq!(
        verify.field("seed").as_deref(),
        Some("7"),
        "{:?}",
        verify.lines
    );
    c.console.assert_pattern_intact(T);

    // A program writing the file C maps, in place: C copies its memory
    // out of the file before the write goes ahead, and keeps its pattern.
    let dd = std::process::Command::new("dd")
        .args([
            "if=/dev/zero",
            "bs=1M",
            "count=600",
            "seek=0",
            "conv=notrunc,fsync",
        ])
        .arg(format!("of={}", file.display()))
        .output()
        .unwrap();
    assert!(
        dd.status.success(),
        "{}",
        String::from_utf8_lossy(&dd.stderr)
    );
    c.console.assert_pattern_intact(T);
    assert!(
        c.stderr().contains("copied out of it"),
        "the lease break was handled: {}",
        c.stderr()
    );
    wait_heartbeats(&c.console, 2, T);
}
