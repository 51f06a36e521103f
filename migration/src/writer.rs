//! The writing side: header, framed sections with their CRC, RAM runs,
//! pass markers and the end section.

use crate::error::StreamError;
use crate::ram::{RUN_DATA, RUN_HEADER_LEN, RUN_ZERO};
use crate::throttle::Bandwidth;
use crate::{
    SectionKind, END_SECTION, MAGIC, PAGE_SIZE, PASS_SECTION, RAM_SECTION, STREAM_VERSION,
};
use serde::Serialize;
use std::io::{self, Write};

/// Payload capacity of one RAM section the writer emits: 1024 pages of
/// data plus room for run headers. Well under the 64 MiB a reader takes.
pub(crate) const RAM_BUF_CAP: usize = 4 * 1024 * 1024 + PAGE_SIZE;

/// Longest section header: kind, name length, 255-byte name, version,
/// payload length.
const MAX_SECTION_HEADER: usize = 1 + 1 + 255 + 4 + 8;

/// Pages counted by the RAM writers of one stream, for `query-migrate`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RamStats {
    /// Pages sent as zero runs (QEMU's `duplicate`).
    pub zero_pages: u64,
    /// Pages sent with their data (QEMU's `normal`).
    pub data_pages: u64,
}

/// Writes a migration stream to `W`.
///
/// `W` should be buffered (the channels of [`crate::connect`] are): the
/// writer issues one write per section header, payload and checksum.
/// After an error the stream is unusable; later calls may fail or write
/// garbage, so drop it.
pub struct StreamWriter<W: Write> {
    inner: W,
    bytes: u64,
    sections: u64,
    throttle: Option<Bandwidth>,
    /// RAM payload being assembled; `RAM_BUF_CAP` long once allocated,
    /// reused for every RAM section (zeroed once, never per section).
    ram_buf: Vec<u8>,
    ram_stats: RamStats,
    /// An error from a [`RamSectionWriter`] dropped without `finish`.
    deferred: Option<StreamError>,
}

