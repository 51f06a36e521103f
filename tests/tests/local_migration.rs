//! Local migration that hands the TAP (and a memfd's RAM) to the new
//! process: the TAP keeps its ifindex and no TAP appears, pings every
//! 10 ms lose at most downtime/10 ms + 1, the memory pattern verifies, and
//! with memfd the bytes on the socket do not grow with guest memory.
//! Failures: backend-transfer over tcp: is refused up front; a destination
//! that dies after receiving the descriptors leaves the source with a
//! working TAP.

use std::time::{Duration, Instant};

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root};
use ferry_tests::hosts::{assert_completed, migrate, status, wait_migration};
use ferry_tests::netns::Netns;
use ferry_tests::probe::{Cmdline, READY};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
const GUEST: &str = "198.18.0.2";

fn can_run(test: &str) -> bool {
    require_kvm(test).is_some() && require_root(test)
}

fn host(test: &str) -> Netns {
    let ns = Netns::new(test).expect("netns");
    ns.add_tap("tap0").expect("tap");
    ns.add_addr("tap0", "198.18.0.1/24").expect("addr");
    ns
}

fn source(test: &str, ns: &Netns, memory: &str, memfd: bool) -> FerryVm {
    let cmdline = Cmdline::new()
        .identity(0, None, None, &format!("{GUEST}/24"))
        .heartbeat_ms(100)
        .pattern(77, "32M");
    let mut spec = VmSpec::probe(&cmdline.build());
    spec.memory = memory.into();
    spec.nets = vec!["tap=tap0".into()];
    if memfd {
        spec.extra = vec!["--memory-backend".into(), "memfd".into()];
    }
    let vm = FerryVm::spawn(test, &spec, Some(ns));
    vm.console.expect(READY, T);
    vm
}

fn sock(test: &str) -> String {
    format!(
        "{}/ferry-local-{test}-{}.sock",
        std::env::temp_dir().display(),
        std::process::id()
    )
}

/// (ifindex of tap0, every link name) in `ns`.
fn links(ns: &Netns) -> (String, Vec<String>) {
    let index = ns
        .run(&["cat", "/sys/class/net/tap0/ifindex"])
        .unwrap()
        .trim()
        .to_string();
    let mut names: Vec<String> = ns
        .run(&["ls", "/sys/class/net"])
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    names.sort();
    (index, names)
}

