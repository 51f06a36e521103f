//! Guests that hold data (`probe.pattern`): live migration over the
//! namespace link, unshaped and shaped to 10 Gbit/s, Ferry and QEMU 7.2
//! each on one stream and with multifd; iperf3's figure on the same path
//! in the same run; the cost growth with populated bytes.
//!
//! Both ends are configured the way libvirt does it: the destination
//! starts with `-incoming defer`, gets the `multifd` capability and
//! `multifd-channels` through QMP, then `migrate-incoming`. The pattern
//! is verified on the destination after every run (a bench that moved
//! wrong bytes fast would be worthless).

use std::time::{Duration, Instant};

use ferry_tests::bench_net::median;
use ferry_tests::hosts::{B_ADDR, GUEST_ADDR};
use ferry_tests::probe::Cmdline;
use ferry_tests::vmms::{Guest, Vmm};
use serde_json::{json, Value};

use crate::guests::{destination, source};
use crate::live::num;
use crate::table::fmt;
use crate::{Env, MIGRATION_TIMEOUT};

/// A VMM and how many multifd channels it uses (0: one stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub vmm: Vmm,
    pub channels: u32,
    /// Over TLS (`tls-creds-x509` on both ends; see [`crate::tls`]).
    pub tls: bool,
}

impl Variant {
    pub fn new(vmm: Vmm, channels: u32) -> Self {
        Self {
            vmm,
            channels,
            tls: false,
        }
    }

    pub fn label(self) -> String {
        let tls = if self.tls { ", TLS" } else { "" };
        match self.channels {
            0 => format!("{} (one stream{tls})", self.vmm.name()),
            n => format!("{} multifd {n}{tls}", self.vmm.name()),
        }
    }
}

/// One run's figures.
#[derive(Clone, Debug, Default)]
pub struct Run {
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub transferred: f64,
    pub passes: f64,
    /// The pattern verified on the destination.
    pub verified: bool,
}

impl Run {
    pub fn gbytes_per_sec(&self) -> f64 {
        self.transferred / (self.total_ms * 1e6)
    }
}

fn set_multifd(guest: &mut Guest, channels: u32) {
    if channels == 0 {
        return;
    }
    guest
        .exec(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "multifd", "state": true }] }),
        )
        .expect("multifd");
    guest
        .exec(
            "migrate-set-parameters",
            json!({ "multifd-channels": channels }),
        )
        .expect("multifd-channels");
}

fn pattern_cmdline(pattern: &str, dirty: Option<(&str, &str)>) -> String {
    let mut c = Cmdline::new()
        .identity(0, None, None, &format!("{GUEST_ADDR}/24"))
        .heartbeat_ms(100)
        .pattern(11, pattern);
    if let Some((rate, size)) = dirty {
        c = c.dirty(rate, size);
    }
    c.build()
}

