//! The destination side: `ferry run --incoming URI` waits in `inmigrate`
//! for a stream, builds the machine the stream describes (host-side
//! choices — TAPs, console — from its own command line), fills it, and
//! acknowledges. The VM then enters `prelaunch-migrate`, and runs (or
//! waits for `cont` with -S).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migration::{Channel, Listener, Section, SectionKind, StreamReader};

use super::ack::{send_ack, send_go, send_nak};
use super::error::IncomingError;
use super::job::MigrationStatus;
use super::multifd::{self, PassTracker};
use super::qmp::IncomingMode;
use super::ram::{GuestRamSink, WrittenPages};
use super::*;
use crate::builder;
use crate::check::kvm_kind;
use crate::commands::Configured;
use crate::config::{
    check_nets, IncomingConfig, IncomingUri, NetConfig, NetDescriptor, SerialConfig,
};
use crate::qmp::EventEmitter;
use crate::runstate::{RunState, RunStateMachine};
use crate::state::{check_xsave_size, VcpuState, VmState};
use crate::vm::{bind_qmp_spec, Vm};
use crate::VmmError;
use arriving::{wait_readable, Arrival, ArrivingQmp};

mod channels;

use channels::{check_multifd, read_with_channels};
use devices::bus::lock;

/// The NICs to build: the stream's, each on the TAP this host's `--net`
/// names — matched by id when given, else by position. A `--net` may
/// change only the TAP, and every NIC needs one: the TAP names in the
/// stream are the source's, never opened here. `handover`: the TAPs come
/// as descriptors from a verified local peer (backend-transfer) instead.
fn apply_overrides(
    stream: &[NetDescriptor],
    overrides: &[NetConfig],
    handover: bool,
) -> Result<Vec<NetDescriptor>, IncomingError> {
    let mut nets = stream.to_vec();
    let mut covered = vec![false; nets.len()];
    for (i, o) in overrides.iter().enumerate() {
        let target = match &o.id {
            Some(id) => nets.iter().position(|n| &n.id == id),
            None => (i < nets.len()).then_some(i),
        };
        let Some(n) = target.map(|t| {
            covered[t] = true;
            &mut nets[t]
        }) else {
            let net =
                o.id.as_deref()
                    .map_or_else(|| format!("#{i}"), |id| format!("id={id}"));
            let has: Vec<&str> = stream.iter().map(|n| n.id.as_str()).collect();
            let has = has.join(", ");
            return Err(IncomingError::NoSuchNic { net, has });
        };
        if o.mac.is_some_and(|m| m != n.mac) {
            let (id, mac) = (n.id.clone(), n.mac);
            return Err(IncomingError::MacChange { id, mac });
        }
        // Not given: the stream's.
        if o.guest_announce.is_some_and(|g| g != n.guest_announce) {
            let id = n.id.clone();
            return Err(IncomingError::FeaturesChange { id });
        }
        n.tap = o.tap.clone();
    }
    if !handover {
        if let Some(index) = covered.iter().position(|c| !c) {
            let n = &nets[index];
            return Err(IncomingError::NicWithoutNet {
                id: n.id.clone(),
                mac: n.mac,
                index,
            });
        }
    }
    check_nets(&nets)?;
    Ok(nets)
}

/// A local migration's TAPs and memfd, received right after the config
/// section: the destination uses them and opens no TAP of its own.
fn receive_backends(
    reader: &mut Reader,
    handover: Option<BackendHandover>,
    nics: usize,
    answerable: bool,
) -> Result<builder::HostBackends, IncomingError> {
    let Some(h) = handover else {
        return Ok(builder::HostBackends::default());
    };
    if !answerable || !reader.inner_mut().can_pass_fds() {
        return Err(IncomingError::HandoverNeedsUnix);
    }
    if h.taps != nics {
        let taps = h.taps;
        return Err(IncomingError::HandoverTaps { taps, nics });
    }
    let (fds, _) = reader
        .inner_mut()
        .recv_fds(h.fd_count())
        .map_err(IncomingError::HandoverReceive)?;
    if fds.len() != h.fd_count() {
        let (expected, got) = (h.fd_count(), fds.len());
        return Err(IncomingError::HandoverCount { expected, got });
    }
    let mut fds = fds.into_iter();
    let mut taps = Vec::with_capacity(h.taps);
    for fd in fds.by_ref().take(h.taps) {
        taps.push(Some(
            net::Tap::from_fd(fd).map_err(IncomingError::HandoverTap)?,
        ));
    }
    let memfd = fds.next().map(std::fs::File::from);
    log::info!(
        "local migration: received {} TAPs{}",
        taps.len(),
        if memfd.is_some() {
            " and guest RAM"
        } else {
            ""
        }
    );
    Ok(builder::HostBackends {
        taps,
        memfd,
        ..Default::default()
    })
}

