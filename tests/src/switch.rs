//! The announce topology of issue #7: a "switch" namespace with a bridge,
//! hosts A and B each joined to it by a veth trunk (a bridge on each host
//! puts the guest's TAP on that trunk), a "client" namespace on the switch
//! (198.18.0.10/24), and the migration link between A and B of
//! [`TwoHosts`].
//!
//! ```text
//!   client ──cl0── to-client ┐
//!                 [sw: br0]  ├─ to-a ── trunk [A: br0] tap0  (guest before)
//!                            └─ to-b ── trunk [B: br0] tapb  (guest after)
//!   A vha 198.18.1.1 ──────── migration link ──────── vhb 198.18.1.2 B
//! ```
//!
//! The bridges are VLAN-unaware: the development kernels have neither
//! 802.1Q nor bridge `vlan_filtering`, so tagged frames cross them
//! untouched and the switch learns per MAC, not per MAC and VLAN. VLAN 100
//! traffic is made and checked with packet sockets ([`Pinger`]).
//!
//! Also here: [`Pinger`], ICMP echo to each guest identity every interval
//! from the client, and [`FdbMonitor`], the switch's forwarding-database
//! changes as they happen (`bridge monitor fdb`).

use std::io::{self, BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_probe_packets::ipv4::{write_icmp_echo_frame, Endpoints};
use ferry_probe_packets::{Arp, ArpOp, Ethernet, IcmpEcho, Ipv4, Ipv4Addr, MacAddr};

use crate::hosts::{TwoHosts, A_TAP, B_TAP};
use crate::netns::{Netns, PacketSocket};

pub const SWITCH_BRIDGE: &str = "br0";
/// The switch's port toward host A, toward host B, toward the client.
pub const PORT_A: &str = "to-a";
pub const PORT_B: &str = "to-b";
pub const PORT_CLIENT: &str = "to-client";
/// The client's interface and addresses (untagged, and what it uses as
/// its own address on VLAN 100).
pub const CLIENT_IF: &str = "cl0";
pub const CLIENT_ADDR: &str = "198.18.0.10";
pub const CLIENT_VLAN_ADDR: &str = "198.18.100.10";

/// One address of the guest as the network sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: &'static str,
    pub mac: &'static str,
    pub vlan: Option<u16>,
    pub ip: &'static str,
}

/// The probe's three identities of `probe::checks::network_cmdline`, with
/// the device MAC `checks::GUEST_MAC` (give it to `--net mac=`).
pub fn probe_identities() -> Vec<Identity> {
    use crate::probe::checks::{GUEST_MAC, SECOND_MAC, VLAN, VLAN_MAC};
    vec![
        Identity {
            name: "device MAC",
            mac: GUEST_MAC,
            vlan: None,
            ip: "198.18.0.2",
        },
        Identity {
            name: "second MAC",
            mac: SECOND_MAC,
            vlan: None,
            ip: "198.18.0.3",
        },
        Identity {
            name: "VLAN 100",
            mac: VLAN_MAC,
            vlan: Some(VLAN),
            ip: "198.18.100.2",
        },
    ]
}

/// The topology above; every namespace (and any process left in one) goes
/// when it is dropped.
pub struct Switch {
    /// A and B, and the migration link between them.
    pub hosts: TwoHosts,
    pub sw: Netns,
    pub client: Netns,
}

