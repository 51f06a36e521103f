//! Per-vCPU CPUID: KVM's supported set, with this vCPU's APIC id and a
//! topology of one socket, `vcpus` cores, one thread per core.

use kvm_bindings::CpuId;

use crate::check::KvmKind;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;

const ECX_CX16: u32 = 1 << 13;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// x2APIC topology level types (leaf 0xB/0x1F ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to hold `n` distinct ids.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts `cpuid` (KVM's supported set) for vCPU `id` of `vcpus`.
pub fn patch(cpuid: &mut CpuId, id: u8, vcpus: u8, kind: KvmKind) {
    let apic_id = u32::from(id);
    let count = u32::from(vcpus);
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0xffff) | (count << 16) | (apic_id << 24);
                e.ecx |= ECX_HYPERVISOR;
                if kind == KvmKind::Pvm {
                    // kvm_pvm's emulator lacks cmpxchg16b; a guest that is
                    // told it exists would stop on it in ring 0.
                    e.ecx &= !ECX_CX16;
                }
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1. EAX[25:14]: threads
                // sharing this cache - 1: one for L1/L2, all for L3.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
            }
            // No virtual PMU: a guest must not program counters it cannot have.
            LEAF_PMU => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0; // one thread per core: no SMT bits
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = id_bits(count);
                        e.ebx = count;
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_topology() {
        let base = [
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(4, 0),
        ];
        let mut cpuid = CpuId::from_entries(&base).unwrap();
        cpuid.as_mut_slice()[0].ecx = ECX_CX16;
        cpuid.as_mut_slice()[4].eax = 3 << 5; // an L3 cache
        patch(&mut cpuid, 2, 3, KvmKind::Pvm);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_eq!(e[0].ecx & ECX_CX16, 0);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!((e[2].eax, e[2].ebx, e[2].edx), (2, 3, 2));
        assert_eq!((e[2].ecx >> 8) & 0xff, LEVEL_CORE);
        assert_eq!((e[3].ecx >> 8) & 0xff, 0);
        assert_eq!(e[4].eax >> 26, 2);
        assert_eq!((e[4].eax >> 14) & 0xfff, 2);
        assert_eq!(
            (id_bits(1), id_bits(2), id_bits(3), id_bits(4), id_bits(5)),
            (0, 1, 2, 2, 3)
        );
    }
}
