//! The Linux guest (Debian's cloud kernel) under Ferry.
//!
//! On every host, kvm_pvm included: its early boot, which runs in a few
//! seconds of guest time even where ring 0 is emulated — the banner, the
//! e820 map matching `--memory`, the initrd, Linux accepting Ferry's
//! RSDP/XSDT/FADT/MADT/DSDT without complaint, and the CPU count from the
//! MADT — through PVH (the ELF's note) and through the 64-bit Linux boot
//! protocol (the same ELF with its PVH note hidden).
//! Where the host has hardware virtualization: boot to the guest's ready
//! marker, check memory and CPUs, and `poweroff -f` ends ferry with 0.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_tests::ferry::{command, run_with_timeout, FerryVm, VmSpec};
use ferry_tests::host::{require_hw_virt, require_kvm, skip, KvmKind};
use ferry_tests::linux::{linux_guest, LinuxGuest, READY_MARKER};

/// Early boot reaches the CPU count within seconds of guest time; wall
/// time on a loaded kvm_pvm host is much longer.
const EARLY: Duration = Duration::from_secs(180);
/// kvm_pvm: how long a bzImage whose decompressor runs on is watched.
const PVM_WAIT: Duration = Duration::from_secs(30);

fn guest(test: &str) -> Option<LinuxGuest> {
    require_kvm(test)?;
    match linux_guest() {
        Ok(g) => Some(g),
        Err(e) if ferry_tests::host::is_ci() => panic!("{test}: no Linux guest: {e}"),
        Err(e) => {
            skip(test, &format!("no Linux guest: {e}"));
            None
        }
    }
}

/// e820 lines Linux prints for a guest of `memory` (below 3 GiB: one RAM
/// range from 1 MiB; above: up to the MMIO gap, then from 4 GiB).
fn expected_ram_lines(memory: u64) -> Vec<String> {
    let line = |start: u64, end: u64| format!("BIOS-e820: [mem {start:#018x}-{end:#018x}] usable");
    let mut lines = vec![line(0, 0x9fbff)];
    let gap = 0xc000_0000u64;
    lines.push(line(0x10_0000, memory.min(gap) - 1));
    if memory > gap {
        lines.push(line(0x1_0000_0000, 0x1_0000_0000 + (memory - gap) - 1));
    }
    lines
}

fn early_boot(test: &str, kernel: &Path, initrd: &Path, cpus: u32, memory: u64) {
    let mut spec = VmSpec::probe("console=ttyS0 earlyprintk=serial,ttyS0");
    spec.kernel = kernel.to_path_buf();
    spec.qmp = false;
    spec.cpus = cpus;
    spec.memory = format!("{}M", memory >> 20);
    spec.extra = vec![
        "--initrd".into(),
        initrd.display().to_string(),
        "--allow-no-userspace".into(),
    ];
    let vm = FerryVm::spawn(test, &spec, None);
    let c = &vm.console;
    c.expect("Linux version ", EARLY);
    for line in expected_ram_lines(memory) {
        c.expect(&line, EARLY);
    }
    c.expect("RAMDISK: [mem 0x", EARLY);
    for table in [
        "RSDP 0x00000000000E0000",
        "XSDT 0x",
        "FACP 0x",
        "DSDT 0x",
        "APIC 0x",
    ] {
        let line = c.expect(&format!("ACPI: {table}"), EARLY);
        assert!(line.contains("FERRY"), "{line}");
    }
    c.expect(
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        EARLY,
    );
    let cpus_line = c
        .wait_for("the CPU count", EARLY, |l| {
            l.contains("Allowing") && l.contains("CPUs")
        })
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    assert!(
        cpus_line.contains(&format!("Allowing {cpus} present CPUs"))
            || cpus_line.contains(&format!("Allowing {cpus} CPUs")),
        "{cpus_line}"
    );
    let out = c.output();
    for complaint in [
        "ACPI Error",
        "ACPI BIOS Error",
        "ACPI Warning",
        "[Firmware Bug]: ACPI",
        "ACPI: Invalid",
        "Checksum",
    ] {
        assert!(
            !out.contains(complaint),
            "{test}: Linux complained ({complaint}):\n{out}"
        );
    }
}

#[test]
fn early_boot_through_pvh_with_one_and_two_cpus() {
    let test = "early_boot_through_pvh_with_one_and_two_cpus";
    let Some(g) = guest(test) else { return };
    assert!(g.has_pvh(), "Debian's kernel is built with CONFIG_PVH");
    let (k, i) = (g.vmlinux.clone(), g.initramfs.clone());
    let two = std::thread::spawn(move || early_boot("pvh-2cpu", &k, &i, 2, 4 << 30));
    early_boot("pvh-1cpu", &g.vmlinux, &g.initramfs, 1, 768 << 20);
    if let Err(e) = two.join() {
        std::panic::resume_unwind(e);
    }
}

/// A copy of the ELF whose Xen PVH note is renamed, so Ferry boots it
/// through the 64-bit Linux boot protocol (zero page) instead.
fn without_pvh_note(vmlinux: &Path) -> PathBuf {
    let mut elf = std::fs::read(vmlinux).expect("read vmlinux");
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(&elf, 32), u16_at(&elf, 54), u16_at(&elf, 56));
    let mut patched = 0;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(&elf, ph) != 4 {
            continue;
        }
        let (start, size) = (u64_at(&elf, ph + 8), u64_at(&elf, ph + 32));
        let mut at = start;
        while at + 12 <= start + size {
            let (namesz, descsz, kind) =
                (u32_at(&elf, at), u32_at(&elf, at + 4), u32_at(&elf, at + 8));
            if elf[at + 12..at + 12 + namesz].starts_with(b"Xen") && kind == 18 {
                elf[at + 8..at + 12].copy_from_slice(&0x7fffu32.to_le_bytes());
                patched += 1;
            }
            at += 12 + namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4;
        }
    }
    assert_eq!(patched, 1, "exactly one PVH note");
    let path = std::env::temp_dir().join(format!("ferry-vmlinux-nopvh-{}", std::process::id()));
    std::fs::write(&path, elf).expect("write copy");
    path
}

