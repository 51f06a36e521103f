//! Two "hosts" for migration tests: network namespaces A and B joined by a
//! veth (A 198.18.1.1, B 198.18.1.2), each with a TAP whose host
//! side is 198.18.0.1/24 — the same L2 view on both, as two hypervisors on
//! one segment would give a guest at 198.18.0.2.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::ferry::FerryVm;
use crate::netns::Netns;

pub const A_ADDR: &str = "198.18.1.1";
pub const B_ADDR: &str = "198.18.1.2";
pub const GUEST_ADDR: &str = "198.18.0.2";
/// The TAP names differ on purpose: the destination's `--net` must
/// override the TAP name the stream carries.
pub const A_TAP: &str = "tap0";
pub const B_TAP: &str = "tapb";

pub struct TwoHosts {
    pub a: Netns,
    pub b: Netns,
}

impl TwoHosts {
    pub fn new(test: &str) -> TwoHosts {
        let hosts = TwoHosts::linked(test);
        hosts.add_taps();
        hosts
    }

    /// Each host's TAP for the guest, host side 198.18.0.1/24.
    pub fn add_taps(&self) {
        for (ns, tap) in [(&self.a, A_TAP), (&self.b, B_TAP)] {
            ns.add_tap(tap).expect("tap");
            ns.add_addr(tap, "198.18.0.1/24").expect("tap addr");
        }
    }

    /// Only the two namespaces and the migration link between them; the
    /// guest's side of each host is the caller's (see `crate::switch`).
    pub fn linked(test: &str) -> TwoHosts {
        let a = Netns::new(&format!("{test}a")).expect("netns A");
        let b = Netns::new(&format!("{test}b")).expect("netns B");
        Netns::veth_pair(&a, "vha", &b, "vhb").expect("veth");
        a.add_addr("vha", &format!("{A_ADDR}/24")).expect("addr A");
        b.add_addr("vhb", &format!("{B_ADDR}/24")).expect("addr B");
        TwoHosts { a, b }
    }

    /// Shapes the migration link both ways to `rate` (tc's units:
    /// "10gbit", "1gbit") with a token bucket (`tc qdisc ... tbf`), a
    /// bucket deep enough for the rate at any kernel tick rate.
    pub fn shape(&self, rate: &str) {
        for (ns, dev) in [(&self.a, "vha"), (&self.b, "vhb")] {
            ns.run(&[
                "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "8mb",
                "latency", "20ms",
            ])
            .expect("tc tbf on the migration link");
        }
    }

    /// Takes the shaping of [`Self::shape`] off again.
    pub fn unshape(&self) {
        for (ns, dev) in [(&self.a, "vha"), (&self.b, "vhb")] {
            let _ = ns.run(&["tc", "qdisc", "del", "dev", dev, "root"]);
        }
    }
}

/// Polls `query-migrate` on `vm` until the migration ends; returns the
/// last answer. Panics after `timeout`.
pub fn wait_migration(vm: &FerryVm, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    let mut qmp = vm.qmp();
    loop {
        let info = qmp.execute("query-migrate", None).expect("query-migrate");
        if let Some("completed" | "failed" | "cancelled") = info["status"].as_str() {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "migration still {info} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a migration from `vm` to `uri`.
pub fn migrate(vm: &FerryVm, uri: &str) {
    vm.execute("migrate", json!({ "uri": uri }))
        .expect("migrate");
}

/// A migration's final `query-migrate` says completed; if not, the
/// failure shows both ends' stderr.
pub fn assert_completed(info: &Value, src: &FerryVm, dst: &FerryVm) {
    assert_eq!(
        info["status"],
        "completed",
        "{info}\nsource stderr: {}\ndestination stderr: {}",
        src.stderr(),
        dst.stderr()
    );
}

/// Waits until `vm`'s runstate is `want` (a restore from a file answers
/// QMP while it loads, in `inmigrate`).
pub fn wait_status(vm: &FerryVm, want: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let now = status(vm);
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still {now}, not {want}, after {timeout:?}; stderr: {}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn status(vm: &FerryVm) -> String {
    vm.execute("query-status", json!({})).expect("query-status")["status"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// QEMU's way: the capability and the channel count, on each end.
pub fn set_multifd(vm: &FerryVm, channels: Option<u64>) {
    vm.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "multifd", "state": channels.is_some() }] }),
    )
    .expect("multifd capability");
    if let Some(n) = channels {
        vm.execute("migrate-set-parameters", json!({ "multifd-channels": n }))
            .expect("multifd-channels");
    }
}

/// The guest keeps beating: three more heartbeats within 10 s.
pub fn heartbeat_goes_on(vm: &FerryVm) {
    let n = crate::probe::heartbeat::last_heartbeat(&vm.console);
    let deadline = Instant::now() + Duration::from_secs(10);
    while crate::probe::heartbeat::last_heartbeat(&vm.console) <= n + 2 {
        assert!(Instant::now() < deadline, "heartbeat stuck at {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
