//! The protocol proper, independent of sockets: greeting, negotiation,
//! request checking, dispatch and replies.

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::error::{ErrorClass, QmpError, QmpSetupError};
use super::framing::Frame;
use super::json::encode_line;
use super::schema::{ArgSpec, ArgType, CommandSpec, Registry};

/// What the VMM implements: run one declared command whose arguments
/// have already been checked against its [`CommandSpec`].
///
/// `Ok(value)` becomes `{"return": value}` (`json!({})` for commands that
/// return nothing); `Err` becomes `{"error": {"class", "desc"}}`. Events
/// the command causes should go through an
/// [`EventEmitter`](super::EventEmitter) clone; they reach clients before
/// the reply.
///
/// `execute` runs on the VMM thread inside the server's `process`, with
/// the server's mutex held: it must not lock the server itself (to call
/// `flush_all`, say) — record what should happen (e.g. the exit for
/// `quit`) and let the loop act on it.
pub trait QmpHandler {
    fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError>;
}

impl<H: QmpHandler + ?Sized> QmpHandler for Box<H> {
    fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        (**self).execute(command, args)
    }
}

/// The version in the greeting and in `query-version`. QMP's format is
/// QEMU's (`{"qemu": {major, minor, micro}, "package"}`); the numbers are
/// Ferry's own, so clients that print them print Ferry's version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
    pub package: String,
}

impl QmpVersion {
    /// This build of Ferry.
    pub fn ferry() -> Self {
        let n = |s: &str| s.parse().unwrap_or(0);
        Self {
            major: n(env!("CARGO_PKG_VERSION_MAJOR")),
            minor: n(env!("CARGO_PKG_VERSION_MINOR")),
            micro: n(env!("CARGO_PKG_VERSION_PATCH")),
            package: format!("Ferry {}", env!("CARGO_PKG_VERSION")),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "qemu": {"major": self.major, "minor": self.minor, "micro": self.micro},
            "package": self.package,
        })
    }
}

impl Default for QmpVersion {
    fn default() -> Self {
        Self::ferry()
    }
}

/// Where a connection is in QMP's life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// After the greeting: only `qmp_capabilities` runs, no events.
    Negotiation,
    /// After `qmp_capabilities`: every other command, and events.
    Command,
}

/// Commands the server answers itself.
pub(crate) const BUILTINS: [CommandSpec; 3] = [
    CommandSpec::new(
        "qmp_capabilities",
        &[ArgSpec::optional("enable", ArgType::Array)],
    ),
    CommandSpec::no_args("query-commands"),
    CommandSpec::no_args("query-version"),
];

/// A reply to one request, `id` echoed as given (any JSON value).
#[derive(Debug, PartialEq)]
pub(crate) struct Reply {
    pub id: Option<Value>,
    pub result: Result<Value, QmpError>,
}

#[derive(Serialize)]
struct WireReply<'a> {
    #[serde(rename = "return", skip_serializing_if = "Option::is_none")]
    ret: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a QmpError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

