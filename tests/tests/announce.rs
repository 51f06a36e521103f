//! After a live migration the guest is announced on the network at once
//! (issue #7), checked on the topology of `ferry_tests::switch`: a switch
//! namespace, hosts A and B on trunks, a client pinging the guest's three
//! identities (device MAC 198.18.0.2, a second MAC 198.18.0.3, a third MAC
//! on VLAN 100 198.18.100.2) every 10 ms while it moves from A to B over
//! TCP. A capture on the switch's port toward B, decoded by tshark, shows
//! the announce; `bridge monitor fdb` shows when the switch moved each MAC.
//!
//! - guest announce (default): each round is one gratuitous ARP per
//!   identity, tagged on VLAN 100 for the VLAN one, from the probe on
//!   S_ANNOUNCE; no RARP.
//! - `--net ...,guest-announce=off` on the source (the destination's
//!   `--net tap=` inherits it from the stream), and `probe.announce=off`
//!   (the guest declines): each round is Ferry's RARP for every (MAC,
//!   VLAN) the guest sent from before the move — its three identities,
//!   not the filter's 3 MACs × (untagged + VLAN 100) — byte for byte
//!   `net::rarp::rarp_frame`.
//! - in every mode: five rounds at about 0/50/200/450/800 ms; the first
//!   round carries every identity and ends before the second's time; the
//!   switch learned every MAC on B's port between the first frame and the
//!   second round, straight from A's port (never aged out: ageing is 300
//!   s, the test takes seconds); all three pings recover; pings lost per
//!   identity ≤ downtime / 10 ms + 2 (downtime from the source's
//!   `query-migrate`).
//!
//! Limitation: this kernel has no 802.1Q and no bridge `vlan_filtering`,
//! so the bridges are VLAN-unaware: tagged frames cross them unchanged,
//! and the FDB is per MAC, not per MAC and VLAN. The VLAN identity has a
//! MAC of its own, so "its" FDB entry is still checked; per-(MAC, VLAN)
//! learning is not. The tag on the wire is checked in the capture.
//!
//! The Linux-guest variant (eth0, eth0.100, a macvlan; the real virtio_net
//! driver answering S_ANNOUNCE) needs hardware virtualization and is
//! skipped with the reason on kvm_pvm.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_tests::announce::{
    announce_frames, one_at_a_time, round_content, round_offsets_ms, rounds, schedule_matches,
    AnnounceFrame, Kind,
};
use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_hw_virt, require_kvm, require_root, require_tool, skip, TempPath};
use ferry_tests::hosts::{assert_completed, migrate, status, wait_migration, A_TAP, B_ADDR, B_TAP};
use ferry_tests::probe::checks::{network_cmdline, GUEST_MAC};
use ferry_tests::probe::{fields, READY};
use ferry_tests::switch::{probe_identities, FdbMonitor, Identity, Pinger, Switch, PORT_A, PORT_B};

const T: Duration = Duration::from_secs(60);
const PING_EVERY: Duration = Duration::from_millis(10);
/// QEMU's default schedule: rounds at these offsets (ms).
const ROUNDS_MS: [u64; 5] = [0, 50, 200, 450, 800];
const GUEST_ANNOUNCE_BIT: u64 = 1 << 21;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Default: the guest announces itself on S_ANNOUNCE.
    Guest,
    /// `guest-announce=off` on the source's `--net`: Ferry's RARPs.
    DeviceOff,
    /// `probe.announce=off`: the guest does not negotiate it; RARPs.
    GuestDeclines,
    /// The guest announces itself but leaves its second MAC out (a quiet
    /// identity: an L2 bridge, DPDK, a forgotten address): Ferry RARPs
    /// for that one alone, after the guest had its chance.
    PartlyQuiet,
}

/// The identity [`Mode::PartlyQuiet`]'s guest does not announce.
const QUIET: usize = 1;

