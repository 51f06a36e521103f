//! The source side: a thread that streams the VM to a URI while the VMM
//! thread keeps serving the guest, QMP and the devices.
//!
//! A migration is four phases, each a method below:
//! 1. [`Outgoing::handshake`]: connect, send the configuration (and, for a
//!    local hand-over, the TAP and memory descriptors) and wait for the
//!    destination's GO — a refusal arrives before any RAM is sent.
//! 2. [`Outgoing::live_passes`]: dirty logging on, a full pass, then
//!    dirty passes until [`converge::next`] says stop (auto-converge
//!    throttles a guest that dirties faster than the link carries).
//! 3. [`Outgoing::stop_and_save`]: the guest stops (finish-migrate), the
//!    last pass, the VM, vCPU and device state and the end go out.
//! 4. [`Outgoing::await_ack`]: the destination's acknowledgement moves the
//!    source to postmigrate.
//!
//! To `file:` (a snapshot) a running guest is saved the same way, live,
//! and runs on afterwards; a paused one is saved in one pass. Any
//! failure, anywhere, returns the guest to the state it had.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ack::{read_answer, Answer};
use super::converge::{self, ConvergePolicy, Next, PassStats};
use super::job::{MigrationJob, MigrationStatus};
use super::params::MigrationParameters;
use super::ram::{self, DirtyPages};
use super::throttle::{CpuThrottle, ThrottlePlanner};
use super::*;
use crate::builder::VmParts;
use crate::control::VmControl;
use crate::runstate::RunState;
use crate::state::{saveable_msrs, VcpuState, VmState};
use migration::snapshot::{self, ImageLayout, SnapshotFile};
use migration::tls::ClientTls;
use migration::{Bandwidth, Channel, MigrationUri, SectionKind, StreamWriter, PAGE_SIZE};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

pub use super::error::MigrateError;

mod channels;
mod ending;
mod frames;
mod state;

use state::{collect_report, hand_over, save_state, Counted};

/// How long the source waits for a stuck peer before failing.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the destination may take to load the last state and answer.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a parked vCPU may take to save its state.
const VCPU_SAVE_TIMEOUT: Duration = Duration::from_secs(5);

fn mbytes_per_sec(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-6) / 1e6
}

/// Streams the VM to `uri` on a thread of its own. An error: the thread
/// could not be started (nothing was done).
pub fn spawn(
    control: VmControl,
    uri: MigrationUri,
    params: MigrationParameters,
    tls: Result<Option<ClientTls>, String>,
    job: Arc<MigrationJob>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ferry-migrate".to_string())
        .spawn(move || run(control, uri, params, tls, job))
        .map(|_| ())
}

fn run(
    control: VmControl,
    uri: MigrationUri,
    params: MigrationParameters,
    tls: Result<Option<ClientTls>, String>,
    job: Arc<MigrationJob>,
) {
    let before = control.state();
    job.record(|t| {
        t.uri = uri.to_string();
        t.channels = params.ram_channels();
    });
    job.emit(MigrationStatus::Setup);
    let mut out = Outgoing {
        control: &control,
        job: &job,
        params: &params,
        stopped_at: None,
        state_at_stop: before,
        acked_at: None,
        phases: Phases::default(),
        logging: false,
        to_file: matches!(uri, MigrationUri::File(_)),
        channels: Vec::new(),
        other_bytes: 0,
        image: None,
        bandwidth: None,
        after_ack: None,
        tls: None,
        forwarding: false,
        captures: Vec::new(),
    };
    let result = match tls {
        Ok(tls) => {
            out.tls = tls;
            out.migrate(&uri, before)
        }
        Err(e) => Err(MigrateError::TlsSetup(e)),
    };
    let status = match result {
        Ok(()) => out.completed(&uri),
        Err(e) => out.failed(&uri, e),
    };
    job.forget_channels();
    job.set_status(status);
    let mut after_ack = out.after_ack.take().filter(|_| !out.to_file);
    if let Some(w) = after_ack
        .as_mut()
        .filter(|_| status == MigrationStatus::Completed)
    {
        // First: the destination holds its TAPs' frames until this ends.
        out.forward_frames(&mut w.inner_mut().inner);
    }
    if status == MigrationStatus::Completed && out.logging {
        // The guest runs on the destination: not part of the migration's
        // times any more (re-registering big memory slots takes a while).
        out.dirty_logging_off();
    }
    if let Some(mut w) = after_ack {
        collect_report(&job, &mut *w.inner_mut().inner);
    }
    job.record(|t| t.complete = true);
}

