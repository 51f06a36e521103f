//! The probe guest from the test side: building its ELF, composing its
//! command line, driving its serial console, and booting it under QEMU.
//!
//! The [`Console`] wraps any byte stream pair (a child's stdin/stdout, a
//! socket, a pty), so the same driver serves guests run by QEMU and by Ferry.
//! Protocol: docs/probe.md.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Builds the probe (once per test process) and returns the ELF's path.
///
/// The build runs `cargo build --release` in resources/probe with its own
/// target directory, so it never waits on the lock of the cargo that runs
/// the tests, and without the CARGO_*/RUSTFLAGS variables that cargo sets
/// for us (they would leak our profile and flags into the probe's build).
pub fn probe_elf() -> PathBuf {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| match build_probe() {
        Ok(path) => path,
        Err(e) => panic!("building the probe guest failed:\n{e}"),
    })
    .clone()
}

fn build_probe() -> Result<PathBuf, String> {
    let dir = crate::host::workspace_root().join("resources/probe");
    let target_dir = crate::host::workspace_root().join("target/probe");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--quiet", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&dir)
        .stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key == "RUSTFLAGS"
            || key == "RUSTC_WRAPPER"
            || key == "RUSTC_WORKSPACE_WRAPPER"
            || key == "RUSTDOCFLAGS"
        {
            cmd.env_remove(&key);
        }
    }
    let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let elf = target_dir.join("x86_64-unknown-linux-gnu/release/ferry-probe");
    if !elf.exists() {
        return Err(format!("{} missing after the build", elf.display()));
    }
    Ok(elf)
}

/// One identity: `mac` None = the device's own MAC; `vlan` None = untagged.
#[derive(Clone, Debug)]
pub struct IdentityArg {
    pub nic: usize,
    pub mac: Option<String>,
    pub vlan: Option<u16>,
    pub cidr: String,
}

/// The probe's command line, built up field by field.
#[derive(Clone, Debug, Default)]
pub struct Cmdline {
    pub devices: Vec<String>,
    pub ids: Vec<IdentityArg>,
    pub announce: Option<bool>,
    pub heartbeat_ms: Option<u64>,
    pub dirty: Option<(String, String)>,
    pub pattern: Option<(u64, String)>,
    pub idle: Option<String>,
    pub extra: Vec<String>,
}

impl Cmdline {
    pub fn new() -> Cmdline {
        Cmdline::default()
    }

    /// A virtio-mmio device, `SIZE@ADDR:IRQ` (the n-th one is NIC n).
    pub fn device(mut self, size: &str, addr: u64, irq: u32) -> Self {
        self.devices
            .push(format!("virtio_mmio.device={size}@{addr:#x}:{irq}"));
        self
    }

    pub fn identity(
        mut self,
        nic: usize,
        mac: Option<&str>,
        vlan: Option<u16>,
        cidr: &str,
    ) -> Self {
        self.ids.push(IdentityArg {
            nic,
            mac: mac.map(str::to_string),
            vlan,
            cidr: cidr.to_string(),
        });
        self
    }

    pub fn announce(mut self, on: bool) -> Self {
        self.announce = Some(on);
        self
    }

    pub fn heartbeat_ms(mut self, ms: u64) -> Self {
        self.heartbeat_ms = Some(ms);
        self
    }

    /// Dirty `size` at `rate` bytes/s (`"max"` = unthrottled), e.g. "64M".
    pub fn dirty(mut self, rate: &str, size: &str) -> Self {
        self.dirty = Some((rate.to_string(), size.to_string()));
        self
    }

    pub fn pattern(mut self, seed: u64, size: &str) -> Self {
        self.pattern = Some((seed, size.to_string()));
        self
    }

    /// `auto`, `spin` or `halt`.
    pub fn idle(mut self, mode: &str) -> Self {
        self.idle = Some(mode.to_string());
        self
    }

