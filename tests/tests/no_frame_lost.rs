//! No frame lost across a live migration (issue #17), on the topology of
//! `ferry_tests::switch`: a switch namespace joining host A (the guest
//! before), host B (after) and a client. The client sends a numbered UDP
//! stream (64-byte datagrams, 10,000 a second) to the probe's echo port
//! while the probe migrates A → B over TCP. Every datagram must reach the
//! guest (its counters travel in its memory), and every sequence number
//! come back exactly once and in order, but for answers the guest itself
//! counts as dropped (its 256-entry transmit ring overflowing while it
//! works through a burst on a busy 2-core host; the test says so when it
//! happens):
//! - with Ferry's RARPs (`guest-announce=off`) and with the guest
//!   announcing itself (GUEST_ANNOUNCE), and over TLS with multifd;
//! - a migration cancelled at the last moment (stopped in
//!   `pre-switchover` for 300 ms, then `migrate_cancel`): the frames the
//!   stopped source read reach the guest when it resumes there;
//! - a flood beyond the forwarding bound (`x-forward-max-bytes` 64 KiB,
//!   1400-byte datagrams while the source waits in `pre-switchover`): the
//!   frames past it are lost, each one counted in `query-migrate`
//!   (`x-frames`), and no more than the bound is kept.
//!
//! Without Ferry's forwarding (`x-forward-frames` off) the same stream
//! loses frames: the first test checks that too, so it cannot pass by a
//! stream too slow to notice the move.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::announce::one_at_a_time;
use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root};
use ferry_tests::hosts::{
    assert_completed, migrate, set_multifd, status, wait_migration, A_TAP, B_ADDR, B_TAP,
};
use ferry_tests::probe::checks::GUEST_MAC;
use ferry_tests::probe::{Cmdline, Reply, READY};
use ferry_tests::switch::{Switch, CLIENT_ADDR};
use ferry_tests::tlscerts::{Side, TestCa};
use ferry_tests::udpstream::{StreamReport, UdpStream};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
const GUEST_IP: &str = "198.18.0.2";
const RATE: u64 = 10_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Announce {
    Rarp,
    Guest,
}

struct Pair {
    sw: Switch,
    src: FerryVm,
    dst: FerryVm,
    uri: String,
}

fn pair(test: &str, announce: Announce) -> Pair {
    pair_with(test, announce, None)
}

/// TLS credentials for both ends (a directory each).
struct Creds {
    client: PathBuf,
    server: PathBuf,
}

fn creds(test: &str) -> Creds {
    let dir = std::env::temp_dir().join(format!("ferry-nfl-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = TestCa::new("Ferry test CA");
    Creds {
        server: ca.write_dir(&dir.join("server"), Side::Server, &[B_ADDR], false),
        client: ca.write_dir(&dir.join("client"), Side::Client, &["source"], false),
    }
}

fn tls_object(dir: &Path, endpoint: &str) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint={endpoint},verify-peer=on",
            dir.display()
        ),
    ]
}

/// The pair, over TLS with `tls` (and multifd, 2 channels, then: every
/// connection TLS), as libvirt sets up a destination (`defer`, the
/// parameters, `migrate-incoming`).
fn pair_with(test: &str, announce: Announce, tls: Option<&Creds>) -> Pair {
    let sw = Switch::new(test);
    let cmdline = Cmdline::new()
        .identity(0, None, None, &format!("{GUEST_IP}/24"))
        .build();
    let mut spec = VmSpec::probe(&cmdline);
    if let Some(c) = tls {
        spec.extra = tls_object(&c.client, "client");
    }
    let off = match announce {
        Announce::Rarp => ",guest-announce=off",
        Announce::Guest => "",
    };
    spec.nets = vec![format!("tap={A_TAP},mac={GUEST_MAC}{off}")];
    let src = FerryVm::spawn(&format!("{test}-src"), &spec, Some(&sw.hosts.a));
    src.console.expect(READY, T);
    let uri = format!("tcp:{B_ADDR}:4451");
    let Some(c) = tls else {
        let mut dspec = VmSpec::incoming(&uri);
        dspec.nets = vec![format!("tap={B_TAP}")];
        let dst = FerryVm::spawn(&format!("{test}-dst"), &dspec, Some(&sw.hosts.b));
        return Pair { sw, src, dst, uri };
    };
    let mut dspec = VmSpec::incoming("defer");
    dspec.nets = vec![format!("tap={B_TAP}")];
    dspec.extra = tls_object(&c.server, "server");
    let dst = FerryVm::spawn(&format!("{test}-dst"), &dspec, Some(&sw.hosts.b));
    for vm in [&src, &dst] {
        set_multifd(vm, Some(2));
        vm.execute("migrate-set-parameters", json!({ "tls-creds": "tls0" }))
            .expect("tls-creds");
    }
    dst.execute("migrate-incoming", json!({ "uri": uri }))
        .expect("migrate-incoming");
    Pair { sw, src, dst, uri }
}

