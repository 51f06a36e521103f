//! Unit tests of the stream and the transports, with an independent
//! encoder ([`raw_section`]) so the format is checked against the
//! document, not only against the writer.

mod bad;
mod roundtrip;
mod transport;

use crate::{
    OutsideMemory, RamSink, Section, SectionKind, StreamError, StreamReader, StreamWriter,
    PAGE_SIZE,
};
use std::io::Read;

/// A section encoded by hand from docs/migration-stream.md.
pub(crate) fn raw_section(kind: u8, name: &[u8], version: u32, payload: &[u8]) -> Vec<u8> {
    let mut s = vec![kind, name.len() as u8];
    s.extend_from_slice(name);
    s.extend_from_slice(&version.to_le_bytes());
    s.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    s.extend_from_slice(payload);
    let crc = crc32fast::hash(&s);
    s.extend_from_slice(&crc.to_le_bytes());
    s
}

/// A stream header encoded by hand.
pub(crate) fn raw_header(version: u32, flags: u32) -> Vec<u8> {
    let mut h = b"FERRYMIG".to_vec();
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h
}

/// An end section for a stream of `sections` sections in `bytes` bytes.
pub(crate) fn raw_end(sections: u64, bytes: u64) -> Vec<u8> {
    let mut p = sections.to_le_bytes().to_vec();
    p.extend_from_slice(&bytes.to_le_bytes());
    raw_section(0xff, b"end", 1, &p)
}

/// A RAM run header.
pub(crate) fn raw_run(gpa: u64, pages: u32, kind: u8) -> Vec<u8> {
    let mut r = gpa.to_le_bytes().to_vec();
    r.extend_from_slice(&pages.to_le_bytes());
    r.push(kind);
    r
}

/// Deterministic non-repeating bytes.
pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
pub(crate) struct Config {
    pub vcpus: u32,
    pub mem_mib: u64,
}

/// Offsets of the sections of [`small_stream`], with their name lengths.
pub(crate) struct Layout {
    pub sections: Vec<(u64, usize, usize)>, // (offset, name length, total length)
}

/// Every kind of section, one data page, a few hundred bytes of JSON.
pub(crate) fn small_stream() -> (Vec<u8>, Layout) {
    let mut w = StreamWriter::new(Vec::new()).expect("header");
    let mut layout = Layout {
        sections: Vec::new(),
    };
    let mut mark = |w: &StreamWriter<Vec<u8>>, start: u64, name: &str| {
        let len = (w.bytes_written() - start) as usize;
        layout.sections.push((start, name.len(), len));
    };
    let s = w.bytes_written();
    let config = Config {
        vcpus: 2,
        mem_mib: 256,
    };
    w.write_json(SectionKind::Config, "config", 1, &config)
        .expect("config");
    mark(&w, s, "config");
    let s = w.bytes_written();
    {
        let mut ram = w.ram();
        ram.zero_pages(0, 3).expect("zero");
        ram.data_pages(3 * 4096, &pattern(1, PAGE_SIZE))
            .expect("data");
        ram.finish().expect("ram");
    }
    mark(&w, s, "ram");
    for (kind, name, payload) in [
        (SectionKind::Vcpu, "vcpu/0", &b"regs"[..]),
        (SectionKind::VmState, "irqchip", b"pic+ioapic"),
        (SectionKind::Device, "serial/com1", b"{\"lcr\":3}"),
    ] {
        let s = w.bytes_written();
        w.write_section(kind, name, 2, payload).expect("section");
        mark(&w, s, name);
    }
    let s = w.bytes_written();
    w.write_pass_end(0, 4).expect("pass");
    mark(&w, s, "pass");
    let s = w.bytes_written();
    let out = w.finish().expect("finish");
    layout.sections.push((s, 3, out.len() - s as usize));
    (out, layout)
}

/// Reads a whole stream; the sections up to and including the end.
pub(crate) fn read_all(mut r: impl Read) -> Result<Vec<Section>, StreamError> {
    let mut reader = StreamReader::new(&mut r)?;
    let mut out = Vec::new();
    loop {
        let s = reader.next_section()?;
        let end = s.kind == SectionKind::End;
        if s.kind == SectionKind::Ram {
            for run in s.ram_runs()? {
                run?;
            }
        }
        out.push(s);
        if end {
            return Ok(out);
        }
    }
}

/// Guest memory for [`StreamReader::next_section_with_ram`].
pub(crate) struct MemSink(pub Vec<u8>);

impl MemSink {
    fn range(&mut self, gpa: u64, len: usize) -> Result<&mut [u8], OutsideMemory> {
        usize::try_from(gpa)
            .ok()
            .and_then(|at| self.0.get_mut(at..at.checked_add(len)?))
            .ok_or(OutsideMemory {
                gpa,
                pages: (len / PAGE_SIZE) as u64,
            })
    }
}

impl RamSink for MemSink {
    fn zero_pages(&mut self, gpa: u64, pages: u32) -> Result<(), OutsideMemory> {
        self.range(gpa, pages as usize * PAGE_SIZE)?.fill(0);
        Ok(())
    }
    fn data_pages(&mut self, gpa: u64, len: usize) -> Result<&mut [u8], OutsideMemory> {
        self.range(gpa, len)
    }
}

/// [`read_all`] with RAM going straight into `sink`.
pub(crate) fn read_all_into(
    mut r: impl Read,
    sink: &mut MemSink,
) -> Result<Vec<Section>, StreamError> {
    let mut reader = StreamReader::new(&mut r)?;
    let mut out = Vec::new();
    loop {
        let s = reader.next_section_with_ram(sink)?;
        let end = s.kind == SectionKind::End;
        out.push(s);
        if end {
            return Ok(out);
        }
    }
}

/// Both readers must agree on a stream; returns the error.
pub(crate) fn both_fail(bytes: &[u8]) -> StreamError {
    let plain = read_all(bytes).err();
    let streamed = read_all_into(bytes, &mut MemSink(vec![0; 1 << 20])).err();
    match (plain, streamed) {
        (Some(a), Some(b)) => {
            assert_eq!(a.to_string(), b.to_string(), "both readers");
            a
        }
        (a, b) => panic!("accepted: plain {a:?}, into memory {b:?}"),
    }
}