impl Vm {
    /// Waits for an incoming migration on `config.uri` (or, for `defer`,
    /// on the URI QMP's `migrate-incoming` names) and returns the VM it
    /// carries, loaded and ready to run.
    pub fn incoming(config: &IncomingConfig) -> Result<Vm, VmmError> {
        let configured = Configured::with_objects(config.objects.clone());
        // Listen first: once the QMP socket exists, so does the listener
        // (supervisors and tests wait for the QMP socket).
        let listener = match &config.uri {
            IncomingUri::Now(uri) => {
                let listener = Listener::bind(uri).map_err(|source| IncomingError::Listen {
                    uri: uri.to_string(),
                    source,
                })?;
                let mut m = lock(&configured.migrations);
                m.incoming_mode = IncomingMode::Uri;
                m.listening = super::qmp::socket_address(&listener.local_uri());
                Some(listener)
            }
            IncomingUri::Defer if config.qmp.is_none() => {
                return Err(IncomingError::DeferNeedsQmp.into())
            }
            IncomingUri::Defer => {
                lock(&configured.migrations).incoming_mode = IncomingMode::Deferred;
                None
            }
        };
        // QMP answers from now on (runstate inmigrate), on its own thread
        // until the VM has arrived.
        let arrival = Arc::new(Arrival::new()?);
        let arriving = bind_qmp_spec(config.qmp.as_ref())?
            .map(|l| ArrivingQmp::start(l, arrival.clone(), configured.clone()))
            .transpose()?;
        let emitter = match &arriving {
            Some(a) => a.emitter(),
            None => EventEmitter::new()?,
        };
        let quit = |arriving: Option<ArrivingQmp>| {
            if let Some(a) = arriving {
                a.say_goodbye();
            }
            VmmError::QuitWhileArriving
        };
        let listener = match listener {
            Some(l) => l,
            None => match arrival.wait_for_listener()? {
                Some(l) => l,
                None => return Err(quit(arriving)),
            },
        };
        let uri = listener.local_addr();
        log::info!("waiting for an incoming migration on {uri}");
        let (mut reader, first, image, params, tls) = loop {
            wait_for_source(&listener, &arrival)?;
            if arrival.requested() {
                return Err(quit(arriving));
            }
            // As in QEMU, the parameters when a source connects rule its
            // connection: `tls-creds` set by QMP after `--incoming tcp:`
            // began listening still apply.
            let params = lock(&configured.migrations).params.clone();
            let tls = super::tls::server(&lock(&configured.objects), &params)
                .map_err(IncomingError::TlsSetup)?;
            match Doorway::new(&listener, tls.as_ref(), &params).open() {
                Ok((reader, first, image)) => break (reader, first, image, params, tls),
                Err(Opening::Dropped(why)) => {
                    log::warn!(
                        "incoming migration on {uri}: dropped a connection: {why}; still listening"
                    );
                }
                Err(Opening::Failed(e)) => return Err(e.into()),
            }
        };
        arrival.watch(&**reader.inner_mut());
        // The same door, for the multifd channels still to come.
        let door = Doorway::new(&listener, tls.as_ref(), &params);
        // The destination's own job, for `query-migrate` and (with `events`
        // set here) MIGRATION: QEMU 7.2's destination says `setup` as it
        // listens (for `defer`, `migrate-incoming` did), `active` as the
        // source connects.
        let job = lock(&configured.migrations).new_job(&emitter);
        if !matches!(config.uri, IncomingUri::Defer) {
            job.emit(MigrationStatus::Setup);
        }
        job.set_status(MigrationStatus::Active);
        let answerable = listener.as_raw_fd().is_some();
        let (mut vm, was_running, _kept) =
            match receive(&mut reader, first, image, config, &params, &door, &arrival) {
                Ok(loaded) => loaded,
                Err(_) if arrival.requested() => return Err(quit(arriving)),
                Err(e) => {
                    job.update(|i| {
                        i.total_time_ms = Some(i.started.elapsed().as_millis() as u64);
                        i.error = Some(e.to_string());
                    });
                    job.set_status(MigrationStatus::Failed);
                    if let Some(a) = arriving {
                        a.flush();
                    }
                    return Err(e.into());
                }
            };
        // QMP moves to the VM before the acknowledgement: once the source
        // says completed, nobody is told `inmigrate`.
        if let Some(a) = arriving {
            vm.qmp = Some(a.hand_over());
        }
        vm.configured = configured;
        // `cont`/`stop` while it arrived win over -S, as in QEMU; a guest
        // paused on the source arrives paused either way (QEMU's global
        // state), and `cont` starts (and announces) it.
        let autostart = arrival.autostart().unwrap_or(!config.start_paused);
        vm.start_paused = !(autostart && was_running);
        if arrival.requested() {
            // `quit` came in as the load ended: honoured, and the source,
            // never acknowledged, keeps its guest.
            if answerable {
                let _ = send_nak(reader.inner_mut(), "quit on the destination");
            }
            return Err(VmmError::QuitWhileArriving);
        }
        let bytes = reader.bytes_read();
        if !answerable {
            vm.forward_frames_ms = None;
        }
        if vm.forward_frames_ms.is_some() {
            // The TAPs' frames wait behind those the source will forward.
            for net in &vm.parts.nets {
                lock(net).device_mut().hold_tap();
            }
        }
        if answerable {
            send_ack(reader.inner_mut()).map_err(IncomingError::Ack)?;
            if vm.report_wanted || vm.forward_frames_ms.is_some() {
                // The connection stays open for the frames and the report.
                vm.report_to = Some(super::report::ReportTo {
                    channel: reader.into_inner(),
                    acked: Instant::now(),
                    forward_ms: vm.forward_frames_ms,
                    report: vm.report_wanted,
                    job: job.clone(),
                });
            }
        }
        job.update(|i| {
            i.total_time_ms = Some(i.started.elapsed().as_millis() as u64);
            i.ram.transferred = bytes;
            i.ram.total = vm.parts.machine.memory_bytes;
        });
        job.set_status(MigrationStatus::Completed);
        if vm.parts.memfd.is_none() {
            crate::memory::advise_huge_pages(&vm.parts.memory);
        }
        Ok(vm)
    }
}

