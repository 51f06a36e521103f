//! The destination's side of multifd: the two ends agree, and one
//! thread per channel puts its pages into guest memory while the main
//! thread reads the main stream.

use super::*;

/// The two ends agree on multifd, or the destination says how not.
pub(super) fn check_multifd(source_channels: u32, here: u32) -> Result<(), IncomingError> {
    match (source_channels, here) {
        (s, h) if s == h => Ok(()),
        (s, 0) => Err(IncomingError::MultifdOffHere { source_channels: s }),
        (0, h) => Err(IncomingError::MultifdOffThere { here: h }),
        (s, h) => Err(IncomingError::ChannelCount {
            source_channels: s,
            here: h,
        }),
    }
}

/// multifd: one thread per channel puts its pages into guest memory
/// while this one reads the main stream. The state is applied only once
/// every channel's stream has ended; the first failure, on any of them,
/// stops all.
pub(super) fn read_with_channels(
    reader: &mut Reader,
    machine: &builder::Machine,
    written: &WrittenPages,
    tracker: &PassTracker,
    channels: Vec<Box<dyn Channel>>,
) -> Result<Loaded, IncomingError> {
    let memory = &machine.parts.memory;
    let handles: Vec<Box<dyn Channel>> = channels
        .iter()
        .filter_map(|c| c.try_clone_box().ok())
        .collect();
    std::thread::scope(|s| {
        // Each channel's thread says when it is done: the wait for them
        // is on the stopped guest's path, no polling.
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let count = channels.len();
        let threads: Vec<_> = channels
            .into_iter()
            .enumerate()
            .map(|(index, c)| {
                let done = done_tx.clone();
                std::thread::Builder::new()
                    .name(format!("ferry-multifd-{index}"))
                    .spawn_scoped(s, move || {
                        let r = crate::seccomp::install_channel()
                            .map_err(|e| IncomingError::Channel {
                                index,
                                reason: e.to_string(),
                            })
                            .and_then(|()| {
                                multifd::receive_channel(c, index, memory, written, tracker)
                            });
                        if let Err(e) = &r {
                            tracker.fail(&e.to_string());
                        }
                        let _ = done.send(());
                        r
                    })
            })
            .collect();
        drop(done_tx);
        let main = read_sections(reader, machine, written, None);
        // A source that ended the main stream has ended every channel:
        // one still going after a while never will.
        if main.is_ok() {
            let deadline = Instant::now() + multifd::CHANNEL_DEADLINE;
            for _ in 0..count {
                let left = deadline.saturating_duration_since(Instant::now());
                if done_rx.recv_timeout(left).is_err() {
                    break;
                }
            }
        }
        multifd::shut(&handles);
        let mut channel_error = None;
        let mut kept = Vec::new();
        let mut state = Vec::new();
        for t in threads {
            let r = match t {
                Ok(t) => t.join().unwrap_or_else(|_| {
                    Err(IncomingError::Channel {
                        index: usize::MAX,
                        reason: "its thread panicked".into(),
                    })
                }),
                Err(e) => Err(IncomingError::Answer(e)),
            };
            match r {
                Ok((reader, sections)) => {
                    kept.push(reader);
                    state.extend(sections);
                }
                Err(e) => {
                    channel_error.get_or_insert(e);
                }
            }
        }
        match (main, channel_error) {
            (Ok(mut loaded), None) => {
                // With multifd the state comes on channel 0 (its
                // connection is warm; the main one sat idle through the
                // passes and TCP would restart it slowly).
                let names = device_names(machine);
                for section in state {
                    loaded.state_from.get_or_insert_with(Instant::now);
                    loaded.take(section, &names, machine.parts.machine.vcpus)?;
                }
                loaded.kept = kept;
                Ok(loaded)
            }
            // A channel that failed first is the cause; after the main
            // stream failed, the channels' errors are its consequence.
            (_, Some(e)) if tracker.failed() => Err(e),
            (Err(e), _) => Err(e),
            (Ok(_), Some(e)) => Err(e),
        }
    })
}
