//! Transports with real sockets and files, between threads.

use super::*;
use crate::{connect, Channel, Listener, MigrationUri, RamRun, TransportError, UriError};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

const BIG_MIB: u64 = 24;

fn temp_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "ferry-mig-{tag}-{}-{:?}",
        std::process::id(),
        thread::current().id()
    ))
}

/// Writes a stream with `BIG_MIB` MiB of RAM: 1 MiB data, 1 MiB zero, ...
fn write_big<W: Write>(w: W) -> W {
    let mut w = StreamWriter::new(w).expect("header");
    w.write_json(
        SectionKind::Config,
        "config",
        1,
        &Config {
            vcpus: 1,
            mem_mib: BIG_MIB,
        },
    )
    .expect("config");
    let mut ram = w.ram();
    for mib in 0..BIG_MIB {
        let gpa = mib << 20;
        if mib % 2 == 0 {
            ram.data_pages(gpa, &pattern(mib, 1 << 20)).expect("data");
        } else {
            ram.zero_pages(gpa, 256).expect("zero");
        }
    }
    ram.finish().expect("ram");
    w.write_pass_end(0, BIG_MIB * 256).expect("pass");
    w.write_section(SectionKind::Device, "virtio-net/net0", 1, b"{}")
        .expect("device");
    w.finish().expect("finish")
}

/// Reads and verifies what [`write_big`] wrote; returns the transport.
fn read_big<R: Read>(r: R, into_memory: bool) -> R {
    let mut r = StreamReader::new(r).expect("header");
    let mut mem = vec![0xaau8; (BIG_MIB << 20) as usize];
    let mut sink = MemSink(vec![0xaa; (BIG_MIB << 20) as usize]);
    loop {
        let s = if into_memory {
            r.next_section_with_ram(&mut sink).expect("section")
        } else {
            r.next_section().expect("section")
        };
        match s.kind {
            SectionKind::Config => {
                assert_eq!(s.json::<Config>().expect("json").mem_mib, BIG_MIB)
            }
            SectionKind::Ram if into_memory => assert!(s.payload.is_empty()),
            SectionKind::Ram => {
                for run in s.ram_runs().expect("ram") {
                    let run = run.expect("run");
                    let at = run.gpa() as usize;
                    let len = run.len() as usize;
                    match run {
                        RamRun::Zero { .. } => mem[at..at + len].fill(0),
                        RamRun::Data { data, .. } => mem[at..at + len].copy_from_slice(data),
                    }
                }
            }
            SectionKind::End => break,
            _ => {}
        }
        r.recycle(s);
    }
    if into_memory {
        mem = sink.0;
    }
    for mib in 0..BIG_MIB {
        let chunk = &mem[(mib << 20) as usize..((mib + 1) << 20) as usize];
        if mib % 2 == 0 {
            assert!(chunk == pattern(mib, 1 << 20), "MiB {mib}");
        } else {
            assert!(chunk.iter().all(|&b| b == 0), "MiB {mib}");
        }
    }
    r.into_inner()
}

/// Source in a thread, destination here; the destination acknowledges.
fn round_trip(listener: Listener, into_memory: bool) {
    let uri: MigrationUri = listener.local_addr().parse().expect("local addr");
    let source = thread::spawn(move || {
        let ch = connect(&uri).expect("connect");
        let mut ch = write_big(ch);
        let mut ack = [0u8; 3];
        ch.read_exact(&mut ack).expect("ack");
        assert_eq!(&ack, b"ACK");
    });
    let ch = listener.accept().expect("accept");
    let mut ch = read_big(ch, into_memory);
    ch.write_all(b"ACK").expect("ack");
    ch.flush().expect("flush");
    source.join().expect("source");
}

#[test]
fn tcp_round_trip() {
    let uri: MigrationUri = "tcp:127.0.0.1:0".parse().expect("uri");
    let listener = Listener::bind(&uri).expect("bind");
    assert!(listener.local_addr().starts_with("tcp:127.0.0.1:"));
    assert_ne!(listener.local_addr(), "tcp:127.0.0.1:0");
    round_trip(listener, false);
}