fn can_run(test: &str) -> bool {
    require_kvm(test).is_some()
        && require_root(test)
        && ["tcpdump", "tshark", "bridge"]
            .iter()
            .all(|t| require_tool(test, t))
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn at(s: f64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs_f64(s)
}

/// What happened around one migration.
struct Moved {
    frames: Vec<AnnounceFrame>,
    downtime_ms: u64,
    /// Pings lost per identity pinged: its name, when they were sent.
    lost: Vec<(&'static str, Vec<SystemTime>)>,
    /// When the switch learned each identity's MAC on B's port.
    learned: Vec<Option<SystemTime>>,
    /// FDB entries of the guest's MACs deleted (aged out) meanwhile.
    aged: Vec<String>,
    fdb_after: Vec<Option<String>>,
    /// Per identity, the outage (first request lost, first answered).
    outages: Vec<Option<(SystemTime, SystemTime)>>,
    elapsed: Duration,
}

/// Pings `ids` from the client while the guest on `src` migrates to
/// `dst` (waiting on B at `uri`); captures the switch's port toward B.
fn migrate_with_pings(
    sw: &Switch,
    src: &FerryVm,
    dst: &FerryVm,
    uri: &str,
    ids: &[Identity],
    quiet: Option<usize>,
) -> Moved {
    let start = SystemTime::now();
    // A quiet identity is used before the move (one ping: the switch and
    // Ferry see it at A), then left alone: nothing but an announce can
    // move it.
    if let Some(q) = quiet {
        let out = sw
            .client
            .exec(&["ping", "-c", "1", "-W", "5", ids[q].ip])
            .expect("ping");
        assert!(out.status.success(), "{} does not answer on A", ids[q].name);
    }
    let pinged: Vec<Identity> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != quiet)
        .map(|(_, id)| id.clone())
        .collect();
    let pinger = Pinger::start(sw, &pinged, PING_EVERY);
    assert!(
        pinger.wait_all_answer(start, Duration::from_secs(20)),
        "not every identity answers on A: {:?}\nconsole:\n{}",
        pinger
            .log()
            .sent
            .iter()
            .map(|s| s.len())
            .collect::<Vec<_>>(),
        src.console.output()
    );
    for id in ids {
        assert_eq!(
            sw.port_of(id.mac).as_deref(),
            Some(PORT_A),
            "{} before: {:?}",
            id.name,
            sw.fdb()
        );
    }
    let monitor = FdbMonitor::start(sw);
    let file = TempPath::new(&format!("{}.pcap", sw.sw.name()));
    let capture = sw.sw.capture(PORT_B, &file).expect("capture");
    let t0 = SystemTime::now();
    migrate(src, uri);
    let info = wait_migration(src, T);
    assert_completed(&info, src, dst);
    let done = SystemTime::now();
    let recovered = pinger.wait_all_answer(done, Duration::from_secs(5));
    // Every round of the schedule (800 ms) is on the wire.
    std::thread::sleep(Duration::from_millis(1200));
    // Requests of the last 100 ms may still be on their way back.
    let until = SystemTime::now() - Duration::from_millis(100);
    let log = pinger.stop();
    let pcap = capture.stop().expect("tcpdump");
    assert!(
        recovered,
        "pings did not recover within 5 s of the migration: {:?}\ndestination console:\n{}",
        (0..pinged.len())
            .map(|i| log.first_reply_after(i, done))
            .collect::<Vec<_>>(),
        dst.console.output()
    );
    let macs: Vec<&str> = ids.iter().map(|i| i.mac).collect();
    let frames = announce_frames(&pcap, &macs).expect("tshark");
    let downtime_ms = info["downtime"].as_u64().expect("downtime");
    let aged = monitor
        .events()
        .into_iter()
        .filter(|e| e.deleted && macs.contains(&e.mac.as_str()))
        .map(|e| e.mac)
        .collect();
    Moved {
        lost: pinged
            .iter()
            .enumerate()
            .map(|(i, id)| (id.name, log.lost_at(i, t0, until)))
            .collect(),
        learned: ids
            .iter()
            .map(|id| monitor.moved_to(id.mac, PORT_B, t0))
            .collect(),
        fdb_after: ids.iter().map(|id| sw.port_of(id.mac)).collect(),
        outages: (0..pinged.len()).map(|i| log.longest_outage(i)).collect(),
        aged,
        frames,
        downtime_ms,
        elapsed: t0.elapsed().unwrap_or_default(),
    }
}

/// What one round must carry in `mode`.
fn expected_round(mode: Mode, ids: &[Identity]) -> Vec<(String, Option<u16>, Kind)> {
    let mut v = Vec::new();
    match mode {
        Mode::Guest => {
            for id in ids {
                let ip = id.ip.to_string();
                v.push((id.mac.to_string(), id.vlan, Kind::Garp { ip }));
            }
        }
        // Exactly the (MAC, VLAN) pairs the guest sent from before the
        // move (it answered the pings to each identity), not every MAC on
        // every VLAN of its filter: the device MAC on VLAN 100 or the
        // VLAN identity's MAC untagged are nobody the network knows.
        Mode::DeviceOff | Mode::GuestDeclines => {
            for id in ids {
                v.push((id.mac.to_string(), id.vlan, Kind::Rarp));
            }
        }
        // The guest's own for what it announces, Ferry's RARP for the
        // identity it left out, and nothing else.
        Mode::PartlyQuiet => {
            for (i, id) in ids.iter().enumerate() {
                let kind = if i == QUIET {
                    Kind::Rarp
                } else {
                    Kind::Garp {
                        ip: id.ip.to_string(),
                    }
                };
                v.push((id.mac.to_string(), id.vlan, kind));
            }
        }
    }
    round_content(
        &v.into_iter()
            .map(|(src, vlan, kind)| AnnounceFrame {
                at: 0.0,
                src,
                vlan,
                kind,
                bytes: Vec::new(),
            })
            .collect::<Vec<_>>(),
    )
}

/// The assertions shared by every mode and guest.
fn check_moved(what: &str, m: &Moved, ids: &[Identity], mode: Mode, tolerance_ms: f64) {
    let rs = rounds(&m.frames, 0.02);
    let offsets = round_offsets_ms(&rs);
    let first = m.frames.first().map_or(0.0, |f| f.at);
    let outages: Vec<String> = m
        .outages
        .iter()
        .map(|o| match o {
            Some((from, to)) => format!(
                "{:.1}..{:+.1}",
                (secs(*from) - first) * 1e3,
                (secs(*to) - first) * 1e3
            ),
            None => "none".into(),
        })
        .collect();
    let lost: Vec<Vec<String>> = m
        .lost
        .iter()
        .map(|(_, l)| {
            l.iter()
                .map(|t| format!("{:+.1}", (secs(*t) - first) * 1e3))
                .collect()
        })
        .collect();
    let summary = format!(
        "{what}: {} frames, rounds at {offsets:.1?} ms, downtime {} ms, lost {:?}, \
         outages (ms from the first frame) {outages:?}, lost at {lost:?}",
        m.frames.len(),
        m.downtime_ms,
        m.lost.iter().map(|(_, l)| l.len()).collect::<Vec<_>>()
    );
    eprintln!("{summary}");
    assert!(
        schedule_matches(&offsets, &ROUNDS_MS, tolerance_ms),
        "{summary}: not the default schedule {ROUNDS_MS:?}"
    );
    let want = expected_round(mode, ids);
    for (i, r) in rs.iter().enumerate() {
        assert_eq!(round_content(r), want, "{summary}: round {}", i + 1);
    }
    if matches!(mode, Mode::DeviceOff | Mode::GuestDeclines) {
        for f in &m.frames {
            let mac: net::MacAddr = f.src.parse().expect("MAC");
            assert_eq!(
                f.bytes,
                net::rarp::rarp_frame(mac, f.vlan),
                "{summary}: RARP bytes from {} vlan {:?}",
                f.src,
                f.vlan
            );
        }
    }
    let (first, second) = (rs[0][0].at, rs[1][0].at);
    assert!(
        rs[0].last().unwrap().at < first + ROUNDS_MS[1] as f64 / 1e3,
        "{summary}: the first round outlasted the second's time"
    );
    for (id, learned) in ids.iter().zip(&m.learned) {
        let t = learned.unwrap_or_else(|| {
            panic!(
                "{summary}: the switch never learned {} on B's port",
                id.name
            )
        });
        // Before the second round: the first did it. (Not checked: that
        // nothing came before the first announce frame. The guest may
        // answer a ping that was still in its rx ring when the source
        // stopped before it takes the announce interrupt: a reply from B
        // teaches the switch as well.)
        assert!(
            t < at(second),
            "{summary}: {} learned on B at {:.4}, first round at {first:.4}, second at {second:.4}",
            id.name,
            secs(t)
        );
    }
    assert!(
        m.aged.is_empty(),
        "{summary}: FDB entries aged out: {:?}",
        m.aged
    );
    for (id, port) in ids.iter().zip(&m.fdb_after) {
        assert_eq!(port.as_deref(), Some(PORT_B), "{summary}: {}", id.name);
    }
    let bound = m.downtime_ms as usize / PING_EVERY.as_millis() as usize + 2;
    for (name, lost) in &m.lost {
        let lost = lost.len();
        assert!(
            lost <= bound,
            "{summary}: {name} lost {lost} pings (bound {bound})"
        );
    }
}

fn probe_migration(test: &str, mode: Mode) {
    if !can_run(test) {
        return;
    }
    let _serial = one_at_a_time();
    let sw = Switch::new(test);
    assert!(
        sw.ageing_time() >= Duration::from_secs(60),
        "{:?}",
        sw.ageing_time()
    );
    let ids = probe_identities();
    let mut cmdline = network_cmdline();
    if mode == Mode::GuestDeclines {
        cmdline = cmdline.announce(false);
    }
    let quiet = (mode == Mode::PartlyQuiet).then_some(QUIET);
    if quiet.is_some() {
        // network_cmdline's second identity (the second MAC, untagged).
        let mut ids = cmdline.ids.clone();
        ids[QUIET].quiet = true;
        cmdline.ids = ids;
    }
    let mut spec = VmSpec::probe(&cmdline.build());
    let off = if mode == Mode::DeviceOff {
        ",guest-announce=off"
    } else {
        ""
    };
    spec.nets = vec![format!("tap={A_TAP},mac={GUEST_MAC}{off}")];
    let src = FerryVm::spawn(&format!("{test}-src"), &spec, Some(&sw.hosts.a));
    src.console.expect(READY, T);
    let nic = fields(&src.console.expect_seen("probe: nic 0 up"));
    let offered = u64::from_str_radix(nic["offered"].trim_start_matches("0x"), 16).unwrap();
    assert_eq!(
        offered & GUEST_ANNOUNCE_BIT != 0,
        mode != Mode::DeviceOff,
        "{nic:?}"
    );
    let negotiated = if matches!(mode, Mode::Guest | Mode::PartlyQuiet) {
        "on"
    } else {
        "off"
    };
    assert_eq!(nic["announce"], negotiated, "{nic:?}");

    let uri = format!("tcp:{B_ADDR}:4446");
    let mut dspec = VmSpec::incoming(&uri);
    // Only the TAP: GUEST_ANNOUNCE on or off comes with the stream.
    dspec.nets = vec![format!("tap={B_TAP}")];
    let dst = FerryVm::spawn(&format!("{test}-dst"), &dspec, Some(&sw.hosts.b));
    let moved = migrate_with_pings(&sw, &src, &dst, &uri, &ids, quiet);
    assert_eq!(status(&src), "postmigrate");
    assert_eq!(status(&dst), "running");
    check_moved(test, &moved, &ids, mode, 40.0);
    assert!(moved.elapsed < sw.ageing_time() / 10);
    let counters = dst.console.send_command("counters 0", T);
    let rounds_served = if matches!(mode, Mode::Guest | Mode::PartlyQuiet) {
        5
    } else {
        0
    };
    assert_eq!(
        counters.number("announces"),
        Some(rounds_served),
        "{:?}",
        counters.lines
    );
}

#[test]
fn an_identity_the_guest_does_not_announce_gets_a_rarp_and_no_other_does() {
    probe_migration("annquiet", Mode::PartlyQuiet);
}

#[test]
fn guest_announces_every_identity_in_the_first_round_after_live_migration() {
    probe_migration("annguest", Mode::Guest);
}

#[test]
fn device_without_guest_announce_sends_rarps_for_every_identity_the_guest_uses() {
    probe_migration("anndevoff", Mode::DeviceOff);
}

#[test]
fn guest_declining_guest_announce_gets_rarps_for_every_identity_it_uses() {
    probe_migration("anndecline", Mode::GuestDeclines);
}

/// The Linux guest: eth0 (198.18.0.2), eth0.100 (198.18.100.2, eth0's MAC
/// tagged) and a macvlan with its own MAC (198.18.0.3); Linux's
/// virtio_net answers S_ANNOUNCE with netdev_notify_peers, which the VLAN
/// and macvlan drivers pass on to their devices.
#[test]
fn linux_guest_eth0_vlan_and_macvlan_recover_after_live_migration() {
    let test = "linux_guest_eth0_vlan_and_macvlan_recover_after_live_migration";
    if !require_hw_virt(test) || !can_run(test) {
        return;
    }
    let _serial = one_at_a_time();
    let guest = match ferry_tests::linux::linux_guest() {
        Ok(g) => g,
        Err(e) if ferry_tests::host::is_ci() => panic!("{test}: no Linux guest: {e}"),
        Err(e) => return skip(test, &format!("no Linux guest: {e}")),
    };
    const MACVLAN_MAC: &str = "02:00:00:00:00:33";
    let ids = vec![
        Identity {
            name: "eth0",
            mac: GUEST_MAC,
            vlan: None,
            ip: "198.18.0.2",
        },
        Identity {
            name: "eth0.100",
            mac: GUEST_MAC,
            vlan: Some(100),
            ip: "198.18.100.2",
        },
        Identity {
            name: "macvlan",
            mac: MACVLAN_MAC,
            vlan: None,
            ip: "198.18.0.3",
        },
    ];
    let cmdline = ferry_tests::linux::Cmdline::new()
        .ip("198.18.0.2/24")
        .vlan(100, Some("198.18.100.2/24"))
        .macvlan(MACVLAN_MAC, None, Some("198.18.0.3/24"));
    let sw = Switch::new("annlinux");
    let mut spec = VmSpec::probe(&cmdline.to_string());
    spec.kernel = guest.bzimage.clone();
    spec.memory = "512M".into();
    spec.extra = vec!["--initrd".into(), guest.initramfs.display().to_string()];
    spec.nets = vec![format!("tap={A_TAP},mac={GUEST_MAC}")];
    let src = FerryVm::spawn("annlinux-src", &spec, Some(&sw.hosts.a));
    let ready = src.console.expect(ferry_tests::linux::READY_MARKER, T);
    let parsed = ferry_tests::linux::Ready::parse(&ready).expect("ready line");
    assert!(parsed.interface("eth0.100").is_some(), "{ready}");
    assert!(parsed.interface("mv0").is_some(), "{ready}");
    let uri = format!("tcp:{B_ADDR}:4446");
    let mut dspec = VmSpec::incoming(&uri);
    dspec.nets = vec![format!("tap={B_TAP}")];
    let dst = FerryVm::spawn("annlinux-dst", &dspec, Some(&sw.hosts.b));
    let moved = migrate_with_pings(&sw, &src, &dst, &uri, &ids, None);
    assert_eq!(status(&dst), "running");
    // Linux may send more than one gratuitous ARP per address and round
    // (and IPv6 neighbour advertisements, not counted here): every round
    // must carry each identity at least once; the rest is as for the probe.
    let rs = rounds(&moved.frames, 0.02);
    let want = expected_round(Mode::Guest, &ids);
    for (i, r) in rs.iter().enumerate() {
        let mut got = round_content(r);
        got.dedup();
        assert_eq!(got, want, "round {} of {rs:?}", i + 1);
    }
    let deduped = Moved {
        frames: rs
            .iter()
            .flat_map(|r| {
                let mut seen = Vec::new();
                r.iter()
                    .filter(|f| {
                        let key = (f.src.clone(), f.vlan, f.kind.clone());
                        let new = !seen.contains(&key);
                        seen.push(key);
                        new
                    })
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect(),
        ..moved
    };
    check_moved(test, &deduped, &ids, Mode::Guest, 60.0);
}
