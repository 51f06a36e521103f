//! The virtio-net rig for hostile-input tests: a real `MmioTransport<Net>`
//! over real guest memory (two regions with a hole) and a real TAP in a
//! network namespace of its own, driven by [`Driver`], with the checks
//! every case ends with: nothing written outside the buffers the device
//! was given, and the device still sends, receives and answers control
//! commands.

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use devices::virtio::mmio::MmioTransport;
use devices::virtio::net::device::{CTRL_QUEUE, RX_QUEUE, TX_QUEUE};
use devices::virtio::net::{Net, NetMetrics, NetOptions};
use devices::virtio::{
    VirtioInterrupt, INT_CONFIG_CHANGE, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use net::{MacAddr, Tap};
use virtio_bindings::virtio_net::*;
use vmm_sys_util::eventfd::EventFd;

use super::{
    guest_memory, logcap, reg, scribble, status, Desc, Driver, Prng, QueueLayout, Snapshot,
    DESC_F_INDIRECT, DESC_F_WRITE,
};
use crate::host::{is_ci, require_root, skip};
use crate::netns::{Netns, PacketSocket};

/// Two regions with a hole between them: "outside guest memory" is both
/// the hole and everything past the end.
pub const MEM: [(u64, usize); 2] = [(0, 0x8_0000), (0x10_0000, 0x4_0000)];
pub const HOLE: u64 = 0x9_0000;
pub const END_A: u64 = 0x8_0000;
pub const FAR: u64 = 0xffff_ffff_ffff_f000;
pub const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The host-side sender of injected frames.
pub const PEER: [u8; 6] = [2, 0, 0, 0, 0, 1];
pub const ETH_TEST: [u8; 2] = [0x88, 0xb5];
pub const SIZES: [u16; 3] = [256, 256, 64];
pub const CASE_LIMIT: Duration = Duration::from_secs(30);
pub const OK: u8 = VIRTIO_NET_OK as u8;
pub const ERR: u8 = VIRTIO_NET_ERR as u8;

pub fn f(bit: u32) -> u64 {
    1 << bit
}

/// What a modern Linux driver negotiates, offloads aside.
pub fn all() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_F_RING_INDIRECT_DESC,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_CTRL_RX,
        VIRTIO_NET_F_CTRL_RX_EXTRA,
        VIRTIO_NET_F_CTRL_VLAN,
        VIRTIO_NET_F_CTRL_MAC_ADDR,
        VIRTIO_NET_F_GUEST_ANNOUNCE,
    ]
    .into_iter()
    .fold(0, |acc, b| acc | f(b))
}

pub fn layouts(sizes: [u16; 3]) -> [QueueLayout; 3] {
    [
        QueueLayout::at(0x1000, sizes[0]),
        QueueLayout::at(0x4000, sizes[1]),
        QueueLayout::at(0x7000, sizes[2]),
    ]
}

/// Buffer slot `n` (4 KiB each, from 64 KiB on).
pub fn slot(n: u64) -> u64 {
    0x1_0000 + n * 0x1000
}

/// An Ethernet frame of `len` bytes carrying `marker`.
pub fn frame(dst: [u8; 6], src: [u8; 6], marker: u32, len: usize) -> Vec<u8> {
    let mut v = [&dst[..], &src[..], &ETH_TEST[..], &marker.to_be_bytes()[..]].concat();
    v.extend((v.len()..len).map(|i| i as u8));
    v
}

pub fn has_marker(f: &[u8], marker: u32) -> bool {
    f.len() >= 18 && f[12..14] == ETH_TEST && f[14..18] == marker.to_be_bytes()
}

/// One virtio-net device behind its transport, the driver that abuses it,
/// the namespace its TAP lives in and a packet socket on that TAP.
pub struct Rig {
    pub drv: Driver<MmioTransport<Net>>,
    pub sock: PacketSocket,
    pub tap_fd: i32,
    pub features: u64,
    pub sizes: [u16; 3],
    pub snap: Option<Snapshot>,
    pub marker: u32,
    pub log: Vec<String>,
    pub ns: Netns,
}

