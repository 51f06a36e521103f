//! The allowlists: which calls each kind of thread may make, and on which
//! arguments (ioctl by its type byte, socket by its family).

/// Calls every thread makes: memory, signals, time, futexes, logging.
pub(super) const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
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
pub(super) const PROCESS: &[i64] = &[
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

/// A channel thread's: a failing channel shuts the others' connections
/// so none is left blocked.
pub(super) const CHANNEL: &[i64] = &[libc::SYS_shutdown];

/// What a destination may also call until its VM runs: it gives up its
/// capabilities then (and the snapshot lease thread as a restore maps its
/// file), after the stream was read under this filter.
pub(super) const ARRIVING: &[i64] = &[libc::SYS_capset];

/// An ioctl's type byte (bits 8–15 of its request number).
pub(super) const IOCTL_TYPE_MASK: u64 = 0xff00;

/// KVM's ioctls: the VM, its vCPUs, dirty logs, irqfds.
pub(super) const IOCTL_KVM: u64 = 0xae00;
/// 'T': TUN's (TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ), and the
/// terminal and descriptor ones std and the console use (TCGETS,
/// FIONBIO, FIONREAD, FIOCLEX).
pub(super) const IOCTL_TTY_TUN: u64 = 0x5400;
/// 'f': PAGEMAP_SCAN, the source's scan for written pages.
pub(super) const IOCTL_PAGEMAP: u64 = 0x6600;
/// 0x89: SIOC*, bringing a TAP's link up as a destination opens it.
pub(super) const IOCTL_SOCKET: u64 = 0x8900;

/// The socket families Ferry opens: unix (QMP, unix: migration, hand-
/// over), IPv4 and IPv6 (tcp: migration; an AF_INET socket for SIOC*).
pub(super) const SOCKET_FAMILIES: &[u64] = &[
    libc::AF_UNIX as u64,
    libc::AF_INET as u64,
    libc::AF_INET6 as u64,
];