    pub fn extra(mut self, token: &str) -> Self {
        self.extra.push(token.to_string());
        self
    }

    pub fn build(&self) -> String {
        let mut parts = self.devices.clone();
        for id in &self.ids {
            parts.push(format!(
                "probe.id={},{},{},{}",
                id.nic,
                id.mac.as_deref().unwrap_or("dev"),
                id.vlan.map_or("none".to_string(), |v| v.to_string()),
                id.cidr
            ));
        }
        if let Some(on) = self.announce {
            parts.push(format!("probe.announce={}", if on { "on" } else { "off" }));
        }
        if let Some(ms) = self.heartbeat_ms {
            parts.push(format!("probe.heartbeat={ms}"));
        }
        if let Some((rate, size)) = &self.dirty {
            parts.push(format!("probe.dirty={rate},{size}"));
        }
        if let Some((seed, size)) = &self.pattern {
            parts.push(format!("probe.pattern={seed},{size}"));
        }
        if let Some(mode) = &self.idle {
            parts.push(format!("probe.idle={mode}"));
        }
        parts.extend(self.extra.iter().cloned());
        parts.join(" ")
    }
}

/// The `key=value` fields of a console line.
pub fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The reply to one console command.
#[derive(Debug, Clone)]
pub struct Reply {
    pub command: String,
    /// Data lines, without the `=TAG NAME ` prefix.
    pub lines: Vec<String>,
    /// None for `ok`, the reason for `err`.
    pub error: Option<String>,
}

impl Reply {
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }

    /// The value of `key` in the first data line that has it.
    pub fn field(&self, key: &str) -> Option<String> {
        self.lines.iter().find_map(|l| fields(l).remove(key))
    }

    /// Like [`Reply::field`], parsed as a number (decimal or 0x-hex).
    pub fn number(&self, key: &str) -> Option<u64> {
        let v = self.field(key)?;
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
    }
}

#[derive(Default)]
struct ConsoleState {
    lines: Vec<String>,
    partial: Vec<u8>,
    closed: bool,
}

/// A guest's serial console: lines read on a background thread, commands
/// written to its input.
pub struct Console {
    name: String,
    state: Arc<(Mutex<ConsoleState>, Condvar)>,
    input: Mutex<Box<dyn Write + Send>>,
    /// Lines before this index have been consumed by `expect`.
    cursor: Mutex<usize>,
    next_tag: AtomicU64,
}

/// Lines of context in failure messages.
const RECENT_LINES: usize = 40;

