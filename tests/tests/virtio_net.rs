//! virtio-net under Ferry with the probe guest, on real TAPs in network
//! namespaces of the test's own: the same identity checks the probe passes
//! under QEMU, the device's MAC table and VLAN filter as QMP reports them,
//! 10,000 UDP echoes of mixed sizes, and two Ferry guests on one bridge.

use std::collections::HashMap;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root};
use ferry_tests::netns::Netns;
use ferry_tests::probe::checks::{
    identities_answer, network_cmdline, GUEST_MAC, SECOND_MAC, VLAN, VLAN_MAC,
};
use ferry_tests::probe::{Cmdline, READY};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn can_run(test: &str) -> bool {
    require_kvm(test).is_some() && require_root(test)
}

/// A namespace with TAP `tap0` at 198.18.0.1/24 and the probe on it.
fn boot(test: &str, cmdline: &Cmdline, net: &str) -> (FerryVm, Netns) {
    let ns = Netns::new(test).expect("netns");
    ns.add_tap("tap0").expect("tap");
    ns.add_addr("tap0", "198.18.0.1/24").expect("addr");
    let mut spec = VmSpec::probe(&cmdline.build());
    spec.nets = vec![net.to_string()];
    let vm = FerryVm::spawn(test, &spec, Some(&ns));
    vm.console.expect(READY, T);
    (vm, ns)
}

#[test]
fn answers_ping_arp_and_udp_on_every_identity_and_reports_its_filter() {
    let test = "answers_ping_arp_and_udp_on_every_identity_and_reports_its_filter";
    if !can_run(test) {
        return;
    }
    let (vm, ns) = boot(
        "ferrynet",
        &network_cmdline(),
        &format!("tap=tap0,mac={GUEST_MAC}"),
    );
    identities_answer(&ns, &vm.console, "tap0", GUEST_MAC);

    // The device's view of what the guest programmed, through QMP.
    let filters = vm
        .execute("query-rx-filter", json!({}))
        .expect("query-rx-filter");
    let f = &filters[0];
    assert_eq!(f["name"], "net0", "{filters}");
    assert_eq!(f["main-mac"], GUEST_MAC);
    let unicast: Vec<&str> = f["unicast-table"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    assert!(
        unicast.contains(&SECOND_MAC) && unicast.contains(&VLAN_MAC),
        "{filters}"
    );
    assert_eq!(f["vlan-table"], json!([VLAN]), "{filters}");
    assert_eq!(f["vlan"], "normal");
    let by_name = vm
        .execute("query-rx-filter", json!({"name": "net0"}))
        .expect("by name");
    assert_eq!(by_name, filters);
}

#[test]
fn echoes_ten_thousand_udp_datagrams_of_mixed_sizes() {
    if !can_run("echoes_ten_thousand_udp_datagrams_of_mixed_sizes") {
        return;
    }
    let cmdline = Cmdline::new().identity(0, None, None, "198.18.0.2/24");
    let (vm, ns) = boot("ferryecho", &cmdline, "tap=tap0");
    const COUNT: u32 = 10_000;
    const WINDOW: u32 = 32;
    const SIZES: [usize; 8] = [1, 17, 64, 100, 512, 999, 1400, 1472];
    let result = ns
        .enter(move || -> Result<u32, String> {
            let sock = UdpSocket::bind("198.18.0.1:0").map_err(|e| e.to_string())?;
            sock.set_read_timeout(Some(Duration::from_millis(500)))
                .map_err(|e| e.to_string())?;
            let payload = |seq: u32| -> Vec<u8> {
                let len = SIZES[seq as usize % SIZES.len()];
                let mut p: Vec<u8> = (0..len).map(|i| (seq as usize * 31 + i) as u8).collect();
                for (i, b) in seq.to_le_bytes().iter().enumerate().take(len) {
                    p[i] = *b;
                }
                p
            };
            let mut outstanding: HashMap<u32, Vec<u8>> = HashMap::new();
            let (mut next, mut echoed) = (0u32, 0u32);
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut buf = [0u8; 2048];
            while echoed < COUNT {
                if Instant::now() > deadline {
                    return Err(format!("only {echoed} of {COUNT} echoed in time"));
                }
                while next < COUNT && outstanding.len() < WINDOW as usize {
                    let p = payload(next);
                    sock.send_to(&p, "198.18.0.2:7")
                        .map_err(|e| e.to_string())?;
                    outstanding.insert(next, p);
                    next += 1;
                }
                match sock.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        if from.to_string() != "198.18.0.2:7" {
                            return Err(format!("reply from {from}"));
                        }
                        let data = &buf[..n];
                        // Sizes below 4 bytes carry a partial sequence number:
                        // find the datagram by content instead.
                        let seq = outstanding
                            .iter()
                            .find(|(_, p)| p.as_slice() == data)
                            .map(|(s, _)| *s);
                        match seq {
                            Some(s) => {
                                outstanding.remove(&s);
                                echoed += 1;
                            }
                            None => return Err(format!("echo of {n} bytes matches nothing sent")),
                        }
                    }
                    Err(_) => {
                        return Err(format!(
                            "timed out with {} datagrams unanswered (echoed {echoed})",
                            outstanding.len()
                        ))
                    }
                }
            }
            Ok(echoed)
        })
        .expect("enter netns");
    match result {
        Ok(n) => assert_eq!(n, COUNT),
        Err(e) => panic!("{e}\nconsole:\n{}", vm.console.output()),
    }
    let counters = vm.console.send_command("counters 0", T);
    assert_eq!(
        counters.number("udp_echo"),
        Some(u64::from(COUNT)),
        "{:?}",
        counters.lines
    );
}

