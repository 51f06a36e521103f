//! The QMP server on a real unix socket, in a real event-manager loop on
//! its own thread (as on the VMM thread), with several clients.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use qmp::client::{ClientError, QmpClient};
use qmp::{
    ArgSpec, ArgType, CommandSpec, ErrorClass, EventEmitter, Limits, QmpError, QmpHandler,
    QmpListener, QmpServer, QmpSocketSpec,
};
use serde_json::{json, Map, Value};

const COMMANDS: [CommandSpec; 5] = [
    CommandSpec::no_args("stop"),
    CommandSpec::no_args("quit"),
    CommandSpec::no_args("fail"),
    CommandSpec::no_args("query-status"),
    CommandSpec::new(
        "echo",
        &[
            ArgSpec::required("s", ArgType::String),
            ArgSpec::optional("n", ArgType::Int),
        ],
    ),
];

/// Stands in for the VMM: `stop` emits STOP (before its reply, as QEMU
/// does), `quit` ends the loop.
struct Vmm {
    emitter: EventEmitter,
    quit: Arc<AtomicBool>,
}

impl QmpHandler for Vmm {
    fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match command {
            "stop" => {
                self.emitter.emit("STOP", None);
                Ok(json!({}))
            }
            "quit" => {
                self.quit.store(true, Ordering::SeqCst);
                Ok(json!({}))
            }
            "fail" => Err(QmpError::device_not_found("Device 'net9' not found")),
            "query-status" => Ok(json!({"status": "running", "running": true})),
            "echo" => Ok(Value::Object(args.clone())),
            other => Err(QmpError::command_not_found(other)),
        }
    }
}

