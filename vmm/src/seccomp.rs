//! Seccomp: once the VM is set up, every thread may make only the system
//! calls Ferry needs from then on (`seccompiler`'s BPF). Two filters
//! stack: the process's, installed on every thread at once as the VM
//! starts to run (threads made later inherit it), and a narrower one each
//! vCPU thread adds for itself before it first enters the guest. A call
//! outside them is, with `--seccomp on`, reported in one line naming the
//! thread and the call, and the process stops; with `log` the kernel logs
//! it (dmesg, audit type 1326) and lets it run; `off` installs nothing.
//! `no_new_privs` comes with the filters.

mod lists;
mod names;

use lists::*;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// `--seccomp`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    #[default]
    On,
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
    /// Every thread of a destination, from before it reads the stream
    /// until its VM runs: the process's list and capset.
    Arriving,
    /// Every thread once the VM runs: the event loop (devices, QMP and
    /// what its commands start: migrations, snapshots, hand-over, the
    /// announcer) and their helper threads.
    Process,
    /// A vCPU: KVM_RUN and what its exits do (device registers, a TAP
    /// write, the serial console, a kick); no ioctl but KVM's and TUN's.
    Vcpu,
    /// A migration channel's thread (multifd, either end): pages between
    /// a connected socket and guest memory; no file or socket opened, no
    /// thread made, no ioctl but the pagemap scan.
    Channel,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            Self::Arriving => "arriving",
            Self::Process => "process",
            Self::Vcpu => "vCPU",
            Self::Channel => "channel",
        }
    }

    fn calls(self) -> &'static [&'static [i64]] {
        match self {
            Self::Arriving => &[COMMON, PROCESS, ARRIVING],
            Self::Process => &[COMMON, PROCESS],
            // REFUSED_GENTLY passes here for [`refusals`] to fail it: a
            // trap in one stacked filter would win over its error.
            Self::Vcpu => &[COMMON, REFUSED_GENTLY],
            Self::Channel => &[COMMON, CHANNEL, REFUSED_GENTLY],
        }
    }

    /// The ioctl types this kind may use.
    fn ioctl_types(self) -> &'static [u64] {
        match self {
            Self::Arriving | Self::Process => {
                &[IOCTL_KVM, IOCTL_TTY_TUN, IOCTL_PAGEMAP, IOCTL_SOCKET]
            }
            // TUN's too: the driver's FEATURES_OK sets the TAP's offloads.
            Self::Vcpu => &[IOCTL_KVM, IOCTL_TTY_TUN],
            // PAGEMAP_SCAN: which pages of a pass are worth reading.
            Self::Channel => &[IOCTL_PAGEMAP],
        }
    }

    fn opens_sockets(self) -> bool {
        matches!(self, Self::Arriving | Self::Process)
    }
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn rules(kind: ThreadKind) -> Result<Rules, seccompiler::BackendError> {
    let mut rules: Rules = kind
        .calls()
        .iter()
        .flat_map(|c| c.iter())
        .map(|&nr| (nr, Vec::new()))
        .collect();
    // One rule per allowed value: the call passes if any matches.
    let when = |arg: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
            .and_then(|c| SeccompRule::new(vec![c]))
    };
    let ioctls = kind
        .ioctl_types()
        .iter()
        .map(|&t| when(1, SeccompCmpOp::MaskedEq(IOCTL_TYPE_MASK), t))
        .collect::<Result<Vec<_>, _>>()?;
    if !ioctls.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctls);
    }
    if kind.opens_sockets() {
        let families = SOCKET_FAMILIES
            .iter()
            .map(|&f| when(0, SeccompCmpOp::Eq, f))
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_socket, families);
    }
    Ok(rules)
}