struct Outgoing<'a> {
    control: &'a VmControl,
    job: &'a MigrationJob,
    params: &'a MigrationParameters,
    /// When the guest was stopped for the end of the migration: when the
    /// stop was asked for, as the guest stops executing while its vCPUs
    /// are being parked.
    stopped_at: Option<Instant>,
    /// The run state the guest was stopped from (running, or paused by
    /// the user): the stream carries it, and a failure returns to it.
    state_at_stop: RunState,
    /// When the destination acknowledged: it runs the guest from then.
    acked_at: Option<Instant>,
    /// The steps of the stop-and-copy phase, for the log.
    phases: Phases,
    /// Dirty logging was turned on (a live migration or snapshot): it
    /// goes off again however the migration ends.
    logging: bool,
    /// A snapshot: nobody answers.
    to_file: bool,
    /// multifd: the streams RAM goes on (empty: on the main one).
    channels: Vec<Writer<'a>>,
    /// Bytes of the channels already ended, and of pages written to a
    /// snapshot's RAM image.
    other_bytes: u64,
    /// A snapshot in the file form: its RAM image takes the pages.
    image: Option<SnapshotFile>,
    /// `max-bandwidth` for everything the migration writes.
    bandwidth: Option<Bandwidth>,
    /// The main stream after the ACK: the destination's report comes on
    /// its connection. (Kept, with the channels' writers, until the
    /// migration's end: freeing their buffers is no work for the stopped
    /// guest to wait for.)
    after_ack: Option<Writer<'a>>,
    /// `tls-creds`: every connection of the migration is TLS.
    tls: Option<ClientTls>,
    /// The destination takes the frames the TAPs get while the guest is
    /// stopped (see frames.rs); the NICs' captures, from the stop.
    forwarding: bool,
    captures: Vec<Arc<devices::virtio::net::forward::Capture>>,
}

/// How long each step of the stop-and-copy phase took.
#[derive(Default)]
struct Phases {
    last: Option<Instant>,
    steps: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn start(&mut self, at: Instant) {
        self.last = Some(at);
    }

    /// Ends the step `name` now (nothing before [`Self::start`]).
    fn mark(&mut self, name: &'static str) {
        if let Some(last) = self.last {
            let now = Instant::now();
            self.steps.push((name, now - last));
            self.last = Some(now);
        }
    }

