//! The reader against streams that are cut, corrupted or forged: every
//! problem is an error naming what and where, never a panic, never a
//! huge allocation.

use super::*;

#[test]
fn truncated_at_every_offset() {
    let (bytes, _) = small_stream();
    assert!(read_all(&bytes[..]).is_ok());
    for len in 0..bytes.len() {
        match both_fail(&bytes[..len]) {
            StreamError::Truncated { offset, what } => {
                assert_eq!(offset, len as u64, "prefix of {len} bytes ({what})");
            }
            other => panic!("prefix of {len} bytes: {other:?}"),
        }
    }
}

#[test]
fn every_flipped_byte_is_detected() {
    let (bytes, layout) = small_stream();
    for pos in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bad = bytes.clone();
            bad[pos] ^= mask;
            let err = both_fail(&bad);
            let msg = err.to_string();
            assert!(!msg.contains('\n'), "{msg}");
            let ok = match pos {
                0..=7 => matches!(err, StreamError::BadMagic { .. }),
                8..=11 => matches!(err, StreamError::UnsupportedVersion { .. }),
                12..=15 => matches!(err, StreamError::UnsupportedFlags { .. }),
                _ => {
                    let &(start, name_len, _) = layout
                        .sections
                        .iter()
                        .rev()
                        .find(|(start, _, _)| *start <= pos as u64)
                        .expect("in a section");
                    let rel = pos - start as usize;
                    let len_field = 2 + name_len + 4..2 + name_len + 12;
                    if rel == 0 {
                        // kind: unknown, or another kind whose limits or
                        // checksum then fail
                        matches!(
                            err,
                            StreamError::UnknownKind { offset, .. }
                            | StreamError::ChecksumMismatch { offset, .. }
                            | StreamError::BadLength { offset, .. }
                            | StreamError::TooLarge { offset, .. } if offset == start
                        )
                    } else if rel == 1 || len_field.contains(&rel) {
                        // name length or payload length: the framing
                        // shifts; any of these, but an error
                        matches!(
                            err,
                            StreamError::ChecksumMismatch { .. }
                                | StreamError::TooLarge { .. }
                                | StreamError::BadLength { .. }
                                | StreamError::Truncated { .. }
                                | StreamError::UnknownKind { .. }
                        )
                    } else {
                        // name, version, payload, checksum: the CRC
                        matches!(err, StreamError::ChecksumMismatch { offset, .. } if offset == start)
                    }
                }
            };
            assert!(ok, "byte {pos} ^ {mask:#x}: {err}");
        }
    }
}

fn header_err(bytes: &[u8]) -> StreamError {
    match StreamReader::new(bytes) {
        Ok(_) => panic!("header accepted"),
        Err(e) => e,
    }
}

#[test]
fn wrong_magic_future_version_flags() {
    let (bytes, _) = small_stream();
    let mut qemu = bytes.clone();
    qemu[..8].copy_from_slice(b"QEVM\0\0\0\x03");
    let err = header_err(&qemu);
    assert!(matches!(err, StreamError::BadMagic { found } if &found == b"QEVM\0\0\0\x03"));
    assert_eq!(
        err.to_string(),
        "migration stream: bad magic \"QEVM\\x00\\x00\\x00\\x03\" at byte 0 (expected \"FERRYMIG\"; not a Ferry migration stream)"
    );
    let err = header_err(&raw_header(2, 0));
    assert!(matches!(
        err,
        StreamError::UnsupportedVersion {
            found: 2,
            supported: 1
        }
    ));
    assert_eq!(
        err.to_string(),
        "migration stream: unsupported format version 2 at byte 8 (this Ferry reads version 1)"
    );
    assert!(matches!(
        header_err(&raw_header(1, 4)),
        StreamError::UnsupportedFlags { found: 4 }
    ));
    assert!(matches!(
        header_err(b"FERRY"),
        StreamError::Truncated {
            offset: 5,
            what: "stream header"
        }
    ));
}

/// A stream of the header and `sections`, with a correct end section.
fn stream_of(sections: &[Vec<u8>]) -> Vec<u8> {
    let mut s = raw_header(1, 0);
    for sec in sections {
        s.extend_from_slice(sec);
    }
    let before = s.len() as u64;
    s.extend(raw_end(sections.len() as u64, before));
    s
}

#[test]
fn hand_encoded_stream_reads() {
    let s = stream_of(&[raw_section(5, b"dev", 1, b"x")]);
    let sections = read_all(&s[..]).expect("read");
    assert_eq!(sections[0].name, "dev");
}