impl<W: Write> StreamWriter<W> {
    /// Starts a stream: writes the 16-byte header.
    pub fn new(inner: W) -> Result<Self, StreamError> {
        let mut w = Self {
            inner,
            bytes: 0,
            sections: 0,
            throttle: None,
            ram_buf: Vec::new(),
            ram_stats: RamStats::default(),
            deferred: None,
        };
        let mut header = [0u8; crate::HEADER_LEN];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&STREAM_VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&0u32.to_le_bytes());
        w.put(&header)?;
        Ok(w)
    }

    /// Limits the write rate to `bytes_per_sec` (token bucket, ~20 ms of
    /// burst). `None` or `Some(0)` removes the limit. May be changed at
    /// any time, e.g. between RAM passes.
    pub fn set_max_bandwidth(&mut self, bytes_per_sec: Option<u64>) {
        self.throttle = match bytes_per_sec {
            Some(rate) if rate > 0 => Some(Bandwidth::new(rate)),
            _ => None,
        };
    }

    /// Shares `bandwidth` with the other writers that hold it (the
    /// channels of one migration); `None` removes the limit.
    pub fn set_bandwidth(&mut self, bandwidth: Option<Bandwidth>) {
        self.throttle = bandwidth;
    }

    /// Writes one section. `name` is 1 to 255 bytes of UTF-8; `payload`
    /// within the kind's limit. End sections are written by
    /// [`Self::finish`] only.
    pub fn write_section(
        &mut self,
        kind: SectionKind,
        name: &str,
        version: u32,
        payload: &[u8],
    ) -> Result<(), StreamError> {
        self.take_deferred()?;
        if kind == SectionKind::End {
            return Err(StreamError::Misuse {
                what: "the end section is written by finish()",
                offset: self.bytes,
            });
        }
        self.section(kind, name, version, payload)
    }

    /// Writes `value` as the JSON payload of a section.
    pub fn write_json<T: Serialize>(
        &mut self,
        kind: SectionKind,
        name: &str,
        version: u32,
        value: &T,
    ) -> Result<(), StreamError> {
        let payload = serde_json::to_vec(value).map_err(|source| StreamError::Encode {
            section: name.to_owned(),
            offset: self.bytes,
            source,
        })?;
        self.write_section(kind, name, version, &payload)
    }

    /// A writer of RAM runs. It fills `ram` sections of about 4 MiB and
    /// writes each when full, and the last one on [`RamSectionWriter::finish`]
    /// (or on drop, where an error is kept and returned by the next call
    /// on this writer).
    pub fn ram(&mut self) -> RamSectionWriter<'_, W> {
        if self.ram_buf.len() != RAM_BUF_CAP {
            self.ram_buf = vec![0; RAM_BUF_CAP];
        }
        RamSectionWriter {
            w: self,
            used: 0,
            last: None,
        }
    }

    /// Marks the end of RAM pass `pass`, which sent `pages` pages.
    pub fn write_pass_end(&mut self, pass: u32, pages: u64) -> Result<(), StreamError> {
        let mut payload = [0u8; 12];
        payload[..4].copy_from_slice(&pass.to_le_bytes());
        payload[4..].copy_from_slice(&pages.to_le_bytes());
        self.write_section(SectionKind::Pass, PASS_SECTION, 1, &payload)
    }

    /// Writes the end section, flushes, and hands back the transport (for
    /// the acknowledgement exchange).
    pub fn finish(mut self) -> Result<W, StreamError> {
        self.end()?;
        Ok(self.inner)
    }

    /// Writes the end section and flushes, keeping the writer (and its
    /// buffers: freeing a 4 MiB RAM buffer costs a few tenths of a ms,
    /// which a stopped guest need not wait for). Nothing may be written
    /// after it.
    pub fn end(&mut self) -> Result<(), StreamError> {
        self.take_deferred()?;
        let mut payload = [0u8; 16];
        payload[..8].copy_from_slice(&self.sections.to_le_bytes());
        payload[8..].copy_from_slice(&self.bytes.to_le_bytes());
        self.section(SectionKind::End, END_SECTION, 1, &payload)?;
        let offset = self.bytes;
        self.inner
            .flush()
            .map_err(|source| StreamError::Io { offset, source })?;
        Ok(())
    }

    /// Bytes written so far, header included.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Sections written so far (not counting the header).
    pub fn sections_written(&self) -> u64 {
        self.sections
    }

    /// Zero and data pages written so far by all RAM writers.
    pub fn ram_stats(&self) -> RamStats {
        self.ram_stats
    }

    /// Flushes the transport (e.g. before waiting for the peer).
    pub fn flush(&mut self) -> Result<(), StreamError> {
        let offset = self.bytes;
        self.inner
            .flush()
            .map_err(|source| StreamError::Io { offset, source })
    }

    /// The transport. Bytes written here are not counted by the stream.
    pub fn inner_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    fn take_deferred(&mut self) -> Result<(), StreamError> {
        match self.deferred.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn section(
        &mut self,
        kind: SectionKind,
        name: &str,
        version: u32,
        payload: &[u8],
    ) -> Result<(), StreamError> {
        let offset = self.bytes;
        let name_len = match u8::try_from(name.len()) {
            Ok(0) | Err(_) => {
                return Err(StreamError::BadName {
                    name: crate::error::display_name(name.as_bytes()),
                    offset,
                    why: "a section name is 1 to 255 bytes",
                })
            }
            Ok(n) => n,
        };
        let len = payload.len() as u64;
        kind.check_len(len, || name.to_owned(), offset)?;
        let mut header = [0u8; MAX_SECTION_HEADER];
        let n = name.len();
        header[0] = kind as u8;
        header[1] = name_len;
        header[2..2 + n].copy_from_slice(name.as_bytes());
        header[2 + n..6 + n].copy_from_slice(&version.to_le_bytes());
        header[6 + n..14 + n].copy_from_slice(&len.to_le_bytes());
        let header = &header[..14 + n];

        let mut crc = crc32fast::Hasher::new();
        crc.update(header);
        crc.update(payload);
        let crc = crc.finalize();

        self.put(header)?;
        self.put(payload)?;
        self.put(&crc.to_le_bytes())?;
        if kind != SectionKind::End {
            self.sections += 1;
        }
        Ok(())
    }

    /// Writes raw bytes through the throttle, counting them.
    fn put(&mut self, data: &[u8]) -> Result<(), StreamError> {
        let offset = self.bytes;
        let res = match &mut self.throttle {
            None => self.inner.write_all(data),
            Some(t) => {
                let chunk = t.chunk();
                let t = &*t;
                data.chunks(chunk).try_for_each(|c| {
                    t.wait(c.len());
                    self.inner.write_all(c)
                })
            }
        };
        res.map_err(|source| StreamError::Io { offset, source })?;
        self.bytes += data.len() as u64;
        Ok(())
    }
}

