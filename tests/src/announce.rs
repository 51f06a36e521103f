//! Announce frames in a capture: decoded by tshark (the independent
//! parser), with the raw bytes from the pcap beside each, grouped into
//! rounds.

use std::io;

use crate::netns::Pcap;

/// Announce tests measure timing (rounds, lost pings): they run one at a
/// time, so that another test's migration or tshark run is not what they
/// measure. Hold the guard for the test's length.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A gratuitous ARP (request, sender IP = target IP) for `ip`.
    Garp { ip: String },
    /// A RARP request-reverse (opcode 3), QEMU's self-announce.
    Rarp,
}

/// One announce frame as tshark decoded it.
#[derive(Clone, Debug)]
pub struct AnnounceFrame {
    /// Capture time, seconds since the epoch.
    pub at: f64,
    /// Source MAC, lower case.
    pub src: String,
    pub vlan: Option<u16>,
    pub kind: Kind,
    /// The frame's bytes as captured.
    pub bytes: Vec<u8>,
}

/// Every gratuitous ARP and RARP in `pcap` whose Ethernet source is one
/// of `macs`, in capture order. Other ARP (requests and replies of normal
/// traffic) is left out.
pub fn announce_frames(pcap: &Pcap, macs: &[&str]) -> io::Result<Vec<AnnounceFrame>> {
    let raw = pcap.frames()?;
    let macs: Vec<String> = macs.iter().map(|m| m.to_ascii_lowercase()).collect();
    let text = pcap.tshark_fields(
        "arp",
        &[
            "frame.number",
            "frame.time_epoch",
            "eth.src",
            "vlan.id",
            "arp.opcode",
            "arp.src.proto_ipv4",
            "arp.dst.proto_ipv4",
        ],
    )?;
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 7 || !macs.contains(&f[2].to_ascii_lowercase()) {
            continue;
        }
        let kind = match (f[4], f[5] == f[6]) {
            ("3", _) => Kind::Rarp,
            ("1", true) => Kind::Garp {
                ip: f[5].to_string(),
            },
            _ => continue,
        };
        let number: usize = f[0]
            .parse()
            .map_err(|_| io::Error::other(format!("tshark: {line}")))?;
        let bytes = raw
            .get(number - 1)
            .map(|(_, b)| b.clone())
            .ok_or_else(|| io::Error::other(format!("frame {number} not in the pcap")))?;
        out.push(AnnounceFrame {
            at: f[1]
                .parse()
                .map_err(|_| io::Error::other(format!("tshark: {line}")))?,
            src: f[2].to_ascii_lowercase(),
            vlan: f[3].parse().ok(),
            kind,
            bytes,
        });
    }
    Ok(out)
}

/// Frames split into rounds: a new round starts after a pause of more
/// than `gap` seconds (rounds are at least tens of milliseconds apart,
/// the frames of one round microseconds).
pub fn rounds(frames: &[AnnounceFrame], gap: f64) -> Vec<Vec<AnnounceFrame>> {
    let mut rounds: Vec<Vec<AnnounceFrame>> = Vec::new();
    for f in frames {
        match rounds.last_mut() {
            Some(r) if f.at - r.last().map_or(f.at, |l| l.at) <= gap => r.push(f.clone()),
            _ => rounds.push(vec![f.clone()]),
        }
    }
    rounds
}

/// When each round started, in milliseconds after the first.
pub fn round_offsets_ms(rounds: &[Vec<AnnounceFrame>]) -> Vec<f64> {
    let Some(t0) = rounds.first().and_then(|r| r.first()).map(|f| f.at) else {
        return Vec::new();
    };
    rounds.iter().map(|r| (r[0].at - t0) * 1e3).collect()
}

/// Whether rounds at `offsets` follow a schedule with rounds at
/// `expected` (ms): as many, each pause at least the schedule's (less
/// 2 ms of timestamping) and at most `late` ms longer. Pauses, not
/// offsets: a timer late on a busy host delays the rounds after it too
/// (each pause runs from the round before, or from the guest's ack).
pub fn schedule_matches(offsets: &[f64], expected: &[u64], late: f64) -> bool {
    offsets.len() == expected.len()
        && offsets.windows(2).zip(expected.windows(2)).all(|(o, e)| {
            let (pause, want) = (o[1] - o[0], (e[1] - e[0]) as f64);
            pause >= want - 2.0 && pause <= want + late
        })
}

/// (MAC, VLAN, kind) of a round, sorted: what the round announced.
pub fn round_content(round: &[AnnounceFrame]) -> Vec<(String, Option<u16>, Kind)> {
    let mut v: Vec<_> = round
        .iter()
        .map(|f| (f.src.clone(), f.vlan, f.kind.clone()))
        .collect();
    v.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(at: f64) -> AnnounceFrame {
        AnnounceFrame {
            at,
            src: "52:54:00:12:34:56".into(),
            vlan: None,
            kind: Kind::Rarp,
            bytes: Vec::new(),
        }
    }

    #[test]
    fn rounds_and_their_schedule() {
        let times = [10.0, 10.0001, 10.0502, 10.2003, 10.2004, 10.451, 10.801];
        let frames: Vec<_> = times.iter().map(|&t| frame(t)).collect();
        let rs = rounds(&frames, 0.02);
        assert_eq!(rs.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1, 2, 1, 1]);
        let offsets = round_offsets_ms(&rs);
        assert!(schedule_matches(&offsets, &[0, 50, 200, 450, 800], 10.0));
        // A pause too short, one too long, a round missing.
        assert!(!schedule_matches(&offsets, &[0, 60, 200, 450, 800], 10.0));
        assert!(!schedule_matches(&offsets, &[0, 30, 200, 450, 800], 10.0));
        assert!(!schedule_matches(
            &offsets[..4],
            &[0, 50, 200, 450, 800],
            10.0
        ));
    }
}
