//! The Linux test guest from the test side: finding (or building) it, its
//! kernel command line, and its ready marker.
//!
//! The guest is Debian's cloud kernel plus a busybox initramfs, built by
//! `resources/linux-guest/build.sh` into `resources/cache/linux-guest/<key>/`
//! (docs/linux-guest.md says what is in it, the `ferry.*` parameters and the
//! marker format).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The first word of the line the guest's /init prints when it is ready.
pub const READY_MARKER: &str = "FERRY-GUEST-READY";

/// The start of the guest shell's prompt (`ferry-guest:<cwd># `).
pub const PROMPT: &str = "ferry-guest:";

/// Environment variable naming a prebuilt guest directory (one holding
/// `bzImage`, `vmlinux`, `initramfs.cpio.gz` and `manifest`); when set, the
/// build script is not run.
pub const DIR_ENV: &str = "FERRY_LINUX_GUEST_DIR";

/// One build of the Linux test guest: its files and what the build found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxGuest {
    /// The cache directory holding everything below.
    pub dir: PathBuf,
    /// Debian's kernel as shipped (boot protocol bzImage).
    pub bzimage: PathBuf,
    /// The ELF kernel extracted from the bzImage.
    pub vmlinux: PathBuf,
    /// The busybox initramfs (gzip-compressed newc cpio).
    pub initramfs: PathBuf,
    /// `uname -r` of the kernel, e.g. `6.12.117+deb12-cloud-amd64`.
    pub kernel_release: String,
    /// The Debian package and version the kernel came from.
    pub kernel_package: String,
    pub kernel_package_version: String,
    /// The busybox-static version in the initramfs.
    pub busybox_version: String,
    /// The physical entry of the vmlinux's PVH note
    /// (XEN_ELFNOTE_PHYS32_ENTRY), when it has one.
    pub pvh_entry: Option<u64>,
    /// Modules in the initramfs (the wanted ones and their dependencies).
    pub modules: Vec<String>,
    /// Wanted modules that this kernel has built in.
    pub modules_builtin: Vec<String>,
}

impl LinuxGuest {
    /// Whether the vmlinux can be booted through PVH.
    pub fn has_pvh(&self) -> bool {
        self.pvh_entry.is_some()
    }

    /// Reads the guest in `dir` from its manifest; checks the files exist.
    pub fn load(dir: &Path) -> Result<LinuxGuest, String> {
        let manifest = dir.join("manifest");
        let text = std::fs::read_to_string(&manifest)
            .map_err(|e| format!("{}: {e}", manifest.display()))?;
        let guest =
            Self::from_manifest(dir, &text).map_err(|e| format!("{}: {e}", manifest.display()))?;
        for file in [&guest.bzimage, &guest.vmlinux, &guest.initramfs] {
            if !file.is_file() {
                return Err(format!("{} is missing", file.display()));
            }
        }
        Ok(guest)
    }

