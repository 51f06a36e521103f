//! ACPI tables: RSDP → XSDT → FADT (→ DSDT) and MADT.
//!
//! The platform is hardware-reduced ACPI like Firecracker's and Cloud
//! Hypervisor's: no SCI, no PM timer; power-off and reset go through the
//! FADT's sleep-control and reset registers (devices::acpi_pm). The DSDT
//! describes COM1 and every virtio-mmio device as `LNRO0005`, which is how
//! stock distribution kernels (virtio_mmio built as a module, no cmdline
//! devices) find them.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::acpi_ged::{EVENT_POWER_BUTTON, GED_LEN};
use devices::acpi_pm;
use devices::legacy::serial::{COM1_BASE, COM1_IRQ};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_START, GED_IRQ, GED_START, IOAPIC_START, MPTABLE_START, RSDP_START};
use crate::memory::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"FERRY ";
const OEM_TABLE_ID: [u8; 8] = *b"FERRYVM ";
const OEM_REVISION: u32 = 1;

/// FADT IA-PC boot architecture flags: no VGA, no MSI, no CMOS RTC.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel PIC).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_FLAGS_OFFSET: usize = 40;

/// A virtio-mmio device as the guest must see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// The finished tables, each as the bytes that go into guest memory.
pub struct AcpiTables {
    pub rsdp: Vec<u8>,
    pub xsdt: Vec<u8>,
    pub fadt: Vec<u8>,
    pub madt: Vec<u8>,
    pub dsdt: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit in the BIOS area")]
    TooLarge(u64),
    #[error("cannot write ACPI tables to guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The Notify value of a power button press (ACPI 4.8.3.1.1).
const POWER_BUTTON_PRESSED: u8 = 0x80;

fn aml_bytes(item: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    item.to_aml_bytes(&mut v);
    v
}

/// The DSDT: `\_S5_` for power-off, COM1, and one `LNRO0005` device per
/// virtio-mmio window.
pub fn dsdt(virtio: &[VirtioMmioDevice]) -> Vec<u8> {
    let mut body = Vec::new();

    // SLP_TYPa for S5; devices::acpi_pm expects this value.
    let s5 = aml::Package::new(vec![&acpi_pm::S5_SLEEP_TYPE]);
    body.extend(aml_bytes(&aml::Name::new("_S5_".into(), &s5)));

    // Each device is serialized in one expression: the AML builders borrow
    // their children, which must outlive the serialization.
    body.extend(aml_bytes(&aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(COM1_BASE as u16, COM1_BASE as u16, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
                ]),
            ),
        ],
    )));

    // The power button: a GED whose _EVT reads the event register (which
    // clears it) and notifies PWRB when bit 0 was set (devices::acpi_ged).
    body.extend(aml_bytes(&aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true, true, false, false, GED_IRQ,
                )]),
            ),
            &aml::OpRegion::new(
                "GDST".into(),
                aml::OpRegionSpace::SystemMemory,
                &(GED_START as u32),
                &(GED_LEN as u32),
            ),
            &aml::Field::new(
                "GDST".into(),
                aml::FieldAccessType::Byte,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::WriteAsZeroes,
                vec![aml::FieldEntry::Named(*b"GDAT", 8)],
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &aml::Store::new(&aml::Local(0), &aml::Path::new("GDAT")),
                    &aml::And::new(&aml::Local(1), &aml::Local(0), &EVENT_POWER_BUTTON),
                    &aml::If::new(
                        &aml::Equal::new(&aml::Local(1), &EVENT_POWER_BUTTON),
                        vec![&aml::Notify::new(
                            &aml::Path::new("\\_SB_.PWRB"),
                            &POWER_BUTTON_PRESSED,
                        )],
                    ),
                ],
            ),
        ],
    )));
    body.extend(aml_bytes(&aml::Device::new(
        "_SB_.PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )));

    for (i, dev) in virtio.iter().enumerate() {
        let path = format!("_SB_.V{i:03X}");
        body.extend(aml_bytes(&aml::Device::new(
            path.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &(i as u32)),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, dev.base as u32, dev.size as u32),
                        // Edge-triggered, active high: the interrupt is an
                        // irqfd pulse.
                        &aml::Interrupt::new(true, true, false, false, dev.irq),
                    ]),
                ),
            ],
        )));
    }

    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io_reg = |port: u64| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port);
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch =
        (IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT).into();
    fadt.reset_reg = io_reg(acpi_pm::ACPI_PM_BASE + acpi_pm::RESET_OFFSET);
    fadt.reset_value = acpi_pm::RESET_VALUE;
    fadt.sleep_control_reg = io_reg(acpi_pm::ACPI_PM_BASE + acpi_pm::SLEEP_CONTROL_OFFSET);
    fadt.sleep_status_reg = io_reg(acpi_pm::ACPI_PM_BASE + acpi_pm::SLEEP_STATUS_OFFSET);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"FERRYVMM").into();
    aml_bytes(&fadt.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for cpu in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    // The IOAPIC id follows the CPUs' APIC ids, as in the MP table.
    madt.add_structure(IoApic::new(vcpus, IOAPIC_START as u32, 0));
    let mut bytes = aml_bytes(&madt);
    set_flags_and_checksum(&mut bytes, MADT_FLAGS_OFFSET, MADT_PCAT_COMPAT);
    bytes
}

