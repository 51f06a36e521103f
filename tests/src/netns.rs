//! Network namespaces as test "hosts".
//!
//! Every test builds its own topology inside namespaces it creates, with
//! names unique per process and per call, and addresses only from
//! 198.18.0.0/15 (RFC 2544 benchmarking space). Nothing here touches the
//! machine's own interfaces or routes. A [`Netns`] is deleted when dropped,
//! also when the test panics, together with any process still inside it.
//!
//! The kernel of the development machines has no 802.1Q module, so VLAN
//! sub-interfaces may be unavailable ([`vlan_supported`]); [`PacketSocket`]
//! sends and receives tagged frames on a plain interface instead.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace owned by this test.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

/// Whether `cidr` (`A.B.C.D/P`) lies inside 198.18.0.0/15.
pub fn in_test_range(cidr: &str) -> bool {
    let (ip, prefix) = cidr.split_once('/').unwrap_or((cidr, "32"));
    let (Ok(ip), Ok(prefix)) = (ip.parse::<Ipv4Addr>(), prefix.parse::<u8>()) else {
        return false;
    };
    let o = ip.octets();
    o[0] == 198 && (o[1] & 0xFE) == 18 && (15..=32).contains(&prefix)
}

impl Netns {
    /// Creates `fy-<what>-<pid>-<n>` with its loopback up.
    pub fn new(what: &str) -> io::Result<Netns> {
        let short: String = what
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(12)
            .collect();
        let name = format!(
            "fy-{}-{}-{}",
            short,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run_ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `args` inside the namespace and waits.
    pub fn exec(&self, args: &[&str]) -> io::Result<Output> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
        self.command(program)
            .args(rest)
            .stdin(Stdio::null())
            .output()
    }

    /// Runs `args` inside the namespace; an error (with stderr) unless it
    /// exits 0. Returns stdout.
    pub fn run(&self, args: &[&str]) -> io::Result<String> {
        let out = self.exec(args)?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "`{}` in netns {} failed ({}): {}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates a TAP device (for a VMM to open by name) and sets it up.
    pub fn add_tap(&self, name: &str) -> io::Result<()> {
        self.run(&["ip", "tuntap", "add", "dev", name, "mode", "tap"])?;
        self.set_up(name)
    }

    pub fn add_bridge(&self, name: &str) -> io::Result<()> {
        self.run(&["ip", "link", "add", name, "type", "bridge"])?;
        self.set_up(name)
    }

    pub fn add_to_bridge(&self, dev: &str, bridge: &str) -> io::Result<()> {
        self.run(&["ip", "link", "set", dev, "master", bridge])?;
        Ok(())
    }

    pub fn set_up(&self, dev: &str) -> io::Result<()> {
        self.run(&["ip", "link", "set", dev, "up"])?;
        Ok(())
    }

    /// Adds an address; refuses anything outside 198.18.0.0/15.
    pub fn add_addr(&self, dev: &str, cidr: &str) -> io::Result<()> {
        if !in_test_range(cidr) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{cidr} is outside 198.18.0.0/15, the only range tests may use"),
            ));
        }
        self.run(&["ip", "addr", "add", cidr, "dev", dev])?;
        Ok(())
    }

    /// A VLAN sub-interface `<parent>.<vid>`, up. Needs the kernel's 802.1Q
    /// support (see [`vlan_supported`]).
    pub fn add_vlan(&self, parent: &str, vid: u16) -> io::Result<String> {
        let name = format!("{parent}.{vid}");
        self.run(&[
            "ip",
            "link",
            "add",
            "link",
            parent,
            "name",
            &name,
            "type",
            "vlan",
            "id",
            &vid.to_string(),
        ])?;
        self.set_up(&name)?;
        Ok(name)
    }

    /// A veth pair: `a_if` in `a`, `b_if` in `b`, both up.
    pub fn veth_pair(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> io::Result<()> {
        a.run(&[
            "ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if,
        ])?;
        a.run(&["ip", "link", "set", b_if, "netns", &b.name])?;
        a.set_up(a_if)?;
        b.set_up(b_if)
    }

    /// The MAC of `dev`.
    pub fn mac(&self, dev: &str) -> io::Result<String> {
        let text = self.run(&["cat", &format!("/sys/class/net/{dev}/address")])?;
        Ok(text.trim().to_string())
    }

    /// Runs `f` on a thread that has joined this namespace, so sockets it
    /// opens live here.
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let path = PathBuf::from("/run/netns").join(&self.name);
        std::thread::spawn(move || -> io::Result<T> {
            let file = File::open(&path)?;
            // SAFETY: setns on a namespace fd we opened, affecting only the
            // calling thread (a fresh one that does nothing else).
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    }

    /// Like [`Netns::enter`], but returns at once: `f` runs on its own
    /// thread inside the namespace (a traffic source during a migration).
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<io::Result<T>> {
        let path = PathBuf::from("/run/netns").join(&self.name);
        std::thread::spawn(move || -> io::Result<T> {
            let file = File::open(&path)?;
            // SAFETY: setns on a namespace fd we opened, affecting only the
            // calling thread (a fresh one that does nothing else).
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
    }

    /// Starts tcpdump on `dev` writing a pcap; returns once it listens.
    pub fn capture(&self, dev: &str, file: &Path) -> io::Result<Capture> {
        let mut child = self
            .command("tcpdump")
            // -Z root: keep root, so writing the file cannot fail after the
            // privilege drop tcpdump would otherwise do; immediate mode, so
            // the frames of the last buffer timeout are not lost on stop.
            .args(["-Z", "root", "--immediate-mode", "-i", dev, "-U", "-w"])
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| io::Error::other("no stderr"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stderr).lines();
            let mut told = false;
            for line in lines.by_ref().map_while(Result::ok) {
                if !told && line.contains("listening on") {
                    let _ = tx.send(Ok(()));
                    told = true;
                } else if !told {
                    let _ = tx.send(Err(line));
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(())) => break,
                Ok(Err(_other_line)) => continue,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(io::Error::other(format!("tcpdump on {dev} did not start")));
                }
            }
        }
        Ok(Capture {
            child: Some(child),
            path: file.to_path_buf(),
        })
    }

    /// Processes still in the namespace.
    fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes left inside (a VMM of a failed test) belong to this
        // test: the namespace is unique to it.
        for pid in self.pids() {
            // SAFETY: plain kill(2) of a pid that lives in our namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // `ip netns del` can fail while other tests add or delete
        // namespaces at the same moment (the shared /run/netns mount is
        // busy): try again rather than leave one behind.
        let mut last = None;
        for _ in 0..20 {
            match run_ip(&["netns", "del", &self.name]) {
                Ok(()) => return,
                Err(e) => last = Some(e),
            }
            if !std::path::Path::new("/run/netns").join(&self.name).exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        if let Some(e) = last {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "WARNING: network namespace {} left behind: {e}",
                self.name
            );
        }
    }
}

fn run_ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Whether this kernel can make VLAN sub-interfaces (checked once).
pub fn vlan_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let Ok(ns) = Netns::new("vlancheck") else {
            return false;
        };
        ns.run(&["ip", "link", "add", "d0", "type", "dummy"])
            .is_ok()
            && ns.add_vlan("d0", 2).is_ok()
    })
}