impl Console {
    /// Reads `output` until EOF on its own thread; writes commands to
    /// `input`. Set FERRY_TEST_CONSOLE=1 to echo the guest's lines to stderr.
    pub fn new(
        name: &str,
        output: impl Read + Send + 'static,
        input: impl Write + Send + 'static,
    ) -> Console {
        let state = Arc::new((Mutex::new(ConsoleState::default()), Condvar::new()));
        let reader_state = Arc::clone(&state);
        let echo = std::env::var("FERRY_TEST_CONSOLE").is_ok_and(|v| v == "1");
        let label = name.to_string();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(output);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let n = reader.read_until(b'\n', &mut buf).unwrap_or(0);
                let (lock, cond) = &*reader_state;
                let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
                if n == 0 {
                    if !st.partial.is_empty() {
                        let last = String::from_utf8_lossy(&st.partial).into_owned();
                        st.partial.clear();
                        st.lines.push(last);
                    }
                    st.closed = true;
                    cond.notify_all();
                    return;
                }
                st.partial.extend_from_slice(&buf);
                if st.partial.ends_with(b"\n") {
                    let text = String::from_utf8_lossy(&st.partial);
                    let line = text.trim_end_matches(['\r', '\n']).to_string();
                    st.partial.clear();
                    if echo {
                        eprintln!("[{label}] {line}");
                    }
                    st.lines.push(line);
                    cond.notify_all();
                }
            }
        });
        Console {
            name: name.to_string(),
            state,
            input: Mutex::new(Box::new(input)),
            cursor: Mutex::new(0),
            next_tag: AtomicU64::new(1),
        }
    }

    /// Takes a child's stdout and stdin (both must be piped).
    pub fn from_child(name: &str, child: &mut Child) -> io::Result<Console> {
        let out = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("child stdout not piped"))?;
        let inp = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("child stdin not piped"))?;
        Ok(Console::new(name, out, inp))
    }

    /// Everything the guest printed so far.
    pub fn output(&self) -> String {
        let (lock, _) = &*self.state;
        lock.lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
            .join("\n")
    }

    /// All lines so far.
    pub fn lines(&self) -> Vec<String> {
        let (lock, _) = &*self.state;
        lock.lock().unwrap_or_else(|p| p.into_inner()).lines.clone()
    }

    fn recent(&self, st: &ConsoleState) -> String {
        let from = st.lines.len().saturating_sub(RECENT_LINES);
        let mut text = st.lines[from..].join("\n");
        if !st.partial.is_empty() {
            text.push('\n');
            text.push_str(&String::from_utf8_lossy(&st.partial));
        }
        text
    }

    /// Waits for a line after the cursor that `matches`, moves the cursor
    /// past it and returns it; on timeout or EOF, an error that quotes the
    /// recent console output.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut matches: impl FnMut(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.state;
        let mut cursor = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            while *cursor < st.lines.len() {
                let line = &st.lines[*cursor];
                *cursor += 1;
                if matches(line) {
                    return Ok(line.clone());
                }
            }
            let why = if st.closed {
                "the console closed (guest gone)"
            } else if Instant::now() >= deadline {
                "timed out"
            } else {
                let left = deadline.saturating_duration_since(Instant::now());
                st = cond
                    .wait_timeout(st, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            };
            return Err(format!(
                "[{}] waiting {:?} for {}: {}; recent console output:\n{}",
                self.name,
                timeout,
                what,
                why,
                self.recent(&st)
            ));
        }
    }

    /// Waits for a line containing `pattern`; panics with the recent
    /// console output if it does not come.
    pub fn expect(&self, pattern: &str, timeout: Duration) -> String {
        match self.wait_for(&format!("{pattern:?}"), timeout, |l| l.contains(pattern)) {
            Ok(line) => line,
            Err(e) => panic!("{e}"),
        }
    }

    /// The first line printed so far that contains `pattern` (whatever
    /// `expect` has consumed): for lines from before a wait.
    pub fn seen(&self, pattern: &str) -> Option<String> {
        let (lock, _) = &*self.state;
        let st = lock.lock().unwrap_or_else(|p| p.into_inner());
        st.lines.iter().find(|l| l.contains(pattern)).cloned()
    }

    /// Like [`Console::seen`], but panics with the console output if absent.
    pub fn expect_seen(&self, pattern: &str) -> String {
        self.seen(pattern).unwrap_or_else(|| {
            panic!(
                "[{}] no line with {pattern:?} in:\n{}",
                self.name,
                self.output()
            )
        })
    }

    /// Sends raw text to the guest's console input.
    pub fn send_raw(&self, text: &str) -> io::Result<()> {
        let mut input = self.input.lock().unwrap_or_else(|p| p.into_inner());
        input.write_all(text.as_bytes())?;
        input.flush()
    }

    /// Sends `command` with a fresh tag and returns its parsed reply (an
    /// `err` reply is a Reply too; only a missing reply is an Err).
    pub fn try_command(&self, command: &str, timeout: Duration) -> Result<Reply, String> {
        let tag = format!("t{}", self.next_tag.fetch_add(1, Ordering::Relaxed));
        self.send_raw(&format!("@{tag} {command}\n"))
            .map_err(|e| format!("[{}] writing command {command:?}: {e}", self.name))?;
        let prefix = format!("={tag} ");
        let mut lines = Vec::new();
        loop {
            let line = self.wait_for(&format!("the reply to {command:?}"), timeout, |l| {
                l.starts_with(&prefix)
            })?;
            let rest = &line[prefix.len()..];
            let (cmd, body) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = cmd.to_string();
            if body == "ok" {
                return Ok(Reply {
                    command: name,
                    lines,
                    error: None,
                });
            }
            if let Some(reason) = body.strip_prefix("err") {
                return Ok(Reply {
                    command: name,
                    lines,
                    error: Some(reason.trim().to_string()),
                });
            }
            lines.push(body.to_string());
        }
    }

    /// Like [`Console::try_command`], but panics unless the reply is `ok`.
    pub fn send_command(&self, command: &str, timeout: Duration) -> Reply {
        match self.try_command(command, timeout) {
            Ok(reply) if reply.is_ok() => reply,
            Ok(reply) => panic!(
                "[{}] {command:?} failed: {}; reply lines: {:?}",
                self.name,
                reply.error.unwrap_or_default(),
                reply.lines
            ),
            Err(e) => panic!("{e}"),
        }
    }
}

