//! Live migration, snapshot and restore: Ferry beside QEMU 7.2 (`-M
//! microvm,acpi=off,ioapic2=off -enable-kvm`), the same probe guest, the
//! same two namespace "hosts" joined by a veth (tests/src/hosts.rs),
//! migrating over TCP from host A to host B, the same downtime limit (300
//! ms, set explicitly on both) and no bandwidth limit on either (QEMU's
//! default of 128 MiB/s is lifted).
//!
//! - idle guest of 256 MiB, 1 GiB and 4 GiB: total time, downtime and bytes
//!   sent as each VMM's `query-migrate` reports them, and the downtime seen
//!   from outside: the silence of a UDP echo stream across the move (one
//!   datagram per ms to the probe's port 7, sent from both hosts at once,
//!   each host's TAP with a permanent neighbour entry for the guest's
//!   MAC), from the last echo answered on A to the first answered on B.
//!   That figure includes up to one sending interval (1 ms), the echo
//!   round trip and the destination's start after it acknowledged; the
//!   longest silence of the same stream in the second before the
//!   migration is its noise floor.
//! - a 1 GiB guest dirtying memory (`probe.dirty=RATE,SIZE`): 50 MB/s over
//!   256 MiB; unthrottled over 256 MiB (the whole region dirty on every
//!   pass, which still fits the limit at this link's rate: a big last
//!   pass); unthrottled over 768 MiB (beyond what converges unthrottled),
//!   with each VMM's default (Ferry auto-converges, QEMU does not) and
//!   with auto-converge on in both: passes (`dirty-sync-count`),
//!   downtime, converged or not. Ferry gives up after `x-max-passes` (30)
//!   with an error; QEMU keeps going, so it is cancelled
//!   (`migrate_cancel`) after a bound and counted as not converged.
//! - snapshot of a 1 GiB guest: Ferry `migrate file:`, QEMU `migrate
//!   exec:cat > FILE` (QEMU's way: a live migration into a pipe); restore:
//!   `ferry run --incoming file:` / `qemu -incoming exec:cat FILE`, timed
//!   from the process's spawn to QMP `query-status` = running and to the
//!   guest's first heartbeat (every 2 ms). The file is in the page cache.
//!
//! The VMMs take turns (which goes first alternates); medians of
//! FERRY_BENCH_RUNS runs (default 3). FERRY_BENCH_VERBOSE=1 prints every
//! run, FERRY_BENCH_ONLY=ferry|qemu measures one side,
//! FERRY_BENCH_PARTS=idle,dirty,snapshot picks sections (`echo` adds
//! the echo stream's gaps without a migration, its noise floor) and
//! FERRY_BENCH_SIZES=256,1024,4096 the idle sizes (MiB),
//! FERRY_BENCH_DIRTY=50M/256M,max/256M,max/768M,max/768M+ac the dirtying
//! loads (`+ac`: auto-converge on in both). With
//! FERRY_BENCH_VERBOSE=1 Ferry runs with FERRY_LOG=info and its log lines
//! on the stop-and-copy phases are printed.
//!
//! - guests that hold data (FERRY_BENCH_PARTS=populated): 4 GiB holding
//!   2 GiB (FERRY_BENCH_POPULATED=4096/2G,9216/6G), over the unshaped veth
//!   and one shaped to 10 Gbit/s (FERRY_BENCH_LINKS=veth,10gbit), each VMM
//!   on one stream and with multifd (FERRY_BENCH_CHANNELS, default 2), the
//!   destination configured through `-incoming defer` as libvirt does; the
//!   pattern is verified after every run; iperf3 on the same path in the
//!   same runs; median and worst; one run's timeline drawn. `growth`:
//!   total time against populated bytes and downtime against guest size.
//!   `slowlink`: a 1 GiB guest dirtying 50 MB/s over 1 Gbit/s, 2 ms RTT.
//! - TLS (FERRY_BENCH_PARTS=tls): the populated guest (4 GiB holding 2 GiB,
//!   FERRY_BENCH_TLS_GUEST) over TLS and in plaintext, one stream and
//!   multifd, both VMMs with the same certificates (see [`tls`]).
//!
//! Layout: [`guests`] starts the probe on either host, [`live`] runs and
//! measures one migration, [`echo`] is the UDP stream that sees its
//! downtime from outside, [`snapshot`] saves to and restores from a file,
//! [`sections`] holds the rows of each table and [`table`] their cells.
//!
//! `cargo bench -p ferry-tests --bench migration` (root, KVM, QEMU).