#[test]
fn tcp_ipv6_round_trip() {
    let uri: MigrationUri = "tcp:[::1]:0".parse().expect("uri");
    match Listener::bind(&uri) {
        Ok(listener) => {
            assert!(listener.local_addr().starts_with("tcp:[::1]:"));
            round_trip(listener, true)
        }
        Err(e) => eprintln!("skipped: no IPv6 loopback here ({e})"),
    }
}

#[test]
fn unix_round_trip_and_socket_file_lifecycle() {
    let path = temp_path("unix");
    let _ = std::fs::remove_file(&path);
    let uri = MigrationUri::Unix(path.clone());
    // A stale socket (its listener gone without unlinking) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
    assert!(path.exists());
    let listener = Listener::bind(&uri).expect("bind over stale");
    // A live one is not.
    let err = Listener::bind(&uri).err().expect("in use");
    assert!(matches!(err, TransportError::InUse { .. }), "{err}");
    round_trip(listener, true);
    assert!(!path.exists(), "socket unlinked on drop");
    // Nor is a file that is not a socket.
    std::fs::write(&path, b"keep me").expect("file");
    let err = Listener::bind(&uri).err().expect("not a socket");
    assert!(matches!(err, TransportError::NotASocket { .. }), "{err}");
    assert_eq!(std::fs::read(&path).expect("kept"), b"keep me");
    std::fs::remove_file(&path).expect("cleanup");
}

#[test]
fn file_round_trip_restores_twice() {
    let path = temp_path("file");
    let uri = MigrationUri::File(path.clone());
    let err = Listener::bind(&uri).err().expect("no file yet");
    assert!(matches!(err, TransportError::Open { .. }), "{err}");
    std::fs::write(&path, b"old contents, longer than nothing").expect("old");
    let ch = connect(&uri).expect("create");
    let mut ch = write_big(ch);
    ch.flush().expect("flush");
    drop(ch);
    let listener = Listener::bind(&uri).expect("bind");
    assert_eq!(listener.local_addr(), format!("file:{}", path.display()));
    assert!(listener.as_raw_fd().is_none());
    for into_memory in [false, true] {
        let mut ch = read_big(listener.accept().expect("open"), into_memory);
        let mut rest = Vec::new();
        ch.read_to_end(&mut rest).expect("eof");
        assert!(
            rest.is_empty(),
            "nothing after the end section (truncated on create)"
        );
    }
    std::fs::remove_file(&path).expect("cleanup");
}

#[test]
fn connect_errors_name_the_uri() {
    let path = temp_path("nobody");
    let err = connect(&MigrationUri::Unix(path.clone()))
        .err()
        .expect("no listener");
    assert!(err.to_string().starts_with(&format!(
        "migration transport: cannot connect to unix:{}: ",
        path.display()
    )));
    let err = connect(&"tcp::4444".parse().expect("uri"))
        .err()
        .expect("no host");
    assert!(matches!(err, TransportError::Invalid { .. }), "{err}");
    let err = connect(&"tcp:127.0.0.1:0".parse().expect("uri"))
        .err()
        .expect("port 0");
    assert!(matches!(err, TransportError::Invalid { .. }), "{err}");
    // A closed port: bind one, note it, close it.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    let uri: MigrationUri = format!("tcp:127.0.0.1:{port}").parse().expect("uri");
    let err = connect(&uri).err().expect("refused");
    assert!(matches!(err, TransportError::Connect { .. }), "{err}");
}

