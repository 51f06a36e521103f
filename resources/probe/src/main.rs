//! Ferry's probe guest: a PVH program that does its work in ring 3 (native
//! speed on kvm_pvm too), with its own virtio-net driver, a small network
//! stack and memory workloads, driven over the serial console.
//! docs/probe.md describes its command line and console protocol.
#![no_std]
#![no_main]

#[macro_use]
mod runtime;
#[macro_use]
mod interrupts;
mod apic;
mod boot;
mod commands;
mod config;
mod cpu;
mod net;
mod platform;
mod pvh;
mod serial;
mod virtio_mmio;
mod virtio_net;
mod workloads;

use core::sync::atomic::Ordering;

use ferry_probe_packets::MacAddr;

use config::{Config, DeviceSpec, IdleMode};
use interrupts::{IRQ_GENERATION, MAX_NICS, NIC_MMIO_BASE, NIC_PENDING, VECTOR_NIC_BASE};
use net::{BlastEvent, Identity, NetStack};
use virtio_mmio::INTERRUPT_CONFIG_CHANGE;
use virtio_net::{VirtioNet, F_GUEST_ANNOUNCE, S_ANNOUNCE, S_LINK_UP};
use workloads::{Arena, Dirtier, Heartbeat, PatternReport};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// How often ring 3 re-reads each NIC's config status, in case a
/// config-change interrupt was lost (e.g. a VMM that pulses a
/// level-triggered line while it is still being serviced).
const STATUS_POLL_NS: u64 = 50_000_000;
/// After activity, keep spinning this long before halting (latency).
const SPIN_BEFORE_HALT_NS: u64 = 2_000_000;
/// The LAPIC timer period: the longest a halted probe sleeps.
const TIMER_PERIOD_MS: u32 = 10;

pub struct Nic {
    pub spec: DeviceSpec,
    pub driver: Option<VirtioNet>,
    pub stack: NetStack,
    pub error: Option<&'static str>,
    pub irq_error: Option<&'static str>,
    link_up: bool,
    last_status_poll_ns: u64,
}

pub struct Probe {
    pub config: Config,
    pub nics: [Option<Nic>; MAX_NICS],
    pub arena: Arena,
    pub heartbeat: Heartbeat,
    pub dirtier: Option<Dirtier>,
    pub pattern: Option<PatternReport>,
    pub halt_when_idle: bool,
}

/// Ring 3 from here on (entered from `boot.rs` with IF=0).
pub extern "C" fn probe_main() -> ! {
    platform::init_ring3();
    println!("probe: boot ferry-probe {}", VERSION);
    // SAFETY: written once by the 32-bit entry before anything else ran.
    let paddr = unsafe { core::ptr::addr_of!(boot::START_INFO_PADDR).read_volatile() };
    let info = pvh::read(paddr);
    let (cmdline, memmap): (&'static str, &[pvh::MemRange]) = match &info {
        Ok(i) => (
            core::str::from_utf8(i.cmdline).unwrap_or(""),
            &i.memmap[..i.memmap_len],
        ),
        Err(e) => {
            println!("probe: error start_info: {}", e);
            ("", &[])
        }
    };
    let config = Config::parse(cmdline);
    for (key, value) in config.errors.iter().flatten() {
        println!("probe: error config bad option {}={}", key, value);
    }
    let (r0, r3) = platform::speed_check();
    let emulated = platform::ring0_is_emulated();
    println!(
        "probe: cpu kvm={} ring0_loop_cycles={} ring3_loop_cycles={} clock={}",
        if emulated { "pvm" } else { "hardware" },
        r0,
        r3,
        if platform::kvmclock_on() {
            "kvmclock"
        } else {
            "tsc"
        }
    );
    let (lapic_id, lapic_version) = apic::init_lapic();
    let pins = apic::init_ioapic();
    println!(
        "probe: apic lapic_id={} lapic_version={:#x} ioapic_pins={}",
        lapic_id, lapic_version, pins
    );
    let serial_route = apic::route(
        serial::COM1_IRQ as u32,
        interrupts::VECTOR_SERIAL,
        apic::Trigger::Edge,
    );
    apic::start_timer(TIMER_PERIOD_MS);
    ring0_service!(interrupts::SERVICE_ENABLE_INTERRUPTS);
    serial::enable_interrupts();
    if let Err(e) = serial_route {
        println!("probe: error serial irq: {}", e);
    }

    // Idling: `hlt` needs ring 0, reached through the SERVICE_IDLE #UD
    // call. On kvm_pvm that works (it was `int n`, not `hlt`, that failed
    // there), and measured under QEMU it costs ~0.1 ms of ping latency
    // against spinning while using ~4% of a host core instead of ~60%,
    // which matters when tests run several guests on two cores. So both
    // kinds halt after SPIN_BEFORE_HALT_NS without work; `probe.idle=spin`
    // keeps the pause loop (lowest latency).
    let halt_when_idle = match config.idle {
        IdleMode::Spin => false,
        IdleMode::Halt | IdleMode::Auto => true,
    };
    let arena = Arena::find(memmap);
    let mut probe = Probe {
        config,
        nics: [const { None }; MAX_NICS],
        arena,
        heartbeat: Heartbeat::default(),
        dirtier: None,
        pattern: None,
        halt_when_idle,
    };
    println!(
        "probe: memory arena={:#x}-{:#x} size_mib={} idle={}",
        arena.start,
        arena.end,
        arena.size() >> 20,
        if halt_when_idle { "halt" } else { "spin" }
    );
    if let Some((_, gsi)) = probe.config.ged {
        if let Err(e) = apic::route(gsi, interrupts::VECTOR_GED, apic::Trigger::Edge) {
            println!("probe: error ged irq: {}", e);
        }
    }
    let up = probe.bring_up_nics();
    probe.start_configured_workloads();
    println!(
        "probe: ready nics={} up={} ids={} uptime_ms={}",
        probe.config.device_count,
        up,
        probe.identity_count(),
        platform::now_ms()
    );
    flood(probe.config.flood);
    probe.run()
}

