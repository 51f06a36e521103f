//! The reading side: header check, sections with their limits and CRC,
//! and the end section's counts.

use crate::error::{display_name, StreamError};
use crate::ram::{parse_run_header, RamRuns, RamSink, RunDefect, RUN_HEADER_LEN, RUN_ZERO};
use crate::{SectionKind, HEADER_LEN, MAGIC, PAGE_SIZE, STREAM_VERSION};
use serde::de::DeserializeOwned;
use std::io::{self, Read};

/// One section as read from the stream, its checksum verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    pub kind: SectionKind,
    pub name: String,
    pub version: u32,
    pub payload: Vec<u8>,
    /// Stream offset of the section's kind byte.
    pub offset: u64,
}

impl Section {
    /// Decodes the payload as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, StreamError> {
        serde_json::from_slice(&self.payload).map_err(|source| StreamError::BadJson {
            section: self.name.clone(),
            offset: self.offset,
            source,
        })
    }

    /// The RAM runs of a `ram` section, validated as they are iterated.
    pub fn ram_runs(&self) -> Result<RamRuns<'_>, StreamError> {
        if self.kind != SectionKind::Ram {
            return Err(StreamError::BadRam {
                section: self.name.clone(),
                offset: self.offset,
                defect: RunDefect::NotRam(self.kind),
            });
        }
        Ok(RamRuns::new(
            &self.payload,
            &self.name,
            self.payload_offset(),
        ))
    }

    /// The pass number and page count of a pass section.
    pub fn pass(&self) -> Result<(u32, u64), StreamError> {
        match (self.kind, self.payload.as_slice()) {
            (SectionKind::Pass, [a, b, c, d, rest @ ..]) if rest.len() == 8 => {
                let mut pages = [0u8; 8];
                pages.copy_from_slice(rest);
                Ok((
                    u32::from_le_bytes([*a, *b, *c, *d]),
                    u64::from_le_bytes(pages),
                ))
            }
            _ => Err(StreamError::BadLength {
                section: self.name.clone(),
                kind: self.kind,
                len: self.payload.len() as u64,
                expected: crate::PASS_PAYLOAD_LEN,
                offset: self.offset,
            }),
        }
    }

    /// Fails unless `1 <= version <= supported` (for consumers of device
    /// and state sections that read older versions of their own format).
    pub fn check_version(&self, supported: u32) -> Result<(), StreamError> {
        if self.version == 0 || self.version > supported {
            return Err(StreamError::SectionVersion {
                section: self.name.clone(),
                offset: self.offset,
                found: self.version,
                supported,
            });
        }
        Ok(())
    }

    /// Stream offset of the first payload byte.
    pub fn payload_offset(&self) -> u64 {
        self.offset + 14 + self.name.len() as u64
    }
}

/// Reads a migration stream from `R`.
///
/// `R` should be buffered (the channels of [`crate::Listener::accept`]
/// are): headers are read a few bytes at a time.
pub struct StreamReader<R: Read> {
    inner: R,
    pos: u64,
    sections: u64,
    ended: bool,
    /// A payload buffer handed back by [`Self::recycle`].
    spare: Vec<u8>,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the 16-byte header.
    pub fn new(inner: R) -> Result<Self, StreamError> {
        let mut r = Self {
            inner,
            pos: 0,
            sections: 0,
            ended: false,
            spare: Vec::new(),
        };
        let mut header = [0u8; HEADER_LEN];
        r.fill(&mut header[..8], "stream header")?;
        let mut found = [0u8; 8];
        found.copy_from_slice(&header[..8]);
        if found != MAGIC {
            return Err(StreamError::BadMagic { found });
        }
        r.fill(&mut header[8..], "stream header")?;
        let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if version != STREAM_VERSION {
            return Err(StreamError::UnsupportedVersion {
                found: version,
                supported: STREAM_VERSION,
            });
        }
        let flags = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
        if flags != 0 {
            return Err(StreamError::UnsupportedFlags { found: flags });
        }
        Ok(r)
    }