#[test]
fn uri_parsing() {
    let good = [
        (
            "tcp:10.0.0.2:4444",
            MigrationUri::Tcp {
                host: "10.0.0.2".into(),
                port: 4444,
            },
        ),
        (
            "tcp:host-b.example:1",
            MigrationUri::Tcp {
                host: "host-b.example".into(),
                port: 1,
            },
        ),
        (
            "tcp:[::1]:4444",
            MigrationUri::Tcp {
                host: "::1".into(),
                port: 4444,
            },
        ),
        (
            "tcp:[fe80::1%eth0]:65535",
            MigrationUri::Tcp {
                host: "fe80::1%eth0".into(),
                port: 65535,
            },
        ),
        (
            "tcp::4444",
            MigrationUri::Tcp {
                host: String::new(),
                port: 4444,
            },
        ),
        (
            "unix:/run/ferry/mig.sock",
            MigrationUri::Unix("/run/ferry/mig.sock".into()),
        ),
        (
            "unix:relative.sock",
            MigrationUri::Unix("relative.sock".into()),
        ),
        (
            "file:/tmp/snap:1.bin",
            MigrationUri::File("/tmp/snap:1.bin".into()),
        ),
    ];
    for (text, uri) in good {
        assert_eq!(text.parse::<MigrationUri>().as_ref(), Ok(&uri), "{text}");
        assert_eq!(uri.to_string(), text, "display round trip");
    }
    type Check = fn(&UriError) -> bool;
    let bad: [(&str, Check); 13] = [
        ("", |e| matches!(e, UriError::Empty)),
        ("tcp", |e| matches!(e, UriError::UnknownTransport { .. })),
        ("exec:cat > x", |e| {
            matches!(e, UriError::UnknownTransport { .. })
        }),
        ("TCP:a:1", |e| {
            matches!(e, UriError::UnknownTransport { .. })
        }),
        ("tcp:host", |e| matches!(e, UriError::MissingPort { .. })),
        ("tcp:host:", |e| matches!(e, UriError::MissingPort { .. })),
        ("tcp:host:65536", |e| matches!(e, UriError::BadPort { .. })),
        ("tcp:host:+80", |e| matches!(e, UriError::BadPort { .. })),
        ("tcp:host:80,ipv4", |e| {
            matches!(e, UriError::BadPort { .. })
        }),
        ("tcp:::1:4444", |e| matches!(e, UriError::BadHost { .. })),
        ("tcp:[::1:4444", |e| matches!(e, UriError::BadHost { .. })),
        ("tcp:[::1]", |e| matches!(e, UriError::MissingPort { .. })),
        ("unix:", |e| matches!(e, UriError::EmptyPath { .. })),
    ];
    for (text, check) in bad {
        let err = text.parse::<MigrationUri>().expect_err(text);
        assert!(check(&err), "{text}: {err:?}");
        assert!(!err.to_string().contains('\n'));
    }
    assert_eq!(
        "ftp:x"
            .parse::<MigrationUri>()
            .expect_err("ftp")
            .to_string(),
        "unknown migration transport in 'ftp:x' (expected tcp:HOST:PORT, unix:PATH or file:PATH)"
    );
    assert!("file:".parse::<MigrationUri>().is_err());
    assert!(MigrationUri::Unix("/x".into()).can_pass_fds());
}

#[test]
fn bandwidth_limit_is_respected() {
    let payload = vec![0u8; 4 << 20];
    let mut w = StreamWriter::new(std::io::sink()).expect("header");
    w.set_max_bandwidth(Some(32 << 20));
    let start = Instant::now();
    for i in 0..2 {
        w.write_section(SectionKind::Ram, "ram", 1, &payload)
            .unwrap_or_else(|e| panic!("{i}: {e}"));
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(200),
        "8 MiB at 32 MiB/s in {took:?}"
    );
    assert!(
        took < Duration::from_millis(1500),
        "8 MiB at 32 MiB/s in {took:?}"
    );
    // Unlimited again.
    w.set_max_bandwidth(Some(0));
    let start = Instant::now();
    w.write_section(SectionKind::Ram, "ram", 1, &payload)
        .expect("fast");
    assert!(start.elapsed() < Duration::from_millis(150));
}

