//! Announcing the guest on the network once it runs on a new host
//! (issue #7): per NIC, rounds on QEMU's schedule. A round asks the guest
//! to announce itself (virtio-net GUEST_ANNOUNCE) when it can; once it
//! has acknowledged and had [`GUEST_GRACE`] to send, the host sends RARPs
//! for exactly the identities (MAC × VLAN) of the NIC's plan that the
//! guest did not send from in the round — none for a guest that announced
//! everything, every one for a guest with an L2-only identity, a bridge
//! inside, or a wedged driver. A guest that cannot be asked gets the
//! whole plan as RARPs (`Nic::rarp_plan`: what it sends from, plus a
//! capped fallback). Frames go out in batches of [`BATCH`], one batch per
//! turn of the event loop, so a big round never holds the loop (or QMP)
//! for long. Timers live on the VMM's event loop (a timerfd), never in a
//! sleeping thread.
//!
//! What starts a schedule: the run state going from prelaunch-migrate or
//! postmigrate to running (after a live migration or a restore; at `cont`
//! with -S; the source resumed after its destination failed), and QMP
//! `announce-self`. Nothing else.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::lock;
use event_manager::{EventOps, Events, MutEventSubscriber};
use net::{AnnounceParams, Nic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

/// How long a round waits for the guest's ANNOUNCE_ACK before going on
/// anyway (QEMU waits forever; a wedged guest should not stop the rest).
const ACK_PATIENCE: Duration = Duration::from_secs(2);

/// The schedule id of the announce that follows a migration or restore.
pub const MIGRATION_SCHEDULE: &str = "";

/// How long after its ANNOUNCE_ACK the guest's own announce counts as
/// sent (Linux queues its gratuitous ARPs as it acks): then the host
/// RARPs for what it left out.
pub const GUEST_GRACE: Duration = Duration::from_millis(10);

/// RARPs per turn of the event loop: a few hundred µs of TAP writes.
pub const BATCH: usize = 128;

struct Schedule {
    id: String,
    nic: usize,
    params: AnnounceParams,
    /// Rounds sent so far.
    done: u64,
    next_due: Option<Instant>,
    /// The guest was asked; its ack (or `ACK_PATIENCE`) releases the next.
    waiting_since: Option<Instant>,
    /// The senders mark taken as the round began.
    mark: u64,
    /// When to compare what the guest sent in the round with the plan.
    check_due: Option<Instant>,
}

/// What was announced, for logs and tests.
#[derive(Clone, Debug, Default)]
pub struct AnnounceLog {
    pub rounds: u64,
    pub rarp_frames: u64,
    pub guest_requests: u64,
    /// RARPs sent for identities the guest did not announce itself.
    pub rarps_for_silent: u64,
    /// Plan entries the fallback cap left out.
    pub left_out: u64,
    /// The longest time one batch of frames took.
    pub longest_batch: Duration,
    pub first_round_at: Option<Instant>,
    /// What went out when, for a migration's timeline: the first
    /// [`MAX_EVENTS`], then only counted.
    pub events: Vec<AnnounceEvent>,
    pub events_left_out: u64,
}

/// Events kept in [`AnnounceLog::events`].
pub const MAX_EVENTS: usize = 4096;

/// One announce event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceEvent {
    pub at: Instant,
    pub nic: String,
    /// `rarp`, `guest-asked`, `guest-acked`, `guest` (an identity the
    /// guest sent from after it was asked).
    pub kind: &'static str,
    pub identity: Option<net::Identity>,
}

impl AnnounceLog {
    fn event(&mut self, nic: &str, kind: &'static str, identity: Option<net::Identity>) {
        if self.events.len() < MAX_EVENTS {
            self.events.push(AnnounceEvent {
                at: Instant::now(),
                nic: nic.to_string(),
                kind,
                identity,
            });
        } else {
            self.events_left_out += 1;
        }
    }
}

/// A NIC as the announcer sees it: any model behind `net::Nic`.
pub type SharedNic = Arc<Mutex<dyn Nic + Send>>;

pub struct Announcer {
    nets: Vec<SharedNic>,
    schedules: Vec<Schedule>,
    /// RARPs still to send: (NIC, identity), in order.
    outbox: std::collections::VecDeque<(usize, net::Identity)>,
    timer: TimerFd,
    log: AnnounceLog,
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor this process owns; only status flags
    // change.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

impl Announcer {
    pub fn new(nets: Vec<SharedNic>) -> std::io::Result<Self> {
        let timer = TimerFd::new().map_err(std::io::Error::from)?;
        // A timer re-armed between epoll and the read must not block the loop.
        set_nonblocking(timer.as_raw_fd());
        Ok(Self {
            nets,
            schedules: Vec::new(),
            outbox: Default::default(),
            timer,
            log: AnnounceLog::default(),
        })
    }

