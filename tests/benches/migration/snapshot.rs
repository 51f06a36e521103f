//! Snapshot to a file on host A, restore from it into a new process on
//! host B.
//!
//! The restoring processes are started by hand, not by `FerryVm::spawn`
//! or `Qemu::spawn`: the clock starts at the spawn itself, QMP is polled
//! every 0.5 ms and the first heartbeat is timed on the raw console,
//! none of which those helpers allow.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::bench_net::GUEST_MAC;
use ferry_tests::ferry::ferry_bin;
use ferry_tests::hosts::B_TAP;
use ferry_tests::vmms::{qemu_config, GuestNet, Vmm};
use qmp::client::QmpClient;
use serde_json::json;

use crate::guests::{cmdline, phase_lines, source};
use crate::live::num;
use crate::{verbose, Env, MIGRATION_TIMEOUT, SNAPSHOT_HEARTBEAT_MS};

/// Seconds `dd` takes to write `bytes` to a new file beside `file` (the
/// page cache, as the snapshot: no fsync): the disk's speed for the
/// bytes a snapshot holds.
pub fn dd_ms(file: &Path, bytes: u64) -> f64 {
    let out = file.with_extension("dd");
    let _ = std::fs::remove_file(&out);
    let t0 = Instant::now();
    let ok = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", out.display()))
        .args(["bs=1M", &format!("count={}", bytes >> 20)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let _ = std::fs::remove_file(&out);
    if ok {
        ms
    } else {
        f64::NAN
    }
}

/// What a snapshot save measured.
#[derive(Clone, Debug, Default)]
pub struct Save {
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub file_bytes: f64,
    /// `dd` writing the bytes the guest holds, just before the save.
    pub dd_ms: f64,
}

/// What a restore measured, from the spawn of the process.
#[derive(Clone, Debug, Default)]
pub struct Restore {
    pub running_ms: f64,
    pub heartbeat_ms: f64,
}

/// The snapshot guest's command line: heartbeats every
/// [`SNAPSHOT_HEARTBEAT_MS`], holding `pattern` if given.
pub fn snapshot_cmdline(pattern: Option<&str>) -> String {
    let base = cmdline(SNAPSHOT_HEARTBEAT_MS, None);
    match pattern {
        Some(p) => format!("{base} probe.pattern=13,{p}"),
        None => base,
    }
}

/// Saves a snapshot of a guest with `cmd`; with `dd_bytes`, first times
/// `dd` writing that many bytes beside the file, under the same
/// conditions (the guest running, the same memory state) as the save.
pub fn save(
    env: &mut Env,
    vmm: Vmm,
    mib: u32,
    file: &Path,
    cmd: &str,
    dd_bytes: Option<u64>,
) -> Save {
    let _ = std::fs::remove_file(file);
    let mut src = source(vmm, &env.hosts, mib, cmd, None);
    std::thread::sleep(Duration::from_millis(500));
    let dd_ms = dd_bytes.map_or(f64::NAN, |b| dd_ms(file, b));
    let uri = match vmm {
        Vmm::Ferry => format!("file:{}", file.display()),
        Vmm::Qemu => format!("exec:cat > {}", file.display()),
    };
    let t0 = Instant::now();
    src.exec("migrate", json!({ "uri": uri })).expect("migrate");
    let info = loop {
        let info = src.exec("query-migrate", json!({})).expect("query-migrate");
        match info["status"].as_str().unwrap_or("") {
            "completed" => break info,
            "failed" | "cancelled" => panic!("{} snapshot: {info}", vmm.name()),
            _ => {}
        }
        assert!(t0.elapsed() < MIGRATION_TIMEOUT, "snapshot: {info}");
        std::thread::sleep(Duration::from_millis(2));
    };
    if verbose() && vmm == Vmm::Ferry {
        std::thread::sleep(Duration::from_millis(20));
        eprint!("{}", phase_lines(&src));
    }
    use std::os::unix::fs::MetadataExt;
    Save {
        total_ms: num(&info["total-time"]),
        downtime_ms: num(&info["downtime"]),
        // What the file takes on disk (Ferry's is sparse).
        file_bytes: std::fs::metadata(file).map_or(f64::NAN, |m| (m.blocks() * 512) as f64),
        dd_ms,
    }
}

pub fn restore(env: &Env, vmm: Vmm, mib: u32, file: &Path, cmd: &str) -> Restore {
    let dir = std::env::temp_dir().join(format!("ferry-migbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let qmp = dir.join(format!("{}-restore.sock", vmm.name()));
    let _ = std::fs::remove_file(&qmp);
    let cmd = match vmm {
        Vmm::Ferry => ferry_restore(env, file, &qmp),
        Vmm::Qemu => qemu_restore(env, mib, file, &qmp, cmd),
    };
    let r = time_restore(cmd, &qmp, vmm.name());
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// `ferry run --incoming file:FILE` on host B.
fn ferry_restore(env: &Env, file: &Path, qmp: &Path) -> Command {
    let mut c = env
        .hosts
        .b
        .command(ferry_bin().to_str().expect("utf-8 path"));
    c.args(["run", "--incoming"])
        .arg(format!("file:{}", file.display()))
        .args(["--net", &format!("tap={B_TAP}")])
        .arg("--qmp")
        .arg(format!("unix:{}", qmp.display()));
    c
}

/// QEMU on host B with the machine of `Qemu::spawn` (QEMU needs it
/// described again), `-incoming exec:cat FILE`.
fn qemu_restore(env: &Env, mib: u32, file: &Path, qmp: &Path, cmd: &str) -> Command {
    let net = GuestNet {
        ns: &env.hosts.b,
        tap: B_TAP,
        mac: GUEST_MAC,
    };
    let extra = [
        "-incoming".to_string(),
        format!("exec:cat {}", file.display()),
    ];
    qemu_config(&net, mib, cmd, &extra).command(qmp)
}

/// Runs `cmd` (already set up) and times QMP `running` and the first
/// heartbeat on its console.
fn time_restore(mut cmd: Command, qmp: &Path, what: &str) -> Restore {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child: Child = cmd.spawn().expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let heartbeat = std::thread::spawn(move || {
        let mut first = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if first.is_none() && line.starts_with("probe: heartbeat ") {
                first = Some(start.elapsed());
            }
        }
        first
    });
    let stderr = child.stderr.take().expect("stderr");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let running = loop {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("{what}: no QMP running after 60 s");
        }
        if let Ok(Some(status)) = child.try_wait() {
            let _ = child.kill();
            panic!(
                "{what} exited ({status}): {}",
                errors.join().unwrap_or_default()
            );
        }
        let Ok(mut c) = QmpClient::connect(qmp) else {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        };
        c.set_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let running = loop {
            let s = c.execute("query-status", None).expect("query-status");
            if s["status"] == "running" {
                break start.elapsed();
            }
            std::thread::sleep(Duration::from_micros(500));
        };
        break running;
    };
    // Give the first heartbeat time to come, then stop the guest.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !heartbeat.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        if start.elapsed() > running + Duration::from_millis(300) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let first = heartbeat.join().ok().flatten();
    let _ = errors.join();
    Restore {
        running_ms: running.as_secs_f64() * 1e3,
        heartbeat_ms: first.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
    }
}
