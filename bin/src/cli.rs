//! The command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmm::config::{parse_size, DEFAULT_CMDLINE, DEFAULT_MEMORY};
use vmm::{BootConfig, IncomingConfig, MachineConfig, SerialConfig, VmConfig};

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "A small KVM VMM that moves running guests without the network noticing"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a guest and run it until it powers off.
    Run(RunArgs),
    /// Say what this host's KVM can do.
    Check(CheckArgs),
    /// Talk to a running VM over its QMP socket.
    Ctl(crate::ctl::CtlArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Kernel: a bzImage, an ELF vmlinux, or an ELF with a PVH entry note.
    #[arg(long, value_name = "PATH", required_unless_present = "incoming")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (default: console=ttyS0).
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Guest memory, e.g. 512M or 2G (default 512M).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Number of vCPUs (default 1).
    #[arg(long, value_name = "N")]
    pub cpus: Option<u64>,
    /// Wait for an incoming migration (tcp:HOST:PORT, unix:PATH or
    /// file:PATH to restore a snapshot) instead of booting a kernel;
    /// `defer`: the URI comes later, by QMP's migrate-incoming (QEMU's
    /// `-incoming defer` is accepted too).
    #[arg(long, value_name = "URI|defer", conflicts_with_all = ["kernel", "initrd", "cmdline", "allow_no_userspace"])]
    pub incoming: Option<vmm::IncomingUri>,
    /// Serial console: stdio, file:PATH or none.
    #[arg(long, value_name = "WHERE", default_value = "stdio")]
    pub serial: String,
    /// A virtio-net NIC on a TAP (repeatable):
    /// tap=NAME[,mac=MAC][,id=ID][,guest-announce=on|off].
    #[arg(long = "net", value_name = "SPEC")]
    pub nets: Vec<String>,
    /// An object, as QMP's object-add makes (repeatable; QEMU's syntax):
    /// tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off].
    #[arg(long = "object", value_name = "SPEC")]
    pub objects: Vec<String>,
    /// QMP control socket: unix:PATH (QEMU's unix:PATH,server=on,wait=off
    /// is accepted too).
    #[arg(long, value_name = "unix:PATH")]
    pub qmp: Option<qmp::QmpSocketSpec>,
    /// Where guest RAM lives: anon (private memory, the default) or memfd
    /// (shared, so a local migration can hand the pages over).
    #[arg(long, value_name = "anon|memfd", default_value = "anon")]
    pub memory_backend: String,
    /// System calls once the VM runs: on (an allowlist per kind of
    /// thread; a forbidden call stops Ferry with one line), log (the
    /// kernel logs forbidden calls and lets them run) or off. Default
    /// on, or $FERRY_SECCOMP.
    #[arg(long, value_name = "on|log|off")]
    pub seccomp: Option<String>,
    /// Start in prelaunch: the guest runs only after QMP `cont`.
    #[arg(short = 'S', long = "paused")]
    pub paused: bool,
    /// Boot a Linux kernel even where it cannot reach userspace (kvm_pvm):
    /// for watching its early boot.
    #[arg(long)]
    pub allow_no_userspace: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn parse_serial(s: &str) -> Result<SerialConfig, String> {
    match s {
        "stdio" => Ok(SerialConfig::Stdio),
        "none" => Ok(SerialConfig::None),
        _ => match s.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(SerialConfig::File(PathBuf::from(path))),
            _ => Err(format!("--serial {s:?}: expected stdio, file:PATH or none")),
        },
    }
}

/// What `ferry run` was asked to do.
pub enum Start {
    Boot(VmConfig),
    Incoming(IncomingConfig),
}

fn parse_cpus(cpus: u64) -> Result<u8, String> {
    u8::try_from(cpus)
        .ok()
        .filter(|&n| n > 0 && n <= vmm::config::MAX_VCPUS)
        .ok_or_else(|| vmm::config::ConfigError::BadCpus(cpus).to_string())
}

fn parse_memory(memory: &str) -> Result<u64, String> {
    parse_size(memory).map_err(|e| format!("--memory: {e}"))
}

impl RunArgs {
    pub fn into_start(self) -> Result<Start, String> {
        let nets = self
            .nets
            .iter()
            .map(|spec| vmm::NetConfig::parse(spec).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let serial = parse_serial(&self.serial)?;
        let memory = self.memory.as_deref().map(parse_memory).transpose()?;
        let cpus = self.cpus.map(parse_cpus).transpose()?;
        let mut objects = vmm::objects::Objects::default();
        for spec in &self.objects {
            objects.add_from_cli(spec)?;
        }
        if let Some(uri) = self.incoming {
            return Ok(Start::Incoming(IncomingConfig {
                uri,
                memory,
                cpus,
                nets,
                serial,
                qmp: self.qmp,
                start_paused: self.paused,
                objects,
            }));
        }
        let memory_backend = match self.memory_backend.as_str() {
            "anon" => vmm::memory::MemoryBackend::Anonymous,
            "memfd" => vmm::memory::MemoryBackend::Memfd,
            other => {
                return Err(format!(
                    "--memory-backend {other:?}: expected anon or memfd"
                ))
            }
        };
        let kernel = self.kernel.ok_or("--kernel is required (or --incoming)")?;
        Ok(Start::Boot(VmConfig {
            machine: MachineConfig {
                memory_bytes: memory.unwrap_or(DEFAULT_MEMORY),
                vcpus: cpus.unwrap_or(1),
            },
            boot: BootConfig {
                kernel,
                initrd: self.initrd,
                cmdline: self.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            },
            serial,
            nets,
            allow_no_userspace: self.allow_no_userspace,
            qmp: self.qmp,
            start_paused: self.paused,
            memory_backend,
            objects,
        }))
    }
}

/// Prints a clap error as one line (help and version print as usual).
pub fn report_usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        };
    }
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or("invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    eprintln!("ferry: {first} (see `ferry --help`)");
    ExitCode::from(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_spellings() {
        assert_eq!(parse_serial("stdio"), Ok(SerialConfig::Stdio));
        assert_eq!(parse_serial("none"), Ok(SerialConfig::None));
        assert_eq!(
            parse_serial("file:/tmp/x"),
            Ok(SerialConfig::File("/tmp/x".into()))
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tcp:1").is_err());
    }
}
