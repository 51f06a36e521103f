//! What the writer writes, the reader reads back, byte for byte.

use super::*;
use crate::writer::RAM_BUF_CAP;
use crate::{persist, RamRun, RamStats, SavedState, SavedStateError, HEADER_LEN};

#[test]
fn every_kind_round_trips() {
    let (bytes, layout) = small_stream();
    let sections = read_all(&bytes[..]).expect("read");
    let kinds: Vec<_> = sections.iter().map(|s| (s.kind, s.name.as_str())).collect();
    assert_eq!(
        kinds,
        [
            (SectionKind::Config, "config"),
            (SectionKind::Ram, "ram"),
            (SectionKind::Vcpu, "vcpu/0"),
            (SectionKind::VmState, "irqchip"),
            (SectionKind::Device, "serial/com1"),
            (SectionKind::Pass, "pass"),
            (SectionKind::End, "end"),
        ]
    );
    for (s, (offset, _, _)) in sections.iter().zip(&layout.sections) {
        assert_eq!(s.offset, *offset, "{}", s.name);
    }
    assert_eq!(sections[0].offset, HEADER_LEN as u64);
    let config: Config = sections[0].json().expect("json");
    assert_eq!(
        config,
        Config {
            vcpus: 2,
            mem_mib: 256
        }
    );
    let runs: Vec<_> = sections[1]
        .ram_runs()
        .expect("ram")
        .collect::<Result<_, _>>()
        .expect("runs");
    let page = pattern(1, PAGE_SIZE);
    assert_eq!(
        runs,
        [
            RamRun::Zero { gpa: 0, pages: 3 },
            RamRun::Data {
                gpa: 3 * 4096,
                data: &page[..]
            }
        ]
    );
    assert_eq!(
        (sections[2].version, &sections[2].payload[..]),
        (2, &b"regs"[..])
    );
    assert_eq!(sections[3].payload, b"pic+ioapic");
    assert_eq!(sections[4].payload, b"{\"lcr\":3}");
    assert_eq!(sections[5].pass().expect("pass"), (0, 4));
    assert_eq!(sections[6].payload.len(), 16);
    assert!(sections[0].pass().is_err());
    assert!(sections[0].ram_runs().is_err());
}

#[test]
fn writer_matches_the_documented_encoding() {
    // The tiny stream of docs/migration-stream.md, encoded by hand.
    let mut w = StreamWriter::new(Vec::new()).expect("header");
    w.write_section(SectionKind::Config, "config", 1, b"{\"vcpus\":1}")
        .expect("config");
    let mut ram = w.ram();
    ram.zero_pages(0, 256).expect("zero");
    ram.finish().expect("ram");
    w.write_pass_end(1, 256).expect("pass");
    let bytes = w.finish().expect("end");

    let mut expected = raw_header(1, 0);
    expected.extend(raw_section(1, b"config", 1, b"{\"vcpus\":1}"));
    expected.extend(raw_section(2, b"ram", 1, &raw_run(0, 256, 0)));
    let mut pass = 1u32.to_le_bytes().to_vec();
    pass.extend_from_slice(&256u64.to_le_bytes());
    expected.extend(raw_section(6, b"pass", 1, &pass));
    let before = expected.len() as u64;
    expected.extend(raw_end(3, before));
    assert_eq!(bytes, expected);
    assert_eq!(bytes.len(), 156);
    // The hexdump in docs/migration-stream.md, computed independently
    // (Python's zlib.crc32).
    let documented = "\
        46455252594d494701000000000000000106636f6e666967010000000b000000\
        000000007b227663707573223a317d2c906b7e020372616d010000000d000000\
        00000000000000000000000000010000006209b688060470617373010000000c\
        0000000000000001000000000100000000000087ff43f4ff03656e6401000000\
        10000000000000000300000000000000770000000000000066182934";
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, documented);
}

#[test]
fn reader_counts_bytes_and_sections() {
    let (bytes, _) = small_stream();
    let mut r = StreamReader::new(&bytes[..]).expect("header");
    assert_eq!(r.bytes_read(), 16);
    while !r.ended() {
        let s = r.next_section().expect("section");
        r.recycle(s);
    }
    assert_eq!(r.bytes_read(), bytes.len() as u64);
    assert_eq!(r.sections_read(), 6);
    assert!(matches!(
        r.next_section(),
        Err(StreamError::AfterEnd { offset }) if offset == bytes.len() as u64
    ));
}