    /// Parses a manifest (`key=value` lines) of a guest in `dir`.
    pub fn from_manifest(dir: &Path, text: &str) -> Result<LinuxGuest, String> {
        let map: HashMap<&str, &str> = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .collect();
        if map.get("complete") != Some(&"1") {
            return Err("incomplete build (no complete=1)".into());
        }
        let get = |key: &str| {
            map.get(key)
                .map(|v| v.to_string())
                .ok_or_else(|| format!("no {key}= line"))
        };
        let list = |key: &str| -> Vec<String> {
            map.get(key)
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default()
        };
        let pvh_entry = match get("pvh_entry")?.as_str() {
            "none" => None,
            hex => Some(
                hex.strip_prefix("0x")
                    .and_then(|h| u64::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad pvh_entry={hex}"))?,
            ),
        };
        Ok(LinuxGuest {
            dir: dir.to_path_buf(),
            bzimage: dir.join("bzImage"),
            vmlinux: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio.gz"),
            kernel_release: get("kernel_release")?,
            kernel_package: get("kernel_package")?,
            kernel_package_version: get("kernel_package_version")?,
            busybox_version: get("busybox_package_version")?,
            pvh_entry,
            modules: list("modules"),
            modules_builtin: list("modules_builtin"),
        })
    }
}

/// The Linux test guest, built on first use.
///
/// Runs `resources/linux-guest/build.sh` once per test process (it returns
/// at once when its cache is valid, and serializes concurrent builds of
/// several test processes with a file lock). When the script cannot run
/// (no apt lists and not root, say) but an earlier build is in the cache,
/// that build is used, with a warning. [`DIR_ENV`] overrides all of this.
pub fn linux_guest() -> Result<LinuxGuest, String> {
    static GUEST: OnceLock<Result<LinuxGuest, String>> = OnceLock::new();
    GUEST.get_or_init(find_or_build).clone()
}

fn cache_root() -> PathBuf {
    crate::host::workspace_root().join("resources/cache/linux-guest")
}

fn find_or_build() -> Result<LinuxGuest, String> {
    if let Some(dir) = std::env::var_os(DIR_ENV) {
        return LinuxGuest::load(Path::new(&dir)).map_err(|e| format!("{DIR_ENV}: {e}"));
    }
    match run_build_script() {
        Ok(dir) => LinuxGuest::load(&dir),
        Err(build_error) => {
            let current = cache_root().join("current");
            match current.canonicalize().map(|dir| LinuxGuest::load(&dir)) {
                Ok(Ok(guest)) => {
                    eprintln!(
                        "warning: building the Linux guest failed ({build_error}); using the cached {}",
                        guest.dir.display()
                    );
                    Ok(guest)
                }
                _ => Err(build_error),
            }
        }
    }
}

/// Runs the build script; returns the directory it printed last.
fn run_build_script() -> Result<PathBuf, String> {
    let script = crate::host::workspace_root().join("resources/linux-guest/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let reason = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        return Err(format!(
            "{} failed ({}): {reason}",
            script.display(),
            out.status
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| format!("{} printed no directory", script.display()))?;
    Ok(PathBuf::from(dir.trim()))
}

/// A kernel command line for the guest, built parameter by parameter.
///
/// ```
/// use ferry_tests::linux::Cmdline;
/// let c = Cmdline::new()
///     .ip("198.18.0.2/24")
///     .vlan(100, Some("198.18.100.2/24"))
///     .macvlan("02:00:00:00:01:01", Some(100), Some("198.18.100.3/24"))
///     .gateway("198.18.0.1");
/// assert_eq!(
///     c.to_string(),
///     "console=ttyS0 ferry.ip=198.18.0.2/24 ferry.vlan=100:198.18.100.2/24 \
///      ferry.macvlan=02:00:00:00:01:01@100:198.18.100.3/24 ferry.gw=198.18.0.1"
/// );
/// ```
#[derive(Clone, Debug)]
pub struct Cmdline {
    console: Option<String>,
    ip: Vec<String>,
    vlans: Vec<String>,
    macvlans: Vec<String>,
    gateway: Option<String>,
    netwait: Option<u32>,
    extra: Vec<String>,
}

impl Default for Cmdline {
    fn default() -> Self {
        Self::new()
    }
}

impl Cmdline {
    /// `console=ttyS0` and nothing else.
    pub fn new() -> Self {
        Cmdline {
            console: Some("ttyS0".into()),
            ip: Vec::new(),
            vlans: Vec::new(),
            macvlans: Vec::new(),
            gateway: None,
            netwait: None,
            extra: Vec::new(),
        }
    }

    /// Sets (or with `None` drops) the `console=` parameter.
    pub fn console(mut self, console: Option<&str>) -> Self {
        self.console = console.map(str::to_string);
        self
    }

    /// An IPv4 `ADDRESS/PREFIX` on eth0 (`ferry.ip`); may be repeated.
    pub fn ip(mut self, cidr: &str) -> Self {
        self.ip.push(cidr.to_string());
        self
    }

    /// VLAN `id` on eth0 (interface `eth0.<id>`), with an optional address
    /// (`ferry.vlan=ID[:ADDRESS/PREFIX]`).
    pub fn vlan(mut self, id: u16, cidr: Option<&str>) -> Self {
        self.vlans.push(match cidr {
            Some(c) => format!("{id}:{c}"),
            None => id.to_string(),
        });
        self
    }

    /// A macvlan with its own MAC, on eth0 or on VLAN `vlan` of eth0, with
    /// an optional address (`ferry.macvlan=MAC[@VLAN][:ADDRESS/PREFIX]`).
    /// They are named mv0, mv1, ... in the order given.
    pub fn macvlan(mut self, mac: &str, vlan: Option<u16>, cidr: Option<&str>) -> Self {
        let mut item = mac.to_string();
        if let Some(id) = vlan {
            item.push_str(&format!("@{id}"));
        }
        if let Some(c) = cidr {
            item.push(':');
            item.push_str(c);
        }
        self.macvlans.push(item);
        self
    }

