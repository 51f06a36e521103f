//! Live migration, snapshot and restore: Ferry beside QEMU 7.2 (`-M
//! microvm,acpi=off,ioapic2=off -enable-kvm`), the same probe guest, the
//! same two namespace "hosts" joined by a veth (tests/src/hosts.rs),
//! migrating over TCP from host A to host B, the same downtime limit (300
//! ms, set explicitly on both) and no bandwidth limit on either (QEMU's
//! default of 128 MiB/s is lifted).
//!
//! - idle guest of 256 MiB, 1 GiB and 4 GiB: total time, downtime and bytes
//!   sent as each VMM's `query-migrate` reports them, and the downtime seen
//!   from outside: the silence of a UDP echo stream across the move (one
//!   datagram per ms to the probe's port 7, sent from both hosts at once,
//!   each host's TAP with a permanent neighbour entry for the guest's
//!   MAC), from the last echo answered on A to the first answered on B.
//!   That figure includes up to one sending interval (1 ms), the echo
//!   round trip and the destination's start after it acknowledged; the
//!   longest silence of the same stream in the second before the
//!   migration is its noise floor.
//! - a 1 GiB guest dirtying memory (`probe.dirty=RATE,SIZE`): 50 MB/s over
//!   256 MiB; unthrottled over 256 MiB (the whole region dirty on every
//!   pass, which still fits the limit at this link's rate: a big last
//!   pass); unthrottled over 768 MiB (beyond what converges):
//!   passes (`dirty-sync-count`), downtime, converged or not. Ferry gives
//!   up after `x-max-passes` (30) with an error; QEMU keeps going, so it is
//!   cancelled (`migrate_cancel`) after a bound and counted as not
//!   converged.
//! - snapshot of a 1 GiB guest: Ferry `migrate file:`, QEMU `migrate
//!   exec:cat > FILE` (QEMU's way: a live migration into a pipe); restore:
//!   `ferry run --incoming file:` / `qemu -incoming exec:cat FILE`, timed
//!   from the process's spawn to QMP `query-status` = running and to the
//!   guest's first heartbeat (every 2 ms). The file is in the page cache.
//!
//! The VMMs take turns (which goes first alternates); medians of
//! FERRY_BENCH_RUNS runs (default 3). FERRY_BENCH_VERBOSE=1 prints every
//! run, FERRY_BENCH_ONLY=ferry|qemu measures one side,
//! FERRY_BENCH_PARTS=idle,dirty,snapshot picks sections (`echo` adds
//! the echo stream's gaps without a migration, its noise floor) and
//! FERRY_BENCH_SIZES=256,1024,4096 the idle sizes (MiB),
//! FERRY_BENCH_DIRTY=50M/256M,max/256M,max/768M the dirtying loads. With
//! FERRY_BENCH_VERBOSE=1 Ferry runs with FERRY_LOG=info and its log lines
//! on the stop-and-copy phases are printed.
//!
//! `cargo bench -p ferry-tests --bench migration` (root, KVM, QEMU).

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_tests::bench_net::median;
use ferry_tests::ferry::{ferry_bin, FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root, require_tool};
use ferry_tests::hosts::{TwoHosts, A_TAP, B_ADDR, B_TAP, GUEST_ADDR};
use ferry_tests::netns::Netns;
use ferry_tests::probe::{probe_elf, Cmdline, Console, Qemu, QemuConfig, QemuNic, READY};
use serde_json::{json, Value};
use vmm::qmp::client::QmpClient;

/// The same MAC under both VMMs: the hosts' neighbour entries name it.
const GUEST_MAC: &str = "52:54:00:12:34:56";
const HOST_IP: &str = "198.18.0.1";
const DOWNTIME_LIMIT_MS: u64 = 300;
/// How long QEMU may try to migrate a guest that does not converge.
const QEMU_BOUND: Duration = Duration::from_secs(30);
const BOOT: Duration = Duration::from_secs(60);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(180);
/// Echo stream period.
const ECHO_EVERY: Duration = Duration::from_millis(1);
/// Heartbeat period of the snapshot guest.
const SNAPSHOT_HEARTBEAT_MS: u64 = 2;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vmm {
    Ferry,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Ferry => "ferry",
            Vmm::Qemu => "qemu",
        }
    }
}

