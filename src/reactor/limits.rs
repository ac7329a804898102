//! Bounds on what a stranger can make the reactor hold or do: connections per address
//! and per network, failed attempts per address in a window, idle connections, and the
//! unsent output of all connections together.
//!
//! [`Windows`] is the reusable part: counters per key in fixed windows, kept in a map
//! that [`Windows::prune`] empties of ended windows, so an address that stopped costs
//! nothing. The rest is the reactor's once-a-second sweep and the drop of a connection
//! with `-ERR BUSY`.

use super::conn::State;
use super::Reactor;
use crate::protocol::{self, Code};
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Slab keys the sweep looks at per loop turn, so that 10,000 connections never make
/// one turn long.
const SWEEP_BATCH: usize = 1024;

/// A connection dropped with `-ERR BUSY` gets this many seconds to take its last line
/// (the socket may be full); then it is closed whatever it took.
const DROP_LINGER: u32 = 10;

/// Failed AUTHs are counted in windows this long, in seconds (PROTOCOL.md: per minute).
pub const AUTH_WINDOW: u32 = 60;

/// SUB and UNSUB of untrusted connections are counted in windows this long, in seconds
/// (`sub_rate` is per minute).
pub const SUB_WINDOW: u32 = 60;

/// One client address as the per-address limits count it: an IPv4 address, or the /64
/// of an IPv6 one (one host usually holds a whole /64). IPv4-mapped IPv6 is IPv4.
#[derive(Debug, Hash, PartialEq, Eq, Clone, Copy)]
pub enum AddrKey {
    /// An IPv4 address.
    V4(u32),
    /// The upper 64 bits of an IPv6 address.
    V6(u64),
}

/// One client network as the per-network limits count it: an IPv4 /24 or an IPv6 /48.
#[derive(Debug, Hash, PartialEq, Eq, Clone, Copy)]
pub enum NetKey {
    /// The upper 24 bits of an IPv4 address.
    V4(u32),
    /// The upper 48 bits of an IPv6 address.
    V6(u64),
}

/// The address key of `ip`.
pub fn addr_key(ip: IpAddr) -> AddrKey {
    match unmap(ip) {
        IpAddr::V4(a) => AddrKey::V4(a.into()),
        IpAddr::V6(a) => AddrKey::V6((u128::from(a) >> 64) as u64),
    }
}