fn no_ipv6(ns: &Netns) {
    // Router solicitations and DAD from link-local addresses would only
    // add noise to the captures.
    let _ = ns.run(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    let _ = ns.run(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
}

impl Switch {
    /// Builds it; the TAPs (`hosts::A_TAP` on A, `hosts::B_TAP` on B) are
    /// bridge ports without addresses.
    pub fn new(test: &str) -> Switch {
        let sw = Netns::new(&format!("{test}sw")).expect("netns sw");
        let client = Netns::new(&format!("{test}cl")).expect("netns client");
        no_ipv6(&sw);
        no_ipv6(&client);
        let hosts = TwoHosts::linked(test);
        sw.add_bridge(SWITCH_BRIDGE).expect("switch bridge");
        for (ns, port, tap) in [(&hosts.a, PORT_A, A_TAP), (&hosts.b, PORT_B, B_TAP)] {
            no_ipv6(ns);
            Netns::veth_pair(&sw, port, ns, "trunk").expect("trunk");
            sw.add_to_bridge(port, SWITCH_BRIDGE).expect("switch port");
            ns.add_bridge("br0").expect("host bridge");
            ns.add_to_bridge("trunk", "br0").expect("trunk port");
            ns.add_tap(tap).expect("tap");
            ns.add_to_bridge(tap, "br0").expect("tap port");
        }
        Netns::veth_pair(&sw, PORT_CLIENT, &client, CLIENT_IF).expect("client veth");
        sw.add_to_bridge(PORT_CLIENT, SWITCH_BRIDGE)
            .expect("client port");
        client
            .add_addr(CLIENT_IF, &format!("{CLIENT_ADDR}/24"))
            .expect("client address");
        Switch { hosts, sw, client }
    }

    /// `bridge fdb show br br0` on the switch: (MAC, port) of the learned
    /// entries (permanent and `self` entries left out).
    pub fn fdb(&self) -> Vec<(String, String)> {
        let text = self
            .sw
            .run(&["bridge", "fdb", "show", "br", SWITCH_BRIDGE])
            .expect("bridge fdb show");
        parse_fdb(&text)
    }

    /// The switch port `mac` was last seen on.
    pub fn port_of(&self, mac: &str) -> Option<String> {
        let mac = mac.to_ascii_lowercase();
        self.fdb()
            .into_iter()
            .find(|(m, _)| *m == mac)
            .map(|(_, port)| port)
    }

    /// The switch's FDB ageing time (`ageing_time`, centiseconds in sysfs).
    pub fn ageing_time(&self) -> Duration {
        let path = format!("/sys/class/net/{SWITCH_BRIDGE}/bridge/ageing_time");
        let cs: u64 = self
            .sw
            .run(&["cat", &path])
            .expect("ageing_time")
            .trim()
            .parse()
            .expect("ageing_time value");
        Duration::from_millis(cs * 10)
    }
}

/// Learned entries of `bridge fdb show` output.
pub fn parse_fdb(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.contains("permanent") && !l.contains(" self"))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let dev = words.iter().position(|w| *w == "dev")?;
            let mac = words.first()?.to_ascii_lowercase();
            Some((mac, words.get(dev + 1)?.to_string()))
        })
        .collect()
}

/// One change of the switch's FDB.
#[derive(Clone, Debug)]
pub struct FdbEvent {
    pub at: SystemTime,
    pub mac: String,
    pub port: String,
    pub deleted: bool,
}

/// `bridge -timestamp monitor fdb` on the switch, its events collected.
pub struct FdbMonitor {
    child: Child,
    events: Arc<Mutex<Vec<FdbEvent>>>,
}

/// Seconds since the epoch of a proleptic Gregorian UTC date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// `Timestamp: Sun Nov 22 01:56:55 2026 709856 usec` (UTC) as a time.
fn parse_monitor_time(line: &str) -> Option<SystemTime> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let (month, day, hms, year, usec) = (w.get(2)?, w.get(3)?, w.get(4)?, w.get(5)?, w.get(6)?);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = MONTHS.iter().position(|x| x == month)? as i64 + 1;
    let days = days_from_civil(year.parse().ok()?, m, day.parse().ok()?);
    let mut t = hms.split(':').map(|v| v.parse::<i64>().ok());
    let secs = days * 86400 + t.next()?? * 3600 + t.next()?? * 60 + t.next()??;
    Some(UNIX_EPOCH + Duration::from_secs(secs as u64) + Duration::from_micros(usec.parse().ok()?))
}