impl Reply {
    fn error(id: Option<Value>, error: QmpError) -> Self {
        Self {
            id,
            result: Err(error),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let (ret, error) = match &self.result {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        encode_line(&WireReply {
            ret,
            error,
            id: self.id.as_ref(),
        })
    }
}

/// The command table, the handler, and what every connection shares.
pub(crate) struct Dispatcher<H> {
    registry: Registry,
    pub handler: H,
    version: QmpVersion,
}

impl<H: QmpHandler> Dispatcher<H> {
    pub fn new(
        commands: &[CommandSpec],
        handler: H,
        version: QmpVersion,
    ) -> Result<Self, QmpSetupError> {
        Ok(Self {
            registry: Registry::new(&BUILTINS, commands)?,
            handler,
            version,
        })
    }

    pub fn set_version(&mut self, version: QmpVersion) {
        self.version = version;
    }

    /// The first thing a client reads. Ferry offers no capabilities (in
    /// particular not `oob`).
    pub fn greeting(&self) -> Vec<u8> {
        encode_line(&json!({
            "QMP": {"version": self.version.to_json(), "capabilities": []}
        }))
    }

    /// One request in, one reply out: every frame gets exactly one reply,
    /// errors included, and the connection stays usable.
    pub fn handle(&mut self, mode: &mut Mode, frame: Frame) -> Reply {
        let value = match frame {
            Frame::Invalid(desc) => return Reply::error(None, QmpError::generic(desc)),
            Frame::Json(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) => v,
                Err(e) => {
                    return Reply::error(None, QmpError::generic(format!("JSON parse error, {e}")))
                }
            },
        };
        let Value::Object(mut request) = value else {
            return Reply::error(None, QmpError::generic("QMP input must be a JSON object"));
        };
        let id = request.remove("id");
        let result = self.dispatch(mode, request);
        Reply { id, result }
    }

    fn dispatch(
        &mut self,
        mode: &mut Mode,
        request: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let mut command = None;
        let mut args = Map::new();
        for (key, value) in request {
            match (key.as_str(), value) {
                ("execute", Value::String(name)) => command = Some(name),
                ("execute", _) => {
                    return Err(QmpError::generic(
                        "QMP input member 'execute' must be a string",
                    ))
                }
                ("exec-oob", _) => {
                    return Err(QmpError::generic(
                        "Out-of-band execution ('exec-oob') is not supported: \
                         Ferry does not offer the 'oob' capability; use 'execute'",
                    ))
                }
                ("arguments", Value::Object(map)) => args = map,
                ("arguments", _) => {
                    return Err(QmpError::generic(
                        "QMP input member 'arguments' must be an object",
                    ))
                }
                (other, _) => {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{other}' is unexpected"
                    )))
                }
            }
        }
        let Some(command) = command else {
            return Err(QmpError::generic("QMP input lacks member 'execute'"));
        };

        match (*mode, command.as_str()) {
            (Mode::Negotiation, "qmp_capabilities") | (Mode::Command, _) => {}
            (Mode::Negotiation, _) => {
                return Err(QmpError::new(
                    ErrorClass::CommandNotFound,
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ))
            }
        }
        if *mode == Mode::Command && command == "qmp_capabilities" {
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        let spec = self
            .registry
            .get(&command)
            .ok_or_else(|| QmpError::command_not_found(&command))?;
        spec.check_arguments(&args)?;

        match command.as_str() {
            "qmp_capabilities" => {
                check_capabilities(&args)?;
                *mode = Mode::Command;
                Ok(json!({}))
            }
            "query-commands" => Ok(Value::Array(
                self.registry
                    .iter()
                    .map(|c| json!({ "name": c.name }))
                    .collect(),
            )),
            "query-version" => Ok(self.version.to_json()),
            _ => self.handler.execute(&command, &args),
        }
    }
}

