//! RAM runs: the payload of `ram` sections.
//!
//! A run is `gpa u64 LE | page count u32 LE | type u8`, followed for data
//! runs by `count * 4096` bytes of page contents.

use crate::error::StreamError;
use crate::{SectionKind, PAGE_SIZE};

/// Length of a run header.
pub(crate) const RUN_HEADER_LEN: usize = 13;
/// Run type: pages that are all zero; no data follows.
pub(crate) const RUN_ZERO: u8 = 0;
/// Run type: the pages' contents follow.
pub(crate) const RUN_DATA: u8 = 1;

/// One run of guest pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamRun<'a> {
    /// `pages` pages from `gpa` are all zero.
    Zero { gpa: u64, pages: u32 },
    /// The pages from `gpa` hold `data` (a multiple of 4096 bytes).
    Data { gpa: u64, data: &'a [u8] },
}

impl RamRun<'_> {
    /// First guest-physical address of the run.
    pub fn gpa(&self) -> u64 {
        match *self {
            Self::Zero { gpa, .. } | Self::Data { gpa, .. } => gpa,
        }
    }

    /// Number of pages in the run.
    pub fn pages(&self) -> u64 {
        match *self {
            Self::Zero { pages, .. } => u64::from(pages),
            Self::Data { data, .. } => (data.len() / PAGE_SIZE) as u64,
        }
    }

    /// Length in bytes of guest memory the run covers.
    pub fn len(&self) -> u64 {
        self.pages() * PAGE_SIZE as u64
    }

    /// Runs always cover at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Where [`crate::StreamReader::next_section_with_ram`] puts guest pages
/// as it reads them. A refusal stops the stream.
pub trait RamSink {
    /// `pages` pages from `gpa` are zero. (Fresh anonymous memory already
    /// is: a restore into it can do nothing.)
    fn zero_pages(&mut self, gpa: u64, pages: u32) -> Result<(), OutsideMemory>;
    /// Where the `len` bytes of pages from `gpa` go: exactly `len` bytes.
    fn data_pages(&mut self, gpa: u64, len: usize) -> Result<&mut [u8], OutsideMemory>;
}

/// A sink's refusal: the run is not inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("RAM run at {gpa:#x} ({pages} pages) lies outside guest memory")]
pub struct OutsideMemory {
    pub gpa: u64,
    pub pages: u64,
}

/// What is wrong with a RAM run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunDefect {
    #[error("a {0} section has no RAM runs")]
    NotRam(SectionKind),
    #[error("run header cut short ({left} of {RUN_HEADER_LEN} bytes left in the section)")]
    HeaderCut { left: u64 },
    #[error("gpa {gpa:#x} is not page-aligned")]
    Unaligned { gpa: u64 },
    #[error("run at gpa {gpa:#x} has a page count of 0")]
    NoPages { gpa: u64 },
    #[error("run at gpa {gpa:#x} of {pages} pages goes past 2^64")]
    PastTheTop { gpa: u64, pages: u32 },
    #[error("unknown run type {kind} at gpa {gpa:#x}")]
    UnknownType { kind: u8, gpa: u64 },
    #[error("data run at gpa {gpa:#x} claims {pages} pages ({} bytes) but the section has {left} bytes left", u64::from(*.pages) * PAGE_SIZE as u64)]
    DataShort { gpa: u64, pages: u32, left: u64 },
    #[error(transparent)]
    Outside(#[from] OutsideMemory),
    #[error("the RAM sink gave {got} bytes for {wanted}")]
    SinkShort { got: usize, wanted: usize },
}

/// The runs of a RAM section, validated one by one: each item is a run or
/// the error that stops the iteration (the iterator then ends).
#[derive(Debug)]
pub struct RamRuns<'a> {
    payload: &'a [u8],
    pos: usize,
    section: &'a str,
    /// Stream offset of the payload's first byte.
    base: u64,
    failed: bool,
}

impl<'a> RamRuns<'a> {
    pub(crate) fn new(payload: &'a [u8], section: &'a str, base: u64) -> Self {
        Self {
            payload,
            pos: 0,
            section,
            base,
            failed: false,
        }
    }

    fn bad(&mut self, at: usize, defect: RunDefect) -> Option<Result<RamRun<'a>, StreamError>> {
        self.failed = true;
        Some(Err(StreamError::BadRam {
            section: self.section.to_owned(),
            offset: self.base + at as u64,
            defect,
        }))
    }
}

impl<'a> Iterator for RamRuns<'a> {
    type Item = Result<RamRun<'a>, StreamError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos == self.payload.len() {
            return None;
        }
        let at = self.pos;
        let rest = &self.payload[at..];
        let Some(hdr) = rest.get(..RUN_HEADER_LEN) else {
            let left = rest.len() as u64;
            return self.bad(at, RunDefect::HeaderCut { left });
        };
        let (gpa, pages, kind) = match parse_run_header(hdr) {
            Ok(run) => run,
            Err(defect) => return self.bad(at, defect),
        };
        let len = u64::from(pages) * PAGE_SIZE as u64;
        let body = &rest[RUN_HEADER_LEN..];
        if kind == RUN_ZERO {
            self.pos = at + RUN_HEADER_LEN;
            return Some(Ok(RamRun::Zero { gpa, pages }));
        }
        let Some(data) = usize::try_from(len).ok().and_then(|l| body.get(..l)) else {
            let left = body.len() as u64;
            return self.bad(at, RunDefect::DataShort { gpa, pages, left });
        };
        self.pos = at + RUN_HEADER_LEN + data.len();
        let run = RamRun::Data { gpa, data };
        Some(Ok(run))
    }
}

pub(crate) fn parse_run_header(hdr: &[u8]) -> Result<(u64, u32, u8), RunDefect> {
    let mut gpa = [0u8; 8];
    gpa.copy_from_slice(&hdr[..8]);
    let gpa = u64::from_le_bytes(gpa);
    let pages = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    let kind = hdr[12];
    if !gpa.is_multiple_of(PAGE_SIZE as u64) {
        return Err(RunDefect::Unaligned { gpa });
    }
    if pages == 0 {
        return Err(RunDefect::NoPages { gpa });
    }
    if gpa
        .checked_add(u64::from(pages) * PAGE_SIZE as u64)
        .is_none()
    {
        return Err(RunDefect::PastTheTop { gpa, pages });
    }
    if kind != RUN_ZERO && kind != RUN_DATA {
        return Err(RunDefect::UnknownType { kind, gpa });
    }
    Ok((gpa, pages, kind))
}

impl std::iter::FusedIterator for RamRuns<'_> {}
