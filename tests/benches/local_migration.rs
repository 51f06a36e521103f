//! Local migration (issue #8): downtime and total time for 1 GiB and
//! 4 GiB probe guests moved to a new process on the same host over
//! `unix:` — a plain copy, backend-transfer (the TAP handed over), and
//! backend-transfer with memfd RAM (no page copied). Figures are the
//! source's own `query-migrate`; medians of FERRY_BENCH_RUNS (default 3).
//!
//! Run with `cargo bench -p ferry-tests --bench local_migration`.

use std::time::Duration;

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::hosts::{migrate, wait_migration};
use ferry_tests::netns::Netns;
use ferry_tests::probe::{Cmdline, READY};
use serde_json::json;

const T: Duration = Duration::from_secs(120);

fn once(memory: &str, transfer: bool, memfd: bool, run: usize) -> (u64, u64, u64) {
    let ns = Netns::new("benchlocal").expect("netns");
    ns.add_tap("tap0").expect("tap");
    ns.add_addr("tap0", "198.18.0.1/24").expect("addr");
    let mut spec = VmSpec::probe(
        &Cmdline::new()
            .identity(0, None, None, "198.18.0.2/24")
            .pattern(1, "64M")
            .build(),
    );
    spec.memory = memory.into();
    spec.nets = vec!["tap=tap0".into()];
    if memfd {
        spec.extra = vec!["--memory-backend".into(), "memfd".into()];
    }
    let src = FerryVm::spawn("bench-local-src", &spec, Some(&ns));
    src.console.expect(READY, T);
    let sock = format!(
        "{}/ferry-bench-local-{}-{run}.sock",
        std::env::temp_dir().display(),
        std::process::id()
    );
    let uri = format!("unix:{sock}");
    let mut dst_spec = VmSpec::incoming(&uri);
    if !transfer {
        // Without the handover the new process needs a TAP of its own: the
        // source still holds tap0 (and would need re-plumbing in real life).
        ns.add_tap("tap1").expect("second tap");
        dst_spec.nets = vec!["tap=tap1".into()];
    }
    let _dst = FerryVm::spawn("bench-local-dst", &dst_spec, Some(&ns));
    src.execute(
        "migrate-set-parameters",
        json!({ "backend-transfer": transfer }),
    )
    .expect("parameters");
    migrate(&src, &uri);
    let info = wait_migration(&src, T);
    assert_eq!(info["status"], "completed", "{info}");
    let get = |k: &str| info[k].as_u64().unwrap_or(0);
    (
        get("downtime"),
        get("total-time"),
        info["ram"]["transferred"].as_u64().unwrap_or(0),
    )
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::var("FERRY_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    println!("\nLocal migration over unix:, probe guest with a 64 MiB pattern, medians of {runs}.");
    println!(
        "| memory | mode                      | downtime | total time | bytes on the socket |"
    );
    println!(
        "|--------|---------------------------|----------|------------|---------------------|"
    );
    for memory in ["1G", "4G"] {
        for (name, transfer, memfd) in [
            ("copy", false, false),
            ("backend-transfer", true, false),
            ("backend-transfer + memfd", true, true),
        ] {
            let samples: Vec<(u64, u64, u64)> = (0..runs)
                .map(|r| once(memory, transfer, memfd, r))
                .collect();
            println!(
                "| {memory:>6} | {name:<25} | {:>5} ms | {:>7} ms | {:>19} |",
                median(samples.iter().map(|s| s.0).collect()),
                median(samples.iter().map(|s| s.1).collect()),
                median(samples.iter().map(|s| s.2).collect())
            );
        }
    }
}
