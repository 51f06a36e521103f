//! The file form of a snapshot: guest RAM laid out so a restore can map
//! it instead of reading it.
//!
//! ```text
//! offset 0          map header (4 KiB): FERRYMAP, version, where the
//!                   stream starts, and per RAM region its guest address,
//!                   length and offset in the file; CRC-32
//! offset 4096       RAM image: every region's bytes at its offset, page
//!                   for page; zero pages are holes (a sparse file)
//! stream_offset     the ordinary stream (header, config, pass markers,
//!                   state, end) with no `ram` sections
//! ```
//!
//! The source writes pages at their fixed offsets (a later pass simply
//! writes a page again; a page that became zero is punched out), the
//! stream sequentially after the image. A restore maps each region
//! privately (`MAP_PRIVATE`): the guest runs at once and pages come in
//! from the page cache as it touches them, its writes stay its own.
//!
//! The snapshot is written to a temporary file beside `PATH` and renamed
//! over it when complete: a failed snapshot leaves the old one, and a
//! guest restored from the old one keeps its inode (a rename or unlink
//! never changes a mapped file; writing into it in place would).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::transport::{Channel, StreamChannel};
use crate::PAGE_SIZE;

pub const MAP_MAGIC: [u8; 8] = *b"FERRYMAP";
pub const MAP_VERSION: u32 = 1;
/// The map header's length: the RAM image starts page-aligned after it.
pub const MAP_HEADER_LEN: u64 = 4096;
/// More regions than a guest has (two: below and above the MMIO gap).
const MAX_REGIONS: usize = 64;
const REGION_LEN: usize = 24;
/// magic, version, flags, stream offset, region count, reserved.
const FIXED_LEN: usize = 8 + 4 + 4 + 8 + 4 + 4;
const PAGE: u64 = PAGE_SIZE as u64;

/// What is wrong with a snapshot file's map.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("snapshot map header: {0}")]
    BadMap(&'static str),
    #[error("snapshot map header: unsupported version {0} (this Ferry reads 1)")]
    Version(u32),
    #[error("snapshot map header: checksum {got:#010x}, expected {want:#010x}")]
    Checksum { got: u32, want: u32 },
    #[error("snapshot map header: the file is {len} bytes, shorter than its map says ({need})")]
    Short { len: u64, need: u64 },
}

/// One RAM region's place in the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageRegion {
    pub gpa: u64,
    pub len: u64,
    /// Offset in the file, page-aligned.
    pub offset: u64,
}

/// Where everything is in a snapshot file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageLayout {
    pub regions: Vec<ImageRegion>,
    /// Where the stream starts, page-aligned, after the image.
    pub stream_offset: u64,
}

impl ImageLayout {
    /// The layout for RAM regions `(gpa, len)` (page-aligned lengths).
    pub fn for_regions(regions: &[(u64, u64)]) -> Self {
        let mut offset = MAP_HEADER_LEN;
        let regions = regions
            .iter()
            .map(|&(gpa, len)| {
                let r = ImageRegion { gpa, len, offset };
                offset += len.div_ceil(PAGE) * PAGE;
                r
            })
            .collect();
        Self {
            regions,
            stream_offset: offset,
        }
    }