fn stream(p: &Pair, rate: u64, size: usize) -> UdpStream {
    let s = UdpStream::start(
        &p.sw.client,
        CLIENT_ADDR,
        &format!("{GUEST_IP}:7"),
        rate,
        size,
    );
    assert!(
        s.wait_echoes(500, Duration::from_secs(20)),
        "the probe does not echo on A: {} sent, {} echoed\n{}",
        s.sent(),
        s.echoed(),
        p.src.console.output()
    );
    s
}

fn frames(info: &Value) -> Value {
    info["x-frames"][0].clone()
}

fn assert_every_echo_once_in_order(what: &str, r: &StreamReport, extra: &str) {
    assert!(
        r.lost.is_empty() && r.duplicated.is_empty() && r.reordered == 0,
        "{what}: {} sent, {} echoed, lost {} (first {:?}), duplicated {:?}, reordered {}\n{extra}",
        r.sent,
        r.echoed,
        r.lost.len(),
        &r.lost[..r.lost.len().min(20)],
        &r.duplicated[..r.duplicated.len().min(20)],
        r.reordered
    );
    println!(
        "{what}: {} datagrams, every one echoed once, in order; rtt median {:?}, max {:?}",
        r.sent, r.rtt_median, r.rtt_max
    );
}

/// Ferry lost nothing: every datagram reached the guest (its counters,
/// which travel in its memory), none twice, none out of order (the probe
/// answers in the order it receives); every echo that did not come back
/// is one the guest itself could not queue (a 256-entry transmit ring
/// answering a burst on a busy 2-core host), which it counts.
fn assert_guest_got_everything(what: &str, r: &StreamReport, c: &Reply, extra: &str) {
    let n = |k: &str| c.number(k).unwrap_or(0);
    let udp_received = n("rx_frames") - n("arp_replies") - n("ignored") - n("malformed");
    let detail = format!("{:?}\n{extra}", c.lines);
    assert_eq!(udp_received, r.sent, "{what}: {detail}");
    assert!(
        r.duplicated.is_empty() && r.reordered == 0,
        "{what}: {detail}"
    );
    assert_eq!(r.lost.len() as u64, n("tx_dropped"), "{what}: {detail}");
    if r.lost.is_empty() {
        assert_every_echo_once_in_order(what, r, extra);
    } else {
        println!(
            "{what}: every datagram reached the guest; it could not queue {} answers",
            r.lost.len()
        );
    }
}

/// Migrates while the stream runs; the stream's report and both ends'
/// `query-migrate`.
fn migrate_during(p: &Pair, s: UdpStream) -> (StreamReport, Value, Value) {
    std::thread::sleep(Duration::from_millis(200));
    migrate(&p.src, &p.uri);
    let info = wait_migration(&p.src, T);
    assert_completed(&info, &p.src, &p.dst);
    // The stream goes on at B for a while, then drains.
    std::thread::sleep(Duration::from_millis(700));
    let r = s.stop(Duration::from_millis(300));
    let src_info = p.src.execute("query-migrate", json!({})).expect("source");
    let dst_info = p
        .dst
        .execute("query-migrate", json!({}))
        .expect("destination");
    assert_eq!(status(&p.src), "postmigrate");
    assert_eq!(status(&p.dst), "running");
    (r, src_info, dst_info)
}

