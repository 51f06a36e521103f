//! A guest's serial console seen through the VMM process's stdout: a
//! background thread collects everything, tests wait for what they expect
//! with a deadline, and a failure shows the tail of what the guest said.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Shared {
    output: Vec<u8>,
    closed: bool,
}

/// A running VMM process whose stdout is the guest console.
pub struct Console {
    child: Child,
    stdin: Option<ChildStdin>,
    shared: Arc<(Mutex<Shared>, Condvar)>,
    stderr: Arc<Mutex<Vec<u8>>>,
    name: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Console {
    /// Spawns `cmd` with piped stdin/stdout/stderr. `name` labels failures.
    pub fn spawn(name: &str, mut cmd: Command) -> Console {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: spawn {cmd:?}: {e}"));
        let shared = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(mut out) = child.stdout.take() {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    let n = out.read(&mut buf).unwrap_or(0);
                    let (m, cv) = &*shared;
                    let mut s = lock(m);
                    if n == 0 {
                        s.closed = true;
                        cv.notify_all();
                        break;
                    }
                    s.output.extend_from_slice(&buf[..n]);
                    cv.notify_all();
                }
            });
        }
        if let Some(mut err) = child.stderr.take() {
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    lock(&stderr).extend_from_slice(&buf[..n]);
                }
            });
        }
        let stdin = child.stdin.take();
        Console {
            child,
            stdin,
            shared,
            stderr,
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the console printed so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&lock(&self.shared.0).output).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&lock(&self.stderr)).into_owned()
    }

    fn failure(&self, what: &str) -> String {
        let out = self.output();
        let tail: String = out
            .chars()
            .rev()
            .take(3000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!(
            "{}: {what}\n--- console (last 3000 chars) ---\n{tail}\n--- stderr ---\n{}",
            self.name,
            self.stderr()
        )
    }

    /// Waits until the output from byte `from` on contains `needle`;
    /// returns the offset just past it. Panics after `timeout`.
    pub fn expect_from(&self, from: usize, needle: &str, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.shared;
        let mut s = lock(m);
        loop {
            let hay = s.output.get(from..).unwrap_or(&[]);
            if let Some(pos) = find(hay, needle.as_bytes()) {
                return from + pos + needle.len();
            }
            let now = Instant::now();
            if s.closed || now >= deadline {
                let why = if s.closed {
                    "console closed"
                } else {
                    "timed out"
                };
                drop(s);
                panic!(
                    "{}",
                    self.failure(&format!("{why} waiting {timeout:?} for {needle:?}"))
                );
            }
            s = cv
                .wait_timeout(s, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Waits for `needle` anywhere in the output and returns the whole
    /// line it is on.
    pub fn expect_line(&self, needle: &str, timeout: Duration) -> String {
        let end = self.expect_from(0, needle, timeout);
        let out = self.output();
        let start = out[..end].rfind('\n').map_or(0, |i| i + 1);
        let stop = out[end..].find('\n').map_or(out.len(), |i| end + i);
        out[start..stop].trim_end_matches('\r').to_string()
    }

    /// Writes to the guest's console input.
    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(text.as_bytes()).expect("write to console");
        stdin.flush().expect("flush console");
    }

    /// Sends SIGTERM and waits for the process to end.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait(timeout)
    }

    /// Waits for the process to end by itself.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{}",
                    self.failure(&format!("process did not exit within {timeout:?}"))
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}
