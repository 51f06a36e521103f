//! Network checks shared by the probe's tests under QEMU and under Ferry:
//! the same guest, the same assertions, whichever VMM runs it.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use ferry_probe_packets::ipv4::{write_icmp_echo_frame, Endpoints};
use ferry_probe_packets::{Arp, ArpOp, Ethernet, IcmpEcho, Ipv4, Ipv4Addr, MacAddr};

use super::{Cmdline, Console};
use crate::netns::{Netns, PacketSocket};

pub const GUEST_MAC: &str = "52:54:00:12:34:56";
pub const SECOND_MAC: &str = "02:00:00:00:00:03";
pub const VLAN_MAC: &str = "02:00:00:00:01:00";
pub const VLAN: u16 = 100;
const REPLY: Duration = Duration::from_secs(10);

/// Three identities on NIC 0: the device MAC and a second MAC untagged
/// (198.18.0.2, .3), and a third MAC on VLAN 100 (198.18.100.2). The
/// host side of the TAP is 198.18.0.1/24.
pub fn network_cmdline() -> Cmdline {
    Cmdline::new()
        .identity(0, None, None, "198.18.0.2/24")
        .identity(0, Some(SECOND_MAC), None, "198.18.0.3/24")
        .identity(0, Some(VLAN_MAC), Some(VLAN), "198.18.100.2/24")
}

pub fn mac(text: &str) -> MacAddr {
    MacAddr::parse(text).expect("mac")
}

pub fn ip(text: &str) -> Ipv4Addr {
    Ipv4Addr::parse(text).expect("ip")
}

