//! The source side: a thread that streams the VM to a URI while the VMM
//! thread keeps serving the guest, QMP and the devices.
//!
//! Live migration: dirty logging on, a full pass, then dirty passes until
//! what remains fits the downtime limit at the bandwidth just measured;
//! then the VM stops (finish-migrate), the last pass and the vCPU and
//! device state go out, and the destination's acknowledgement moves the
//! source to postmigrate. A guest that keeps dirtying more than half of
//! what a pass sends is slowed down (auto-converge, throttle.rs) until
//! its passes shrink; after `x-max-passes` passes without converging the
//! migration fails with the rates that prevented it, and the guest runs
//! on at full speed.
//! To `file:` (a snapshot) a running guest is saved the same way, live,
//! and runs on afterwards; a paused one is saved in one pass. Any
//! failure, anywhere, returns the guest to the state it had.

use std::sync::Arc;
use std::time::{Duration, Instant};

use migration::{Channel, MigrationUri, SectionKind, StreamWriter, PAGE_SIZE};
use serde_json::json;

use super::ack::{read_answer, Answer};
use super::job::{MigrationJob, MigrationParameters, MigrationStatus};
use super::ram::{self, DirtyPages, RamError};
use super::throttle::{CpuThrottle, ThrottlePlanner};
use super::*;
use crate::builder::VmParts;
use crate::control::{ControlError, VmControl};
use crate::runstate::RunState;
use crate::state::{saveable_msrs, StateError, VcpuState, VmState};