/// `qmp_capabilities {"enable": [...]}`: the greeting offers nothing, so
/// any capability asked for is refused (QEMU's wording for `oob` when it
/// is not offered).
fn check_capabilities(args: &Map<String, Value>) -> Result<(), QmpError> {
    let Some(Value::Array(enable)) = args.get("enable") else {
        return Ok(());
    };
    // Refusing the first is enough: none can be granted.
    let Some(cap) = enable.first() else {
        return Ok(());
    };
    Err(match cap.as_str() {
        Some("oob") => QmpError::generic("Capability 'oob' not available"),
        Some(other) => QmpError::generic(format!(
            "Parameter 'enable[0]' does not accept value '{other}'"
        )),
        None => QmpError::generic("Invalid parameter type for 'enable[0]', expected: string"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::Framer;
    use std::collections::VecDeque;

    /// Records what it was asked; fails `fail`, echoes `echo`.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<(String, Map<String, Value>)>,
    }

    impl QmpHandler for Recorder {
        fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
            self.calls.push((command.to_string(), args.clone()));
            match command {
                "fail" => Err(QmpError::device_not_found("Device 'x' not found")),
                "echo" => Ok(Value::Object(args.clone())),
                _ => Ok(json!({})),
            }
        }
    }

    const COMMANDS: [CommandSpec; 3] = [
        CommandSpec::no_args("stop"),
        CommandSpec::no_args("fail"),
        CommandSpec::new(
            "echo",
            &[
                ArgSpec::required("s", ArgType::String),
                ArgSpec::optional("n", ArgType::Int),
            ],
        ),
    ];

    struct Session {
        d: Dispatcher<Recorder>,
        mode: Mode,
        framer: Framer,
    }

    impl Session {
        fn new() -> Self {
            Self {
                d: Dispatcher::new(&COMMANDS, Recorder::default(), QmpVersion::ferry()).unwrap(),
                mode: Mode::Negotiation,
                framer: Framer::new(4096),
            }
        }

        fn negotiated() -> Self {
            let mut s = Self::new();
            assert_eq!(
                s.send(r#"{"execute":"qmp_capabilities"}"#),
                vec![json!({"return": {}})]
            );
            s
        }

        /// Every reply to `input`, as the client would decode it.
        fn send(&mut self, input: &str) -> Vec<Value> {
            let mut frames = VecDeque::new();
            self.framer.feed(input.as_bytes(), &mut frames).unwrap();
            frames
                .into_iter()
                .map(|f| {
                    let line = self.d.handle(&mut self.mode, f).encode();
                    assert!(line.ends_with(b"\r\n") && line.is_ascii());
                    serde_json::from_slice(&line).unwrap()
                })
                .collect()
        }

        fn one(&mut self, input: &str) -> Value {
            let mut r = self.send(input);
            assert_eq!(r.len(), 1, "{input}");
            r.remove(0)
        }
    }

    fn err(class: &str, desc: &str) -> Value {
        json!({"error": {"class": class, "desc": desc}})
    }

    #[test]
    fn greeting_format() {
        let s = Session::new();
        let line = s.d.greeting();
        assert!(line.ends_with(b"\r\n"));
        let g: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(g["QMP"]["capabilities"], json!([]));
        let v = &g["QMP"]["version"];
        for k in ["major", "minor", "micro"] {
            assert!(v["qemu"][k].is_u64(), "{k}");
        }
        assert!(v["package"].as_str().unwrap().starts_with("Ferry "));
    }

    #[test]
    fn negotiation_mode_allows_only_qmp_capabilities() {
        let mut s = Session::new();
        let expecting = err(
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'",
        );
        assert_eq!(s.one(r#"{"execute":"stop"}"#), expecting);
        assert_eq!(s.one(r#"{"execute":"query-version"}"#), expecting);
        assert_eq!(s.one(r#"{"execute":"no-such"}"#), expecting);
        assert!(s.d.handler.calls.is_empty());
        assert_eq!(
            s.one(r#"{"execute":"qmp_capabilities","id":7}"#),
            json!({"return": {}, "id": 7})
        );
        assert_eq!(s.mode, Mode::Command);
        assert_eq!(
            s.one(r#"{"execute":"qmp_capabilities"}"#),
            err(
                "CommandNotFound",
                "Capabilities negotiation is already complete, command ignored"
            )
        );
        assert_eq!(s.one(r#"{"execute":"stop"}"#), json!({"return": {}}));
    }

    #[test]
    fn capabilities_cannot_be_enabled() {
        let mut s = Session::new();
        assert_eq!(
            s.one(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#),
            err("GenericError", "Capability 'oob' not available")
        );
        assert_eq!(s.mode, Mode::Negotiation);
        assert_eq!(
            s.one(r#"{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}"#),
            err(
                "GenericError",
                "Invalid parameter type for 'enable', expected: array"
            )
        );
        assert_eq!(
            s.one(r#"{"execute":"qmp_capabilities","arguments":{"enable":[]}}"#),
            json!({"return": {}})
        );
    }

    #[test]
    fn ids_are_echoed_whatever_their_type() {
        let mut s = Session::negotiated();
        for id in [
            json!(1),
            json!("abc"),
            json!({"a": [1, null]}),
            json!(null),
            json!(1.5),
        ] {
            let req = json!({"execute": "stop", "id": id});
            assert_eq!(s.one(&req.to_string()), json!({"return": {}, "id": id}));
            let req = json!({"execute": "nope", "id": id});
            assert_eq!(s.one(&req.to_string())["id"], id);
        }
        let req = r#"{"execute": "fail", "id": "f"}"#;
        assert_eq!(
            s.one(req),
            json!({"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}, "id": "f"})
        );
    }

    #[test]
    fn bad_input_gets_errors_and_the_session_goes_on() {
        let mut s = Session::negotiated();
        let r = s.one(r#"{ "execute": }"#);
        assert_eq!(r["error"]["class"], "GenericError");
        assert!(r["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("JSON parse error, "));
        assert!(r.get("id").is_none());

        let not_object = err("GenericError", "QMP input must be a JSON object");
        // A bare token ends at a delimiter, so the last one needs the newline.
        assert_eq!(s.send("[1] 42 \"s\" true\n"), vec![not_object.clone(); 4]);
        assert_eq!(
            s.one(r#"{"arguments": {}, "id": 3}"#),
            json!({"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}, "id": 3})
        );
        assert_eq!(
            s.one(r#"{"execute": 5}"#),
            err(
                "GenericError",
                "QMP input member 'execute' must be a string"
            )
        );
        assert_eq!(
            s.one(r#"{"execute": "stop", "arguments": []}"#),
            err(
                "GenericError",
                "QMP input member 'arguments' must be an object"
            )
        );
        assert_eq!(
            s.one(r#"{"execute": "stop", "extra": 1}"#),
            err("GenericError", "QMP input member 'extra' is unexpected")
        );
        let oob = s.one(r#"{"exec-oob": "stop", "id": 9}"#);
        assert_eq!(oob["id"], 9);
        assert!(oob["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("not supported"));
        assert_eq!(
            s.one(r#"{"execute": "frobnicate"}"#),
            err(
                "CommandNotFound",
                "The command frobnicate has not been found"
            )
        );
        // The handler never saw any of it; the connection still works.
        assert!(s.d.handler.calls.is_empty());
        assert_eq!(s.one(r#"{"execute": "stop"}"#), json!({"return": {}}));
    }

    #[test]
    fn arguments_are_checked_before_the_handler_runs() {
        let mut s = Session::negotiated();
        assert_eq!(
            s.one(r#"{"execute": "echo"}"#),
            err("GenericError", "Parameter 's' is missing")
        );
        assert_eq!(
            s.one(r#"{"execute": "echo", "arguments": {"s": "x", "t": 1}}"#),
            err("GenericError", "Parameter 't' is unexpected")
        );
        assert_eq!(
            s.one(r#"{"execute": "echo", "arguments": {"s": 1}}"#),
            err(
                "GenericError",
                "Invalid parameter type for 's', expected: string"
            )
        );
        assert_eq!(
            s.one(r#"{"execute": "stop", "arguments": {"now": true}}"#),
            err("GenericError", "Parameter 'now' is unexpected")
        );
        assert_eq!(
            s.one(r#"{"execute": "query-version", "arguments": {"x": 1}}"#),
            err("GenericError", "Parameter 'x' is unexpected")
        );
        assert!(s.d.handler.calls.is_empty());
        assert_eq!(
            s.one(r#"{"execute": "echo", "arguments": {"s": "x", "n": 2}}"#),
            json!({"return": {"s": "x", "n": 2}})
        );
        assert_eq!(s.d.handler.calls.len(), 1);
        assert_eq!(s.d.handler.calls[0].0, "echo");
    }

    #[test]
    fn builtins() {
        let mut s = Session::negotiated();
        let names: Vec<Value> = [
            "qmp_capabilities",
            "query-commands",
            "query-version",
            "stop",
            "fail",
            "echo",
        ]
        .iter()
        .map(|n| json!({ "name": n }))
        .collect();
        assert_eq!(
            s.one(r#"{"execute": "query-commands"}"#),
            json!({"return": names})
        );
        let v = s.one(r#"{"execute": "query-version"}"#);
        assert_eq!(v["return"], QmpVersion::ferry().to_json());
    }

    #[test]
    fn single_quoted_requests_work() {
        let mut s = Session::new();
        assert_eq!(
            s.one("{'execute': 'qmp_capabilities', 'id': 'it\\'s'}"),
            json!({"return": {}, "id": "it's"})
        );
    }

    #[test]
    fn reply_wire_format() {
        let ok = Reply {
            id: Some(json!("a")),
            result: Ok(json!({})),
        };
        assert_eq!(ok.encode(), b"{\"return\": {}, \"id\": \"a\"}\r\n");
        let e = Reply::error(None, QmpError::generic("x"));
        assert_eq!(
            e.encode(),
            b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}}\r\n"
        );
    }
}
