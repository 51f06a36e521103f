//! The console command protocol (docs/probe.md).
//!
//! A command is one line: `[@TAG] NAME ARGS...`. Every reply line is
//! `=TAG NAME ...` (TAG is `-` when none was given); the last one is
//! `=TAG NAME ok` or `=TAG NAME err REASON`. Events the probe prints on its
//! own start with `probe: ` and never with `=`.

use ferry_probe_packets::Ipv4Addr;

use crate::config::{parse_cidr, parse_mac_choice, parse_number, parse_size, parse_vlan};
use crate::net::Identity;
use crate::{platform, workloads, Probe};

const MAX_LINE: usize = 256;

pub struct LineReader {
    bytes: [u8; MAX_LINE],
    len: usize,
    overflow: bool,
}

impl LineReader {
    pub const fn new() -> Self {
        LineReader {
            bytes: [0; MAX_LINE],
            len: 0,
            overflow: false,
        }
    }

    /// Adds a byte; returns the line when it ends, with whether it was cut
    /// (overlong lines are refused as a whole, not run as two commands; the
    /// kept start still carries the tag for the reply).
    pub fn push(&mut self, byte: u8) -> Option<(&str, Fault)> {
        match byte {
            b'\r' | b'\n' => {
                let len = core::mem::take(&mut self.len);
                let overflow = core::mem::take(&mut self.overflow);
                let (text, fault) = match core::str::from_utf8(&self.bytes[..len]) {
                    Ok(t) if overflow => (t, Fault::TooLong),
                    Ok(t) => (t, Fault::None),
                    Err(e) => (
                        // The valid start still gives the tag.
                        core::str::from_utf8(&self.bytes[..e.valid_up_to()]).unwrap_or(""),
                        Fault::NotText,
                    ),
                };
                (!text.trim().is_empty() || fault != Fault::None).then_some((text, fault))
            }
            _ if self.len < MAX_LINE => {
                self.bytes[self.len] = byte;
                self.len += 1;
                None
            }
            _ => {
                self.overflow = true;
                None
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    TooLong,
    NotText,
}

type Outcome = Result<(), &'static str>;

pub fn execute(probe: &mut Probe, line: &str, fault: Fault) {
    let mut words = line.split_ascii_whitespace();
    let mut first = words.next().unwrap_or("");
    let mut tag = "-";
    if let Some(t) = first.strip_prefix('@') {
        tag = if t.is_empty() { "-" } else { t };
        first = words.next().unwrap_or("");
    }
    let mut args = [""; 8];
    let mut argc = 0;
    for w in words {
        if argc == args.len() {
            if fault == Fault::None {
                println!("={} {} err too many arguments", tag, first);
                return;
            }
            break;
        }
        args[argc] = w;
        argc += 1;
    }
    let args = &args[..argc];
    let name = if first.is_empty() { "?" } else { first };
    let outcome = match (fault, name) {
        (Fault::TooLong, _) => Err("line too long"),
        (Fault::NotText, _) => Err("line is not text"),
        (Fault::None, name) => run(probe, tag, name, line, args),
    };
    match outcome {
        Ok(()) => println!("={} {} ok", tag, name),
        Err(reason) => println!("={} {} err {}", tag, name, reason),
    }
}

fn run(probe: &mut Probe, tag: &str, name: &str, line: &str, args: &[&str]) -> Outcome {
    match name {
        "help" => help(tag),
        "echo" => {
            println!(
                "={} echo text={}",
                tag,
                line.split_once("echo").map_or("", |(_, t)| t.trim())
            );
            Ok(())
        }
        "uptime" => {
            println!("={} uptime ms={}", tag, platform::now_ms());
            Ok(())
        }
        "config" => config(probe, tag),
        "id-add" => id_add(probe, args),
        "id-del" => id_del(probe, args),
        "counters" => counters(probe, tag, args, false),
        "counters-reset" => counters(probe, tag, args, true),
        "heartbeat" => heartbeat(probe, args),
        "dirty" => dirty(probe, tag, args),
        "pattern-write" => pattern_write(probe, tag, args),
        "pattern-verify" => pattern_verify(probe, tag, args),
        "udp-blast" => udp_blast(probe, args),
        "garp" => garp(probe, tag, args),
        "mmio-write" => mmio_write(probe, tag, args),
        "workloads" => workloads_status(probe, tag),
        _ => Err("unknown command (try help)"),
    }
}

fn help(tag: &str) -> Outcome {
    const COMMANDS: [&str; 16] = [
        "help",
        "echo TEXT",
        "uptime",
        "config",
        "id-add NIC MAC|dev VLAN|none IP/PREFIX",
        "id-del NIC IP [VLAN|none]",
        "counters [NIC]",
        "counters-reset [NIC]",
        "heartbeat MS|off",
        "dirty RATE SIZE | dirty off",
        "pattern-write SEED SIZE",
        "pattern-verify [SEED SIZE]",
        "udp-blast NIC SRC_IP DST_IP:PORT SIZE RATE COUNT | udp-blast NIC off",
        "garp NIC",
        "mmio-write NIC OFFSET VALUE COUNT",
        "workloads",
    ];
    for c in COMMANDS {
        println!("={} help {}", tag, c);
    }
    Ok(())
}

fn nic_index(probe: &Probe, text: &str) -> Result<usize, &'static str> {
    let index = parse_number(text).ok_or("bad NIC number")? as usize;
    match probe.nics.get(index) {
        Some(Some(nic)) if nic.driver.is_some() => Ok(index),
        Some(Some(_)) => Err("that NIC is not up"),
        _ => Err("no such NIC"),
    }
}

fn vlan_text(vlan: Option<u16>) -> VlanText {
    VlanText(vlan)
}

struct VlanText(Option<u16>);

impl core::fmt::Display for VlanText {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{}", v),
            None => f.write_str("none"),
        }
    }
}

