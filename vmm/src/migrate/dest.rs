//! The destination side: `ferry run --incoming URI` waits in `inmigrate`
//! for a stream, builds the machine the stream describes (host-side
//! choices — TAPs, console — from its own command line), fills it, and
//! acknowledges. The VM then enters `prelaunch-migrate`, and runs (or
//! waits for `cont` with -S).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::legacy::serial::SerialSnapshot;
use devices::virtio::net::NetSnapshot;
use migration::{Channel, Listener, MigrationUri, Section, SectionKind, StreamError, StreamReader};

use super::ack::{send_ack, send_go, send_nak};
use super::ram::GuestRamSink;
use super::*;
use crate::builder;
use crate::check::kvm_kind;
use crate::config::{
    check_nets, format_size, IncomingConfig, NetConfig, NetDescriptor, SerialConfig,
};
use crate::runstate::{RunState, RunStateMachine};
use crate::state::{check_xsave_size, VcpuState, VmState};
use crate::vm::{bind_qmp_spec, Vm};
use crate::VmmError;
use arriving::{Abort, ArrivingQmp};
use std::os::fd::AsRawFd;

fn err(message: impl Into<String>) -> VmmError {
    VmmError::Migration(message.into())
}

/// The NICs to build: the stream's, with this host's `--net` applied —
/// by id when given, else by position. A `--net` may change only the TAP.
fn apply_overrides(
    stream: &[NetDescriptor],
    overrides: &[NetConfig],
) -> Result<Vec<NetDescriptor>, VmmError> {
    let mut nets = stream.to_vec();
    for (i, o) in overrides.iter().enumerate() {
        let target = match &o.id {
            Some(id) => nets.iter_mut().find(|n| &n.id == id),
            None => nets.get_mut(i),
        };
        let Some(n) = target else {
            return Err(err(format!(
                "--net {} matches no NIC of the incoming VM (it has {})",
                o.id.as_deref()
                    .map_or_else(|| format!("#{i}"), |id| format!("id={id}")),
                stream
                    .iter()
                    .map(|n| n.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        if o.mac.is_some_and(|m| m != n.mac) {
            return Err(err(format!(
                "--net mac= would change NIC {}'s MAC {}: refused",
                n.id, n.mac
            )));
        }
        // Not given: the stream's.
        if o.guest_announce.is_some_and(|g| g != n.guest_announce) {
            return Err(err(format!(
                "--net guest-announce= would change NIC {}'s features: refused",
                n.id
            )));
        }
        n.tap = o.tap.clone();
    }
    check_nets(&nets)?;
    Ok(nets)
}

/// A local migration's TAPs and memfd, received right after the config
/// section: the destination uses them and opens no TAP of its own.
fn receive_backends(
    reader: &mut StreamReader<Box<dyn Channel>>,
    handover: Option<BackendHandover>,
    nics: usize,
    answerable: bool,
) -> Result<builder::HostBackends, VmmError> {
    let Some(h) = handover else {
        return Ok(builder::HostBackends::default());
    };
    if !answerable || !reader.inner_mut().can_pass_fds() {
        return Err(err(
            "the stream hands over TAPs and memory, which only a unix: migration can carry",
        ));
    }
    if h.taps != nics {
        return Err(err(format!(
            "the source hands over {} TAPs for {nics} NICs",
            h.taps
        )));
    }
    let (fds, _) = reader
        .inner_mut()
        .recv_fds(h.fd_count())
        .map_err(|e| err(format!("receiving the source's TAPs and memory: {e}")))?;
    if fds.len() != h.fd_count() {
        return Err(err(format!(
            "expected {} descriptors from the source, got {}",
            h.fd_count(),
            fds.len()
        )));
    }
    let mut fds = fds.into_iter();
    let mut taps = Vec::with_capacity(h.taps);
    for fd in fds.by_ref().take(h.taps) {
        taps.push(Some(
            net::Tap::from_fd(fd).map_err(|e| err(format!("received TAP: {e}")))?,
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

/// Everything the stream says about the VM besides its RAM.
#[derive(Default)]
struct Loaded {
    vm: Option<VmState>,
    vcpus: BTreeMap<u8, VcpuState>,
    serial: Option<SerialSnapshot>,
    ged: Option<devices::acpi_ged::GedState>,
    nets: BTreeMap<String, NetSnapshot>,
}

fn unique<T>(slot: &mut Option<T>, value: T, section: &Section) -> Result<(), VmmError> {
    if slot.replace(value).is_some() {
        return Err(err(format!(
            "section {} appears twice (second at byte {})",
            section.name, section.offset
        )));
    }
    Ok(())
}

impl Vm {
    /// Waits for an incoming migration on `config.uri` and returns the VM
    /// it carries, loaded and ready to run.
    pub fn incoming(config: &IncomingConfig) -> Result<Vm, VmmError> {
        // Listen first: once the QMP socket exists, so does the listener
        // (supervisors and tests wait for the QMP socket).
        let listener = Listener::bind(&config.uri).map_err(|e| {
            err(format!(
                "cannot wait for a migration on {}: {e}",
                config.uri
            ))
        })?;
        // QMP answers from now on (runstate inmigrate), on its own thread
        // until the VM has arrived.
        let abort = Arc::new(Abort::new()?);
        let arriving = bind_qmp_spec(config.qmp.as_ref())?
            .map(|l| ArrivingQmp::start(l, abort.clone()))
            .transpose()?;
        let quit = |arriving: Option<ArrivingQmp>| {
            if let Some(a) = arriving {
                a.say_goodbye();
            }
            VmmError::QuitWhileArriving
        };
        log::info!(
            "waiting for an incoming migration on {}",
            listener.local_addr()
        );
        wait_for_source(&listener, &abort)?;
        if abort.requested() {
            return Err(quit(arriving));
        }
        let channel = listener
            .accept()
            .map_err(|e| err(format!("incoming migration on {}: {e}", config.uri)))?;
        abort.watch(&*channel);
        let answerable = !matches!(config.uri, MigrationUri::File(_));
        let mut reader = StreamReader::new(channel).map_err(|e| err(e.to_string()));
        let result = match reader.as_mut() {
            Ok(r) if !abort.requested() => load(r, config, answerable),
            Ok(_) => Err(VmmError::QuitWhileArriving),
            Err(e) => Err(err(e.to_string())),
        };
        match (result, reader) {
            (Ok(mut vm), Ok(mut r)) => {
                // QMP moves to the VM before the acknowledgement: once the
                // source says completed, nobody is told `inmigrate`.
                if let Some(a) = arriving {
                    vm.qmp = Some(a.hand_over());
                }
                if abort.requested() {
                    // `quit` came in as the load ended: honoured, and the
                    // source, never acknowledged, keeps its guest.
                    if answerable {
                        let _ = send_nak(r.inner_mut(), "quit on the destination");
                    }
                    return Err(VmmError::QuitWhileArriving);
                }
                if answerable {
                    send_ack(r.inner_mut())
                        .map_err(|e| err(format!("cannot acknowledge the migration: {e}")))?;
                }
                if vm.parts.memfd.is_none() {
                    crate::memory::advise_huge_pages(&vm.parts.memory);
                }
                Ok(vm)
            }
            (Err(_), _) if abort.requested() => Err(quit(arriving)),
            (Err(e), Ok(mut r)) => {
                if answerable {
                    let _ = send_nak(r.inner_mut(), &e.to_string());
                }
                Err(e)
            }
            (Err(e), Err(_)) | (Ok(_), Err(e)) => Err(e),
        }
    }
}

/// Blocks until the source connects (`file:` needs no wait) or a QMP
/// `quit` asks to give up.
fn wait_for_source(listener: &Listener, abort: &Abort) -> Result<(), VmmError> {
    let Some(fd) = listener.as_raw_fd() else {
        return Ok(());
    };
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: abort.evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a live array of two pollfds whose descriptors
        // (the listener's and the eventfd) outlive the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(VmmError::Io {
                what: "wait for the incoming migration",
                source: e,
            });
        }
    }
}

fn load(
    reader: &mut StreamReader<Box<dyn Channel>>,
    config: &IncomingConfig,
    answerable: bool,
) -> Result<Vm, VmmError> {
    let stream_err = |e: migration::StreamError| err(e.to_string());
    let first = reader.next_section().map_err(stream_err)?;
    if first.kind != SectionKind::Config || first.name != CONFIG_SECTION {
        return Err(err(format!(
            "migration stream: expected the config section first, found {} section {} at byte {}",
            first.kind, first.name, first.offset
        )));
    }
    first.check_version(CONFIG_VERSION).map_err(stream_err)?;
    let incoming: MigrationConfig = first.json().map_err(stream_err)?;
    let machine = &incoming.machine;
    if let Some(m) = config.memory {
        if m != machine.memory_bytes {
            return Err(err(format!(
                "--memory {} disagrees with the incoming VM's {}",
                format_size(m),
                format_size(machine.memory_bytes)
            )));
        }
    }
    if let Some(c) = config.cpus {
        if c != machine.vcpus {
            return Err(err(format!(
                "--cpus {c} disagrees with the incoming VM's {}",
                machine.vcpus
            )));
        }
    }
    machine.validate()?;
    let nets = apply_overrides(&incoming.nets, &config.nets)?;
    let runstate = Arc::new(Mutex::new(RunStateMachine::new(RunState::Inmigrate)));
    let host = receive_backends(reader, incoming.backend, nets.len(), answerable)?;
    let built = builder::build(machine, &nets, &config.serial, kvm_kind(), host)?;
    check_xsave_size(&built.parts.kvm).map_err(|e| err(e.to_string()))?;
    if answerable {
        send_go(reader.inner_mut()).map_err(|e| err(format!("cannot answer the source: {e}")))?;
    }

    let mut loaded = Loaded::default();
    // SAFETY: the machine was just built: no vCPU has run, no device is
    // active, nothing but the sink touches guest memory until the loop
    // below is done with it.
    let mut sink = unsafe { GuestRamSink::new(&built.parts.memory) };
    // When the first section after the RAM came: the source's guest has
    // been stopped since about then.
    let mut state_from = None;
    loop {
        let at = reader.bytes_read();
        let section = reader.next_section_with_ram(&mut sink).map_err(|e| {
            if let StreamError::Refused { section, .. } = &e {
                // A run outside guest memory: the sink's message, with
                // the offset of its section's payload.
                if let Some(refusal) = sink.refusal(at + 14 + section.len() as u64) {
                    return err(format!("migration stream: {refusal}"));
                }
            }
            stream_err(e)
        })?;
        if !matches!(section.kind, SectionKind::Ram | SectionKind::Pass) && state_from.is_none() {
            state_from = Some(std::time::Instant::now());
        }
        match section.kind {
            // Already in guest memory.
            SectionKind::Ram => {}
            SectionKind::Pass => {}
            SectionKind::End => break,
            SectionKind::VmState if section.name == VM_SECTION => {
                section.check_version(VM_VERSION).map_err(stream_err)?;
                unique(
                    &mut loaded.vm,
                    section.json().map_err(stream_err)?,
                    &section,
                )?;
            }
            SectionKind::Vcpu => {
                section.check_version(VCPU_VERSION).map_err(stream_err)?;
                let id = section
                    .name
                    .strip_prefix("vcpu/")
                    .and_then(|n| n.parse::<u8>().ok())
                    .filter(|&n| n < machine.vcpus)
                    .ok_or_else(|| {
                        err(format!(
                            "migration stream: no vCPU for section {} at byte {}",
                            section.name, section.offset
                        ))
                    })?;
                let state: VcpuState = section.json().map_err(stream_err)?;
                if loaded.vcpus.insert(id, state).is_some() {
                    return Err(err(format!(
                        "section {} appears twice (second at byte {})",
                        section.name, section.offset
                    )));
                }
            }
            SectionKind::Device if section.name == GED_SECTION => {
                section.check_version(GED_VERSION).map_err(stream_err)?;
                unique(
                    &mut loaded.ged,
                    section.json().map_err(stream_err)?,
                    &section,
                )?;
            }
            SectionKind::Device if section.name == SERIAL_SECTION => {
                section.check_version(SERIAL_VERSION).map_err(stream_err)?;
                unique(
                    &mut loaded.serial,
                    section.json().map_err(stream_err)?,
                    &section,
                )?;
            }
            SectionKind::Device if section.name.starts_with("virtio-net/") => {
                section
                    .check_version(devices::virtio::net::persist::SECTION_VERSION)
                    .map_err(stream_err)?;
                let id = &section.name["virtio-net/".len()..];
                if !nets.iter().any(|n| n.id == id) {
                    return Err(err(format!(
                        "migration stream: section {} names a NIC the config does not have",
                        section.name
                    )));
                }
                let snapshot: NetSnapshot = section.json().map_err(stream_err)?;
                if loaded.nets.insert(id.to_string(), snapshot).is_some() {
                    return Err(err(format!(
                        "section {} appears twice (second at byte {})",
                        section.name, section.offset
                    )));
                }
            }
            _ => {
                return Err(err(format!(
                    "migration stream: unknown {} section {} at byte {}",
                    section.kind, section.name, section.offset
                )))
            }
        }
        reader.recycle(section);
    }

    // Everything arrived and checked out: now change the VM.
    let restore_from = std::time::Instant::now();
    let missing = |what: &str| err(format!("migration stream ended without its {what} section"));
    let parts = &built.parts;
    loaded
        .vm
        .ok_or_else(|| missing(VM_SECTION))?
        .restore(&parts.vm_fd)
        .map_err(|e| err(e.to_string()))?;
    for (i, vcpu) in built.vcpus.iter().enumerate() {
        let state = loaded
            .vcpus
            .get(&(i as u8))
            .ok_or_else(|| missing(&vcpu_section(i as u8)))?;
        state
            .restore(&vcpu.fd)
            .map_err(|e| err(format!("vCPU {i}: {e}")))?;
    }
    let serial = loaded.serial.ok_or_else(|| missing(SERIAL_SECTION))?;
    devices::bus::lock(&parts.serial)
        .restore(&serial)
        .map_err(|e| err(format!("serial: {e}")))?;
    if let Some(ged) = &loaded.ged {
        devices::bus::lock(&parts.ged).restore(ged);
    }
    for (net, desc) in parts.nets.iter().zip(&nets) {
        let snapshot = loaded
            .nets
            .get(&desc.id)
            .ok_or_else(|| missing(&net_section(&desc.id)))?;
        devices::bus::lock(net)
            .restore_net(snapshot)
            .map_err(|e| err(format!("NIC {}: {e}", desc.id)))?;
    }
    devices::bus::lock(&runstate)
        .transition(RunState::PrelaunchMigrate)
        .map_err(|e| err(e.to_string()))?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    log::info!(
        "incoming migration loaded: {} bytes, {} sections; state sections read in {:.2} ms, restored in {:.2} ms",
        reader.bytes_read(),
        reader.sections_read(),
        state_from.map_or(0.0, |t| ms(restore_from - t)),
        ms(restore_from.elapsed())
    );
    Ok(Vm {
        parts: Arc::new(built.parts),
        vcpus: built.vcpus,
        runstate,
        stdio_console: config.serial == SerialConfig::Stdio,
        qmp: None,
        start_paused: config.start_paused,
        announce: Some(incoming.announce),
    })
}
