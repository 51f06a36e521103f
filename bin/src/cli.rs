//! The command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmm::config::{parse_size, DEFAULT_CMDLINE, DEFAULT_MEMORY};
use vmm::{BootConfig, MachineConfig, SerialConfig, VmConfig};

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
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u64,
    /// Serial console: stdio, file:PATH or none.
    #[arg(long, value_name = "WHERE", default_value = "stdio")]
    pub serial: String,
    /// A virtio-net NIC on a TAP (repeatable):
    /// tap=NAME[,mac=MAC][,id=ID][,guest-announce=on|off].
    #[arg(long = "net", value_name = "SPEC")]
    pub nets: Vec<String>,
    /// QMP control socket: unix:PATH (QEMU's unix:PATH,server=on,wait=off
    /// is accepted too).
    #[arg(long, value_name = "unix:PATH")]
    pub qmp: Option<vmm::qmp::QmpSocketSpec>,
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

impl RunArgs {
    pub fn into_config(self) -> Result<VmConfig, String> {
        let memory_bytes = parse_size(&self.memory).map_err(|e| format!("--memory: {e}"))?;
        let vcpus = u8::try_from(self.cpus)
            .ok()
            .filter(|&n| n > 0 && n <= vmm::config::MAX_VCPUS)
            .ok_or_else(|| vmm::config::ConfigError::BadCpus(self.cpus).to_string())?;
        let _ = DEFAULT_MEMORY;
        Ok(VmConfig {
            machine: MachineConfig {
                memory_bytes,
                vcpus,
            },
            boot: BootConfig {
                kernel: self.kernel,
                initrd: self.initrd,
                cmdline: self.cmdline,
            },
            serial: parse_serial(&self.serial)?,
            nets: self
                .nets
                .iter()
                .map(|spec| vmm::NetConfig::parse(spec).map_err(|e| e.to_string()))
                .collect::<Result<_, _>>()?,
            allow_no_userspace: self.allow_no_userspace,
            qmp: self.qmp,
            start_paused: self.paused,
        })
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
