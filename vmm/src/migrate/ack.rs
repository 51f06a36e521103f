//! The destination's answers on a socket: `FERRYGO!` once it has accepted
//! the configuration section and built the machine (so a refusal — wrong
//! memory size, a TAP it cannot open — reaches the source before any RAM
//! is sent), and `FERRYACK` after the end of the stream when the VM is
//! loaded and will run. Either may instead be `FERRYNAK`, a u32 LE length
//! and a UTF-8 reason. The source stops its guest for good only on an ACK.

use std::io::{self, Read, Write};

const GO: &[u8; 8] = b"FERRYGO!";
const ACK: &[u8; 8] = b"FERRYACK";
const NAK: &[u8; 8] = b"FERRYNAK";
const MAX_REASON: usize = 4096;

pub fn send_go(w: &mut impl Write) -> io::Result<()> {
    w.write_all(GO)?;
    w.flush()
}

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
    Go,
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
    if &tag == GO {
        return Ok(Answer::Go);
    }
    if &tag != NAK {
        return Err(io::Error::other(format!(
            "destination answered {tag:02x?}, not FERRYGO!/FERRYACK/FERRYNAK"
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
        send_go(&mut buf).unwrap();
        send_ack(&mut buf).unwrap();
        send_nak(&mut buf, "memory size differs").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_answer(&mut r).unwrap(), Answer::Go);
        assert_eq!(read_answer(&mut r).unwrap(), Answer::Ack);
        assert_eq!(
            read_answer(&mut r).unwrap(),
            Answer::Nak("memory size differs".into())
        );
        assert!(read_answer(&mut r).is_err(), "nothing left");
        assert!(read_answer(&mut &b"GARBAGE!"[..]).is_err());
    }
}