impl Rig {
    pub fn new(features: u64) -> Rig {
        let ns = Netns::new("vnhostile").expect("netns");
        // No router solicitations or MLD reports in the rx path.
        for k in ["all", "default"] {
            let _ = ns.run(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{k}.disable_ipv6=1"),
            ]);
        }
        let tap = ns.enter(|| Tap::open("fyh0")).unwrap().expect("TAP");
        ns.set_up("fyh0").unwrap();
        let sock = ns.enter(|| PacketSocket::open("fyh0")).unwrap().unwrap();
        let mem = guest_memory(&MEM);
        scribble(&mem, &mut Prng::new(0x5eed));
        let tap_fd = tap.as_raw_fd();
        let net = Net::new(NetOptions {
            id: "hostile".into(),
            backend: tap,
            mac: MacAddr(MAC),
            guest_announce: true,
        })
        .unwrap();
        let evts = net.queue_evts().to_vec();
        let irq = VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let t = MmioTransport::new(net, mem.clone(), irq, evts).unwrap();
        let mut rig = Rig {
            drv: Driver::new(t, mem),
            sock,
            tap_fd,
            features,
            sizes: SIZES,
            snap: None,
            marker: 0,
            log: Vec::new(),
            ns,
        };
        rig.init().expect("driver init");
        rig
    }

    pub fn init(&mut self) -> Result<(), String> {
        let r = self.drv.init(self.features, &layouts(self.sizes));
        self.drv.write32(reg::INTERRUPT_ACK, u32::MAX);
        r
    }

    pub fn net(&mut self) -> &mut Net {
        self.drv.dev.device_mut()
    }

    pub fn m(&mut self) -> NetMetrics {
        self.net().metrics().clone()
    }

    pub fn next_marker(&mut self) -> u32 {
        self.marker += 1;
        self.marker
    }

    /// Whether the device logged a line containing `what` (since the last
    /// look, kept).
    pub fn said(&mut self, what: &str) -> bool {
        self.log.extend(logcap::take());
        self.log.iter().any(|l| l.contains(what))
    }

    /// Remembers guest memory as it is now.
    pub fn arm(&mut self) {
        self.snap = Some(Snapshot::take(&self.drv.mem));
    }

    /// Guest memory is as [`Rig::arm`] left it, but for the used rings
    /// and `allowed`.
    pub fn untouched(&mut self, allowed: &[Range<u64>]) {
        let mut ok: Vec<_> = self
            .drv
            .queues
            .iter()
            .map(|q| q.layout.used_range())
            .collect();
        ok.extend_from_slice(allowed);
        let snap = self.snap.take().expect("arm() first");
        let bad = snap.changed_outside(&self.drv.mem, &ok);
        assert!(
            bad.is_empty(),
            "device wrote outside its buffers at {bad:#x?}"
        );
    }

    /// What the event handler does on a queue notification: the notify
    /// register (which writes the queue's eventfd), the processing, and a
    /// broken device reported to the transport.
    pub fn kick(&mut self, q: usize) {
        self.drv.notify(q as u32);
        let _ = self.net().queue_evts()[q].read();
        match q {
            RX_QUEUE => self.net().process_rx_queue_event(),
            TX_QUEUE => self.net().process_tx(),
            _ => self.net().process_ctrl(),
        }
        self.report_broken();
    }

    pub fn report_broken(&mut self) {
        if let Some(why) = self.net().take_broken() {
            self.drv.dev.set_needs_reset(&why.to_string());
        }
    }

    /// Sends `f` into the TAP from the namespace side and lets the device
    /// read it.
    pub fn inject(&mut self, f: &[u8]) {
        self.sock.send(f).unwrap();
        let mut pfd = libc::pollfd {
            fd: self.tap_fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 2000) };
        assert_eq!(n, 1, "injected frame never reached the TAP queue");
        self.net().process_rx();
        self.report_broken();
    }

    pub fn needs_reset(&mut self) -> bool {
        self.drv.status() & status::DEVICE_NEEDS_RESET != 0
    }

    /// DEVICE_NEEDS_RESET with a config-change interrupt, for `why`.
    pub fn assert_needs_reset(&mut self, why: &str) {
        assert!(self.needs_reset(), "status {:#x}", self.drv.status());
        let isr = self.drv.read32(reg::INTERRUPT_STATUS);
        assert!(isr & INT_CONFIG_CHANGE != 0, "interrupt status {isr:#x}");
        assert!(self.said(why), "no log line with {why:?}: {:#?}", self.log);
        assert!(!self.net().is_active());
    }

    /// Publishes `chains` on tx, kicks, and checks each was refused.
    pub fn tx_refused(&mut self, chains: &[&[Desc]]) {
        for c in chains {
            self.drv.chain(TX_QUEUE, c);
        }
        self.kick_refused(TX_QUEUE, chains.len());
    }

    /// Kicks `q`, which holds `n` bad requests: each comes back with
    /// length 0, counted as a bad descriptor, nothing sent or written.
    pub fn kick_refused(&mut self, q: usize, n: usize) {
        let before = self.m();
        self.arm();
        self.kick(q);
        self.untouched(&[]);
        let after = self.m();
        let used = self.drv.take_used(q);
        assert_eq!(used.len(), n, "{used:?}");
        assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
        assert_eq!(after.bad_descriptors - before.bad_descriptors, n as u64);
        assert_eq!(after.tx_frames, before.tx_frames);
        assert!(!self.needs_reset());
    }

    /// A valid frame from the guest reaches the TAP.
    pub fn tx_ok(&mut self) {
        let marker = self.next_marker();
        let f = frame([0xff; 6], MAC, marker, 100);
        self.drv.write_mem(slot(40), &[0; 12]);
        self.drv.write_mem(slot(40) + 12, &f);
        let before = self.m().tx_frames;
        self.drv.chain(TX_QUEUE, &[Desc::read(slot(40), 112)]);
        self.arm();
        self.kick(TX_QUEUE);
        self.untouched(&[]);
        assert_eq!(self.drv.take_used(TX_QUEUE).len(), 1);
        assert_eq!(self.m().tx_frames, before + 1);
        let seen = self.sock.recv_matching(Duration::from_secs(2), |g| {
            g == f.as_slice() || has_marker(g, marker)
        });
        assert_eq!(seen.unwrap().as_deref(), Some(f.as_slice()), "TAP side");
    }

    /// Sends `descs` as one control request; the status byte at `slot(51)`.
    pub fn ctrl_chain(&mut self, descs: &[Desc]) -> (u8, Vec<(u32, u32)>) {
        self.drv.write_mem(slot(51), &[0xee]);
        self.drv.chain(CTRL_QUEUE, descs);
        self.arm();
        self.kick(CTRL_QUEUE);
        let status_byte = slot(51)..slot(51) + 1;
        self.untouched(&[status_byte]);
        (
            self.drv.read_mem(slot(51), 1)[0],
            self.drv.take_used(CTRL_QUEUE),
        )
    }

    /// Sends command `cmd` and checks the answer and the error counter.
    pub fn ctrl(&mut self, cmd: &[u8], want: u8) {
        self.drv.write_mem(slot(50), cmd);
        let errors = self.m().ctrl_errors;
        let descs = [
            Desc::read(slot(50), cmd.len() as u32),
            Desc::write(slot(51), 1),
        ];
        let (ack, used) = self.ctrl_chain(&descs);
        assert_eq!((ack, used.len()), (want, 1), "command {cmd:?}");
        assert_eq!(used[0].1, 1);
        assert_eq!(
            self.m().ctrl_errors - errors,
            u64::from(want == ERR),
            "{cmd:?}"
        );
    }

    /// Posts `descs` as one rx buffer.
    pub fn post(&mut self, descs: &[Desc]) -> u16 {
        self.drv.chain(RX_QUEUE, descs)
    }

    /// An injected frame lands in a posted buffer, header first.
    pub fn rx_ok(&mut self) {
        let bufs: Vec<_> = (60..64).map(|n| slot(n)..slot(n) + 2048).collect();
        let heads: Vec<u16> = bufs
            .iter()
            .map(|b| self.post(&[Desc::write(b.start, 2048)]))
            .collect();
        self.arm();
        self.kick(RX_QUEUE); // whatever a case left pending goes first
        let (before, marker) = (self.m().rx_frames, self.next_marker());
        let f = frame(MAC, PEER, marker, 80);
        self.inject(&f);
        self.untouched(&bufs);
        assert!(self.m().rx_frames > before, "{:?}", self.m());
        let used = self.drv.take_used(RX_QUEUE);
        let got = used.iter().any(|&(id, len)| {
            let k = heads.iter().position(|&h| u32::from(h) == id);
            len == 92 && k.is_some_and(|k| self.drv.read_mem(bufs[k].start + 12, 80) == f)
        });
        assert!(got, "frame not in any buffer: {used:?}");
    }

    /// After any case: reset if the device asked for it, then tx, rx and
    /// a control command all work.
    pub fn survives(&mut self) {
        if self.needs_reset() || !self.net().is_active() {
            self.init().expect("re-init after the case");
        }
        self.tx_ok();
        self.rx_ok();
        self.ctrl(&[0, 0, 1], OK);
        assert!(!self.needs_reset());
    }
}

