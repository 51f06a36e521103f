//! Ferry's ACPI tables as an independent AML disassembler (ACPICA's
//! `iasl -d`) reads them: the DSDT describes each virtio-mmio device as
//! LNRO0005 with its window and interrupt, and every table disassembles
//! without errors.

use std::path::Path;
use std::process::Command;

use ferry_tests::host::{require_tool, TempPath};
use vmm::acpi::{build, VirtioMmioDevice};

fn disassemble(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let aml = dir.join(format!("{name}.dat"));
    std::fs::write(&aml, bytes).unwrap();
    let out = Command::new("iasl")
        .arg("-d")
        .arg(&aml)
        .current_dir(dir)
        .output()
        .expect("run iasl");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl -d {name} failed:\n{log}");
    assert!(
        !log.contains("Error") && !log.to_lowercase().contains("checksum is incorrect"),
        "iasl {name}:\n{log}"
    );
    std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap()
}

/// The disassembly without comments, on one line, single-spaced.
fn squash(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("/*") {
        out.push_str(&rest[..start]);
        rest = rest[start..]
            .find("*/")
            .map_or("", |end| &rest[start + end + 2..]);
    }
    out.push_str(rest);
    let no_line_comments: Vec<&str> = out
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect();
    no_line_comments
        .join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn iasl_reads_every_table_and_finds_the_virtio_devices() {
    if !require_tool(
        "iasl_reads_every_table_and_finds_the_virtio_devices",
        "iasl",
    ) {
        return;
    }
    let dir = TempPath::new("iasl");
    std::fs::create_dir_all(&dir).unwrap();
    let virtio = [
        VirtioMmioDevice {
            base: 0xd000_0000,
            size: 0x1000,
            irq: 5,
        },
        VirtioMmioDevice {
            base: 0xd000_1000,
            size: 0x1000,
            irq: 6,
        },
    ];
    let (tables, _) = build(2, &virtio);

    let dsdt = squash(&disassemble(&dir, "dsdt", &tables.dsdt));
    for (i, dev) in virtio.iter().enumerate() {
        let name = format!("Device (_SB.V{i:03X})");
        let start = dsdt
            .find(&name)
            .unwrap_or_else(|| panic!("{name} missing in:\n{dsdt}"));
        let body = &dsdt[start..];
        let body = &body[..body[1..]
            .find("Device (")
            .map(|e| e + 1)
            .unwrap_or(body.len())];
        assert!(body.contains("Name (_HID, \"LNRO0005\")"), "{body}");
        assert!(
            body.contains(&format!(
                "Name (_UID, {})",
                if i == 0 {
                    "Zero".to_string()
                } else {
                    "One".to_string()
                }
            )),
            "{body}"
        );
        assert!(
            body.contains(&format!(
                "Memory32Fixed (ReadWrite, 0x{:08X}, 0x{:08X}, )",
                dev.base, dev.size
            )),
            "{body}"
        );
        assert!(
            body.contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )"),
            "{body}"
        );
        assert!(
            body.contains(&format!("{{ 0x{:08X}, }}", dev.irq)),
            "{body}"
        );
    }
    assert!(
        dsdt.contains("Name (_S5, Package (0x01) { 0x05 })"),
        "{dsdt}"
    );
    assert!(
        dsdt.contains("Name (_HID, EisaId (\"PNP0501\") )"),
        "{dsdt}"
    );
    // The power button: a GED whose _EVT notifies PWRB.
    let ged = &dsdt[dsdt
        .find("Device (_SB.GED)")
        .unwrap_or_else(|| panic!("no GED in:\n{dsdt}"))..];
    for part in [
        "Name (_HID, \"ACPI0013\"",
        "{ 0x00000017, }",
        "OperationRegion (GDST, SystemMemory, 0xCFFFF000, One)",
        "GDAT, 8",
        "Method (_EVT, 1, Serialized) { Local0 = GDAT Local1 = (Local0 & One) If ((Local1 == One))",
        "Notify (\\_SB.PWRB, 0x80)",
    ] {
        assert!(ged.contains(part), "{part} missing in:\n{ged}");
    }
    assert!(
        dsdt.contains("Device (_SB.PWRB) { Name (_HID, EisaId (\"PNP0C0C\") )"),
        "{dsdt}"
    );

    let fadt = squash(&disassemble(&dir, "facp", &tables.fadt));
    assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
    assert!(fadt.contains("Reset Register Supported (V2) : 1"), "{fadt}");
    let madt = squash(&disassemble(&dir, "apic", &tables.madt));
    assert_eq!(madt.matches("Processor Local APIC").count(), 2, "{madt}");
    assert!(madt.contains("Address : FEC00000"), "{madt}");
    disassemble(&dir, "xsdt", &tables.xsdt);
}