/// (gpa, pages, data) of each run.
type Runs = Vec<(u64, u32, Option<Vec<u8>>)>;

fn ram_runs_of(bytes: &[u8]) -> Vec<(SectionKind, Runs)> {
    let sections = read_all(bytes).expect("read");
    sections
        .iter()
        .filter(|s| s.kind == SectionKind::Ram)
        .map(|s| {
            let runs = s
                .ram_runs()
                .expect("ram")
                .map(|r| match r.expect("run") {
                    RamRun::Zero { gpa, pages } => (gpa, pages, None),
                    RamRun::Data { gpa, data } => {
                        (gpa, (data.len() / PAGE_SIZE) as u32, Some(data.to_vec()))
                    }
                })
                .collect();
            (s.kind, runs)
        })
        .collect()
}

#[test]
fn ram_runs_coalesce_when_adjacent() {
    let mut w = StreamWriter::new(Vec::new()).expect("header");
    let a = pattern(2, 2 * PAGE_SIZE);
    let b = pattern(3, PAGE_SIZE);
    let mut ram = w.ram();
    ram.zero_pages(0, 1).expect("z");
    ram.zero_pages(4096, 2).expect("z"); // adjacent: merged
    ram.zero_pages(5 * 4096, 1).expect("z"); // gap: new run
    ram.data_pages(6 * 4096, &a).expect("d"); // other type: new run
    ram.data_pages(8 * 4096, &b).expect("d"); // adjacent: merged
    ram.zero_pages(9 * 4096, 1).expect("z");
    ram.data_pages(20 * 4096, &b).expect("d");
    ram.finish().expect("finish");
    assert_eq!(
        w.ram_stats(),
        RamStats {
            zero_pages: 5,
            data_pages: 4
        }
    );
    let bytes = w.finish().expect("end");
    let mut ab = a.clone();
    ab.extend_from_slice(&b);
    let sections = ram_runs_of(&bytes);
    assert_eq!(sections.len(), 1);
    assert_eq!(
        sections[0].1,
        [
            (0, 3, None),
            (5 * 4096, 1, None),
            (6 * 4096, 3, Some(ab)),
            (9 * 4096, 1, None),
            (20 * 4096, 1, Some(b)),
        ]
    );
}

#[test]
fn large_data_splits_into_sections_of_about_4_mib() {
    let data = pattern(4, 10 << 20);
    let mut w = StreamWriter::new(Vec::new()).expect("header");
    let mut ram = w.ram();
    ram.data_pages(1 << 30, &data).expect("data");
    ram.zero_pages((1 << 30) + (10 << 20), 100).expect("zero");
    ram.finish().expect("finish");
    let bytes = w.finish().expect("end");
    let sections = read_all(&bytes[..]).expect("read");
    let mut got = Vec::new();
    let mut next = 1u64 << 30;
    for s in sections.iter().filter(|s| s.kind == SectionKind::Ram) {
        assert!(
            s.payload.len() <= RAM_BUF_CAP,
            "section of {}",
            s.payload.len()
        );
        for run in s.ram_runs().expect("ram") {
            match run.expect("run") {
                RamRun::Data { gpa, data } => {
                    assert_eq!(gpa, next);
                    next += data.len() as u64;
                    got.extend_from_slice(data);
                }
                RamRun::Zero { gpa, pages } => {
                    assert_eq!((gpa, pages), (next, 100));
                }
            }
        }
    }
    assert_eq!(got, data);
    let ram_sections = sections
        .iter()
        .filter(|s| s.kind == SectionKind::Ram)
        .count();
    assert_eq!(ram_sections, 3, "10 MiB in sections of ~4 MiB");
}