/// The stream as the destination reads it.
type Reader = StreamReader<Box<dyn Channel>>;

/// What is freed only after the ACK: the multifd channels' readers.
type Kept = Vec<multifd::ChannelReader>;

/// The stream `reader` carries (its config section `first` read), loaded:
/// the VM (in prelaunch-migrate) and whether it ran on the source. A
/// failure is refused to the source (NAK).
fn receive(
    reader: &mut Reader,
    first: Section,
    image: Option<Image>,
    config: &IncomingConfig,
    params: &MigrationParameters,
    door: &Doorway,
    arrival: &Arrival,
) -> Result<(Vm, bool, Kept), IncomingError> {
    let answerable = door.listener.as_raw_fd().is_some();
    load(reader, first, image, config, params, door).inspect_err(|e| {
        if answerable && !arrival.requested() {
            let _ = send_nak(reader.inner_mut(), &e.to_string());
        }
    })
}

/// A snapshot file's RAM image, to map.
type Image = (std::fs::File, migration::snapshot::ImageLayout);

/// Where sources come in: the listener, with `tls-creds` the TLS they
/// must speak, and how long a connection may take to prove it is one.
struct Doorway<'a> {
    listener: &'a Listener,
    tls: Option<&'a migration::tls::ServerTls>,
    deadline: Duration,
}

/// Why a connection did not become the incoming migration.
enum Opening {
    /// Not a source (garbage, no TLS, a failed handshake, silence, a peer
    /// of another user): dropped, and the destination listens on.
    Dropped(String),
    /// This end cannot go on (a file that is no snapshot, a listener that
    /// fails).
    Failed(IncomingError),
}

impl<'a> Doorway<'a> {
    fn new(
        listener: &'a Listener,
        tls: Option<&'a migration::tls::ServerTls>,
        params: &MigrationParameters,
    ) -> Self {
        Doorway {
            listener,
            tls,
            deadline: Duration::from_millis(params.incoming_timeout_ms),
        }
    }

