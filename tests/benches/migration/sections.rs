//! The bench's sections (FERRY_BENCH_PARTS): each runs its measurements
//! for every VMM and prints its table.

use std::path::PathBuf;
use std::time::Duration;

use ferry_tests::vmms::Vmm;

use crate::echo::EchoStream;
use crate::guests::{cmdline, source};
use crate::live::{live, Migration};
use crate::snapshot::{restore, save, snapshot_cmdline, Restore, Save};
use crate::table::{fmt, med, ratio, size_label};
use crate::{Env, DOWNTIME_LIMIT_MS, QEMU_BOUND, SNAPSHOT_HEARTBEAT_MS};

pub fn idle(env: &mut Env, sizes: &[u32]) {
    let mut table = Vec::new();
    for &mib in sizes {
        let mut results: Vec<(Vmm, Migration)> = Vec::new();
        for run in 0..env.runs {
            for vmm in env.order(run) {
                let m = live(env, vmm, mib, &cmdline(0, None), None, None);
                if env.verbose {
                    eprintln!("[idle {mib} MiB {}] {m:?}", vmm.name());
                }
                assert!(m.completed, "{} idle {mib} MiB: {}", vmm.name(), m.outcome);
                results.push((vmm, m));
            }
        }
        table.push((mib, results));
    }
    println!();
    println!(
        "Idle guest, A → B over TCP; medians of {} runs; downtime limit {DOWNTIME_LIMIT_MS} ms. \
         Echo gap: a 1 ms UDP echo stream's silence from the last answer on A to the first on B \
         (from outside; floor = the same stream's longest silence in the second before).",
        env.runs
    );
    println!();
    println!(
        "| guest | VMM | total time | downtime (reported) | downtime (echo gap) | echo floor | bytes sent |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (mib, results) in &table {
        for vmm in &env.vmms {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                size_label(*mib),
                vmm.name(),
                fmt(med(results, *vmm, |m| m.total_ms), "ms"),
                fmt(med(results, *vmm, |m| m.downtime_ms), "ms"),
                fmt(med(results, *vmm, |m| m.echo_gap_ms), "ms"),
                fmt(med(results, *vmm, |m| m.echo_floor_ms), "ms"),
                fmt(med(results, *vmm, |m| m.transferred), "B"),
            );
        }
        if env.vmms.len() == 2 {
            let r = |f: fn(&Migration) -> f64| {
                ratio(med(results, Vmm::Ferry, f), med(results, Vmm::Qemu, f))
            };
            println!(
                "| {} | Ferry/QEMU | {} | {} | {} | | {} |",
                size_label(*mib),
                r(|m| m.total_ms),
                r(|m| m.downtime_ms),
                r(|m| m.echo_gap_ms),
                r(|m| m.transferred),
            );
        }
    }
}

