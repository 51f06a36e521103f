//! For the fuzz targets (`fuzz/`): one client's bytes through the
//! server's framing and dispatch, with a handler that answers every
//! command it is given, so the input reaches the argument checks, the
//! replies and the negotiation, as on a socket.

use std::collections::VecDeque;

use serde_json::{Map, Value};

use crate::framing::Framer;
use crate::protocol::{Dispatcher, Mode};
use crate::{ArgSpec, ArgType, CommandSpec, QmpError, QmpHandler, QmpVersion};

/// Commands with arguments of every type, checked as Ferry's are.
const COMMANDS: &[CommandSpec] = &[
    CommandSpec::no_args("stop"),
    CommandSpec::new(
        "migrate-set-parameters",
        &[
            ArgSpec::optional("downtime-limit", ArgType::Int),
            ArgSpec::optional("tls-creds", ArgType::Any),
            ArgSpec::optional("backend-transfer", ArgType::Bool),
        ],
    ),
    CommandSpec::new(
        "migrate",
        &[
            ArgSpec::required("uri", ArgType::String),
            ArgSpec::optional("blk", ArgType::Bool),
        ],
    ),
    CommandSpec::new(
        "migrate-set-capabilities",
        &[ArgSpec::required("capabilities", ArgType::Array)],
    ),
];

/// Answers every command with its arguments; `fail` with an error.
struct Echo;

impl QmpHandler for Echo {
    fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match command {
            "stop" => Err(QmpError::generic("refused")),
            _ => Ok(Value::Object(args.clone())),
        }
    }
}

/// Feeds `input` in pieces of `piece` bytes, as reads from a socket
/// would; returns the bytes of the replies. Panics if a reply is not one
/// ASCII line (what every client relies on).
pub fn session(input: &[u8], piece: usize) -> usize {
    let Ok(mut dispatcher) = Dispatcher::new(COMMANDS, Echo, QmpVersion::ferry()) else {
        return 0;
    };
    let mut mode = Mode::Negotiation;
    let mut framer = Framer::new(4096);
    let mut frames = VecDeque::new();
    let mut replied = dispatcher.greeting().len();
    for chunk in input.chunks(piece.max(1)) {
        // Too large: the server closes the connection.
        if framer.feed(chunk, &mut frames).is_err() {
            break;
        }
        while let Some(frame) = frames.pop_front() {
            let line = dispatcher.handle(&mut mode, frame).encode();
            assert!(line.ends_with(b"\r\n") && line.is_ascii(), "{line:?}");
            assert!(!line[..line.len() - 2].contains(&b'\n'), "{line:?}");
            replied += line.len();
        }
    }
    replied
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_session_answers_each_request() {
        let input =
            br#"{"execute":"qmp_capabilities"}{"execute":"migrate","arguments":{"uri":1}}{"#;
        assert!(super::session(input, 7) > 0);
    }
}