/// How long the source waits for a stuck peer before failing.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the destination may take to load the last state and answer.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// A last pass expected to take this long (ms) is not worth another live
/// pass to shrink it.
const SHORT_LAST_PASS_MS: f64 = 1.0;
/// How long a parked vCPU may take to save its state.
const VCPU_SAVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{0}")]
    Transport(String),
    #[error(transparent)]
    Stream(#[from] migration::StreamError),
    #[error(transparent)]
    Ram(#[from] RamError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("vCPU {0} did not save its state in time")]
    VcpuSave(u8),
    #[error("destination refused: {0}")]
    Refused(String),
    #[error("no acknowledgement from the destination: {0}")]
    NoAck(std::io::Error),
    #[error("did not converge after {passes} passes: the guest dirties at least {dirty_mbps:.0} MB/s, the link carries {link_mbps:.0} MB/s{}", throttle_note(*throttle))]
    NotConverging {
        passes: u64,
        dirty_mbps: f64,
        link_mbps: f64,
        /// The auto-converge throttle reached (percent; 0: none).
        throttle: u64,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("backend-transfer hands over file descriptors, which only a unix: migration can carry (not {0}:)")]
    BackendTransferNeedsUnix(&'static str),
}

fn throttle_note(percent: u64) -> String {
    if percent == 0 {
        " (auto-converge off or never triggered)".into()
    } else {
        format!(" even with the vCPUs throttled by {percent}%")
    }
}

fn mbytes_per_sec(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-6) / 1e6
}

/// Streams the VM to `uri` on a thread of its own.
pub fn spawn(
    control: VmControl,
    uri: MigrationUri,
    params: MigrationParameters,
    job: Arc<MigrationJob>,
) {
    let name = "ferry-migrate".to_string();
    let spawned = std::thread::Builder::new()
        .name(name)
        .spawn(move || run(control, uri, params, job));
    if let Err(e) = spawned {
        log::error!("cannot start the migration thread: {e}");
    }
}

fn emit(control: &VmControl, status: MigrationStatus) {
    control
        .emitter
        .emit("MIGRATION", Some(json!({ "status": status.name() })));
}

fn run(control: VmControl, uri: MigrationUri, params: MigrationParameters, job: Arc<MigrationJob>) {
    let before = control.state();
    emit(&control, MigrationStatus::Setup);
    let mut outcome = Outgoing {
        control: &control,
        job: &job,
        params: &params,
        stopped_at: None,
        acked_at: None,
        phases: Phases::default(),
        logging: false,
    };
    let result = outcome.migrate(&uri, before);
    let logging = outcome.logging;
    let dirty_logging_off = || {
        if let Err(e) = ram::set_dirty_logging(&control.parts, false) {
            log::warn!("migration: {e}");
        }
    };
    if result.is_err() && logging {
        dirty_logging_off();
    }
    let stopped_at = outcome.stopped_at;
    let status = match result {
        Ok(()) => {
            let next = match (&uri, before) {
                (MigrationUri::File(_), RunState::Running) => control.start().map(|_| ()),
                (MigrationUri::File(_), _) => control.set_state(before).map(|_| ()),
                _ => control.set_state(RunState::Postmigrate).map(|_| ()),
            };
            if let Err(e) = next {
                log::error!("migration completed but the VM could not move on: {e}");
            }
            // Downtime: from the stop to the moment the destination said
            // it runs the guest (a socket), or to the guest's return here
            // (a snapshot).
            let resumed = outcome.acked_at.unwrap_or_else(Instant::now);
            let downtime = stopped_at.map(|t| resumed.saturating_duration_since(t));
            log::info!(
                "migration to {uri}: guest stopped {:.2} ms: {}",
                downtime.unwrap_or_default().as_secs_f64() * 1e3,
                outcome.phases.summary()
            );
            let downtime = downtime.map(|d| d.as_millis() as u64);
            job.update(|i| {
                i.status = MigrationStatus::Completed;
                i.total_time_ms = Some(i.started.elapsed().as_millis() as u64);
                i.downtime_ms = downtime.or(Some(0));
                i.ram.remaining = 0;
            });
            MigrationStatus::Completed
        }
        Err(e) => {
            log::warn!("migration to {uri} failed: {e}");
            // Back to the state the guest had, unharmed.
            if stopped_at.is_some() {
                let back = if before == RunState::Running {
                    control.start().map(|_| ())
                } else {
                    control.set_state(before).map(|_| ())
                };
                if let Err(e) = back {
                    log::error!("migration failed and the VM could not return to {before}: {e}");
                }
            }
            let status = if matches!(e, MigrateError::Cancelled) || job.cancelled() {
                MigrationStatus::Cancelled
            } else {
                MigrationStatus::Failed
            };
            job.update(|i| {
                i.status = status;
                i.total_time_ms = Some(i.started.elapsed().as_millis() as u64);
                if status == MigrationStatus::Failed {
                    i.error = Some(e.to_string());
                }
            });
            status
        }
    };
    job.forget_channel();
    emit(&control, status);
    if status == MigrationStatus::Completed && logging {
        // The guest runs on the destination: not part of the migration's
        // times any more (re-registering big memory slots takes a while).
        dirty_logging_off();
    }
}

struct Outgoing<'a> {
    control: &'a VmControl,
    job: &'a MigrationJob,
    params: &'a MigrationParameters,
    /// When the guest was stopped for the end of the migration: when the
    /// stop was asked for, as the guest stops executing while its vCPUs
    /// are being parked.
    stopped_at: Option<Instant>,
    /// When the destination acknowledged: it runs the guest from then.
    acked_at: Option<Instant>,
    /// The steps of the stop-and-copy phase, for the log.
    phases: Phases,
    /// Dirty logging was turned on (a live migration or snapshot): it
    /// goes off again however the migration ends.
    logging: bool,
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

impl Outgoing<'_> {
    fn check_cancel(&self) -> Result<(), MigrateError> {
        if self.job.cancelled() {
            Err(MigrateError::Cancelled)
        } else {
            Ok(())
        }
    }

    fn stop_guest(&mut self) -> Result<(), MigrateError> {
        let asked = Instant::now();
        self.control.stop_into(RunState::FinishMigrate)?;
        self.stopped_at = Some(asked);
        self.phases.start(asked);
        self.phases.mark("stop");
        Ok(())
    }

    fn migrate(&mut self, uri: &MigrationUri, before: RunState) -> Result<(), MigrateError> {
        let parts = self.control.parts.clone();
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
        let channel =
            migration::connect(uri).map_err(|e| MigrateError::Transport(e.to_string()))?;
        let to_file = matches!(uri, MigrationUri::File(_));
        if !to_file {
            channel
                .set_timeouts(Some(IO_TIMEOUT), Some(IO_TIMEOUT))
                .map_err(|e| MigrateError::Transport(e.to_string()))?;
        }
        self.job.set_channel(channel.try_clone_box().ok());
        let channel = Counted {
            inner: channel,
            job: self.job,
        };
        let mut w = StreamWriter::new(channel)?;
        if self.params.max_bandwidth > 0 {
            w.set_max_bandwidth(Some(self.params.max_bandwidth));
        }
        let config = MigrationConfig {
            machine: parts.machine.clone(),
            nets: parts.nets_desc.clone(),
            announce: self.params.announce(),
            backend: handover,
        };
        w.write_json(SectionKind::Config, CONFIG_SECTION, CONFIG_VERSION, &config)?;
        if !to_file {
            // The destination checks the configuration and builds the
            // machine before any RAM travels; a refusal comes back here.
            w.flush()?;
            if handover.is_some() {
                self.hand_over(&mut w.inner_mut().inner, &parts)?;
            }
            match read_answer(w.inner_mut()).map_err(MigrateError::NoAck)? {
                Answer::Go => {}
                Answer::Nak(reason) => return Err(MigrateError::Refused(reason)),
                Answer::Ack => {
                    return Err(MigrateError::Transport(
                        "destination acknowledged before the stream ended".into(),
                    ))
                }
            }
        }
        let total_pages = DirtyPages::all(&parts.memory).count();
        let setup_ms = self.job.elapsed_ms();
        self.job.update(|i| {
            i.status = MigrationStatus::Active;
            i.setup_time_ms = setup_ms;
            i.ram.total = total_pages * PAGE_SIZE as u64;
            i.ram.remaining = i.ram.total;
        });
        emit(self.control, MigrationStatus::Active);
        self.check_cancel()?;

        let cancelled = || self.job.cancelled();
        if handover.is_some_and(|h| h.memfd) {
            // The destination maps the same pages: nothing to copy. Stop
            // the guest and send only its state.
            self.stop_guest()?;
        } else if !before.is_running() {
            // Nothing changes memory while stopped: one pass is the image.
            // (A running guest is saved live, to a file too, like QEMU's
            // migration to a file: it is stopped only for the last pass.)
            self.stop_guest()?;
            let mut ram = w.ram();
            let sent = ram::send_pages(
                &mut ram,
                &parts.memory,
                &DirtyPages::all(&parts.memory),
                &cancelled,
            )?;
            ram.finish()?;
            w.write_pass_end(1, sent.zero + sent.data)?;
            self.account(&w, sent, 0, 1);
            self.phases.mark("ram");
        } else {
            self.logging = true;
            ram::set_dirty_logging(&parts, true)?;
            // Start from a clean log: what was dirtied before is sent now.
            ram::take_dirty(&parts)?;
            let mut set = DirtyPages::all(&parts.memory);
            let mut pass = 1u64;
            let mut planner = ThrottlePlanner::new(self.params.throttle());
            // Dropped when this function returns, however it returns: the
            // guest runs at full speed again.
            let mut throttle: Option<CpuThrottle> = None;
            loop {
                let start = Instant::now();
                let bytes_before = w.bytes_written();
                let mut ram = w.ram();
                let sent = ram::send_pages(&mut ram, &parts.memory, &set, &cancelled)?;
                ram.finish()?;
                w.write_pass_end(pass as u32, sent.zero + sent.data)?;
                // On the wire now, not in the channel's buffer: what the
                // destination has by the stop, it need not take in while
                // the guest is down.
                w.flush()?;
                let took = start.elapsed();
                let pass_bytes = w.bytes_written() - bytes_before;
                let link = mbytes_per_sec(pass_bytes, took);
                set = ram::take_dirty(&parts)?;
                let dirty = set.count();
                let dirty_rate = mbytes_per_sec(dirty * PAGE_SIZE as u64, took);
                let expected_ms = (dirty * PAGE_SIZE as u64) as f64 / (link.max(1.0) * 1e3);
                self.account(&w, sent, dirty, pass);
                self.job.update(|i| {
                    i.expected_downtime_ms = expected_ms as u64;
                    i.ram.mbps = link * 8.0;
                    i.ram.dirty_pages_rate = (dirty as f64 / took.as_secs_f64().max(1e-6)) as u64;
                });
                self.check_cancel()?;
                // Under the limit, one more pass is still worth it while
                // passes halve what is left (the guest dirties far slower
                // than the link carries): what is left is what the stopped
                // guest waits for. With auto-converge, a guest that keeps
                // more than half dirty is throttled one step harder
                // instead, until the last pass is short: the network
                // notices milliseconds, not the limit.
                let under = expected_ms <= self.params.downtime_limit_ms as f64;
                let halving = dirty * 2 <= sent.zero + sent.data;
                let squeeze = under && !halving && self.params.auto_converge && planner.can_raise();
                if under
                    && (expected_ms <= SHORT_LAST_PASS_MS
                        || (!halving && !squeeze)
                        || pass >= self.params.max_passes)
                {
                    break;
                }
                if pass >= self.params.max_passes {
                    return Err(MigrateError::NotConverging {
                        passes: pass,
                        dirty_mbps: dirty_rate,
                        link_mbps: link,
                        throttle: planner.percent(),
                    });
                }
                if self.params.auto_converge {
                    let raised = if squeeze {
                        planner.raise()
                    } else {
                        planner.after_pass(pass_bytes, dirty * PAGE_SIZE as u64)
                    };
                    if let Some(pct) = raised {
                        log::info!("migration: pass {pass} left {dirty} pages dirty: vCPUs throttled by {pct}%");
                        match &throttle {
                            Some(t) => t.set(pct),
                            None => {
                                throttle =
                                    Some(CpuThrottle::start(&parts.vcpus, pct).map_err(|e| {
                                        MigrateError::Transport(format!(
                                            "start the CPU throttle: {e}"
                                        ))
                                    })?)
                            }
                        }
                        self.job.update(|i| i.cpu_throttle_percentage = pct);
                    }
                }
                pass += 1;
            }
            self.stop_guest()?;
            drop(throttle);
            let last = ram::take_dirty(&parts)?;
            let set = merge(set, last);
            self.phases.mark("dirty log");
            let mut ram = w.ram();
            let sent = ram::send_pages(&mut ram, &parts.memory, &set, &|| false)?;
            ram.finish()?;
            w.write_pass_end((pass + 1) as u32, sent.zero + sent.data)?;
            self.account(&w, sent, 0, pass + 1);
            self.phases.mark("last pass");
        }

        // The VM is stopped: its state is final.
        w.write_json(
            SectionKind::VmState,
            VM_SECTION,
            VM_VERSION,
            &VmState::save(&parts.vm_fd)?,
        )?;
        self.phases.mark("vm state");
        for (id, vcpu) in parts.vcpus.iter().enumerate() {
            let id = id as u8;
            let p = parts.clone();
            let state = vcpu
                .run_on_vcpu(VCPU_SAVE_TIMEOUT, move |fd| {
                    let msrs = saveable_msrs(&p.kvm, fd)?;
                    VcpuState::save(id, fd, &msrs)
                })
                .ok_or(MigrateError::VcpuSave(id))??;
            w.write_json(SectionKind::Vcpu, &vcpu_section(id), VCPU_VERSION, &state)?;
        }
        self.phases.mark("vcpus");
        let serial = devices::bus::lock(&parts.serial).snapshot();
        w.write_json(SectionKind::Device, SERIAL_SECTION, SERIAL_VERSION, &serial)?;
        let ged = devices::bus::lock(&parts.ged).save();
        w.write_json(SectionKind::Device, GED_SECTION, GED_VERSION, &ged)?;
        for (net, desc) in parts.nets.iter().zip(&parts.nets_desc) {
            let snapshot = devices::bus::lock(net).save_net();
            let version = devices::virtio::net::persist::SECTION_VERSION;
            w.write_json(
                SectionKind::Device,
                &net_section(&desc.id),
                version,
                &snapshot,
            )?;
        }
        self.phases.mark("devices");
        let transferred = w.bytes_written();
        let mut channel = w.finish()?.inner;
        self.phases.mark("end+flush");
        self.job.update(|i| i.ram.transferred = transferred);
        if !to_file {
            channel
                .set_timeouts(Some(ACK_TIMEOUT), Some(IO_TIMEOUT))
                .map_err(|e| MigrateError::Transport(e.to_string()))?;
            match read_answer(&mut channel).map_err(MigrateError::NoAck)? {
                Answer::Ack => {}
                Answer::Nak(reason) => return Err(MigrateError::Refused(reason)),
                Answer::Go => {
                    return Err(MigrateError::Transport(
                        "destination answered GO twice".into(),
                    ))
                }
            }
            self.acked_at = Some(Instant::now());
            self.phases.mark("ack");
        }
        Ok(())
    }

    /// Sends the TAP descriptors (and the memfd) as one descriptor message.
    /// The source keeps its own: if the migration fails it goes on with
    /// them; once the destination acknowledges, the source, stopped in
    /// postmigrate, never touches them again.
    fn hand_over(
        &self,
        channel: &mut Box<dyn Channel>,
        parts: &VmParts,
    ) -> Result<(), MigrateError> {
        use std::os::fd::AsRawFd;
        let mut fds = Vec::new();
        for net in &parts.nets {
            fds.push(devices::bus::lock(net).device().tap().as_raw_fd());
        }
        if let Some(memfd) = &parts.memfd {
            fds.push(memfd.as_raw_fd());
        }
        channel.send_fds(&fds, b"ferry backends").map_err(|e| {
            MigrateError::Transport(format!("handing over the TAPs and memory: {e}"))
        })?;
        log::info!("local migration: handed over {} descriptors", fds.len());
        Ok(())
    }

    fn account<W: std::io::Write>(
        &self,
        w: &StreamWriter<W>,
        sent: ram::SentPages,
        remaining: u64,
        pass: u64,
    ) {
        let transferred = w.bytes_written();
        self.job.update(|i| {
            i.ram.transferred = transferred;
            i.ram.duplicate += sent.zero;
            i.ram.normal += sent.data;
            i.ram.remaining = remaining * PAGE_SIZE as u64;
            i.ram.dirty_sync_count = pass;
        });
    }
}

/// The connection, counting what is written for `query-migrate`.
struct Counted<'a> {
    inner: Box<dyn Channel>,
    job: &'a MigrationJob,
}

impl std::io::Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.job.add_wire_bytes(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl std::io::Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

/// Pages still to send: the last pass's leftovers plus what was dirtied
/// while the guest was being stopped.
fn merge(mut a: DirtyPages, b: DirtyPages) -> DirtyPages {
    for (ra, rb) in a.regions.iter_mut().zip(b.regions) {
        for (wa, wb) in ra.iter_mut().zip(rb) {
            *wa |= wb;
        }
    }
    a
}

/// For `migrate_cancel`: unblocks a thread stuck writing to the peer.
pub fn abort(channel: &dyn Channel) {
    let _ = channel.shutdown();
}
