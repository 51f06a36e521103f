//! Splitting a client's byte stream into JSON texts.
//!
//! QMP input is a stream of JSON values with no framing: a value may span
//! reads, one read may carry several, and newlines mean nothing. The framer
//! scans each byte once, keeping only the value in progress, and hands
//! complete texts to serde_json. It also implements two things QEMU's
//! lexer does that clients rely on:
//! - `'single-quoted'` strings (and `\'` in either kind), rewritten here
//!   to standard JSON;
//! - a lexical error (a control character other than tab/CR/LF, or a
//!   0xFE/0xFF byte) discards the value in progress: QMP's spec tells
//!   clients to send one to get the parser back to a known-good state.

use std::collections::VecDeque;

/// One unit of client input.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A complete JSON text (single quotes already rewritten), not yet
    /// known to be valid.
    Json(Vec<u8>),
    /// A lexical error; what had been read of the value was dropped.
    Invalid(String),
}

/// The value in progress is longer than the limit: the connection cannot
/// recover (there is no way to find where this value ends without
/// buffering it), so it is closed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TooLarge {
    pub limit: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between values.
    Idle,
    /// In a top-level bare token (`42`, `true`, `nonsense`).
    Scalar,
    /// Inside an object or array, outside any string.
    Container,
    /// Inside a string opened by `quote`; `escape` after a backslash.
    Str { quote: u8, escape: bool },
}

pub(crate) struct Framer {
    value: Vec<u8>,
    state: State,
    /// Open brackets and braces: only the count matters for framing;
    /// mismatched kinds are serde_json's to report.
    depth: usize,
    limit: usize,
}

fn is_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Bytes that are an error wherever they appear, strings included.
fn is_lexical_error(b: u8) -> bool {
    (b < 0x20 && !is_whitespace(b)) || b >= 0xfe
}

/// Bytes that end a bare top-level token.
fn ends_scalar(b: u8) -> bool {
    is_whitespace(b) || matches!(b, b'{' | b'}' | b'[' | b']' | b'"' | b'\'' | b',' | b':')
}

