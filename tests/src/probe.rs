//! The probe guest from the test side: building its ELF, composing its
//! command line, driving its serial console ([`console`]), and booting it
//! under QEMU ([`qemu`]).
//!
//! The [`Console`] wraps any byte stream pair (a child's stdin/stdout, a
//! socket, a pty), so the same driver serves guests run by QEMU and by Ferry.
//! Protocol: docs/probe.md.

pub mod checks;
pub mod console;
pub mod heartbeat;
pub mod qemu;

pub use console::{fields, Console, Reply};
pub use qemu::{boot_in_netns, can_run_qemu, Qemu, QemuConfig, QemuGuest, QemuNic, QmpClient};

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The probe's ready line, and the line it prints first.
pub const READY: &str = "probe: ready ";
pub const BOOT: &str = "probe: boot ferry-probe";

/// Builds the probe (once per test process) and returns the ELF's path.
///
/// The build runs `cargo build --release` in resources/probe with its own
/// target directory, so it never waits on the lock of the cargo that runs
/// the tests, and without the CARGO_*/RUSTFLAGS variables that cargo sets
/// for us (they would leak our profile and flags into the probe's build).
pub fn probe_elf() -> PathBuf {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| match build_probe() {
        Ok(path) => path,
        Err(e) => panic!("building the probe guest failed:\n{e}"),
    })
    .clone()
}

fn build_probe() -> Result<PathBuf, String> {
    let dir = crate::host::workspace_root().join("resources/probe");
    let target_dir = crate::host::workspace_root().join("target/probe");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--quiet", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&dir)
        .stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key == "RUSTFLAGS"
            || key == "RUSTC_WRAPPER"
            || key == "RUSTC_WORKSPACE_WRAPPER"
            || key == "RUSTDOCFLAGS"
        {
            cmd.env_remove(&key);
        }
    }
    let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let elf = target_dir.join("x86_64-unknown-linux-gnu/release/ferry-probe");
    if !elf.exists() {
        return Err(format!("{} missing after the build", elf.display()));
    }
    Ok(elf)
}

/// One identity: `mac` None = the device's own MAC; `vlan` None = untagged.
#[derive(Clone, Debug)]
pub struct IdentityArg {
    pub nic: usize,
    pub mac: Option<String>,
    pub vlan: Option<u16>,
    pub cidr: String,
    /// Answered but left out of the probe's own announce (`,quiet`).
    pub quiet: bool,
}

/// The probe's command line, built up field by field.
#[derive(Clone, Debug, Default)]
pub struct Cmdline {
    pub devices: Vec<String>,
    pub ids: Vec<IdentityArg>,
    pub announce: Option<bool>,
    pub heartbeat_ms: Option<u64>,
    pub dirty: Option<(String, String)>,
    pub pattern: Option<(u64, String)>,
    pub idle: Option<String>,
    pub extra: Vec<String>,
}

impl Cmdline {
    pub fn new() -> Cmdline {
        Cmdline::default()
    }

    /// A virtio-mmio device, `SIZE@ADDR:IRQ` (the n-th one is NIC n).
    pub fn device(mut self, size: &str, addr: u64, irq: u32) -> Self {
        self.devices
            .push(format!("virtio_mmio.device={size}@{addr:#x}:{irq}"));
        self
    }

    pub fn identity(
        mut self,
        nic: usize,
        mac: Option<&str>,
        vlan: Option<u16>,
        cidr: &str,
    ) -> Self {
        self.ids.push(IdentityArg {
            nic,
            mac: mac.map(str::to_string),
            vlan,
            cidr: cidr.to_string(),
            quiet: false,
        });
        self
    }

    /// The last identity added answers but is never in the probe's own
    /// gratuitous ARPs: an identity the guest's driver does not announce.
    pub fn quiet(mut self) -> Self {
        if let Some(id) = self.ids.last_mut() {
            id.quiet = true;
        }
        self
    }

    pub fn announce(mut self, on: bool) -> Self {
        self.announce = Some(on);
        self
    }

