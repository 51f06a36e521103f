//! Ferry's sockets are its owner's alone: under umask 000 the QMP socket
//! and a `unix:` migration listener are still created 0600, and a peer of
//! another user that reaches the listener anyway (its mode widened by
//! hand) is dropped by its credentials; the real source then migrates.
//!
//! One test in this binary: it sets the process's umask, which every
//! thread shares.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root, TempPath};
use ferry_tests::hosts::{assert_completed, migrate, wait_migration, wait_status};
use ferry_tests::probe::{Cmdline, READY};

const T: Duration = Duration::from_secs(60);

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn sockets_are_private_under_umask_000_and_strangers_are_refused() {
    let test = "sockets_are_private_under_umask_000_and_strangers_are_refused";
    if require_kvm(test).is_none() || !require_root(test) {
        return;
    }
    // SAFETY: umask only swaps the process's file mode mask; the children
    // spawned below inherit it, which is the point.
    let old = unsafe { libc::umask(0) };
    let sock = TempPath::new("private-migrate.sock");
    let mut spec = VmSpec::incoming(&format!("unix:{}", sock.display()));
    spec.env = vec![("FERRY_LOG".into(), "warn".into())];
    let dst = FerryVm::spawn("private-dst", &spec, None);
    let mut spec = VmSpec::probe(&Cmdline::new().heartbeat_ms(100).pattern(3, "4M").build());
    spec.memory = "64M".into();
    let src = FerryVm::spawn("private-src", &spec, None);
    src.console.expect(READY, T);
    // SAFETY: as above, restoring the mask.
    unsafe { libc::umask(old) };

    assert_eq!(mode(dst.qmp_path()), 0o600, "destination QMP socket");
    assert_eq!(mode(src.qmp_path()), 0o600, "source QMP socket");
    assert_eq!(mode(&sock), 0o600, "unix: migration listener");

    // Nobody (uid 65534) connects once the mode is widened by hand.
    std::fs::set_permissions(&*sock, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "socat",
            "-u",
        ])
        .arg("OPEN:/dev/null")
        .arg(format!("UNIX-CONNECT:{}", sock.display()))
        .output()
        .expect("setpriv socat");
    assert!(
        out.status.success(),
        "uid 65534 could not even connect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dst.stderr().contains("refused a peer running as uid 65534") {
        assert!(
            Instant::now() < deadline,
            "the stranger was not refused by its credentials: {}",
            dst.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(dst.stderr().contains("still listening"), "{}", dst.stderr());

    migrate(&src, &format!("unix:{}", sock.display()));
    let info = wait_migration(&src, T);
    assert_completed(&info, &src, &dst);
    wait_status(&dst, "running", T);
    dst.console.assert_pattern_intact(T);
}
