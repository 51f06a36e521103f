//! The probe guest under QEMU, apart from the network: console protocol,
//! memory workloads, refusing devices it cannot drive, and the ELF itself.

use std::time::Duration;

use ferry_tests::host::require_tool;
use ferry_tests::probe::{
    boot_in_netns, can_run_qemu, fields, Cmdline, QemuConfig, QemuGuest, BOOT,
};

const GUEST_MAC: &str = "52:54:00:12:34:56";
const REPLY: Duration = Duration::from_secs(10);

fn can_run(test: &str) -> bool {
    can_run_qemu(test)
}

/// Boots the probe with `nics` TAPs (the first with GUEST_MAC).
fn boot(test: &str, cmdline: &Cmdline, nics: usize, qmp: bool, force_legacy: bool) -> QemuGuest {
    let mut config = QemuConfig::new(&cmdline.build());
    config.qmp = qmp;
    config.force_legacy = force_legacy;
    let macs: Vec<Option<&str>> = (0..nics).map(|i| (i == 0).then_some(GUEST_MAC)).collect();
    boot_in_netns(test, config, &macs)
}

#[test]
fn boots_to_ready_and_answers_console_commands() {
    if !can_run("boots_to_ready_and_answers_console_commands") {
        return;
    }
    let g = boot("console", &Cmdline::new().heartbeat_ms(50), 0, false, false);
    let c = &g.qemu.console;
    let lines = c.lines();
    let boot_line = lines
        .iter()
        .position(|l| l.starts_with(BOOT))
        .expect("boot line");
    let ready = lines
        .iter()
        .position(|l| l.starts_with("probe: ready "))
        .expect("ready line");
    assert!(
        boot_line < ready,
        "boot line must come first:\n{}",
        c.output()
    );
    let ready_fields = fields(&lines[ready]);
    assert_eq!(ready_fields.get("nics").map(String::as_str), Some("0"));

    let echo = c.send_command("echo hello from the host", REPLY);
    assert_eq!(echo.field("text").as_deref(), Some("hello"), "{echo:?}");
    assert_eq!(echo.lines, vec!["text=hello from the host"]);

    let first = c.send_command("uptime", REPLY).number("ms").expect("ms");
    let beat1 = fields(&c.expect("probe: heartbeat ", REPLY));
    let beat2 = fields(&c.expect("probe: heartbeat ", REPLY));
    let n1: u64 = beat1["n"].parse().unwrap();
    let n2: u64 = beat2["n"].parse().unwrap();
    assert_eq!(n2, n1 + 1);
    let t1: u64 = beat1["uptime_ms"].parse().unwrap();
    let t2: u64 = beat2["uptime_ms"].parse().unwrap();
    assert!(
        t2 >= t1 + 40 && t2 <= t1 + 500,
        "heartbeat spacing {t1} -> {t2}"
    );
    let later = c.send_command("uptime", REPLY).number("ms").expect("ms");
    assert!(later > first, "uptime must advance: {first} -> {later}");

    c.send_command("heartbeat off", REPLY);
    let config = c.send_command("config", REPLY);
    assert_eq!(config.field("heartbeat_ms").as_deref(), Some("0"));

    let unknown = c.try_command("frobnicate now", REPLY).unwrap();
    assert_eq!(unknown.error.as_deref(), Some("unknown command (try help)"));
    let bad = c
        .try_command("id-add 0 dev none 198.18.0.9/24", REPLY)
        .unwrap();
    assert_eq!(bad.error.as_deref(), Some("no such NIC"));
    let long = format!("echo {}", "x".repeat(400));
    let overlong = c.try_command(&long, REPLY).unwrap();
    assert_eq!(overlong.error.as_deref(), Some("line too long"));
    // Still alive after all that.
    c.send_command("uptime", REPLY);
}