#[test]
fn guest_to_host_udp_arrives_complete() {
    if !can_run("guest_to_host_udp_arrives_complete") {
        return;
    }
    let cmdline = Cmdline::new().identity(0, None, None, "198.18.0.2/24");
    let (vm, ns) = boot("ferryblast", &cmdline, "tap=tap0");
    const COUNT: u64 = 2_000;
    let sock = ns
        .enter(|| {
            let s = UdpSocket::bind("198.18.0.1:5555").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            // Room for the whole burst: the test measures the NIC, not
            // how fast this thread is scheduled on a busy host.
            let size: libc::c_int = 8 << 20;
            // SAFETY: setsockopt on our own socket with a live c_int.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            s
        })
        .expect("socket in netns");
    vm.console.send_command(
        &format!("udp-blast 0 198.18.0.2 198.18.0.1:5555 1000 5000 {COUNT}"),
        T,
    );
    let mut buf = [0u8; 2048];
    let mut got = 0;
    while got < COUNT {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                assert_eq!(n, 1000);
                assert_eq!(from.ip().to_string(), "198.18.0.2");
                got += 1;
            }
            Err(e) => panic!(
                "received {got} of {COUNT}: {e}\nconsole:\n{}",
                vm.console.output()
            ),
        }
    }
    vm.console.expect("probe: udp-blast done", T);
}

#[test]
fn two_ferry_guests_on_one_bridge_reach_each_other() {
    if !can_run("two_ferry_guests_on_one_bridge_reach_each_other") {
        return;
    }
    let ns = Netns::new("ferrybridge").expect("netns");
    ns.add_bridge("br0").expect("bridge");
    ns.add_addr("br0", "198.18.0.1/24").expect("addr");
    let mut vms = Vec::new();
    // Default MACs derive from the NIC id (stable across restarts), so
    // guests sharing a network need distinct ids, or mac=.
    for (tap, addr) in [("tapa", "198.18.0.2/24"), ("tapb", "198.18.0.3/24")] {
        ns.add_tap(tap).expect("tap");
        ns.add_to_bridge(tap, "br0").expect("enslave");
        let mut spec = VmSpec::probe(&Cmdline::new().identity(0, None, None, addr).build());
        spec.nets = vec![format!("tap={tap},id=lan-{tap}")];
        let vm = FerryVm::spawn(tap, &spec, Some(&ns));
        vm.console.expect(READY, T);
        vms.push(vm);
    }
    for addr in ["198.18.0.2", "198.18.0.3"] {
        let out = ns
            .exec(&["ping", "-c", "2", "-i", "0.2", "-W", "3", addr])
            .unwrap();
        assert!(
            out.status.success(),
            "host ping {addr}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // Each guest sends 200 datagrams to the other's UDP sink.
    for (from, to, src, dst) in [
        (0, 1, "198.18.0.2", "198.18.0.3"),
        (1, 0, "198.18.0.3", "198.18.0.2"),
    ] {
        vms[from]
            .console
            .send_command(&format!("udp-blast 0 {src} {dst}:9 500 5000 200"), T);
        vms[from]
            .console
            .expect("probe: udp-blast done nic=0 frames=200", T);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let sunk = vms[to]
                .console
                .send_command("counters 0", T)
                .number("udp_sink_frames")
                .unwrap_or(0);
            if sunk >= 200 {
                assert_eq!(sunk, 200);
                break;
            }
            assert!(Instant::now() < deadline, "guest {to} sank {sunk} of 200");
            std::thread::sleep(Duration::from_millis(50));
        }
        vms[to].console.send_command("counters-reset 0", T);
    }
    let macs: Vec<String> = vms
        .iter()
        .map(|vm| {
            vm.execute("query-rx-filter", json!({})).expect("rx filter")[0]["main-mac"].to_string()
        })
        .collect();
    assert_ne!(macs[0], macs[1]);
}