/// `probe.flood=N`: N numbered lines, none dropped, then a summary.
fn flood(lines: u64) {
    if lines == 0 {
        return;
    }
    let started = platform::now_ms();
    for i in 0..lines {
        let mut line = runtime::LineBuffer::new();
        let _ = core::fmt::Write::write_fmt(
            &mut line,
            format_args!("probe: flood {i:08} abcdefghijklmnopqrstuvwxyz\n"),
        );
        serial::write_waiting(line.as_bytes());
    }
    println!(
        "probe: flood done lines={} ms={}",
        lines,
        platform::now_ms() - started
    );
}

impl Probe {
    fn identity_count(&self) -> usize {
        self.nics
            .iter()
            .flatten()
            .map(|n| n.stack.ids.iter().flatten().count())
            .sum()
    }

    fn bring_up_nics(&mut self) -> usize {
        let mut up = 0;
        let devices = self.config.devices;
        for (index, spec) in devices.iter().enumerate().take(self.config.device_count) {
            let Some(spec) = *spec else {
                continue;
            };
            let mut nic = Nic {
                spec,
                driver: None,
                stack: NetStack::new(),
                error: None,
                irq_error: None,
                link_up: false,
                last_status_poll_ns: 0,
            };
            // Locally administered fallback when the device has no MAC.
            let first_own = self
                .config
                .ids
                .iter()
                .flatten()
                .find(|i| i.nic == index)
                .and_then(|i| i.mac);
            let fallback = first_own.unwrap_or(MacAddr([0x02, 0, 0, 0, 0, 1 + index as u8]));
            NIC_MMIO_BASE[index].store(spec.base, Ordering::Release);
            match VirtioNet::init(index, spec.base, self.config.announce, fallback) {
                Ok(driver) => nic.driver = Some(driver),
                Err(e) => {
                    NIC_MMIO_BASE[index].store(0, Ordering::Release);
                    nic.error = Some(e);
                }
            }
            if nic.driver.is_some() {
                interrupts::NIC_PIN[index].store(spec.irq, Ordering::Relaxed);
                if let Err(e) = apic::route(
                    spec.irq,
                    VECTOR_NIC_BASE + index as u8,
                    apic::Trigger::Level,
                ) {
                    nic.irq_error = Some(e);
                }
            }
            if let Some(driver) = &nic.driver {
                for spec in self.config.ids.iter().flatten().filter(|i| i.nic == index) {
                    let id = Identity {
                        mac: spec.mac.unwrap_or(driver.mac),
                        device_mac: spec.mac.is_none() || spec.mac == Some(driver.mac),
                        vlan: spec.vlan,
                        ip: spec.ip,
                        prefix: spec.prefix,
                        quiet: spec.quiet,
                    };
                    if let Err(e) = nic.stack.add_identity(id) {
                        println!("probe: error nic={} identity {}: {}", index, spec.ip, e);
                    }
                }
            }
            let vlan_filter = nic.program_filters();
            match (&nic.driver, nic.error) {
                (Some(d), _) => {
                    let (rxq, txq, ctrlq) = d.queue_sizes();
                    println!(
                        "probe: nic {} up mac={} addr={:#x} irq={} features={:#x} offered={:#x} queues={}/{}/{} announce={}",
                        index, d.mac, spec.base, spec.irq, d.features, d.offered, rxq, txq, ctrlq,
                        if d.has(F_GUEST_ANNOUNCE) { "on" } else { "off" }
                    );
                    up += 1;
                }
                (None, Some(e)) => {
                    println!("probe: error nic={} addr={:#x}: {}", index, spec.base, e)
                }
                (None, None) => {}
            }
            if let Err(e) = vlan_filter {
                println!("probe: error nic={} filters: {}", index, e);
            }
            if let Some(e) = nic.irq_error {
                println!(
                    "probe: error nic={} irq={}: {} (polling only)",
                    index, spec.irq, e
                );
            }
            if let Some(d) = &mut nic.driver {
                d.set_rx_interrupts(true);
                nic.link_up = d.config_status() & S_LINK_UP != 0 || !d.has(virtio_net::F_STATUS);
            }
            self.nics[index] = Some(nic);
        }
        up
    }

