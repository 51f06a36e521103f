//! A guest that floods Ferry with bad register writes cannot flood the
//! host's log: the probe writes a status that clears bits (refused, with
//! a warning) 20,000 times; Ferry logs one line for that kind of fault
//! per second, the next one counts those held back, and the NIC works on.

use std::time::{Duration, Instant};

use ferry_tests::ferry::{FerryVm, VmSpec};
use ferry_tests::host::{require_kvm, require_root};
use ferry_tests::netns::Netns;
use ferry_tests::probe::{Cmdline, READY};

const T: Duration = Duration::from_secs(60);
/// virtio-mmio's Status register.
const STATUS: u32 = 0x70;

fn lines(vm: &FerryVm) -> Vec<String> {
    vm.stderr()
        .lines()
        .filter(|l| l.contains("clears bits"))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_guest_hammering_a_bad_register_gets_one_line_a_second() {
    let test = "a_guest_hammering_a_bad_register_gets_one_line_a_second";
    if require_kvm(test).is_none() || !require_root(test) {
        return;
    }
    let ns = Netns::new("glimit").expect("netns");
    ns.add_tap("tap0").expect("tap");
    ns.add_addr("tap0", "198.18.0.1/24").expect("addr");
    let cmdline = Cmdline::new().identity(0, None, None, "198.18.0.2/24");
    let mut spec = VmSpec::probe(&cmdline.build());
    spec.nets = vec!["tap=tap0".into()];
    let vm = FerryVm::spawn(test, &spec, Some(&ns));
    vm.console.expect(READY, T);

    let started = Instant::now();
    let reply = vm
        .console
        .send_command(&format!("mmio-write 0 {STATUS:#x} 1 20000"), T);
    assert_eq!(reply.number("writes"), Some(20_000), "{:?}", reply.lines);
    let first = started.elapsed();
    // A second burst, after the interval: its first line counts what the
    // first burst's were held back.
    std::thread::sleep(Duration::from_millis(1100));
    vm.console
        .send_command(&format!("mmio-write 0 {STATUS:#x} 1 1000"), T);
    let took = started.elapsed();
    let logged = lines(&vm);
    let bound = took.as_secs() as usize + 2;
    assert!(
        !logged.is_empty() && logged.len() <= bound,
        "{} lines for 21,000 bad writes in {took:?} (at most {bound}): {logged:#?}",
        logged.len()
    );
    assert!(
        logged.iter().any(|l| l.contains("more like it not logged")),
        "no line counts the ones held back: {logged:#?}"
    );
    assert!(
        vm.stderr().len() < 4096,
        "stderr grew to {} bytes",
        vm.stderr().len()
    );
    eprintln!(
        "20,000 bad writes in {first:?}, 1,000 more after a pause: {} lines logged",
        logged.len()
    );
    let ping = ns
        .exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", "198.18.0.2"])
        .expect("ping");
    assert!(ping.status.success(), "the NIC stopped answering");
}