    pub fn heartbeat_ms(mut self, ms: u64) -> Self {
        self.heartbeat_ms = Some(ms);
        self
    }

    /// Dirty `size` at `rate` bytes/s (`"max"` = unthrottled), e.g. "64M".
    pub fn dirty(mut self, rate: &str, size: &str) -> Self {
        self.dirty = Some((rate.to_string(), size.to_string()));
        self
    }

    pub fn pattern(mut self, seed: u64, size: &str) -> Self {
        self.pattern = Some((seed, size.to_string()));
        self
    }

    /// `auto`, `spin` or `halt`.
    pub fn idle(mut self, mode: &str) -> Self {
        self.idle = Some(mode.to_string());
        self
    }

    pub fn extra(mut self, token: &str) -> Self {
        self.extra.push(token.to_string());
        self
    }

    pub fn build(&self) -> String {
        let mut parts = self.devices.clone();
        for id in &self.ids {
            parts.push(format!(
                "probe.id={},{},{},{}{}",
                id.nic,
                id.mac.as_deref().unwrap_or("dev"),
                id.vlan.map_or("none".to_string(), |v| v.to_string()),
                id.cidr,
                if id.quiet { ",quiet" } else { "" }
            ));
        }
        if let Some(on) = self.announce {
            parts.push(format!("probe.announce={}", if on { "on" } else { "off" }));
        }
        if let Some(ms) = self.heartbeat_ms {
            parts.push(format!("probe.heartbeat={ms}"));
        }
        if let Some((rate, size)) = &self.dirty {
            parts.push(format!("probe.dirty={rate},{size}"));
        }
        if let Some((seed, size)) = &self.pattern {
            parts.push(format!("probe.pattern={seed},{size}"));
        }
        if let Some(mode) = &self.idle {
            parts.push(format!("probe.idle={mode}"));
        }
        parts.extend(self.extra.iter().cloned());
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::time::Duration;

    #[test]
    fn cmdline_composition() {
        let line = Cmdline::new()
            .device("512", 0xfeb0_0e00, 12)
            .identity(0, None, None, "198.18.0.2/24")
            .identity(0, Some("02:00:00:00:00:64"), Some(100), "198.18.100.2/24")
            .announce(false)
            .heartbeat_ms(100)
            .pattern(7, "16M")
            .build();
        assert_eq!(
            line,
            "virtio_mmio.device=512@0xfeb00e00:12 probe.id=0,dev,none,198.18.0.2/24 \
             probe.id=0,02:00:00:00:00:64,100,198.18.100.2/24 probe.announce=off \
             probe.heartbeat=100 probe.pattern=7,16M"
        );
    }

    #[test]
    fn console_replies_are_parsed() {
        // A fake guest: answers the first tagged command from a script.
        let (guest_out, host_in) = std::os::unix::net::UnixStream::pair().unwrap();
        let (host_out, mut guest_in) = std::os::unix::net::UnixStream::pair().unwrap();
        let console = Console::new("fake", host_in, host_out);
        let mut writer = guest_out.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut line = String::new();
            BufReader::new(&mut guest_in).read_line(&mut line).unwrap();
            let tag = line
                .split_whitespace()
                .next()
                .unwrap()
                .trim_start_matches('@')
                .to_string();
            write!(
                writer,
                "probe: heartbeat n=1 uptime_ms=5\n={tag} counters nic=0 rx_frames=3 irqs=0x10\n={tag} counters ok\n"
            )
            .unwrap();
        });
        let reply = console.send_command("counters", Duration::from_secs(5));
        assert_eq!(reply.command, "counters");
        assert_eq!(reply.number("rx_frames"), Some(3));
        assert_eq!(reply.number("irqs"), Some(16));
        assert!(console.output().contains("heartbeat n=1"));
        let err = console
            .wait_for("nothing", Duration::from_millis(50), |_| false)
            .unwrap_err();
        assert!(
            err.contains("recent console output") && err.contains("counters ok"),
            "{err}"
        );
    }
}