/// A running tcpdump.
pub struct Capture {
    child: Option<Child>,
    path: PathBuf,
}

impl Capture {
    /// Stops tcpdump (letting it flush) and returns the pcap.
    pub fn stop(mut self) -> io::Result<Pcap> {
        self.finish()?;
        Ok(Pcap {
            path: self.path.clone(),
        })
    }

    fn finish(&mut self) -> io::Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    child.kill()?;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// A pcap file, decoded by independent tools.
pub struct Pcap {
    pub path: PathBuf,
}

impl Pcap {
    /// `tcpdump -r FILE -e -nn` (link-level headers, no name lookups): one
    /// line per frame.
    pub fn tcpdump_text(&self) -> io::Result<String> {
        let out = Command::new("tcpdump")
            .args(["-r"])
            .arg(&self.path)
            .args(["-e", "-nn"])
            .stdin(Stdio::null())
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Every frame with its capture time (seconds since the epoch), read
    /// straight from the file: the bytes as they crossed the interface
    /// (libpcap puts 802.1Q tags the kernel had moved aside back in).
    pub fn frames(&self) -> io::Result<Vec<(f64, Vec<u8>)>> {
        parse_pcap(&std::fs::read(&self.path)?)
    }

    /// `tshark -r FILE -T fields -E separator=, -e FIELD...` with an optional
    /// display filter: one line per frame.
    pub fn tshark_fields(&self, filter: &str, fields: &[&str]) -> io::Result<String> {
        let mut cmd = Command::new("tshark");
        cmd.arg("-r")
            .arg(&self.path)
            .args(["-T", "fields", "-E", "separator=,"]);
        if !filter.is_empty() {
            cmd.args(["-Y", filter]);
        }
        for f in fields {
            cmd.args(["-e", f]);
        }
        let out = cmd
            .stdin(Stdio::null())
            .env("HOME", std::env::temp_dir())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The records of a classic pcap file (either byte order, micro- or
/// nanosecond timestamps).
pub fn parse_pcap(data: &[u8]) -> io::Result<Vec<(f64, Vec<u8>)>> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("pcap: {why}"));
    let magic = data.get(..4).ok_or_else(|| bad("no header"))?;
    let (little, nanos) = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] => (true, false),
        [0x4d, 0x3c, 0xb2, 0xa1] => (true, true),
        [0xa1, 0xb2, 0xc3, 0xd4] => (false, false),
        [0xa1, 0xb2, 0x3c, 0x4d] => (false, true),
        _ => return Err(bad("not a pcap file (pcapng?)")),
    };
    let word = |at: usize| -> io::Result<u32> {
        let b: [u8; 4] = data
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("truncated"))?;
        Ok(if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    if word(20)? != 1 {
        return Err(bad("link type is not Ethernet"));
    }
    let mut frames = Vec::new();
    let mut at = 24;
    while at < data.len() {
        let (sec, frac, len) = (word(at)?, word(at + 4)?, word(at + 8)? as usize);
        let body = data
            .get(at + 16..at + 16 + len)
            .ok_or_else(|| bad("truncated record"))?;
        let scale = if nanos { 1e-9 } else { 1e-6 };
        frames.push((sec as f64 + frac as f64 * scale, body.to_vec()));
        at += 16 + len;
    }
    Ok(frames)
}

/// An AF_PACKET socket bound to one interface: whole frames in and out,
/// with 802.1Q tags put back into received frames (the kernel moves them
/// into metadata). Open it inside [`Netns::enter`].
pub struct PacketSocket {
    fd: OwnedFd,
}

const ETH_P_ALL: u16 = 0x0003;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;

#[repr(C)]
struct TpacketAuxdata {
    tp_status: u32,
    tp_len: u32,
    tp_snaplen: u32,
    tp_mac: u16,
    tp_net: u16,
    tp_vlan_tci: u16,
    tp_vlan_tpid: u16,
}

impl PacketSocket {
    pub fn open(ifname: &str) -> io::Result<PacketSocket> {
        let name = CString::new(ifname).map_err(|_| io::Error::other("bad interface name"))?;
        // SAFETY: plain libc calls with checked results; the fd is owned
        // right after creation.
        unsafe {
            let index = libc::if_nametoindex(name.as_ptr());
            if index == 0 {
                return Err(io::Error::last_os_error());
            }
            let raw = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, ETH_P_ALL.to_be() as i32);
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(raw);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = ETH_P_ALL.to_be();
            addr.sll_ifindex = index as i32;
            if libc::bind(
                fd.as_raw_fd(),
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            let one: libc::c_int = 1;
            if libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_AUXDATA,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(PacketSocket { fd })
        }
    }

    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sending from a valid buffer on our socket.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next frame (outgoing ones included, as AF_PACKET sees both), or
    /// None after `timeout`.
    pub fn recv(&self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe {
            libc::poll(
                &mut pfd,
                1,
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        if ready < 0 {
            return Err(io::Error::last_os_error());
        }
        if ready == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; 65536];
        let mut control = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr pointing at our buffers, which outlive the call;
        // cmsgs are walked with the libc macros within `control`.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            let n = libc::recvmsg(self.fd.as_raw_fd(), &mut msg, 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            buf.truncate(n as usize);
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_PACKET
                    && (*cmsg).cmsg_type == libc::PACKET_AUXDATA
                {
                    let aux = (libc::CMSG_DATA(cmsg) as *const TpacketAuxdata).read_unaligned();
                    if aux.tp_status & TP_STATUS_VLAN_VALID != 0 && buf.len() >= 12 {
                        let tpid = if aux.tp_status & TP_STATUS_VLAN_TPID_VALID != 0 {
                            aux.tp_vlan_tpid
                        } else {
                            0x8100
                        };
                        let mut tag = tpid.to_be_bytes().to_vec();
                        tag.extend_from_slice(&aux.tp_vlan_tci.to_be_bytes());
                        buf.splice(12..12, tag);
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        Ok(Some(buf))
    }

    /// Receives until `want` accepts a frame or `timeout` passes.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        mut want: impl FnMut(&[u8]) -> bool,
    ) -> io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.recv(left)? {
                Some(frame) if want(&frame) => return Ok(Some(frame)),
                Some(_) => {}
                None => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_benchmarking_range_is_allowed() {
        assert!(in_test_range("198.18.0.1/24"));
        assert!(in_test_range("198.19.255.1/16"));
        assert!(!in_test_range("198.20.0.1/24"));
        assert!(!in_test_range("10.0.0.1/8"));
        assert!(!in_test_range("198.18.0.1/8"));
        assert!(!in_test_range("nonsense"));
    }
}