struct Env {
    runs: usize,
    verbose: bool,
    vmms: Vec<Vmm>,
    hosts: TwoHosts,
    port: u16,
}

impl Env {
    fn next_port(&mut self) -> u16 {
        self.port += 1;
        self.port
    }

    /// Both VMMs once per run, alternating which goes first.
    fn order(&self, run: usize) -> Vec<Vmm> {
        let mut order = self.vmms.clone();
        if run % 2 == 1 {
            order.reverse();
        }
        order
    }
}

/// A probe guest under one VMM, with a QMP connection.
enum Guest {
    Ferry { vm: FerryVm, qmp: Option<QmpClient> },
    Qemu(Qemu),
}

impl Guest {
    fn exec(&mut self, command: &str, args: Value) -> Result<Value, String> {
        match self {
            Guest::Ferry { vm, qmp } => {
                let client = qmp.get_or_insert_with(|| vm.qmp());
                let args = match args {
                    Value::Object(m) if !m.is_empty() => Some(m),
                    _ => None,
                };
                client.execute(command, args).map_err(|e| e.to_string())
            }
            Guest::Qemu(q) => q.qmp(command, args),
        }
    }

    fn console(&self) -> &Console {
        match self {
            Guest::Ferry { vm, .. } => &vm.console,
            Guest::Qemu(q) => &q.console,
        }
    }

    fn status(&mut self) -> String {
        self.exec("query-status", json!({}))
            .map(|v| v["status"].as_str().unwrap_or("?").to_string())
            .unwrap_or_else(|e| format!("error: {e}"))
    }

    fn stderr(&self) -> String {
        match self {
            Guest::Ferry { vm, .. } => vm.stderr(),
            Guest::Qemu(_) => "(QEMU's stderr is the bench's)".into(),
        }
    }
}

/// FERRY_LOG=info with FERRY_BENCH_VERBOSE=1: Ferry logs its phases.
fn ferry_env() -> Vec<(String, String)> {
    if verbose() {
        vec![("FERRY_LOG".into(), "info".into())]
    } else {
        Vec::new()
    }
}

fn verbose() -> bool {
    std::env::var("FERRY_BENCH_VERBOSE").is_ok_and(|v| v == "1")
}

/// Ferry's log lines about the migration's phases (verbose runs).
fn phase_lines(guest: &Guest) -> String {
    guest
        .stderr()
        .lines()
        .filter(|l| {
            l.contains("guest stopped")
                || l.contains("migration loaded")
                || l.contains("last pass:")
        })
        .map(|l| format!("    {l}\n"))
        .collect()
}

fn cmdline(heartbeat_ms: u64, dirty: Option<(&str, &str)>) -> String {
    let mut c = Cmdline::new().identity(0, None, None, &format!("{GUEST_ADDR}/24"));
    if heartbeat_ms > 0 {
        c = c.heartbeat_ms(heartbeat_ms);
    }
    if let Some((rate, size)) = dirty {
        c = c.dirty(rate, size);
    }
    c.build()
}

fn qemu_config(ns: &Netns, tap: &str, mib: u32, cmdline: &str) -> QemuConfig {
    let mut c = QemuConfig::new(cmdline);
    c.memory_mib = mib;
    c.nics.push(QemuNic {
        tap: tap.into(),
        mac: Some(GUEST_MAC.into()),
    });
    c.netns = Some(ns.name().to_string());
    c.qmp = true;
    c
}