impl FdbMonitor {
    /// Starts the monitor; returns once it reports (a static marker entry
    /// on the client port is added to know it listens).
    pub fn start(switch: &Switch) -> FdbMonitor {
        let mut child = switch
            .sw
            .command("bridge")
            .args(["-timestamp", "monitor", "fdb"])
            .env("TZ", "UTC")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("bridge monitor fdb");
        let out = child.stdout.take().expect("stdout");
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        std::thread::spawn(move || {
            let mut at = None;
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.starts_with("Timestamp:") {
                    at = parse_monitor_time(&line);
                    continue;
                }
                let deleted = line.starts_with("Deleted ");
                let entry = line.trim_start_matches("Deleted ");
                if let (Some(at), Some((mac, port))) = (at, parse_fdb(entry).pop()) {
                    let event = FdbEvent {
                        at,
                        mac,
                        port,
                        deleted,
                    };
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(event);
                }
            }
        });
        let monitor = FdbMonitor { child, events };
        let marker = "02:ff:00:00:00:01";
        let deadline = Instant::now() + Duration::from_secs(10);
        while !monitor.events().iter().any(|e| e.mac == marker) {
            assert!(Instant::now() < deadline, "bridge monitor fdb is silent");
            let _ = switch.sw.exec(&[
                "bridge",
                "fdb",
                "replace",
                marker,
                "dev",
                PORT_CLIENT,
                "master",
                "static",
            ]);
            std::thread::sleep(Duration::from_millis(50));
        }
        monitor
    }

    pub fn events(&self) -> Vec<FdbEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// When `mac` was first (re)learned on `port` at or after `since`.
    pub fn moved_to(&self, mac: &str, port: &str, since: SystemTime) -> Option<SystemTime> {
        let mac = mac.to_ascii_lowercase();
        self.events()
            .into_iter()
            .find(|e| e.mac == mac && e.port == port && !e.deleted && e.at >= since)
            .map(|e| e.at)
    }
}

