//! The destination's answers on a socket: `FERRYGO!` once it has accepted
//! the configuration section and built the machine (so a refusal — wrong
//! memory size, a TAP it cannot open — reaches the source before any RAM
//! is sent), and `FERRYACK` after the end of the stream when the VM is
//! loaded and will run. Either may instead be `FERRYNAK`, a u32 LE length
//! and a UTF-8 reason. The source stops its guest for good only on an ACK.
//!
//! While RAM passes arrive, the destination also says `FERRYPAS` and the
//! pass number (u32 LE) once it has put every page of that pass into
//! guest memory: the source starts the next pass, or stops the guest,
//! only then, so what sits in socket buffers when the guest stops is the
//! last pass alone, whatever the link's buffering (the destination can
//! lag the source by tens of MiB of socket buffers). Sent only when the
//! configuration section asks for it (`pass_acks`).

use std::io::{self, Read, Write};

const GO: &[u8; 8] = b"FERRYGO!";
const ACK: &[u8; 8] = b"FERRYACK";
const NAK: &[u8; 8] = b"FERRYNAK";
const PASS: &[u8; 8] = b"FERRYPAS";
const REPORT: &[u8; 8] = b"FERRYRPT";
/// Largest report the source reads.
const MAX_REPORT: usize = 1 << 20;
const MAX_REASON: usize = 4096;

pub fn send_go(w: &mut impl Write) -> io::Result<()> {
    w.write_all(GO)?;
    w.flush()
}

pub fn send_ack(w: &mut impl Write) -> io::Result<()> {
    w.write_all(ACK)?;
    w.flush()
}

pub fn send_pass_done(w: &mut impl Write, pass: u32) -> io::Result<()> {
    let mut msg = [0u8; 12];
    msg[..8].copy_from_slice(PASS);
    msg[8..].copy_from_slice(&pass.to_le_bytes());
    w.write_all(&msg)?;
    w.flush()
}

/// After the ACK, when the source asked for it (`report`): what the
/// destination did once it had the guest, as JSON (the source's
/// timeline).
pub fn send_report(w: &mut impl Write, json: &[u8]) -> io::Result<()> {
    let json = &json[..json.len().min(MAX_REPORT)];
    w.write_all(REPORT)?;
    w.write_all(&(json.len() as u32).to_le_bytes())?;
    w.write_all(json)?;
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
    /// Every page of this pass is in guest memory.
    PassDone(u32),
    /// The destination's report (JSON).
    Report(Vec<u8>),
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
    if &tag == REPORT {
        let mut len = [0u8; 4];
        r.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_REPORT {
            return Err(io::Error::other(format!("a report of {len} bytes")));
        }
        let mut json = vec![0u8; len];
        r.read_exact(&mut json)?;
        return Ok(Answer::Report(json));
    }
    if &tag == PASS {
        let mut pass = [0u8; 4];
        r.read_exact(&mut pass)?;
        return Ok(Answer::PassDone(u32::from_le_bytes(pass)));
    }
    if &tag != NAK {
        return Err(io::Error::other(format!(
            "destination answered {tag:02x?}, not FERRYGO!/FERRYACK/FERRYNAK/FERRYPAS/FERRYRPT"
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
        send_pass_done(&mut buf, 3).unwrap();
        send_nak(&mut buf, "memory size differs").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_answer(&mut r).unwrap(), Answer::Go);
        assert_eq!(read_answer(&mut r).unwrap(), Answer::Ack);
        assert_eq!(read_answer(&mut r).unwrap(), Answer::PassDone(3));
        assert_eq!(
            read_answer(&mut r).unwrap(),
            Answer::Nak("memory size differs".into())
        );
        assert!(read_answer(&mut r).is_err(), "nothing left");
        assert!(read_answer(&mut &b"GARBAGE!"[..]).is_err());
    }
}