/// The guest booted on host A.
fn source(vmm: Vmm, hosts: &TwoHosts, mib: u32, cmdline: &str) -> Guest {
    let mut guest = match vmm {
        Vmm::Ferry => {
            let mut spec = VmSpec::probe(cmdline);
            spec.memory = format!("{mib}M");
            spec.nets = vec![format!("tap={A_TAP},mac={GUEST_MAC}")];
            spec.env = ferry_env();
            let vm = FerryVm::spawn("migbench-src", &spec, Some(&hosts.a));
            vm.console.expect(READY, BOOT);
            Guest::Ferry { vm, qmp: None }
        }
        Vmm::Qemu => {
            let q = Qemu::spawn(&qemu_config(&hosts.a, A_TAP, mib, cmdline)).expect("start QEMU");
            q.wait_ready(BOOT);
            Guest::Qemu(q)
        }
    };
    let mut params = json!({ "downtime-limit": DOWNTIME_LIMIT_MS });
    if vmm == Vmm::Qemu {
        // QEMU 7.2 limits migration to 128 MiB/s by default; Ferry does not.
        params["max-bandwidth"] = json!(1u64 << 40);
    }
    guest
        .exec("migrate-set-parameters", params)
        .expect("migrate-set-parameters");
    guest
}

/// A destination waiting on host B for `uri`.
fn destination(vmm: Vmm, hosts: &TwoHosts, mib: u32, cmdline: &str, uri: &str) -> Guest {
    match vmm {
        Vmm::Ferry => {
            let mut spec = VmSpec::incoming(uri);
            spec.nets = vec![format!("tap={B_TAP}")];
            spec.env = ferry_env();
            let vm = FerryVm::spawn("migbench-dst", &spec, Some(&hosts.b));
            Guest::Ferry { vm, qmp: None }
        }
        Vmm::Qemu => {
            let mut config = qemu_config(&hosts.b, B_TAP, mib, cmdline);
            config.extra = vec!["-incoming".into(), uri.into()];
            Guest::Qemu(Qemu::spawn(&config).expect("start QEMU destination"))
        }
    }
}