#[test]
fn fds_pass_after_a_read_ahead_stream() {
    let path = temp_path("fds");
    let _ = std::fs::remove_file(&path);
    let uri = MigrationUri::Unix(path.clone());
    let listener = Listener::bind(&uri).expect("bind");
    let file_path = temp_path("fds-file");
    let source = thread::spawn(move || {
        let ch = connect(&uri).expect("connect");
        assert!(ch.can_pass_fds());
        // The stream, then immediately the descriptors: the destination's
        // read-ahead buffer swallows the descriptor message's first bytes
        // while it reads the end section.
        let mut ch = write_big(ch);
        let file = std::fs::File::create(&file_path).expect("file");
        ch.send_fds(&[file.as_raw_fd()], b"{\"tap\":\"net0\"}")
            .expect("send fds");
        drop(file);
        std::fs::remove_file(&file_path).expect("unlink");
        let mut ack = [0u8; 3];
        ch.read_exact(&mut ack).expect("ack");
        assert_eq!(&ack, b"ACK");
    });
    let ch = listener.accept().expect("accept");
    let mut ch = read_big(ch, true);
    let (fds, payload) = ch.recv_fds(4).expect("recv fds");
    assert_eq!(payload, b"{\"tap\":\"net0\"}");
    assert_eq!(fds.len(), 1);
    let mut file = std::fs::File::from(fds.into_iter().next().expect("fd"));
    file.write_all(b"written through the passed fd")
        .expect("write");
    ch.write_all(b"ACK").expect("ack");
    ch.flush().expect("flush");
    source.join().expect("source");
}

#[test]
fn fd_passing_needs_unix() {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().expect("uri")).expect("bind");
    let uri: MigrationUri = l.local_addr().parse().expect("uri");
    let mut ch = connect(&uri).expect("connect");
    assert!(!ch.can_pass_fds());
    let err = ch.send_fds(&[0], b"x").expect_err("tcp");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    let err = ch.recv_fds(1).expect_err("tcp");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
}

#[test]
fn recv_fds_rejects_plain_data_and_too_many() {
    let path = temp_path("fdsbad");
    let _ = std::fs::remove_file(&path);
    let uri = MigrationUri::Unix(path);
    let listener = Listener::bind(&uri).expect("bind");
    let mut src = connect(&uri).expect("connect");
    let mut dst = listener.accept().expect("accept");
    src.write_all(b"not an fd message").expect("write");
    src.flush().expect("flush");
    let err = dst.recv_fds(1).expect_err("plain");
    assert_eq!(err.kind(), ErrorKind::InvalidData);
    assert!(
        err.to_string().contains("expected a descriptor message"),
        "{err}"
    );
    let mut dst = listener.accept_pair(&mut src);
    let fds = [src.as_raw_fd(), src.as_raw_fd()];
    src.send_fds(&fds, b"").expect("send");
    let err = dst.recv_fds(1).expect_err("too many");
    assert!(
        err.to_string().contains("2 descriptors, at most 1"),
        "{err}"
    );
}

trait AcceptPair {
    fn accept_pair(&self, src: &mut Box<dyn Channel>) -> Box<dyn Channel>;
}

impl AcceptPair for Listener {
    /// A fresh connection, replacing `src`.
    fn accept_pair(&self, src: &mut Box<dyn Channel>) -> Box<dyn Channel> {
        let uri: MigrationUri = self.local_addr().parse().expect("uri");
        *src = connect(&uri).expect("connect");
        self.accept().expect("accept")
    }
}

#[test]
fn shutdown_from_a_clone_unblocks_the_reader_and_timeouts_fire() {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().expect("uri")).expect("bind");
    let uri: MigrationUri = l.local_addr().parse().expect("uri");
    let _src = connect(&uri).expect("connect");
    let dst = l.accept().expect("accept");
    let handle = dst.try_clone_box().expect("clone");
    let reader = thread::spawn(move || {
        let err = StreamReader::new(dst).err().expect("no stream");
        assert!(
            matches!(
                err,
                StreamError::Truncated { offset: 0, .. } | StreamError::Io { offset: 0, .. }
            ),
            "{err}"
        );
    });
    thread::sleep(Duration::from_millis(50));
    handle.shutdown().expect("shutdown");
    reader.join().expect("reader");

    let _src = connect(&uri).expect("connect");
    let dst = l.accept().expect("accept");
    dst.set_timeouts(Some(Duration::from_millis(50)), None)
        .expect("timeouts");
    let start = Instant::now();
    let err = StreamReader::new(dst).err().expect("timeout");
    assert!(err.io_error().is_some(), "{err}");
    assert!(start.elapsed() < Duration::from_secs(2));
}
