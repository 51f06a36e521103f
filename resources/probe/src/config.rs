//! The probe's configuration from its command line (docs/probe.md).
//!
//! Tokens are separated by spaces. Ones the probe does not know are left
//! alone (the command line may carry other programs' options), except
//! unknown `probe.*` keys, which are reported.

use ferry_probe_packets::{Ipv4Addr, MacAddr};

use crate::interrupts::MAX_NICS;

#[derive(Clone, Copy)]
pub struct DeviceSpec {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// An identity as configured: `mac` None means the device's own MAC.
#[derive(Clone, Copy)]
pub struct IdentitySpec {
    pub nic: usize,
    pub mac: Option<MacAddr>,
    pub vlan: Option<u16>,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    /// `,quiet`: answered, but never in the probe's own announce — an
    /// identity a guest's driver leaves out (an L2 bridge, DPDK, a
    /// forgotten address), for the host to announce.
    pub quiet: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum IdleMode {
    /// Halt after a short spin, on both kinds of KVM (see `main.rs`).
    Auto,
    Spin,
    Halt,
}

pub const MAX_CONFIG_IDS: usize = 32;
pub const MAX_CONFIG_ERRORS: usize = 8;

pub struct Config {
    pub devices: [Option<DeviceSpec>; MAX_NICS],
    pub device_count: usize,
    pub ids: [Option<IdentitySpec>; MAX_CONFIG_IDS],
    pub announce: bool,
    pub heartbeat_ms: u64,
    /// (bytes per second, 0 = unthrottled; region size)
    pub dirty: Option<(u64, u64)>,
    /// (seed, size)
    pub pattern: Option<(u64, u64)>,
    pub idle: IdleMode,
    /// (event register address, GSI) of an ACPI Generic Event Device whose
    /// bit 0 is the power button (`probe.ged=ADDR,GSI`).
    pub ged: Option<(u64, u32)>,
    /// Lines to print right after `ready`, each waiting for room in the
    /// console ring instead of being dropped (`probe.flood=N`).
    pub flood: u64,
    pub errors: [Option<(&'static str, &'static str)>; MAX_CONFIG_ERRORS],
}

/// A number: decimal or 0x-hex, optional K/M/G (binary) suffix.
pub fn parse_size(text: &str) -> Option<u64> {
    let (digits, multiplier) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&text[..text.len() - 1], 1 << 20),
        b'g' | b'G' => (&text[..text.len() - 1], 1 << 30),
        _ => (text, 1),
    };
    parse_number(digits)?.checked_mul(multiplier)
}

pub fn parse_number(text: &str) -> Option<u64> {
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse().ok()
    } else {
        None
    }
}

/// `none` or a VLAN id 1..4094.
pub fn parse_vlan(text: &str) -> Option<Option<u16>> {
    if text == "none" || text == "-" {
        return Some(None);
    }
    let vid = parse_number(text)?;
    (1..=4094).contains(&vid).then_some(Some(vid as u16))
}

/// `A.B.C.D/P` (prefix defaults to 24).
pub fn parse_cidr(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, prefix) = match text.split_once('/') {
        Some((ip, p)) => (ip, parse_number(p)?),
        None => (text, 24),
    };
    if prefix > 32 {
        return None;
    }
    Some((Ipv4Addr::parse(ip)?, prefix as u8))
}

/// `dev` (the device's own) or a MAC.
pub fn parse_mac_choice(text: &str) -> Option<Option<MacAddr>> {
    if text == "dev" {
        Some(None)
    } else {
        MacAddr::parse(text).map(Some)
    }
}

/// `NIC,MAC|dev,VLAN|none,IP/PREFIX`
pub fn parse_identity(text: &str) -> Option<IdentitySpec> {
    let mut parts = text.split(',');
    let nic = parse_number(parts.next()?)? as usize;
    let mac = parse_mac_choice(parts.next()?)?;
    let vlan = parse_vlan(parts.next()?)?;
    let (ip, prefix) = parse_cidr(parts.next()?)?;
    let quiet = match parts.next() {
        None => false,
        Some("quiet") => true,
        Some(_) => return None,
    };
    if parts.next().is_some() || nic >= MAX_NICS {
        return None;
    }
    Some(IdentitySpec {
        nic,
        mac,
        vlan,
        ip,
        prefix,
        quiet,
    })
}

/// `SIZE@ADDR:IRQ[:ID]` as Linux's virtio_mmio.device= takes it.
pub fn parse_device(text: &str) -> Option<DeviceSpec> {
    let (size, rest) = text.split_once('@')?;
    let mut parts = rest.split(':');
    let base = parse_number(parts.next()?)?;
    let irq = parse_number(parts.next()?)?;
    Some(DeviceSpec {
        base,
        size: parse_size(size)?,
        irq: u32::try_from(irq).ok()?,
    })
}

fn parse_pair(text: &str) -> Option<(u64, u64)> {
    let (a, b) = text.split_once(',')?;
    let first = if a == "max" { 0 } else { parse_size(a)? };
    Some((first, parse_size(b)?))
}

impl Config {
    pub fn parse(cmdline: &'static str) -> Config {
        let mut config = Config {
            devices: [None; MAX_NICS],
            device_count: 0,
            ids: [None; MAX_CONFIG_IDS],
            announce: true,
            heartbeat_ms: 0,
            dirty: None,
            pattern: None,
            idle: IdleMode::Auto,
            ged: None,
            flood: 0,
            errors: [None; MAX_CONFIG_ERRORS],
        };
        for token in cmdline.split_ascii_whitespace() {
            let (key, value) = token.split_once('=').unwrap_or((token, ""));
            let ok = match key {
                "virtio_mmio.device" => match parse_device(value) {
                    Some(dev) if config.device_count < MAX_NICS => {
                        config.devices[config.device_count] = Some(dev);
                        config.device_count += 1;
                        true
                    }
                    _ => false,
                },
                "probe.id" => match (
                    parse_identity(value),
                    config.ids.iter_mut().find(|s| s.is_none()),
                ) {
                    (Some(id), Some(slot)) => {
                        *slot = Some(id);
                        true
                    }
                    _ => false,
                },
                "probe.announce" => match value {
                    "on" => {
                        config.announce = true;
                        true
                    }
                    "off" => {
                        config.announce = false;
                        true
                    }
                    _ => false,
                },
                "probe.flood" => parse_number(value).map(|n| config.flood = n).is_some(),
                "probe.heartbeat" => parse_number(value)
                    .map(|ms| config.heartbeat_ms = ms)
                    .is_some(),
                "probe.dirty" => parse_pair(value).map(|d| config.dirty = Some(d)).is_some(),
                "probe.pattern" => parse_pair(value)
                    .map(|p| config.pattern = Some(p))
                    .is_some(),
                "probe.idle" => {
                    config.idle = match value {
                        "auto" => IdleMode::Auto,
                        "spin" => IdleMode::Spin,
                        "halt" => IdleMode::Halt,
                        _ => IdleMode::Auto,
                    };
                    matches!(value, "auto" | "spin" | "halt")
                }
                "probe.ged" => value
                    .split_once(',')
                    .and_then(|(a, g)| {
                        Some((parse_number(a)?, u32::try_from(parse_number(g)?).ok()?))
                    })
                    .map(|g| config.ged = Some(g))
                    .is_some(),
                k if k.starts_with("probe.") => false,
                _ => true,
            };
            if !ok {
                if let Some(slot) = config.errors.iter_mut().find(|s| s.is_none()) {
                    *slot = Some((key, value));
                }
            }
        }
        config
    }
}
