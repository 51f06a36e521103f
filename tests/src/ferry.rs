//! Running the `ferry` binary from tests and benchmarks.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `ferry` binary of this workspace, built (once per test process) in
/// the profile the tests themselves were built in.
pub fn ferry_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/<test> or target/<profile>/<bench>
        let profile_dir = exe
            .ancestors()
            .find(|p| p.parent().and_then(|d| d.file_name()) == Some("target".as_ref()))
            .expect("test binary under target/")
            .to_path_buf();
        let profile = profile_dir
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or("debug")
            .to_string();
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "--quiet", "-p", "ferry"])
            .current_dir(crate::host::workspace_root());
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let status = cmd.status().expect("run cargo build -p ferry");
        assert!(status.success(), "cargo build -p ferry failed");
        let bin = profile_dir.join("ferry");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
    .clone()
}

/// A `ferry` command with stdin closed and output captured.
pub fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(ferry_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// What a finished process left behind.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `cmd` to completion, killing it after `timeout` (a test failure).
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Finished {
    let start = Instant::now();
    let child = cmd.spawn().expect("spawn");
    wait_with_timeout(child, timeout, start)
}

pub fn wait_with_timeout(mut child: Child, timeout: Duration, start: Instant) -> Finished {
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_t.join().unwrap_or_default();
            let stderr = err_t.join().unwrap_or_default();
            panic!("process did not finish within {timeout:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Finished {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// How to start a `ferry run` for a test.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub memory: String,
    pub cpus: u32,
    pub cmdline: String,
    /// `--net` specs.
    pub nets: Vec<String>,
    /// Open a QMP socket (in a temporary directory).
    pub qmp: bool,
    /// `-S`.
    pub paused: bool,
    pub extra: Vec<String>,
    /// Extra environment (e.g. FERRY_LOG=info).
    pub env: Vec<(String, String)>,
    /// `--incoming URI` instead of booting: kernel, memory, cpus and
    /// command line are then not passed.
    pub incoming: Option<String>,
    /// Spell it `-incoming`, as QEMU (and libvirt) do.
    pub qemu_spelling: bool,
}

impl VmSpec {
    /// The probe guest with `cmdline`, 256 MiB, one vCPU, QMP on.
    pub fn probe(cmdline: &str) -> VmSpec {
        VmSpec {
            kernel: crate::probe::probe_elf(),
            memory: "256M".into(),
            cpus: 1,
            cmdline: cmdline.to_string(),
            nets: Vec::new(),
            qmp: true,
            paused: false,
            extra: Vec::new(),
            env: Vec::new(),
            incoming: None,
            qemu_spelling: false,
        }
    }

    /// A destination: `ferry run --incoming URI`.
    pub fn incoming(uri: &str) -> VmSpec {
        VmSpec {
            incoming: Some(uri.to_string()),
            ..VmSpec::probe("")
        }
    }
}

/// A running `ferry run`: its console (stdin/stdout), its QMP socket, and
/// its stderr. Killed when dropped.
pub struct FerryVm {
    child: Child,
    pub console: crate::probe::Console,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    /// Joined once the process ended, so `stderr()` then holds all of it.
    stderr_reader: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
    qmp_path: Option<PathBuf>,
}

static VM_COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl FerryVm {
    /// Starts ferry, inside `netns` when given.
    pub fn spawn(name: &str, spec: &VmSpec, netns: Option<&crate::netns::Netns>) -> FerryVm {
        let n = VM_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ferry-vm-{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("vm temp dir");
        let bin = ferry_bin();
        let mut cmd = match netns {
            Some(ns) => ns.command(bin.to_str().expect("utf-8 path")),
            None => Command::new(&bin),
        };
        cmd.arg("run");
        match &spec.incoming {
            Some(uri) => {
                let option = if spec.qemu_spelling {
                    "-incoming"
                } else {
                    "--incoming"
                };
                cmd.args([option, uri]);
            }
            None => {
                cmd.arg("--kernel").arg(&spec.kernel).args([
                    "--memory",
                    &spec.memory,
                    "--cpus",
                    &spec.cpus.to_string(),
                    "--cmdline",
                    &spec.cmdline,
                ]);
            }
        }
        for net in &spec.nets {
            cmd.args(["--net", net]);
        }
        let qmp_path = spec.qmp.then(|| dir.join("qmp.sock"));
        if let Some(p) = &qmp_path {
            cmd.arg("--qmp").arg(format!("unix:{}", p.display()));
        }
        if spec.paused {
            cmd.arg("-S");
        }
        cmd.args(&spec.extra);
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ferry");
        let console = crate::probe::Console::from_child(name, &mut child).expect("console");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut stderr_reader = None;
        if let Some(mut err) = child.stderr.take() {
            let sink = stderr.clone();
            stderr_reader = Some(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend_from_slice(&buf[..n]);
                }
            }));
        }
        let vm = FerryVm {
            child,
            console,
            stderr,
            stderr_reader,
            dir,
            qmp_path,
        };
        if let Some(p) = &vm.qmp_path {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !p.exists() {
                if Instant::now() > deadline || vm.exited() {
                    panic!("{name}: QMP socket never appeared; stderr: {}", vm.stderr());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        vm
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    pub fn exited(&self) -> bool {
        // SAFETY: waitpid with WNOHANG on our own child would reap it;
        // kill(pid, 0) only probes for existence.
        unsafe { libc::kill(self.child.id() as i32, 0) != 0 }
    }

    pub fn qmp_path(&self) -> &std::path::Path {
        self.qmp_path.as_deref().expect("started without QMP")
    }

    /// A new, negotiated QMP connection.
    pub fn qmp(&self) -> qmp::client::QmpClient {
        // Bounded from the greeting on: a VM that accepts and never
        // answers fails the test with its stderr instead of hanging it.
        let timeout = Some(Duration::from_secs(20));
        match qmp::client::QmpClient::connect_with_timeout(self.qmp_path(), timeout) {
            Ok(c) => c,
            Err(e) => panic!("connect to QMP: {e:?}; the VM's stderr:\n{}", self.stderr()),
        }
    }

    /// Runs one QMP command on a fresh connection.
    pub fn execute(
        &self,
        command: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, qmp::client::ClientError> {
        let args = match args {
            serde_json::Value::Object(m) if !m.is_empty() => Some(m),
            _ => None,
        };
        self.qmp().execute(command, args)
    }

    /// Waits for ferry to exit by itself.
    /// The exit status, if the process has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// CPU time the thread named `comm` has spent in the kernel (for a
    /// vCPU thread: running, or emulating, the guest).
    pub fn thread_system_time(&self, comm: &str) -> Option<Duration> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid())).ok()?;
        let ticks = unsafe_clock_ticks();
        tasks.flatten().find_map(|t| {
            let name = std::fs::read_to_string(t.path().join("comm")).ok()?;
            if name.trim() != comm {
                return None;
            }
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            // Fields after the ")" of the name: state is the first, stime
            // the 13th (field 15 of proc(5)).
            let after = stat.rsplit_once(')')?.1;
            let stime: u64 = after.split_whitespace().nth(12)?.parse().ok()?;
            Some(Duration::from_secs_f64(stime as f64 / ticks))
        })
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                if let Some(reader) = self.stderr_reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "ferry did not exit within {timeout:?}; stderr: {}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for FerryVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn unsafe_clock_ticks() -> f64 {
    // SAFETY: sysconf has no side effects.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 {
        n as f64
    } else {
        100.0
    }
}
