//! The probe under QEMU (`-M microvm`, modern virtio-mmio virtio-net on
//! TAPs), with a minimal QMP client.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{probe_elf, Console, READY};

/// A virtio-net device for [`Qemu`]: on TAP `tap`, with `mac` if given.
#[derive(Clone, Debug)]
pub struct QemuNic {
    pub tap: String,
    pub mac: Option<String>,
}

/// How to boot the probe under QEMU (`-M microvm`, modern virtio-mmio).
#[derive(Clone, Debug)]
pub struct QemuConfig {
    pub memory_mib: u32,
    pub nics: Vec<QemuNic>,
    /// The probe's command line. microvm adds `virtio_mmio.device=` for
    /// each NIC itself (with acpi=off), so this holds the rest.
    pub cmdline: String,
    /// Run QEMU inside this namespace (where the TAPs are).
    pub netns: Option<String>,
    pub qmp: bool,
    /// `-global virtio-mmio.force-legacy=` value (tests of the refusal).
    pub force_legacy: bool,
    /// More arguments, last on the command line (e.g. `-incoming URI`).
    pub extra: Vec<String>,
}

impl QemuConfig {
    pub fn new(cmdline: &str) -> QemuConfig {
        QemuConfig {
            memory_mib: 128,
            nics: Vec::new(),
            cmdline: cmdline.to_string(),
            netns: None,
            qmp: false,
            force_legacy: false,
            extra: Vec::new(),
        }
    }

    /// QEMU's command line for this configuration, QMP (when asked for)
    /// at `qmp`; stdio is the caller's.
    pub fn command(&self, qmp: &Path) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        // acpi=off keeps the virtio-mmio IRQs on the one IOAPIC at
        // 0xFEC00000 (ioapic2 would put them at GSI 24+ on a second one)
        // and makes microvm list the devices on the command line.
        cmd.args(["-M", "microvm,acpi=off,ioapic2=off", "-enable-kvm", "-m"])
            .arg(self.memory_mib.to_string())
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
            ])
            .args(["-global"])
            .arg(format!("virtio-mmio.force-legacy={}", self.force_legacy))
            .arg("-kernel")
            .arg(probe_elf())
            .arg("-append")
            .arg(&self.cmdline);
        for (i, nic) in self.nics.iter().enumerate() {
            cmd.arg("-netdev").arg(format!(
                "tap,id=n{i},ifname={},script=no,downscript=no",
                nic.tap
            ));
            let mut dev = format!("virtio-net-device,netdev=n{i}");
            if let Some(mac) = &nic.mac {
                dev.push_str(&format!(",mac={mac}"));
            }
            cmd.arg("-device").arg(dev);
        }
        if self.qmp {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        }
        cmd.args(&self.extra);
        cmd
    }
}

/// A probe guest running under QEMU. Killed on drop.
pub struct Qemu {
    child: Child,
    pub console: Console,
    dir: PathBuf,
    qmp: Option<Mutex<QmpClient>>,
}

static QEMU_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Qemu {
    pub fn spawn(config: &QemuConfig) -> io::Result<Qemu> {
        let dir = std::env::temp_dir().join(format!(
            "ferry-probe-qemu-{}-{}",
            std::process::id(),
            QEMU_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let qmp_path = dir.join("qmp.sock");
        let mut cmd = config.command(&qmp_path);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn()?;
        let console = Console::from_child("qemu", &mut child)?;
        let qmp = if config.qmp {
            match QmpClient::connect(&qmp_path, Duration::from_secs(10)) {
                Ok(c) => Some(Mutex::new(c)),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
            }
        } else {
            None
        };
        Ok(Qemu {
            child,
            console,
            dir,
            qmp,
        })
    }

    /// Waits for the ready line and returns it.
    pub fn wait_ready(&self, timeout: Duration) -> String {
        self.console.expect(READY, timeout)
    }

    /// Runs a QMP command; returns its `return` value or the error object.
    pub fn qmp(
        &self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let qmp = self.qmp.as_ref().ok_or("QEMU started without QMP")?;
        let mut client = qmp.lock().unwrap_or_else(|p| p.into_inner());
        client.execute(command, arguments)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the QMP event `name` (one that came while a command was
    /// answered counts too) and returns it.
    pub fn wait_event(&self, name: &str) -> Result<qmp::QmpEvent, String> {
        let qmp = self.qmp.as_ref().ok_or("QEMU started without QMP")?;
        let mut client = qmp.lock().unwrap_or_else(|p| p.into_inner());
        client.0.wait_for_event(name).map_err(|e| e.to_string())
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Ferry's own QMP client (qmp::client) speaks to QEMU unchanged;
/// this only adds waiting for the socket to appear.
pub struct QmpClient(qmp::client::QmpClient);

impl QmpClient {
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<QmpClient> {
        let deadline = Instant::now() + timeout;
        loop {
            match qmp::client::QmpClient::connect(path) {
                Ok(mut c) => {
                    c.set_timeout(Some(Duration::from_secs(10)))
                        .map_err(io::Error::other)?;
                    return Ok(QmpClient(c));
                }
                Err(e) if Instant::now() > deadline => return Err(io::Error::other(e.to_string())),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    pub fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let args = match arguments {
            serde_json::Value::Object(map) if !map.is_empty() => Some(map),
            _ => None,
        };
        self.0.execute(command, args).map_err(|e| e.to_string())
    }
}

/// A probe under QEMU inside a network namespace of its own. QEMU is the
/// first field, so it dies before its namespace goes.
pub struct QemuGuest {
    pub qemu: Qemu,
    pub ns: crate::netns::Netns,
}

/// Creates a namespace named after `test`, one TAP per entry of `nic_macs`
/// (`tap0`, `tap1`, ...; tap0 gets 198.18.0.1/24; `None` = QEMU's default
/// MAC), boots the probe there with `config` and waits for its ready line.
/// Panics with the console output when it does not come.
pub fn boot_in_netns(test: &str, mut config: QemuConfig, nic_macs: &[Option<&str>]) -> QemuGuest {
    let ns = crate::netns::Netns::new(test).expect("create netns");
    for (i, mac) in nic_macs.iter().enumerate() {
        let tap = format!("tap{i}");
        ns.add_tap(&tap).expect("tap");
        config.nics.push(QemuNic {
            tap,
            mac: mac.map(str::to_string),
        });
    }
    if !nic_macs.is_empty() {
        ns.add_addr("tap0", "198.18.0.1/24").expect("address");
    }
    config.netns = Some(ns.name().to_string());
    let qemu = Qemu::spawn(&config).expect("start qemu");
    qemu.wait_ready(Duration::from_secs(30));
    QemuGuest { qemu, ns }
}

/// Whether this host can run the probe under QEMU here (KVM, root for
/// namespaces and TAPs, QEMU, iproute2); prints the skip or, in CI, panics.
pub fn can_run_qemu(test: &str) -> bool {
    use crate::host::{require_kvm, require_root, require_tool};
    require_kvm(test).is_some()
        && require_root(test)
        && require_tool(test, "qemu-system-x86_64")
        && require_tool(test, "ip")
}