/// The run most recently added to a RAM section, for coalescing.
#[derive(Clone, Copy)]
struct LastRun {
    /// Offset of its header in the section payload.
    at: usize,
    gpa: u64,
    pages: u32,
    kind: u8,
}

impl LastRun {
    fn end(&self) -> u64 {
        self.gpa + u64::from(self.pages) * PAGE_SIZE as u64
    }
}

/// Adds RAM runs to a stream (see [`StreamWriter::ram`]). Adjacent runs
/// of the same type are merged. Page data is copied into the section
/// buffer when given, so the source may change afterwards (its dirty bit
/// then sends it again) without upsetting the checksum.
pub struct RamSectionWriter<'a, W: Write> {
    w: &'a mut StreamWriter<W>,
    used: usize,
    last: Option<LastRun>,
}

impl<W: Write> RamSectionWriter<'_, W> {
    /// `count` zero pages from `gpa` (page-aligned), sent without data.
    pub fn zero_pages(&mut self, gpa: u64, count: u32) -> Result<(), StreamError> {
        check_run(gpa, u64::from(count))?;
        self.w.ram_stats.zero_pages += u64::from(count);
        if let Some(last) = self.last.as_mut() {
            if last.kind == RUN_ZERO && last.end() == gpa {
                if let Some(total) = last.pages.checked_add(count) {
                    last.pages = total;
                    let at = last.at + 8;
                    self.w.ram_buf[at..at + 4].copy_from_slice(&total.to_le_bytes());
                    return Ok(());
                }
            }
        }
        if RAM_BUF_CAP - self.used < RUN_HEADER_LEN {
            self.flush()?;
        }
        self.put_header(gpa, count, RUN_ZERO);
        Ok(())
    }

    /// The pages of `data` (a non-empty multiple of 4096 bytes) at `gpa`.
    pub fn data_pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), StreamError> {
        if data.is_empty() || !data.len().is_multiple_of(PAGE_SIZE) {
            return Err(StreamError::InvalidRun {
                gpa,
                pages: (data.len() / PAGE_SIZE) as u64,
                why: "data is not a non-empty multiple of the page size",
            });
        }
        let pages = (data.len() / PAGE_SIZE) as u64;
        self.put_data(gpa, pages, |at, dst| {
            // `at` is within the run by construction.
            let from = usize::try_from(at - gpa).unwrap_or(usize::MAX);
            match data.get(from..from + dst.len()) {
                Some(src) => {
                    dst.copy_from_slice(src);
                    Ok(())
                }
                None => Err(io::Error::other("page outside the given data")),
            }
        })
    }

    /// `pages` data pages at `gpa`, written into the section buffer by
    /// `fill(gpa, buffer)` (called once per piece, each a whole number of
    /// pages): no intermediate copy, e.g. a volatile read straight out of
    /// guest memory.
    pub fn data_pages_with<F>(&mut self, gpa: u64, pages: u64, fill: F) -> Result<(), StreamError>
    where
        F: FnMut(u64, &mut [u8]) -> io::Result<()>,
    {
        self.put_data(gpa, pages, fill)
    }

    /// One page at `gpa`, read into the section buffer by `fill`, which
    /// says whether the page turned out to be all zero: then it is taken
    /// back out and travels as a zero page. The page is copied once, and
    /// checked where it was copied to (still in cache). Returns whether it
    /// went as data.
    pub fn page_or_zero<F>(&mut self, gpa: u64, fill: F) -> Result<bool, StreamError>
    where
        F: FnOnce(&mut [u8]) -> io::Result<bool>,
    {
        check_run(gpa, 1)?;
        let (used, last, stats) = (self.used, self.last, self.w.ram_stats);
        let mut zero = false;
        let mut fill = Some(fill);
        self.put_data(gpa, 1, |_, dst| {
            let f = fill
                .take()
                .ok_or_else(|| io::Error::other("a page filled twice"))?;
            zero = f(dst)?;
            Ok(())
        })?;
        if !zero {
            return Ok(true);
        }
        // put_data may have written the section out to make room: then
        // the page is the first of a fresh section and nothing before it
        // is to be restored.
        if self.used >= PAGE_SIZE && self.last.is_some_and(|l| l.end() == gpa + PAGE_SIZE as u64) {
            let l = self.last.as_mut().map(|l| {
                l.pages -= 1;
                *l
            });
            self.used -= PAGE_SIZE;
            self.w.ram_stats.data_pages -= 1;
            match l {
                Some(l) if l.pages == 0 => {
                    // The page had opened a run of its own: its header
                    // goes too, and the run before it is the last again.
                    self.used = l.at;
                    if self.used == used {
                        self.last = last;
                        self.w.ram_stats = stats;
                    } else {
                        // A fresh section: no run before it.
                        self.last = None;
                    }
                }
                Some(l) => {
                    self.w.ram_buf[l.at + 8..l.at + 12].copy_from_slice(&l.pages.to_le_bytes());
                }
                None => {}
            }
        }
        self.zero_pages(gpa, 1)?;
        Ok(false)
    }

    /// Writes the last (partial) RAM section, if any.
    pub fn finish(mut self) -> Result<(), StreamError> {
        self.flush()
    }

    fn put_data<F>(&mut self, gpa: u64, pages: u64, mut fill: F) -> Result<(), StreamError>
    where
        F: FnMut(u64, &mut [u8]) -> io::Result<()>,
    {
        check_run(gpa, pages)?;
        let mut gpa = gpa;
        let mut left = pages;
        while left > 0 {
            let room = (RAM_BUF_CAP - self.used) / PAGE_SIZE;
            let extend = self
                .last
                .filter(|l| l.kind == RUN_DATA && l.end() == gpa && l.pages < u32::MAX);
            let (n, at) = match extend {
                Some(last) if room > 0 => {
                    let n = left.min(room as u64).min(u64::from(u32::MAX - last.pages));
                    (n as u32, last.at)
                }
                _ => {
                    if RAM_BUF_CAP - self.used < RUN_HEADER_LEN + PAGE_SIZE {
                        self.flush()?;
                    }
                    let room = (RAM_BUF_CAP - self.used - RUN_HEADER_LEN) / PAGE_SIZE;
                    let n = left.min(room as u64).min(u64::from(u32::MAX)) as u32;
                    let at = self.used;
                    self.put_header(gpa, 0, RUN_DATA);
                    (n, at)
                }
            };
            let bytes = n as usize * PAGE_SIZE;
            let dst = &mut self.w.ram_buf[self.used..self.used + bytes];
            fill(gpa, dst).map_err(|source| StreamError::Fill { gpa, source })?;
            self.used += bytes;
            let mut last = self.last.unwrap_or(LastRun {
                at,
                gpa,
                pages: 0,
                kind: RUN_DATA,
            });
            last.pages += n;
            self.w.ram_buf[at + 8..at + 12].copy_from_slice(&last.pages.to_le_bytes());
            self.last = Some(last);
            self.w.ram_stats.data_pages += u64::from(n);
            gpa += bytes as u64;
            left -= u64::from(n);
        }
        Ok(())
    }

    fn put_header(&mut self, gpa: u64, pages: u32, kind: u8) {
        let at = self.used;
        let hdr = &mut self.w.ram_buf[at..at + RUN_HEADER_LEN];
        hdr[..8].copy_from_slice(&gpa.to_le_bytes());
        hdr[8..12].copy_from_slice(&pages.to_le_bytes());
        hdr[12] = kind;
        self.used += RUN_HEADER_LEN;
        self.last = Some(LastRun {
            at,
            gpa,
            pages,
            kind,
        });
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        if self.used == 0 {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.w.ram_buf);
        let used = std::mem::replace(&mut self.used, 0);
        self.last = None;
        let res = self
            .w
            .write_section(SectionKind::Ram, RAM_SECTION, 1, &buf[..used]);
        self.w.ram_buf = buf;
        res
    }
}

impl<W: Write> Drop for RamSectionWriter<'_, W> {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            if self.w.deferred.is_none() {
                self.w.deferred = Some(e);
            }
        }
    }
}

/// A run the format allows: aligned, at least one page, not past 2^64.
fn check_run(gpa: u64, pages: u64) -> Result<(), StreamError> {
    let why = if !gpa.is_multiple_of(PAGE_SIZE as u64) {
        "gpa is not page-aligned"
    } else if pages == 0 {
        "a run has at least one page"
    } else if pages
        .checked_mul(PAGE_SIZE as u64)
        .and_then(|len| gpa.checked_add(len))
        .is_none()
    {
        "the run goes past the end of the address space"
    } else {
        return Ok(());
    };
    Err(StreamError::InvalidRun { gpa, pages, why })
}
