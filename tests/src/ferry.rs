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
