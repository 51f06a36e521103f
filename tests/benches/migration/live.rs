//! One live migration from host A to host B, and what it measured.

use std::time::{Duration, Instant};

use ferry_tests::hosts::B_ADDR;
use ferry_tests::vmms::{Guest, Vmm};
use serde_json::{json, Value};

use crate::echo::{longest_gap, switch_gap, EchoStream};
use crate::guests::{destination, phase_lines, source};
use crate::{verbose, Env, MIGRATION_TIMEOUT};

/// One migration's figures.
#[derive(Clone, Debug, Default)]
pub struct Migration {
    pub completed: bool,
    /// `failed`, `cancelled after 30 s`, ...
    pub outcome: String,
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub transferred: f64,
    pub passes: f64,
    /// The echo stream's silence across the move ([`switch_gap`]).
    pub echo_gap_ms: f64,
    /// Longest echo silence in the second before it.
    pub echo_floor_ms: f64,
    /// Page writes per second of the guest's dirtier during the migration
    /// (each a word in a page; unthrottled, the same pages again and
    /// again).
    pub writes_per_s: f64,
}

/// A figure of `query-migrate`; NaN where the VMM leaves it out, so the
/// tables show `-` rather than a zero.
pub fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Migrates a guest with `cmdline` of `mib` MiB from A to B; with
/// `bound`, cancels it when it has not ended by then.
pub fn live(
    env: &mut Env,
    vmm: Vmm,
    mib: u32,
    cmdline: &str,
    bound: Option<Duration>,
    auto_converge: Option<bool>,
) -> Migration {
    let port = env.next_port();
    let uri = format!("tcp:{B_ADDR}:{port}");
    let hosts = &env.hosts;
    let mut src = source(vmm, hosts, mib, cmdline, auto_converge);
    let mut dst = destination(vmm, hosts, mib, cmdline, &uri);
    let echo = EchoStream::start(hosts);
    // A second of the stream before the move: its noise floor.
    std::thread::sleep(Duration::from_millis(1000));
    let written_before = pages_written(&src);
    let t0 = Instant::now();
    src.exec("migrate", json!({ "uri": uri })).expect("migrate");
    let mut cancelled_at = None;
    let info = loop {
        let info = src.exec("query-migrate", json!({})).expect("query-migrate");
        match info["status"].as_str().unwrap_or("") {
            "completed" | "failed" | "cancelled" => break info,
            _ => {}
        }
        if let Some(bound) = bound {
            if cancelled_at.is_none() && t0.elapsed() > bound {
                src.exec("migrate_cancel", json!({}))
                    .expect("migrate_cancel");
                cancelled_at = Some(t0.elapsed());
            }
        }
        assert!(
            t0.elapsed() < MIGRATION_TIMEOUT,
            "{} migration still {info} after {MIGRATION_TIMEOUT:?}",
            vmm.name()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let t_end = Instant::now();
    let completed = info["status"] == "completed";
    if completed {
        assert!(
            echo.wait_b(t0, Duration::from_secs(10)),
            "{}: the guest does not answer on host B after the migration; status {}; console:\n{}\nstderr: {}",
            vmm.name(),
            dst.status(),
            dst.console().output(),
            dst.stderr()
        );
        let status = dst.status();
        assert_eq!(status, "running", "{} destination", vmm.name());
    } else {
        // The guest runs on at the source.
        assert_eq!(
            src.status(),
            "running",
            "{} source after {info}",
            vmm.name()
        );
    }
    // How fast the guest really dirtied memory meanwhile (where it runs
    // now), pauses included.
    let written_after = pages_written(if completed { &dst } else { &src });
    let writes_per_s = match (written_before, written_after) {
        (Some((p0, t0)), Some((p1, t1))) => p1.saturating_sub(p0) as f64 / (t1 - t0).as_secs_f64(),
        _ => f64::NAN,
    };
    std::thread::sleep(Duration::from_millis(20));
    if verbose() && vmm == Vmm::Ferry {
        eprint!("{}{}", phase_lines(&src), phase_lines(&dst));
    }
    let replies = echo.stop();

    let gap = switch_gap(&replies, t0).unwrap_or(t_end - t0);
    if verbose() {
        let longest = longest_gap(&replies, t0, Instant::now()).unwrap_or_default();
        eprintln!(
            "    echo: {:.1} ms across the move, longest silence during the migration {:.1} ms",
            gap.as_secs_f64() * 1e3,
            longest.as_secs_f64() * 1e3
        );
    }
    let floor = longest_gap(&replies, t0 - Duration::from_secs(1), t0).unwrap_or_default();
    let outcome = match (info["status"].as_str(), cancelled_at) {
        (_, Some(at)) => format!("cancelled after {:.0} s", at.as_secs_f64()),
        (Some("failed"), _) => format!(
            "failed: {}",
            info["error-desc"].as_str().unwrap_or("(no error-desc)")
        ),
        (Some(s), _) => s.to_string(),
        (None, _) => "?".into(),
    };
    Migration {
        completed,
        outcome,
        total_ms: num(&info["total-time"]),
        downtime_ms: num(&info["downtime"]),
        transferred: num(&info["ram"]["transferred"]),
        passes: num(&info["ram"]["dirty-sync-count"]),
        echo_gap_ms: if completed {
            gap.as_secs_f64() * 1e3
        } else {
            f64::NAN
        },
        echo_floor_ms: floor.as_secs_f64() * 1e3,
        writes_per_s,
    }
}

/// The probe's count of pages its dirtier wrote, and when it was read.
fn pages_written(guest: &Guest) -> Option<(u64, Instant)> {
    let reply = guest
        .console()
        .try_command("workloads", Duration::from_secs(10))
        .ok()?;
    Some((reply.number("pages_written")?, Instant::now()))
}
