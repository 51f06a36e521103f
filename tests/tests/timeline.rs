//! `ferry ctl migrate URI --timeline F.svg --timeline-json F.json`: a
//! live migration between two namespace hosts draws its timeline. The
//! SVG parses as XML, names its passes and the stop; the JSON's passes
//! and downtime are query-migrate's; the destination's part (its resume
//! and the announce of the guest's identity) arrived.

use std::time::Duration;

use ferry_tests::ferry::{command, run_with_timeout, FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root, TempPath};
use ferry_tests::hosts::{status, TwoHosts, A_TAP, B_ADDR, B_TAP, GUEST_ADDR};
use ferry_tests::probe::{Cmdline, READY};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

#[test]
fn a_migration_draws_its_timeline() {
    let test = "a_migration_draws_its_timeline";
    if require_kvm(test).is_none() || !require_root(test) {
        return;
    }
    let hosts = TwoHosts::new("tline");
    let cmdline = Cmdline::new()
        .identity(0, None, None, &format!("{GUEST_ADDR}/24"))
        .heartbeat_ms(100)
        .pattern(3, "64M")
        .dirty("20M", "16M");
    let mut spec = VmSpec::probe(&cmdline.build());
    spec.nets = vec![format!("tap={A_TAP}")];
    let src = FerryVm::spawn("tline-src", &spec, Some(&hosts.a));
    src.console.expect(READY, T);
    src.console.expect_seen("probe: pattern written");
    let mut dspec = VmSpec::incoming(&format!("tcp:{B_ADDR}:4444"));
    dspec.nets = vec![format!("tap={B_TAP}")];
    let dst = FerryVm::spawn("tline-dst", &dspec, Some(&hosts.b));

    let svg = TempPath::new("timeline.svg");
    let json = TempPath::new("timeline.json");
    let qmp = src.qmp_path().display().to_string();
    let out = run_with_timeout(
        command(&[
            "ctl",
            "--qmp",
            &qmp,
            "migrate",
            &format!("tcp:{B_ADDR}:4444"),
            "--timeline",
            svg.arg(),
            "--timeline-json",
            json.arg(),
        ]),
        T,
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(status(&src), "postmigrate");
    let info = src
        .execute("query-migrate", serde_json::json!({}))
        .expect("query-migrate");

    let data: Value = serde_json::from_str(&std::fs::read_to_string(&*json).unwrap()).unwrap();
    let passes = data["passes"].as_array().expect("passes");
    assert_eq!(
        passes.len() as u64,
        info["ram"]["dirty-sync-count"].as_u64().unwrap(),
        "{data}"
    );
    let downtime = data["downtime_ms"].as_f64().expect("downtime");
    assert_eq!(downtime.floor() as u64, info["downtime"].as_u64().unwrap());
    assert!(passes.iter().any(|p| p["live"] == false), "the last pass");
    let dest = &data["destination"];
    let resumed = dest["resumed_ms"]
        .as_f64()
        .expect("the destination resumed");
    assert!(resumed >= data["stop_ms"].as_f64().unwrap());
    let mac = dst
        .execute("query-rx-filter", serde_json::json!({}))
        .expect("query-rx-filter")[0]["main-mac"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        dest["announce"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| (f["kind"] == "rarp" || f["kind"] == "guest") && f["mac"] == mac.as_str()),
        "{mac} announced (by the guest or a RARP): {dest}"
    );

    let text = std::fs::read_to_string(&*svg).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("the SVG is XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let words: String = doc
        .descendants()
        .filter_map(|n| n.text())
        .collect::<Vec<_>>()
        .join("\n");
    // Every pass is named, but for those past the five the picture lists
    // when they are too narrow to carry their label: it counts them.
    let missing = (1..=passes.len())
        .filter(|p| !words.contains(&format!("pass {p}:")))
        .count();
    if missing > 0 {
        assert!(
            words.contains(&format!("… and {missing} more passes")),
            "{missing} passes neither named nor counted in {words}"
        );
    }
    assert!(
        words.contains(&format!("guest stopped {downtime:.1} ms")),
        "{words}"
    );
    assert!(words.contains(&mac), "the identity's row: {words}");
    // The frames the source's TAP got after the stop (none here: nothing
    // sends to the guest) and why their forwarding ended: no switch
    // floods the announce back to A, so by the quiet interval.
    let forward = data["forward"].as_array().expect("forward");
    assert_eq!(forward.len(), 1, "{data}");
    assert_eq!(forward[0]["ended_by"], "quiet", "{data}");
    assert!(
        words.contains("frames forwarded") && words.contains("(ended: quiet)"),
        "{words}"
    );
}