/// The network key of `ip`.
pub fn net_key(ip: IpAddr) -> NetKey {
    match unmap(ip) {
        IpAddr::V4(a) => NetKey::V4(u32::from(a) >> 8),
        IpAddr::V6(a) => NetKey::V6((u128::from(a) >> 80) as u64),
    }
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Counts per key in fixed windows of `len` seconds, each starting at its key's first
/// count. Time is the caller's coarse clock in whole seconds, so the type does no I/O
/// and its tests need no sleeps.
pub struct Windows<K> {
    len: u32,
    map: HashMap<K, Window>,
}

#[derive(Clone, Copy)]
struct Window {
    start: u32,
    count: u32,
}

impl<K: Hash + Eq + Copy> Windows<K> {
    /// Windows of `len` seconds.
    pub fn new(len: u32) -> Windows<K> {
        Windows { len, map: HashMap::new() }
    }

    fn live(&self, key: &K, now: u32) -> Option<&Window> {
        self.map.get(key).filter(|w| now.saturating_sub(w.start) < self.len)
    }

    /// How many counts `key` has in its window running at `now` (0 when none runs).
    pub fn count(&self, key: &K, now: u32) -> u32 {
        self.live(key, now).map_or(0, |w| w.count)
    }

    /// Whether `key` has reached `limit` in its window running at `now`.
    pub fn over(&self, key: &K, now: u32, limit: u32) -> bool {
        self.count(key, now) >= limit
    }

    /// Seconds left in `key`'s window at `now` (0 when none runs).
    pub fn left(&self, key: &K, now: u32) -> u32 {
        self.live(key, now).map_or(0, |w| self.len - now.saturating_sub(w.start))
    }

    /// Counts one for `key` at `now`, starting a new window if none runs; returns the
    /// count in the window.
    pub fn hit(&mut self, key: K, now: u32) -> u32 {
        let len = self.len;
        let w = self.map.entry(key).or_insert(Window { start: now, count: 0 });
        if now.saturating_sub(w.start) >= len {
            *w = Window { start: now, count: 0 };
        }
        w.count = w.count.saturating_add(1);
        w.count
    }

    /// Forgets every window that has ended by `now`. Call it about once a window: a key
    /// is then held at most two windows after its last count.
    pub fn prune(&mut self, now: u32) {
        let len = self.len;
        self.map.retain(|_, w| now.saturating_sub(w.start) < len);
        if self.map.is_empty() && self.map.capacity() > 0 {
            self.map = HashMap::new();
        }
    }

    /// No key held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// What the once-a-second sweep keeps between turns.
pub(super) struct Sweep {
    /// When the reactor started; the coarse clock counts whole seconds from it.
    epoch: Instant,
    /// The coarse clock: whole seconds since `epoch`, set once per loop turn.
    pub(super) tick: u32,
    /// When the next batch is due.
    pub(super) due: Instant,
    /// The next slab key to look at.
    cursor: usize,
    /// When the failed-AUTH windows are next pruned, on the coarse clock.
    prune_at: u32,
    /// Failed AUTHs per address.
    pub(super) auth_fails: Windows<AddrKey>,
    /// Wrong CONFIRM, OPTOUT and UNSUB codes per address: a counter apart from AUTH's,
    /// with the same limit.
    pub(super) code_fails: Windows<AddrKey>,
    /// SUB and UNSUB of untrusted connections per address (`sub_rate`).
    pub(super) subs_by_addr: Windows<AddrKey>,
    /// The same per network (ten times `sub_rate`).
    pub(super) subs_by_net: Windows<NetKey>,
    /// Connections dropped with `-ERR BUSY` and not yet closed.
    pub(super) lingering: usize,
}

impl Sweep {
    pub(super) fn new() -> Sweep {
        let now = Instant::now();
        Sweep {
            epoch: now,
            tick: 0,
            due: now,
            cursor: 0,
            prune_at: AUTH_WINDOW,
            auth_fails: Windows::new(AUTH_WINDOW),
            code_fails: Windows::new(AUTH_WINDOW),
            subs_by_addr: Windows::new(SUB_WINDOW),
            subs_by_net: Windows::new(SUB_WINDOW),
            lingering: 0,
        }
    }

    /// Nothing counted in any window.
    fn counts_nothing(&self) -> bool {
        self.auth_fails.is_empty()
            && self.code_fails.is_empty()
            && self.subs_by_addr.is_empty()
            && self.subs_by_net.is_empty()
    }

    /// Counts one stored-subscription command of an untrusted client at `ip`, unless its
    /// address has made `rate` in its minute or its network ten times that; then `Err`
    /// with the seconds until it may try again, and nothing is counted. `Ok(true)`: this
    /// one reached a limit, which the caller logs (so once per address or network and
    /// window).
    pub(super) fn take_sub(&mut self, ip: IpAddr, rate: u32) -> Result<bool, u32> {
        let (addr, net) = (addr_key(ip), net_key(ip));
        let now = self.tick;
        let net_rate = rate.saturating_mul(10);
        let addr_over = self.subs_by_addr.over(&addr, now, rate);
        let net_over = self.subs_by_net.over(&net, now, net_rate);
        if addr_over || net_over {
            let wait = |over: bool, left: u32| if over { left } else { 0 };
            let wait = wait(addr_over, self.subs_by_addr.left(&addr, now))
                .max(wait(net_over, self.subs_by_net.left(&net, now)));
            return Err(wait.max(1));
        }
        let by_addr = self.subs_by_addr.hit(addr, now);
        let by_net = self.subs_by_net.hit(net, now);
        Ok(by_addr == rate || by_net == net_rate)
    }

    /// Sets the coarse clock; once per loop turn, right after the poll.
    pub(super) fn set_clock(&mut self, now: Instant) {
        self.tick = u32::try_from(now.saturating_duration_since(self.epoch).as_secs()).unwrap_or(u32::MAX);
    }
}

impl Reactor {
    /// When the sweep next needs the loop to wake; `None` when it has nothing to do.
    pub(super) fn sweep_due(&self) -> Option<Instant> {
        let s = &self.clients.sweep;
        let idle = self.cfg.idle_timeout > 0 && !self.clients.conns.is_empty();
        (idle || s.lingering > 0 || !s.counts_nothing()).then_some(s.due)
    }

    /// Closes idle connections and lingering dropped ones, a batch of keys per turn, a
    /// full pass about once a second; prunes the counting windows once a minute.
    pub(super) fn sweep(&mut self, now: Instant) {
        match self.sweep_due() {
            Some(due) if now >= due => {}
            _ => return,
        }
        let tick = self.clients.sweep.tick;
        if tick >= self.clients.sweep.prune_at {
            let s = &mut self.clients.sweep;
            s.auth_fails.prune(tick);
            s.code_fails.prune(tick);
            s.subs_by_addr.prune(tick);
            s.subs_by_net.prune(tick);
            self.clients.sweep.prune_at = tick + AUTH_WINDOW;
        }
        let idle = self.cfg.idle_timeout;
        let start = self.clients.sweep.cursor;
        let end = (start + SWEEP_BATCH).min(self.clients.key_limit);
        for key in start..end {
            let Some(c) = self.clients.conns.get(key) else { continue };
            let quiet = tick.saturating_sub(c.last_cmd);
            if c.lingering {
                if quiet > DROP_LINGER {
                    log::debug!("{}: did not take its last line in {DROP_LINGER} s; closing", c.peer);
                    self.clients.close(key);
                }
            } else if idle > 0
                && quiet > idle
                && c.state == State::Open
                && !c.paused
                && c.slots.is_empty()
                && !c.is_subscriber()
            {
                // `>`: the clock is coarse, so `quiet > idle` is more than `idle` seconds.
                log::debug!("{}: no command for {idle} s; closing", c.peer);
                self.drop_conn(key, Dropped::Idle);
            }
        }
        if end >= self.clients.key_limit {
            self.clients.sweep.cursor = 0;
            self.clients.sweep.due = now + Duration::from_secs(1);
        } else {
            // More keys to look at: the next turn goes on at once.
            self.clients.sweep.cursor = end;
        }
    }

    /// Ends a connection with `-ERR BUSY <why>`: no more commands are read and no more
    /// `MSG` is queued to it; what the socket has begun of a line is kept, the rest of its
    /// output dropped (a dropped subscriber resumes with SINCE), the line is written now
    /// as far as the socket takes it, and the connection closes once it is out or after
    /// [`DROP_LINGER`] seconds. The memory it held is given back at once.
    pub(super) fn drop_conn(&mut self, key: usize, why: Dropped) {
        let tick = self.clients.sweep.tick;
        let Some(c) = self.clients.conns.get_mut(key) else { return };
        if c.lingering || c.state == State::Closing {
            return;
        }
        c.unshare(&self.fan);
        // Every line queued ends in LF, so up to the first LF is the line the socket may
        // have begun: kept, so that the client still reads whole lines.
        let keep = c.out.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
        if keep < c.out.len() {
            c.out = c.out[..keep].to_vec();
        }
        c.first_seq += c.slots.len() as u64;
        c.slots = Default::default();
        c.inbuf = Vec::new();
        c.state = State::Draining;
        c.lingering = true;
        c.last_cmd = tick;
        protocol::err(&mut c.out, Code::Busy, why.text());
        if why == Dropped::SlowConsumer {
            self.counters.slow_consumers += 1;
        }
        let dead = c.flush(&[]).is_err();
        // Out of the indexes at once: no MSG reaches it, and under the offline mail
        // policy its addresses stop counting as live (they get their email).
        let subs = std::mem::take(&mut c.subs);
        let trusted = c.live_trusted;
        self.clients.forget_pairs(key, &subs, trusted);
        self.clients.sweep.lingering += 1;
        self.clients.recount(key);
        if dead {
            self.clients.close(key);
        } else {
            self.clients.mark_dirty(key);
        }
    }

    /// Past `max_pending_total`, drops the connections with the most unsent bytes as
    /// slow consumers until the total is back under. Scans the connections, but only
    /// when over the budget, which each scan ends.
    pub(super) fn enforce_total(&mut self) {
        let max = self.cfg.max_pending_total;
        if self.clients.pending_total <= max {
            return;
        }
        let mut big: Vec<(usize, usize)> = self
            .clients
            .conns
            .iter()
            .filter(|(_, c)| !c.lingering && c.state != State::Closing && c.counted > 0)
            .map(|(k, c)| (c.counted, k))
            .collect();
        big.sort_unstable_by(|a, b| b.cmp(a));
        for (unsent, key) in big {
            if self.clients.pending_total <= max {
                break;
            }
            log::warn!(
                "{}: slow consumer: {unsent} unsent bytes while all connections together are over \
                 max_pending_total ({max}); disconnecting",
                self.clients.conns[key].peer
            );
            self.drop_conn(key, Dropped::SlowConsumer);
        }
    }
}

/// Why a connection is dropped with `-ERR BUSY <text>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dropped {
    /// Over `max_pending`, or among the largest when all are over `max_pending_total`.
    SlowConsumer,
    /// No live subscription and no command for `idle_timeout`.
    Idle,
}

impl Dropped {
    /// The text of its `-ERR BUSY` line (notifd-protocol(7)).
    fn text(self) -> &'static str {
        match self {
            Dropped::SlowConsumer => "slow consumer",
            Dropped::Idle => "idle",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_counts_until_it_ends_then_starts_again() {
        let mut w: Windows<u8> = Windows::new(60);
        assert_eq!(w.count(&1, 100), 0);
        assert!(!w.over(&1, 100, 1));
        for i in 1..=10 {
            assert_eq!(w.hit(1, 100 + i), i);
        }
        assert!(w.over(&1, 159, 10) && !w.over(&1, 159, 11));
        assert_eq!(w.left(&1, 150), 11);
        assert_eq!(w.count(&2, 150), 0, "keys are counted apart");
        // The window started at 101: at 161 it has ended, and a hit starts a new one.
        assert_eq!(w.count(&1, 160), 10);
        assert_eq!(w.count(&1, 161), 0);
        assert!(!w.over(&1, 161, 10));
        assert_eq!(w.left(&1, 161), 0);
        assert_eq!(w.hit(1, 161), 1);
        assert_eq!(w.count(&1, 220), 1);
        assert_eq!(w.count(&1, 221), 0);
    }

    #[test]
    fn pruning_forgets_ended_windows_only() {
        let mut w: Windows<u32> = Windows::new(60);
        for k in 0..1000 {
            w.hit(k, k / 10);
        }
        assert_eq!(w.map.len(), 1000);
        // At 60 the windows started at 0 (keys 0..10) have ended.
        w.prune(60);
        assert_eq!(w.map.len(), 990);
        assert_eq!(w.count(&10, 60), 1);
        w.prune(99 + 60);
        assert!(w.is_empty());
        assert_eq!(w.map.capacity(), 0, "an emptied map gives its memory back");
        // A pruned key starts afresh.
        assert_eq!(w.hit(5, 200), 1);
    }

    #[test]
    fn sub_rate_counts_per_address_and_ten_times_per_network() {
        let mut s = Sweep::new();
        let ip = |last: u8| IpAddr::from([192, 0, 2, last]);
        s.tick = 100;
        assert_eq!(s.take_sub(ip(1), 2), Ok(false));
        assert_eq!(s.take_sub(ip(1), 2), Ok(true), "the second reaches the limit");
        assert_eq!(s.take_sub(ip(1), 2), Err(60));
        s.tick = 130;
        assert_eq!(s.take_sub(ip(1), 2), Err(30), "refusals are not counted and say when");
        // Other addresses of the /24 share the network's 20.
        let mut taken = 2;
        for last in 2..=20 {
            while s.take_sub(ip(last), 2).is_ok() {
                taken += 1;
            }
        }
        assert_eq!(taken, 20);
        assert_eq!(s.take_sub(IpAddr::from([192, 0, 3, 1]), 2), Ok(false), "another /24");
        s.tick = 160;
        assert_eq!(s.take_sub(ip(1), 2), Ok(false), "a new minute");
    }

    #[test]
    fn keys_group_addresses_and_networks() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(addr_key(ip("192.0.2.1")), addr_key(ip("::ffff:192.0.2.1")));
        assert_ne!(addr_key(ip("192.0.2.1")), addr_key(ip("192.0.2.2")));
        assert_eq!(addr_key(ip("2001:db8:1:2::1")), addr_key(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(addr_key(ip("2001:db8:1:2::1")), addr_key(ip("2001:db8:1:3::1")));
        assert_eq!(net_key(ip("127.0.0.1")), net_key(ip("127.0.0.2")));
        assert_eq!(net_key(ip("127.0.0.1")), net_key(ip("::ffff:127.0.0.200")));
        assert_ne!(net_key(ip("127.0.0.1")), net_key(ip("127.0.1.1")));
        assert_eq!(net_key(ip("2001:db8:1:2::1")), net_key(ip("2001:db8:1:ffff::1")));
        assert_ne!(net_key(ip("2001:db8:1::1")), net_key(ip("2001:db8:2::1")));
        assert_ne!(net_key(ip("0.0.0.1")), net_key(ip("::1")), "families never share a key");
    }
}
