//! multifd: guest RAM over several connections at once (QEMU's `multifd`
//! capability and `multifd-channels` parameter, set on both ends).
//!
//! The main connection carries what it always does: the configuration,
//! the answers, the VM, vCPU and device state, the end. Once the
//! destination has said GO, the source opens `multifd-channels` more
//! connections to the same URI. Each starts with a hello — `FERRYCHN`,
//! the session (a random u64 the configuration section carried, so a
//! stray connection is refused), the channel's index and the channel
//! count, u32 each — and then carries a stream of its own holding only
//! `ram` and `pass` sections and its `end` — and channel 0, after the
//! last pass, the VM's state (`vm`, `vcpu/N`, devices, `global-state`):
//! its connection is busy up to the stop, while the main one sat idle
//! through the passes and TCP restarts an idle connection's window
//! small (on a 2 ms link the state took three round trips there).
//!
//! Every pass is split among the channels by 16 MiB chunks, taken by
//! whichever channel is free ([`ChunkQueue`]); each channel ends its
//! part of the pass with a `pass` section. The destination puts pages
//! into guest memory straight from each connection, one thread per
//! channel, and says `FERRYPAS` on the main connection once every
//! channel has ended the pass ([`PassTracker`]). The source starts the
//! next pass only then: a page sent again in a later pass, maybe on
//! another channel, can never be overtaken by its older copy.

use std::io::{Read, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use migration::{Channel, Listener, MigrationUri, SectionKind, StreamReader};

use super::ack::{send_nak, send_pass_done};
use super::error::IncomingError;
use super::ram::{GuestRamSink, WrittenPages};
use crate::memory::GuestMemoryMmap;

const HELLO_MAGIC: &[u8; 8] = b"FERRYCHN";
const HELLO_LEN: usize = 24;
/// How long the destination waits for the channels after its GO, and for
/// each one's hello.
pub const CHANNEL_DEADLINE: Duration = Duration::from_secs(10);

/// The first bytes on a multifd channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub session: u64,
    pub index: u32,
    pub count: u32,
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(HELLO_MAGIC);
        b[8..16].copy_from_slice(&self.session.to_le_bytes());
        b[16..20].copy_from_slice(&self.index.to_le_bytes());
        b[20..24].copy_from_slice(&self.count.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HELLO_LEN]) -> Option<Self> {
        if &b[..8] != HELLO_MAGIC {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut session = [0u8; 8];
        session.copy_from_slice(&b[8..16]);
        Some(Self {
            session: u64::from_le_bytes(session),
            index: u32_at(16),
            count: u32_at(20),
        })
    }
}

/// A random session number for the hellos of one migration.
pub fn new_session() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into the 8-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        // No entropy source: still unlikely to collide by accident.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ u64::from(std::process::id()).rotate_left(32);
    }
    u64::from_le_bytes(b)
}

/// Source: the channels' connections, each with its hello sent.
pub fn connect_channels(
    uri: &MigrationUri,
    session: u64,
    count: u32,
    timeout: Duration,
    tls: Option<&migration::tls::ClientTls>,
) -> Result<Vec<Box<dyn Channel>>, migration::TransportError> {
    let mut channels = Vec::with_capacity(count as usize);
    for index in 0..count {
        let mut c = migration::connect(uri)?;
        if let Some(tls) = tls {
            let peer = format!("{uri} (multifd channel {index})");
            c = migration::tls::connect(c, tls, timeout, &peer).map_err(|e| {
                migration::TransportError::Connect {
                    uri: peer.clone(),
                    source: std::io::Error::other(e.to_string()),
                }
            })?;
        }
        let hello = Hello {
            session,
            index,
            count,
        };
        let sent = c
            .set_timeouts(Some(timeout), Some(timeout))
            .and_then(|()| c.write_all(&hello.encode()))
            // Now, not with the stream: over TLS the destination accepts
            // (and handshakes) the next channel only after this hello.
            .and_then(|()| c.flush());
        if let Err(source) = sent {
            return Err(migration::TransportError::Connect {
                uri: format!("{uri} (multifd channel {index})"),
                source,
            });
        }
        channels.push(c);
    }
    Ok(channels)
}