    /// The next connection's stream, up to and including its config
    /// section, within the deadline; for a snapshot in the file form, its
    /// stream (after the RAM image) and the image.
    fn open(&self) -> Result<(Reader, Section, Option<Image>), Opening> {
        let uri = self.listener.local_addr();
        if let migration::MigrationUri::File(path) = self.listener.local_uri() {
            let failed = |e: IncomingError| Opening::Failed(e);
            let mut image = None;
            let channel = match migration::snapshot::open(&path).map_err(|e| failed(e.into()))? {
                Some((file, layout)) => {
                    let c = migration::snapshot::stream_of(&file, &layout).map_err(|source| {
                        failed(IncomingError::Accept {
                            uri: uri.clone(),
                            source: migration::TransportError::Open {
                                uri: path.display().to_string(),
                                source,
                            },
                        })
                    })?;
                    image = Some((file, layout));
                    c
                }
                None => self
                    .listener
                    .accept()
                    .map_err(|source| failed(IncomingError::Accept { uri, source }))?,
            };
            let mut reader = StreamReader::new(channel).map_err(|e| failed(e.into()))?;
            let first = reader.next_section().map_err(|e| failed(e.into()))?;
            return Ok((reader, first, image));
        }
        let channel = match self.listener.accept() {
            Ok(c) => c,
            Err(e @ migration::TransportError::PeerRefused { .. }) => {
                return Err(Opening::Dropped(e.to_string()))
            }
            Err(source) => return Err(Opening::Failed(IncomingError::Accept { uri, source })),
        };
        let peer = channel.peer_name().unwrap_or_else(|| "a peer".into());
        let dropped = |why: String| Opening::Dropped(format!("{peer}: {why}"));
        let started = Instant::now();
        channel
            .set_timeouts(Some(self.deadline), Some(self.deadline))
            .map_err(|e| dropped(e.to_string()))?;
        let channel = match self.tls {
            Some(tls) => migration::tls::accept(channel, tls, self.deadline, &peer)
                .map_err(|e| dropped(e.to_string()))?,
            None => channel,
        };
        // What is left of the deadline bounds the header and config.
        let left = self.deadline.saturating_sub(started.elapsed());
        let left = left.max(Duration::from_millis(1));
        channel
            .set_timeouts(Some(left), Some(left))
            .map_err(|e| dropped(e.to_string()))?;
        let mut reader = match StreamReader::new(channel) {
            Ok(r) => r,
            Err(e) => return Err(dropped(timed_out(e.to_string(), self.deadline))),
        };
        let first = match reader.next_section() {
            Ok(s) => s,
            Err(e) => {
                let why = timed_out(e.to_string(), self.deadline);
                let _ = send_nak(reader.inner_mut(), &why);
                return Err(dropped(why));
            }
        };
        // A source from here on: no deadline (it may pause, as before a
        // switchover), and its refusals are final.
        reader
            .inner_mut()
            .set_timeouts(None, None)
            .map_err(|e| dropped(e.to_string()))?;
        Ok((reader, first, None))
    }
}

/// An error that is a read timing out says so.
fn timed_out(why: String, deadline: Duration) -> String {
    if why.contains("timed out") || why.contains("temporarily unavailable") {
        format!(
            "no valid stream header and config within {} ms",
            deadline.as_millis()
        )
    } else {
        why
    }
}

/// Blocks until the source connects (`file:` needs no wait) or a QMP
/// `quit` asks to give up.
fn wait_for_source(listener: &Listener, arrival: &Arrival) -> Result<(), IncomingError> {
    match listener.as_raw_fd() {
        Some(fd) => wait_readable(&[fd, arrival.evt.as_raw_fd()]),
        None => Ok(()),
    }
}