pub fn dirty(env: &mut Env) {
    let mib = 1024;
    // (rate, size, label, auto-converge: None = each VMM's default).
    type Load = (&'static str, &'static str, &'static str, Option<bool>);
    let loads: &[Load] = &[
        ("50M", "256M", "50 MB/s over 256 MiB", None),
        ("max", "256M", "unthrottled over 256 MiB", None),
        ("max", "768M", "unthrottled over 768 MiB", None),
        (
            "max",
            "768M",
            "unthrottled over 768 MiB, auto-converge on in both",
            Some(true),
        ),
    ];
    let key = |rate: &str, size: &str, ac: Option<bool>| match ac {
        Some(true) => format!("{rate}/{size}+ac"),
        Some(false) => format!("{rate}/{size}-ac"),
        None => format!("{rate}/{size}"),
    };
    let picked = std::env::var("FERRY_BENCH_DIRTY").ok();
    let mut table = Vec::new();
    for &(rate, size, label, auto_converge) in loads.iter().filter(|(rate, size, _, ac)| {
        picked
            .as_deref()
            .is_none_or(|p| p.split(',').any(|k| k.trim() == key(rate, size, *ac)))
    }) {
        let mut results: Vec<(Vmm, Migration)> = Vec::new();
        for run in 0..env.runs {
            for vmm in env.order(run) {
                // Ferry gives up by itself after x-max-passes; QEMU would
                // go on for ever.
                let bound = (vmm == Vmm::Qemu).then_some(QEMU_BOUND);
                let m = live(
                    env,
                    vmm,
                    mib,
                    &cmdline(0, Some((rate, size))),
                    bound,
                    auto_converge,
                );
                if env.verbose {
                    eprintln!("[dirty {label} {}] {m:?}", vmm.name());
                }
                results.push((vmm, m));
            }
        }
        table.push((label, results));
    }
    println!();
    println!(
        "Guest of 1 GiB dirtying memory (probe.dirty), A → B over TCP; medians of {} runs; \
         downtime limit {DOWNTIME_LIMIT_MS} ms; QEMU cancelled after {} s. Guest writes: page writes \
         per second of the probe's dirtier from the migrate command to the end (its own counter, \
         pauses included): how far the guest got meanwhile.",
        env.runs,
        QEMU_BOUND.as_secs()
    );
    println!();
    println!("| workload | VMM | converged | passes | total time | downtime (reported) | downtime (echo gap) | bytes sent | guest writes | outcome |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---|");
    for (label, results) in &table {
        for vmm in &env.vmms {
            let mine: Vec<&Migration> = results
                .iter()
                .filter(|(v, _)| v == vmm)
                .map(|(_, m)| m)
                .collect();
            let converged = mine.iter().filter(|m| m.completed).count();
            let outcomes: Vec<&str> = mine.iter().map(|m| m.outcome.as_str()).collect();
            let mut outcome = outcomes.first().copied().unwrap_or("").to_string();
            if outcomes.iter().any(|o| *o != outcome) {
                outcome = outcomes.join("; ");
            }
            println!(
                "| {label} | {} | {converged}/{} | {} | {} | {} | {} | {} | {}/s | {} |",
                vmm.name(),
                mine.len(),
                fmt(med(results, *vmm, |m| m.passes), ""),
                fmt(med(results, *vmm, |m| m.total_ms), "ms"),
                fmt(
                    med(results, *vmm, |m| if m.completed {
                        m.downtime_ms
                    } else {
                        f64::NAN
                    }),
                    "ms"
                ),
                fmt(med(results, *vmm, |m| m.echo_gap_ms), "ms"),
                fmt(med(results, *vmm, |m| m.transferred), "B"),
                fmt(med(results, *vmm, |m| m.writes_per_s), "count"),
                outcome.replace('|', "/"),
            );
        }
    }
}

/// FERRY_BENCH_SNAPSHOTS=1024,1024/768M,8192/6G (guest MiB, / what it
/// holds) picks the rows.
pub fn snapshot(env: &mut Env) {
    let picked =
        std::env::var("FERRY_BENCH_SNAPSHOTS").unwrap_or_else(|_| "1024,1024/768M,8192/6G".into());
    for case in picked.split(',') {
        let (mib, pattern) = match case.split_once('/') {
            Some((m, p)) => (m, Some(p)),
            None => (case, None),
        };
        let Ok(mib) = mib.trim().parse::<u32>() else {
            continue;
        };
        snapshot_rows(env, mib, pattern);
    }
}

/// "768M", "6G" in bytes.
fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.chars().last()? {
        'K' => (&text[..text.len() - 1], 10),
        'M' => (&text[..text.len() - 1], 20),
        'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    digits.parse::<u64>().ok().map(|n| n << shift)
}

fn snapshot_rows(env: &mut Env, mib: u32, pattern: Option<&str>) {
    let dir = std::env::temp_dir();
    let cmd = snapshot_cmdline(pattern);
    let mut saves: Vec<(Vmm, Save)> = Vec::new();
    let mut restores: Vec<(Vmm, Restore)> = Vec::new();
    let mut dds = Vec::new();
    for run in 0..env.runs {
        for vmm in env.order(run) {
            let file: PathBuf = dir.join(format!(
                "ferry-migbench-{}-{}.img",
                std::process::id(),
                vmm.name()
            ));
            let held = pattern.and_then(parse_size);
            let s = save(
                env,
                vmm,
                mib,
                &file,
                &cmd,
                held.filter(|_| vmm == Vmm::Ferry),
            );
            let r = restore(env, vmm, mib, &file, &cmd);
            if env.verbose {
                eprintln!(
                    "[snapshot {} MiB {pattern:?} {}] {s:?} {r:?}",
                    mib,
                    vmm.name()
                );
            }
            if vmm == Vmm::Ferry {
                dds.push(s.dd_ms);
            }
            let _ = std::fs::remove_file(&file);
            saves.push((vmm, s));
            restores.push((vmm, r));
        }
    }
    let worst = |v: Vec<f64>| v.into_iter().fold(f64::NAN, f64::max);
    let all = |vmm: Vmm, f: fn(&Restore) -> f64| -> Vec<f64> {
        restores
            .iter()
            .filter(|r| r.0 == vmm)
            .map(|r| f(&r.1))
            .collect()
    };
    println!();
    println!(
 "Snapshot of a {} guest{} and restore into a new process on host B; {} runs (median, worst). Ferry: migrate file: (the file form, RAM mapped on restore) / run --incoming file:. QEMU: migrate exec:cat > FILE / -incoming exec:cat FILE. Restore times from the spawn of the process (file in the page cache); first heartbeat: the guest beats every {SNAPSHOT_HEARTBEAT_MS} ms. dd: writing the bytes the guest holds with dd (page cache), just before each Ferry save: {}.",
        size_label(mib),
        pattern.map_or(" (idle)".to_string(), |p| format!(" holding {p}")),
        env.runs,
        fmt(ferry_tests::bench_net::median(dds.clone()), "ms"),
    );
    println!();
    println!("| VMM | save: total time | save: guest stopped | on disk | restore: to QMP running | restore: to first heartbeat (median) | (worst) |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for vmm in &env.vmms {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            vmm.name(),
            fmt(med(&saves, *vmm, |s| s.total_ms), "ms"),
            fmt(med(&saves, *vmm, |s| s.downtime_ms), "ms"),
            fmt(med(&saves, *vmm, |s| s.file_bytes), "B"),
            fmt(med(&restores, *vmm, |r| r.running_ms), "ms"),
            fmt(med(&restores, *vmm, |r| r.heartbeat_ms), "ms"),
            fmt(worst(all(*vmm, |r| r.heartbeat_ms)), "ms"),
        );
    }
    if env.vmms.len() == 2 {
        let rs = |f: fn(&Save) -> f64| ratio(med(&saves, Vmm::Ferry, f), med(&saves, Vmm::Qemu, f));
        let rr = |f: fn(&Restore) -> f64| {
            ratio(med(&restores, Vmm::Ferry, f), med(&restores, Vmm::Qemu, f))
        };
        println!(
            "| Ferry/QEMU | {} | {} | {} | {} | {} | |",
            rs(|s| s.total_ms),
            rs(|s| s.downtime_ms),
            rs(|s| s.file_bytes),
            rr(|r| r.running_ms),
            rr(|r| r.heartbeat_ms),
        );
    }
}