    /// The default route (`ferry.gw`).
    pub fn gateway(mut self, addr: &str) -> Self {
        self.gateway = Some(addr.to_string());
        self
    }

    /// How long /init waits for eth0 once a virtio-net device exists
    /// (`ferry.netwait`, seconds, default 10).
    pub fn netwait(mut self, seconds: u32) -> Self {
        self.netwait = Some(seconds);
        self
    }

    /// Any other kernel parameter, appended verbatim.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra.push(arg.to_string());
        self
    }
}

impl fmt::Display for Cmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words: Vec<String> = Vec::new();
        if let Some(c) = &self.console {
            words.push(format!("console={c}"));
        }
        if !self.ip.is_empty() {
            words.push(format!("ferry.ip={}", self.ip.join(",")));
        }
        if !self.vlans.is_empty() {
            words.push(format!("ferry.vlan={}", self.vlans.join(",")));
        }
        if !self.macvlans.is_empty() {
            words.push(format!("ferry.macvlan={}", self.macvlans.join(",")));
        }
        if let Some(gw) = &self.gateway {
            words.push(format!("ferry.gw={gw}"));
        }
        if let Some(s) = self.netwait {
            words.push(format!("ferry.netwait={s}"));
        }
        words.extend(self.extra.iter().cloned());
        f.write_str(&words.join(" "))
    }
}

/// One interface of the ready line: `if=NAME,MAC[,ADDRESS/PREFIX...]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    pub addrs: Vec<String>,
}

/// The guest's ready line, parsed:
/// `FERRY-GUEST-READY v=1 kernel=R cpus=N mem_kb=N uptime=S errors=N if=...`.
#[derive(Clone, Debug, PartialEq)]
pub struct Ready {
    pub version: u32,
    pub kernel: String,
    pub cpus: u32,
    /// MemTotal of /proc/meminfo.
    pub mem_kb: u64,
    /// Seconds since the kernel started (/proc/uptime) when /init got there.
    pub uptime: f64,
    /// How many `ferry-init: error:` lines /init printed before.
    pub errors: u32,
    /// Every interface but lo, with its IPv4 addresses as the kernel has them.
    pub interfaces: Vec<Interface>,
}

impl Ready {
    /// Finds the first ready line in `console` output and parses it.
    /// `None` when there is none yet (or it is cut off before its newline
    /// and lacks fields).
    pub fn find(console: &str) -> Option<Ready> {
        let start = console.find(READY_MARKER)?;
        let line = console[start..].lines().next()?;
        Self::parse(line)
    }

