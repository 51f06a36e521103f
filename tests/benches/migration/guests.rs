//! The probe on host A (booted, migration parameters set) and a
//! destination on host B, under either VMM.

use std::time::Duration;

use ferry_tests::bench_net::GUEST_MAC;
use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::hosts::{TwoHosts, A_TAP, B_TAP, GUEST_ADDR};
use ferry_tests::probe::{Cmdline, READY};
use ferry_tests::vmms::{Guest, GuestNet, Vmm};
use serde_json::json;

use crate::{verbose, DOWNTIME_LIMIT_MS};

const BOOT: Duration = Duration::from_secs(60);

/// The probe's command line: its address, and optionally heartbeats and
/// a dirtying load `(rate, size)`.
pub fn cmdline(heartbeat_ms: u64, dirty: Option<(&str, &str)>) -> String {
    let mut c = Cmdline::new().identity(0, None, None, &format!("{GUEST_ADDR}/24"));
    if heartbeat_ms > 0 {
        c = c.heartbeat_ms(heartbeat_ms);
    }
    if let Some((rate, size)) = dirty {
        c = c.dirty(rate, size);
    }
    c.build()
}

/// FERRY_LOG=info with FERRY_BENCH_VERBOSE=1: Ferry logs its phases.
/// This is why Ferry is started here rather than by `Guest::boot` and
/// `Guest::incoming`, which pass no environment.
fn ferry_env() -> Vec<(String, String)> {
    if verbose() {
        vec![("FERRY_LOG".into(), "info".into())]
    } else {
        Vec::new()
    }
}

/// The guest booted on host A.
/// With `auto_converge`, both VMMs get that capability set through the
/// same QMP command; without, each keeps its default (Ferry on, QEMU off).
pub fn source(
    vmm: Vmm,
    hosts: &TwoHosts,
    mib: u32,
    cmdline: &str,
    auto_converge: Option<bool>,
) -> Guest {
    let name = "migbench-src";
    let mut guest = match vmm {
        Vmm::Ferry => {
            let mut spec = VmSpec::probe(cmdline);
            spec.memory = format!("{mib}M");
            spec.nets = vec![format!("tap={A_TAP},mac={GUEST_MAC}")];
            spec.env = ferry_env();
            let vm = FerryVm::spawn(name, &spec, Some(&hosts.a));
            vm.console.expect(READY, BOOT);
            Guest::Ferry { vm, qmp: None }
        }
        Vmm::Qemu => {
            let net = GuestNet {
                ns: &hosts.a,
                tap: A_TAP,
                mac: GUEST_MAC,
            };
            Guest::boot(vmm, name, &net, mib, cmdline)
        }
    };
    let mut params = json!({ "downtime-limit": DOWNTIME_LIMIT_MS });
    if vmm == Vmm::Qemu {
        // QEMU 7.2 limits migration to 128 MiB/s by default; Ferry does not.
        params["max-bandwidth"] = json!(1u64 << 40);
    }
    guest
        .exec("migrate-set-parameters", params)
        .expect("migrate-set-parameters");
    if let Some(on) = auto_converge {
        let caps = json!({ "capabilities": [{ "capability": "auto-converge", "state": on }] });
        guest
            .exec("migrate-set-capabilities", caps)
            .expect("migrate-set-capabilities");
    }
    guest
}

/// A destination waiting on host B for `uri`.
pub fn destination(vmm: Vmm, hosts: &TwoHosts, mib: u32, cmdline: &str, uri: &str) -> Guest {
    let name = "migbench-dst";
    match vmm {
        Vmm::Ferry => {
            let mut spec = VmSpec::incoming(uri);
            spec.nets = vec![format!("tap={B_TAP}")];
            spec.env = ferry_env();
            let vm = FerryVm::spawn(name, &spec, Some(&hosts.b));
            Guest::Ferry { vm, qmp: None }
        }
        Vmm::Qemu => {
            let net = GuestNet {
                ns: &hosts.b,
                tap: B_TAP,
                mac: GUEST_MAC,
            };
            Guest::incoming(vmm, name, &net, mib, cmdline, uri)
        }
    }
}

/// Ferry's log lines about the migration's phases (verbose runs).
pub fn phase_lines(guest: &Guest) -> String {
    guest
        .stderr()
        .lines()
        .filter(|l| {
            l.contains("guest stopped")
                || l.contains("migration loaded")
                || l.contains("last pass:")
                || l.contains("throttled")
        })
        .map(|l| format!("    {l}\n"))
        .collect()
}
