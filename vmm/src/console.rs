//! The serial console on the host side: stdin into the UART (with QEMU's
//! Ctrl-A escape when stdin is a terminal), the terminal in raw mode while
//! the VM runs, and restored afterwards.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use devices::legacy::serial::InputDrained;
use devices::legacy::Serial;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use crate::exit::{ExitState, VmExit};

const CTRL_A: u8 = 0x01;

/// Puts a terminal in raw mode and restores it when dropped.
///
/// Not vmm-sys-util's `Terminal::set_raw_mode`: it clears only ICANON,
/// ECHO and ISIG, so the host terminal would still eat Ctrl-S/Ctrl-Q
/// (IXON) and turn the guest's CR into NL (ICRNL); and it has no way back
/// to the user's own settings, only to a canonical mode of its choosing.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode for `fd` if it is a terminal; `None` otherwise.
    pub fn enable(fd: RawFd) -> io::Result<Option<Self>> {
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output processing so the guest's "\n" still returns the
        // carriage on the host terminal as it does on a serial line.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(Self { fd, saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read from this same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// QEMU's console escape: Ctrl-A x quits, Ctrl-A Ctrl-A sends a Ctrl-A,
/// Ctrl-A h prints help.
#[derive(Default)]
pub struct EscapeParser {
    after_ctrl_a: bool,
}

/// What the user's keystrokes amount to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub to_guest: Vec<u8>,
    pub quit: bool,
    pub help: bool,
}

impl EscapeParser {
    pub fn feed(&mut self, input: &[u8]) -> Parsed {
        let mut out = Parsed::default();
        for &b in input {
            if self.after_ctrl_a {
                self.after_ctrl_a = false;
                match b {
                    b'x' | b'X' => {
                        out.quit = true;
                        return out;
                    }
                    CTRL_A => out.to_guest.push(CTRL_A),
                    b'h' | b'?' => out.help = true,
                    _ => {}
                }
            } else if b == CTRL_A {
                self.after_ctrl_a = true;
            } else {
                out.to_guest.push(b);
            }
        }
        out
    }
}

const HELP: &str = "\r\nC-a h    print this help\r\nC-a x    exit ferry\r\nC-a C-a  send C-a\r\n";

/// Event-loop subscriber feeding stdin into the serial port.
pub struct ConsoleInput {
    stdin: RawFd,
    escape: Option<EscapeParser>,
    serial: Arc<Mutex<Serial>>,
    drained: Arc<InputDrained>,
    exit: Arc<ExitState>,
    /// stdin is not read while the guest has not drained earlier input.
    reading: bool,
    closed: bool,
}

impl ConsoleInput {
    /// `escape`: whether Ctrl-A sequences are interpreted (a terminal).
    pub fn new(
        stdin: RawFd,
        escape: bool,
        serial: Arc<Mutex<Serial>>,
        drained: Arc<InputDrained>,
        exit: Arc<ExitState>,
    ) -> Self {
        Self {
            stdin,
            escape: escape.then(EscapeParser::default),
            serial,
            drained,
            exit,
            reading: true,
            closed: false,
        }
    }

    fn read_stdin(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut buf = [0u8; 256];
        // SAFETY: reads at most buf.len() bytes into a live buffer.
        let n = unsafe { libc::read(self.stdin, buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => Ok(None),
            n if n < 0 => Err(io::Error::last_os_error()),
            n => Ok(Some(buf[..n as usize].to_vec())),
        }
    }

    fn set_stdin_interest(&mut self, ops: &mut EventOps, want: bool) {
        if self.closed || want == self.reading {
            return;
        }
        let event = event_manager::Events::new_raw(self.stdin, EventSet::IN);
        let result = if want {
            ops.add(event)
        } else {
            ops.remove(event)
        };
        if let Err(e) = result {
            log::warn!("console: stdin interest: {e:?}");
        }
        self.reading = want;
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        let drained = Events::new(&self.drained.0, EventSet::IN);
        if let Err(e) = ops.add(drained) {
            log::error!("console: cannot watch the serial FIFO: {e:?}");
        }
        if let Err(e) = ops.add(Events::new_raw(self.stdin, EventSet::IN)) {
            // stdin may be /dev/null or a regular file, which epoll refuses.
            log::debug!("console: stdin not pollable ({e:?}); no console input");
            self.closed = true;
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.drained.0.as_raw_fd() {
            let _ = self.drained.0.read();
            let waiting = devices::bus::lock(&self.serial).feed();
            self.set_stdin_interest(ops, waiting == 0);
            return;
        }
        let bytes = match self.read_stdin() {
            Ok(Some(b)) => b,
            Ok(None) => {
                // EOF: the guest keeps running without input.
                let _ = ops.remove(Events::new_raw(self.stdin, EventSet::IN));
                self.closed = true;
                return;
            }
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock =>
            {
                return
            }
            Err(e) => {
                log::warn!("console: stdin: {e}");
                let _ = ops.remove(Events::new_raw(self.stdin, EventSet::IN));
                self.closed = true;
                return;
            }
        };
        let parsed = match &mut self.escape {
            Some(parser) => parser.feed(&bytes),
            None => Parsed {
                to_guest: bytes,
                ..Default::default()
            },
        };
        if parsed.help {
            eprint!("{HELP}");
        }
        if !parsed.to_guest.is_empty() {
            let waiting = devices::bus::lock(&self.serial).push_input(&parsed.to_guest);
            self.set_stdin_interest(ops, waiting == 0);
        }
        if parsed.quit {
            self.exit.record(VmExit::UserQuit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut p = EscapeParser::default();
        assert_eq!(p.feed(b"ls\r").to_guest, b"ls\r");
        let r = p.feed(&[b'a', CTRL_A, CTRL_A, b'b']);
        assert_eq!(r.to_guest, vec![b'a', CTRL_A, b'b']);
        // An escape split across reads still works.
        assert!(!p.feed(&[CTRL_A]).quit);
        let r = p.feed(b"xyz");
        assert!(r.quit);
        assert!(r.to_guest.is_empty());
        assert!(p.feed(&[CTRL_A, b'h']).help);
        assert_eq!(p.feed(&[CTRL_A, b'q', b'z']).to_guest, b"z");
    }
}