fn config(probe: &Probe, tag: &str) -> Outcome {
    let c = &probe.config;
    println!(
        "={} config version={} announce={} heartbeat_ms={} idle={} arena={:#x}-{:#x}",
        tag,
        crate::VERSION,
        if c.announce { "on" } else { "off" },
        probe.heartbeat.period_ms,
        if probe.halt_when_idle { "halt" } else { "spin" },
        probe.arena.start,
        probe.arena.end
    );
    for (index, nic) in probe.nics.iter().enumerate() {
        let Some(nic) = nic else { continue };
        match &nic.driver {
            Some(d) => println!(
                "={} config nic={} state=up addr={:#x} size={:#x} irq={} mac={} features={:#x}",
                tag, index, nic.spec.base, nic.spec.size, nic.spec.irq, d.mac, d.features
            ),
            None => println!(
                "={} config nic={} state=down addr={:#x} irq={} reason={}",
                tag,
                index,
                nic.spec.base,
                nic.spec.irq,
                nic.error.unwrap_or("unknown")
            ),
        }
        for id in nic.stack.ids.iter().flatten() {
            println!(
                "={} config id nic={} mac={} vlan={} ip={}/{}",
                tag,
                index,
                id.mac,
                vlan_text(id.vlan),
                id.ip,
                id.prefix
            );
        }
    }
    Ok(())
}

fn id_add(probe: &mut Probe, args: &[&str]) -> Outcome {
    let [nic, mac, vlan, cidr] = args else {
        return Err("usage: id-add NIC MAC|dev VLAN|none IP/PREFIX");
    };
    let index = nic_index(probe, nic)?;
    let mac = parse_mac_choice(mac).ok_or("bad MAC")?;
    let vlan = parse_vlan(vlan).ok_or("bad VLAN")?;
    let (ip, prefix) = parse_cidr(cidr).ok_or("bad IP/PREFIX")?;
    let nic = probe.nics[index].as_mut().ok_or("no such NIC")?;
    let device_mac = nic
        .driver
        .as_ref()
        .map(|d| d.mac)
        .ok_or("that NIC is not up")?;
    nic.stack.add_identity(Identity {
        mac: mac.unwrap_or(device_mac),
        device_mac: mac.is_none_or(|m| m == device_mac),
        vlan,
        ip,
        prefix,
        quiet: false,
    })?;
    nic.program_filters()
}

fn id_del(probe: &mut Probe, args: &[&str]) -> Outcome {
    let (nic, ip, vlan) = match args {
        [nic, ip] => (nic, ip, None),
        [nic, ip, vlan] => (nic, ip, Some(parse_vlan(vlan).ok_or("bad VLAN")?)),
        _ => return Err("usage: id-del NIC IP [VLAN|none]"),
    };
    let index = nic_index(probe, nic)?;
    let ip = Ipv4Addr::parse(ip).ok_or("bad IP")?;
    let nic = probe.nics[index].as_mut().ok_or("no such NIC")?;
    let removed = nic
        .stack
        .remove_identity(ip, vlan)
        .ok_or("no such identity")?;
    let mut vlans = [0u16; crate::net::MAX_IDS];
    let still = nic.stack.vlans(&mut vlans);
    if let (Some(vid), Some(driver)) = (removed.vlan, nic.driver.as_mut()) {
        if !vlans[..still].contains(&vid) && driver.has(crate::virtio_net::F_CTRL_VLAN) {
            driver.vlan(vid, false)?;
        }
    }
    nic.program_filters()
}