/// The probe's ready line, and the line it prints first.
pub const READY: &str = "probe: ready ";
pub const BOOT: &str = "probe: boot ferry-probe";

/// A virtio-net device for [`Qemu`]: on TAP `tap`, with `mac` if given.
#[derive(Clone, Debug)]
pub struct QemuNic {
    pub tap: String,
    pub mac: Option<String>,
}

/// How to boot the probe under QEMU (`-M microvm`, modern virtio-mmio).
#[derive(Clone, Debug)]
pub struct QemuConfig {
    pub memory_mib: u32,
    pub nics: Vec<QemuNic>,
    /// The probe's command line. microvm adds `virtio_mmio.device=` for
    /// each NIC itself (with acpi=off), so this holds the rest.
    pub cmdline: String,
    /// Run QEMU inside this namespace (where the TAPs are).
    pub netns: Option<String>,
    pub qmp: bool,
    /// `-global virtio-mmio.force-legacy=` value (tests of the refusal).
    pub force_legacy: bool,
}

impl QemuConfig {
    pub fn new(cmdline: &str) -> QemuConfig {
        QemuConfig {
            memory_mib: 128,
            nics: Vec::new(),
            cmdline: cmdline.to_string(),
            netns: None,
            qmp: false,
            force_legacy: false,
        }
    }
}

/// A probe guest running under QEMU. Killed on drop.
pub struct Qemu {
    child: Child,
    pub console: Console,
    dir: PathBuf,
    qmp: Option<Mutex<QmpClient>>,
}