/// The handshake, then [`read_sections`] and [`Loaded::apply`]: the VM
/// the stream carries, in prelaunch-migrate, and whether it ran on the
/// source.
fn load(
    reader: &mut Reader,
    first: Section,
    image: Option<Image>,
    config: &IncomingConfig,
    params: &MigrationParameters,
    door: &Doorway,
) -> Result<(Vm, bool, Kept), IncomingError> {
    let (listener, answerable) = (door.listener, door.listener.as_raw_fd().is_some());
    let incoming = check_config(first, config)?;
    if answerable {
        check_multifd(incoming.ram_channels, params.ram_channels())?;
    }
    let machine = &incoming.machine;
    let nets = apply_overrides(&incoming.nets, &config.nets, incoming.backend.is_some())?;
    let runstate = Arc::new(Mutex::new(RunStateMachine::new(RunState::Inmigrate)));
    let mut host = receive_backends(reader, incoming.backend, nets.len(), answerable)?;
    let lease = image.as_ref().and_then(|(f, _)| f.try_clone().ok());
    let mapped = image.is_some();
    host.image = image;
    let built = builder::build(machine, &nets, &config.serial, kvm_kind(), host)?;
    check_xsave_size(&built.parts.kvm)?;
    if answerable {
        send_go(reader.inner_mut()).map_err(IncomingError::Answer)?;
    }
    let channels = match incoming.ram_channels {
        0 => Vec::new(),
        n => multifd::accept_channels(listener, incoming.session, n, door.tls)?,
    };
    let answer = if answerable && incoming.pass_acks {
        let clone = reader.inner_mut().try_clone_box();
        Some(clone.map_err(IncomingError::Answer)?)
    } else {
        None
    };
    // Anonymous memory only: a memfd's pages are the source's, a mapped
    // snapshot's the file's.
    let huge = (!mapped && built.parts.memfd.is_none()).then(|| built.parts.memory.clone());
    let tracker = PassTracker::new(channels.len() as u32, answer, huge);
    let written = WrittenPages::new(&built.parts.memory);
    let mut loaded = if channels.is_empty() {
        read_sections(reader, &built, &written, Some(&tracker))?
    } else {
        read_with_channels(reader, &built, &written, &tracker, channels)?
    };
    // Everything arrived and checked out: now change the VM.
    let restore_from = Instant::now();
    let read_ms = loaded
        .state_from
        .map_or(0.0, |t| (restore_from - t).as_secs_f64() * 1e3);
    let kept = std::mem::take(&mut loaded.kept);
    let was_running = loaded.apply(&built)?;
    if let Some(file) = lease {
        super::snapshot::guard_image(&file, built.parts.memory.clone());
    }
    devices::bus::lock(&runstate).transition(RunState::PrelaunchMigrate)?;
    log::info!(
        "incoming migration loaded{}: {} bytes, {} sections; state sections read in {read_ms:.2} ms, restored in {:.2} ms",
        if mapped { " (RAM mapped from the snapshot)" } else { "" },
        reader.bytes_read(),
        reader.sections_read(),
        restore_from.elapsed().as_secs_f64() * 1e3
    );
    let vm = Vm {
        parts: Arc::new(built.parts),
        vcpus: built.vcpus,
        runstate,
        stdio_console: config.serial == SerialConfig::Stdio,
        qmp: None,
        start_paused: config.start_paused,
        announce: Some(incoming.announce),
        configured: Configured::default(),
        report_wanted: incoming.report,
        report_to: None,
        forward_frames_ms: incoming.forward_frames_ms,
        seccomp: Default::default(),
    };
    Ok((vm, was_running, kept))
}

/// The config section, first in every stream, checked against this
/// host's command line.
fn check_config(first: Section, config: &IncomingConfig) -> Result<MigrationConfig, IncomingError> {
    if first.kind != SectionKind::Config || first.name != CONFIG_SECTION {
        return Err(IncomingError::ConfigNotFirst {
            kind: first.kind,
            name: first.name,
            offset: first.offset,
        });
    }
    first.check_version(CONFIG_VERSION)?;
    let incoming: MigrationConfig = first.json()?;
    let machine = &incoming.machine;
    if let Some(asked) = config.memory.filter(|&m| m != machine.memory_bytes) {
        let incoming = machine.memory_bytes;
        return Err(IncomingError::MemoryMismatch { asked, incoming });
    }
    if let Some(asked) = config.cpus.filter(|&c| c != machine.vcpus) {
        let incoming = machine.vcpus;
        return Err(IncomingError::CpusMismatch { asked, incoming });
    }
    machine.validate()?;
    Ok(incoming)
}

/// Everything the stream says about the VM besides its RAM (which is in
/// guest memory already), checked, not yet applied.
struct Loaded {
    vm: Option<VmState>,
    /// The source's run state (absent from an older Ferry's stream).
    global: Option<GlobalState>,
    vcpus: BTreeMap<u8, VcpuState>,
    /// Each device's section, by name.
    devices: BTreeMap<String, Section>,
    /// When the first section after the RAM came: the source's guest has
    /// been stopped since about then.
    state_from: Option<Instant>,
    kept: Kept,
}

