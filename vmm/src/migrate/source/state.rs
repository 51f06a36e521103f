//! What the source writes besides RAM: the VM's state at the stop, a
//! local hand-over's descriptors, the counted connection, and the
//! destination's report read after the ACK.

use super::*;

/// The VM, vCPU and device state and the global state, onto `w`.
pub(super) fn save_state(
    w: &mut Writer<'_>,
    control: &VmControl,
    state_at_stop: RunState,
    phases: &mut Phases,
) -> Result<(), MigrateError> {
    let parts = &control.parts;
    w.write_json(
        SectionKind::VmState,
        VM_SECTION,
        VM_VERSION,
        &VmState::save(&parts.vm_fd)?,
    )?;
    phases.mark("vm state");
    for (id, vcpu) in parts.vcpus.iter().enumerate() {
        let id = id as u8;
        let p = control.parts.clone();
        let state = vcpu
            .run_on_vcpu(VCPU_SAVE_TIMEOUT, move |fd| {
                VcpuState::save(id, fd, &saveable_msrs(&p.kvm, fd)?)
            })
            .ok_or(MigrateError::VcpuSave(id))??;
        w.write_json(SectionKind::Vcpu, &vcpu_section(id), VCPU_VERSION, &state)?;
    }
    phases.mark("vcpus");
    for device in &parts.devices {
        w.write_state(&*devices::bus::lock(device))?;
    }
    // QEMU's global state: a guest paused here arrives paused.
    let global = GlobalState::of(state_at_stop);
    w.write_json(
        SectionKind::VmState,
        GLOBAL_SECTION,
        GLOBAL_VERSION,
        &global,
    )?;
    phases.mark("devices");
    Ok(())
}

/// Sends the TAP descriptors (and the memfd) as one descriptor message.
/// The source keeps its own: if the migration fails it goes on with them;
/// once the destination acknowledges, the source, stopped in postmigrate,
/// never touches them again.
pub(super) fn hand_over(
    channel: &mut Box<dyn Channel>,
    parts: &VmParts,
) -> Result<(), MigrateError> {
    use std::os::fd::AsRawFd;
    let mut fds = Vec::new();
    for net in &parts.nets {
        fds.push(devices::bus::lock(net).device().backend().as_raw_fd());
    }
    if let Some(memfd) = &parts.memfd {
        fds.push(memfd.as_raw_fd());
    }
    channel
        .send_fds(&fds, b"ferry backends")
        .map_err(|source| MigrateError::Channel {
            what: "hand over the TAPs and memory",
            source,
        })?;
    log::info!("local migration: handed over {} descriptors", fds.len());
    Ok(())
}

/// The connection, counting what is written for `query-migrate`.
pub(super) struct Counted<'a> {
    pub(super) inner: Box<dyn Channel>,
    pub(super) job: &'a MigrationJob,
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

/// How long the source waits, after the ACK, for the destination's
/// report of its resume and announce (for the timeline only).
const REPORT_WAIT: Duration = Duration::from_secs(4);

/// The destination's report, put on the timeline's axis: its times are
/// from its ACK, which the source took at `resume_ms`.
pub(super) fn collect_report(job: &MigrationJob, mut channel: &mut dyn Channel) {
    if channel.set_timeouts(Some(REPORT_WAIT), None).is_err() {
        return;
    }
    let report = match read_answer(&mut channel) {
        Ok(Answer::Report(bytes)) => bytes,
        Ok(_) | Err(_) => {
            log::debug!("migration: no report from the destination");
            return;
        }
    };
    let Ok(mut dest) = serde_json::from_slice::<timeline::Destination>(&report) else {
        log::debug!("migration: the destination's report does not parse");
        return;
    };
    job.record(|t| {
        let base = t.resume_ms.unwrap_or(0.0);
        dest.resumed_ms = dest.resumed_ms.map(|r| r + base);
        for f in &mut dest.announce {
            f.at_ms += base;
        }
        t.destination = Some(dest);
    });
}