#[test]
fn early_boot_through_the_64bit_linux_protocol() {
    let test = "early_boot_through_the_64bit_linux_protocol";
    let Some(g) = guest(test) else { return };
    let copy = without_pvh_note(&g.vmlinux);
    let result =
        std::panic::catch_unwind(|| early_boot("linux64", &copy, &g.initramfs, 2, 1 << 30));
    let _ = std::fs::remove_file(&copy);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn bzimage_enters_the_kernel_through_the_64bit_entry() {
    let test = "bzimage_enters_the_kernel_through_the_64bit_entry";
    let Some(g) = guest(test) else { return };
    let mut spec = VmSpec::probe("console=ttyS0 earlyprintk=serial,ttyS0,115200");
    spec.kernel = g.bzimage.clone();
    spec.qmp = false;
    spec.extra = vec!["--allow-no-userspace".into()];
    let mut vm = FerryVm::spawn(test, &spec, None);
    match require_kvm(test) {
        Some(KvmKind::Hardware) => {
            vm.console.expect("Linux version ", EARLY);
        }
        _ => {
            // kvm_pvm: the decompressor runs in emulated ring 0. One that
            // uses BMI2 (6.12's zstd: shlx) stops on an instruction the
            // emulator lacks; one that does not (6.1's lz4) decompresses
            // on (silent here for minutes), longer than a test waits. Either way the
            // kernel's own code runs from its 64-bit entry: a wrong entry
            // would fault at once (a triple fault ends the VM).
            let started = Instant::now();
            while started.elapsed() < PVM_WAIT {
                if let Some(status) = vm.try_wait() {
                    let err = vm.stderr();
                    assert_eq!(status.code(), Some(2), "{err}");
                    assert!(
                        err.contains("KVM internal error on vCPU 0: emulation failure at RIP 0x"),
                        "{err}"
                    );
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let busy = vm.thread_system_time("ferry-vcpu-0").unwrap_or_default();
            assert!(
                busy >= PVM_WAIT / 4,
                "the vCPU ran only {busy:?} in {PVM_WAIT:?}: is it stuck outside the guest? {}",
                vm.stderr()
            );
            eprintln!(
                "{test}: {} ({}) still running its early code after {PVM_WAIT:?} of emulated ring 0 \
                 (the vCPU busy {busy:?}): entered, no fault",
                g.kernel_release,
                g.bzimage.display()
            );
        }
    }
}

#[test]
fn linux_is_refused_on_kvm_pvm_without_the_flag() {
    let test = "linux_is_refused_on_kvm_pvm_without_the_flag";
    let Some(g) = guest(test) else { return };
    if require_kvm(test) != Some(KvmKind::Pvm) {
        skip(
            test,
            "this host has hardware virtualization: Linux is allowed",
        );
        return;
    }
    for kernel in [&g.vmlinux, &g.bzimage] {
        let out = run_with_timeout(
            command(&["run", "--kernel", kernel.to_str().unwrap()]),
            Duration::from_secs(30),
        );
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stdout.is_empty());
        let line = out.stderr.trim_end();
        assert!(
            !line.contains('\n') && line.contains("kvm_pvm") && line.contains("ferry check"),
            "{line}"
        );
    }
}

fn full_boot(test: &str, g: &LinuxGuest, cpus: u32, memory_mib: u64) {
    let mut spec = VmSpec::probe("console=ttyS0");
    spec.kernel = g.bzimage.clone();
    spec.qmp = false;
    spec.cpus = cpus;
    spec.memory = format!("{memory_mib}M");
    spec.extra = vec!["--initrd".into(), g.initramfs.display().to_string()];
    let mut vm = FerryVm::spawn(test, &spec, None);
    let t = Duration::from_secs(60);
    vm.console.expect(READY_MARKER, t);
    vm.console
        .send_raw("echo CPUS=$(nproc); grep MemTotal /proc/meminfo\n")
        .unwrap();
    let cpus_line = vm.console.expect("CPUS=", t);
    assert!(
        cpus_line.trim_end().ends_with(&format!("CPUS={cpus}")),
        "{cpus_line}"
    );
    let mem = vm.console.expect("MemTotal:", t);
    let kib: u64 = mem
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("MemTotal value");
    // The kernel keeps some memory for itself: within 10% of --memory.
    assert!(
        kib * 1024 <= memory_mib << 20 && kib * 1024 >= (memory_mib << 20) * 9 / 10,
        "{mem}"
    );
    vm.console.send_raw("poweroff -f\n").unwrap();
    let status = vm.wait(t);
    assert_eq!(status.code(), Some(0), "{}", vm.stderr());
}

#[test]
fn boots_to_a_shell_and_powers_off_with_one_and_two_cpus() {
    let test = "boots_to_a_shell_and_powers_off_with_one_and_two_cpus";
    if !require_hw_virt(test) {
        return;
    }
    let Some(g) = guest(test) else { return };
    full_boot("linux-1cpu", &g, 1, 512);
    full_boot("linux-2cpu", &g, 2, 1024);
}