fn counters(probe: &mut Probe, tag: &str, args: &[&str], reset: bool) -> Outcome {
    let only = match args {
        [] => None,
        [nic] => Some(parse_number(nic).ok_or("bad NIC number")? as usize),
        _ => return Err("usage: counters [NIC]"),
    };
    let mut shown = 0;
    for (index, nic) in probe.nics.iter_mut().enumerate() {
        let Some(nic) = nic else { continue };
        if only.is_some_and(|o| o != index) {
            continue;
        }
        shown += 1;
        if reset {
            nic.stack.counters = Default::default();
            if let Some(d) = nic.driver.as_mut() {
                d.tx.frames = 0;
                d.tx.bytes = 0;
                d.tx.dropped = 0;
            }
            continue;
        }
        let c = &nic.stack.counters;
        let (tx_frames, tx_bytes, tx_dropped) = nic
            .driver
            .as_ref()
            .map_or((0, 0, 0), |d| (d.tx.frames, d.tx.bytes, d.tx.dropped));
        println!(
            "={} counters nic={} rx_frames={} rx_bytes={} tx_frames={} tx_bytes={} tx_dropped={} arp_replies={} icmp_echo={} udp_echo={} udp_sink_frames={} udp_sink_bytes={} announces={} garps={} ignored={} malformed={} irqs={}",
            tag, index, c.rx_frames, c.rx_bytes, tx_frames, tx_bytes, tx_dropped, c.arp_replies,
            c.icmp_echo, c.udp_echo, c.udp_sink_frames, c.udp_sink_bytes, c.announces, c.garps,
            c.ignored, c.malformed,
            crate::interrupts::NIC_IRQS[index].load(core::sync::atomic::Ordering::Relaxed)
        );
    }
    if shown == 0 {
        return Err("no such NIC");
    }
    Ok(())
}

fn heartbeat(probe: &mut Probe, args: &[&str]) -> Outcome {
    let period = match args {
        ["off"] => 0,
        [ms] => parse_number(ms).ok_or("bad period")?,
        _ => return Err("usage: heartbeat MS|off"),
    };
    probe.heartbeat.set(period, platform::now_ms());
    Ok(())
}

fn dirty(probe: &mut Probe, tag: &str, args: &[&str]) -> Outcome {
    match args {
        ["off"] => {
            if let Some(d) = probe.dirtier.take() {
                println!("={} dirty stopped pages_written={}", tag, d.pages_written);
            }
            Ok(())
        }
        [rate, size] => {
            let rate = if *rate == "max" {
                0
            } else {
                parse_size(rate).ok_or("bad RATE")?
            };
            let size = parse_size(size).ok_or("bad SIZE")?;
            let base = probe.start_dirtier(rate, size)?;
            println!(
                "={} dirty base={:#x} size={} rate={}",
                tag, base, size, rate
            );
            Ok(())
        }
        _ => Err("usage: dirty RATE SIZE | dirty off"),
    }
}

fn pattern_write(probe: &mut Probe, tag: &str, args: &[&str]) -> Outcome {
    let [seed, size] = args else {
        return Err("usage: pattern-write SEED SIZE");
    };
    let seed = parse_number(seed).ok_or("bad SEED")?;
    let size = parse_size(size).ok_or("bad SIZE")?;
    let base = probe.arena.pattern_region(size)?;
    if let Some(d) = &probe.dirtier {
        if base < d.base + d.pages * 4096 && d.base < base + size {
            return Err("pattern would overlap the dirtying region");
        }
    }
    let r = workloads::write_pattern(base, size, seed);
    println!(
        "={} pattern-write seed={} size={} base={:#x} checksum={:#018x}",
        tag, seed, size, base, r.checksum
    );
    probe.pattern = Some(r);
    Ok(())
}

fn pattern_verify(probe: &mut Probe, tag: &str, args: &[&str]) -> Outcome {
    let (seed, size) = match args {
        [] => {
            let p = probe.pattern.ok_or("no pattern written")?;
            (p.seed, p.size)
        }
        [seed, size] => (
            parse_number(seed).ok_or("bad SEED")?,
            parse_size(size).ok_or("bad SIZE")?,
        ),
        _ => return Err("usage: pattern-verify [SEED SIZE]"),
    };
    let base = probe.arena.pattern_region(size)?;
    let r = workloads::verify_pattern(base, size, seed);
    println!(
        "={} pattern-verify seed={} size={} base={:#x} checksum={:#018x} bad_pages={} first_bad={:#x}",
        tag,
        seed,
        size,
        base,
        r.checksum,
        r.bad_pages,
        r.first_bad.unwrap_or(0)
    );
    if r.bad_pages == 0 {
        Ok(())
    } else {
        Err("pattern mismatch")
    }
}

