//! TLS on real TCP connections (loopback), without a VM: the channel the
//! migration runs over, its handshake, and every way a peer is refused.

use ferry_tests::tlscerts::{Side, TestCa};
use migration::tls::{self, ClientTls, ServerTls};
use migration::{Channel, Listener, MigrationUri};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(3);

fn dir(test: &str, side: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-tls-{}-{test}-{side}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn listen() -> (Listener, MigrationUri) {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let uri = l.local_uri();
    (l, uri)
}

type Handshake = Result<Box<dyn Channel>, tls::TlsError>;

/// Runs the server's handshake on a thread; the client's here.
fn pair(server: ServerTls, client: ClientTls) -> (Handshake, Handshake) {
    let (l, uri) = listen();
    let t = std::thread::spawn(move || {
        let c = l.accept().unwrap();
        tls::accept(c, &server, DEADLINE, "the source")
    });
    let c = migration::connect(&uri).unwrap();
    let client = tls::connect(c, &client, DEADLINE, "the destination");
    (t.join().unwrap(), client)
}

struct Creds {
    server: ServerTls,
    client: ClientTls,
}

fn creds(test: &str, names: &[&str], hostname: &str) -> Creds {
    let ca = TestCa::new("Ferry test CA");
    let s = ca.write_dir(&dir(test, "server"), Side::Server, names, false);
    let c = ca.write_dir(&dir(test, "client"), Side::Client, &["source"], false);
    Creds {
        server: ServerTls::load(&s, true).unwrap(),
        client: ClientTls::load(&c, true, hostname).unwrap(),
    }
}

fn err_text<T>(r: Result<T, tls::TlsError>) -> String {
    match r {
        Ok(_) => panic!("the handshake should have failed"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bulk_one_way_answers_the_other_both_verified() {
    let c = creds("bulk", &["b.example", "127.0.0.1"], "b.example");
    let (server, client) = pair(c.server, c.client);
    let (mut server, mut client) = (server.unwrap(), client.unwrap());
    // The destination reads the bulk on one handle and answers on a
    // clone from another thread, as the pass acks do.
    let mut answer = server.try_clone_box().unwrap();
    const TOTAL: usize = 64 << 20;
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let (mut got, mut sum) = (0usize, 0u64);
        while got < TOTAL {
            let n = server.read(&mut buf).unwrap();
            assert!(n > 0, "the stream ended at {got}");
            for (i, b) in buf[..n].iter().enumerate() {
                sum = sum.wrapping_add(u64::from(*b) * ((got + i) as u64 % 251 + 1));
            }
            got += n;
            if got % (8 << 20) < n {
                answer.write_all(b"PASS").unwrap();
                answer.flush().unwrap();
            }
        }
        sum
    });
    let mut acks = client.try_clone_box().unwrap();
    let acker = std::thread::spawn(move || {
        let mut b = [0u8; 4];
        let mut n = 0;
        while n < 8 {
            acks.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"PASS");
            n += 1;
        }
        n
    });
    let mut sum = 0u64;
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 3) as u8).collect();
    for k in 0..TOTAL / chunk.len() {
        // Writes of every size, small ones gathered before large ones:
        // headers, single pages and whole runs of pages, in order.
        let mut rest = &chunk[..];
        for size in [13, 20_000, 7, 40_000, 4096, 16, 300_000].iter().cycle() {
            let (a, b) = rest.split_at((*size).min(rest.len()));
            client.write_all(a).unwrap();
            rest = b;
            if rest.is_empty() {
                break;
            }
        }
        for (i, x) in chunk.iter().enumerate() {
            let at = k * chunk.len() + i;
            sum = sum.wrapping_add(u64::from(*x) * (at as u64 % 251 + 1));
        }
    }
    client.flush().unwrap();
    assert_eq!(reader.join().unwrap(), sum, "the bytes arrived unchanged");
    assert_eq!(acker.join().unwrap(), 8);
}

#[test]
fn the_server_is_checked_by_address_too() {
    let c = creds("ip", &["198.18.0.9", "127.0.0.1"], "127.0.0.1");
    let (server, client) = pair(c.server, c.client);
    assert!(server.is_ok() && client.is_ok());
}