/// Runs `body` on a fresh rig in its own thread, with a time limit (a
/// hang is a failure too), then checks that the device survived.
pub fn case(name: &str, features: u64, body: impl FnOnce(&mut Rig) + Send + 'static) {
    if !require_root(name) {
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        assert!(!is_ci(), "{name}: CI needs /dev/net/tun");
        return skip(name, "no /dev/net/tun");
    }
    let (tx, rx) = mpsc::channel();
    // Every line, so each case can check the words of each refusal (the
    // limit itself is tested in guest_log_limit.rs).
    devices::guest_log::set_interval(Duration::ZERO);
    let worker = std::thread::spawn(move || {
        logcap::install();
        let mut rig = Rig::new(features);
        body(&mut rig);
        rig.survives();
        let _ = tx.send(());
    });
    match rx.recv_timeout(CASE_LIMIT) {
        Ok(()) | Err(RecvTimeoutError::Disconnected) => {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(RecvTimeoutError::Timeout) => panic!("{name}: still running after {CASE_LIMIT:?}"),
    }
}

/// A descriptor of random values, biased towards the interesting ones.
pub fn random_desc(rng: &mut Prng, size: u16) -> Desc {
    let addr = match rng.below(8) {
        0 => HOLE + rng.below(0x1000),
        1 => rng.next_u64(),
        2 => END_A - rng.below(64),
        3..=5 => slot(rng.below(40)) + rng.below(64),
        _ => rng.below(0x14_0000),
    };
    let len = match rng.below(8) {
        0 => 0,
        1 => rng.next_u32(),
        2 => 12,
        3 => 16 * rng.below(8) as u32,
        _ => rng.below(2048) as u32,
    };
    // Indirect tables now and then, mostly short ones.
    let flags = rng.below(4) as u16 | if rng.chance(1, 8) { DESC_F_INDIRECT } else { 0 };
    let len = if flags & DESC_F_INDIRECT != 0 && rng.chance(7, 8) {
        16 * rng.below(8) as u32
    } else {
        len
    };
    let next = if rng.chance(9, 10) {
        rng.below(u64::from(size))
    } else {
        rng.below(65_536)
    };
    Desc {
        addr,
        len,
        flags,
        next: next as u16,
    }
}

/// Every range a device could legitimately write for queue `q`: writable
/// descriptors of its table and of the indirect tables they point at.
/// (A descriptor not wholly inside one region is never written through.)
pub fn writable_ranges(drv: &Driver<MmioTransport<Net>>, table: u64, size: u16) -> Vec<Range<u64>> {
    let inside = |r: &Range<u64>| {
        MEM.iter()
            .any(|&(s, n)| r.start >= s && r.end <= s + n as u64)
    };
    let mut out = Vec::new();
    for d in drv.get_descs(table, size) {
        if d.flags & DESC_F_INDIRECT != 0 {
            let n = (d.len / 16).min(65_535) as u16;
            let inner = drv.get_descs(d.addr, n);
            out.extend(
                inner
                    .iter()
                    .filter(|e| e.flags & DESC_F_WRITE != 0)
                    .map(Desc::range),
            );
        } else if d.flags & DESC_F_WRITE != 0 {
            out.push(d.range());
        }
    }
    out.retain(inside);
    out
}