fn can_run(test: &str) -> bool {
    require_kvm(test).is_some() && require_root(test)
}

fn no_loss_with(test: &str, announce: Announce, tls: bool) {
    if !can_run(test) {
        return;
    }
    let _serial = one_at_a_time();
    let creds = tls.then(|| creds(test));
    let p = pair_with(test, announce, creds.as_ref());
    let s = stream(&p, RATE, 64);
    let (r, src, dst) = migrate_during(&p, s);
    let (sf, df) = (frames(&src), frames(&dst));
    let counters = p.dst.console.send_command("counters 0", T);
    let ends = format!(
        "source x-frames {sf}\ndestination x-frames {df}\nsource stderr {}\ndestination stderr {}",
        p.src.stderr(),
        p.dst.stderr()
    );
    assert_guest_got_everything(&format!("{test} ({announce:?})"), &r, &counters, &ends);
    // The gap was real: frames reached A after the stop and went on.
    let forwarded = sf["forwarded"].as_u64().unwrap_or(0);
    assert!(forwarded > 0, "{ends}");
    assert_eq!(sf["ended-by"], "switch-moved", "{ends}");
    assert_eq!(sf["dropped"], 0, "{ends}");
    assert_eq!(df["received"].as_u64(), Some(forwarded), "{ends}");
    assert_eq!(df["delivered"].as_u64(), Some(forwarded), "{ends}");
    // The source's end record came before any held frame's bound.
    assert_eq!(df["hold-expired"], 0, "{ends}");
    println!(
        "{test}: downtime {} ms; forwarded {forwarded} frames; {} of B's own held behind them, at most {} µs",
        src["downtime"], df["held"], df["longest-hold-us"]
    );
}

#[test]
fn a_udp_stream_loses_nothing_across_a_migration_announced_by_rarp() {
    no_loss_with("nfl-rarp", Announce::Rarp, false);
}

#[test]
fn a_udp_stream_loses_nothing_across_a_migration_the_guest_announces() {
    no_loss_with("nfl-guest", Announce::Guest, false);
}

/// The frames travel on the migration's main connection: over TLS when
/// the migration is (here with two multifd channels, every one TLS).
#[test]
fn a_udp_stream_loses_nothing_across_a_tls_migration_over_multifd() {
    no_loss_with("nfl-tls", Announce::Guest, true);
}

/// The control: without forwarding the same stream loses frames (so the
/// tests above measure the gap they close).
#[test]
fn without_forwarding_the_same_stream_loses_frames() {
    let test = "nfl-off";
    if !can_run(test) {
        return;
    }
    let _serial = one_at_a_time();
    let p = pair(test, Announce::Rarp);
    p.src
        .execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "x-forward-frames", "state": false }] }),
        )
        .expect("capability");
    let s = stream(&p, RATE, 64);
    let (r, src, _) = migrate_during(&p, s);
    println!(
        "{test}: without forwarding {} of {} lost (downtime {} ms)",
        r.lost.len(),
        r.sent,
        src["downtime"]
    );
    assert!(!r.lost.is_empty(), "{r:?}");
    assert!(src.get("x-frames").is_none(), "{src}");
}

/// Stops the source in `pre-switchover` and waits there `hold`.
fn stop_before_switchover(p: &Pair, hold: Duration) {
    p.src
        .execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "pause-before-switchover", "state": true }] }),
        )
        .expect("capability");
    migrate(&p.src, &p.uri);
    let deadline = std::time::Instant::now() + T;
    loop {
        let info = p.src.execute("query-migrate", json!({})).expect("query");
        match info["status"].as_str() {
            Some("pre-switchover") => break,
            Some("failed" | "cancelled" | "completed") => panic!("{info}"),
            _ => {}
        }
        assert!(std::time::Instant::now() < deadline, "{info}");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(hold);
}