#[test]
fn a_certificate_from_another_ca_is_refused_on_both_ends() {
    let ca = TestCa::new("Ferry test CA");
    let other = TestCa::new("Somebody else's CA");
    let s = ca.write_dir(&dir("ca", "server"), Side::Server, &["b.example"], false);
    // The client's own certificate comes from the other CA, which it
    // also trusts: the server refuses it.
    let c = other.write_dir(&dir("ca", "client"), Side::Client, &["source"], false);
    let (server, client) = pair(
        ServerTls::load(&s, true).unwrap(),
        ClientTls::load(&c, false, "b.example").unwrap(),
    );
    let se = err_text(server);
    assert!(
        se.contains("certificate") && se.contains("the source"),
        "{se}"
    );
    // The client may finish its half before the refusal reaches it; its
    // first read then reports it.
    if let Ok(mut c) = client {
        let mut b = [0u8; 1];
        let e = c.read(&mut b).unwrap_err().to_string();
        assert!(e.contains("alert"), "{e}");
    }
    // And a client trusting only the other CA refuses the server.
    let c2 = other.write_dir(&dir("ca2", "client"), Side::Client, &["source"], false);
    let (_, client) = pair(
        ServerTls::load(&s, false).unwrap(),
        ClientTls::load(&c2, true, "b.example").unwrap(),
    );
    let ce = err_text(client);
    assert!(
        ce.contains("UnknownIssuer") && ce.contains("the destination"),
        "{ce}"
    );
}

#[test]
fn a_wrong_hostname_or_an_expired_certificate_is_refused() {
    let c = creds("name", &["b.example"], "c.example");
    let (_, client) = pair(c.server, c.client);
    let e = err_text(client);
    assert!(e.contains("not valid for name \"c.example\""), "{e}");

    let ca = TestCa::new("Ferry test CA");
    let s = ca.write_dir(&dir("exp", "server"), Side::Server, &["b.example"], true);
    let c = ca.write_dir(&dir("exp", "client"), Side::Client, &["source"], false);
    let (_, client) = pair(
        ServerTls::load(&s, true).unwrap(),
        ClientTls::load(&c, true, "b.example").unwrap(),
    );
    let e = err_text(client);
    assert!(e.contains("expired"), "{e}");
}

#[test]
fn plaintext_and_silent_peers_are_refused_within_the_deadline() {
    let c = creds("plain", &["b.example"], "b.example");
    // A plaintext client: the server's handshake fails at once.
    let (l, uri) = listen();
    let server = c.server.clone();
    let t = std::thread::spawn(move || {
        let ch = l.accept().unwrap();
        let started = Instant::now();
        (
            tls::accept(ch, &server, DEADLINE, "a peer"),
            started.elapsed(),
        )
    });
    let mut plain = migration::connect(&uri).unwrap();
    plain.write_all(b"FERRYMIG\x01\0\0\0\0\0\0\0").unwrap();
    plain.flush().unwrap();
    let (r, took) = t.join().unwrap();
    let e = err_text(r);
    assert!(e.contains("a peer"), "{e}");
    assert!(took < DEADLINE, "{took:?}");

    // A silent client: dropped when the deadline passes, not before.
    let (l, uri) = listen();
    let server = c.server.clone();
    let t = std::thread::spawn(move || {
        let ch = l.accept().unwrap();
        let started = Instant::now();
        let r = tls::accept(ch, &server, Duration::from_millis(400), "a peer");
        (r, started.elapsed())
    });
    let _silent = migration::connect(&uri).unwrap();
    let (r, took) = t.join().unwrap();
    let e = err_text(r);
    assert!(e.contains("no answer within 400 ms"), "{e}");
    assert!(
        took >= Duration::from_millis(400) && took < DEADLINE,
        "{took:?}"
    );

    // A TLS client meeting a plaintext server that answers garbage.
    let (l, uri) = listen();
    let t = std::thread::spawn(move || {
        let mut ch = l.accept().unwrap();
        let mut b = [0u8; 16];
        ch.read_exact(&mut b).unwrap();
        ch.write_all(b"FERRYNAK not a stream\n").unwrap();
        ch.flush().unwrap();
    });
    let ch = migration::connect(&uri).unwrap();
    let e = err_text(tls::connect(ch, &c.client, DEADLINE, "the destination"));
    assert!(e.contains("the destination"), "{e}");
    t.join().unwrap();
}

#[test]
fn tls_authz_lets_in_only_the_client_it_names() {
    let c = creds("authz", &["b.example"], "b.example");
    let source = ferry_tests::tlscerts::subject("source");
    let (server, client) = pair(c.server.clone().with_identity(&source), c.client.clone());
    if let Err(e) = &server {
        panic!("{source} should be let in: {e}");
    }
    assert!(client.is_ok());

    let (server, client) = pair(
        c.server
            .with_identity("C=GB,O=Ferry Test\\, Ltd,CN=another"),
        c.client,
    );
    assert_eq!(
        err_text(server),
        format!("TLS x509 authz check for {source} is denied")
    );
    // The source's handshake was done before the check; the destination
    // then closes, which its first read sees.
    let mut client = client.expect("the client's half");
    let mut b = [0u8; 1];
    assert!(!matches!(client.read(&mut b), Ok(n) if n > 0));
}