#[test]
fn data_pages_with_fills_in_place() {
    let mut w = StreamWriter::new(Vec::new()).expect("header");
    let mut ram = w.ram();
    let mut calls = Vec::new();
    ram.data_pages_with(0x10_0000, 2000, |gpa, buf| {
        calls.push((gpa, buf.len()));
        for (i, page) in buf.chunks_mut(PAGE_SIZE).enumerate() {
            page.fill(((gpa / 4096 + i as u64) % 251) as u8);
        }
        Ok(())
    })
    .expect("fill");
    ram.finish().expect("finish");
    // 1024 pages fit a section: two calls, contiguous.
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0], (0x10_0000, 1024 * PAGE_SIZE));
    assert_eq!(calls[1], (0x10_0000 + 1024 * 4096, 976 * PAGE_SIZE));
    let bytes = w.finish().expect("end");
    for (_, runs) in ram_runs_of(&bytes) {
        for (gpa, pages, data) in runs {
            let data = data.expect("data run");
            for i in 0..pages as usize {
                let want = ((gpa / 4096 + i as u64) % 251) as u8;
                assert!(data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                    .iter()
                    .all(|&b| b == want));
            }
        }
    }
}

#[test]
fn fill_errors_and_invalid_runs_are_refused() {
    let mut w = StreamWriter::new(Vec::new()).expect("header");
    let mut ram = w.ram();
    let err = ram
        .data_pages_with(0, 1, |_, _| Err(std::io::Error::other("gone")))
        .expect_err("fill error");
    assert!(matches!(err, StreamError::Fill { gpa: 0, .. }), "{err}");
    for (gpa, pages) in [(1u64, 1u32), (0, 0), (u64::MAX - 4095, 1)] {
        let err = ram.zero_pages(gpa, pages).expect_err("invalid");
        assert!(matches!(err, StreamError::InvalidRun { .. }), "{err}");
    }
    assert!(ram.data_pages(0, &[0; 100]).is_err());
    assert!(ram.data_pages(0, &[]).is_err());
    assert!(ram.data_pages(4095, &[0; 4096]).is_err());
    // The last page of the address space is fine.
    ram.zero_pages(u64::MAX - 4095 - 4096, 1)
        .expect("last page");
}

#[test]
fn the_writer_refuses_what_the_reader_would() {
    let mut w = StreamWriter::new(Vec::new()).expect("header");
    let long = "x".repeat(256);
    for name in ["", long.as_str()] {
        let err = w
            .write_section(SectionKind::Device, name, 1, b"")
            .expect_err("bad name");
        assert!(matches!(err, StreamError::BadName { .. }), "{err}");
    }
    let err = w
        .write_section(SectionKind::End, "end", 1, &[0; 16])
        .expect_err("end");
    assert!(matches!(err, StreamError::Misuse { .. }), "{err}");
    let err = w
        .write_section(SectionKind::Pass, "pass", 1, &[0; 11])
        .expect_err("pass");
    assert!(matches!(err, StreamError::BadLength { .. }), "{err}");
    let big = vec![0u8; (16 << 20) + 1];
    let err = w
        .write_section(SectionKind::Device, "d", 1, &big)
        .expect_err("too large");
    assert!(matches!(err, StreamError::TooLarge { .. }), "{err}");
    // A 255-byte name is fine and nothing above was written.
    w.write_section(SectionKind::Device, &"n".repeat(255), 1, b"")
        .expect("255");
    let bytes = w.finish().expect("finish");
    let sections = read_all(&bytes[..]).expect("read");
    assert_eq!(sections.len(), 2);
    assert_eq!(sections[0].name.len(), 255);
}

