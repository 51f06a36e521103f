//! What a VM is made of, as the user asked for it. The guest-visible part
//! ([`MachineConfig`]) travels in the migration stream; the host-side part
//! (paths, console) stays with the process.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::layout;

/// The guest-visible shape of the machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub memory_bytes: u64,
    pub vcpus: u8,
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct BootConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// Where the serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    /// stdin/stdout; raw terminal with the Ctrl-A escape when stdin is a tty.
    Stdio,
    File(PathBuf),
    None,
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Boot a Linux kernel even on kvm_pvm, where it cannot reach userspace.
    pub allow_no_userspace: bool,
    pub machine: MachineConfig,
    pub boot: BootConfig,
    pub serial: SerialConfig,
}

pub const DEFAULT_MEMORY: u64 = 512 << 20;
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
/// KVM's IOAPIC/LAPIC ids are 8 bits; the MP table and MADT use u8 ids.
pub const MAX_VCPUS: u8 = 254;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "invalid size {0:?}: expected a number with an optional K, M, G or T suffix (e.g. 512M)"
    )]
    BadSize(String),
    #[error("--memory must be at least 16M, got {0}")]
    MemoryTooSmall(String),
    #[error("--memory {asked} is more than this host can give ({host} of RAM)")]
    MemoryTooLarge { asked: String, host: String },
    #[error("--cpus must be between 1 and {MAX_VCPUS}, got {0}")]
    BadCpus(u64),
}

/// Parses `512M`, `2G`, `1048576`, `64k` (binary units).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Formats a byte count the way users write it (`512M`, `1.5G`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("T", 1 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if bytes >= size {
            return if bytes.is_multiple_of(size) {
                format!("{}{unit}", bytes / size)
            } else {
                format!("{:.1}{unit}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes}")
}

impl MachineConfig {
    /// Checks the machine against this host: sizes the guest can use and
    /// the host can back.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::BadCpus(u64::from(self.vcpus)));
        }
        if self.memory_bytes < (16 << 20) {
            return Err(ConfigError::MemoryTooSmall(format_size(self.memory_bytes)));
        }
        let host = host_memory_bytes().unwrap_or(layout::MAX_MEMORY);
        if self.memory_bytes > host.min(layout::MAX_MEMORY) {
            return Err(ConfigError::MemoryTooLarge {
                asked: format_size(self.memory_bytes),
                host: format_size(host),
            });
        }
        Ok(())
    }
}

/// Physical RAM plus swap of the host: more than this can never be backed.
fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some(field("MemTotal:")? + field("SwapTotal:").unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "M", "12Q", "1.5G", "-1G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(format_size(512 << 20), "512M");
        assert_eq!(format_size(3 << 29), "1.5G");
    }

    #[test]
    fn machine_limits() {
        let ok = MachineConfig {
            memory_bytes: 512 << 20,
            vcpus: 2,
        };
        assert_eq!(ok.validate(), Ok(()));
        let zero = MachineConfig {
            memory_bytes: 0,
            ..ok.clone()
        };
        assert!(matches!(
            zero.validate(),
            Err(ConfigError::MemoryTooSmall(_))
        ));
        let huge = MachineConfig {
            memory_bytes: 1 << 50,
            ..ok.clone()
        };
        assert!(matches!(
            huge.validate(),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        let no_cpu = MachineConfig { vcpus: 0, ..ok };
        assert_eq!(no_cpu.validate(), Err(ConfigError::BadCpus(0)));
    }
}
