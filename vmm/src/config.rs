//! What a VM is made of, as the user asked for it. The guest-visible part
//! ([`MachineConfig`]) travels in the migration stream; the host-side part
//! (paths, console) stays with the process.

use std::path::PathBuf;

use net::MacAddr;
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

/// One `--net` NIC: a virtio-net device on a TAP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: Option<MacAddr>,
    pub id: Option<String>,
    /// Offer VIRTIO_NET_F_GUEST_ANNOUNCE; None when not given (on for a
    /// new NIC, as the stream says for an incoming one).
    pub guest_announce: Option<bool>,
}

impl NetConfig {
    /// Parses `tap=NAME[,mac=MAC][,id=ID][,guest-announce=on|off]`.
    pub fn parse(spec: &str) -> Result<NetConfig, ConfigError> {
        let bad = |why: NetSpecError| ConfigError::BadNet {
            spec: spec.to_string(),
            why,
        };
        let mut net = NetConfig {
            tap: String::new(),
            mac: None,
            id: None,
            guest_announce: None,
        };
        let mut seen = Vec::new();
        for part in spec.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(NetSpecError::NotKeyValue(part.to_string())))?;
            if seen.contains(&key) {
                return Err(bad(NetSpecError::Twice(key.to_string())));
            }
            seen.push(key);
            match key {
                "tap" if !value.is_empty() && value.len() <= 15 => net.tap = value.to_string(),
                "tap" => return Err(bad(NetSpecError::TapName)),
                "mac" => {
                    let mac: MacAddr = value.parse().map_err(|e| bad(NetSpecError::Mac(e)))?;
                    if mac.is_multicast() {
                        return Err(bad(NetSpecError::MulticastMac(mac)));
                    }
                    net.mac = Some(mac);
                }
                "id" if !value.is_empty()
                    && value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
                {
                    net.id = Some(value.to_string())
                }
                "id" => return Err(bad(NetSpecError::Id)),
                "guest-announce" => {
                    net.guest_announce = match value {
                        "on" => Some(true),
                        "off" => Some(false),
                        _ => return Err(bad(NetSpecError::OnOff)),
                    }
                }
                _ => return Err(bad(NetSpecError::UnknownKey(key.to_string()))),
            }
        }
        if net.tap.is_empty() {
            return Err(bad(NetSpecError::NoTap));
        }
        Ok(net)
    }
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Boot a Linux kernel even on kvm_pvm, where it cannot reach userspace.
    pub allow_no_userspace: bool,
    pub machine: MachineConfig,
    pub boot: BootConfig,
    pub serial: SerialConfig,
    pub nets: Vec<NetConfig>,
    /// `--qmp`: the control socket.
    pub qmp: Option<crate::qmp::QmpSocketSpec>,
    /// `-S`: stay in prelaunch until `cont`.
    pub start_paused: bool,
    /// `--memory-backend`.
    pub memory_backend: crate::memory::MemoryBackend,
    /// `--object`: TLS credentials and the like, as `object-add` makes.
    pub objects: crate::objects::Objects,
}

/// `ferry run --incoming`: the VM comes from a migration stream; only
/// host-side choices come from the command line.
#[derive(Clone, Debug)]
pub struct IncomingConfig {
    pub uri: IncomingUri,
    /// Checked against the stream when given.
    pub memory: Option<u64>,
    pub cpus: Option<u8>,
    /// TAPs for the stream's NICs (by id, or by position).
    pub nets: Vec<NetConfig>,
    pub serial: SerialConfig,
    pub qmp: Option<crate::qmp::QmpSocketSpec>,
    pub start_paused: bool,
    /// `--object`.
    pub objects: crate::objects::Objects,
}

/// Where an incoming migration comes from: a URI to listen on (or a
/// file to read) now, or `defer`: QMP's `migrate-incoming` names it
/// later, after the orchestrator has set the migration up (QEMU's
/// `-incoming defer`, which libvirt uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IncomingUri {
    Now(migration::MigrationUri),
    Defer,
}

impl std::str::FromStr for IncomingUri {
    type Err = migration::UriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "defer" => Ok(Self::Defer),
            uri => uri.parse().map(Self::Now),
        }
    }
}