/// acpi_tables has no setter for the MADT flags; patch them and re-balance
/// the checksum (byte 9) so the table still sums to zero.
fn set_flags_and_checksum(table: &mut [u8], offset: usize, flags: u32) {
    table[offset..offset + 4].copy_from_slice(&flags.to_le_bytes());
    table[9] = 0;
    let sum = table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    table[9] = sum.wrapping_neg();
}

fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// Builds every table for a machine with `vcpus` CPUs and these virtio
/// devices, laid out from [`RSDP_START`] on.
pub fn build(vcpus: u8, virtio: &[VirtioMmioDevice]) -> (AcpiTables, [u64; 5]) {
    let dsdt = dsdt(virtio);
    let rsdp_addr = RSDP_START;
    let xsdt_addr = align16(rsdp_addr + Rsdp::len() as u64);
    // XSDT: header + two 8-byte entries.
    let fadt_addr = align16(xsdt_addr + 36 + 2 * 8);
    let fadt = fadt(0); // placeholder to learn its size
    let madt_addr = align16(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus);
    let dsdt_addr = align16(madt_addr + madt.len() as u64);
    let fadt = self::fadt(dsdt_addr);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let tables = AcpiTables {
        rsdp: aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr)),
        xsdt: aml_bytes(&xsdt),
        fadt,
        madt,
        dsdt,
    };
    (
        tables,
        [rsdp_addr, xsdt_addr, fadt_addr, madt_addr, dsdt_addr],
    )
}

/// Writes the tables into guest memory. Returns the RSDP address.
pub fn write(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    virtio: &[VirtioMmioDevice],
) -> Result<u64, AcpiError> {
    let (t, addrs) = build(vcpus, virtio);
    let end = addrs[4] + t.dsdt.len() as u64;
    if end > MPTABLE_START {
        return Err(AcpiError::TooLarge(end - RSDP_START));
    }
    for (bytes, addr) in [&t.rsdp, &t.xsdt, &t.fadt, &t.madt, &t.dsdt]
        .into_iter()
        .zip(addrs)
    {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(addrs[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_well_formed_and_linked() {
        let virtio = [VirtioMmioDevice {
            base: 0xd000_0000,
            size: 0x1000,
            irq: 5,
        }];
        let (t, addrs) = build(2, &virtio);
        for (name, table) in [
            ("XSDT", &t.xsdt),
            ("FACP", &t.fadt),
            ("APIC", &t.madt),
            ("DSDT", &t.dsdt),
        ] {
            assert_eq!(&table[0..4], name.as_bytes());
            let len = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, table.len(), "{name} length");
            assert!(sums_to_zero(table), "{name} checksum");
        }
        assert!(sums_to_zero(&t.rsdp[..20]) && sums_to_zero(&t.rsdp));
        assert_eq!(
            u64::from_le_bytes(t.rsdp[24..32].try_into().unwrap()),
            addrs[1]
        );
        assert_eq!(
            u64::from_le_bytes(t.xsdt[36..44].try_into().unwrap()),
            addrs[2]
        );
        assert_eq!(
            u64::from_le_bytes(t.xsdt[44..52].try_into().unwrap()),
            addrs[3]
        );
        // FADT X_DSDT at offset 140.
        assert_eq!(
            u64::from_le_bytes(t.fadt[140..148].try_into().unwrap()),
            addrs[4]
        );
        assert_eq!(
            u32::from_le_bytes(t.madt[40..44].try_into().unwrap()),
            MADT_PCAT_COMPAT
        );
        // Two local APICs (type 0) and one IOAPIC (type 1).
        let kinds: Vec<u8> = {
            let mut v = vec![];
            let mut off = 44;
            while off < t.madt.len() {
                v.push(t.madt[off]);
                off += t.madt[off + 1] as usize;
            }
            v
        };
        assert_eq!(kinds, vec![0, 0, 1]);
        let dsdt = String::from_utf8_lossy(&t.dsdt);
        assert!(dsdt.contains("LNRO0005") && dsdt.contains("_S5_"));
    }
}