fn udp_blast(probe: &mut Probe, args: &[&str]) -> Outcome {
    if let [nic, "off"] = args {
        let index = nic_index(probe, nic)?;
        if let Some(n) = probe.nics[index].as_mut() {
            n.stack.blast = None;
        }
        return Ok(());
    }
    let [nic, src, dst, size, rate, count] = args else {
        return Err("usage: udp-blast NIC SRC_IP DST_IP:PORT SIZE RATE COUNT");
    };
    let index = nic_index(probe, nic)?;
    let src = Ipv4Addr::parse(src).ok_or("bad SRC_IP")?;
    let (dst, port) = dst.split_once(':').ok_or("bad DST_IP:PORT")?;
    let dst = Ipv4Addr::parse(dst).ok_or("bad DST_IP")?;
    let port = parse_number(port)
        .filter(|&p| p > 0 && p < 65536)
        .ok_or("bad PORT")? as u16;
    let size = parse_size(size).ok_or("bad SIZE")? as usize;
    let rate = parse_number(rate).ok_or("bad RATE")?;
    let count = parse_number(count).ok_or("bad COUNT")?;
    let nic = probe.nics[index].as_mut().ok_or("no such NIC")?;
    nic.stack.start_blast(src, dst, port, size, rate, count)
}

fn garp(probe: &mut Probe, tag: &str, args: &[&str]) -> Outcome {
    let [nic] = args else {
        return Err("usage: garp NIC");
    };
    let index = nic_index(probe, nic)?;
    let nic = probe.nics[index].as_mut().ok_or("no such NIC")?;
    let driver = nic.driver.as_mut().ok_or("that NIC is not up")?;
    let sent = nic.stack.send_garps(&mut driver.tx);
    println!("={} garp nic={} garps={}", tag, index, sent);
    Ok(())
}

/// A misbehaving driver on purpose: writes VALUE to the NIC's register at
/// OFFSET, COUNT times in a row (what a guest flooding the VMM with bad
/// register writes does; the VMM's log must stay small).
fn mmio_write(probe: &mut Probe, tag: &str, args: &[&str]) -> Outcome {
    let [nic, offset, value, count] = args else {
        return Err("usage: mmio-write NIC OFFSET VALUE COUNT");
    };
    let index = nic_index(probe, nic)?;
    let spec = probe.nics[index].as_ref().ok_or("no such NIC")?.spec;
    let offset = parse_number(offset).ok_or("bad OFFSET")?;
    if offset % 4 != 0 || offset + 4 > spec.size {
        return Err("OFFSET must be 4-aligned and inside the window");
    }
    let value = parse_number(value)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or("bad VALUE")?;
    let count = parse_number(count)
        .filter(|&c| c <= 10_000_000)
        .ok_or("bad COUNT (at most 10000000)")?;
    let register = (spec.base + offset) as *mut u32;
    for _ in 0..count {
        // SAFETY: inside the NIC's register window (checked above), which
        // the identity map covers; the device decides what a write does.
        unsafe { register.write_volatile(value) };
    }
    println!("={} mmio-write nic={} writes={}", tag, index, count);
    Ok(())
}

fn workloads_status(probe: &Probe, tag: &str) -> Outcome {
    println!(
        "={} workloads heartbeat_ms={} heartbeats={}",
        tag, probe.heartbeat.period_ms, probe.heartbeat.count
    );
    match &probe.dirtier {
        Some(d) => println!(
            "={} workloads dirty=on base={:#x} pages={} rate={} pages_written={}",
            tag, d.base, d.pages, d.rate, d.pages_written
        ),
        None => println!("={} workloads dirty=off", tag),
    }
    match &probe.pattern {
        Some(p) => println!(
            "={} workloads pattern=on seed={} size={} checksum={:#018x}",
            tag, p.seed, p.size, p.checksum
        ),
        None => println!("={} workloads pattern=off", tag),
    }
    for (index, nic) in probe.nics.iter().enumerate() {
        if let Some(b) = nic.as_ref().and_then(|n| n.stack.blast) {
            println!(
                "={} workloads udp-blast nic={} dst={}:{} sent={} count={}",
                tag, index, b.dst, b.port, b.sent, b.count
            );
        }
    }
    Ok(())
}
