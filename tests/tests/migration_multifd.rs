//! multifd: a guest holding GiBs of data migrates over 1, 2 and 4 RAM
//! channels between two namespace hosts (one run on a link shaped to 10
//! Gbit/s, one with the guest dirtying memory), its pattern verifying on
//! the destination; one channel reset mid-way fails the migration and
//! the source runs on; multifd on one end only is refused on both.

use std::time::{Duration, Instant};

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root};
use ferry_tests::hosts::{
    assert_completed, heartbeat_goes_on, migrate, set_multifd, status, wait_migration, TwoHosts,
    A_TAP, B_ADDR, B_TAP, GUEST_ADDR,
};
use ferry_tests::netns::Netns;
use ferry_tests::probe::heartbeat::wait_heartbeats;
use ferry_tests::probe::{Cmdline, READY};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(120);
const PORT: u16 = 4444;

fn can_run(test: &str) -> bool {
    require_kvm(test).is_some() && require_root(test)
}

fn source(test: &str, ns: &Netns, memory: &str, pattern: &str, dirty: bool) -> FerryVm {
    let mut cmdline = Cmdline::new()
        .identity(0, None, None, &format!("{GUEST_ADDR}/24"))
        .heartbeat_ms(100)
        .pattern(41, pattern);
    if dirty {
        cmdline = cmdline.dirty("50M", "64M");
    }
    let mut spec = VmSpec::probe(&cmdline.build());
    spec.memory = memory.into();
    spec.nets = vec![format!("tap={A_TAP}")];
    let vm = FerryVm::spawn(test, &spec, Some(ns));
    vm.console.expect(READY, T);
    vm.console.expect_seen("probe: pattern written");
    vm
}

fn destination(test: &str, ns: &Netns) -> FerryVm {
    let mut spec = VmSpec::incoming(&format!("tcp:{B_ADDR}:{PORT}"));
    spec.nets = vec![format!("tap={B_TAP}")];
    FerryVm::spawn(test, &spec, Some(ns))
}

#[test]
fn a_populated_guest_migrates_over_1_2_and_4_channels() {
    let test = "a_populated_guest_migrates_over_1_2_and_4_channels";
    if !can_run(test) {
        return;
    }
    // (channels, the guest dirties 50 MB/s, the link is shaped to 10 Gbit/s)
    for (channels, dirty, shaped) in [(1, false, false), (2, false, true), (4, true, false)] {
        let hosts = TwoHosts::new(&format!("mfd{channels}"));
        if shaped {
            hosts.shape("10gbit");
        }
        let src = source(&format!("mfd{channels}-src"), &hosts.a, "3G", "2G", dirty);
        let dst = destination(&format!("mfd{channels}-dst"), &hosts.b);
        set_multifd(&src, Some(channels));
        set_multifd(&dst, Some(channels));
        migrate(&src, &format!("tcp:{B_ADDR}:{PORT}"));
        let info = wait_migration(&src, T);
        assert_completed(&info, &src, &dst);
        let ram = &info["ram"];
        assert!(
            ram["normal"].as_u64().unwrap_or(0) >= (2 << 30) / 4096,
            "every page of the 2 GiB pattern went with its data: {info}"
        );
        assert_eq!(status(&src), "postmigrate");
        wait_heartbeats(&dst.console, 2, T);
        assert_eq!(status(&dst), "running");
        dst.console.assert_pattern_intact(T);
        heartbeat_goes_on(&dst);
        eprintln!(
            "{channels} channel(s){}{}: total {} ms, downtime {} ms, {} passes, {} MB",
            if dirty { ", dirtying" } else { "" },
            if shaped { ", 10 Gbit/s link" } else { "" },
            info["total-time"],
            info["downtime"],
            ram["dirty-sync-count"],
            ram["transferred"].as_u64().unwrap_or(0) / 1_000_000
        );
    }
}

