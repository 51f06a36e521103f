//! Loading a kernel and the data it boots with.
//!
//! Three kinds of kernel are accepted and told apart by their bytes: a
//! bzImage (Linux boot protocol, 64-bit entry), an ELF vmlinux (Linux boot
//! protocol), and an ELF with a PVH entry note (PVH boot: Linux built with
//! CONFIG_PVH, and Ferry's probe guest).

pub mod linux;
pub mod pvh;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START};
use crate::memory::GuestMemoryMmap;

/// Bit 0 of `xloadflags`: the kernel has a 64-bit entry at load + 0x200.
const XLF_KERNEL_64: u16 = 1;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel {path}: {source}")]
    KernelRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a kernel: expected a bzImage, an ELF vmlinux or a PVH ELF")]
    NotAKernel { path: PathBuf },
    #[error("cannot load kernel {path}: {reason}")]
    KernelLoad { path: PathBuf, reason: String },
    #[error("kernel {path} has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)")]
    No64BitEntry { path: PathBuf },
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("kernel command line is {len} bytes, at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write boot data to guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// How the first vCPU enters the kernel.
#[derive(Clone, Copy, Debug)]
pub enum BootProtocol {
    /// 64-bit Linux boot protocol: long mode, RSI = zero page.
    Linux64 { header: Option<setup_header> },
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh,
}

#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: GuestAddress,
    pub protocol: BootProtocol,
    /// First byte after the kernel image in guest memory.
    pub end: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedInitrd {
    pub addr: u64,
    pub size: u64,
}

enum KernelFormat {
    Elf,
    BzImage,
}

fn detect(path: &Path, file: &mut File) -> Result<KernelFormat, BootError> {
    let read_err = |source| BootError::KernelRead {
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; 0x208];
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]).map_err(read_err)? {
            0 => break,
            n => filled += n,
        }
    }
    if filled >= 4 && head[..4] == *b"\x7fELF" {
        Ok(KernelFormat::Elf)
    } else if filled >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(KernelFormat::BzImage)
    } else {
        Err(BootError::NotAKernel {
            path: path.to_path_buf(),
        })
    }
}

/// Loads the kernel at `path` into guest memory and says how to enter it.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let read_err = |source| BootError::KernelRead {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let load_err = |e: linux_loader::loader::Error| BootError::KernelLoad {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    match detect(path, &mut file)? {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            Ok(match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => LoadedKernel {
                    entry,
                    protocol: BootProtocol::Pvh,
                    end: r.kernel_end,
                },
                _ => LoadedKernel {
                    entry: r.kernel_load,
                    protocol: BootProtocol::Linux64 { header: None },
                    end: r.kernel_end,
                },
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let header = r.setup_header.ok_or_else(|| BootError::NotAKernel {
                path: path.to_path_buf(),
            })?;
            if header.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry {
                    path: path.to_path_buf(),
                });
            }
            Ok(LoadedKernel {
                entry: GuestAddress(r.kernel_load.0 + 0x200),
                protocol: BootProtocol::Linux64 {
                    header: Some(header),
                },
                end: r.kernel_end,
            })
        }
    }
}

/// Loads the initrd at the top of low RAM (below `limit`), page aligned,
/// where it cannot collide with the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<LoadedInitrd, BootError> {
    let read_err = |source| BootError::InitrdRead {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let low_end = mem.last_addr().0.min(MMIO_GAP_START - 1) + 1;
    let top = low_end.min(limit.saturating_add(1));
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        limit: top,
    };
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel_end || size == 0 && addr == 0 {
        return Err(too_large());
    }
    mem.read_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::InitrdRead {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(LoadedInitrd { addr, size })
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<(), BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let max = max.min(CMDLINE_MAX_SIZE);
    // The kernel's limit counts the terminating NUL.
    if cmdline.len() + 1 > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: max - 1,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(BootError::Write)
}

/// Whether the kernel at `path` is Linux: every bzImage is, and so is an
/// ELF carrying Linux's own ELF note (name "Linux"). Ferry's probe guest
/// and other PVH programs carry only Xen notes.
pub fn is_linux_kernel(path: &Path) -> Result<bool, BootError> {
    let read_err = |source| BootError::KernelRead {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    match detect(path, &mut file)? {
        KernelFormat::BzImage => Ok(true),
        KernelFormat::Elf => elf_has_note_named(&mut file, b"Linux").map_err(read_err),
    }
}

fn elf_has_note_named(file: &mut File, wanted: &[u8]) -> std::io::Result<bool> {
    use std::io::{Seek, SeekFrom};
    const PT_NOTE: u32 = 4;
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut ehdr)?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(w)
    };
    let (phoff, phentsize, phnum) = (
        u64_at(&ehdr, 32),
        u16_at(&ehdr, 54) as u64,
        u16_at(&ehdr, 56) as u64,
    );
    if phentsize < 56 || phnum > 256 {
        return Ok(false);
    }
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        file.seek(SeekFrom::Start(phoff.saturating_add(i * phentsize)))?;
        file.read_exact(&mut ph)?;
        if u32_at(&ph, 0) != PT_NOTE {
            continue;
        }
        let (offset, size) = (u64_at(&ph, 8), u64_at(&ph, 32).min(1 << 20));
        let mut notes = vec![0u8; size as usize];
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut notes)?;
        let mut at = 0usize;
        while at + 12 <= notes.len() {
            let namesz = u32_at(&notes, at) as usize;
            let descsz = u32_at(&notes, at + 4) as usize;
            let name_start = at + 12;
            let name = notes.get(name_start..name_start + namesz).unwrap_or(&[]);
            if name.strip_suffix(&[0]).unwrap_or(name) == wanted {
                return Ok(true);
            }
            at = name_start + namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4;
        }
    }
    Ok(false)
}