#[test]
fn memory_pattern_verifies_while_memory_is_dirtied() {
    if !can_run("memory_pattern_verifies_while_memory_is_dirtied") {
        return;
    }
    let cmdline = Cmdline::new().pattern(42, "32M").dirty("64M", "16M");
    let g = boot("memory", &cmdline, 0, false, false);
    let c = &g.qemu.console;
    let written = fields(&c.expect_seen("probe: pattern written"));
    let verify = c.send_command("pattern-verify", REPLY);
    assert_eq!(verify.field("checksum"), written.get("checksum").cloned());
    assert_eq!(verify.number("bad_pages"), Some(0));

    let before = c.send_command("workloads", REPLY);
    assert!(
        before.lines.iter().any(|l| l.starts_with("dirty=on")),
        "{before:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let pages = |r: &ferry_tests::probe::Reply| r.number("pages_written").unwrap();
    let after = c.send_command("workloads", REPLY);
    let dirtied = pages(&after) - pages(&before);
    // 64 MiB/s is 16384 pages/s: in >= 300 ms at least ~4900 pages.
    assert!(dirtied >= 3000, "dirtied only {dirtied} pages in 300 ms");

    let wrong = c.try_command("pattern-verify 43 32M", REPLY).unwrap();
    assert_eq!(wrong.error.as_deref(), Some("pattern mismatch"));
    assert!(wrong.number("bad_pages").unwrap() > 0);

    let rewritten = c.send_command("pattern-write 7 8M", REPLY);
    let again = c.send_command("pattern-verify", REPLY);
    assert_eq!(again.field("checksum"), rewritten.field("checksum"));
    assert_eq!(again.field("seed").as_deref(), Some("7"));
    let clash = c.try_command("pattern-write 1 200M", REPLY).unwrap();
    assert!(
        clash.error.is_some(),
        "a pattern larger than RAM must be refused"
    );
    c.send_command("dirty off", REPLY);
}

#[test]
fn refuses_legacy_and_unmapped_devices_with_a_clear_line() {
    if !can_run("refuses_legacy_and_unmapped_devices_with_a_clear_line") {
        return;
    }
    // NIC 0: an empty transport (legacy too: force-legacy is global);
    // NIC 1: nothing mapped at all; NIC 2: QEMU's NIC, forced legacy.
    let cmdline = Cmdline::new()
        .device("512", 0xfeb0_0000, 5)
        .device("4K", 0xd000_0000, 6)
        .identity(2, None, None, "198.18.0.2/24");
    let g = boot("legacy", &cmdline, 1, false, true);
    let c = &g.qemu.console;
    let out = c.output();
    assert!(
        out.contains("probe: error nic=0 addr=0xfeb00000: legacy virtio-mmio"),
        "{out}"
    );
    assert!(
        out.contains("probe: error nic=1 addr=0xd0000000: no virtio-mmio device"),
        "{out}"
    );
    assert!(
        out.contains("probe: error nic=2 addr=0xfeb00e00: legacy virtio-mmio device (version 1) not supported"),
        "{out}"
    );
    let ready = fields(
        c.lines()
            .iter()
            .find(|l| l.starts_with("probe: ready"))
            .unwrap(),
    );
    assert_eq!(ready.get("nics").map(String::as_str), Some("3"));
    assert_eq!(ready.get("up").map(String::as_str), Some("0"));
    let config = c.send_command("config", REPLY);
    assert_eq!(
        config
            .lines
            .iter()
            .filter(|l| l.contains("state=down"))
            .count(),
        3
    );
    let refused = c.try_command("counters-reset 2", REPLY).unwrap();
    assert!(refused.is_ok() || refused.error.is_some());
    c.send_command("uptime", REPLY);
}

/// The ELF a PVH loader needs, and ring-0 code that kvm_pvm's emulator can
/// run: no SSE registers in the ring-0 sections (the emulator lacks SSE
/// arithmetic, and ring-0 handlers must not clobber ring 3's XMM state) and
/// no calls out of them.
#[test]
fn probe_elf_has_a_pvh_note_and_sse_free_ring0_code() {
    let test = "probe_elf_has_a_pvh_note_and_sse_free_ring0_code";
    if !require_tool(test, "objdump") || !require_tool(test, "readelf") {
        return;
    }
    let elf = ferry_tests::probe::probe_elf();
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().expect("binutils");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let notes = run(std::process::Command::new("readelf").arg("-n").arg(&elf));
    assert!(
        notes.contains("Xen") && notes.contains("0x00000012"),
        "no XEN_ELFNOTE_PHYS32_ENTRY note:\n{notes}"
    );
    let symbols = run(std::process::Command::new("nm").arg(&elf));
    let address = |name: &str| {
        symbols
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .and_then(|l| u64::from_str_radix(l.split_whitespace().next()?, 16).ok())
            .unwrap_or_else(|| panic!("symbol {name} missing"))
    };
    let (start, end) = (address("pvh_entry32"), address("__ring0_text_end"));
    assert!(end > start);
    let text = run(std::process::Command::new("objdump")
        .args([
            "-d",
            "-M",
            "intel",
            &format!("--start-address={start:#x}"),
            &format!("--stop-address={end:#x}"),
        ])
        .arg(&elf));
    let sse: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("xmm") || l.contains("ymm"))
        .collect();
    assert!(sse.is_empty(), "SSE in ring-0 code:\n{}", sse.join("\n"));
    for line in text
        .lines()
        .filter(|l| l.contains("\tcall ") || l.contains("\tjmp "))
    {
        let Some(target) = line
            .split('\t')
            .next_back()
            .and_then(|op| op.split_whitespace().nth(1))
            .and_then(|t| u64::from_str_radix(t, 16).ok())
        else {
            continue; // indirect
        };
        assert!(
            (start..end).contains(&target),
            "ring-0 code leaves its section: {line}"
        );
    }
}
