//! Seccomp: once the VM is set up, every thread may make only the system
//! calls Ferry needs from then on (`seccompiler`'s BPF). Two filters
//! stack: the process's, installed on every thread at once as the VM
//! starts to run (threads made later inherit it), and a narrower one each
//! vCPU thread adds for itself before it first enters the guest. A call
//! outside them is, with `--seccomp on`, reported in one line naming the
//! thread and the call, and the process stops; with `log` the kernel logs
//! it (dmesg, audit type 1326) and lets it run; `off` installs nothing.
//! `no_new_privs` comes with the filters.

mod names;

use std::collections::BTreeMap;
use std::str::FromStr;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// `--seccomp`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    On,
    // The default until every path is known to stay inside the lists: a
    // restore from file: was stopped once in a full run (see trust.md).
    #[default]
    Log,
    Off,
}

impl FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" | "true" => Ok(Self::On),
            "log" => Ok(Self::Log),
            "off" | "false" => Ok(Self::Off),
            _ => Err(format!("--seccomp {s:?}: expected on, log or off")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: cannot build the {kind} filter: {why}")]
    Build { kind: &'static str, why: String },
    #[error("seccomp: cannot install the {kind} filter: {why}")]
    Install { kind: &'static str, why: String },
    #[error("seccomp: cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// Who a filter is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Every thread: the event loop (QMP, devices, the announcer), the
    /// migration and its helpers, and the base of the vCPUs'.
    Process,
    /// A vCPU: KVM_RUN and what its exits do (device registers, a TAP
    /// write, the serial console, a kick).
    Vcpu,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Vcpu => "vCPU",
        }
    }
}

/// Calls every thread makes: memory, signals, time, futexes, logging.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_ioctl,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_prctl,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_fcntl,
];

/// The rest of what the event loop, QMP, migrations (tcp, unix, file,
/// multifd, TLS, hand-over), snapshots and their helper threads call.
const PROCESS: &[i64] = &[
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_openat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_flock,
    libc::SYS_fadvise64,
    libc::SYS_readlink,
    libc::SYS_getcwd,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_memfd_create,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_wait4,
    libc::SYS_kill,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_getrusage,
    libc::SYS_mincore,
    libc::SYS_sched_setaffinity,
    libc::SYS_membarrier,
    libc::SYS_splice,
    libc::SYS_sendfile,
    libc::SYS_copy_file_range,
    // A vCPU thread adds its own filter on top of this one.
    libc::SYS_seccomp,
];

fn rules(calls: &[&[i64]]) -> BTreeMap<i64, Vec<seccompiler::SeccompRule>> {
    calls
        .iter()
        .flat_map(|c| c.iter())
        .map(|&nr| (nr, Vec::new()))
        .collect()
}

fn program(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let calls: &[&[i64]] = match kind {
        ThreadKind::Process => &[COMMON, PROCESS],
        ThreadKind::Vcpu => &[COMMON],
    };
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let build = |why: String| SeccompError::Build {
        kind: kind.name(),
        why,
    };
    let filter = SeccompFilter::new(
        rules(calls),
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| build(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| build(e.to_string()))
}

/// The process's filter on every thread, and the SIGSYS report. Called
/// once the VM is built, before its vCPU threads start.
pub fn install_process(mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    install_sigsys_handler()?;
    let prog = program(ThreadKind::Process, mode)?;
    seccompiler::apply_filter_all_threads(&prog).map_err(|e| SeccompError::Install {
        kind: ThreadKind::Process.name(),
        why: e.to_string(),
    })
}

/// The calling vCPU thread's own filter, on top of the process's.
pub fn install_vcpu(mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    let prog = program(ThreadKind::Vcpu, mode)?;
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Install {
        kind: ThreadKind::Vcpu.name(),
        why: e.to_string(),
    })
}

/// The name of system call `nr`, or "" when there is none.
pub fn syscall_name(nr: i64) -> &'static str {
    usize::try_from(nr)
        .ok()
        .and_then(|i| names::NAMES.get(i))
        .copied()
        .unwrap_or("")
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; the handler is an extern "C"
    // function that only makes async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Appends `s` to `buf` at `*at`, as far as it fits.
fn put(buf: &mut [u8], at: &mut usize, s: &[u8]) {
    for &b in s {
        if *at < buf.len() {
            buf[*at] = b;
            *at += 1;
        }
    }
}

fn put_number(buf: &mut [u8], at: &mut usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(buf, at, &digits[i..]);
}

/// One line, then the process ends: a forbidden call means a thread does
/// something Ferry never does, and the VM must not go on. Only
/// async-signal-safe calls: prctl for the thread's name, write, _exit.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SIGSYS's siginfo: after signo, errno, code and padding (16 bytes)
    // come the call's address (8) and its number (int).
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let nr = unsafe {
        (info as *const u8)
            .add(24)
            .cast::<libc::c_int>()
            .read_unaligned()
    };
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(16);
    let mut line = [0u8; 160];
    let mut at = 0;
    put(&mut line, &mut at, b"ferry: seccomp: thread '");
    put(&mut line, &mut at, &name[..name_len]);
    put(&mut line, &mut at, b"' made a forbidden system call: ");
    let call = syscall_name(i64::from(nr));
    put(
        &mut line,
        &mut at,
        if call.is_empty() {
            b"?"
        } else {
            call.as_bytes()
        },
    );
    put(&mut line, &mut at, b" (");
    put_number(&mut line, &mut at, nr.max(0) as u64);
    put(&mut line, &mut at, b"); stopping\n");
    // SAFETY: write and _exit are async-signal-safe; `line` is valid for
    // `at` bytes.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), at);
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// For the test of the report: the calling thread makes a call no filter
/// allows (getpgrp: harmless were it allowed).
pub fn make_a_forbidden_call() {
    // SAFETY: getpgrp has no arguments and no effect.
    unsafe { libc::syscall(libc::SYS_getpgrp) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_modes() {
        assert_eq!(syscall_name(libc::SYS_read), "read");
        assert_eq!(syscall_name(libc::SYS_getpgrp), "getpgrp");
        assert_eq!(syscall_name(-1), "");
        assert_eq!(syscall_name(100_000), "");
        assert_eq!("log".parse::<SeccompMode>(), Ok(SeccompMode::Log));
        assert!("maybe".parse::<SeccompMode>().is_err());
        for kind in [ThreadKind::Process, ThreadKind::Vcpu] {
            for mode in [SeccompMode::On, SeccompMode::Log] {
                assert!(!program(kind, mode).unwrap().is_empty());
            }
        }
        let process = rules(&[COMMON, PROCESS]);
        assert!(!process.contains_key(&libc::SYS_execve));
        assert!(!process.contains_key(&libc::SYS_ptrace));
        assert!(!process.contains_key(&libc::SYS_getpgrp));
    }
}
