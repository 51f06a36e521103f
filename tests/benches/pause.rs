//! Pause and resume latency through QMP: `stop` returns only once every
//! vCPU is parked outside KVM_RUN and the devices are quiet, so its
//! round-trip time bounds "command received → all vCPUs parked"; `cont`
//! likewise for resume. Probe guest, 1 and 2 vCPUs, median of 100.
//!
//! Run with `cargo bench -p ferry-tests --bench pause`.

use std::time::{Duration, Instant};

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::probe::READY;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p90(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() * 9 / 10]
}

fn main() {
    let runs: usize = std::env::var("FERRY_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    println!("\nPause/resume through QMP (client round trip), {runs} cycles each.");
    println!("| vCPUs | stop median | stop p90 | cont median | cont p90 |");
    println!("|-------|-------------|----------|-------------|----------|");
    for cpus in [1, 2] {
        let mut spec = VmSpec::probe("probe.heartbeat=10");
        spec.cpus = cpus;
        let vm = FerryVm::spawn("bench-pause", &spec, None);
        vm.console.expect(READY, Duration::from_secs(30));
        let mut c = vm.qmp();
        let (mut stops, mut conts) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            // Let the guest run a little between cycles.
            std::thread::sleep(Duration::from_millis(2));
            let t = Instant::now();
            c.execute("stop", None).expect("stop");
            stops.push(t.elapsed());
            let t = Instant::now();
            c.execute("cont", None).expect("cont");
            conts.push(t.elapsed());
        }
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "| {cpus:>5} | {:>8.0} µs | {:>5.0} µs | {:>8.0} µs | {:>5.0} µs |",
            us(median(stops.clone())),
            us(p90(stops)),
            us(median(conts.clone())),
            us(p90(conts))
        );
    }
}
