//! The source's RAM on the wire: the multifd channels, one pass split
//! among them (or on the main stream, or into a snapshot's image), and
//! the wait for the destination's FERRYPAS.

use super::*;
use crate::migrate::pagemap::Pagemap;

/// Threads writing a snapshot's RAM image.
const IMAGE_WRITERS: usize = 2;

impl<'a> Outgoing<'a> {
    /// With `tls-creds`: the TLS handshake on the main connection.
    pub(super) fn secure(
        &self,
        channel: Box<dyn Channel>,
        uri: &MigrationUri,
    ) -> Result<Box<dyn Channel>, MigrateError> {
        let Some(tls) = &self.tls else {
            return Ok(channel);
        };
        if self.params.backend_transfer {
            return Err(MigrateError::TlsSetup(
                "backend-transfer hands descriptors to a local peer, which TLS cannot carry: clear tls-creds for a local migration".into(),
            ));
        }
        Ok(migration::tls::connect(
            channel,
            tls,
            IO_TIMEOUT,
            &uri.to_string(),
        )?)
    }

    /// multifd: the RAM channels, after the destination's GO (it accepts
    /// them only then), each with its hello and stream header.
    pub(super) fn open_channels(
        &mut self,
        uri: &MigrationUri,
        session: u64,
        count: u32,
        bandwidth: Option<Bandwidth>,
    ) -> Result<(), MigrateError> {
        let channels =
            super::multifd::connect_channels(uri, session, count, IO_TIMEOUT, self.tls.as_ref())
                .map_err(MigrateError::Channels)?;
        for channel in channels {
            self.job.add_channel(channel.try_clone_box().ok());
            let mut w = StreamWriter::new(Counted {
                inner: channel,
                job: self.job,
            })?;
            w.set_bandwidth(bandwidth.clone());
            self.channels.push(w);
        }
        log::info!("migration: RAM over {count} multifd channels");
        Ok(())
    }

    /// Sends the pages of `set` as pass `pass`: on the main stream, or
    /// split among the multifd channels (each ends its part with the pass
    /// marker). A channel that fails shuts the others, so none is left
    /// blocked on a destination that stopped reading.
    pub(super) fn send_pass(
        &mut self,
        w: &mut Writer<'a>,
        set: &DirtyPages,
        pass: u64,
        cancellable: bool,
    ) -> Result<ram::SentPages, MigrateError> {
        let memory = &self.parts().memory;
        let job = self.job;
        let cancelled = move || cancellable && job.cancelled();
        let queue = ram::ChunkQueue::new(set);
        if let Some(image) = &self.image {
            // Two writers (the cores of this project's machine): each
            // page is read, checked and copied by one of them.
            let bandwidth = &self.bandwidth;
            let parts: Vec<Result<ram::SentPages, MigrateError>> = std::thread::scope(|s| {
                let writers: Vec<_> = (0..IMAGE_WRITERS)
                    .map(|_| {
                        let (queue, cancelled) = (&queue, &cancelled);
                        s.spawn(move || {
                            let mut out = crate::migrate::snapshot::ImagePages::new(
                                image,
                                pass == 1,
                                bandwidth.clone(),
                            );
                            let sent = ram::send_pages(
                                &mut out,
                                memory,
                                queue,
                                cancelled,
                                Pagemap::open(),
                            )?;
                            out.finish()?;
                            Ok(sent)
                        })
                    })
                    .collect();
                writers
                    .into_iter()
                    .map(|h| h.join().unwrap_or(Err(MigrateError::Cancelled)))
                    .collect()
            });
            let mut sent = ram::SentPages::default();
            for part in parts {
                sent += part?;
            }
            let bytes = sent.data * PAGE_SIZE as u64;
            self.other_bytes += bytes;
            job.add_wire_bytes(bytes);
            w.write_pass_end(pass as u32, sent.zero + sent.data)?;
            return Ok(sent);
        }
        if self.channels.is_empty() {
            let mut ram = w.ram();
            let sent = ram::send_pages(&mut ram, memory, &queue, &cancelled, Pagemap::open())?;
            ram.finish()?;
            w.write_pass_end(pass as u32, sent.zero + sent.data)?;
            return Ok(sent);
        }
        let results: Vec<Result<ram::SentPages, MigrateError>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .channels
                .iter_mut()
                .map(|cw| {
                    let (queue, cancelled) = (&queue, &cancelled);
                    s.spawn(move || {
                        let part = (|| {
                            let pagemap = Pagemap::open();
                            crate::seccomp::install_channel()?;
                            let mut ram = cw.ram();
                            let sent =
                                ram::send_pages(&mut ram, memory, queue, cancelled, pagemap)?;
                            ram.finish()?;
                            cw.write_pass_end(pass as u32, sent.zero + sent.data)?;
                            cw.flush()?;
                            Ok(sent)
                        })();
                        if part.is_err() {
                            job.shut_channels();
                        }
                        part
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(Err(MigrateError::Cancelled)))
                .collect()
        });
        let mut sent = ram::SentPages::default();
        for (index, r) in results.into_iter().enumerate() {
            match r {
                Ok(part) => sent += part,
                Err(e) if job.cancelled() => return Err(e),
                Err(e) => {
                    return Err(MigrateError::ChannelFailed {
                        index,
                        source: Box::new(e),
                    })
                }
            }
        }
        Ok(sent)
    }

    /// Waits for the destination to say it has every page of `pass`.
    pub(super) fn await_pass(&self, w: &mut Writer<'a>, pass: u64) -> Result<(), MigrateError> {
        loop {
            match read_answer(w.inner_mut()).map_err(MigrateError::NoAck)? {
                Answer::PassDone(p) if u64::from(p) == pass => return Ok(()),
                // An earlier pass's, late: the wait is for this one.
                Answer::PassDone(p) if u64::from(p) < pass => {}
                Answer::Nak(reason) => return Err(MigrateError::Refused(reason)),
                _ => {
                    return Err(MigrateError::OutOfTurn {
                        got: "GO or ACK",
                        when: "during the RAM passes",
                    })
                }
            }
        }
    }
}
