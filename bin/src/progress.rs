//! `ferry ctl migrate`: follows a migration with `query-migrate` and
//! shows it as a live bar on a terminal (indicatif draws it; one line per
//! pass otherwise, which indicatif does not do), then the summary.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qmp::client::{ClientError, QmpClient};
use serde_json::Value;

const POLL: Duration = Duration::from_millis(100);
/// The bar's resolution: per mille of guest memory.
const STEPS: u64 = 1000;

fn bar() -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(STEPS), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("[{bar:30}] {percent:>3}%  {msg}") {
        bar.set_style(style.progress_chars("#>-"));
    }
    bar
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn field(v: &Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or(0)
}

/// How following a migration ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Followed {
    Completed,
    /// Failed or cancelled.
    Ended,
    /// Stopped in `pre-switchover` (`pause-before-switchover`): waiting
    /// for `migrate-continue`.
    Paused,
}

/// Polls until the migration ends or stops for `migrate-continue`.
pub fn follow_migration(client: &mut QmpClient) -> Result<Followed, ClientError> {
    let tty = std::io::stderr().is_terminal();
    let bar = bar();
    let mut last: Option<(Instant, u64)> = None;
    let mut rate = 0.0f64;
    let mut pass_shown = 0;
    loop {
        let info = client.execute("query-migrate", None)?;
        let status = info["status"].as_str().unwrap_or("none").to_string();
        let transferred = field(&info, &["ram", "transferred"]);
        let total = field(&info, &["ram", "total"]);
        let remaining = field(&info, &["ram", "remaining"]);
        let pass = field(&info, &["ram", "dirty-sync-count"]);
        let now = Instant::now();
        if let Some((t, b)) = last {
            let dt = now.duration_since(t).as_secs_f64();
            if dt > 0.0 && transferred >= b {
                // A little smoothing so the figure can be read.
                rate = 0.7 * rate + 0.3 * ((transferred - b) as f64 / dt);
            }
        }
        last = Some((now, transferred));
        match status.as_str() {
            "completed" | "failed" | "cancelled" => {
                bar.finish_and_clear();
                print_summary(&info);
                return Ok(if status == "completed" {
                    Followed::Completed
                } else {
                    Followed::Ended
                });
            }
            "pre-switchover" => {
                bar.finish_and_clear();
                println!("status: pre-switchover");
                println!(
                    "the guest is stopped after {} live passes, {:.1} MiB sent; the destination has not taken it over",
                    pass,
                    mib(transferred)
                );
                println!("go on with:   ferry ctl --qmp SOCKET migrate-continue pre-switchover");
                println!("or resume it: ferry ctl --qmp SOCKET migrate_cancel");
                return Ok(Followed::Paused);
            }
            _ => {
                // Progress through guest memory in the first pass; then
                // what is left of the dirty set.
                let done = if total == 0 {
                    0.0
                } else {
                    (transferred as f64 / total as f64).min(0.99)
                };
                let mut line = format!(
                    "{status}  pass {}  sent {:.1} MiB  remaining {:.1} MiB  {:.1} MiB/s",
                    pass + 1,
                    mib(transferred),
                    mib(remaining),
                    mib(rate as u64)
                );
                if let Some(t) = info["cpu-throttle-percentage"].as_u64() {
                    line.push_str(&format!("  throttle {t}%"));
                }
                if tty {
                    bar.set_position((done * STEPS as f64) as u64);
                    bar.set_message(line);
                } else if pass + 1 != pass_shown {
                    pass_shown = pass + 1;
                    eprintln!("{:>3.0}%  {line}", done * 100.0);
                }
            }
        }
        std::thread::sleep(POLL);
    }
}

fn print_summary(info: &Value) {
    let status = info["status"].as_str().unwrap_or("?");
    println!("status: {status}");
    if let Some(e) = info["error-desc"].as_str() {
        println!("error: {e}");
    }
    println!("total time: {} ms", field(info, &["total-time"]));
    if let Some(d) = info["downtime"].as_u64() {
        println!("downtime: {d} ms");
    }
    if let Some(t) = info["cpu-throttle-percentage"].as_u64() {
        println!("vCPUs throttled by: {t}% (auto-converge)");
    }
    println!(
        "sent: {:.1} MiB in {} passes ({} pages with data, {} zero pages)",
        mib(field(info, &["ram", "transferred"])),
        field(info, &["ram", "dirty-sync-count"]),
        field(info, &["ram", "normal"]),
        field(info, &["ram", "duplicate"])
    );
}