fn program(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let build = |why: String| SeccompError::Build {
        kind: kind.name(),
        why,
    };
    let filter = SeccompFilter::new(
        rules(kind).map_err(|e| build(e.to_string()))?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| build(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| build(e.to_string()))
}

/// The mode the process's filters were installed in (0: none yet), for
/// the threads that add their own later.
static INSTALLED: AtomicU8 = AtomicU8::new(0);

fn installed_mode() -> Option<SeccompMode> {
    match INSTALLED.load(Ordering::Acquire) {
        1 => Some(SeccompMode::On),
        2 => Some(SeccompMode::Log),
        _ => None,
    }
}

/// `kind`'s filter on every thread, and the SIGSYS report: `Process`
/// once the VM is built, before its vCPU threads start; `Arriving` on a
/// destination before it reads anything a source sends.
pub fn install_process(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    install_sigsys_handler()?;
    let prog = program(kind, mode)?;
    seccompiler::apply_filter_all_threads(&prog).map_err(|e| SeccompError::Install {
        kind: kind.name(),
        why: e.to_string(),
    })?;
    INSTALLED.store(
        if mode == SeccompMode::On { 1 } else { 2 },
        Ordering::Release,
    );
    Ok(())
}

/// The calling vCPU thread's own filter, on top of the process's.
pub fn install_vcpu(mode: SeccompMode) -> Result<(), SeccompError> {
    install_own(ThreadKind::Vcpu, mode)
}

/// The calling migration channel thread's own filter, once its
/// connection is made, when the process is under seccomp.
pub fn install_channel() -> Result<(), SeccompError> {
    installed_mode().map_or(Ok(()), |mode| install_own(ThreadKind::Channel, mode))
}

/// The calling thread's own filters for `kind` (a vCPU, a channel), on
/// top of the process's. Built once per kind: every vCPU, and every pass
/// of a migration's channels, would otherwise compile them again.
fn install_own(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    type Programs = Result<(SeccompMode, [BpfProgram; 2]), String>;
    static VCPU: OnceLock<Programs> = OnceLock::new();
    static CHANNEL: OnceLock<Programs> = OnceLock::new();
    if mode == SeccompMode::Off {
        return Ok(());
    }
    let build = || -> Programs {
        let text = |e: SeccompError| e.to_string();
        // The refusals first: the kind's own list has no seccomp call.
        Ok((
            mode,
            [
                refusals(kind).map_err(text)?,
                program(kind, mode).map_err(text)?,
            ],
        ))
    };
    let cache = match kind {
        ThreadKind::Channel => &CHANNEL,
        _ => &VCPU,
    };
    let cached = cache.get_or_init(build);
    // The process has one mode; another (only in tests) is built afresh.
    let fresh;
    let progs = match cached {
        Ok((m, progs)) if *m == mode => progs,
        _ => {
            fresh = build();
            &fresh
                .as_ref()
                .map_err(|why| SeccompError::Build {
                    kind: kind.name(),
                    why: why.clone(),
                })?
                .1
        }
    };
    for prog in progs {
        seccompiler::apply_filter(prog).map_err(|e| SeccompError::Install {
            kind: kind.name(),
            why: e.to_string(),
        })?;
    }
    Ok(())
}

/// Calls a thread of `kind` may not make but that the C library makes
/// on its own: they fail (EACCES) instead of stopping Ferry. glibc's
/// malloc reads /proc/sys/vm/overcommit_memory the first time a thread's
/// heap shrinks, and copes when it cannot.
const REFUSED_GENTLY: &[i64] = &[libc::SYS_openat, libc::SYS_open];

/// The filter that makes [`REFUSED_GENTLY`] fail, for a kind whose own
/// list lacks them (stacked filters: an error wins over an allow).
fn refusals(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |why: String| SeccompError::Build {
        kind: kind.name(),
        why,
    };
    let rules = REFUSED_GENTLY.iter().map(|&nr| (nr, Vec::new())).collect();
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| build(e.to_string()))?
    .try_into()
    .map_err(|e: seccompiler::BackendError| build(e.to_string()))
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
        let kinds = [
            ThreadKind::Arriving,
            ThreadKind::Process,
            ThreadKind::Vcpu,
            ThreadKind::Channel,
        ];
        for kind in kinds {
            for mode in [SeccompMode::On, SeccompMode::Log] {
                assert!(!program(kind, mode).unwrap().is_empty());
            }
            let r = rules(kind).unwrap();
            for never in [libc::SYS_execve, libc::SYS_ptrace, libc::SYS_getpgrp] {
                assert!(!r.contains_key(&never), "{kind:?}");
            }
        }
        let process = rules(ThreadKind::Process).unwrap();
        assert!(!process.contains_key(&libc::SYS_capset));
        assert!(rules(ThreadKind::Arriving)
            .unwrap()
            .contains_key(&libc::SYS_capset));
        assert_eq!(process[&libc::SYS_ioctl].len(), 4);
        assert_eq!(process[&libc::SYS_socket].len(), 3);
        let channel = rules(ThreadKind::Channel).unwrap();
        assert_eq!(channel[&libc::SYS_ioctl].len(), 1);
        for absent in [libc::SYS_socket, libc::SYS_clone3, libc::SYS_connect] {
            assert!(!channel.contains_key(&absent));
        }
    }

    #[test]
    fn a_channel_thread_cannot_open_a_file_and_goes_on() {
        let opened = std::thread::spawn(|| {
            let kind = ThreadKind::Channel;
            for prog in [
                refusals(kind).unwrap(),
                program(kind, SeccompMode::On).unwrap(),
            ] {
                seccompiler::apply_filter(&prog).unwrap();
            }
            let opened = std::fs::File::open("/proc/self/status").map(|_| ());
            // What a channel does: memory, time, a write to a descriptor.
            let v = vec![7u8; 1 << 20];
            let _ = std::time::Instant::now();
            (opened, v.len())
        })
        .join()
        .unwrap();
        assert_eq!(opened.0.unwrap_err().raw_os_error(), Some(libc::EACCES));
        assert_eq!(opened.1, 1 << 20);
        // Other threads are not under it.
        assert!(std::fs::File::open("/proc/self/status").is_ok());
    }
}