impl Framer {
    /// `limit`: the longest JSON text accepted, in bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            value: Vec::new(),
            state: State::Idle,
            depth: 0,
            limit,
        }
    }

    /// Whether part of a value has been read.
    #[cfg(test)]
    pub fn is_mid_value(&self) -> bool {
        self.state != State::Idle
    }

    /// Scans `input`, appending every completed frame to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut VecDeque<Frame>) -> Result<(), TooLarge> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            if is_lexical_error(b) {
                self.reset();
                out.push_back(Frame::Invalid(format!(
                    "JSON parse error, stray byte 0x{b:02x}"
                )));
                i += 1;
                continue;
            }
            match self.state {
                State::Idle => match b {
                    _ if is_whitespace(b) => {}
                    b'{' | b'[' => {
                        self.value.push(b);
                        self.depth = 1;
                        self.state = State::Container;
                    }
                    b'"' | b'\'' => {
                        self.value.push(b'"');
                        self.state = State::Str {
                            quote: b,
                            escape: false,
                        };
                    }
                    b'}' | b']' | b',' | b':' => {
                        out.push_back(Frame::Invalid(format!(
                            "JSON parse error, stray '{}'",
                            b as char
                        )));
                    }
                    _ => {
                        self.value.push(b);
                        self.state = State::Scalar;
                    }
                },
                State::Scalar => {
                    if ends_scalar(b) {
                        self.complete(out);
                        // The delimiter belongs to whatever comes next.
                        continue;
                    }
                    self.value.push(b);
                }
                State::Container => {
                    self.value.push(b);
                    match b {
                        b'{' | b'[' => self.depth += 1,
                        b'}' | b']' => {
                            self.depth -= 1;
                            if self.depth == 0 {
                                self.complete(out);
                            }
                        }
                        b'"' | b'\'' => {
                            if let Some(last) = self.value.last_mut() {
                                *last = b'"';
                            }
                            self.state = State::Str {
                                quote: b,
                                escape: false,
                            };
                        }
                        _ => {}
                    }
                }
                State::Str { quote, escape } => self.string_byte(b, quote, escape, out),
            }
            if self.value.len() > self.limit {
                return Err(TooLarge { limit: self.limit });
            }
            i += 1;
        }
        Ok(())
    }

    fn string_byte(&mut self, b: u8, quote: u8, escape: bool, out: &mut VecDeque<Frame>) {
        if escape {
            // QEMU understands \' in both kinds of string; JSON has no
            // such escape, and a bare ' needs none.
            if b != b'\'' {
                self.value.push(b'\\');
            }
            self.value.push(b);
            self.state = State::Str {
                quote,
                escape: false,
            };
            return;
        }
        match b {
            b'\\' => {
                self.state = State::Str {
                    quote,
                    escape: true,
                }
            }
            _ if b == quote => {
                self.value.push(b'"');
                if self.depth == 0 {
                    self.complete(out);
                } else {
                    self.state = State::Container;
                }
            }
            b'"' => self.value.extend_from_slice(b"\\\""),
            _ => self.value.push(b),
        }
    }

    fn complete(&mut self, out: &mut VecDeque<Frame>) {
        out.push_back(Frame::Json(std::mem::take(&mut self.value)));
        self.state = State::Idle;
        self.depth = 0;
    }

    fn reset(&mut self) {
        self.value.clear();
        self.state = State::Idle;
        self.depth = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(framer: &mut Framer, input: &[u8]) -> Vec<Frame> {
        let mut out = VecDeque::new();
        framer.feed(input, &mut out).unwrap();
        out.into_iter().collect()
    }

    fn json(s: &str) -> Frame {
        Frame::Json(s.as_bytes().to_vec())
    }

    #[test]
    fn several_values_in_one_read() {
        let mut f = Framer::new(1024);
        let got = frames(&mut f, b"{\"a\":1}{\"b\":[2,{}]}\n  {}\r\n");
        assert_eq!(
            got,
            vec![json("{\"a\":1}"), json("{\"b\":[2,{}]}"), json("{}")]
        );
        assert!(!f.is_mid_value());
    }

    #[test]
    fn one_value_over_many_reads() {
        let text = b"{\"execute\": \"query-status\", \"id\": {\"x\": [1, \"}]\"]}}";
        let mut f = Framer::new(1024);
        let mut got = Vec::new();
        for byte in text.chunks(1) {
            got.extend(frames(&mut f, byte));
        }
        assert_eq!(got, vec![Frame::Json(text.to_vec())]);
    }

    #[test]
    fn braces_and_quotes_inside_strings_do_not_count() {
        let mut f = Framer::new(1024);
        let got = frames(&mut f, br#"{"a": "}{\"]", "b": "\\"}{}"#);
        assert_eq!(got, vec![json(r#"{"a": "}{\"]", "b": "\\"}"#), json("{}")]);
    }

    #[test]
    fn single_quotes_become_json() {
        let mut f = Framer::new(1024);
        let got = frames(&mut f, br#"{'execute': 'x"y', 'id': 'it\'s', "d": "\'"}"#);
        assert_eq!(
            got,
            vec![json(r#"{"execute": "x\"y", "id": "it's", "d": "'"}"#)]
        );
        let Frame::Json(bytes) = &got[0] else {
            unreachable!()
        };
        let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!(v["execute"], "x\"y");
        assert_eq!(v["id"], "it's");
    }

    #[test]
    fn top_level_scalars_are_frames() {
        let mut f = Framer::new(1024);
        let got = frames(&mut f, b"42 true\"s\"[1]nonsense{}");
        assert_eq!(
            got,
            vec![
                json("42"),
                json("true"),
                json("\"s\""),
                json("[1]"),
                json("nonsense"),
                json("{}")
            ]
        );
    }

    #[test]
    fn control_byte_resets_a_stuck_parser() {
        let mut f = Framer::new(1024);
        assert!(frames(&mut f, b"{\"execute\": ").is_empty());
        assert!(f.is_mid_value());
        let got = frames(&mut f, b"\x1b{\"execute\":\"x\"}");
        assert_eq!(got.len(), 2);
        assert!(matches!(&got[0], Frame::Invalid(m) if m.contains("0x1b")));
        assert_eq!(got[1], json("{\"execute\":\"x\"}"));
    }

    #[test]
    fn ff_byte_resets_inside_a_string() {
        let mut f = Framer::new(1024);
        let got = frames(&mut f, b"{\"a\": \"abc\xff{}");
        assert_eq!(got.len(), 2);
        assert!(matches!(&got[0], Frame::Invalid(_)));
        assert_eq!(got[1], json("{}"));
    }

    #[test]
    fn stray_closers_are_errors_and_skipped() {
        let mut f = Framer::new(1024);
        let got = frames(&mut f, b"}]{}");
        assert_eq!(got.len(), 3);
        assert!(matches!(&got[0], Frame::Invalid(m) if m.contains("'}'")));
        assert!(matches!(&got[1], Frame::Invalid(m) if m.contains("']'")));
        assert_eq!(got[2], json("{}"));
    }

    #[test]
    fn utf8_passes_through() {
        let mut f = Framer::new(1024);
        let got = frames(&mut f, "{\"a\": \"caf\u{e9}\"}".as_bytes());
        assert_eq!(got, vec![json("{\"a\": \"caf\u{e9}\"}")]);
    }

    #[test]
    fn a_value_over_the_limit_is_refused() {
        let mut f = Framer::new(16);
        let mut out = VecDeque::new();
        assert_eq!(f.feed(b"{\"a\": \"0123456", &mut out), Ok(()));
        assert_eq!(
            f.feed(b"789abcdef\"}", &mut out),
            Err(TooLarge { limit: 16 })
        );
        // Whitespace between values is never buffered.
        let mut f = Framer::new(4);
        assert_eq!(f.feed(&[b' '; 100], &mut out), Ok(()));
        assert_eq!(f.feed(b"{}", &mut out), Ok(()));
    }
}
