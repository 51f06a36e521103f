//! Wiring virtio-net to the VMM's event loop: queue notifications
//! (ioeventfds), TAP readiness, and (de)activation by the driver.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use net::NetBackend;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::device::{Net, CTRL_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::bus::lock;
use crate::virtio::mmio::MmioTransport;

pub struct NetEventHandler {
    transport: Arc<Mutex<MmioTransport<Net>>>,
    queue_fds: Vec<i32>,
    activate_fd: i32,
    tap_fd: i32,
    tap_watched: bool,
    /// Ends a hold of the TAP's frames (behind forwarded ones) at its
    /// deadline when no other event comes first.
    hold_timer: Option<TimerFd>,
    hold_armed: Option<std::time::Instant>,
}

impl NetEventHandler {
    pub fn new(transport: Arc<Mutex<MmioTransport<Net>>>) -> Self {
        let (queue_fds, activate_fd, tap_fd) = {
            let t = lock(&transport);
            let net = t.device();
            (
                net.queue_evts().iter().map(|e| e.as_raw_fd()).collect(),
                net.activate_evt().as_raw_fd(),
                net.backend().ready_fd(),
            )
        };
        Self {
            transport,
            queue_fds,
            activate_fd,
            tap_fd,
            tap_watched: false,
            hold_timer: TimerFd::new()
                .map_err(|e| log::warn!("virtio-net: no hold timer: {e}"))
                .ok(),
            hold_armed: None,
        }
    }

    fn hold_timer_fd(&self) -> Option<i32> {
        self.hold_timer.as_ref().map(|t| t.as_raw_fd())
    }

    /// Arms the timer for the device's hold deadline, if it has one.
    fn arm_hold_timer(&mut self, deadline: Option<std::time::Instant>) {
        if deadline == self.hold_armed {
            return;
        }
        let Some(timer) = self.hold_timer.as_mut() else {
            return;
        };
        let armed = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(std::time::Instant::now());
                // A zero duration would disarm the timer.
                timer.reset(left.max(std::time::Duration::from_micros(1)), None)
            }
            None => timer.clear(),
        };
        match armed {
            Ok(()) => self.hold_armed = deadline,
            Err(e) => log::warn!("virtio-net: hold timer: {e}"),
        }
    }

    /// Watches the TAP exactly when the device can take frames: active,
    /// and not waiting for rx buffers.
    fn update_tap_interest(&mut self, want: bool, ops: &mut EventOps) {
        if want == self.tap_watched {
            return;
        }
        let event = Events::new_raw(self.tap_fd, EventSet::IN);
        let result = if want {
            ops.add(event)
        } else {
            ops.remove(event)
        };
        match result {
            Ok(()) => self.tap_watched = want,
            Err(e) => log::error!("virtio-net: TAP interest: {e:?}"),
        }
    }
}

impl MutEventSubscriber for NetEventHandler {
    fn init(&mut self, ops: &mut EventOps) {
        let timer = self.hold_timer_fd();
        for &fd in self
            .queue_fds
            .iter()
            .chain([self.activate_fd].iter())
            .chain(timer.iter())
        {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("virtio-net: cannot watch fd {fd}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let transport = self.transport.clone();
        let mut t = lock(&transport);
        let net = t.device_mut();
        if fd == self.activate_fd {
            let _ = net.activate_evt().read();
            // The guest may have queued work before we watched its queues.
            net.process_ctrl();
            net.process_tx();
            net.process_rx();
        } else if fd == self.tap_fd {
            net.process_rx();
        } else if Some(fd) == self.hold_timer_fd() {
            if let Some(t) = self.hold_timer.as_mut() {
                // Readable: the read returns at once.
                let _ = t.wait();
            }
            self.hold_armed = None;
            net.process_rx();
        } else if let Some(queue) = self.queue_fds.iter().position(|&q| q == fd) {
            if let Some(evt) = net.queue_evts().get(queue) {
                let _ = evt.read();
            }
            match queue {
                RX_QUEUE => {
                    // Answers to what it got first: a guest refilling
                    // its rx ring after a burst may have filled tx too.
                    net.process_tx();
                    net.process_rx_queue_event();
                }
                TX_QUEUE => net.process_tx(),
                CTRL_QUEUE => net.process_ctrl(),
                _ => {}
            }
        }
        let want = net.wants_tap();
        let deadline = net.hold_deadline();
        if let Some(why) = net.take_broken() {
            t.set_needs_reset(&why.to_string());
        }
        drop(t);
        self.update_tap_interest(want, ops);
        self.arm_hold_timer(deadline);
    }
}