/// Migrates a guest of `mib` MiB holding `pattern` from A to B with
/// `variant`; the pattern verifies on B. With `timeline`, Ferry's
/// timeline of the run is written there (SVG and JSON).
pub fn migrate_populated(
    env: &mut Env,
    variant: Variant,
    mib: u32,
    pattern: &str,
    dirty: Option<(&str, &str)>,
    timeline: Option<&std::path::Path>,
) -> Run {
    // Every run starts as cold as the first after start-up: this machine
    // (itself a VM) hands memory freed for a few seconds back to its
    // host, and touching it again costs ~1-2 µs per KiB. With a shorter
    // pause (4 s), whichever variant ran after a longer one (iperf3, the
    // previous row) was up to 1.7x slower than the same variant after a
    // migration: the order, not the VMM, decided.
    std::thread::sleep(Duration::from_millis(crate::env_or(
        "FERRY_BENCH_SETTLE_MS",
        8000,
    )));
    let port = env.next_port();
    let uri = format!("tcp:{B_ADDR}:{port}");
    let cmd = pattern_cmdline(pattern, dirty);
    let mut src = source(variant.vmm, &env.hosts, mib, &cmd, None);
    let mut dst = destination(variant.vmm, &env.hosts, mib, &cmd, "defer");
    set_multifd(&mut src, variant.channels);
    set_multifd(&mut dst, variant.channels);
    if variant.tls {
        crate::tls::configure(&mut src, &mut dst);
    }
    dst.exec("migrate-incoming", json!({ "uri": uri }))
        .expect("migrate-incoming");
    let t0 = Instant::now();
    src.exec("migrate", json!({ "uri": uri })).expect("migrate");
    let info = loop {
        let info = src.exec("query-migrate", json!({})).expect("query-migrate");
        match info["status"].as_str().unwrap_or("") {
            "completed" => break info,
            "failed" | "cancelled" => {
                panic!("{}: {info}\n{}", variant.label(), dst.stderr())
            }
            _ => {}
        }
        assert!(
            t0.elapsed() < MIGRATION_TIMEOUT,
            "{}: {info}",
            variant.label()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    // Ferry's pattern must verify; QEMU's serial console sometimes takes
    // no input after an incoming migration here, so a QEMU guest that
    // does not answer is counted as unverified, not a failure.
    let wait = match variant.vmm {
        Vmm::Ferry => Duration::from_secs(120),
        Vmm::Qemu => Duration::from_secs(15),
    };
    let verified = match dst.console().try_command("pattern-verify", wait) {
        Ok(reply) => {
            assert_eq!(
                reply.field("bad_pages").as_deref(),
                Some("0"),
                "{}: the pattern did not arrive intact: {:?}",
                variant.label(),
                reply.lines
            );
            true
        }
        Err(e) if variant.vmm == Vmm::Qemu => {
            eprintln!("{}: pattern-verify unanswered ({e})", variant.label());
            false
        }
        Err(e) => panic!("{}: pattern-verify: {e}", variant.label()),
    };
    if let (Some(path), Vmm::Ferry) = (timeline, variant.vmm) {
        write_timeline(&mut src, path);
    }
    Run {
        total_ms: num(&info["total-time"]),
        downtime_ms: num(&info["downtime"]),
        transferred: num(&info["ram"]["transferred"]),
        passes: num(&info["ram"]["dirty-sync-count"]),
        verified,
    }
}

fn write_timeline(src: &mut Guest, path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(6);
    let value = loop {
        let v = src
            .exec("x-ferry-query-migrate-timeline", json!({}))
            .expect("timeline");
        if v["complete"] == true || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let Ok(t) = serde_json::from_value::<timeline::Timeline>(value) else {
        return;
    };
    if let Ok(svg) = timeline::svg(&t) {
        let _ = std::fs::write(path.with_extension("svg"), svg);
        let _ = std::fs::write(path.with_extension("json"), t.to_json());
        println!(
            "(timeline of one run: {})",
            path.with_extension("svg").display()
        );
    }
}

/// iperf3 from A to B on the migration link: GB/s received with
/// `streams` parallel streams over 2 s.
pub fn iperf(env: &mut Env, streams: u32) -> f64 {
    let port = env.next_port();
    let mut server = env
        .hosts
        .b
        .command("iperf3")
        .args(["-s", "-1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 -s");
    std::thread::sleep(Duration::from_millis(300));
    let out = env
        .hosts
        .a
        .command("iperf3")
        .args(["-c", B_ADDR, "-p", &port.to_string(), "-t", "2", "-J"])
        .args(["-P", &streams.to_string()])
        .output()
        .expect("iperf3 -c");
    let _ = server.wait();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    num(&v["end"]["sum_received"]["bits_per_second"]) / 8e9
}

fn worst(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// The rows of one guest on one link: every variant, interleaved; the
/// runs, for the caller's own comparisons.
pub fn rows(
    env: &mut Env,
    variants: &[Variant],
    mib: u32,
    pattern: &str,
    link: &str,
) -> Vec<(Variant, Run)> {
    let streams = variants
        .iter()
        .map(|v| v.channels)
        .max()
        .unwrap_or(0)
        .max(1);
    let mut runs: Vec<(Variant, Run)> = Vec::new();
    let mut links: Vec<(f64, f64)> = Vec::new();
    let slug: String = link
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let shot = std::env::temp_dir().join(format!("ferry-timeline-{mib}-{slug}"));
    // The link's figure before the migrations, not between them (see
    // the settling pause in migrate_populated).
    for _ in 0..3 {
        links.push((iperf(env, 1), iperf(env, streams)));
    }
    for run in 0..env.runs {
        let mut order = variants.to_vec();
        if run % 2 == 1 {
            order.reverse();
        }
        for v in order {
            let picture = (run == 0 && v.channels > 0).then_some(shot.as_path());
            let r = migrate_populated(env, v, mib, pattern, None, picture);
            if env.verbose {
                eprintln!("[{mib} MiB / {pattern} {link} {}] {r:?}", v.label());
            }
            runs.push((v, r));
        }
    }
    let one = median(links.iter().map(|l| l.0).collect());
    let many = median(links.iter().map(|l| l.1).collect());
    println!();
    println!(
        "{} guest holding {pattern} of pattern, A → B, {link}; {} runs each, interleaved (the \
         first run of each variant is in the worst); iperf3 on the same path: \
         {one:.2} GB/s one stream, {many:.2} GB/s with {streams} (medians of 3, before the \
         migrations). Every run starts after an 8 s pause, as cold as the first after start-up.",
        crate::table::size_label(mib),
        env.runs
    );
    println!();
    println!("| variant | total: median | total: worst | downtime: median | downtime: worst | GB/s (median) | of iperf3 one stream | passes | pattern verified |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let pick = |v: Variant, f: fn(&Run) -> f64| -> Vec<f64> {
        runs.iter().filter(|r| r.0 == v).map(|r| f(&r.1)).collect()
    };
    for &v in variants {
        let total = pick(v, |r| r.total_ms);
        let down = pick(v, |r| r.downtime_ms);
        let rate = median(pick(v, Run::gbytes_per_sec));
        let verified = runs.iter().filter(|r| r.0 == v && r.1.verified).count();
        println!(
            "| {} | {} | {} | {} | {} | {rate:.2} | {:.2} | {} | {verified}/{} |",
            v.label(),
            fmt(median(total.clone()), "ms"),
            fmt(worst(&total), "ms"),
            fmt(median(down.clone()), "ms"),
            fmt(worst(&down), "ms"),
            rate / one,
            fmt(median(pick(v, |r| r.passes)), ""),
            total.len(),
        );
    }
    // The floors, where both sides ran.
    let med_total = |v: Variant| median(pick(v, |r| r.total_ms));
    for &f in variants.iter().filter(|v| v.vmm == Vmm::Ferry) {
        if let Some(&q) = variants
            .iter()
            .find(|v| v.vmm == Vmm::Qemu && v.channels > 0 && v.tls == f.tls)
        {
            println!(
                "{} / {}: total {:.2}×",
                f.label(),
                q.label(),
                med_total(f) / med_total(q)
            );
        }
    }
    runs
}

/// FERRY_BENCH_POPULATED=4096/2G,9216/6G (guest MiB / pattern) and
/// FERRY_BENCH_LINKS=veth,10gbit pick the rows; FERRY_BENCH_CHANNELS the
/// multifd channel count (default 2, the machine's cores).
pub fn populated(env: &mut Env) {
    let guests = std::env::var("FERRY_BENCH_POPULATED").unwrap_or_else(|_| "4096/2G".into());
    let links = std::env::var("FERRY_BENCH_LINKS").unwrap_or_else(|_| "veth,10gbit".into());
    let channels = crate::env_or("FERRY_BENCH_CHANNELS", 2u32);
    let mut variants = Vec::new();
    for &vmm in &env.vmms {
        variants.push(Variant::new(vmm, 0));
        variants.push(Variant::new(vmm, channels));
    }
    for link in links.split(',') {
        let shaped = link != "veth";
        if shaped {
            env.hosts.shape(link);
        }
        let label = if shaped {
            format!("veth shaped to {link} (tc tbf)")
        } else {
            "veth, unshaped".into()
        };
        for g in guests.split(',') {
            let Some((mib, pattern)) = g.split_once('/') else {
                continue;
            };
            let Ok(mib) = mib.parse() else { continue };
            rows(env, &variants, mib, pattern, &label);
        }
        if shaped {
            env.hosts.unshape();
        }
    }
}

/// Total time against populated bytes (1, 2, 4, 6 GiB in a 9 GiB guest:
/// the probe's pattern lies in one RAM range, and a 9 GiB guest's above
/// 4 GiB is 6 GiB) and downtime against guest size (1, 2, 4 GiB holding
/// 512 MiB), Ferry with multifd: the first should grow at the link's
/// rate, the second not at all.
pub fn growth(env: &mut Env) {
    let channels = crate::env_or("FERRY_BENCH_CHANNELS", 2u32);
    let v = Variant::new(Vmm::Ferry, channels);
    println!();
    println!(
        "Cost growth, {} over the unshaped link; {} runs each (median, worst), every run \
         as cold as the first.",
        v.label(),
        env.runs
    );
    println!();
    println!("| guest | holds | total: median | total: worst | ms per GiB held | downtime: median | downtime: worst |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let cases: &[(u32, &str, f64)] = &[
        (9216, "1G", 1.0),
        (9216, "2G", 2.0),
        (9216, "4G", 4.0),
        (9216, "6G", 6.0),
        (1024, "512M", 0.5),
        (2048, "512M", 0.5),
        (4096, "512M", 0.5),
    ];
    for &(mib, pattern, gib) in cases {
        let runs: Vec<Run> = (0..env.runs)
            .map(|_| migrate_populated(env, v, mib, pattern, None, None))
            .collect();
        let total: Vec<f64> = runs.iter().map(|r| r.total_ms).collect();
        let down: Vec<f64> = runs.iter().map(|r| r.downtime_ms).collect();
        println!(
            "| {} | {pattern} | {} | {} | {:.0} | {} | {} |",
            crate::table::size_label(mib),
            fmt(median(total.clone()), "ms"),
            fmt(worst(&total), "ms"),
            median(total.clone()) / gib,
            fmt(median(down.clone()), "ms"),
            fmt(worst(&down), "ms"),
        );
    }
}

/// A 1 GiB guest dirtying 50 MB/s over a 1 Gbit/s link with a 2 ms
/// round trip (the delay line of tests/src/delayline.rs): total,
/// downtime, passes, and how far the total is from bytes sent / link
/// rate.
pub fn slow_link(env: &mut Env) {
    let rate = 1e9 / 8.0;
    let (hosts, line) =
        ferry_tests::hosts::TwoHosts::delayed("migslow", 1_000_000_000, Duration::from_millis(2));
    hosts.add_taps();
    crate::pin_guest_neighbour(&hosts);
    let direct = std::mem::replace(&mut env.hosts, hosts);
    let channels = crate::env_or("FERRY_BENCH_CHANNELS", 2u32);
    let mut variants = Vec::new();
    for &vmm in &env.vmms {
        variants.push(Variant::new(vmm, 0));
        variants.push(Variant::new(vmm, channels));
    }
    let mut runs: Vec<(Variant, Run)> = Vec::new();
    for run in 0..env.runs {
        let mut order = variants.clone();
        if run % 2 == 1 {
            order.reverse();
        }
        for v in order {
            let r = migrate_populated(env, v, 1024, "256M", Some(("50M", "256M")), None);
            runs.push((v, r));
        }
    }
    let delayed = std::mem::replace(&mut env.hosts, direct);
    let dropped = line.dropped.load(std::sync::atomic::Ordering::Relaxed);
    drop(line);
    drop(delayed);
    println!();
    println!(
        "1 GiB guest holding 256 MiB and dirtying 50 MB/s over 256 MiB, A → B over a 1 Gbit/s \
         link with 2 ms RTT (a user-space delay line: this kernel has no sch_netem; {dropped} \
         frames dropped by its 20 ms queue); {} runs.",
        env.runs
    );
    println!();
    println!("| variant | total: median | total: worst | downtime: median | downtime: worst | passes | total / (bytes sent at 1 Gbit/s) |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for &v in &variants {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.0 == v).map(|r| &r.1).collect();
        let total: Vec<f64> = mine.iter().map(|r| r.total_ms).collect();
        let down: Vec<f64> = mine.iter().map(|r| r.downtime_ms).collect();
        let ideal = median(mine.iter().map(|r| r.transferred / rate * 1e3).collect());
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} |",
            v.label(),
            fmt(median(total.clone()), "ms"),
            fmt(worst(&total), "ms"),
            fmt(median(down.clone()), "ms"),
            fmt(worst(&down), "ms"),
            fmt(median(mine.iter().map(|r| r.passes).collect()), ""),
            median(total) / ideal,
        );
    }
}
