//! `ferry ctl` against a QMP server running in a real event loop.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use qmp::{
    ArgSpec, ArgType, CommandSpec, EventEmitter, QmpError, QmpHandler, QmpListener, QmpServer,
    QmpSocketSpec,
};
use serde_json::{json, Map, Value};

const COMMANDS: [CommandSpec; 4] = [
    CommandSpec::no_args("query-status"),
    CommandSpec::no_args("query-cpus-fast"),
    CommandSpec::no_args("fail"),
    CommandSpec::new(
        "echo",
        &[
            ArgSpec::required("s", ArgType::String),
            ArgSpec::optional("n", ArgType::Int),
            ArgSpec::optional("flag", ArgType::Bool),
            ArgSpec::optional("o", ArgType::Object),
        ],
    ),
];

struct Vm;

impl QmpHandler for Vm {
    fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match command {
            "query-status" => Ok(json!({"status": "running", "running": true})),
            "query-cpus-fast" => Ok(json!([
                {"cpu-index": 0, "thread-id": 100, "props": {"core-id": 0}},
                {"cpu-index": 1, "thread-id": 101, "props": {"core-id": 1}},
            ])),
            "fail" => Err(QmpError::device_not_found("Device 'net9' not found")),
            _ => Ok(Value::Object(args.clone())),
        }
    }
}

struct Vmm {
    dir: PathBuf,
    path: PathBuf,
    emitter: EventEmitter,
    server: Option<Arc<Mutex<QmpServer<Vm>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Vmm {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ferry-ctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let spec = QmpSocketSpec { path: path.clone() };
        let emitter = EventEmitter::new().unwrap();
        let server = QmpServer::new(
            QmpListener::bind(&spec).unwrap(),
            &COMMANDS,
            Vm,
            emitter.clone(),
        )
        .unwrap();
        let server = Arc::new(Mutex::new(server));
        let subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>> = server.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let running = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
                EventManager::new().unwrap();
            em.add_subscriber(subscriber);
            while !running.load(Ordering::SeqCst) {
                em.run_with_timeout(50).unwrap();
            }
        });
        Self {
            dir,
            path,
            emitter,
            server: Some(server),
            stop,
            thread: Some(thread),
        }
    }

    fn negotiated(&self) -> usize {
        self.server
            .as_ref()
            .map_or(0, |s| s.lock().unwrap().negotiated_count())
    }

    /// Ends the loop and drops the server, closing every connection.
    fn shut_down(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        if let Some(server) = self.server.take() {
            server.lock().unwrap().flush_all(Duration::from_millis(200));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shut_down();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

fn ctl(vm: &Vmm, args: &[&str]) -> Output {
    ferry()
        .arg("ctl")
        .arg("--qmp")
        .arg(&vm.path)
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn results_print_readably_or_as_json() {
    let vm = Vmm::start("print");
    let out = ctl(&vm, &["query-status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "running: true\nstatus: running\n");

    let out = ctl(&vm, &["--json", "query-status"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, json!({"status": "running", "running": true}));

    let out = ctl(&vm, &["query-cpus-fast"]);
    assert_eq!(
        text(&out.stdout),
        "cpu-index  props      thread-id\n0          core-id=0  100\n1          core-id=1  101\n"
    );

    let out = ctl(
        &vm,
        &["echo", "s=hello", "n=3", "flag=true", r#"o:={"k": [1]}"#],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "flag: true\nn: 3\no:\n  k:\n    - 1\ns: hello\n"
    );

    // The spec given to `ferry run --qmp` works here too.
    let spec = format!("unix:{},server=on,wait=off", vm.path.display());
    let out = ferry()
        .args(["ctl", "--qmp", &spec, "query-status"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn errors_are_one_line_and_exit_1() {
    let vm = Vmm::start("errors");
    let cases: [(&[&str], &str); 5] = [
        (
            &["fail"],
            "ferry: DeviceNotFound: Device 'net9' not found\n",
        ),
        (
            &["nope"],
            "ferry: CommandNotFound: The command nope has not been found\n",
        ),
        (&["echo"], "ferry: GenericError: Parameter 's' is missing\n"),
        (
            &["echo", "s=1"],
            "ferry: GenericError: Invalid parameter type for 's', expected: string\n",
        ),
        (
            &["echo", "s:=\"1\"", "x=2"],
            "ferry: GenericError: Parameter 'x' is unexpected\n",
        ),
    ];
    for (args, stderr) in cases {
        let out = ctl(&vm, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(text(&out.stderr), stderr, "{args:?}");
        assert!(out.stdout.is_empty());
    }
    let out = ctl(&vm, &["echo", "novalue"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("expected key=value"));

    let out = ferry()
        .args(["ctl", "--qmp", "/nonexistent/qmp.sock", "query-status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("ferry: cannot connect to QMP socket /nonexistent/qmp.sock"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);
}

#[test]
fn events_mode_prints_events_until_the_vm_goes() {
    let mut vm = Vmm::start("events");
    let mut children = Vec::new();
    for json in [false, true] {
        let mut cmd = ferry();
        cmd.arg("ctl").arg("--qmp").arg(&vm.path);
        if json {
            cmd.arg("--json");
        }
        let child = cmd
            .arg("events")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        children.push(child);
    }
    // Events reach clients in command mode only: wait for both.
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm.negotiated() < 2 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.emitter.emit("STOP", None);
    vm.emitter.emit(
        "SHUTDOWN",
        Some(json!({"guest": false, "reason": "host-qmp-quit"})),
    );
    vm.shut_down();

    let mut outputs = Vec::new();
    for mut child in children {
        let status = child.wait().unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(status.success(), "{err}");
        outputs.push(out);
    }
    let human: Vec<&str> = outputs[0].lines().collect();
    assert_eq!(human.len(), 2, "{human:?}");
    assert!(human[0].ends_with(" UTC  STOP"), "{}", human[0]);
    assert!(
        human[1].ends_with(" UTC  SHUTDOWN guest=false reason=host-qmp-quit"),
        "{}",
        human[1]
    );
    let json: Vec<Value> = outputs[1]
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(json.len(), 2);
    assert_eq!(json[0]["event"], "STOP");
    assert_eq!(json[1]["data"]["reason"], "host-qmp-quit");
    assert!(json[1]["timestamp"]["seconds"].is_i64());
}