    fn start_configured_workloads(&mut self) {
        if self.config.heartbeat_ms > 0 {
            self.heartbeat
                .set(self.config.heartbeat_ms, platform::now_ms());
        }
        if let Some((seed, size)) = self.config.pattern {
            match self.arena.pattern_region(size) {
                Ok(base) => {
                    let report = workloads::write_pattern(base, size, seed);
                    println!(
                        "probe: pattern written seed={} size={} base={:#x} checksum={:#018x}",
                        seed, size, base, report.checksum
                    );
                    self.pattern = Some(report);
                }
                Err(e) => println!("probe: error pattern: {}", e),
            }
        }
        if let Some((rate, size)) = self.config.dirty {
            if let Err(e) = self.start_dirtier(rate, size) {
                println!("probe: error dirty: {}", e);
            }
        }
    }

    /// Reads the GED's event register (which clears it); on the power
    /// button, says so and powers off through ACPI S5.
    fn serve_ged(&mut self) {
        let Some((addr, _)) = self.config.ged else {
            return;
        };
        // SAFETY: the GED's one-byte event register, identity-mapped MMIO
        // that ring 3 may read.
        let events = unsafe { (addr as *const u8).read_volatile() };
        if events & 1 != 0 {
            println!("probe: power button");
            ring0_service!(interrupts::SERVICE_POWER_OFF);
            println!("probe: error power off: still running");
        }
    }

    pub fn start_dirtier(&mut self, rate: u64, size: u64) -> Result<u64, &'static str> {
        let base = self.arena.dirty_region(size)?;
        if let Some(p) = &self.pattern {
            if base < p.base + p.size && p.base < base + size {
                return Err("dirty region would overlap the memory pattern");
            }
        }
        self.dirtier = Some(Dirtier::new(base, size, rate, platform::now_ns()));
        Ok(base)
    }

    fn run(&mut self) -> ! {
        let mut line = commands::LineReader::new();
        let mut last_busy_ns = 0u64;
        let mut ged_seen = 0u64;
        loop {
            let generation = IRQ_GENERATION.load(Ordering::Acquire);
            let now = platform::now_ns();
            let mut busy = false;
            while let Some(byte) = serial::RX.pop() {
                busy = true;
                if let Some((text, fault)) = line.push(byte) {
                    commands::execute(self, text, fault);
                }
            }
            for index in 0..MAX_NICS {
                if let Some(nic) = self.nics[index].as_mut() {
                    busy |= nic.service(index, now);
                }
            }
            let ged_irqs = interrupts::GED_IRQS.load(Ordering::Acquire);
            if ged_irqs != ged_seen {
                ged_seen = ged_irqs;
                self.serve_ged();
            }
            if let Some(count) = self.heartbeat.due(now / 1_000_000) {
                println!(
                    "probe: heartbeat n={} uptime_ms={}",
                    count,
                    platform::now_ms()
                );
            }
            if let Some(d) = self.dirtier.as_mut() {
                d.step(now);
                busy |= d.rate == 0;
            }
            if busy {
                last_busy_ns = now;
            } else if self.halt_when_idle && now - last_busy_ns > SPIN_BEFORE_HALT_NS {
                ring0_service!(interrupts::SERVICE_IDLE, generation);
            } else {
                core::hint::spin_loop();
            }
        }
    }
}