    /// Nothing scheduled or queued: every announce asked for is done.
    pub fn idle(&self) -> bool {
        self.schedules.is_empty() && self.outbox.is_empty()
    }

    pub fn log(&self) -> AnnounceLog {
        self.log.clone()
    }

    /// NIC indexes by id; all NICs when `ids` is empty.
    pub fn nic_indexes(&self, ids: &[String]) -> Result<Vec<usize>, String> {
        if ids.is_empty() {
            return Ok((0..self.nets.len()).collect());
        }
        ids.iter()
            .map(|id| {
                self.nets
                    .iter()
                    .position(|n| lock(n).id() == id)
                    .ok_or_else(|| format!("no NIC called {id}"))
            })
            .collect()
    }

    /// Starts (or restarts: same id) a schedule on `nics`; the first round
    /// goes out now.
    pub fn start(&mut self, id: &str, nics: &[usize], params: AnnounceParams) {
        self.schedules.retain(|s| s.id != id);
        if params.rounds == 0 {
            self.rearm();
            return;
        }
        let now = Instant::now();
        for &nic in nics {
            // A NIC announces on one schedule at a time: the newest.
            self.schedules.retain(|s| s.nic != nic);
            self.schedules.push(Schedule {
                id: id.to_string(),
                nic,
                params,
                done: 0,
                next_due: Some(now),
                waiting_since: None,
                mark: 0,
                check_due: None,
            });
        }
        self.run_due();
    }

    /// Drops every schedule (a new migration starts).
    pub fn cancel_all(&mut self) {
        for s in &self.schedules {
            if let Some(n) = self.nets.get(s.nic) {
                lock(n).cancel_announce();
            }
        }
        self.schedules.clear();
        self.outbox.clear();
        self.rearm();
    }

    fn round(&mut self, idx: usize) {
        let now = Instant::now();
        let s = &mut self.schedules[idx];
        let Some(nic) = self.nets.get(s.nic) else {
            return;
        };
        let mut dev = lock(nic);
        // A reset of the device since the last round cancelled it.
        if s.done > 0 && dev.announce_rounds_left() == 0 {
            s.next_due = None;
            s.done = s.params.rounds;
            return;
        }
        s.done += 1;
        dev.set_announce_rounds_left(s.params.rounds - s.done);
        s.mark = dev.mark_senders();
        if dev.ask_guest_to_announce() {
            self.log.guest_requests += 1;
            self.log.event(dev.id(), "guest-asked", None);
            s.waiting_since = Some(now);
            s.next_due = None;
        } else {
            let (plan, left_out) = dev.rarp_plan();
            self.log.left_out += left_out as u64;
            let n = s.nic;
            self.outbox.extend(plan.into_iter().map(|id| (n, id)));
            s.next_due = (s.done < s.params.rounds).then(|| now + s.params.pause_after(s.done));
        }
        self.log.rounds += 1;
        self.log.first_round_at.get_or_insert(now);
        log::info!(
            "{}: announce round {} of {}",
            dev.id(),
            s.done,
            s.params.rounds
        );
    }

    /// The guest had its chance in the round: RARPs for what it left out.
    fn check_guest(&mut self, idx: usize) {
        let s = &mut self.schedules[idx];
        s.check_due = None;
        let Some(nic) = self.nets.get(s.nic) else {
            return;
        };
        let dev = lock(nic);
        let since = dev.senders_since(s.mark);
        for id in &since {
            self.log.event(dev.id(), "guest", Some(*id));
        }
        let announced: std::collections::HashSet<net::Identity> = since.into_iter().collect();
        let (plan, left_out) = dev.rarp_plan();
        let silent: Vec<net::Identity> = plan
            .into_iter()
            .filter(|id| !announced.contains(id))
            .collect();
        if !silent.is_empty() {
            log::info!(
                "{}: the guest did not announce {} of its identities; RARPs for them",
                dev.id(),
                silent.len()
            );
        }
        self.log.rarps_for_silent += silent.len() as u64;
        self.log.left_out += left_out as u64;
        let n = s.nic;
        self.outbox.extend(silent.into_iter().map(|id| (n, id)));
    }

