//! The probe guest under QEMU (`-M microvm -enable-kvm`, modern virtio-mmio
//! virtio-net on a TAP in a namespace of the test's own): the reference
//! Ferry is held to. Every test asserts on what the guest really did on the
//! wire or on its console.

use std::net::UdpSocket;
use std::time::Duration;

use ferry_tests::host::require_tool;
use ferry_tests::probe::checks::{
    identities_answer, network_cmdline, GUEST_MAC, SECOND_MAC, VLAN, VLAN_MAC,
};
use ferry_tests::probe::{boot_in_netns, can_run_qemu, fields, Cmdline, QemuConfig, QemuGuest};

const REPLY: Duration = Duration::from_secs(10);

fn can_run(test: &str) -> bool {
    can_run_qemu(test)
}

/// Boots the probe with `nics` TAPs (the first with GUEST_MAC).
fn boot(test: &str, cmdline: &Cmdline, nics: usize, qmp: bool, force_legacy: bool) -> QemuGuest {
    let mut config = QemuConfig::new(&cmdline.build());
    config.qmp = qmp;
    config.force_legacy = force_legacy;
    let macs: Vec<Option<&str>> = (0..nics).map(|i| (i == 0).then_some(GUEST_MAC)).collect();
    boot_in_netns(test, config, &macs)
}

#[test]
fn answers_ping_arp_and_udp_on_every_identity_including_a_vlan() {
    if !can_run("answers_ping_arp_and_udp_on_every_identity_including_a_vlan") {
        return;
    }
    let g = boot("net", &network_cmdline(), 1, false, false);
    identities_answer(&g.ns, &g.qemu.console, "tap0", GUEST_MAC);
}

#[test]
fn announce_self_makes_it_send_tagged_gratuitous_arps() {
    if !can_run("announce_self_makes_it_send_tagged_gratuitous_arps")
        || !require_tool(
            "announce_self_makes_it_send_tagged_gratuitous_arps",
            "tcpdump",
        )
        || !require_tool(
            "announce_self_makes_it_send_tagged_gratuitous_arps",
            "tshark",
        )
    {
        return;
    }
    let g = boot("announce", &network_cmdline(), 1, true, false);
    let c = &g.qemu.console;
    let nic = c.expect_seen("probe: nic 0 up");
    assert!(nic.contains("announce=on"), "{nic}");
    let pcap_path = std::env::temp_dir().join(format!("{}-announce.pcap", g.ns.name()));
    let capture = g.ns.capture("tap0", &pcap_path).expect("tcpdump");
    g.qemu
        .qmp(
            "announce-self",
            serde_json::json!({"initial": 50, "max": 550, "rounds": 2, "step": 100}),
        )
        .expect("announce-self");
    let first = fields(&c.expect("probe: announce nic=0", REPLY));
    assert_eq!(first.get("garps").map(String::as_str), Some("3"));
    assert_eq!(first.get("ack").map(String::as_str), Some("ok"));
    c.expect("probe: announce nic=0", REPLY);
    std::thread::sleep(Duration::from_millis(300));
    let pcap = capture.stop().expect("stop capture");

    // tcpdump's reading: link headers, VLAN tags and the ARP.
    let text = pcap.tcpdump_text().unwrap();
    let garp = |src: &str, addr: &str, tagged: bool| {
        text.lines().any(|l| {
            l.starts_with(|ch: char| ch.is_ascii_digit())
                && l.contains(&format!("{src} > ff:ff:ff:ff:ff:ff"))
                && l.contains(&format!("Request who-has {addr} tell {addr}"))
                && l.contains(&format!("vlan {VLAN}")) == tagged
        })
    };
    assert!(
        garp(GUEST_MAC, "198.18.0.2", false),
        "no GARP for 198.18.0.2:\n{text}"
    );
    assert!(
        garp(SECOND_MAC, "198.18.0.3", false),
        "no GARP for 198.18.0.3:\n{text}"
    );
    assert!(
        garp(VLAN_MAC, "198.18.100.2", true),
        "no tagged GARP for 198.18.100.2:\n{text}"
    );

    // tshark's reading of the same capture.
    let rows = pcap
        .tshark_fields(
            "arp.isgratuitous == 1",
            &["eth.src", "vlan.id", "arp.src.proto_ipv4"],
        )
        .unwrap();
    let rows: Vec<&str> = rows.lines().collect();
    for want in [
        format!("{GUEST_MAC},,198.18.0.2"),
        format!("{SECOND_MAC},,198.18.0.3"),
        format!("{VLAN_MAC},{VLAN},198.18.100.2"),
    ] {
        let seen = rows.iter().filter(|r| **r == want).count();
        assert!(
            seen >= 2,
            "{want} seen {seen} times (two rounds expected):\n{rows:#?}"
        );
    }
    let _ = std::fs::remove_file(&pcap_path);

    let counters = c.send_command("counters 0", REPLY);
    assert!(counters.number("announces").unwrap() >= 2, "{counters:?}");
    assert!(counters.number("garps").unwrap() >= 6, "{counters:?}");
}