    /// Reads the next section: checks its kind, its length against the
    /// kind's limit (before allocating anything) and its CRC. The end
    /// section's counts are checked against what was read, and it is
    /// returned like any other; reading past it is an error.
    pub fn next_section(&mut self) -> Result<Section, StreamError> {
        self.read_section(None)
    }

    /// [`Self::next_section`], except that the runs of a RAM section go
    /// straight to `sink` as they are read: page data is read directly
    /// into the slices the sink hands out (guest memory), without an
    /// intermediate buffer. The section returned for RAM has an empty
    /// payload. Runs are validated as in [`RamRuns`]; the sink may have
    /// received part of a section whose checksum then fails, so a failed
    /// stream leaves the sink's memory unusable.
    pub fn next_section_with_ram(
        &mut self,
        sink: &mut dyn RamSink,
    ) -> Result<Section, StreamError> {
        self.read_section(Some(sink))
    }

    fn read_section(&mut self, sink: Option<&mut dyn RamSink>) -> Result<Section, StreamError> {
        let offset = self.pos;
        if self.ended {
            return Err(StreamError::AfterEnd { offset });
        }
        // kind, name length, name (≤ 255), version, payload length
        let mut header = [0u8; 2 + 255 + 12];
        self.fill(&mut header[..2], "section header")?;
        let kind_byte = header[0];
        let name_len = usize::from(header[1]);
        self.fill(&mut header[2..2 + name_len], "section name")?;
        self.fill(&mut header[2 + name_len..14 + name_len], "section header")?;
        let header = &header[..14 + name_len];
        let name_bytes = &header[2..2 + name_len];
        let rest = &header[2 + name_len..];
        let version = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&rest[4..12]);
        let len = u64::from_le_bytes(len);

        let Some(kind) = SectionKind::from_u8(kind_byte) else {
            return Err(StreamError::UnknownKind {
                kind: kind_byte,
                name: display_name(name_bytes),
                offset,
            });
        };
        kind.check_len(len, || display_name(name_bytes), offset)?;

        let mut crc = crc32fast::Hasher::new();
        crc.update(header);
        let (payload, run_error) = match sink {
            Some(sink) if kind == SectionKind::Ram => {
                let name = display_name(name_bytes);
                (Vec::new(), self.stream_ram(len, &mut crc, sink, &name)?)
            }
            _ => {
                // Bounded by the kind's limit (≤ 64 MiB) just above.
                let mut payload = std::mem::take(&mut self.spare);
                payload.resize(len as usize, 0);
                self.fill(&mut payload, "section payload")?;
                crc.update(&payload);
                (payload, None)
            }
        };
        let mut stored = [0u8; 4];
        self.fill(&mut stored, "section checksum")?;
        let stored = u32::from_le_bytes(stored);
        let computed = crc.finalize();
        if computed != stored {
            return Err(StreamError::ChecksumMismatch {
                section: display_name(name_bytes),
                offset,
                expected: stored,
                found: computed,
            });
        }
        if let Some(e) = run_error {
            return Err(e);
        }
        let name = match std::str::from_utf8(name_bytes) {
            Ok("") => Err("a section name is 1 to 255 bytes"),
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err("a section name is UTF-8"),
        }
        .map_err(|why| StreamError::BadName {
            name: display_name(name_bytes),
            offset,
            why,
        })?;
        if matches!(kind, SectionKind::Pass | SectionKind::End) && version != 1 {
            return Err(StreamError::SectionVersion {
                section: name,
                offset,
                found: version,
                supported: 1,
            });
        }

