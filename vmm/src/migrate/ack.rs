//! The destination's answer after the end of the stream: `FERRYACK` when
//! the VM is loaded and will run, or `FERRYNAK`, a u32 LE length and a
//! UTF-8 reason when it refused. The source stops its guest for good only
//! on an ACK.

use std::io::{self, Read, Write};

const ACK: &[u8; 8] = b"FERRYACK";
const NAK: &[u8; 8] = b"FERRYNAK";
const MAX_REASON: usize = 4096;

pub fn send_ack(w: &mut impl Write) -> io::Result<()> {
    w.write_all(ACK)?;
    w.flush()
}

pub fn send_nak(w: &mut impl Write, reason: &str) -> io::Result<()> {
    let reason = &reason.as_bytes()[..reason.len().min(MAX_REASON)];
    w.write_all(NAK)?;
    w.write_all(&(reason.len() as u32).to_le_bytes())?;
    w.write_all(reason)?;
    w.flush()
}

/// What the destination said.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Ack,
    Nak(String),
}

/// Reads the destination's answer. A closed connection or anything else
/// is an error naming what came.
pub fn read_answer(r: &mut impl Read) -> io::Result<Answer> {
    let mut tag = [0u8; 8];
    r.read_exact(&mut tag)?;
    if &tag == ACK {
        return Ok(Answer::Ack);
    }
    if &tag != NAK {
        return Err(io::Error::other(format!(
            "destination answered {tag:02x?}, not FERRYACK/FERRYNAK"
        )));
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = (u32::from_le_bytes(len) as usize).min(MAX_REASON);
    let mut reason = vec![0u8; len];
    r.read_exact(&mut reason)?;
    Ok(Answer::Nak(String::from_utf8_lossy(&reason).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_and_nak_round_trip() {
        let mut buf = Vec::new();
        send_ack(&mut buf).unwrap();
        send_nak(&mut buf, "memory size differs").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_answer(&mut r).unwrap(), Answer::Ack);
        assert_eq!(
            read_answer(&mut r).unwrap(),
            Answer::Nak("memory size differs".into())
        );
        assert!(read_answer(&mut r).is_err(), "nothing left");
        assert!(read_answer(&mut &b"GARBAGE!"[..]).is_err());
    }
}