    /// Sends at most [`BATCH`] queued RARPs.
    fn send_batch(&mut self) {
        let started = Instant::now();
        for _ in 0..BATCH {
            let Some((nic, (mac, vlan))) = self.outbox.pop_front() else {
                break;
            };
            let Some(n) = self.nets.get(nic) else {
                continue;
            };
            let mut dev = lock(n);
            match dev.send_raw(&net::rarp::rarp_frame(mac, vlan)) {
                Ok(()) => {
                    self.log.rarp_frames += 1;
                    self.log.event(dev.id(), "rarp", Some((mac, vlan)));
                }
                Err(e) => log::debug!("announce: RARP for {mac} on {vlan:?}: {e}"),
            }
        }
        self.log.longest_batch = self.log.longest_batch.max(started.elapsed());
    }

    fn run_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.schedules.len() {
            let s = &mut self.schedules[i];
            if s.waiting_since.is_some_and(|t| now >= t + ACK_PATIENCE) {
                log::info!("announce: no ANNOUNCE_ACK within {ACK_PATIENCE:?}; going on");
                s.waiting_since = None;
                // A wedged driver announced nothing: RARPs now.
                s.check_due = Some(now);
                s.next_due = (s.done < s.params.rounds).then_some(now);
            }
            if s.next_due.is_some_and(|t| t <= now) {
                self.round(i);
            }
            if self.schedules[i].check_due.is_some_and(|t| t <= now) {
                self.check_guest(i);
            }
        }
        self.schedules.retain(|s| {
            s.done < s.params.rounds || s.waiting_since.is_some() || s.check_due.is_some()
        });
        self.send_batch();
        self.rearm();
    }

    /// The guest acknowledged on NIC `nic`: its next round is due after
    /// the schedule's pause.
    fn acked(&mut self, nic: usize) {
        let now = Instant::now();
        if let Some(n) = self.nets.get(nic) {
            let id = lock(n).id().to_string();
            self.log.event(&id, "guest-acked", None);
        }
        for s in self
            .schedules
            .iter_mut()
            .filter(|s| s.nic == nic && s.waiting_since.is_some())
        {
            s.waiting_since = None;
            // Before the next round takes a new mark.
            s.check_due = Some(now + GUEST_GRACE.min(s.params.pause_after(s.done)));
            s.next_due = (s.done < s.params.rounds).then(|| now + s.params.pause_after(s.done));
        }
        self.run_due();
    }

    fn rearm(&mut self) {
        let now = Instant::now();
        let next = self
            .schedules
            .iter()
            .flat_map(|s| {
                let waiting = match (s.next_due, s.waiting_since) {
                    (Some(t), _) => Some(t),
                    (None, Some(w)) => Some(w + ACK_PATIENCE),
                    _ => None,
                };
                waiting.into_iter().chain(s.check_due)
            })
            // More RARPs queued: the next batch after whatever else the
            // loop has to do.
            .chain((!self.outbox.is_empty()).then_some(now))
            .min();
        let result = match next {
            // A zero duration would disarm the timer: at least 1 µs.
            Some(t) => self.timer.reset(
                t.saturating_duration_since(now)
                    .max(Duration::from_micros(1)),
                None,
            ),
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            log::error!("announce timer: {e}");
        }
    }
}

/// The announcer on the event loop: its timer and each NIC's ack.
pub struct AnnouncerHandler {
    announcer: Arc<Mutex<Announcer>>,
    timer_fd: RawFd,
    /// Per NIC, by index: its ack's descriptor, if the model has one.
    ack_fds: Vec<Option<RawFd>>,
}

impl AnnouncerHandler {
    pub fn new(announcer: Arc<Mutex<Announcer>>) -> Self {
        let a = lock(&announcer);
        let timer_fd = a.timer.as_raw_fd();
        let ack_fds = a.nets.iter().map(|n| lock(n).announce_ack_fd()).collect();
        drop(a);
        Self {
            announcer,
            timer_fd,
            ack_fds,
        }
    }
}

impl MutEventSubscriber for AnnouncerHandler {
    fn init(&mut self, ops: &mut EventOps) {
        for &fd in std::iter::once(&self.timer_fd).chain(self.ack_fds.iter().flatten()) {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("announce: cannot watch fd {fd}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        let mut drain = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer from a
        // non-blocking timerfd/eventfd this handler watches.
        unsafe { libc::read(fd, drain.as_mut_ptr().cast(), drain.len()) };
        let mut a = lock(&self.announcer);
        match self.ack_fds.iter().position(|&f| f == Some(fd)) {
            Some(nic) => a.acked(nic),
            None => a.run_due(),
        }
    }
}
