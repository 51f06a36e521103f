//! What starts an announce, and what does not (issue #7): the probe guest
//! with two NICs — net0 offering GUEST_ANNOUNCE (the probe's three
//! identities: it answers S_ANNOUNCE with gratuitous ARPs) and net1 with
//! `guest-announce=off` (Ferry's RARPs) — each on a TAP of its own that
//! tcpdump captures; tshark decodes.
//!
//! - Boot, a plain `cont` after `stop`, and `quit` announce nothing (the
//!   probe sends gratuitous ARPs only when asked: a `garp` console command
//!   shows that the capture would see them).
//! - QMP `announce-self` on a running guest sends one schedule (five
//!   rounds at about 0/50/200/450/800 ms), a second call with the same id
//!   restarts it, `interfaces` selects NICs (an unknown one is
//!   DeviceNotFound), and its timing parameters are honoured.
//! - A snapshot (`migrate file:`) does not announce on the running source;
//!   restoring it (`ferry run --incoming file:`) does, at once; with `-S`
//!   only at `cont` (and a later stop/cont does not again).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_tests::announce::{
    announce_frames, one_at_a_time, round_content, round_offsets_ms, rounds, schedule_matches,
    AnnounceFrame, Kind,
};
use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root, require_tool, TempPath};
use ferry_tests::hosts::{migrate, status, wait_migration, wait_status};
use ferry_tests::netns::{Capture, Netns};
use ferry_tests::probe::checks::{network_cmdline, GUEST_MAC, SECOND_MAC, VLAN, VLAN_MAC};
use ferry_tests::probe::READY;
use serde_json::json;

const T: Duration = Duration::from_secs(60);
const NET1_MAC: &str = "52:54:00:12:34:57";
const ROUNDS_MS: [u64; 5] = [0, 50, 200, 450, 800];
/// Long enough for a whole default schedule to have gone out.
const SCHEDULE: Duration = Duration::from_millis(1300);

