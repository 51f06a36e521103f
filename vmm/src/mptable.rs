//! The Intel MultiProcessor table (spec 1.4): CPUs, the ISA bus, the IOAPIC
//! and its interrupt routing. Guests that boot without ACPI (`acpi=off`,
//! small kernels) find their CPUs here.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_START, BIOS_AREA_END, IOAPIC_START, IRQ_MAX, MPTABLE_START};
use crate::memory::GuestMemoryMmap;

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 signature and the FPU + APIC feature bits.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 9) | 1;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("MP table for {0} CPUs does not fit below 1 MiB")]
    TooLarge(u8),
    #[error("cannot write the MP table: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The config table's entries for `vcpus` CPUs.
fn entries(vcpus: u8) -> (Vec<u8>, u16) {
    let ioapic_id = vcpus;
    let mut e = Vec::new();
    let mut count = 0u16;
    for cpu in 0..vcpus {
        e.extend([
            0,
            cpu,
            APIC_VERSION,
            CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 },
        ]);
        e.extend(CPU_SIGNATURE.to_le_bytes());
        e.extend(CPU_FEATURES.to_le_bytes());
        e.extend([0u8; 8]);
        count += 1;
    }
    e.extend([1, 0]); // bus 0
    e.extend(*b"ISA   ");
    count += 1;
    e.extend([2, ioapic_id, IOAPIC_VERSION, 1]);
    e.extend((IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX as u8 {
        let kind = if irq == 0 {
            INT_TYPE_EXTINT
        } else {
            INT_TYPE_INT
        };
        e.extend([3, kind, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 is the PIC's ExtINT input, LINT1 the NMI, on every local APIC.
    e.extend([4, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    e.extend([4, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;
    (e, count)
}

/// Builds the floating pointer and the config table placed at `start`.
pub fn build(vcpus: u8, start: u64) -> Vec<u8> {
    let table_addr = start + 16;
    let (entries, count) = entries(vcpus);
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend(*b"PCMP");
    table.extend(((44 + entries.len()) as u16).to_le_bytes());
    table.extend([SPEC_REV, 0]);
    table.extend(*b"FERRY   ");
    table.extend(*b"FERRYVM     ");
    table.extend([0u8; 4]); // OEM table pointer
    table.extend([0u8; 2]); // OEM table size
    table.extend(count.to_le_bytes());
    table.extend((APIC_START as u32).to_le_bytes());
    table.extend([0u8; 4]); // extended table length, checksum, reserved
    table.extend(entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend(*b"_MP_");
    fp.extend((table_addr as u32).to_le_bytes());
    fp.extend([1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    fp.extend(table);
    fp
}

pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    let bytes = build(vcpus, MPTABLE_START);
    if MPTABLE_START + bytes.len() as u64 > BIOS_AREA_END {
        return Err(MptableError::TooLarge(vcpus));
    }
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let bytes = build(2, MPTABLE_START);
        assert_eq!(&bytes[0..4], b"_MP_");
        assert_eq!(checksum(&bytes[..16]), 0);
        let table = &bytes[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(checksum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 2 + 1 + 1 + 24 + 2);
        // The first CPU entry is the bootstrap processor, the second is not.
        assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BSP);
        assert_eq!(table[64 + 3], CPU_ENABLED);
    }

    #[test]
    fn the_largest_machine_fits() {
        assert!(MPTABLE_START + build(254, MPTABLE_START).len() as u64 <= BIOS_AREA_END);
    }
}