/// The echo stream against a guest that stays put (FERRY_BENCH_PARTS=echo):
/// how long its silences are when nothing migrates.
pub fn echo_floor(env: &mut Env) {
    println!();
    println!("Echo stream, 3 s, no migration: gaps between answers.");
    println!();
    println!("| VMM | probe idle | answers | lost | p50 | p99 | max |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for vmm in env.vmms.clone() {
        for idle in ["auto", "spin"] {
            let cmd = format!("{} probe.idle={idle}", cmdline(0, None));
            let src = source(vmm, &env.hosts, 256, &cmd, None);
            let echo = EchoStream::start(&env.hosts);
            std::thread::sleep(Duration::from_secs(3));
            let r = echo.stop();
            let rx = src
                .console()
                .send_command("counters 0", Duration::from_secs(10))
                .number("rx_frames")
                .unwrap_or(0);
            let mut gaps: Vec<f64> = r
                .windows(2)
                .map(|w| (w[1].0 - w[0].0).as_secs_f64() * 1e3)
                .collect();
            gaps.sort_by(|a, b| a.total_cmp(b));
            let q = |f: f64| gaps.get((gaps.len() as f64 * f) as usize).copied();
            println!(
                "| {} | {idle} | {} | {} | {} | {} | {} |",
                vmm.name(),
                r.len(),
                rx.saturating_sub(r.len() as u64),
                fmt(q(0.5).unwrap_or(f64::NAN), "ms"),
                fmt(q(0.99).unwrap_or(f64::NAN), "ms"),
                fmt(gaps.last().copied().unwrap_or(f64::NAN), "ms"),
            );
        }
    }
}