mod echo;
mod guests;
mod live;
mod populated;
mod sections;
mod snapshot;
mod table;
mod tls;

use std::time::{Duration, Instant};

use ferry_tests::bench_net::env_or;
use ferry_tests::bench_net::GUEST_MAC;
use ferry_tests::ferry::ferry_bin;
use ferry_tests::host::{require_kvm, require_root, require_tool};
use ferry_tests::hosts::{TwoHosts, A_TAP, B_TAP, GUEST_ADDR};
use ferry_tests::probe::probe_elf;
use ferry_tests::vmms::Vmm;

const DOWNTIME_LIMIT_MS: u64 = 300;
/// How long QEMU may try to migrate a guest that does not converge.
const QEMU_BOUND: Duration = Duration::from_secs(30);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(180);
/// Heartbeat period of the snapshot guest.
const SNAPSHOT_HEARTBEAT_MS: u64 = 2;

struct Env {
    runs: usize,
    verbose: bool,
    vmms: Vec<Vmm>,
    hosts: TwoHosts,
    port: u16,
}

impl Env {
    fn next_port(&mut self) -> u16 {
        self.port += 1;
        self.port
    }

    /// Both VMMs once per run, alternating which goes first.
    fn order(&self, run: usize) -> Vec<Vmm> {
        let mut order = self.vmms.clone();
        if run % 2 == 1 {
            order.reverse();
        }
        order
    }
}

fn verbose() -> bool {
    std::env::var("FERRY_BENCH_VERBOSE").is_ok_and(|v| v == "1")
}

/// The 1-minute load average: this machine is shared, the figures say
/// under what load they were taken.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Permanent neighbour entries for the guest on both hosts' TAPs, so the
/// echo stream needs no ARP on either side of the move.
pub(crate) fn pin_guest_neighbour(hosts: &TwoHosts) {
    for (ns, tap) in [(&hosts.a, A_TAP), (&hosts.b, B_TAP)] {
        ns.run(&[
            "ip",
            "neigh",
            "replace",
            GUEST_ADDR,
            "lladdr",
            GUEST_MAC,
            "dev",
            tap,
            "nud",
            "permanent",
        ])
        .expect("neighbour entry");
    }
}

fn main() {
    let name = "migration";
    if require_kvm(name).is_none()
        || !require_root(name)
        || !require_tool(name, "qemu-system-x86_64")
        || !require_tool(name, "ip")
    {
        return;
    }
    let only = std::env::var("FERRY_BENCH_ONLY").ok();
    let parts = std::env::var("FERRY_BENCH_PARTS").unwrap_or_else(|_| "idle,dirty,snapshot".into());
    let sizes: Vec<u32> = std::env::var("FERRY_BENCH_SIZES")
        .unwrap_or_else(|_| "256,1024,4096".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    // Both builds before the first timing, so none of them pays for one.
    let _ = probe_elf();
    let _ = ferry_bin();
    let hosts = TwoHosts::new("migbench");
    pin_guest_neighbour(&hosts);
    let mut env = Env {
        runs: env_or("FERRY_BENCH_RUNS", 3).max(1),
        verbose: verbose(),
        vmms: [Vmm::Ferry, Vmm::Qemu]
            .into_iter()
            .filter(|v| only.as_deref().is_none_or(|o| o == v.name()))
            .collect(),
        hosts,
        port: 4400,
    };
    let kind = match require_kvm(name) {
        Some(k) => format!("{k:?}"),
        None => "?".into(),
    };
    let started = Instant::now();
    println!();
    println!(
        "Migration, probe guest, Ferry vs QEMU 7.2 microvm; KVM {kind}, {} CPUs, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    for part in parts.split(',') {
        match part.trim() {
            "idle" => sections::idle(&mut env, &sizes),
            "dirty" => sections::dirty(&mut env),
            "snapshot" => sections::snapshot(&mut env),
            "echo" => sections::echo_floor(&mut env),
            "populated" => populated::populated(&mut env),
            "growth" => populated::growth(&mut env),
            "slowlink" => populated::slow_link(&mut env),
            "tls" => tls::tls(&mut env),
            other => eprintln!(
                "unknown part {other:?} (idle, dirty, snapshot, echo, populated, growth, slowlink, tls)"
            ),
        }
    }
    println!();
    println!(
        "({:.0} s in all; load average {} at the end)",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
}
