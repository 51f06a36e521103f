//! How a migration ends on the source: the guest moves on (postmigrate,
//! or back to what it was after a snapshot) or back, and the job and the
//! timeline get their last figures.

use super::*;

impl Outgoing<'_> {
    /// After success: the source moves on (postmigrate; a snapshot's guest
    /// back to what it was) and the job reports its figures.
    pub(super) fn completed(&self, uri: &MigrationUri) -> MigrationStatus {
        let before = self.state_at_stop;
        let next = match (uri, before) {
            (MigrationUri::File(_), RunState::Running) => self.control.start(),
            (MigrationUri::File(_), _) => self.control.set_state(before).map(|_| ()),
            _ => self.control.set_state(RunState::Postmigrate).map(|_| ()),
        };
        if let Err(e) = next {
            log::error!("migration completed but the VM could not move on: {e}");
        }
        // Downtime: from the stop to the moment the destination said it
        // runs the guest (a socket), or to the guest's return here (a
        // snapshot).
        let resumed = self.acked_at.unwrap_or_else(Instant::now);
        let downtime = self
            .stopped_at
            .map(|t| resumed.saturating_duration_since(t));
        log::info!(
            "migration to {uri}: guest stopped {:.2} ms: {}",
            downtime.unwrap_or_default().as_secs_f64() * 1e3,
            self.phases.summary()
        );
        let resume_ms = self.job.ms_at(resumed);
        let total_ms = self.job.now_ms();
        self.job.record(|t| {
            t.resume_ms = self.stopped_at.map(|_| resume_ms);
            t.downtime_ms = downtime.map(|d| d.as_secs_f64() * 1e3);
            t.total_ms = Some(total_ms);
            t.phases = self
                .phases
                .steps
                .iter()
                .map(|(name, d)| timeline::Phase {
                    name: (*name).into(),
                    ms: d.as_secs_f64() * 1e3,
                })
                .collect();
            t.status = MigrationStatus::Completed.name().into();
        });
        let downtime = downtime.map(|d| d.as_millis() as u64);
        self.job.update(|i| {
            i.total_time_ms = Some(i.started.elapsed().as_millis() as u64);
            i.downtime_ms = downtime.or(Some(0));
            i.ram.remaining = 0;
        });
        MigrationStatus::Completed
    }

    /// After a failure: the guest back to the state it had, unharmed.
    pub(super) fn failed(&mut self, uri: &MigrationUri, e: MigrateError) -> MigrationStatus {
        let before = self.state_at_stop;
        log::warn!("migration to {uri} failed: {e}");
        if self.logging {
            self.dirty_logging_off();
        }
        self.give_back_frames();
        if self.stopped_at.is_some() {
            let back = if before == RunState::Running {
                self.control.start()
            } else {
                self.control.set_state(before).map(|_| ())
            };
            if let Err(e) = back {
                log::error!("migration failed and the VM could not return to {before}: {e}");
            }
        }
        let status = if matches!(e, MigrateError::Cancelled) || self.job.cancelled() {
            MigrationStatus::Cancelled
        } else {
            MigrationStatus::Failed
        };
        let total_ms = self.job.now_ms();
        self.job.record(|t| {
            t.total_ms = Some(total_ms);
            t.status = status.name().into();
        });
        self.job.update(|i| {
            i.total_time_ms = Some(i.started.elapsed().as_millis() as u64);
            if status == MigrationStatus::Failed {
                i.error = Some(e.to_string());
            }
        });
        status
    }
}