fn can_run(test: &str) -> bool {
    require_kvm(test).is_some()
        && require_root(test)
        && ["tcpdump", "tshark"].iter().all(|t| require_tool(test, t))
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// A namespace with `tap0` and `tap1`, both captured from the start.
struct Host {
    ns: Netns,
    captures: Vec<Capture>,
    /// Removed when the host goes, whatever the test's outcome.
    _files: Vec<TempPath>,
}

impl Host {
    fn new(name: &str) -> Host {
        let ns = Netns::new(name).expect("netns");
        let _ = ns.run(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        let _ = ns.run(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        let mut captures = Vec::new();
        let mut files = Vec::new();
        for tap in ["tap0", "tap1"] {
            ns.add_tap(tap).expect("tap");
            let file = TempPath::new(&format!("{}-{tap}.pcap", ns.name()));
            captures.push(ns.capture(tap, &file).expect("tcpdump"));
            files.push(file);
        }
        Host {
            ns,
            captures,
            _files: files,
        }
    }

    /// Stops the captures; the announce frames of net0 and of net1.
    fn frames(self) -> (Vec<AnnounceFrame>, Vec<AnnounceFrame>) {
        let mut out = Vec::new();
        let macs = [vec![GUEST_MAC, SECOND_MAC, VLAN_MAC], vec![NET1_MAC]];
        // The capture files go with `self._files` at the end.
        for (capture, macs) in self.captures.into_iter().zip(&macs) {
            let pcap = capture.stop().expect("tcpdump");
            out.push(announce_frames(&pcap, macs).expect("tshark"));
        }
        let net1 = out.pop().unwrap();
        (out.pop().unwrap(), net1)
    }
}

fn nets(first: &str, second: &str) -> Vec<String> {
    vec![first.to_string(), second.to_string()]
}

/// The two-NIC probe, booted in `host`.
fn boot(name: &str, host: &Host) -> FerryVm {
    let cmdline = network_cmdline().identity(1, None, None, "198.18.2.2/24");
    let mut spec = VmSpec::probe(&cmdline.build());
    spec.nets = nets(
        &format!("tap=tap0,mac={GUEST_MAC}"),
        &format!("tap=tap1,mac={NET1_MAC},guest-announce=off"),
    );
    let vm = FerryVm::spawn(name, &spec, Some(&host.ns));
    vm.console.expect(READY, T);
    vm.console.expect_seen("probe: nic 1 up");
    vm
}

fn in_window(frames: &[AnnounceFrame], from: SystemTime, to: SystemTime) -> Vec<AnnounceFrame> {
    frames
        .iter()
        .filter(|f| f.at >= secs(from) && f.at < secs(to))
        .cloned()
        .collect()
}

fn garp_round() -> Vec<(String, Option<u16>, Kind)> {
    let garp = |mac: &str, vlan, ip: &str| AnnounceFrame {
        at: 0.0,
        src: mac.into(),
        vlan,
        kind: Kind::Garp { ip: ip.into() },
        bytes: Vec::new(),
    };
    round_content(&[
        garp(GUEST_MAC, None, "198.18.0.2"),
        garp(SECOND_MAC, None, "198.18.0.3"),
        garp(VLAN_MAC, Some(VLAN), "198.18.100.2"),
    ])
}

/// `frames` are one schedule with rounds at `expected` ms, each round the
/// probe's three gratuitous ARPs (`guest`) or net1's one RARP.
fn assert_schedule(what: &str, frames: &[AnnounceFrame], guest: bool, expected: &[u64]) {
    let rs = rounds(frames, 0.008);
    let offsets = round_offsets_ms(&rs);
    eprintln!(
        "{what}: {} frames, rounds at {offsets:.1?} ms",
        frames.len()
    );
    let tolerance = if guest { 40.0 } else { 30.0 };
    assert!(
        schedule_matches(&offsets, expected, tolerance),
        "{what}: rounds at {offsets:.1?} ms, expected {expected:?}: {rs:?}"
    );
    for r in &rs {
        if guest {
            assert_eq!(round_content(r), garp_round(), "{what}");
        } else {
            assert_eq!(r.len(), 1, "{what}: {r:?}");
            let mac: net::MacAddr = NET1_MAC.parse().unwrap();
            assert_eq!(r[0].bytes, net::rarp::rarp_frame(mac, None), "{what}");
        }
    }
}

#[test]
fn no_announce_at_boot_at_cont_after_stop_or_at_quit() {
    let test = "no_announce_at_boot_at_cont_after_stop_or_at_quit";
    if !can_run(test) {
        return;
    }
    let _serial = one_at_a_time();
    let host = Host::new("annquiet");
    let mut vm = boot("annquiet", &host);
    std::thread::sleep(SCHEDULE);
    vm.execute("stop", json!({})).expect("stop");
    assert_eq!(status(&vm), "paused");
    std::thread::sleep(Duration::from_millis(100));
    vm.execute("cont", json!({})).expect("cont");
    assert_eq!(status(&vm), "running");
    std::thread::sleep(SCHEDULE);
    let counters = vm.console.send_command("counters 0", T);
    assert_eq!(
        counters.number("announces"),
        Some(0),
        "{:?}",
        counters.lines
    );
    // What the capture would see of a guest announce: one round, now.
    let asked = SystemTime::now();
    let garp = vm.console.send_command("garp 0", T);
    assert_eq!(garp.number("garps"), Some(3), "{:?}", garp.lines);
    std::thread::sleep(Duration::from_millis(200));
    let quit = SystemTime::now();
    vm.execute("quit", json!({})).expect("quit");
    assert_eq!(vm.wait(T).code(), Some(0));
    std::thread::sleep(Duration::from_millis(200));
    let (net0, net1) = host.frames();
    assert!(net1.is_empty(), "RARPs from net1: {net1:?}");
    assert_eq!(
        in_window(&net0, asked, quit).len(),
        net0.len(),
        "announce frames outside the `garp` command's window (boot, cont or quit): {net0:?}"
    );
    assert_schedule("garp command", &net0, true, &[0]);
}

#[test]
fn announce_self_sends_one_schedule_restarts_by_id_and_selects_interfaces() {
    let test = "announce_self_sends_one_schedule_restarts_by_id_and_selects_interfaces";
    if !can_run(test) {
        return;
    }
    let _serial = one_at_a_time();
    let host = Host::new("annself");
    let vm = boot("annself", &host);
    let mut qmp = vm.qmp();
    let mut call = |args: serde_json::Value| {
        let at = SystemTime::now();
        let args = args.as_object().cloned();
        (at, qmp.execute("announce-self", args))
    };

    // One schedule on both NICs.
    let (t1, r) = call(json!({}));
    r.expect("announce-self");
    std::thread::sleep(SCHEDULE + Duration::from_millis(300));
    // The same id again while it runs: it starts over.
    let (t2, r) = call(json!({ "id": "again" }));
    r.expect("announce-self");
    std::thread::sleep(Duration::from_millis(120));
    let (t3, r) = call(json!({ "id": "again" }));
    r.expect("announce-self");
    std::thread::sleep(SCHEDULE);
    // Only net1.
    let (t4, r) = call(json!({ "interfaces": ["net1"] }));
    r.expect("announce-self");
    std::thread::sleep(SCHEDULE);
    // Only net1, with its own timing: pauses of 20, 30, 40 ms.
    let (t5, r) = call(json!({
        "interfaces": ["net1"], "initial": 20, "max": 40, "rounds": 4, "step": 10
    }));
    r.expect("announce-self");
    std::thread::sleep(Duration::from_millis(400));
    let (_, r) = call(json!({ "interfaces": ["nope"] }));
    let err = format!("{:?}", r.expect_err("an unknown NIC"));
    assert!(err.contains("DeviceNotFound"), "{err}");
    let end = SystemTime::now();
    drop(vm);
    let (net0, net1) = host.frames();

    assert_schedule("announce-self", &in_window(&net0, t1, t2), true, &ROUNDS_MS);
    assert_schedule(
        "announce-self",
        &in_window(&net1, t1, t2),
        false,
        &ROUNDS_MS,
    );
    // Two rounds of the first call, then a whole schedule from the second.
    for (frames, guest) in [(&net0, true), (&net1, false)] {
        let first = in_window(frames, t2, t3);
        assert_eq!(
            rounds(&first, 0.008).len(),
            2,
            "before the restart: {first:?}"
        );
        let restarted = in_window(frames, t3, t4);
        assert_schedule("restarted", &restarted, guest, &ROUNDS_MS);
        assert!(restarted[0].at - secs(t3) < 0.02, "the restart waited");
    }
    assert!(in_window(&net0, t4, end).is_empty(), "net0 was not asked");
    assert_schedule("interfaces", &in_window(&net1, t4, t5), false, &ROUNDS_MS);
    assert_schedule(
        "parameters",
        &in_window(&net1, t5, end),
        false,
        &[0, 20, 50, 90],
    );
}

fn restored(name: &str, host: &Host, file: &str, paused: bool) -> FerryVm {
    let mut spec = VmSpec::incoming(&format!("file:{file}"));
    // Only the TAPs: everything else, guest-announce=off included, comes
    // with the snapshot.
    spec.nets = nets("tap=tap0", "tap=tap1");
    spec.paused = paused;
    FerryVm::spawn(name, &spec, Some(&host.ns))
}

#[test]
fn snapshot_restore_announces_and_with_s_only_at_cont() {
    let test = "snapshot_restore_announces_and_with_s_only_at_cont";
    if !can_run(test) {
        return;
    }
    let _serial = one_at_a_time();
    let file = TempPath::new("announce.fm");
    let file_s = file.display().to_string();
    let source = Host::new("annsnap");
    let vm = boot("annsnap-src", &source);
    migrate(&vm, &format!("file:{file_s}"));
    let info = wait_migration(&vm, T);
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(status(&vm), "running");
    std::thread::sleep(SCHEDULE);
    drop(vm);
    let (net0, net1) = source.frames();
    assert!(
        net0.is_empty() && net1.is_empty(),
        "the source announced after its snapshot: {net0:?} {net1:?}"
    );

    // Restored: running at once, announced at once.
    let host = Host::new("annrest");
    let start = SystemTime::now();
    let vm = restored("annrest", &host, &file_s, false);
    wait_status(&vm, "running", T);
    std::thread::sleep(SCHEDULE);
    drop(vm);
    let (net0, net1) = host.frames();
    assert_schedule("restore", &net0, true, &ROUNDS_MS);
    assert_schedule("restore", &net1, false, &ROUNDS_MS);
    assert!(net1[0].at > secs(start));

    // Restored with -S: nothing until `cont`; a later stop/cont is quiet.
    let host = Host::new("annrests");
    let vm = restored("annrest-S", &host, &file_s, true);
    wait_status(&vm, "paused", T);
    std::thread::sleep(Duration::from_millis(500));
    let cont = SystemTime::now();
    vm.execute("cont", json!({})).expect("cont");
    std::thread::sleep(SCHEDULE);
    vm.execute("stop", json!({})).expect("stop");
    vm.execute("cont", json!({})).expect("cont");
    std::thread::sleep(SCHEDULE);
    let counters = vm.console.send_command("counters 0", T);
    drop(vm);
    let (net0, net1) = host.frames();
    assert_schedule("restore -S, cont", &net0, true, &ROUNDS_MS);
    assert_schedule("restore -S, cont", &net1, false, &ROUNDS_MS);
    assert!(net0[0].at >= secs(cont) && net1[0].at >= secs(cont));
    // The snapshot was taken before any announce: these five are all.
    assert_eq!(
        counters.number("announces"),
        Some(5),
        "{:?}",
        counters.lines
    );
}