/// How long the cancelled migration stands stopped (600 frames come
/// meanwhile). Longer, and the probe's own answers overflow its transmit
/// ring (256) more often as it works through the backlog: it counts them
/// as `tx_dropped`, having received every frame.
const HOLD: Duration = Duration::from_millis(60);

#[test]
fn a_migration_cancelled_at_the_last_moment_gives_every_frame_back_to_the_guest() {
    let test = "nfl-cancel";
    if !can_run(test) {
        return;
    }
    let _serial = one_at_a_time();
    let p = pair(test, Announce::Rarp);
    let s = stream(&p, RATE, 64);
    std::thread::sleep(Duration::from_millis(200));
    stop_before_switchover(&p, HOLD);
    p.src.execute("migrate_cancel", json!({})).expect("cancel");
    let info = wait_migration(&p.src, T);
    assert_eq!(info["status"], "cancelled", "{info}");
    std::thread::sleep(Duration::from_millis(500));
    let r = s.stop(Duration::from_millis(300));
    assert_eq!(status(&p.src), "running");
    let f = frames(&info);
    let c = p.src.console.send_command("counters 0", T);
    assert_guest_got_everything(test, &r, &c, &format!("{info}\n{}", p.src.stderr()));
    // Stopped HOLD at 10,000 a second: hundreds came while it stood.
    let given_back = f["given-back"].as_u64().unwrap_or(0);
    assert!(given_back >= 400, "{f}");
    println!("{test}: {given_back} frames read while stopped went to the guest here");
}

#[test]
fn a_flood_past_the_forwarding_bound_is_counted_and_memory_stays_bounded() {
    let test = "nfl-flood";
    if !can_run(test) {
        return;
    }
    let _serial = one_at_a_time();
    const BOUND: u64 = 64 << 10;
    let p = pair(test, Announce::Rarp);
    p.src
        .execute(
            "migrate-set-parameters",
            json!({ "x-forward-max-bytes": BOUND }),
        )
        .expect("parameter");
    let s = stream(&p, RATE, 1400);
    std::thread::sleep(Duration::from_millis(200));
    stop_before_switchover(&p, Duration::from_millis(300));
    p.src
        .execute("migrate-continue", json!({ "state": "pre-switchover" }))
        .expect("continue");
    let info = wait_migration(&p.src, T);
    assert_completed(&info, &p.src, &p.dst);
    std::thread::sleep(Duration::from_millis(500));
    let r = s.stop(Duration::from_millis(300));
    let src = p.src.execute("query-migrate", json!({})).expect("query");
    let f = frames(&src);
    let (captured, dropped) = (
        f["captured"].as_u64().unwrap_or(0),
        f["dropped"].as_u64().unwrap_or(0),
    );
    println!("{test}: {f}; stream lost {} of {}", r.lost.len(), r.sent);
    assert_eq!(f["ended-by"], "switch-moved", "{f}");
    // Kept: what fits in the bound, and no more.
    let bytes = f["captured-bytes"].as_u64().unwrap_or(0);
    let frame = bytes / captured.max(1);
    assert!(bytes <= BOUND && bytes + frame > BOUND, "{f}");
    assert_eq!(f["forwarded"].as_u64(), Some(captured), "{f}");
    assert!(dropped > 1000, "{f}");
    // Every datagram the source did not count as dropped reached the
    // guest on B (its counters came along in its memory); the stream's
    // losses are those, plus answers the probe itself could not queue at
    // 14 MB/s each way (its `tx_dropped`), which happen without a
    // migration too, and a few on the way back to a client that shares
    // two cores with the guest, the VMM and its own sender.
    let dst = p.dst.execute("query-migrate", json!({})).expect("query");
    let c = p.dst.console.send_command("counters 0", T);
    let n = |k: &str| c.number(k).unwrap_or(0);
    let udp_received = n("rx_frames") - n("arp_replies") - n("ignored") - n("malformed");
    assert_eq!(
        udp_received,
        r.sent - dropped,
        "{f}\ndestination {}\n{:?}",
        frames(&dst),
        c.lines
    );
    assert!(r.lost.len() as u64 >= dropped, "{f}");
    assert!(
        r.lost.len() as u64 <= dropped + n("tx_dropped") + 10,
        "{f} {:?}",
        c.lines
    );
    assert!(r.duplicated.is_empty(), "{:?}", r.duplicated);
}