#[test]
fn ram_writer_dropped_flushes_and_keeps_errors() {
    let mut w = StreamWriter::new(Vec::new()).expect("header");
    {
        let mut ram = w.ram();
        ram.zero_pages(0, 1).expect("z");
    }
    let bytes = w.finish().expect("end");
    assert_eq!(ram_runs_of(&bytes)[0].1, [(0, 1, None)]);

    // A transport that fails once the header is written.
    struct Failing(usize);
    impl std::io::Write for Failing {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.0 >= 16 {
                return Err(std::io::Error::other("link down"));
            }
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = StreamWriter::new(Failing(0)).expect("header");
    {
        let mut ram = w.ram();
        ram.zero_pages(0, 1).expect("buffered");
    }
    let err = w.finish().err().expect("deferred error");
    assert!(matches!(err, StreamError::Io { offset: 16, .. }), "{err}");
}

#[derive(Default)]
struct Uart {
    lcr: u8,
    id: &'static str,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct UartState {
    lcr: u8,
}

#[derive(Debug, thiserror::Error)]
#[error("lcr {lcr:#x} (v{version})")]
struct BadLcr {
    lcr: u8,
    version: u32,
}

impl SavedState for Uart {
    fn section_name(&self) -> String {
        format!("serial/{}", self.id)
    }
    fn section_version(&self) -> u32 {
        2
    }
    fn save_state(&self) -> Result<Vec<u8>, SavedStateError> {
        persist::encode(&UartState { lcr: self.lcr })
    }
    fn restore_state(&mut self, version: u32, payload: &[u8]) -> Result<(), SavedStateError> {
        let state: UartState = persist::decode(payload)?;
        if state.lcr == 0xff {
            let lcr = state.lcr;
            return Err(SavedStateError::refused(BadLcr { lcr, version }));
        }
        self.lcr = state.lcr;
        Ok(())
    }
}

#[test]
fn saved_states_round_trip() {
    let mut w = StreamWriter::new(Vec::new()).expect("header");
    w.write_state(&Uart { lcr: 3, id: "com1" }).expect("save");
    w.write_state(&Uart {
        lcr: 0xff,
        id: "com2",
    })
    .expect("save");
    let bytes = w.finish().expect("end");
    let sections = read_all(&bytes[..]).expect("read");
    assert_eq!(sections[0].name, "serial/com1");
    assert_eq!(sections[0].version, 2);
    let mut com1 = Uart {
        id: "com1",
        ..Default::default()
    };
    sections[0].restore_into(&mut com1).expect("restore");
    assert_eq!(com1.lcr, 3);
    // Wrong instance, refused state, undecodable state, newer version.
    let err = sections[1].restore_into(&mut com1).expect_err("name");
    assert!(
        err.to_string().contains("serial/com2 at byte")
            && err.to_string().contains("is not serial/com1"),
        "{err}"
    );
    let mut com2 = Uart {
        id: "com2",
        ..Default::default()
    };
    let err = sections[1].restore_into(&mut com2).expect_err("refused");
    assert!(err.to_string().contains("refused: lcr 0xff (v2)"), "{err}");
    let mut garbled = sections[0].clone();
    garbled.payload = b"{\"lcr\": \"x\"}".to_vec();
    let err = garbled.restore_into(&mut com1).expect_err("decode");
    assert!(
        matches!(
            &err,
            StreamError::DeviceState {
                source: SavedStateError::Decode(_),
                ..
            }
        ),
        "{err}"
    );
    let mut newer = sections[0].clone();
    newer.version = 3;
    let err = newer.restore_into(&mut com1).expect_err("version");
    assert!(
        matches!(
            err,
            StreamError::SectionVersion {
                found: 3,
                supported: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn page_or_zero_writes_what_data_and_zero_pages_would() {
    // Pages in order with gaps, a zero/data mix that opens, extends and
    // retracts runs, over more than one section (more than 1024 data
    // pages), byte for byte against the explicit calls.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut pages = Vec::new();
    let mut gpa = 0u64;
    for _ in 0..3000 {
        gpa += if next() % 5 == 0 { 2 * 4096 } else { 4096 };
        let zero = next() % 3 == 0;
        pages.push((gpa, zero));
    }
    let page = |gpa: u64, zero: bool| {
        if zero {
            vec![0u8; PAGE_SIZE]
        } else {
            pattern(gpa | 1, PAGE_SIZE)
        }
    };
    let mut a = StreamWriter::new(Vec::new()).expect("header");
    let mut ram = a.ram();
    for &(gpa, zero) in &pages {
        let went = ram
            .page_or_zero(gpa, |dst| {
                dst.copy_from_slice(&page(gpa, zero));
                Ok(dst.iter().all(|&b| b == 0))
            })
            .expect("page");
        assert_eq!(went, !zero);
    }
    ram.finish().expect("finish");
    let stats_a = a.ram_stats();
    let mut b = StreamWriter::new(Vec::new()).expect("header");
    let mut ram = b.ram();
    for &(gpa, zero) in &pages {
        if zero {
            ram.zero_pages(gpa, 1).expect("zero");
        } else {
            ram.data_pages(gpa, &page(gpa, zero)).expect("data");
        }
    }
    ram.finish().expect("finish");
    assert_eq!(stats_a, b.ram_stats());
    assert_eq!(a.finish().expect("end"), b.finish().expect("end"));
}