static QEMU_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Qemu {
    pub fn spawn(config: &QemuConfig) -> io::Result<Qemu> {
        let elf = probe_elf();
        let dir = std::env::temp_dir().join(format!(
            "ferry-probe-qemu-{}-{}",
            std::process::id(),
            QEMU_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let mut cmd = match &config.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        // acpi=off keeps the virtio-mmio IRQs on the one IOAPIC at
        // 0xFEC00000 (ioapic2 would put them at GSI 24+ on a second one)
        // and makes microvm list the devices on the command line.
        cmd.args(["-M", "microvm,acpi=off,ioapic2=off", "-enable-kvm", "-m"])
            .arg(config.memory_mib.to_string())
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
            ])
            .args(["-global"])
            .arg(format!("virtio-mmio.force-legacy={}", config.force_legacy))
            .arg("-kernel")
            .arg(&elf)
            .arg("-append")
            .arg(&config.cmdline);
        for (i, nic) in config.nics.iter().enumerate() {
            cmd.arg("-netdev").arg(format!(
                "tap,id=n{i},ifname={},script=no,downscript=no",
                nic.tap
            ));
            let mut dev = format!("virtio-net-device,netdev=n{i}");
            if let Some(mac) = &nic.mac {
                dev.push_str(&format!(",mac={mac}"));
            }
            cmd.arg("-device").arg(dev);
        }
        let qmp_path = dir.join("qmp.sock");
        if config.qmp {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn()?;
        let console = Console::from_child("qemu", &mut child)?;
        let qmp = if config.qmp {
            match QmpClient::connect(&qmp_path, Duration::from_secs(10)) {
                Ok(c) => Some(Mutex::new(c)),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
            }
        } else {
            None
        };
        Ok(Qemu {
            child,
            console,
            dir,
            qmp,
        })
    }

    /// Waits for the ready line and returns it.
    pub fn wait_ready(&self, timeout: Duration) -> String {
        self.console.expect(READY, timeout)
    }

    /// Runs a QMP command; returns its `return` value or the error object.
    pub fn qmp(
        &self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let qmp = self.qmp.as_ref().ok_or("QEMU started without QMP")?;
        let mut client = qmp.lock().unwrap_or_else(|p| p.into_inner());
        client.execute(command, arguments)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A minimal QMP client (greeting, capabilities, execute).
pub struct QmpClient {
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl QmpClient {
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<QmpClient> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut client = QmpClient {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        client.read_message()?; // greeting
        client
            .execute("qmp_capabilities", serde_json::json!({}))
            .map_err(io::Error::other)?;
        Ok(client)
    }

    fn read_message(&mut self) -> io::Result<serde_json::Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::other("QMP connection closed"));
        }
        serde_json::from_str(&line).map_err(io::Error::other)
    }

    pub fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let request = serde_json::json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{request}").map_err(|e| e.to_string())?;
        loop {
            let msg = self.read_message().map_err(|e| e.to_string())?;
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                return Err(err.to_string());
            }
            // Asynchronous events are skipped.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_composition() {
        let line = Cmdline::new()
            .device("512", 0xfeb0_0e00, 12)
            .identity(0, None, None, "198.18.0.2/24")
            .identity(0, Some("02:00:00:00:00:64"), Some(100), "198.18.100.2/24")
            .announce(false)
            .heartbeat_ms(100)
            .pattern(7, "16M")
            .build();
        assert_eq!(
            line,
            "virtio_mmio.device=512@0xfeb00e00:12 probe.id=0,dev,none,198.18.0.2/24 \
             probe.id=0,02:00:00:00:00:64,100,198.18.100.2/24 probe.announce=off \
             probe.heartbeat=100 probe.pattern=7,16M"
        );
    }

    #[test]
    fn console_replies_are_parsed() {
        // A fake guest: answers the first tagged command from a script.
        let (guest_out, host_in) = std::os::unix::net::UnixStream::pair().unwrap();
        let (host_out, mut guest_in) = std::os::unix::net::UnixStream::pair().unwrap();
        let console = Console::new("fake", host_in, host_out);
        let mut writer = guest_out.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut line = String::new();
            BufReader::new(&mut guest_in).read_line(&mut line).unwrap();
            let tag = line
                .split_whitespace()
                .next()
                .unwrap()
                .trim_start_matches('@')
                .to_string();
            write!(
                writer,
                "probe: heartbeat n=1 uptime_ms=5\n={tag} counters nic=0 rx_frames=3 irqs=0x10\n={tag} counters ok\n"
            )
            .unwrap();
        });
        let reply = console.send_command("counters", Duration::from_secs(5));
        assert_eq!(reply.command, "counters");
        assert_eq!(reply.number("rx_frames"), Some(3));
        assert_eq!(reply.number("irqs"), Some(16));
        assert!(console.output().contains("heartbeat n=1"));
        let err = console
            .wait_for("nothing", Duration::from_millis(50), |_| false)
            .unwrap_err();
        assert!(
            err.contains("recent console output") && err.contains("counters ok"),
            "{err}"
        );
    }
}