#[test]
fn udp_source_reaches_the_host() {
    if !can_run("udp_source_reaches_the_host") {
        return;
    }
    // NIC 0 is a virtio-mmio window with no device behind it (microvm's
    // first transport); QEMU's NIC, which microvm lists after ours, is NIC 1.
    let cmdline =
        Cmdline::new()
            .device("512", 0xfeb0_0000, 5)
            .identity(1, None, None, "198.18.0.2/24");
    let g = boot("blast", &cmdline, 1, false, false);
    let c = &g.qemu.console;
    c.expect_seen("probe: error nic=0 addr=0xfeb00000: no device behind the virtio-mmio window");
    c.expect_seen("probe: nic 1 up");
    let receiver =
        g.ns.enter(|| {
            let sock = UdpSocket::bind("198.18.0.1:5001").unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(1500)))
                .unwrap();
            sock
        })
        .unwrap();
    let counter = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut frames = 0u64;
        let mut bytes = 0u64;
        while let Ok((n, _)) = receiver.recv_from(&mut buf) {
            frames += 1;
            bytes += n as u64;
        }
        (frames, bytes)
    });
    let refused = c.try_command("udp-blast 0 198.18.0.2 198.18.0.1:5001 512 5000 300", REPLY);
    assert_eq!(
        refused.unwrap().error.as_deref(),
        Some("that NIC is not up")
    );
    c.send_command("udp-blast 1 198.18.0.2 198.18.0.1:5001 512 5000 300", REPLY);
    let done = fields(&c.expect("probe: udp-blast done", REPLY));
    assert_eq!(done.get("frames").map(String::as_str), Some("300"));
    let (frames, bytes) = counter.join().unwrap();
    assert_eq!((frames, bytes), (300, 300 * 512));
}

#[test]
fn identities_added_and_removed_at_runtime_are_answered_and_forgotten() {
    let test = "identities_added_and_removed_at_runtime_are_answered_and_forgotten";
    if !can_run(test) {
        return;
    }
    let cmdline = Cmdline::new().identity(0, None, None, "198.18.0.2/24");
    let g = boot("ids", &cmdline, 1, false, false);
    let c = &g.qemu.console;
    let ping = |addr: &str| {
        g.ns.exec(&["ping", "-c", "1", "-W", "1", addr])
            .expect("ping")
            .status
            .success()
    };
    assert!(!ping("198.18.0.7"), "answered before the identity existed");
    c.send_command("id-add 0 02:00:00:00:00:07 none 198.18.0.7/24", REPLY);
    assert!(ping("198.18.0.7"), "no answer from the added identity");
    let neigh = g.ns.run(&["ip", "neigh", "show", "198.18.0.7"]).unwrap();
    assert!(neigh.contains("02:00:00:00:00:07"), "{neigh}");
    let config = c.send_command("config", REPLY);
    assert!(
        config
            .lines
            .iter()
            .any(|l| l.contains("mac=02:00:00:00:00:07 vlan=none ip=198.18.0.7/24")),
        "{config:?}"
    );
    let dup = c
        .try_command("id-add 0 dev none 198.18.0.7/24", REPLY)
        .unwrap();
    assert!(dup.error.is_some(), "a duplicate identity must be refused");

    c.send_command("id-del 0 198.18.0.7", REPLY);
    g.ns.run(&["ip", "neigh", "flush", "dev", "tap0"]).unwrap();
    assert!(!ping("198.18.0.7"), "still answered after removal");
    assert!(
        ping("198.18.0.2"),
        "the remaining identity stopped answering"
    );
    let gone = c.try_command("id-del 0 198.18.0.7", REPLY).unwrap();
    assert_eq!(gone.error.as_deref(), Some("no such identity"));
}

#[test]
fn without_guest_announce_only_qemu_announces() {
    let test = "without_guest_announce_only_qemu_announces";
    if !can_run(test) || !require_tool(test, "tcpdump") {
        return;
    }
    let g = boot(
        "noannounce",
        &network_cmdline().announce(false),
        1,
        true,
        false,
    );
    let c = &g.qemu.console;
    assert!(c.expect_seen("probe: nic 0 up").contains("announce=off"));
    let pcap_path = std::env::temp_dir().join(format!("{}-noannounce.pcap", g.ns.name()));
    let capture = g.ns.capture("tap0", &pcap_path).expect("tcpdump");
    g.qemu
        .qmp(
            "announce-self",
            serde_json::json!({"initial": 50, "max": 550, "rounds": 2, "step": 100}),
        )
        .expect("announce-self");
    std::thread::sleep(Duration::from_millis(600));
    let text = capture.stop().unwrap().tcpdump_text().unwrap();
    let _ = std::fs::remove_file(&pcap_path);
    // QEMU falls back to its own RARP for the device MAC...
    assert!(
        text.lines()
            .any(|l| l.contains(&format!("Reverse Request who-is {GUEST_MAC}"))),
        "no RARP from QEMU:\n{text}"
    );
    // ...and the probe, not asked, sends nothing.
    assert!(
        !text.contains("who-has 198.18.0.2 tell 198.18.0.2"),
        "{text}"
    );
    assert!(c.seen("probe: announce").is_none(), "{}", c.output());
    let counters = c.send_command("counters 0", REPLY);
    assert_eq!(counters.number("announces"), Some(0));
}