/// Destination: the `count` channels of session `session`, in index
/// order. A connection whose hello is wrong is dropped and waited past
/// (it is not the source's); the whole wait is bounded.
pub fn accept_channels(
    listener: &Listener,
    session: u64,
    count: u32,
    tls: Option<&migration::tls::ServerTls>,
) -> Result<Vec<Box<dyn Channel>>, IncomingError> {
    let deadline = Instant::now() + CHANNEL_DEADLINE;
    let mut slots: Vec<Option<Box<dyn Channel>>> = (0..count).map(|_| None).collect();
    let mut have = 0;
    while have < count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !readable(listener, left) {
            return Err(IncomingError::ChannelsMissing {
                expected: count,
                got: have,
            });
        }
        let c = match listener.accept() {
            Ok(c) => c,
            Err(e @ migration::TransportError::PeerRefused { .. }) => {
                log::warn!("incoming migration: {e}");
                continue;
            }
            Err(source) => {
                return Err(IncomingError::Accept {
                    uri: listener.local_addr(),
                    source,
                })
            }
        };
        let handshake = left.min(Duration::from_secs(2));
        let mut c = match tls {
            None => c,
            Some(tls) => match migration::tls::accept(c, tls, handshake, "a multifd channel") {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("incoming migration: a multifd channel was dropped: {e}");
                    continue;
                }
            },
        };
        let mut b = [0u8; HELLO_LEN];
        let read = c
            .set_timeouts(Some(handshake), None)
            .and_then(|()| c.read_exact(&mut b));
        let hello = read.ok().and_then(|()| Hello::decode(&b));
        let slot = hello
            .filter(|h| h.session == session && h.count == count)
            .and_then(|h| slots.get_mut(h.index as usize))
            .filter(|s| s.is_none());
        match slot {
            Some(slot) => {
                let _ = c.set_timeouts(None, None);
                *slot = Some(c);
                have += 1;
            }
            None => log::warn!("incoming migration: a connection that is not one of this migration's multifd channels was dropped"),
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

fn readable(listener: &Listener, timeout: Duration) -> bool {
    let Some(fd) = listener.as_raw_fd() else {
        return false;
    };
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one pollfd, valid for the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

/// Destination: tells the source when every channel has ended a pass, on
/// a second handle of the main connection. With one channel (RAM on the
/// main connection itself) the count is 1.
pub struct PassTracker {
    channels: u32,
    /// Guest memory backed by huge pages until the first pass is in
    /// (memory::advise_huge_pages).
    huge_for_pass_1: Option<GuestMemoryMmap>,
    answer: Option<Mutex<Box<dyn Channel>>>,
    state: Mutex<(u32, u32)>,
    failed: std::sync::atomic::AtomicBool,
}

impl PassTracker {
    /// `answer`: where `FERRYPAS` goes; `None` (a file, or a source that
    /// did not ask) says nothing.
    pub fn new(
        channels: u32,
        answer: Option<Box<dyn Channel>>,
        huge_for_pass_1: Option<GuestMemoryMmap>,
    ) -> Self {
        if let Some(m) = &huge_for_pass_1 {
            crate::memory::advise_huge_pages(m);
        }
        Self {
            channels: channels.max(1),
            huge_for_pass_1,
            answer: answer.map(Mutex::new),
            state: Mutex::new((0, 0)),
            failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// One channel has ended pass `pass`.
    pub fn ended(&self, pass: u32) -> std::io::Result<()> {
        let done = {
            let mut s = devices::bus::lock(&self.state);
            if s.0 != pass {
                *s = (pass, 0);
            }
            s.1 += 1;
            s.1 == self.channels
        };
        if done && pass == 1 {
            if let Some(m) = &self.huge_for_pass_1 {
                crate::memory::advise_small_pages(m);
            }
        }
        match (&self.answer, done) {
            (Some(a), true) => send_pass_done(&mut *devices::bus::lock(a), pass),
            _ => Ok(()),
        }
    }

    /// A channel failed: the source hears why, and the main connection is
    /// shut so the thread reading it returns.
    pub fn fail(&self, reason: &str) {
        self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(a) = &self.answer {
            let mut a = devices::bus::lock(a);
            let _ = send_nak(&mut *a, reason);
            let _ = a.shutdown();
        }
    }
}

/// Whether a channel failed (before anything else did).
impl PassTracker {
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A channel's stream as the destination reads it.
pub type ChannelReader = StreamReader<Box<dyn Channel>>;

/// Destination, one thread per channel: reads the channel's stream into
/// guest memory until its end.
pub fn receive_channel(
    channel: Box<dyn Channel>,
    index: usize,
    memory: &GuestMemoryMmap,
    written: &WrittenPages,
    tracker: &PassTracker,
) -> Result<(ChannelReader, Vec<migration::Section>), IncomingError> {
    let fail = |e: IncomingError| IncomingError::Channel {
        index,
        reason: e.to_string(),
    };
    let mut reader = StreamReader::new(channel).map_err(|e| fail(e.into()))?;
    // SAFETY: the machine is being loaded: no vCPU has run and no device
    // is active; the other channels' sinks write other pages of the same
    // pass (`GuestRamSink::new`).
    let mut sink = unsafe { GuestRamSink::new(memory, written) };
    let mut state = Vec::new();
    loop {
        let section = reader
            .next_section_with_ram(&mut sink)
            .map_err(|e| fail(e.into()))?;
        match section.kind {
            SectionKind::Ram => reader.recycle(section),
            SectionKind::Pass => {
                let (pass, _) = section.pass().map_err(|e| fail(e.into()))?;
                reader.recycle(section);
                tracker
                    .ended(pass)
                    .map_err(|e| fail(IncomingError::Answer(e)))?;
            }
            // The reader (its buffers) is freed after the ACK, not on the
            // stopped guest's path.
            SectionKind::End => return Ok((reader, state)),
            // The VM's state, on channel 0 only: checked by the caller.
            SectionKind::VmState | SectionKind::Vcpu | SectionKind::Device if index == 0 => {
                state.push(section)
            }
            kind => {
                return Err(fail(IncomingError::UnknownSection {
                    kind,
                    name: section.name,
                    offset: section.offset,
                }))
            }
        }
    }
}

/// Shuts every channel down (a failure elsewhere): their threads return.
pub fn shut(channels: &[Box<dyn Channel>]) {
    for c in channels {
        let _ = c.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_refuses_other_bytes() {
        let h = Hello {
            session: 0x0123_4567_89ab_cdef,
            index: 2,
            count: 4,
        };
        assert_eq!(Hello::decode(&h.encode()), Some(h));
        let mut b = h.encode();
        b[0] = b'X';
        assert_eq!(Hello::decode(&b), None);
        assert_ne!(new_session(), new_session());
    }
}
