//! The machine: a KVM VM with its memory, vCPUs and devices, booted from a
//! kernel, and the loop that runs it.

pub mod acpi;
pub mod announce;
pub mod boot;
pub mod builder;
pub mod check;
pub mod commands;
pub mod config;
pub mod console;
pub mod control;
pub mod cpu;
pub mod exit;
pub mod layout;
pub mod memory;
pub mod migrate;
pub mod mptable;
pub mod objects;
pub mod privileges;
pub mod runstate;
pub mod seccomp;
pub mod state;
pub mod vcpu;
pub mod vm;

/// QMP, QEMU's control protocol: its own crate (`qmp/`), shared by
/// `ferry ctl` and the tests.
pub use qmp;

pub use config::{
    BootConfig, IncomingConfig, IncomingUri, MachineConfig, NetConfig, NetDescriptor, SerialConfig,
    VmConfig,
};
pub use exit::VmExit;
pub use vm::Vm;

use std::path::PathBuf;

/// Everything that can stop Ferry from building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error("device layout: {0}")]
    Bus(#[from] devices::BusError),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open serial output {path}: {source}")]
    SerialFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--cpus {asked} is more than this host's KVM allows ({max})")]
    TooManyVcpus { asked: u8, max: usize },
    #[error("this host's KVM is kvm_pvm: a Linux guest cannot reach userspace here (run `ferry check`); boot the probe guest instead, or pass --allow-no-userspace to watch its early boot")]
    LinuxNeedsHardwareVirt,
    #[error("event loop: {0}")]
    EventLoop(#[source] event_manager::Error),
    /// Not a failure: QMP `quit` while an incoming VM was arriving.
    #[error("quit (QMP) before the incoming VM had arrived")]
    QuitWhileArriving,
    #[error(transparent)]
    Tap(#[from] net::TapError),
    #[error("{0} virtio devices do not fit the interrupt lines of the IOAPIC")]
    TooManyDevices(usize),
    #[error("virtio queues: {0:?}")]
    Virtio(#[source] virtio_queue::Error),
    #[error("--qmp: {0}")]
    Qmp(#[from] qmp::QmpSetupError),
    #[error(transparent)]
    Incoming(#[from] migrate::IncomingError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Privileges(#[from] privileges::PrivilegeError),
    #[error("starting the guest: {0}")]
    Start(#[from] control::ControlError),
}