    /// Parses one ready line (starting with [`READY_MARKER`]).
    pub fn parse(line: &str) -> Option<Ready> {
        let mut words = line.split_whitespace();
        if words.next()? != READY_MARKER {
            return None;
        }
        let (mut version, mut kernel, mut cpus, mut mem_kb, mut uptime, mut errors) =
            (None, None, None, None, None, None);
        let mut interfaces = Vec::new();
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "v" => version = value.parse().ok(),
                "kernel" => kernel = Some(value.to_string()),
                "cpus" => cpus = value.parse().ok(),
                "mem_kb" => mem_kb = value.parse().ok(),
                "uptime" => uptime = value.parse().ok(),
                "errors" => errors = value.parse().ok(),
                "if" => {
                    let mut parts = value.split(',');
                    let name = parts.next()?.to_string();
                    let mac = parts.next()?.to_string();
                    interfaces.push(Interface {
                        name,
                        mac,
                        addrs: parts.map(str::to_string).collect(),
                    });
                }
                _ => {}
            }
        }
        Some(Ready {
            version: version?,
            kernel: kernel?,
            cpus: cpus?,
            mem_kb: mem_kb?,
            uptime: uptime?,
            errors: errors?,
            interfaces,
        })
    }

    /// The interface called `name`.
    pub fn interface(&self, name: &str) -> Option<&Interface> {
        self.interfaces.iter().find(|i| i.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_defaults_to_the_serial_console_only() {
        assert_eq!(Cmdline::new().to_string(), "console=ttyS0");
        assert_eq!(
            Cmdline::new().console(None).arg("quiet").to_string(),
            "quiet"
        );
    }

    #[test]
    fn cmdline_joins_repeated_items() {
        let c = Cmdline::new()
            .ip("198.18.0.2/24")
            .ip("198.18.1.2/24")
            .vlan(100, Some("198.18.100.2/24"))
            .vlan(200, None)
            .macvlan("02:00:00:00:01:01", None, Some("198.18.0.3/24"))
            .macvlan("02:00:00:00:01:02", Some(200), None)
            .netwait(3)
            .arg("noxsave");
        assert_eq!(
            c.to_string(),
            "console=ttyS0 ferry.ip=198.18.0.2/24,198.18.1.2/24 \
             ferry.vlan=100:198.18.100.2/24,200 \
             ferry.macvlan=02:00:00:00:01:01:198.18.0.3/24,02:00:00:00:01:02@200 \
             ferry.netwait=3 noxsave"
        );
    }

    const LINE: &str = "FERRY-GUEST-READY v=1 kernel=6.12.117+deb12-cloud-amd64 cpus=2 \
        mem_kb=475152 uptime=2.64 errors=0 if=eth0,52:54:00:12:34:56,198.18.0.2/24 \
        if=eth0.100,52:54:00:12:34:56,198.18.100.2/24 if=mv0,02:00:00:00:01:01";

    #[test]
    fn ready_line_parses() {
        let console = format!("[    2.5] 8021q: adding VLAN 0\r\n{LINE}\r\nferry-guest:/# ");
        let r = Ready::find(&console).expect("ready line");
        assert_eq!(r.version, 1);
        assert_eq!(r.kernel, "6.12.117+deb12-cloud-amd64");
        assert_eq!((r.cpus, r.mem_kb, r.errors), (2, 475152, 0));
        assert!((r.uptime - 2.64).abs() < 1e-9);
        assert_eq!(r.interfaces.len(), 3);
        let vlan = r.interface("eth0.100").expect("eth0.100");
        assert_eq!(vlan.mac, "52:54:00:12:34:56");
        assert_eq!(vlan.addrs, ["198.18.100.2/24"]);
        assert!(r.interface("mv0").expect("mv0").addrs.is_empty());
    }

    #[test]
    fn ready_line_rejects_other_and_partial_lines() {
        assert_eq!(Ready::find("no marker here"), None);
        assert_eq!(Ready::parse("FERRY-GUEST-READY v=1 kernel=x"), None);
        assert_eq!(Ready::parse("ferry-init: error: x"), None);
    }

    #[test]
    fn manifest_parses() {
        let text = "format=1\nkernel_package=linux-image-x-cloud-amd64-unsigned\n\
            kernel_package_version=6.12.117-1~deb12u1\nkernel_release=6.12.117+deb12-cloud-amd64\n\
            busybox_package_version=1:1.35.0-4+deb12u1+b1\npvh_entry=0x1000a30\n\
            modules_builtin=virtio virtio_ring\nmodules=virtio_mmio failover\ncomplete=1\n";
        let g = LinuxGuest::from_manifest(Path::new("/c/k"), text).expect("manifest");
        assert_eq!(g.pvh_entry, Some(0x1000a30));
        assert!(g.has_pvh());
        assert_eq!(g.bzimage, Path::new("/c/k/bzImage"));
        assert_eq!(g.initramfs, Path::new("/c/k/initramfs.cpio.gz"));
        assert_eq!(g.modules, ["virtio_mmio", "failover"]);
        assert_eq!(g.modules_builtin, ["virtio", "virtio_ring"]);
        let none = text.replace("pvh_entry=0x1000a30", "pvh_entry=none");
        assert!(!LinuxGuest::from_manifest(Path::new("/"), &none)
            .expect("manifest")
            .has_pvh());
        let partial = text.replace("complete=1\n", "");
        assert!(LinuxGuest::from_manifest(Path::new("/"), &partial).is_err());
    }

    /// Builds (or finds) the real guest: downloads packages on a machine
    /// without the cache, so it is not run by default.
    #[test]
    #[ignore = "downloads packages; tests/linux_boot.rs builds (or finds) the guest in the normal run"]
    fn builds_or_finds_the_guest() {
        let g = linux_guest().expect("the Linux guest");
        assert!(g.bzimage.is_file() && g.vmlinux.is_file() && g.initramfs.is_file());
        assert!(g.modules.iter().any(|m| m == "virtio_net"));
        let again = linux_guest().expect("the Linux guest");
        assert_eq!(g, again);
    }
}