#[test]
fn unknown_kind() {
    let s = stream_of(&[raw_section(7, b"gpu/0", 1, b"{}")]);
    let err = read_all(&s[..]).expect_err("unknown");
    assert!(
        matches!(err, StreamError::UnknownKind { kind: 7, ref name, offset: 16 } if name == "gpu/0")
    );
    assert_eq!(
        err.to_string(),
        "migration stream: unknown section kind 0x07 (section gpu/0) at byte 16"
    );
}

#[test]
fn oversized_lengths_fail_before_allocating() {
    for (kind, len) in [
        (1u8, u64::MAX),
        (2, u64::MAX),
        (2, (64 << 20) + 1),
        (3, (16 << 20) + 1),
        (4, u64::MAX / 2),
        (5, 1 << 40),
    ] {
        let mut s = raw_header(1, 0);
        s.extend_from_slice(&[kind, 1, b'x']);
        s.extend_from_slice(&1u32.to_le_bytes());
        s.extend_from_slice(&len.to_le_bytes());
        let err = read_all(&s[..]).expect_err("too large");
        assert!(
            matches!(err, StreamError::TooLarge { len: l, offset: 16, .. } if l == len),
            "{err}"
        );
    }
    for (kind, len) in [(6u8, 13u64), (6, u64::MAX), (0xff, 15), (0xff, 0)] {
        let mut s = raw_header(1, 0);
        s.extend_from_slice(&[kind, 1, b'x']);
        s.extend_from_slice(&1u32.to_le_bytes());
        s.extend_from_slice(&len.to_le_bytes());
        let err = read_all(&s[..]).expect_err("bad length");
        assert!(
            matches!(err, StreamError::BadLength { len: l, .. } if l == len),
            "{err}"
        );
    }
    // The limits themselves are fine (nothing follows: truncated after).
    let mut s = raw_header(1, 0);
    s.extend_from_slice(&[2, 1, b'x']);
    s.extend_from_slice(&1u32.to_le_bytes());
    s.extend_from_slice(&(64u64 << 20).to_le_bytes());
    assert!(matches!(
        read_all(&s[..]),
        Err(StreamError::Truncated {
            offset: 31,
            what: "section payload"
        })
    ));
}

#[test]
fn checksum_mismatch_message() {
    let mut sec = raw_section(2, b"ram", 1, &raw_run(0, 1, 0));
    let n = sec.len();
    sec[n - 1] ^= 1;
    let s = stream_of(&[sec]);
    let err = read_all(&s[..]).expect_err("crc");
    let msg = err.to_string();
    assert!(
        msg.starts_with("migration stream: checksum mismatch in section ram at byte 16 (stored 0x"),
        "{msg}"
    );
}

/// The error from the runs of a single RAM section with `payload`.
fn ram_error(payload: &[u8]) -> StreamError {
    let s = stream_of(&[raw_section(2, b"ram", 1, payload)]);
    let mut r = StreamReader::new(&s[..]).expect("header");
    let sec = r.next_section().expect("the section itself is fine");
    let mut runs = sec.ram_runs().expect("ram");
    let err = loop {
        match runs.next() {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("runs accepted"),
        }
    };
    assert!(runs.next().is_none(), "fused after an error");
    err
}

#[test]
fn bad_ram_runs_into_memory() {
    // The same cases, streamed into memory: same errors, same offsets.
    // gpas must fit the sink, so only the structural ones.
    let short = {
        let mut p = raw_run(0, 2, 1);
        p.extend_from_slice(&[0; 4096]);
        p
    };
    for payload in [
        raw_run(0x1001, 1, 0),
        raw_run(0x1000, 0, 0),
        raw_run(0, 1, 2),
        short,
        raw_run(0, 1, 0)[..12].to_vec(),
    ] {
        let s = stream_of(&[raw_section(2, b"ram", 1, &payload)]);
        let plain = ram_error(&payload);
        let err = read_all_into(&s[..], &mut MemSink(vec![0; 1 << 20])).expect_err("bad");
        assert_eq!(err.to_string(), plain.to_string());
    }
    // A run outside guest memory is refused by the sink.
    let s = stream_of(&[raw_section(2, b"ram", 1, &raw_run(1 << 20, 1, 0))]);
    let err = read_all_into(&s[..], &mut MemSink(vec![0; 1 << 20])).expect_err("outside");
    assert_eq!(
        err.to_string(),
        "migration stream: bad RAM run in section ram at byte 33: RAM run at 0x100000 (1 pages) lies outside guest memory"
    );
}

