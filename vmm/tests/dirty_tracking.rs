//! Pages the VMM itself writes into guest memory (virtio rx buffers, used
//! rings) never show up in KVM's dirty log; migration must still send
//! them. This writes guest memory the way the devices do, on a real KVM VM
//! with dirty logging on, and checks the page is in the next dirty set —
//! and that KVM's log alone would have missed it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm::builder;
use vmm::check::kvm_kind;
use vmm::config::{MachineConfig, SerialConfig};
use vmm::migrate::ram::{set_dirty_logging, take_dirty};

#[test]
fn a_page_written_only_by_the_vmm_is_dirty() {
    if vmm::check::probe().is_err() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI requires /dev/kvm");
        }
        eprintln!("SKIPPED a_page_written_only_by_the_vmm_is_dirty: no usable /dev/kvm");
        return;
    }
    let machine = MachineConfig {
        memory_bytes: 64 << 20,
        vcpus: 1,
    };
    let m = builder::build(
        &machine,
        &[],
        &SerialConfig::None,
        kvm_kind(),
        Default::default(),
    )
    .expect("build");
    let parts = &m.parts;
    set_dirty_logging(parts, true).expect("dirty logging on");
    take_dirty(parts).expect("clear");

    // What KVM alone reports for a VMM write: nothing.
    let gpa = 0x123_4000u64;
    let page = (gpa / 4096) as usize;
    parts
        .memory
        .write_slice(&[0xab; 64], GuestAddress(gpa))
        .expect("write");
    let slot0 = parts.memory.iter().next().expect("region");
    let kvm_only = parts
        .vm_fd
        .get_dirty_log(0, vm_memory::GuestMemoryRegion::len(slot0) as usize)
        .expect("log");
    assert_eq!(
        kvm_only[page / 64] & (1 << (page % 64)),
        0,
        "KVM cannot see writes by the VMM"
    );

    parts
        .memory
        .write_slice(&[0xcd; 64], GuestAddress(gpa))
        .expect("write again");
    let dirty = take_dirty(parts).expect("take");
    assert_ne!(
        dirty.regions[0][page / 64] & (1 << (page % 64)),
        0,
        "the VMM's own write is sent"
    );
    assert_eq!(dirty.count(), 1, "exactly that page");
    assert_eq!(take_dirty(parts).expect("take").count(), 0, "taking clears");
}