        if kind == SectionKind::End {
            self.check_end(&payload, offset)?;
            self.ended = true;
        } else {
            self.sections += 1;
        }
        Ok(Section {
            kind,
            name,
            version,
            payload,
            offset,
        })
    }

    /// Reads `len` bytes of RAM runs into `sink`, updating `crc`. A bad
    /// run or a refusal of the sink does not stop the reading: the rest of
    /// the section is drained so that a checksum failure, the likelier
    /// cause, is reported first; the run error is returned for after.
    fn stream_ram(
        &mut self,
        len: u64,
        crc: &mut crc32fast::Hasher,
        sink: &mut dyn RamSink,
        name: &str,
    ) -> Result<Option<StreamError>, StreamError> {
        let mut left = len;
        let mut error = None;
        while left > 0 && error.is_none() {
            let at = self.pos;
            let mut bad = |defect: RunDefect| {
                error = Some(StreamError::BadRam {
                    section: name.to_owned(),
                    offset: at,
                    defect,
                })
            };
            if left < RUN_HEADER_LEN as u64 {
                bad(RunDefect::HeaderCut { left });
                break;
            }
            let mut hdr = [0u8; RUN_HEADER_LEN];
            self.fill(&mut hdr, "section payload")?;
            crc.update(&hdr);
            left -= RUN_HEADER_LEN as u64;
            let (gpa, pages, kind) = match parse_run_header(&hdr) {
                Ok(run) => run,
                Err(defect) => {
                    bad(defect);
                    break;
                }
            };
            if kind == RUN_ZERO {
                if let Err(outside) = sink.zero_pages(gpa, pages) {
                    bad(outside.into());
                }
                continue;
            }
            let bytes = u64::from(pages) * PAGE_SIZE as u64;
            if bytes > left {
                bad(RunDefect::DataShort { gpa, pages, left });
                break;
            }
            // bytes <= left <= 64 MiB
            let bytes = bytes as usize;
            match sink.data_pages(gpa, bytes) {
                Ok(dst) if dst.len() == bytes => {
                    self.fill(dst, "section payload")?;
                    crc.update(dst);
                    left -= bytes as u64;
                }
                Ok(dst) => bad(RunDefect::SinkShort {
                    got: dst.len(),
                    wanted: bytes,
                }),
                Err(outside) => bad(outside.into()),
            }
        }
        // Drain what is left of the section after an error.
        let mut scratch = vec![0u8; (left as usize).min(64 * 1024)];
        while left > 0 {
            let n = (left as usize).min(scratch.len());
            self.fill(&mut scratch[..n], "section payload")?;
            crc.update(&scratch[..n]);
            left -= n as u64;
        }
        Ok(error)
    }

    /// Gives a section's payload buffer back for the next section to
    /// reuse. Optional, but saves an allocation and a page-faulting
    /// memset per section when restoring gigabytes of RAM.
    pub fn recycle(&mut self, section: Section) {
        if section.payload.capacity() > self.spare.capacity() {
            self.spare = section.payload;
        }
    }

    /// Whether the end section has been read.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Bytes read so far, header included.
    pub fn bytes_read(&self) -> u64 {
        self.pos
    }

    /// Sections read so far, not counting the end section.
    pub fn sections_read(&self) -> u64 {
        self.sections
    }

    /// The transport (for the acknowledgement after the end section).
    /// Bytes read here are not counted by the stream.
    pub fn inner_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Gives back the transport.
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn check_end(&self, payload: &[u8], offset: u64) -> Result<(), StreamError> {
        let mut sections = [0u8; 8];
        sections.copy_from_slice(&payload[..8]);
        let sections = u64::from_le_bytes(sections);
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&payload[8..16]);
        let bytes = u64::from_le_bytes(bytes);
        let (what, claims, had) = if sections != self.sections {
            ("sections", sections, self.sections)
        } else if bytes != offset {
            ("bytes", bytes, offset)
        } else {
            return Ok(());
        };
        Err(StreamError::BadEnd {
            offset,
            what,
            claims,
            had,
        })
    }

    /// Fills `buf` completely; a short stream is `Truncated` at the exact
    /// offset where the bytes ran out.
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), StreamError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => {
                    self.pos += got as u64;
                    return Err(StreamError::Truncated {
                        offset: self.pos,
                        what,
                    });
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    self.pos += got as u64;
                    return Err(StreamError::Io {
                        offset: self.pos,
                        source,
                    });
                }
            }
        }
        self.pos += got as u64;
        Ok(())
    }
}