#[test]
fn bad_ram_runs() {
    // payload starts at 16 + 17 = 33
    let cases: Vec<(Vec<u8>, u64, &str)> = vec![
        (raw_run(0x1001, 1, 0), 33, "not page-aligned"),
        (raw_run(0x1000, 0, 0), 33, "page count of 0"),
        (raw_run(u64::MAX - 4095, 1, 0), 33, "goes past 2^64"),
        (raw_run(0, 1, 2), 33, "unknown run type 2"),
        (
            {
                let mut p = raw_run(0, 2, 1);
                p.extend_from_slice(&[0; 4096]);
                p
            },
            33,
            "claims 2 pages (8192 bytes) but the section has 4096 bytes left",
        ),
        (
            {
                let mut p = raw_run(0, 1, 0);
                p.extend_from_slice(&[0; 12]);
                p
            },
            46,
            "run header cut short",
        ),
        (
            {
                let mut p = raw_run(0, 1, 1);
                p.extend_from_slice(&[7; 4096]);
                p.extend(raw_run(0x1000, u32::MAX, 1));
                p
            },
            33 + 13 + 4096,
            "claims 4294967295 pages",
        ),
    ];
    for (payload, offset, why) in cases {
        let err = ram_error(&payload);
        match &err {
            StreamError::BadRam {
                section,
                offset: o,
                defect,
            } => {
                assert_eq!(section, "ram");
                assert_eq!(*o, offset, "{err}");
                assert!(defect.to_string().contains(why), "{err}");
            }
            other => panic!("{other}"),
        }
    }
    // Empty RAM sections and the very last page are fine.
    let s = stream_of(&[
        raw_section(2, b"ram", 1, b""),
        raw_section(2, b"ram", 1, &raw_run(u64::MAX - 4095 - 4096, 1, 0)),
    ]);
    read_all(&s[..]).expect("fine");
}

#[test]
fn end_section_counts_are_checked() {
    let dev = raw_section(5, b"d", 1, b"x");
    let mut s = raw_header(1, 0);
    s.extend_from_slice(&dev);
    let before = s.len() as u64;
    for (sections, bytes, why) in [
        (2, before, "counts 2 sections before it, the stream had 1"),
        (0, before, "counts 0 sections"),
        (1, before + 1, "bytes before it, the stream had"),
    ] {
        let mut bad = s.clone();
        bad.extend(raw_end(sections, bytes));
        let err = read_all(&bad[..]).expect_err("bad end");
        assert!(
            matches!(&err, StreamError::BadEnd { offset, .. } if *offset == before && err.to_string().contains(why)),
            "{err}"
        );
    }
    // A section missing from the middle of the stream: the counts catch it
    // even though every section is intact.
    let full = stream_of(&[dev.clone(), dev.clone(), dev.clone()]);
    let mut cut = full[..16 + dev.len()].to_vec();
    cut.extend_from_slice(&full[16 + 2 * dev.len()..]);
    assert!(matches!(
        read_all(&cut[..]),
        Err(StreamError::BadEnd { .. })
    ));
    // Pass and end sections are version 1.
    let mut s = raw_header(1, 0);
    s.extend(raw_section(6, b"pass", 2, &[0; 12]));
    assert!(matches!(
        read_all(&s[..]),
        Err(StreamError::SectionVersion {
            found: 2,
            supported: 1,
            ..
        })
    ));
}

#[test]
fn bad_names_and_json() {
    let s = stream_of(&[raw_section(5, b"\xff\xfe", 1, b"x")]);
    let err = read_all(&s[..]).expect_err("utf-8");
    assert!(matches!(err, StreamError::BadName { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "migration stream: bad section name \"\\xff\\xfe\" at byte 16: a section name is UTF-8"
    );
    let s = stream_of(&[raw_section(5, b"", 1, b"x")]);
    assert!(matches!(read_all(&s[..]), Err(StreamError::BadName { .. })));
    let s = stream_of(&[raw_section(1, b"config", 1, b"{\"vcpus\":")]);
    let sections = read_all(&s[..]).expect("framing is fine");
    let err = sections[0].json::<Config>().expect_err("json");
    assert!(err
        .to_string()
        .starts_with("migration stream: section config at byte 16 does not decode: "));
    assert!(!err.to_string().contains('\n'));
}
