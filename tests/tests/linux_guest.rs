//! The Linux guest's network and migration, where the host has hardware
//! virtualization (skipped with the reason elsewhere: on kvm_pvm Linux
//! cannot reach userspace). The real virtio_net driver over Ferry's
//! device: IPv4 and IPv6, a VLAN sub-interface, a macvlan whose MAC lands
//! in the device's MAC table; and a live migration with a shell loop
//! running in the guest.

use std::time::Duration;

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_hw_virt, require_root, skip};
use ferry_tests::hosts::{migrate, status, wait_migration, TwoHosts, A_TAP, B_ADDR, B_TAP};
use ferry_tests::linux::{linux_guest, Cmdline, LinuxGuest, READY_MARKER};
use ferry_tests::netns::{vlan_supported, Netns};
use serde_json::json;

const T: Duration = Duration::from_secs(120);
const MACVLAN: &str = "02:00:00:00:01:01";

fn guest(test: &str) -> Option<LinuxGuest> {
    if !require_hw_virt(test) || !require_root(test) {
        return None;
    }
    Some(linux_guest().unwrap_or_else(|e| panic!("{test}: {e}")))
}

fn boot(test: &str, g: &LinuxGuest, ns: &Netns, tap: &str, cmdline: &Cmdline) -> FerryVm {
    let mut spec = VmSpec::probe(&cmdline.to_string());
    spec.kernel = g.bzimage.clone();
    spec.memory = "512M".into();
    spec.cpus = 2;
    spec.nets = vec![format!("tap={tap},mac=52:54:00:12:34:56")];
    spec.extra = vec!["--initrd".into(), g.initramfs.display().to_string()];
    let vm = FerryVm::spawn(test, &spec, Some(ns));
    vm.console.expect(READY_MARKER, T);
    vm
}

fn ping(ns: &Netns, args: &[&str]) -> bool {
    let mut all = vec!["ping", "-c", "3", "-i", "0.2", "-W", "2"];
    all.extend(args);
    ns.exec(&all).map(|o| o.status.success()).unwrap_or(false)
}

#[test]
fn linux_guest_networks_over_ipv4_ipv6_vlan_and_macvlan() {
    let test = "linux_guest_networks_over_ipv4_ipv6_vlan_and_macvlan";
    let Some(g) = guest(test) else { return };
    let ns = Netns::new("linuxnet").expect("netns");
    ns.add_tap("tap0").unwrap();
    ns.add_addr("tap0", "198.18.0.1/24").unwrap();
    let cmdline = Cmdline::new()
        .ip("198.18.0.2/24")
        .vlan(100, Some("198.18.100.2/24"))
        .macvlan(MACVLAN, None, Some("198.18.0.3/24"));
    let vm = boot("linux-net", &g, &ns, "tap0", &cmdline);

    assert!(ping(&ns, &["198.18.0.2"]), "IPv4 to eth0");
    assert!(ping(&ns, &["198.18.0.3"]), "IPv4 to the macvlan");
    // IPv6 link-local: the guest's address from its MAC (EUI-64).
    assert!(
        ping(&ns, &["-6", "fe80::5054:ff:fe12:3456%tap0"]),
        "IPv6 to eth0"
    );
    if vlan_supported() {
        let vlan = ns.add_vlan("tap0", 100).unwrap();
        ns.add_addr(&vlan, "198.18.100.1/24").unwrap();
        assert!(
            ping(&ns, &["198.18.100.2"]),
            "eth0.100 from the host's VLAN 100"
        );
    } else {
        skip(
            test,
            "this host kernel has no 802.1Q: the VLAN 100 ping part is not run",
        );
    }
    let filter = vm.execute("query-rx-filter", json!({})).unwrap();
    let unicast = filter[0]["unicast-table"].to_string();
    assert!(
        unicast.contains(MACVLAN),
        "the macvlan's MAC is in the device's MAC table: {filter}"
    );
    assert!(
        filter[0]["vlan-table"].to_string().contains("100"),
        "{filter}"
    );
}

#[test]
fn linux_guest_live_migrates_with_a_shell_loop_running() {
    let test = "linux_guest_live_migrates_with_a_shell_loop_running";
    let Some(g) = guest(test) else { return };
    let hosts = TwoHosts::new("linuxmig");
    let src = boot(
        "linux-src",
        &g,
        &hosts.a,
        A_TAP,
        &Cmdline::new().ip("198.18.0.2/24"),
    );
    let mut dst_spec = VmSpec::incoming(&format!("tcp:{B_ADDR}:4444"));
    dst_spec.nets = vec![format!("tap={B_TAP}")];
    let dst = FerryVm::spawn("linux-dst", &dst_spec, Some(&hosts.b));
    src.console
        .send_raw("i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done &\n")
        .unwrap();
    src.console.expect("tick 5", T);
    migrate(&src, &format!("tcp:{B_ADDR}:4444"));
    let info = wait_migration(&src, T);
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(status(&dst), "running");
    // The loop goes on counting on the destination.
    let last: u64 = src
        .console
        .lines()
        .iter()
        .rev()
        .find_map(|l| l.trim().strip_prefix("tick ").and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    dst.console.expect(&format!("tick {}", last + 3), T);
    assert!(
        ping(&hosts.b, &["198.18.0.2"]),
        "the guest answers on host B"
    );
}