impl std::fmt::Display for IncomingUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Now(uri) => uri.fmt(f),
            Self::Defer => f.write_str("defer"),
        }
    }
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
    #[error("--net {spec}: {why}")]
    BadNet { spec: String, why: NetSpecError },
    #[error("--net: two NICs have the id {0}")]
    DuplicateNicId(String),
    #[error("--net: two NICs have the MAC {0}")]
    DuplicateMac(MacAddr),
    #[error("--net: two NICs use the TAP {0}")]
    DuplicateTap(String),
}

/// What is wrong with one `--net` spec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetSpecError {
    #[error("{0:?} is not key=value")]
    NotKeyValue(String),
    #[error("{0} given twice")]
    Twice(String),
    #[error("the TAP name must be 1 to 15 bytes")]
    TapName,
    #[error(transparent)]
    Mac(#[from] net::mac::MacParseError),
    #[error("{0} is a multicast address")]
    MulticastMac(MacAddr),
    #[error("the id must be letters, digits, '-', '_' or '.'")]
    Id,
    #[error("guest-announce is on or off")]
    OnOff,
    #[error("unknown key {0:?} (expected tap, mac, id, guest-announce)")]
    UnknownKey(String),
    #[error("tap=NAME is required")]
    NoTap,
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

/// A NIC with everything decided: what the migration stream carries so
/// the destination builds the same device (its TAP may be overridden).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDescriptor {
    pub id: String,
    pub mac: MacAddr,
    pub tap: String,
    pub guest_announce: bool,
}

/// Checks that NIC ids, MACs and TAPs are unique.
pub fn check_nets(nets: &[NetDescriptor]) -> Result<(), ConfigError> {
    for (i, n) in nets.iter().enumerate() {
        for other in &nets[..i] {
            if other.id == n.id {
                return Err(ConfigError::DuplicateNicId(n.id.clone()));
            }
            if other.mac == n.mac {
                return Err(ConfigError::DuplicateMac(n.mac));
            }
            if other.tap == n.tap {
                return Err(ConfigError::DuplicateTap(n.tap.clone()));
            }
        }
    }
    Ok(())
}

/// Gives every NIC its id (`net0`, `net1`, ... when not given) and MAC,
/// and checks they are unique.
pub fn resolve_nets(nets: &[NetConfig]) -> Result<Vec<NetDescriptor>, ConfigError> {
    let out: Vec<NetDescriptor> = nets
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let id = n.id.clone().unwrap_or_else(|| format!("net{i}"));
            let mac = n.mac.unwrap_or_else(|| MacAddr::local_for_id(&id));
            NetDescriptor {
                id,
                mac,
                tap: n.tap.clone(),
                guest_announce: n.guest_announce.unwrap_or(true),
            }
        })
        .collect();
    check_nets(&out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_specs() {
        let n =
            NetConfig::parse("tap=ftap0,mac=52:54:00:12:34:56,id=lan,guest-announce=off").unwrap();
        assert_eq!(n.tap, "ftap0");
        assert_eq!(n.mac, Some("52:54:00:12:34:56".parse().unwrap()));
        assert_eq!(n.id.as_deref(), Some("lan"));
        assert_eq!(n.guest_announce, Some(false));
        assert_eq!(NetConfig::parse("tap=t").unwrap().guest_announce, None);
        for bad in [
            "",
            "mac=52:54:00:12:34:56",
            "tap=",
            "tap=0123456789abcdef",
            "tap=t,mac=01:00:5e:00:00:01",
            "tap=t,mac=zz",
            "tap=t,color=red",
            "tap=t,tap=u",
            "tap=t,guest-announce=maybe",
            "tap",
            "tap=t,id=a b",
        ] {
            assert!(NetConfig::parse(bad).is_err(), "{bad:?}");
        }
        let nets = resolve_nets(&[
            NetConfig::parse("tap=a").unwrap(),
            NetConfig::parse("tap=b,id=x").unwrap(),
        ])
        .unwrap();
        assert_eq!((nets[0].id.as_str(), nets[1].id.as_str()), ("net0", "x"));
        assert_eq!(nets[0].mac, MacAddr::local_for_id("net0"));
        assert!(resolve_nets(&[
            NetConfig::parse("tap=a").unwrap(),
            NetConfig::parse("tap=a").unwrap()
        ])
        .is_err());
    }

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
