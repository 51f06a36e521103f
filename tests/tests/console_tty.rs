//! The console on a terminal: raw mode while the guest runs, Ctrl-A x
//! quits like QEMU, and the terminal is restored afterwards.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use ferry_tests::ferry::ferry_bin;
use ferry_tests::host::require_kvm;
use ferry_tests::tiny::{write_guest, Ending};

fn openpty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds into the given ints; null name,
    // termios and winsize pointers are allowed.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

fn lflag(fd: &OwnedFd) -> libc::tcflag_t {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data filled by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and a valid termios to write into.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

#[test]
fn ctrl_a_x_quits_and_restores_the_terminal() {
    if require_kvm("ctrl_a_x_quits_and_restores_the_terminal").is_none() {
        return;
    }
    let guest = write_guest("tty", b"tty guest up\n", Ending::Spin);
    let (master, slave) = openpty();
    let before = lflag(&slave);
    assert_ne!(before & libc::ICANON, 0, "a fresh pty is canonical");

    let mut child = std::process::Command::new(ferry_bin())
        .args([
            "run",
            "--kernel",
            guest.to_str().unwrap(),
            "--memory",
            "64M",
        ])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut master = File::from(master);

    // Read until the guest spoke; by then ferry has set raw mode.
    let mut seen = Vec::new();
    let start = Instant::now();
    while !String::from_utf8_lossy(&seen).contains("tty guest up") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no guest output: {seen:?}"
        );
        let mut buf = [0u8; 256];
        let n = master.read(&mut buf).unwrap();
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(
        lflag(&slave) & (libc::ICANON | libc::ECHO),
        0,
        "raw mode while running"
    );

    master.write_all(&[0x01, b'x']).unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "Ctrl-A x did not end ferry"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}");
    assert_eq!(lflag(&slave), before, "terminal restored");
}