/// Pings the guest every 10 ms in the background; returns (sent, received).
fn pinger(ns: &Netns, seconds: u32) -> std::thread::JoinHandle<(u64, u64)> {
    let mut cmd = ns.command("ping");
    cmd.args(["-i", "0.01", "-W", "1", "-w", &seconds.to_string(), GUEST]);
    std::thread::spawn(move || {
        let out = cmd.output().expect("ping");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or("")
            .to_string();
        let num = |word: &str| -> u64 {
            line.split(',')
                .find(|p| p.contains(word))
                .and_then(|p| p.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        (num("transmitted"), num("received"))
    })
}

fn local_move(test: &str, memory: &str, memfd: bool) -> Value {
    let ns = host(test);
    let src = source(&format!("{test}-src"), &ns, memory, memfd);
    let before = links(&ns);
    let uri = format!("unix:{}", sock(test));
    let dst = FerryVm::spawn(&format!("{test}-dst"), &VmSpec::incoming(&uri), Some(&ns));
    let ping = pinger(&ns, 3);
    std::thread::sleep(Duration::from_millis(500));
    src.execute(
        "migrate-set-parameters",
        json!({ "backend-transfer": true }),
    )
    .expect("parameters");
    migrate(&src, &uri);
    let info = wait_migration(&src, T);
    assert_completed(&info, &src, &dst);
    assert_eq!(status(&dst), "running");
    assert_eq!(links(&ns), before, "same TAP (ifindex), no new link");
    let (sent, received) = ping.join().unwrap();
    let downtime = info["downtime"].as_u64().unwrap_or(0);
    let allowed = downtime / 10 + 1;
    assert!(
        sent > 100 && sent - received <= allowed,
        "lost {} of {sent} pings, downtime {downtime} ms allows {allowed}",
        sent - received
    );
    dst.console.assert_pattern_intact(T);
    // The source exits and leaves the TAP (and memory) to the destination.
    let mut src = src;
    src.execute("quit", json!({})).expect("quit");
    assert_eq!(src.wait(T).code(), Some(0));
    assert_eq!(links(&ns), before);
    assert!(
        ns.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", GUEST])
            .unwrap()
            .status
            .success(),
        "guest unreachable after the source left"
    );
    info
}

#[test]
fn backend_transfer_keeps_the_tap() {
    if can_run("backend_transfer_keeps_the_tap") {
        local_move("tapxfer", "256M", false);
    }
}

#[test]
fn backend_transfer_with_memfd_copies_no_page() {
    if !can_run("backend_transfer_with_memfd_copies_no_page") {
        return;
    }
    let small = local_move("memfd1g", "1G", true);
    let big = local_move("memfd4g", "4G", true);
    let bytes = |i: &Value| i["ram"]["transferred"].as_u64().unwrap_or(u64::MAX);
    assert_eq!(small["ram"]["normal"], 0, "no page copied: {small}");
    let (a, b) = (bytes(&small), bytes(&big));
    assert!(
        a.abs_diff(b) < 4096,
        "bytes on the socket grew with memory: {a} for 1 GiB, {b} for 4 GiB"
    );
    assert!(a < 1 << 20, "{a} bytes for a guest whose RAM is not copied");
}

#[test]
fn backend_transfer_over_tcp_is_refused_before_anything_is_sent() {
    if !can_run("backend_transfer_over_tcp_is_refused_before_anything_is_sent") {
        return;
    }
    let ns = host("xfertcp");
    let src = source("xfertcp-src", &ns, "128M", false);
    src.execute(
        "migrate-set-parameters",
        json!({ "backend-transfer": true }),
    )
    .expect("parameters");
    let err = src
        .execute("migrate", json!({ "uri": "tcp:198.18.0.1:4444" }))
        .expect_err("refused");
    assert!(err.to_string().contains("only a unix: migration"), "{err}");
    assert_eq!(
        src.execute("query-migrate", json!({})).unwrap(),
        json!({}),
        "nothing started"
    );
    assert_eq!(status(&src), "running");
    assert!(ns
        .exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", GUEST])
        .unwrap()
        .status
        .success());
}

#[test]
fn a_destination_dying_after_receiving_the_descriptors_leaves_the_source_whole() {
    let test = "a_destination_dying_after_receiving_the_descriptors_leaves_the_source_whole";
    if !can_run(test) {
        return;
    }
    let ns = host("xferdie");
    let src = source("xferdie-src", &ns, "256M", true);
    let path = sock("xferdie");
    let uri: migration::MigrationUri = format!("unix:{path}").parse().unwrap();
    // A destination of our own: takes the descriptors, says GO, reads a
    // little, and dies before acknowledging.
    let listener = migration::Listener::bind(&uri).expect("listen");
    let fake = std::thread::spawn(move || {
        let channel = listener.accept().expect("accept");
        let mut reader = migration::StreamReader::new(channel).expect("header");
        let config = reader.next_section().expect("config");
        assert_eq!(config.name, "config");
        let (fds, _) = reader.inner_mut().recv_fds(8).expect("descriptors");
        assert_eq!(fds.len(), 2, "one TAP and the memfd");
        std::io::Write::write_all(reader.inner_mut(), b"FERRYGO!").expect("go");
        std::io::Write::flush(reader.inner_mut()).expect("flush");
        let _ = reader.next_section();
        // Dropping everything: the "process" dies with the descriptors.
    });
    src.execute(
        "migrate-set-parameters",
        json!({ "backend-transfer": true }),
    )
    .expect("parameters");
    migrate(&src, &format!("unix:{path}"));
    fake.join().expect("fake destination");
    let info = wait_migration(&src, T);
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(status(&src), "running");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ok = ns
            .exec(&["ping", "-c", "1", "-W", "1", GUEST])
            .unwrap()
            .status
            .success();
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "the source lost its TAP");
    }
    let verify = src.console.send_command("pattern-verify", T);
    assert_eq!(verify.field("bad_pages").as_deref(), Some("0"));
}
