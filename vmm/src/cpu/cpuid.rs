//! Per-vCPU CPUID: KVM's supported set, with this vCPU's APIC id and a
//! topology of one socket, `vcpus` cores, one thread per core.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use crate::check::KvmKind;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

/// AMD: HTT counts cores, not threads.
const EXT_ECX_CMP_LEGACY: u32 = 1 << 1;

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

/// Threads sharing a cache of `level` minus one (CPUID 0x4 / 0x8000001D
/// EAX[25:14]): private L1/L2, an L3 shared by all cores.
fn cache_sharing(level: u32, count: u32) -> u32 {
    if level >= 3 {
        count - 1
    } else {
        0
    }
}

/// The x2APIC topology leaf (0xB, also used as 0x1F): SMT level with one
/// thread, core level with `count` cores, then the invalid terminator.
fn topology_leaf(function: u32, apic_id: u32, count: u32) -> [kvm_cpuid_entry2; 3] {
    let entry = |index, eax, ebx, level: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    [
        entry(0, 0, 1, LEVEL_SMT),
        entry(1, id_bits(count), count, LEVEL_CORE),
        entry(2, 0, 0, 0),
    ]
}

/// Adjusts `cpuid` (KVM's supported set) for vCPU `id` of `vcpus`.
pub fn patch(cpuid: &mut CpuId, id: u8, vcpus: u8, kind: KvmKind) {
    let apic_id = u32::from(id);
    let count = u32::from(vcpus);
    let mut topology_leaves = Vec::new();
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
            // EAX[31:26]: cores per package - 1, for each real cache level.
            LEAF_CACHE_PARAMS if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                e.eax =
                    (e.eax & 0x3fff) | ((count - 1) << 26) | (cache_sharing(level, count) << 14);
            }
            LEAF_AMD_CACHE_TOPOLOGY if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                e.eax = (e.eax & !(0xfff << 14)) | (cache_sharing(level, count) << 14);
            }
            // No virtual PMU: a guest must not program counters it cannot have.
            LEAF_PMU => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 if !topology_leaves.contains(&e.function) => {
                topology_leaves.push(e.function);
            }
            LEAF_EXT_FEATURES => {
                if count > 1 {
                    e.ecx |= EXT_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !EXT_ECX_CMP_LEGACY;
                }
            }
            // ECX[15:12]: APIC id bits for cores; ECX[7:0]: cores - 1.
            LEAF_AMD_SIZES => {
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(count) << 12) | (count - 1);
            }
            // Extended APIC id; core id; one thread per core; node 0.
            LEAF_AMD_EXT_APIC_ID => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
    // KVM reports the topology leaves with whatever sub-leaves the host
    // has; replace them with this machine's.
    if !topology_leaves.is_empty() {
        let mut entries: Vec<kvm_cpuid_entry2> = cpuid
            .as_slice()
            .iter()
            .filter(|e| !topology_leaves.contains(&e.function))
            .copied()
            .collect();
        for function in topology_leaves {
            entries.extend(topology_leaf(function, apic_id, count));
        }
        if let Ok(rebuilt) = CpuId::from_entries(&entries) {
            *cpuid = rebuilt;
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
        // As on this project's AMD hosts: leaf 0xB with only sub-leaf 0.
        let base = [
            entry(1, 0),
            entry(0xb, 0),
            entry(4, 0),
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
        ];
        let mut cpuid = CpuId::from_entries(&base).unwrap();
        cpuid.as_mut_slice()[0].ecx = ECX_CX16;
        cpuid.as_mut_slice()[2].eax = (3 << 5) | 3; // a unified L3 cache
        patch(&mut cpuid, 2, 3, KvmKind::Pvm);
        let find = |f: u32, i: u32| {
            *cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == f && e.index == i)
                .unwrap()
        };
        let l1 = find(1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 3);
        assert_eq!(l1.ecx & ECX_CX16, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        let core = find(0xb, 1);
        assert_eq!((core.eax, core.ebx, core.edx), (2, 3, 2));
        assert_eq!((core.ecx >> 8) & 0xff, LEVEL_CORE);
        assert_eq!((find(0xb, 0).ecx >> 8) & 0xff, LEVEL_SMT);
        assert_eq!((find(0xb, 2).ecx >> 8) & 0xff, 0);
        let l3 = find(4, 0);
        assert_eq!(l3.eax >> 26, 2);
        assert_eq!((l3.eax >> 14) & 0xfff, 2);
        assert_eq!(find(0x8000_0008, 0).ecx & 0xf0ff, (2 << 12) | 2);
        assert_eq!(find(0x8000_001e, 0).eax, 2);
        assert_eq!(
            (id_bits(1), id_bits(2), id_bits(3), id_bits(4), id_bits(5)),
            (0, 1, 2, 2, 3)
        );
    }
}