    fn summary(&self) -> String {
        self.steps
            .iter()
            .map(|(name, d)| format!("{name} {:.2} ms", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The stream as the source writes it: to the connection, counted.
type Writer<'a> = StreamWriter<Counted<'a>>;

impl<'a> Outgoing<'a> {
    fn parts(&self) -> &'a VmParts {
        &self.control.parts
    }

    fn check_cancel(&self) -> Result<(), MigrateError> {
        if self.job.cancelled() {
            Err(MigrateError::Cancelled)
        } else {
            Ok(())
        }
    }

    fn migrate(&mut self, uri: &MigrationUri, before: RunState) -> Result<(), MigrateError> {
        let (mut w, handover) = self.handshake(uri)?;
        let total_pages = DirtyPages::all(&self.parts().memory).count();
        let setup_ms = self.job.elapsed_ms();
        self.job.update(|i| {
            i.setup_time_ms = setup_ms;
            i.ram.total = total_pages * PAGE_SIZE as u64;
            i.ram.remaining = i.ram.total;
        });
        // QEMU's order: the first pass is announced before `active`.
        self.job.emit_pass(1);
        self.job.set_status(MigrationStatus::Active);
        self.check_cancel()?;

        if handover.is_some_and(|h| h.memfd) {
            // The destination maps the same pages: nothing to copy. Stop
            // the guest and send only its state.
            self.stop_guest()?;
            self.stop_and_save(w, None, 0)?;
        } else if !before.is_running() {
            // Nothing changes memory while stopped: one pass is the image.
            // (A running guest is saved live, to a file too, like QEMU's
            // migration to a file: it is stopped only for the last pass.)
            self.stop_guest()?;
            let all = DirtyPages::all(&self.parts().memory);
            self.stop_and_save(w, Some(all), 0)?;
        } else {
            let (left, passes) = self.live_passes(&mut w)?;
            self.stop_and_save(w, Some(left), passes)?;
        }
        Ok(())
    }

    /// Phase 1: the connection, the config section, the descriptors of a
    /// local hand-over, and the destination's GO (not for a file).
    fn handshake(
        &mut self,
        uri: &MigrationUri,
    ) -> Result<(Writer<'a>, Option<BackendHandover>), MigrateError> {
        let parts = self.parts();
        // Checked before anything is sent: only a unix: socket carries
        // descriptors.
        let handover = if self.params.backend_transfer {
            if !uri.can_pass_fds() {
                return Err(MigrateError::BackendTransferNeedsUnix(uri.scheme()));
            }
            Some(BackendHandover {
                taps: parts.nets.len(),
                memfd: parts.memfd.is_some(),
            })
        } else {
            None
        };
        let ram_channels = self.params.ram_channels();
        if ram_channels > 0 && self.to_file {
            return Err(MigrateError::MultifdNeedsSocket(uri.scheme()));
        }
        let session = super::multifd::new_session();
        let channel = match uri {
            MigrationUri::File(path)
                if self.params.mapped_ram && handover.is_none() && snapshot::mappable(path) =>
            {
                let regions: Vec<(u64, u64)> = parts
                    .memory
                    .iter()
                    .map(|r| (r.start_addr().0, r.len()))
                    .collect();
                let (file, channel) =
                    SnapshotFile::create(path, ImageLayout::for_regions(&regions))?;
                self.image = Some(file);
                channel
            }
            _ => migration::connect(uri).map_err(MigrateError::Connect)?,
        };
        let channel = self.secure(channel, uri)?;
        if !self.to_file {
            channel
                .set_timeouts(Some(IO_TIMEOUT), Some(IO_TIMEOUT))
                .map_err(|source| MigrateError::Channel {
                    what: "set the connection's timeouts",
                    source,
                })?;
        }
        self.job.add_channel(channel.try_clone_box().ok());
        let channel = Counted {
            inner: channel,
            job: self.job,
        };
        let mut w = StreamWriter::new(channel)?;
        // One limit for the whole migration, over all its channels.
        let bandwidth =
            (self.params.max_bandwidth > 0).then(|| Bandwidth::new(self.params.max_bandwidth));
        w.set_bandwidth(bandwidth.clone());
        self.bandwidth = bandwidth.clone();
        self.forwarding = self.forwards_frames(handover.is_some());
        let config = MigrationConfig {
            machine: parts.machine.clone(),
            nets: parts.nets_desc.clone(),
            announce: self.params.announce(),
            backend: handover,
            ram_channels,
            session,
            pass_acks: !self.to_file,
            report: !self.to_file,
            forward_frames_ms: self.forwarding.then_some(self.params.forward_max_ms),
        };
        w.write_json(SectionKind::Config, CONFIG_SECTION, CONFIG_VERSION, &config)?;
        if !self.to_file {
            // The destination checks the configuration and builds the
            // machine before any RAM travels; a refusal comes back here.
            w.flush()?;
            if handover.is_some() {
                hand_over(&mut w.inner_mut().inner, parts)?;
            }
            match read_answer(w.inner_mut()).map_err(MigrateError::NoAck)? {
                Answer::Go => {}
                Answer::Nak(reason) => return Err(MigrateError::Refused(reason)),
                Answer::Ack | Answer::PassDone(_) | Answer::Report(_) => {
                    return Err(MigrateError::OutOfTurn {
                        got: "ACK",
                        when: "before the stream ended",
                    })
                }
            }
        }
        if ram_channels > 0 {
            self.open_channels(uri, session, ram_channels, bandwidth)?;
        }
        Ok((w, handover))
    }

    /// Phase 2: passes over guest memory while the guest runs, until what
    /// is left is worth stopping for. Returns the pages still to send and
    /// the passes made.
    fn live_passes(&mut self, w: &mut Writer<'a>) -> Result<(DirtyPages, u64), MigrateError> {
        let parts = self.parts();
        self.logging = true;
        ram::set_dirty_logging(parts, true)?;
        // Start from a clean log: what was dirtied before is sent now.
        ram::take_dirty(parts)?;
        let mut set = DirtyPages::all(&parts.memory);
        let mut planner = ThrottlePlanner::new(self.params.throttle());
        // Dropped when this function returns, however it returns: the
        // guest runs at full speed again.
        let mut throttle: Option<CpuThrottle> = None;
        for pass in 1.. {
            if pass > 1 {
                self.job.emit_pass(pass);
            }
            let start = Instant::now();
            let bytes_before = self.bytes_written(w);
            let sent = self.send_pass(w, &set, pass, true)?;
            // On the wire now, not in the channel's buffer; and, once the
            // destination says so, in its guest memory: what it has by the
            // stop, it need not take in while the guest is down, and the
            // pass's time is that of the whole path, all channels
            // together, not of filling socket buffers.
            w.flush()?;
            if !self.to_file {
                self.await_pass(w, pass)?;
            }
            let took = start.elapsed();
            let pass_bytes = self.bytes_written(w) - bytes_before;
            let link = mbytes_per_sec(pass_bytes, took);
            set = ram::take_dirty(parts)?;
            let dirty = set.count();
            let dirty_bytes = dirty * PAGE_SIZE as u64;
            let expected_ms = dirty_bytes as f64 / (link.max(1.0) * 1e3);
            self.account(w, sent, dirty, pass);
            self.record_pass(pass, start, took, pass_bytes, sent, Some(dirty));
            self.job.update(|i| {
                i.expected_downtime_ms = expected_ms as u64;
                i.ram.mbps = link * 8.0;
                i.ram.dirty_pages_rate = (dirty as f64 / took.as_secs_f64().max(1e-6)) as u64;
                i.ram.pages_per_second =
                    ((sent.zero + sent.data) as f64 / took.as_secs_f64().max(1e-6)) as u64;
            });
            self.check_cancel()?;
            let stats = PassStats {
                pass,
                sent_pages: sent.zero + sent.data,
                dirty_pages: dirty,
                expected_ms,
            };
            let policy = ConvergePolicy {
                downtime_limit_ms: self.params.downtime_limit_ms,
                max_passes: self.params.max_passes,
                can_throttle: self.params.auto_converge && planner.can_raise(),
            };
            let squeeze = match converge::next(stats, policy) {
                Next::Stop => {
                    self.stop_guest()?;
                    return Ok((set, pass));
                }
                Next::GiveUp => {
                    return Err(MigrateError::NotConverging {
                        passes: pass,
                        dirty_mbps: mbytes_per_sec(dirty_bytes, took),
                        link_mbps: link,
                        throttle: planner.percent(),
                    })
                }
                Next::Continue { squeeze } => squeeze,
            };
            if !self.params.auto_converge {
                continue;
            }
            let raised = if squeeze {
                planner.raise()
            } else {
                planner.after_pass(pass_bytes, dirty_bytes)
            };
            if let Some(pct) = raised {
                log::info!(
                    "migration: pass {pass} left {dirty} pages dirty: vCPUs throttled by {pct}%"
                );
                match &throttle {
                    Some(t) => t.set(pct),
                    None => {
                        let t = CpuThrottle::start(&parts.vcpus, pct)
                            .map_err(MigrateError::Throttle)?;
                        throttle = Some(t);
                    }
                }
                self.job.update(|i| i.cpu_throttle_percentage = pct);
                let at_ms = self.job.now_ms();
                self.job.record(|t| {
                    t.throttle.push(timeline::ThrottleStep {
                        at_ms,
                        percent: pct,
                    })
                });
            }
        }
        unreachable!("the pass counter does not run out")
    }

    /// The guest stops (finish-migrate). With `pause-before-switchover`
    /// the source then waits in `pre-switchover` for `migrate-continue`
    /// (a cancel there resumes the guest, as any failure does).
    fn stop_guest(&mut self) -> Result<(), MigrateError> {
        let asked = Instant::now();
        let from = self.control.state();
        self.control.stop_into(RunState::FinishMigrate)?;
        self.start_captures();
        self.state_at_stop = from;
        self.stopped_at = Some(asked);
        let stop_ms = self.job.ms_at(asked);
        self.job.record(|t| t.stop_ms = Some(stop_ms));
        self.phases.start(asked);
        self.phases.mark("stop");
        if self.params.pause_before_switchover {
            self.job.set_status(MigrationStatus::PreSwitchover);
            if !self.job.wait_to_continue() {
                return Err(MigrateError::Cancelled);
            }
            self.job.set_status(MigrationStatus::Device);
            self.phases.mark("pre-switchover");
        }
        Ok(())
    }

    /// Phase 3, the guest stopped: the last pages (`left`, none for a
    /// hand-over of shared memory) as pass `passes + 1`, the VM, vCPU and
    /// device state, the end; then phase 4.
    fn stop_and_save(
        &mut self,
        mut w: Writer<'a>,
        left: Option<DirtyPages>,
        passes: u64,
    ) -> Result<(), MigrateError> {
        let parts = self.parts();
        if let Some(mut set) = left {
            if self.logging {
                // What was dirtied while the guest was being stopped.
                set.merge(ram::take_dirty(parts)?);
                self.phases.mark("dirty log");
            }
            let pass = passes + 1;
            if pass > 1 {
                self.job.emit_pass(pass);
            }
            let start = Instant::now();
            let bytes_before = self.bytes_written(&w);
            let sent = self.send_pass(&mut w, &set, pass, false)?;
            self.account(&w, sent, 0, pass);
            let bytes = self.bytes_written(&w) - bytes_before;
            self.record_pass(pass, start, start.elapsed(), bytes, sent, None);
            self.phases.mark("last pass");
        }
        // The state goes on channel 0 with multifd (see multifd.rs), then
        // the channels end: the destination loads the state once every
        // channel's stream has ended.
        let (control, state_at_stop) = (self.control, self.state_at_stop);
        let phases = &mut self.phases;
        let sw = match self.channels.first_mut() {
            Some(c) => c,
            None => &mut w,
        };
        save_state(sw, control, state_at_stop, phases)?;
        for (index, cw) in self.channels.iter_mut().enumerate() {
            cw.end().map_err(|e| MigrateError::ChannelFailed {
                index,
                source: Box::new(e.into()),
            })?;
        }
        self.phases.mark("channels end");

        let transferred = self.bytes_written(&w);
        w.end()?;
        self.phases.mark("end+flush");
        self.job.update(|i| i.ram.transferred = transferred);
        self.await_ack(w)
    }

    /// Phase 4: over a socket, the destination's ACK: it runs the guest
    /// from now on. A file needs none.
    fn await_ack(&mut self, mut w: Writer<'a>) -> Result<(), MigrateError> {
        if self.to_file {
            // Complete: the snapshot replaces the file at the path.
            if let Some(image) = self.image.take() {
                image.commit()?;
            }
            self.after_ack = Some(w);
            return Ok(());
        }
        let channel = &mut w.inner_mut().inner;
        channel
            .set_timeouts(Some(ACK_TIMEOUT), Some(IO_TIMEOUT))
            .map_err(|source| MigrateError::Channel {
                what: "set the acknowledgement's timeout",
                source,
            })?;
        loop {
            match read_answer(channel).map_err(MigrateError::NoAck)? {
                Answer::Ack => break,
                // The last pass's: the ACK follows.
                Answer::PassDone(_) => {}
                Answer::Nak(reason) => return Err(MigrateError::Refused(reason)),
                Answer::Go | Answer::Report(_) => {
                    return Err(MigrateError::OutOfTurn {
                        got: "GO or a report",
                        when: "before the ACK",
                    })
                }
            }
        }
        self.acked_at = Some(Instant::now());
        self.phases.mark("ack");
        self.after_ack = Some(w);
        Ok(())
    }

    /// Puts pass `pass`, begun at `start` and `took` long, on the
    /// timeline; `dirtied`: the pages the guest dirtied meanwhile, for a
    /// live pass (None: the last one, the guest stopped).
    fn record_pass(
        &self,
        pass: u64,
        start: Instant,
        took: Duration,
        bytes: u64,
        sent: ram::SentPages,
        dirtied: Option<u64>,
    ) {
        let (start_ms, end_ms) = (self.job.ms_at(start), self.job.now_ms());
        let (dirtied_pages, dirty_mbytes_per_sec) = dirtied.map_or((0, 0.0), |d| {
            (d, mbytes_per_sec(d * PAGE_SIZE as u64, took))
        });
        self.job.record(|t| {
            t.passes.push(timeline::Pass {
                pass,
                start_ms,
                end_ms,
                bytes,
                data_pages: sent.data,
                zero_pages: sent.zero,
                mbytes_per_sec: mbytes_per_sec(bytes, took),
                dirtied_pages,
                dirty_mbytes_per_sec,
                live: dirtied.is_some(),
            })
        });
    }

    /// Bytes of every stream of the migration: the main one and the
    /// channels'.
    fn bytes_written(&self, w: &Writer<'_>) -> u64 {
        let channels: u64 = self.channels.iter().map(|c| c.bytes_written()).sum();
        w.bytes_written() + channels + self.other_bytes
    }

    fn account(&self, w: &Writer<'_>, sent: ram::SentPages, remaining: u64, pass: u64) {
        let transferred = self.bytes_written(w);
        self.job.update(|i| {
            i.ram.transferred = transferred;
            i.ram.duplicate += sent.zero;
            i.ram.normal += sent.data;
            i.ram.remaining = remaining * PAGE_SIZE as u64;
            i.ram.dirty_sync_count = pass;
        });
    }

    fn dirty_logging_off(&self) {
        if let Err(e) = ram::set_dirty_logging(self.parts(), false) {
            log::warn!("migration: {e}");
        }
    }
}

/// For `migrate_cancel`: unblocks a thread stuck writing to the peer.
pub fn abort(channel: &dyn Channel) {
    let _ = channel.shutdown();
}