/// The established connections from A to the destination's port, with
/// the bytes each has sent: (local port, bytes_sent).
fn connections(ns: &Netns) -> Vec<(u16, u64)> {
    let out = ns
        .run(&[
            "ss",
            "-tniH",
            "state",
            "established",
            "dport",
            "=",
            &format!(":{PORT}"),
        ])
        .expect("ss");
    let mut conns = Vec::new();
    let mut port = None;
    for line in out.lines() {
        // A socket's line, then its details on an indented line.
        if !line.starts_with(char::is_whitespace) {
            port = line
                .split_whitespace()
                .nth(2)
                .and_then(|local| local.rsplit(':').next())
                .and_then(|p| p.parse().ok());
            continue;
        }
        let sent = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("bytes_sent:"))
            .and_then(|n| n.parse().ok());
        if let (Some(p), Some(sent)) = (port.take(), sent) {
            conns.push((p, sent));
        }
    }
    conns
}

#[test]
fn one_channel_reset_mid_way_fails_the_migration_and_the_source_runs_on() {
    let test = "one_channel_reset_mid_way_fails_the_migration_and_the_source_runs_on";
    if !can_run(test) {
        return;
    }
    let hosts = TwoHosts::new("mfdrst");
    let src = source("mfdrst-src", &hosts.a, "1G", "256M", false);
    let mut dst = destination("mfdrst-dst", &hosts.b);
    set_multifd(&src, Some(2));
    set_multifd(&dst, Some(2));
    // 32 MB/s over both channels: the 256 MiB pattern takes ~8 s.
    src.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 32 << 20 }),
    )
    .expect("max-bandwidth");
    migrate(&src, &format!("tcp:{B_ADDR}:{PORT}"));
    let deadline = Instant::now() + T;
    let victim = loop {
        let conns = connections(&hosts.a);
        // The main connection and two channels; a channel has sent MBs.
        if conns.len() == 3 {
            if let Some(&(port, sent)) = conns.iter().max_by_key(|c| c.1) {
                if sent > 16 << 20 {
                    break port;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no channel carried data: {conns:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    hosts
        .a
        .run(&["ss", "-K", "sport", "=", &format!(":{victim}")])
        .expect("ss -K");
    let info = wait_migration(&src, T);
    assert_eq!(info["status"], "failed", "{info}");
    let desc = info["error-desc"].as_str().unwrap_or("");
    assert!(desc.contains("multifd channel"), "{desc}");
    assert_eq!(status(&src), "running");
    heartbeat_goes_on(&src);
    src.console.assert_pattern_intact(T);
    let exit = dst.wait(T);
    assert!(!exit.success(), "the destination gave up");
    assert!(
        dst.stderr().contains("multifd channel"),
        "the destination says which part failed: {}",
        dst.stderr()
    );
}

fn failed_with(info: &Value, words: &[&str]) {
    assert_eq!(info["status"], "failed", "{info}");
    let desc = info["error-desc"].as_str().unwrap_or("");
    for w in words {
        assert!(desc.contains(w), "error {desc:?} should mention {w:?}");
    }
}

#[test]
fn multifd_on_one_end_only_is_refused_on_both() {
    let test = "multifd_on_one_end_only_is_refused_on_both";
    if !can_run(test) {
        return;
    }
    // (source channels, destination channels, words of the error)
    let cases: [(Option<u64>, Option<u64>, &[&str]); 3] = [
        (Some(2), None, &["multifd", "off here"]),
        (None, Some(2), &["multifd", "off on the source"]),
        (
            Some(4),
            Some(2),
            &["multifd-channels is 4 on the source but 2 here"],
        ),
    ];
    let hosts = TwoHosts::new("mfdmis");
    let src = source("mfdmis-src", &hosts.a, "256M", "16M", false);
    for (i, (on_src, on_dst, words)) in cases.into_iter().enumerate() {
        let mut dst = destination(&format!("mfdmis-dst{i}"), &hosts.b);
        set_multifd(&src, on_src);
        set_multifd(&dst, on_dst);
        migrate(&src, &format!("tcp:{B_ADDR}:{PORT}"));
        let info = wait_migration(&src, T);
        failed_with(&info, words);
        assert_eq!(status(&src), "running");
        let exit = dst.wait(T);
        assert!(!exit.success());
        let err = dst.stderr();
        assert!(words.iter().all(|w| err.contains(w)), "{err}");
    }
    heartbeat_goes_on(&src);
}
