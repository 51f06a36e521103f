//! The probe guest under either VMM, for benchmarks that put Ferry beside
//! QEMU on the same topology: one type to boot it, start a destination,
//! talk QMP and read its console.

use std::time::Duration;

use serde_json::{json, Value};

use crate::ferry::{FerryVm, VmSpec};
use crate::netns::Netns;
use crate::probe::{Console, Qemu, QemuConfig, QemuNic, READY};
use qmp::client::QmpClient;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Vmm {
    Ferry,
    Qemu,
}

impl Vmm {
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Ferry => "ferry",
            Vmm::Qemu => "qemu",
        }
    }
}

/// A probe guest under one VMM, with a QMP connection.
pub enum Guest {
    Ferry { vm: FerryVm, qmp: Option<QmpClient> },
    Qemu(Qemu),
}

/// One virtio-net NIC of the probe on `tap`, with `mac`.
pub struct GuestNet<'a> {
    pub ns: &'a Netns,
    pub tap: &'a str,
    pub mac: &'a str,
}

impl<'a> GuestNet<'a> {
    /// The NIC on host A's TAP and on host B's, both with `mac`: a
    /// migration's two ends.
    pub fn on_both_hosts(
        hosts: &'a crate::hosts::TwoHosts,
        mac: &'a str,
    ) -> (GuestNet<'a>, GuestNet<'a>) {
        use crate::hosts::{A_TAP, B_TAP};
        let net = |ns, tap| GuestNet { ns, tap, mac };
        (net(&hosts.a, A_TAP), net(&hosts.b, B_TAP))
    }
}

impl Guest {
    /// Boots the probe with `cmdline` (no `virtio_mmio.device=`: both VMMs
    /// add it) on `net`, `mib` MiB, and waits for its ready line.
    pub fn boot(vmm: Vmm, name: &str, net: &GuestNet, mib: u32, cmdline: &str) -> Guest {
        let boot = Duration::from_secs(60);
        match vmm {
            Vmm::Ferry => {
                let mut spec = VmSpec::probe(cmdline);
                spec.memory = format!("{mib}M");
                spec.nets = vec![format!("tap={},mac={}", net.tap, net.mac)];
                let vm = FerryVm::spawn(name, &spec, Some(net.ns));
                vm.console.expect(READY, boot);
                Guest::Ferry { vm, qmp: None }
            }
            Vmm::Qemu => {
                let q = Qemu::spawn(&qemu_config(net, mib, cmdline, &[])).expect("start QEMU");
                q.wait_ready(boot);
                Guest::Qemu(q)
            }
        }
    }

    /// A destination waiting for `uri` on `net` (`mib` and `cmdline` are
    /// for QEMU, which needs the machine described again; Ferry takes it
    /// from the stream).
    pub fn incoming(
        vmm: Vmm,
        name: &str,
        net: &GuestNet,
        mib: u32,
        cmdline: &str,
        uri: &str,
    ) -> Guest {
        Self::incoming_with(vmm, name, net, mib, cmdline, uri, false)
    }

    /// [`Self::incoming`], with `-S` when `paused`: the guest waits for
    /// `cont` after the stream, as libvirt starts a destination.
    pub fn incoming_with(
        vmm: Vmm,
        name: &str,
        net: &GuestNet,
        mib: u32,
        cmdline: &str,
        uri: &str,
        paused: bool,
    ) -> Guest {
        match vmm {
            Vmm::Ferry => {
                let mut spec = VmSpec::incoming(uri);
                spec.paused = paused;
                spec.nets = vec![format!("tap={}", net.tap)];
                Guest::Ferry {
                    vm: FerryVm::spawn(name, &spec, Some(net.ns)),
                    qmp: None,
                }
            }
            Vmm::Qemu => {
                let mut extra = vec!["-incoming".to_string(), uri.to_string()];
                if paused {
                    extra.push("-S".into());
                }
                let config = qemu_config(net, mib, cmdline, &extra);
                Guest::Qemu(Qemu::spawn(&config).expect("start QEMU destination"))
            }
        }
    }

    pub fn exec(&mut self, command: &str, args: Value) -> Result<Value, String> {
        match self {
            Guest::Ferry { vm, qmp } => {
                let client = qmp.get_or_insert_with(|| vm.qmp());
                let args = match args {
                    Value::Object(m) if !m.is_empty() => Some(m),
                    _ => None,
                };
                client.execute(command, args).map_err(|e| e.to_string())
            }
            Guest::Qemu(q) => q.qmp(command, args),
        }
    }

    /// Waits for the QMP event `name` on this guest's connection.
    pub fn wait_event(&mut self, name: &str) -> Result<qmp::QmpEvent, String> {
        match self {
            Guest::Ferry { vm, qmp } => qmp
                .get_or_insert_with(|| vm.qmp())
                .wait_for_event(name)
                .map_err(|e| e.to_string()),
            Guest::Qemu(q) => q.wait_event(name),
        }
    }

    pub fn console(&self) -> &Console {
        match self {
            Guest::Ferry { vm, .. } => &vm.console,
            Guest::Qemu(q) => &q.console,
        }
    }

    pub fn status(&mut self) -> String {
        self.exec("query-status", json!({}))
            .map(|v| v["status"].as_str().unwrap_or("?").to_string())
            .unwrap_or_else(|e| format!("error: {e}"))
    }

    pub fn stderr(&self) -> String {
        match self {
            Guest::Ferry { vm, .. } => vm.stderr(),
            Guest::Qemu(_) => "(QEMU's stderr is the bench's)".into(),
        }
    }
}

/// QEMU 7.2 with the probe on `net` (`-M microvm,acpi=off,ioapic2=off`,
/// see `probe::qemu`), QMP on, `extra` arguments last.
pub fn qemu_config(net: &GuestNet, mib: u32, cmdline: &str, extra: &[String]) -> QemuConfig {
    let mut c = QemuConfig::new(cmdline);
    c.memory_mib = mib;
    c.nics.push(QemuNic {
        tap: net.tap.into(),
        mac: Some(net.mac.into()),
    });
    c.netns = Some(net.ns.name().to_string());
    c.qmp = true;
    c.extra = extra.to_vec();
    c
}
