//! A guest's serial console: lines read on a background thread, tagged
//! commands written to its input, replies parsed (docs/probe.md).

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

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
    /// When the first byte of each line arrived.
    times: Vec<SystemTime>,
    partial: Vec<u8>,
    partial_since: Option<SystemTime>,
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
            loop {
                // Whatever arrived, stamped: a line's time is that of the
                // read that brought its first byte.
                let chunk = reader.fill_buf().map(<[u8]>::to_vec).unwrap_or_default();
                reader.consume(chunk.len());
                let arrived = SystemTime::now();
                let (lock, cond) = &*reader_state;
                let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
                if chunk.is_empty() {
                    if !st.partial.is_empty() {
                        let last = String::from_utf8_lossy(&st.partial).into_owned();
                        st.partial.clear();
                        st.lines.push(last);
                        let since = st.partial_since.take().unwrap_or(arrived);
                        st.times.push(since);
                    }
                    st.closed = true;
                    cond.notify_all();
                    return;
                }
                for piece in chunk.split_inclusive(|&b| b == b'\n') {
                    if st.partial.is_empty() {
                        st.partial_since = Some(arrived);
                    }
                    st.partial.extend_from_slice(piece);
                    if st.partial.ends_with(b"\n") {
                        let text = String::from_utf8_lossy(&st.partial);
                        let line = text.trim_end_matches(['\r', '\n']).to_string();
                        st.partial.clear();
                        if echo {
                            eprintln!("[{label}] {line}");
                        }
                        st.lines.push(line);
                        let since = st.partial_since.take().unwrap_or(arrived);
                        st.times.push(since);
                        cond.notify_all();
                    }
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

    /// All lines so far, each with the time its first byte was read.
    pub fn timed_lines(&self) -> Vec<(SystemTime, String)> {
        let (lock, _) = &*self.state;
        let st = lock.lock().unwrap_or_else(|p| p.into_inner());
        st.times
            .iter()
            .copied()
            .zip(st.lines.iter().cloned())
            .collect()
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

    /// The probe's memory pattern (`probe.pattern=`) verifies: not one
    /// page differs from what it wrote.
    pub fn assert_pattern_intact(&self, timeout: Duration) {
        let verify = self.send_command("pattern-verify", timeout);
        assert_eq!(
            verify.field("bad_pages").as_deref(),
            Some("0"),
            "[{}] {:?}",
            self.name,
            verify.lines
        );
    }
}
