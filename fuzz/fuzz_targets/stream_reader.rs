//! The migration stream reader on bytes from anywhere: every section
//! kind, its length limit, CRC, the end section's counts, and the RAM
//! runs (into a 16 MiB "guest memory" sink that refuses what lies
//! outside). The first byte picks how the rest is read: as a raw stream
//! (what a peer sends), or as sections the target frames itself with
//! valid CRCs (so mutations reach the payload checks a CRC would
//! otherwise stop).
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration::{OutsideMemory, RamSink, SectionKind, StreamReader, StreamWriter};

const MEMORY: usize = 16 << 20;

struct Memory(Vec<u8>);

impl RamSink for Memory {
    fn zero_pages(&mut self, gpa: u64, pages: u32) -> Result<(), OutsideMemory> {
        let outside = OutsideMemory {
            gpa,
            pages: u64::from(pages),
        };
        let start = usize::try_from(gpa).map_err(|_| outside)?;
        let len = usize::try_from(u64::from(pages) * 4096).map_err(|_| outside)?;
        let end = start.checked_add(len).filter(|&e| e <= self.0.len()).ok_or(outside)?;
        self.0[start..end].fill(0);
        Ok(())
    }

    fn data_pages(&mut self, gpa: u64, len: usize) -> Result<&mut [u8], OutsideMemory> {
        let outside = OutsideMemory {
            gpa,
            pages: (len / 4096) as u64,
        };
        let start = usize::try_from(gpa).map_err(|_| outside)?;
        let end = start.checked_add(len).filter(|&e| e <= self.0.len()).ok_or(outside)?;
        Ok(&mut self.0[start..end])
    }
}

/// Reads every section until the end or the first error, the RAM ones
/// both ways (into the sink, and as runs from the payload).
fn read(bytes: &[u8], memory: &mut Memory) {
    let Ok(mut reader) = StreamReader::new(bytes) else {
        return;
    };
    for i in 0.. {
        let section = if i % 2 == 0 {
            reader.next_section_with_ram(memory)
        } else {
            reader.next_section()
        };
        let Ok(section) = section else { return };
        match section.kind {
            SectionKind::End => return,
            SectionKind::Ram => {
                if let Ok(runs) = section.ram_runs() {
                    for run in runs {
                        if run.is_err() {
                            break;
                        }
                    }
                }
            }
            SectionKind::Pass => {
                let _ = section.pass();
            }
            _ => {}
        }
    }
}

/// Frames the input as sections: kind byte, name length byte, name,
/// payload length (u16 LE), payload; written by the real writer.
fn framed(mut input: &[u8]) -> Vec<u8> {
    let Ok(mut w) = StreamWriter::new(Vec::new()) else {
        return Vec::new();
    };
    while let [kind, name_len, rest @ ..] = input {
        let name_len = usize::from(*name_len % 32).min(rest.len());
        let (name, rest) = rest.split_at(name_len);
        let [a, b, rest @ ..] = rest else { break };
        let len = usize::from(u16::from_le_bytes([*a, *b])).min(rest.len());
        let (payload, rest) = rest.split_at(len);
        input = rest;
        let Some(kind) = SectionKind::from_u8(*kind % 7) else {
            continue;
        };
        let name = String::from_utf8_lossy(name);
        if w.write_section(kind, &name, 1, payload).is_err() {
            break;
        }
    }
    w.finish().unwrap_or_default()
}

thread_local! {
    // One "guest memory" for every run: allocating 16 MiB per input would
    // be most of the time spent.
    static GUEST: std::cell::RefCell<Memory> = std::cell::RefCell::new(Memory(vec![0; MEMORY]));
}

fuzz_target!(|data: &[u8]| {
    GUEST.with(|m| {
        let memory = &mut *m.borrow_mut();
        match data.split_first() {
            Some((mode, rest)) if mode & 1 == 1 => read(&framed(rest), memory),
            Some((_, rest)) => read(rest, memory),
            None => {}
        }
    });
});