/// UDP echo requests every [`ECHO_EVERY`] from both hosts to the guest;
/// the times the answers arrived.
struct EchoStream {
    stop: Arc<AtomicBool>,
    replies: Arc<Mutex<Vec<(Instant, char)>>>,
    threads: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl EchoStream {
    fn start(hosts: &TwoHosts) -> EchoStream {
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for (ns, side) in [(&hosts.a, 'A'), (&hosts.b, 'B')] {
            let (stop, replies) = (stop.clone(), replies.clone());
            let sock = ns
                .enter(|| UdpSocket::bind(format!("{HOST_IP}:0")))
                .expect("netns")
                .expect("bind the echo socket");
            let receiver = sock.try_clone().expect("clone the echo socket");
            let stop_rx = stop.clone();
            // Answers, on a thread of their own: a receive timeout is
            // rounded to the kernel's tick, a sleep is not.
            threads.push(std::thread::spawn(move || -> std::io::Result<()> {
                receiver.set_read_timeout(Some(Duration::from_millis(20)))?;
                let mut buf = [0u8; 64];
                while !stop_rx.load(Ordering::Relaxed) {
                    if let Ok((8, _)) = receiver.recv_from(&mut buf) {
                        let at = Instant::now();
                        replies
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((at, side));
                    }
                }
                Ok(())
            }));
            threads.push(std::thread::spawn(move || -> std::io::Result<()> {
                let to = format!("{GUEST_ADDR}:7");
                let mut next = Instant::now();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Errors (no carrier on B's TAP before the guest
                    // arrives) are expected: the datagram is lost.
                    let _ = sock.send_to(&seq.to_le_bytes(), &to);
                    seq += 1;
                    next += ECHO_EVERY;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
                Ok(())
            }));
        }
        EchoStream {
            stop,
            replies,
            threads,
        }
    }

    fn replies(&self) -> Vec<(Instant, char)> {
        self.replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits up to `timeout` for an answer from host B after `after`.
    fn wait_b(&self, after: Instant, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .replies()
                .iter()
                .any(|&(t, side)| side == 'B' && t > after)
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    fn stop(self) -> Vec<(Instant, char)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let mut r = self
            .replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        r.sort();
        r
    }
}

/// The silence across the move: from the last answer on host A before
/// the first answer on host B after `from`, to that first answer.
fn switch_gap(replies: &[(Instant, char)], from: Instant) -> Option<Duration> {
    let first_b = replies
        .iter()
        .filter(|&&(t, side)| side == 'B' && t > from)
        .map(|&(t, _)| t)
        .min()?;
    let last_a = replies
        .iter()
        .filter(|&&(t, side)| side == 'A' && t < first_b)
        .map(|&(t, _)| t)
        .max()?;
    Some(first_b - last_a)
}

/// Longest gap between consecutive answers whose later one is in
/// (from, to].
fn longest_gap(replies: &[(Instant, char)], from: Instant, to: Instant) -> Option<Duration> {
    replies
        .windows(2)
        .filter(|w| w[1].0 > from && w[1].0 <= to)
        .map(|w| w[1].0 - w[0].0)
        .max()
}

/// One migration's figures.
#[derive(Clone, Debug, Default)]
struct Migration {
    completed: bool,
    /// `failed`, `cancelled after 30 s`, ...
    outcome: String,
    total_ms: f64,
    downtime_ms: f64,
    transferred: f64,
    passes: f64,
    /// Longest echo silence during the migration.
    echo_gap_ms: f64,
    /// Longest echo silence in the second before it.
    echo_floor_ms: f64,
    /// Page writes per second of the guest's dirtier during the migration
    /// (each a word in a page; unthrottled, the same pages again and
    /// again).
    writes_per_s: f64,
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Migrates a guest with `cmdline` of `mib` MiB from A to B.
fn live(env: &mut Env, vmm: Vmm, mib: u32, cmdline: &str, bound: Option<Duration>) -> Migration {
    let port = env.next_port();
    let uri = format!("tcp:{B_ADDR}:{port}");
    let hosts = &env.hosts;
    let mut src = source(vmm, hosts, mib, cmdline);
    let mut dst = destination(vmm, hosts, mib, cmdline, &uri);
    let echo = EchoStream::start(hosts);
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

/// What a snapshot save measured.
#[derive(Clone, Debug, Default)]
struct Save {
    total_ms: f64,
    downtime_ms: f64,
    file_bytes: f64,
}

/// What a restore measured, from the spawn of the process.
#[derive(Clone, Debug, Default)]
struct Restore {
    running_ms: f64,
    heartbeat_ms: f64,
}

fn save(env: &mut Env, vmm: Vmm, mib: u32, file: &Path) -> Save {
    let _ = std::fs::remove_file(file);
    let cmd = cmdline(SNAPSHOT_HEARTBEAT_MS, None);
    let mut src = source(vmm, &env.hosts, mib, &cmd);
    std::thread::sleep(Duration::from_millis(500));
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
    Save {
        total_ms: num(&info["total-time"]),
        downtime_ms: num(&info["downtime"]),
        file_bytes: std::fs::metadata(file).map_or(f64::NAN, |m| m.len() as f64),
    }
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

fn restore(env: &Env, vmm: Vmm, mib: u32, file: &Path) -> Restore {
    let dir = std::env::temp_dir().join(format!("ferry-migbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let qmp = dir.join(format!("{}-restore.sock", vmm.name()));
    let _ = std::fs::remove_file(&qmp);
    let ns = &env.hosts.b;
    let cmd = match vmm {
        Vmm::Ferry => {
            let mut c = ns.command(ferry_bin().to_str().expect("utf-8 path"));
            c.args(["run", "--incoming"])
                .arg(format!("file:{}", file.display()))
                .args(["--net", &format!("tap={B_TAP}")])
                .arg("--qmp")
                .arg(format!("unix:{}", qmp.display()));
            c
        }
        Vmm::Qemu => {
            let mut c = ns.command("qemu-system-x86_64");
            c.args(["-M", "microvm,acpi=off,ioapic2=off", "-enable-kvm", "-m"])
                .arg(mib.to_string())
                .args([
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-serial",
                    "stdio",
                    "-global",
                    "virtio-mmio.force-legacy=false",
                    "-kernel",
                ])
                .arg(probe_elf())
                .arg("-append")
                .arg(cmdline(SNAPSHOT_HEARTBEAT_MS, None))
                .arg("-netdev")
                .arg(format!("tap,id=n0,ifname={B_TAP},script=no,downscript=no"))
                .arg("-device")
                .arg(format!("virtio-net-device,netdev=n0,mac={GUEST_MAC}"))
                .arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", qmp.display()))
                .arg("-incoming")
                .arg(format!("exec:cat {}", file.display()));
            c
        }
    };
    let r = time_restore(cmd, &qmp, vmm.name());
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// The 1-minute load average: this machine is shared, the figures say
/// under what load they were taken.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn med<T>(results: &[(Vmm, T)], vmm: Vmm, f: impl Fn(&T) -> f64) -> f64 {
    median(
        results
            .iter()
            .filter(|(v, _)| *v == vmm)
            .map(|(_, r)| f(r))
            .filter(|x| !x.is_nan())
            .collect(),
    )
}

fn fmt(v: f64, unit: &str) -> String {
    if v.is_nan() {
        return "-".into();
    }
    match unit {
        "ms" if v < 10.0 => format!("{v:.1} ms"),
        "ms" => format!("{v:.0} ms"),
        "B" if v >= 1e9 => format!("{:.2} GB", v / 1e9),
        "B" if v >= 1e6 => format!("{:.1} MB", v / 1e6),
        "B" => format!("{:.0} kB", v / 1e3),
        "count" if v >= 1e6 => format!("{:.1} M", v / 1e6),
        "count" if v >= 1e3 => format!("{:.1} k", v / 1e3),
        _ => format!("{v:.0}"),
    }
}

fn ratio(f: f64, q: f64) -> String {
    let r = f / q;
    if r.is_finite() {
        format!("{r:.2}")
    } else {
        "-".into()
    }
}

fn size_label(mib: u32) -> String {
    if mib >= 1024 {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

fn idle(env: &mut Env, sizes: &[u32]) {
    let mut table = Vec::new();
    for &mib in sizes {
        let mut results: Vec<(Vmm, Migration)> = Vec::new();
        for run in 0..env.runs {
            for vmm in env.order(run) {
                let m = live(env, vmm, mib, &cmdline(0, None), None);
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

fn dirty(env: &mut Env) {
    let mib = 1024;
    let loads: &[(&str, &str, &str)] = &[
        ("50M", "256M", "50 MB/s over 256 MiB"),
        ("max", "256M", "unthrottled over 256 MiB"),
        ("max", "768M", "unthrottled over 768 MiB"),
    ];
    let picked = std::env::var("FERRY_BENCH_DIRTY").ok();
    let mut table = Vec::new();
    for &(rate, size, label) in loads.iter().filter(|(rate, size, _)| {
        picked
            .as_deref()
            .is_none_or(|p| p.split(',').any(|k| k.trim() == format!("{rate}/{size}")))
    }) {
        let mut results: Vec<(Vmm, Migration)> = Vec::new();
        for run in 0..env.runs {
            for vmm in env.order(run) {
                let bound = (vmm == Vmm::Qemu).then_some(QEMU_BOUND);
                let m = live(env, vmm, mib, &cmdline(0, Some((rate, size))), bound);
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

fn snapshot(env: &mut Env) {
    let mib = 1024;
    let dir = std::env::temp_dir();
    let mut saves: Vec<(Vmm, Save)> = Vec::new();
    let mut restores: Vec<(Vmm, Restore)> = Vec::new();
    for run in 0..env.runs {
        for vmm in env.order(run) {
            let file: PathBuf = dir.join(format!(
                "ferry-migbench-{}-{}.img",
                std::process::id(),
                vmm.name()
            ));
            let s = save(env, vmm, mib, &file);
            let r = restore(env, vmm, mib, &file);
            if env.verbose {
                eprintln!("[snapshot {}] {s:?} {r:?}", vmm.name());
            }
            let _ = std::fs::remove_file(&file);
            saves.push((vmm, s));
            restores.push((vmm, r));
        }
    }
    println!();
    println!(
        "Snapshot of an idle 1 GiB guest and restore into a new process on host B; medians of {} \
         runs. Ferry: migrate file: / run --incoming file:. QEMU: migrate exec:cat > FILE / \
         -incoming exec:cat FILE. Restore times from the spawn of the process (file in the page \
         cache); first heartbeat: the guest beats every {SNAPSHOT_HEARTBEAT_MS} ms.",
        env.runs
    );
    println!();
    println!("| VMM | save: total time | save: guest stopped | file size | restore: to QMP running | restore: to first heartbeat |");
    println!("|---|---:|---:|---:|---:|---:|");
    for vmm in &env.vmms {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            vmm.name(),
            fmt(med(&saves, *vmm, |s| s.total_ms), "ms"),
            fmt(med(&saves, *vmm, |s| s.downtime_ms), "ms"),
            fmt(med(&saves, *vmm, |s| s.file_bytes), "B"),
            fmt(med(&restores, *vmm, |r| r.running_ms), "ms"),
            fmt(med(&restores, *vmm, |r| r.heartbeat_ms), "ms"),
        );
    }
    if env.vmms.len() == 2 {
        let rs = |f: fn(&Save) -> f64| ratio(med(&saves, Vmm::Ferry, f), med(&saves, Vmm::Qemu, f));
        let rr = |f: fn(&Restore) -> f64| {
            ratio(med(&restores, Vmm::Ferry, f), med(&restores, Vmm::Qemu, f))
        };
        println!(
            "| Ferry/QEMU | {} | {} | {} | {} | {} |",
            rs(|s| s.total_ms),
            rs(|s| s.downtime_ms),
            rs(|s| s.file_bytes),
            rr(|r| r.running_ms),
            rr(|r| r.heartbeat_ms),
        );
    }
}

/// Permanent neighbour entries for the guest on both hosts' TAPs, so the
/// echo stream needs no ARP on either side of the move.
fn pin_guest_neighbour(hosts: &TwoHosts) {
    for (ns, tap) in [(&hosts.a, A_TAP), (&hosts.b, B_TAP)] {
        ns.run(&[
            "ip",
            "neigh",
            "replace",
            GUEST_ADDR,
            "lladdr",
            GUEST_MAC,
            "dev",
            tap,
            "nud",
            "permanent",
        ])
        .expect("neighbour entry");
    }
}

/// The echo stream against a guest that stays put (FERRY_BENCH_PARTS=echo):
/// how long its silences are when nothing migrates.
fn echo_floor(env: &mut Env) {
    println!();
    println!("Echo stream, 3 s, no migration: gaps between answers.");
    println!();
    println!("| VMM | probe idle | answers | lost | p50 | p99 | max |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for vmm in env.vmms.clone() {
        for idle in ["auto", "spin"] {
            let cmd = format!("{} probe.idle={idle}", cmdline(0, None));
            let src = source(vmm, &env.hosts, 256, &cmd);
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

fn main() {
    let name = "migration";
    if require_kvm(name).is_none()
        || !require_root(name)
        || !require_tool(name, "qemu-system-x86_64")
        || !require_tool(name, "ip")
    {
        return;
    }
    let only = std::env::var("FERRY_BENCH_ONLY").ok();
    let parts = std::env::var("FERRY_BENCH_PARTS").unwrap_or_else(|_| "idle,dirty,snapshot".into());
    let sizes: Vec<u32> = std::env::var("FERRY_BENCH_SIZES")
        .unwrap_or_else(|_| "256,1024,4096".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let _ = probe_elf();
    let _ = ferry_bin();
    let hosts = TwoHosts::new("migbench");
    pin_guest_neighbour(&hosts);
    let mut env = Env {
        runs: env_or("FERRY_BENCH_RUNS", 3).max(1),
        verbose: verbose(),
        vmms: [Vmm::Ferry, Vmm::Qemu]
            .into_iter()
            .filter(|v| only.as_deref().is_none_or(|o| o == v.name()))
            .collect(),
        hosts,
        port: 4400,
    };
    let kind = match require_kvm(name) {
        Some(k) => format!("{k:?}"),
        None => "?".into(),
    };
    let started = Instant::now();
    println!();
    println!(
        "Migration, probe guest, Ferry vs QEMU 7.2 microvm; KVM {kind}, {} CPUs, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    for part in parts.split(',') {
        match part.trim() {
            "idle" => idle(&mut env, &sizes),
            "dirty" => dirty(&mut env),
            "snapshot" => snapshot(&mut env),
            "echo" => echo_floor(&mut env),
            other => eprintln!("unknown part {other:?} (idle, dirty, snapshot)"),
        }
    }
    println!();
    println!(
        "({:.0} s in all; load average {} at the end)",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
}