/// With [`network_cmdline`] booted on `tap` in `ns` and `guest_mac` as the
/// device MAC: the host pings both untagged identities, echoes and sinks
/// UDP, and reaches the VLAN identity with hand-made 802.1Q frames (this
/// kernel has no VLAN interfaces) while untagged or wrongly tagged
/// requests stay unanswered; the probe's counters agree.
pub fn identities_answer(ns: &Netns, c: &Console, tap: &str, guest_mac: &str) {
    c.expect_seen("probe: nic 0 up");

    // The host's own stack: ARP + ICMP for the device MAC and for the extra
    // MAC the probe put in the device's MAC table.
    for addr in ["198.18.0.2", "198.18.0.3"] {
        let out = ns
            .exec(&["ping", "-c", "3", "-i", "0.2", "-W", "3", addr])
            .expect("ping");
        assert!(
            out.status.success(),
            "ping {addr}: {}\nconsole:\n{}",
            String::from_utf8_lossy(&out.stdout),
            c.output()
        );
    }
    let neigh = ns.run(&["ip", "neigh", "show", "dev", tap]).unwrap();
    assert!(
        neigh.contains(&format!("198.18.0.2 lladdr {guest_mac}")),
        "{neigh}"
    );
    assert!(
        neigh.contains(&format!("198.18.0.3 lladdr {SECOND_MAC}")),
        "{neigh}"
    );

    // UDP echo and sink from a socket inside the namespace.
    let (echoed, sunk) = ns
        .enter(|| {
            let sock = UdpSocket::bind("198.18.0.1:0").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            sock.send_to(b"ferry probe echo", "198.18.0.2:7").unwrap();
            let mut buf = [0u8; 2048];
            let echoed = sock
                .recv_from(&mut buf)
                .map(|(n, from)| (buf[..n].to_vec(), from));
            for _ in 0..10 {
                sock.send_to(&[0xab; 1000], "198.18.0.2:9").unwrap();
            }
            (echoed, 10u64)
        })
        .unwrap();
    let (data, from) = echoed.expect("UDP echo reply");
    assert_eq!(data, b"ferry probe echo");
    assert_eq!(from.to_string(), "198.18.0.2:7");

    // The VLAN identity, with hand-made 802.1Q frames (this kernel has no
    // VLAN interfaces). Untagged or wrongly tagged, the probe stays quiet.
    let host_mac = mac(&ns.mac(tap).unwrap());
    let tap_name = tap.to_string();
    let results = ns
        .enter(move || {
            let sock = PacketSocket::open(&tap_name).unwrap();
            let who_has = |vlan: Option<u16>| {
                let arp = Arp {
                    op: ArpOp::Request,
                    sender_mac: host_mac,
                    sender_ip: ip("198.18.100.1"),
                    target_mac: MacAddr::ZERO,
                    target_ip: ip("198.18.100.2"),
                };
                let mut frame = [0u8; 64];
                let n = arp
                    .write_frame(&mut frame, MacAddr::BROADCAST, vlan)
                    .unwrap();
                sock.send(&frame[..n]).unwrap();
                sock.recv_matching(Duration::from_millis(1500), |f| {
                    let Ok(eth) = Ethernet::parse(f) else {
                        return false;
                    };
                    eth.src != host_mac
                        && Arp::parse(eth.payload).is_ok_and(|a| a.op == ArpOp::Reply)
                })
                .unwrap()
            };
            let untagged = who_has(None);
            let wrong_vlan = who_has(Some(200));
            let tagged = who_has(Some(VLAN));
            let echo = IcmpEcho {
                is_request: true,
                id: 0x4242,
                seq: 1,
                data: b"vlan ping payload",
            };
            let ends = Endpoints {
                src_mac: host_mac,
                dst_mac: mac(VLAN_MAC),
                vlan: Some(VLAN),
                src_ip: ip("198.18.100.1"),
                dst_ip: ip("198.18.100.2"),
            };
            let mut frame = [0u8; 128];
            let n = write_icmp_echo_frame(&mut frame, &ends, 7, &echo).unwrap();
            sock.send(&frame[..n]).unwrap();
            let pong = sock
                .recv_matching(Duration::from_secs(2), |f| {
                    Ethernet::parse(f)
                        .is_ok_and(|e| e.src == mac(VLAN_MAC) && e.ethertype == 0x0800)
                })
                .unwrap();
            (untagged, wrong_vlan, tagged, pong)
        })
        .unwrap();
    let (untagged, wrong_vlan, tagged, pong) = results;
    assert!(
        untagged.is_none(),
        "answered an untagged ARP for a VLAN address"
    );
    assert!(wrong_vlan.is_none(), "answered an ARP on the wrong VLAN");
    let tagged = tagged.expect("tagged ARP reply");
    let eth = Ethernet::parse(&tagged).unwrap();
    assert_eq!(eth.vlan_id(), Some(VLAN));
    assert_eq!(eth.dst, host_mac);
    let reply = Arp::parse(eth.payload).unwrap();
    assert_eq!(reply.sender_mac, mac(VLAN_MAC));
    assert_eq!(reply.sender_ip, ip("198.18.100.2"));
    let pong = pong.expect("tagged ICMP echo reply");
    let eth = Ethernet::parse(&pong).unwrap();
    assert_eq!(eth.vlan_id(), Some(VLAN));
    let ipv4 = Ipv4::parse(eth.payload).unwrap();
    assert_eq!(ipv4.src, ip("198.18.100.2"));
    let echo = IcmpEcho::parse(ipv4.payload).unwrap();
    assert!(!echo.is_request);
    assert_eq!(
        (echo.id, echo.seq, echo.data),
        (0x4242, 1, &b"vlan ping payload"[..])
    );

    let counters = c.send_command("counters 0", REPLY);
    let get = |k: &str| {
        counters
            .number(k)
            .unwrap_or_else(|| panic!("{k} in {counters:?}"))
    };
    assert!(get("arp_replies") >= 3, "{counters:?}");
    assert!(get("icmp_echo") >= 7, "{counters:?}");
    assert_eq!(get("udp_echo"), 1);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut sink = get("udp_sink_frames");
    while sink < sunk && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        sink = c
            .send_command("counters 0", REPLY)
            .number("udp_sink_frames")
            .unwrap();
    }
    assert_eq!(sink, sunk);
    assert!(get("tx_frames") >= get("arp_replies") + get("icmp_echo"));
    assert!(
        get("irqs") > 0,
        "virtio interrupts were never taken: {counters:?}"
    );
}
