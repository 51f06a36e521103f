//! Encoding of everything the server sends: JSON on one line, ASCII only,
//! formatted the way QEMU formats it.

use std::io;

use serde::Serialize;
use serde_json::ser::Formatter;

/// QMP's spec says the server sends ASCII and ends each message with
/// CRLF; QEMU does both. Clients that split on `\n` see the `\r` as JSON
/// whitespace, so CRLF costs nothing and keeps strict clients happy.
pub(crate) const LINE_END: &[u8] = b"\r\n";

/// serde_json writes UTF-8; this escapes every non-ASCII character as
/// `\uXXXX` (surrogate pairs beyond the BMP), as QEMU's output does. It
/// also separates members with `", "` and `": "` like QEMU, because
/// hand-written scripts match on `{"return": {}}` literally.
struct QemuStyle;

impl Formatter for QemuStyle {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut plain_start = 0;
        for (at, ch) in fragment.char_indices() {
            if ch.is_ascii() {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[plain_start..at])?;
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04x}")?;
            }
            plain_start = at + ch.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[plain_start..])
    }
}

/// One message as it goes on the wire, line end included.
pub(crate) fn encode_line<T: Serialize + ?Sized>(message: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuStyle);
    // Serializing a serde_json::Value or a plain derived struct into a Vec
    // cannot fail (no I/O errors, string keys only); should it ever, an
    // empty object keeps the stream well-formed rather than half-written.
    if message.serialize(&mut ser).is_err() {
        out.clear();
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(LINE_END);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn output_is_ascii_and_round_trips() {
        let v = json!({"desc": "caf\u{e9} \u{1f6a2} \"q\"\n", "n": 1});
        let line = encode_line(&v);
        assert!(line.is_ascii());
        assert!(line.ends_with(b"\r\n"));
        let text = std::str::from_utf8(&line).unwrap();
        assert!(text.contains("caf\\u00e9"));
        assert!(text.contains("\\ud83d\\udea2"));
        let back: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn one_line_with_qemu_separators() {
        let line = encode_line(&json!({"a": [1, 2, {"b": null}], "c": {}}));
        assert_eq!(line, b"{\"a\": [1, 2, {\"b\": null}], \"c\": {}}\r\n");
    }
}