/// The other direction: the probe sends a numbered stream (`udp-blast`,
/// 10,000 a second) to the client across the migration. What it queued
/// for transmit and the source had not sent when it stopped goes out
/// from B, once: the client gets every sequence number exactly once.
#[test]
fn frames_the_guest_queued_for_transmit_leave_once_across_a_migration() {
    let test = "nfl-tx";
    if !can_run(test) {
        return;
    }
    let _serial = one_at_a_time();
    const COUNT: u64 = 20_000;
    let p = pair(test, Announce::Rarp);
    let sock =
        p.sw.client
            .enter(|| std::net::UdpSocket::bind(format!("{CLIENT_ADDR}:9100")))
            .expect("netns")
            .expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("timeout");
    let receiver = std::thread::spawn(move || {
        let mut seen = vec![0u32; COUNT as usize];
        let mut buf = [0u8; 2048];
        while let Ok(n) = sock.recv(&mut buf) {
            if n >= 8 {
                let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
                if let Some(c) = seen.get_mut(seq as usize) {
                    *c += 1;
                }
            }
        }
        seen
    });
    p.src.console.send_command(
        &format!("udp-blast 0 {GUEST_IP} {CLIENT_ADDR}:9100 64 10000 {COUNT}"),
        T,
    );
    std::thread::sleep(Duration::from_millis(500));
    migrate(&p.src, &p.uri);
    let info = wait_migration(&p.src, T);
    assert_completed(&info, &p.src, &p.dst);
    p.dst
        .console
        .expect(&format!("probe: udp-blast done nic=0 frames={COUNT}"), T);
    let seen = receiver.join().expect("receiver");
    let lost: Vec<usize> = (0..seen.len()).filter(|&i| seen[i] == 0).collect();
    let twice: Vec<usize> = (0..seen.len()).filter(|&i| seen[i] > 1).collect();
    assert!(
        lost.is_empty() && twice.is_empty(),
        "lost {} (first {:?}), twice {:?}; downtime {}",
        lost.len(),
        &lost[..lost.len().min(20)],
        &twice[..twice.len().min(20)],
        info["downtime"]
    );
    println!("{test}: {COUNT} datagrams from the guest, each received once");
}

/// libvirt ends the source as soon as it has seen `completed` (and
/// started the destination): a `quit` then waits for the forwarding,
/// whose frames the source's event loop reads, and nothing is lost.
#[test]
fn a_source_told_to_quit_at_completion_still_forwards_every_frame() {
    let test = "nfl-quit";
    if !can_run(test) {
        return;
    }
    let _serial = one_at_a_time();
    let mut p = pair(test, Announce::Rarp);
    let s = stream(&p, RATE, 64);
    std::thread::sleep(Duration::from_millis(200));
    migrate(&p.src, &p.uri);
    let info = wait_migration(&p.src, T);
    assert_completed(&info, &p.src, &p.dst);
    p.src.execute("quit", json!({})).expect("quit");
    let exit = p.src.wait(T);
    assert!(exit.success(), "{exit:?}: {}", p.src.stderr());
    std::thread::sleep(Duration::from_millis(700));
    let r = s.stop(Duration::from_millis(300));
    let dst = p.dst.execute("query-migrate", json!({})).expect("query");
    let df = frames(&dst);
    let c = p.dst.console.send_command("counters 0", T);
    assert_guest_got_everything(test, &r, &c, &format!("destination {df}"));
    assert!(df["received"].as_u64().unwrap_or(0) > 0, "{df}");
    assert_eq!(df["hold-expired"], 0, "{df}");
}