impl Drop for FdbMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What [`PingLog::outage_after`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outage {
    /// Every request was answered.
    NoLoss { first_reply: Option<SystemTime> },
    /// `lost` requests from `lost_from` went unanswered, then `reply`.
    Recovered {
        lost: usize,
        lost_from: SystemTime,
        reply: SystemTime,
    },
    /// Unanswered from `lost_from` to the end of the log.
    Never { lost: usize, lost_from: SystemTime },
}

/// Echo requests and replies per identity.
#[derive(Clone, Debug, Default)]
pub struct PingLog {
    /// Per identity, per sequence number: when sent, when answered.
    pub sent: Vec<Vec<(SystemTime, Option<SystemTime>)>>,
}

impl PingLog {
    /// Requests to identity `i` sent in `[from, to)` that got no reply.
    pub fn lost(&self, i: usize, from: SystemTime, to: SystemTime) -> usize {
        self.lost_at(i, from, to).len()
    }

    /// Send times of the requests to identity `i` in `[from, to)` that got
    /// no reply.
    pub fn lost_at(&self, i: usize, from: SystemTime, to: SystemTime) -> Vec<SystemTime> {
        self.sent[i]
            .iter()
            .filter(|(at, reply)| *at >= from && *at < to && reply.is_none())
            .map(|(at, _)| *at)
            .collect()
    }

    /// The longest run of unanswered requests to identity `i` that ended
    /// with an answer: (send time of its first request, send time of the
    /// first answered one after it).
    pub fn longest_outage(&self, i: usize) -> Option<(SystemTime, SystemTime)> {
        let mut best: Option<(usize, SystemTime, SystemTime)> = None;
        let mut run: Option<(usize, SystemTime)> = None;
        for (at, reply) in &self.sent[i] {
            match (reply, run) {
                (None, None) => run = Some((1, *at)),
                (None, Some((n, from))) => run = Some((n + 1, from)),
                (Some(_), Some((n, from))) => {
                    if best.is_none_or(|(m, _, _)| n > m) {
                        best = Some((n, from, *at));
                    }
                    run = None;
                }
                (Some(_), None) => {}
            }
        }
        best.map(|(_, from, to)| (from, to))
    }

    /// How identity `i` came through an event at `from` (a migration):
    /// the first run of unanswered requests sent from then on, and the
    /// first reply after it. A migration that loses no request is not an
    /// identity that never recovered: `NoLoss`, with the first reply.
    /// Requests sent from `until` on are left out: the last ones may be
    /// on their way back when the log is taken.
    pub fn outage_after(&self, i: usize, from: SystemTime, until: SystemTime) -> Outage {
        let after: Vec<&(SystemTime, Option<SystemTime>)> = self.sent[i]
            .iter()
            .filter(|(at, _)| *at >= from && *at < until)
            .collect();
        let Some(first_lost) = after.iter().position(|(_, r)| r.is_none()) else {
            return Outage::NoLoss {
                first_reply: after.iter().find_map(|(_, r)| *r),
            };
        };
        let lost_from = after[first_lost].0;
        match after[first_lost..].iter().position(|(_, r)| r.is_some()) {
            Some(k) => Outage::Recovered {
                lost: k,
                lost_from,
                reply: after[first_lost + k].1.unwrap_or(lost_from),
            },
            None => Outage::Never {
                lost: after.len() - first_lost,
                lost_from,
            },
        }
    }

    /// The first reply from identity `i` to a request sent after `after`.
    pub fn first_reply_after(&self, i: usize, after: SystemTime) -> Option<SystemTime> {
        self.sent[i]
            .iter()
            .filter(|(at, _)| *at > after)
            .find_map(|(_, reply)| *reply)
    }
}

/// ICMP echo from the client to every identity each interval, all through
/// a packet socket on the client's interface (hand-made frames, tagged for
/// VLAN identities; no ARP needed: each request names the identity's
/// MAC). It answers ARP requests for the client's VLAN address, which the
/// client's kernel cannot (no 802.1Q): a Linux guest asks before replying.
pub struct Pinger {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<PingLog>>,
    thread: Option<std::thread::JoinHandle<io::Result<io::Result<()>>>>,
}

fn parse_mac(text: &str) -> MacAddr {
    MacAddr::parse(text).unwrap_or_else(|| panic!("bad MAC {text}"))
}

fn parse_ip(text: &str) -> Ipv4Addr {
    Ipv4Addr::parse(text).unwrap_or_else(|| panic!("bad address {text}"))
}

const PING_ID_BASE: u16 = 0x4600;

impl Pinger {
    pub fn start(switch: &Switch, ids: &[Identity], every: Duration) -> Pinger {
        let client_mac = parse_mac(&switch.client.mac(CLIENT_IF).expect("client MAC"));
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(PingLog {
            sent: vec![Vec::new(); ids.len()],
        }));
        let ids = ids.to_vec();
        let (stop2, log2) = (stop.clone(), log.clone());
        let thread = switch.client.spawn_in(move || -> io::Result<()> {
            let sock = PacketSocket::open(CLIENT_IF)?;
            let mut next = Instant::now();
            let mut seq: u16 = 0;
            while !stop2.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    for (i, id) in ids.iter().enumerate() {
                        let src = if id.vlan.is_some() {
                            CLIENT_VLAN_ADDR
                        } else {
                            CLIENT_ADDR
                        };
                        let ends = Endpoints {
                            src_mac: client_mac,
                            dst_mac: parse_mac(id.mac),
                            vlan: id.vlan,
                            src_ip: parse_ip(src),
                            dst_ip: parse_ip(id.ip),
                        };
                        let echo = IcmpEcho {
                            is_request: true,
                            id: PING_ID_BASE + i as u16,
                            seq,
                            data: b"ferry announce ping",
                        };
                        let mut frame = [0u8; 128];
                        let n = write_icmp_echo_frame(&mut frame, &ends, seq, &echo)
                            .map_err(|e| io::Error::other(format!("{e:?}")))?;
                        let at = SystemTime::now();
                        sock.send(&frame[..n])?;
                        log2.lock().unwrap_or_else(|p| p.into_inner()).sent[i].push((at, None));
                    }
                    seq = seq.wrapping_add(1);
                    next += every;
                    // Starved (a busy host): carry on from now rather than
                    // send the missed rounds in one burst.
                    if next < Instant::now() {
                        next = Instant::now() + every;
                    }
                }
                let wait = next.saturating_duration_since(Instant::now());
                let Some(frame) = sock.recv(wait.max(Duration::from_micros(100)))? else {
                    continue;
                };
                let at = SystemTime::now();
                let Ok(eth) = Ethernet::parse(&frame) else {
                    continue;
                };
                if eth.src == client_mac {
                    continue;
                }
                if let Ok(arp) = Arp::parse(eth.payload) {
                    // Who has the client's VLAN address? (untagged ARP is
                    // the client kernel's.)
                    if eth.vlan_id().is_some()
                        && arp.op == ArpOp::Request
                        && arp.target_ip == parse_ip(CLIENT_VLAN_ADDR)
                    {
                        let reply = arp.reply_from(client_mac);
                        let mut out = [0u8; 64];
                        if let Ok(n) = reply.write_frame(&mut out, arp.sender_mac, eth.vlan_id()) {
                            sock.send(&out[..n])?;
                        }
                    }
                    continue;
                }
                let Ok(ip) = Ipv4::parse(eth.payload) else {
                    continue;
                };
                let Ok(echo) = IcmpEcho::parse(ip.payload) else {
                    continue;
                };
                let i = echo.id.wrapping_sub(PING_ID_BASE) as usize;
                if echo.is_request || i >= ids.len() || ip.src != parse_ip(ids[i].ip) {
                    continue;
                }
                if ids[i].vlan != eth.vlan_id() {
                    continue;
                }
                let mut log = log2.lock().unwrap_or_else(|p| p.into_inner());
                // Request k carried seq k mod 65536: the latest such k.
                let sent = &mut log.sent[i];
                let last = sent.len().saturating_sub(1);
                let back = (last as u16).wrapping_sub(echo.seq) as usize;
                if let Some(entry) = last.checked_sub(back).and_then(|k| sent.get_mut(k)) {
                    entry.1.get_or_insert(at);
                }
            }
            Ok(())
        });
        Pinger {
            stop,
            log,
            thread: Some(thread),
        }
    }

    pub fn log(&self) -> PingLog {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until every identity answered a request sent after `after`;
    /// false after `timeout`.
    pub fn wait_all_answer(&self, after: SystemTime, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if (0..log.sent.len()).all(|i| log.first_reply_after(i, after).is_some()) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops sending; returns the log (panics if the thread failed).
    pub fn stop(mut self) -> PingLog {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join()
                .expect("pinger thread")
                .expect("pinger netns")
                .expect("pinger");
        }
        self.log()
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdb_lines_and_monitor_times_are_parsed() {
        let text = "33:33:00:00:00:01 dev br0 self permanent\n\
                    52:54:00:12:34:56 dev to-b master br0 \n\
                    f2:9f:09:6d:a9:e0 dev to-a master br0 permanent\n";
        assert_eq!(
            parse_fdb(text),
            vec![("52:54:00:12:34:56".to_string(), "to-b".to_string())]
        );
        let t = parse_monitor_time("Timestamp: Sun Nov 22 01:57:05 2026 538445 usec").unwrap();
        let d = t.duration_since(UNIX_EPOCH).unwrap();
        assert_eq!((d.as_secs(), d.subsec_micros()), (1795312625, 538445));
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11017);
    }
}