impl Nic {
    /// Programs the device's MAC table and VLAN filter from the identities.
    pub fn program_filters(&mut self) -> Result<(), &'static str> {
        let Some(driver) = self.driver.as_mut() else {
            return Ok(());
        };
        let mut macs = [MacAddr::ZERO; net::MAX_IDS];
        let n = self.stack.extra_macs(driver.mac, &mut macs);
        if driver.has(virtio_net::F_CTRL_RX) {
            driver.set_mac_table(&macs[..n])?;
        } else if n > 0 {
            return Err("device has no MAC table (CTRL_RX): extra MACs will not be received");
        }
        let mut vlans = [0u16; net::MAX_IDS];
        let n = self.stack.vlans(&mut vlans);
        for &vid in &vlans[..n] {
            if driver.has(virtio_net::F_CTRL_VLAN) {
                driver.vlan(vid, true)?;
            }
        }
        Ok(())
    }

    /// One pass over the NIC: interrupts taken, announce, rx, UDP source.
    /// Returns whether there was anything to do.
    fn service(&mut self, index: usize, now: u64) -> bool {
        let Some(driver) = self.driver.as_mut() else {
            return false;
        };
        interrupts::NIC_IRQS_UNSEEN[index].store(0, Ordering::Relaxed);
        let pending = NIC_PENDING[index].swap(0, Ordering::Acquire);
        let mut busy = pending != 0;
        if pending & INTERRUPT_CONFIG_CHANGE != 0 || now - self.last_status_poll_ns > STATUS_POLL_NS
        {
            self.last_status_poll_ns = now;
            let status = driver.config_status();
            let link = status & S_LINK_UP != 0 || !driver.has(virtio_net::F_STATUS);
            if link != self.link_up {
                self.link_up = link;
                println!(
                    "probe: link nic={} {}",
                    index,
                    if link { "up" } else { "down" }
                );
            }
            if status & S_ANNOUNCE != 0 && driver.has(F_GUEST_ANNOUNCE) {
                let garps = self.stack.send_garps(&mut driver.tx);
                let ack = driver.announce_ack();
                println!(
                    "probe: announce nic={} garps={} round={} ack={}",
                    index,
                    garps,
                    self.stack.counters.announces,
                    if ack.is_ok() { "ok" } else { "err" }
                );
                busy = true;
            }
        }
        let stack = &mut self.stack;
        busy |= driver.poll_rx(64, |frame, tx| stack.handle_frame(frame, tx)) > 0;
        if stack.blast.is_some() {
            busy = true;
            match stack.step_blast(now, &mut driver.tx) {
                Some(BlastEvent::Done { frames, bytes, ms }) => println!(
                    "probe: udp-blast done nic={} frames={} bytes={} ms={}",
                    index, frames, bytes, ms
                ),
                Some(BlastEvent::NoArpReply) => {
                    println!(
                        "probe: udp-blast err nic={} no ARP reply from the destination",
                        index
                    )
                }
                None => {}
            }
        }
        driver.tx.reclaim();
        if interrupts::NIC_STORM_MASKED[index].load(Ordering::Acquire) != 0
            && driver.error.is_none()
        {
            driver.error = Some("interrupt storm: InterruptStatus never clears (irq masked)");
        }
        if let Some(e) = driver.error.or(driver.tx.error) {
            apic::mask(self.spec.irq);
            println!(
                "probe: error nic={} device misbehaved: {} (nic disabled)",
                index, e
            );
            driver
                .transport
                .set_status(driver.transport.status() | virtio_mmio::STATUS_FAILED);
            NIC_MMIO_BASE[index].store(0, Ordering::Release);
            self.error = Some(e);
            self.driver = None;
        }
        busy
    }
}