/// Reads the rest of the stream: RAM straight into guest memory, every
/// other section checked — known, once each, a version this build reads —
/// and kept for [`Loaded::apply`].
/// `tracker`: the RAM passes are on this stream, and each one's end is
/// told to the source.
fn read_sections(
    reader: &mut Reader,
    machine: &builder::Machine,
    written: &WrittenPages,
    tracker: Option<&PassTracker>,
) -> Result<Loaded, IncomingError> {
    let parts = &machine.parts;
    let device_names = device_names(machine);
    let mut loaded = Loaded {
        vm: None,
        global: None,
        vcpus: BTreeMap::new(),
        devices: BTreeMap::new(),
        state_from: None,
        kept: Vec::new(),
    };
    // SAFETY: the machine was just built: no vCPU has run, no device is
    // active, nothing but the sink touches guest memory until the loop
    // below is done with it.
    let mut sink = unsafe { GuestRamSink::new(&parts.memory, written) };
    loop {
        let section = reader.next_section_with_ram(&mut sink)?;
        if section.kind == SectionKind::Pass {
            if let Some(t) = tracker {
                t.ended(section.pass()?.0).map_err(IncomingError::Answer)?;
            }
        }
        if matches!(section.kind, SectionKind::Ram | SectionKind::Pass) {
            // Already in guest memory.
            reader.recycle(section);
            continue;
        }
        loaded.state_from.get_or_insert_with(Instant::now);
        if section.kind == SectionKind::End {
            return Ok(loaded);
        }
        loaded.take(section, &device_names, parts.machine.vcpus)?;
    }
}

/// The names of the machine's device sections.
fn device_names(machine: &builder::Machine) -> BTreeSet<String> {
    machine
        .parts
        .devices
        .iter()
        .map(|d| devices::bus::lock(d).section_name())
        .collect()
}

impl Loaded {
    /// Keeps one state section — known, once, a version this build reads
    /// — for [`Self::apply`].
    fn take(
        &mut self,
        section: Section,
        device_names: &BTreeSet<String>,
        vcpus: u8,
    ) -> Result<(), IncomingError> {
        let duplicate = || IncomingError::Duplicate {
            name: section.name.clone(),
            offset: section.offset,
        };
        match section.kind {
            SectionKind::VmState if section.name == GLOBAL_SECTION => {
                section.check_version(GLOBAL_VERSION)?;
                if self.global.replace(section.json()?).is_some() {
                    return Err(duplicate());
                }
            }
            SectionKind::VmState if section.name == VM_SECTION => {
                section.check_version(VM_VERSION)?;
                if self.vm.replace(section.json()?).is_some() {
                    return Err(duplicate());
                }
            }
            SectionKind::Vcpu => {
                let Some(id) = vcpu_of(&section.name, vcpus) else {
                    return Err(IncomingError::UnknownSection {
                        kind: section.kind,
                        name: section.name,
                        offset: section.offset,
                    });
                };
                section.check_version(VCPU_VERSION)?;
                if self.vcpus.insert(id, section.json()?).is_some() {
                    return Err(duplicate());
                }
            }
            SectionKind::Device if device_names.contains(&section.name) => {
                if self.devices.contains_key(&section.name) {
                    return Err(duplicate());
                }
                self.devices.insert(section.name.clone(), section);
            }
            kind => {
                return Err(IncomingError::UnknownSection {
                    kind,
                    name: section.name,
                    offset: section.offset,
                })
            }
        }
        Ok(())
    }
}

/// The vCPU a `vcpu/N` section is for, when the machine has it.
fn vcpu_of(name: &str, vcpus: u8) -> Option<u8> {
    name.strip_prefix("vcpu/")
        .and_then(|n| n.parse::<u8>().ok())
        .filter(|&n| n < vcpus && name == vcpu_section(n))
}

impl Loaded {
    /// Puts every state into the machine: the VM's, each vCPU's, then
    /// each device's in the machine's order. A missing section fails,
    /// but for a device whose state is optional.
    /// Returns whether the guest was running on the source.
    fn apply(mut self, machine: &builder::Machine) -> Result<bool, IncomingError> {
        let parts = &machine.parts;
        let missing = |name: String| IncomingError::Missing(name);
        self.vm
            .ok_or_else(|| missing(VM_SECTION.into()))?
            .restore(&parts.vm_fd)
            .map_err(IncomingError::VmState)?;
        for (i, vcpu) in machine.vcpus.iter().enumerate() {
            let id = i as u8;
            let state = self
                .vcpus
                .get(&id)
                .ok_or_else(|| missing(vcpu_section(id)))?;
            state
                .restore(&vcpu.fd)
                .map_err(|source| IncomingError::Vcpu { id, source })?;
        }
        for device in &parts.devices {
            let mut device = devices::bus::lock(device);
            match self.devices.remove(&device.section_name()) {
                Some(section) => section.restore_into(&mut *device)?,
                None if device.optional() => {}
                None => return Err(missing(device.section_name())),
            }
        }
        Ok(self.global.as_ref().is_none_or(GlobalState::running))
    }
}