struct Harness {
    dir: PathBuf,
    path: PathBuf,
    server: Arc<Mutex<QmpServer<Vmm>>>,
    emitter: EventEmitter,
    quit: Arc<AtomicBool>,
    /// Events the loop has dispatched so far.
    wakeups: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Harness {
    fn start(name: &str, limits: Limits) -> Self {
        let dir = std::env::temp_dir().join(format!("ferry-qmp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let spec: QmpSocketSpec = format!("unix:{},server=on,wait=off", path.display())
            .parse()
            .unwrap();
        let emitter = EventEmitter::new().unwrap();
        let quit = Arc::new(AtomicBool::new(false));
        let vmm = Vmm {
            emitter: emitter.clone(),
            quit: quit.clone(),
        };
        let listener = QmpListener::bind(&spec).unwrap();
        let server = QmpServer::new(listener, &COMMANDS, vmm, emitter.clone())
            .unwrap()
            .with_limits(limits);
        let server = Arc::new(Mutex::new(server));
        let subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>> = server.clone();
        let stop = quit.clone();
        let wakeups = Arc::new(AtomicUsize::new(0));
        let count = wakeups.clone();
        let thread = std::thread::spawn(move || {
            let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
                EventManager::new().unwrap();
            em.add_subscriber(subscriber);
            while !stop.load(Ordering::SeqCst) {
                let n = em.run_with_timeout(100).unwrap();
                count.fetch_add(n, Ordering::SeqCst);
            }
        });
        Self {
            dir,
            path,
            server,
            emitter,
            quit,
            wakeups,
            thread: Some(thread),
        }
    }

    fn clients(&self) -> usize {
        self.server.lock().unwrap().client_count()
    }

    fn wait_for_clients(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.clients() != n {
            assert!(
                Instant::now() < deadline,
                "{} clients, not {n}",
                self.clients()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop_loop(&mut self) {
        self.quit.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop_loop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client that sees exactly the bytes on the wire.
struct Raw {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    fn connect(h: &Harness) -> Self {
        let stream = UnixStream::connect(&h.path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Self { stream, reader }
    }

    fn send(&mut self, s: &str) {
        self.stream.write_all(s.as_bytes()).unwrap();
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "unexpected EOF");
        assert!(line.ends_with("\r\n"), "{line:?}");
        line
    }

    fn recv(&mut self) -> Value {
        serde_json::from_str(&self.line()).unwrap()
    }

    fn greeted(h: &Harness) -> Self {
        let mut c = Self::connect(h);
        let g = c.recv();
        assert_eq!(g["QMP"]["capabilities"], json!([]));
        assert!(g["QMP"]["version"]["qemu"]["major"].is_u64());
        c
    }

    fn negotiated(h: &Harness) -> Self {
        let mut c = Self::greeted(h);
        c.send(r#"{"execute": "qmp_capabilities", "id": "neg"}"#);
        assert_eq!(c.recv(), json!({"return": {}, "id": "neg"}));
        c
    }

    /// Whether anything arrives within `ms`.
    fn quiet_for(&mut self, ms: u64) -> bool {
        self.stream
            .set_read_timeout(Some(Duration::from_millis(ms)))
            .unwrap();
        let mut line = String::new();
        let got = self.reader.read_line(&mut line);
        self.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        match got {
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            Ok(_) => panic!("expected silence, got {line:?}"),
        }
    }

    fn at_eof(&mut self) -> bool {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest).is_ok() && rest.is_empty()
    }
}

fn err(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

#[test]
fn two_clients_session_errors_events_and_a_disconnect() {
    let h = Harness::start("session", Limits::default());
    let mut a = Raw::greeted(&h);
    let mut b = Raw::greeted(&h);
    h.wait_for_clients(2);

    // Before negotiation: only qmp_capabilities, and no events.
    a.send(r#"{"execute": "query-status", "id": 1}"#);
    assert_eq!(
        a.recv(),
        json!({"error": {"class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1})
    );
    h.emitter.emit("EARLY", None);
    assert!(a.quiet_for(100), "no events before negotiation");

    a.send(r#"{"execute": "qmp_capabilities", "id": 2}"#);
    assert_eq!(a.recv(), json!({"return": {}, "id": 2}));
    a.send(r#"{"execute": "qmp_capabilities"}"#);
    assert_eq!(a.recv()["error"]["class"], "CommandNotFound");

    // Several requests in one write, and one request over many writes.
    a.send(r#"{"execute": "echo", "arguments": {"s": "x"}, "id": 3}{"execute": "query-status", "id": 4}"#);
    assert_eq!(a.recv(), json!({"return": {"s": "x"}, "id": 3}));
    assert_eq!(
        a.recv(),
        json!({"return": {"status": "running", "running": true}, "id": 4})
    );
    for piece in [
        r#"{"exec"#,
        r#"ute": "echo", "argu"#,
        r#"ments": {"s": "y", "n": 5}, "#,
        r#""id": [5]}"#,
    ] {
        a.send(piece);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(a.recv(), json!({"return": {"s": "y", "n": 5}, "id": [5]}));

    // Errors of every kind; the connection stays usable after each.
    a.send("{\"execute\": }\n");
    let parse = a.recv();
    assert_eq!(parse["error"]["class"], "GenericError");
    assert!(parse["error"]["desc"]
        .as_str()
        .unwrap()
        .starts_with("JSON parse error"));
    a.send("[1, 2]");
    assert_eq!(
        a.recv(),
        err("GenericError", "QMP input must be a JSON object")
    );
    a.send(r#"{"id": 6}"#);
    assert_eq!(
        a.recv(),
        json!({"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}, "id": 6})
    );
    a.send(r#"{"execute": "frob", "id": 7}"#);
    assert_eq!(
        a.recv(),
        json!({"error": {"class": "CommandNotFound", "desc": "The command frob has not been found"}, "id": 7})
    );
    a.send(r#"{"execute": "echo", "arguments": {"n": 1}}"#);
    assert_eq!(a.recv(), err("GenericError", "Parameter 's' is missing"));
    a.send(r#"{"execute": "echo", "arguments": {"s": "x", "zz": 1}}"#);
    assert_eq!(
        a.recv(),
        err("GenericError", "Parameter 'zz' is unexpected")
    );
    a.send(r#"{"execute": "echo", "arguments": {"s": true}}"#);
    assert_eq!(
        a.recv(),
        err(
            "GenericError",
            "Invalid parameter type for 's', expected: string"
        )
    );
    a.send(r#"{"execute": "fail", "id": 8}"#);
    assert_eq!(
        a.recv(),
        json!({"error": {"class": "DeviceNotFound", "desc": "Device 'net9' not found"}, "id": 8})
    );
    // A stuck half-object, then the spec's reset (a control character).
    a.send(r#"{"execute": "echo", "arguments": {"#);
    a.send("\x1b");
    assert_eq!(a.recv()["error"]["class"], "GenericError");
    a.send(r#"{"execute": "query-status", "id": 9}"#);
    assert_eq!(a.recv()["id"], 9);

    // Events reach every client in command mode; the command's own event
    // comes before its reply.
    b.send(r#"{"execute": "qmp_capabilities"}"#);
    assert_eq!(b.recv(), json!({"return": {}}));
    a.send(r#"{"execute": "stop", "id": "s"}"#);
    let stop = a.recv();
    assert_eq!(stop["event"], "STOP");
    assert!(stop.get("data").is_none());
    assert!(stop["timestamp"]["seconds"].as_i64().unwrap() > 1_600_000_000);
    assert!(stop["timestamp"]["microseconds"].as_i64().unwrap() < 1_000_000);
    assert_eq!(a.recv(), json!({"return": {}, "id": "s"}));
    assert_eq!(b.recv()["event"], "STOP");

    let emitter = h.emitter.clone();
    std::thread::spawn(move || emitter.emit("RESUME", Some(json!({"from": "thread"}))))
        .join()
        .unwrap();
    for c in [&mut a, &mut b] {
        let e = c.recv();
        assert_eq!(e["event"], "RESUME");
        assert_eq!(e["data"], json!({"from": "thread"}));
    }

    // B goes away in the middle of a request; A does not notice.
    b.send(r#"{"execute": "echo", "argum"#);
    drop(b);
    h.wait_for_clients(1);
    h.emitter.emit("AFTER", None);
    assert_eq!(a.recv()["event"], "AFTER");
    a.send(r#"{"execute": "query-status", "id": 10}"#);
    assert_eq!(a.recv()["id"], 10);

    // A new client still gets in.
    let mut c = QmpClient::connect(&h.path).unwrap();
    assert_eq!(
        c.execute("echo", Some(json!({"s": "z"}).as_object().unwrap().clone()))
            .unwrap(),
        json!({"s": "z"})
    );
    match c.execute("fail", None) {
        Err(ClientError::Command(e)) => assert_eq!(e.class, ErrorClass::DeviceNotFound),
        other => panic!("{other:?}"),
    }
    h.emitter.emit("BOTH", None);
    assert_eq!(c.wait_for_event("BOTH").unwrap().event, "BOTH");
    assert_eq!(a.recv()["event"], "BOTH");
}

#[test]
fn quit_reply_and_shutdown_event_reach_every_client() {
    let mut h = Harness::start("quit", Limits::default());
    let mut a = Raw::negotiated(&h);
    let mut b = Raw::negotiated(&h);
    a.send(r#"{"execute": "quit", "id": "q"}"#);
    // The VMM's way out: the loop ends, SHUTDOWN is emitted, everything
    // is flushed, the server is dropped.
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.thread.as_ref().is_some_and(|t| !t.is_finished()) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    h.stop_loop();
    h.emitter.emit(
        "SHUTDOWN",
        Some(json!({"guest": false, "reason": "host-qmp-quit"})),
    );
    h.server
        .lock()
        .unwrap()
        .flush_all(Duration::from_millis(500));
    let path = h.path.clone();
    drop(h);
    assert!(!path.exists(), "socket file removed");

    assert_eq!(a.recv(), json!({"return": {}, "id": "q"}));
    for c in [&mut a, &mut b] {
        let e = c.recv();
        assert_eq!(e["event"], "SHUTDOWN");
        assert_eq!(e["data"]["reason"], "host-qmp-quit");
        assert!(c.at_eof());
    }
}

#[test]
fn a_pipelining_client_gets_every_reply_in_order() {
    let limits = Limits {
        output_high_water: 1024,
        max_output: 8192,
        ..Limits::default()
    };
    let h = Harness::start("pipeline", limits);
    let mut c = Raw::negotiated(&h);
    const N: usize = 20_000;
    let mut writer = c.stream.try_clone().unwrap();
    let feeder = std::thread::spawn(move || {
        let mut batch = String::new();
        for i in 0..N {
            batch.push_str(&format!(
                r#"{{"execute": "echo", "arguments": {{"s": "{i:0>40}"}}, "id": {i}}}"#
            ));
        }
        writer.write_all(batch.as_bytes()).unwrap();
    });
    for i in 0..N {
        let r = c.recv();
        assert_eq!(r["id"], i, "{r}");
    }
    feeder.join().unwrap();
    assert_eq!(
        h.clients(),
        1,
        "backed-up replies throttle, they do not disconnect"
    );
}

#[test]
fn a_client_that_stops_reading_is_dropped_not_waited_for() {
    let limits = Limits {
        max_output: 16 << 10,
        ..Limits::default()
    };
    let h = Harness::start("stuck", limits);
    let mut reader = Raw::negotiated(&h);
    let _stuck = Raw::negotiated(&h);
    h.wait_for_clients(2);
    let padding = "x".repeat(200);
    let mut sent = 0;
    // Unix socket buffers hold a few hundred KiB; go well past that, in
    // batches small enough for the client that does read.
    for _ in 0..400 {
        for _ in 0..25 {
            h.emitter
                .emit("TICK", Some(json!({ "n": sent, "pad": padding })));
            sent += 1;
        }
        for _ in 0..25 {
            assert_eq!(reader.recv()["event"], "TICK");
        }
        if h.clients() == 1 {
            break;
        }
    }
    h.wait_for_clients(1);
    reader.send(r#"{"execute": "query-status", "id": 1}"#);
    assert_eq!(reader.recv()["id"], 1);
}

#[test]
fn an_oversized_request_is_refused_with_an_error_then_closed() {
    let limits = Limits {
        max_request: 1024,
        ..Limits::default()
    };
    let h = Harness::start("big", limits);
    let mut c = Raw::negotiated(&h);
    let big = format!(
        r#"{{"execute": "query-status", "id": 1}}{{"execute": "echo", "arguments": {{"s": "{}"}}}}"#,
        "y".repeat(4096)
    );
    c.send(&big);
    assert_eq!(
        c.recv()["id"],
        1,
        "requests before the big one are answered"
    );
    let e = c.recv();
    assert_eq!(e["error"]["class"], "GenericError");
    assert!(
        e["error"]["desc"].as_str().unwrap().contains("1024 bytes"),
        "{e}"
    );
    assert!(c.at_eof());
    h.wait_for_clients(0);
}

#[test]
fn clients_beyond_the_limit_are_told_and_closed() {
    let limits = Limits {
        max_clients: 2,
        ..Limits::default()
    };
    let h = Harness::start("many", limits);
    let _a = Raw::greeted(&h);
    let _b = Raw::greeted(&h);
    let mut c = Raw::connect(&h);
    let e = c.recv();
    assert!(
        e["error"]["desc"].as_str().unwrap().contains("Too many"),
        "{e}"
    );
    assert!(c.at_eof());
    assert_eq!(h.clients(), 2);
}

#[test]
fn a_client_that_sends_and_hangs_up_still_gets_its_commands_run() {
    // What `echo ... | socat - UNIX-CONNECT:...` does: write, shut down
    // the write side, read until EOF.
    let h = Harness::start("halfclose", Limits::default());
    let mut c = Raw::greeted(&h);
    c.send(
        r#"{"execute": "qmp_capabilities"}{"execute": "query-status", "id": 1}{"execute": "quit", "id": 2}"#,
    );
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(c.recv(), json!({"return": {}}));
    assert_eq!(c.recv()["id"], 1);
    assert_eq!(c.recv(), json!({"return": {}, "id": 2}));
}

#[test]
fn idle_half_sent_and_backed_up_clients_cost_no_wakeups() {
    let h = Harness::start("idle", Limits::default());
    let _idle = Raw::negotiated(&h);
    let mut partial = Raw::negotiated(&h);
    partial.send(r#"{"execute": "echo", "argu"#);
    let _stuck = Raw::negotiated(&h);
    // Fill the stuck client's socket so the server holds output for it
    // and waits for it to become writable.
    let padding = "x".repeat(1000);
    for n in 0..600 {
        h.emitter
            .emit("TICK", Some(json!({ "n": n, "pad": padding })));
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = h.wakeups.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(h.wakeups.load(Ordering::SeqCst), before, "the loop spun");
    assert_eq!(h.clients(), 3);
}
