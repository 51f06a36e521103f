//! Capabilities: what root's Ferry needs only while it sets up (opening a
//! TAP needs CAP_NET_ADMIN, a listener on a low port CAP_NET_BIND_SERVICE,
//! KVM and the guest's memory none) is given up before the guest runs.
//! Once running, Ferry keeps no capability: its descriptors (KVM, TAPs,
//! sockets, memory) are all it uses, and files it writes later (a
//! snapshot) are checked against its uid like any process's.

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot drop the capabilities: {0}")]
    Capset(std::io::Error),
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn last_cap() -> u64 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// Empties the calling thread's bounding, ambient, effective, permitted
/// and inheritable sets. Threads it starts afterwards inherit the empty
/// sets; threads that exist already keep theirs (call it before them).
pub fn drop_all() -> Result<(), PrivilegeError> {
    // Without CAP_SETPCAP (not root) the bounding set stays as it is:
    // there is nothing in the effective set to lose either.
    for cap in 0..=last_cap() {
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
    // SAFETY: as above.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads one header and two data structs (version 3),
    // both valid for the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if r != 0 {
        return Err(PrivilegeError::Capset(std::io::Error::last_os_error()));
    }
    Ok(())
}