    /// The file offset of `len` bytes from `gpa`, all inside one region.
    pub fn offset_of(&self, gpa: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let end = gpa.checked_add(len)?;
            (gpa >= r.gpa && end <= r.gpa + r.len).then(|| r.offset + (gpa - r.gpa))
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; MAP_HEADER_LEN as usize];
        b[..8].copy_from_slice(&MAP_MAGIC);
        b[8..12].copy_from_slice(&MAP_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.stream_offset.to_le_bytes());
        b[24..28].copy_from_slice(&(self.regions.len() as u32).to_le_bytes());
        let mut at = FIXED_LEN;
        for r in self.regions.iter().take(MAX_REGIONS) {
            b[at..at + 8].copy_from_slice(&r.gpa.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&r.len.to_le_bytes());
            b[at + 16..at + 24].copy_from_slice(&r.offset.to_le_bytes());
            at += REGION_LEN;
        }
        let crc = crc32fast::hash(&b[..at]);
        b[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads a map header; every offset checked (aligned, in order, not
    /// overlapping, inside a file of `file_len` bytes).
    pub fn decode(b: &[u8], file_len: u64) -> Result<Self, SnapshotError> {
        let bad = SnapshotError::BadMap;
        if b.len() < MAP_HEADER_LEN as usize || b[..8] != MAP_MAGIC {
            return Err(bad("not a snapshot map (no FERRYMAP)"));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let version = u32_at(8);
        if version != MAP_VERSION {
            return Err(SnapshotError::Version(version));
        }
        if u32_at(12) != 0 {
            return Err(bad("unknown flags"));
        }
        let count = u32_at(24) as usize;
        if count == 0 || count > MAX_REGIONS {
            return Err(bad("region count out of range"));
        }
        let end = FIXED_LEN + count * REGION_LEN;
        let (got, want) = (u32_at(end), crc32fast::hash(&b[..end]));
        if got != want {
            return Err(SnapshotError::Checksum { got, want });
        }
        let stream_offset = u64_at(16);
        let mut regions = Vec::with_capacity(count);
        let mut next = MAP_HEADER_LEN;
        for i in 0..count {
            let at = FIXED_LEN + i * REGION_LEN;
            let r = ImageRegion {
                gpa: u64_at(at),
                len: u64_at(at + 8),
                offset: u64_at(at + 16),
            };
            let aligned = [r.gpa, r.len, r.offset].iter().all(|v| v % PAGE == 0);
            if !aligned || r.len == 0 {
                return Err(bad("a region is not page-aligned or empty"));
            }
            if r.offset < next || r.gpa.checked_add(r.len).is_none() {
                return Err(bad("regions overlap or are out of order"));
            }
            next = r
                .offset
                .checked_add(r.len)
                .ok_or(bad("a region ends past 2^64"))?;
            regions.push(r);
        }
        if stream_offset < next || stream_offset % PAGE != 0 {
            return Err(bad("the stream would start inside the image"));
        }
        if file_len < stream_offset {
            return Err(SnapshotError::Short {
                len: file_len,
                need: stream_offset,
            });
        }
        Ok(Self {
            regions,
            stream_offset,
        })
    }
}

/// Whether `path` gets the file form: a regular file or nothing yet
/// (a FIFO or a device gets the plain stream, written in order).
pub fn mappable(path: &Path) -> bool {
    match std::fs::metadata(path) {
        Ok(m) => m.is_file(),
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

/// A snapshot being written: the temporary file, renamed over the target
/// by [`Self::commit`], removed if dropped before.
pub struct SnapshotFile {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    layout: ImageLayout,
    committed: bool,
}

impl SnapshotFile {
    /// Creates the temporary file with its map header; returns it and the
    /// channel the stream is written to (from `layout.stream_offset`).
    pub fn create(
        path: &Path,
        layout: ImageLayout,
    ) -> Result<(Self, Box<dyn Channel>), SnapshotError> {
        let io_err = |source| SnapshotError::Io {
            path: path.display().to_string(),
            source,
        };
        let name = path
            .file_name()
            .map_or_else(|| "snapshot".into(), |n| n.to_string_lossy().into_owned());
        let tmp = path.with_file_name(format!(".{name}.ferry-{}.tmp", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err)?;
        let snapshot = Self {
            file,
            tmp,
            path: path.to_path_buf(),
            layout,
            committed: false,
        };
        snapshot
            .file
            .write_all_at(&snapshot.layout.encode(), 0)
            .map_err(io_err)?;
        let mut stream = snapshot.file.try_clone().map_err(io_err)?;
        stream
            .seek(SeekFrom::Start(snapshot.layout.stream_offset))
            .map_err(io_err)?;
        let channel: Box<dyn Channel> = Box::new(StreamChannel::file(stream));
        Ok((snapshot, channel))
    }

    pub fn layout(&self) -> &ImageLayout {
        &self.layout
    }

    /// Writes whole pages `data` of guest memory from `gpa`.
    pub fn write_pages(&self, gpa: u64, data: &[u8]) -> io::Result<()> {
        let offset = self.offset(gpa, data.len() as u64)?;
        self.file.write_all_at(data, offset)
    }

    /// Makes `pages` pages from `gpa` read as zero again: a hole.
    pub fn zero_pages(&self, gpa: u64, pages: u64) -> io::Result<()> {
        let len = pages * PAGE;
        let offset = self.offset(gpa, len)?;
        // SAFETY: fallocate on an open file; only its extents change.
        let r = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        // A file system without holes: write the zeros.
        let zeros = vec![0u8; PAGE_SIZE * 256];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.file
                .write_all_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    fn offset(&self, gpa: u64, len: u64) -> io::Result<u64> {
        self.layout.offset_of(gpa, len).ok_or_else(|| {
            io::Error::other(format!(
                "pages at {gpa:#x} ({len} bytes) lie outside the image"
            ))
        })
    }

    /// The snapshot is complete: it replaces `path`.
    pub fn commit(mut self) -> Result<(), SnapshotError> {
        std::fs::rename(&self.tmp, &self.path).map_err(|source| SnapshotError::Io {
            path: self.path.display().to_string(),
            source,
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A snapshot to restore: the file (to map) and its layout, or `None`
/// for a file holding a plain stream.
pub fn open(path: &Path) -> Result<Option<(File, ImageLayout)>, SnapshotError> {
    let io_err = |source| SnapshotError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let mut magic = [0u8; 8];
    match file.read_exact(&mut magic) {
        Ok(()) if magic == MAP_MAGIC => {}
        // Shorter than a magic, or another one: the stream reader says
        // what is wrong with it.
        _ => return Ok(None),
    }
    let len = file.metadata().map_err(io_err)?.len();
    let mut header = vec![0u8; MAP_HEADER_LEN as usize];
    file.read_exact_at(&mut header, 0).map_err(io_err)?;
    let layout = ImageLayout::decode(&header, len)?;
    Ok(Some((file, layout)))
}

/// The stream of a snapshot file, read from `layout.stream_offset`.
pub fn stream_of(file: &File, layout: &ImageLayout) -> io::Result<Box<dyn Channel>> {
    let mut stream = file.try_clone()?;
    stream.seek(SeekFrom::Start(layout.stream_offset))?;
    Ok(Box::new(StreamChannel::file(stream)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> ImageLayout {
        ImageLayout::for_regions(&[(0, 3 << 30), (4 << 30, 1 << 30)])
    }

    #[test]
    fn the_map_round_trips_and_places_pages() {
        let l = layout();
        assert_eq!(l.regions[1].offset, 4096 + (3 << 30));
        assert_eq!(l.stream_offset, 4096 + (4 << 30));
        assert_eq!(
            ImageLayout::decode(&l.encode(), l.stream_offset).unwrap(),
            l
        );
        assert_eq!(l.offset_of(0x1000, 4096), Some(0x2000));
        assert_eq!(
            l.offset_of((4 << 30) + 0x3000, 8192),
            Some(4096 + (3 << 30) + 0x3000)
        );
        assert_eq!(l.offset_of((3 << 30) - 4096, 8192), None, "across the gap");
        assert_eq!(l.offset_of(5 << 30, 4096), None);
    }

    #[test]
    fn a_bad_map_is_refused_naming_why() {
        let l = layout();
        let good = l.encode();
        let err = |b: &[u8], len| ImageLayout::decode(b, len).unwrap_err().to_string();
        assert!(err(&good, 4096).contains("shorter than its map says"));
        let mut b = good.clone();
        b[8] = 2;
        assert!(err(&b, l.stream_offset).contains("unsupported version 2"));
        let mut b = good.clone();
        b[40] ^= 1;
        assert!(err(&b, l.stream_offset).contains("checksum"));
        let mut b = good.clone();
        b[0] = b'X';
        assert!(err(&b, l.stream_offset).contains("FERRYMAP"));
        // Overlapping regions, with a valid checksum.
        let mut over = l.clone();
        over.regions[1].offset = 4096;
        assert!(err(&over.encode(), over.stream_offset).contains("overlap"));
        let mut inside = l.clone();
        inside.stream_offset = 8192;
        assert!(err(&inside.encode(), 1 << 40).contains("inside the image"));
    }
}
