//! WATCH and replay (`SINCE`): the live subscriptions without an email, and the
//! resending of kept notifications to a connection that reconnects.
//!
//! A replay of (connection, event) starts once its command's live part started and its
//! reply is out. It asks the store for one part at a time ("ids above N, at most K"),
//! and only while the connection's queued output is under half of `max_pending`, so a
//! replay of millions of notifications never sits in memory and never makes its
//! connection a slow consumer. Live `MSG`s of that event are held meanwhile; after the
//! last part, those the replay covered are dropped and the rest sent. The store answers
//! in pipe order, so every publication whose id was given before a part was asked for
//! is in it. A store restart sends the part in flight again, from the last id sent.
//!
//! A connection that is not replaying pays one branch on the publish path
//! (`Conn::replay` is `None`).

use super::conn::{Conn, State};
use super::store_link::Target;
use super::Reactor;
use crate::ipc::{ToStore, BATCH_BYTES};
use crate::protocol::{self, Code};
use indexmap::IndexMap;
use std::rc::Rc;

/// At most this many rows per part.
const PART_ROWS: u32 = 10_000;

/// The email of the pair a WATCH holds in `Conn::subs`: no valid address is empty, so
/// it never meets a SUB's pair, and a WATCH and a SUB of one event share delivery.
pub(super) const WATCH: &str = "";

/// Where one replay is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for its command's reply to go out, or for a `max_replays` turn.
    Queued,
    /// Between parts: the next is asked for once the output has room.
    Ready,
    /// The part asked for with this store request is awaited.
    Fetching(u64),
}

/// One replay of one event on one connection.
struct Replay {
    event: Rc<str>,
    /// The reply slot of the command that started it, while that reply may still be
    /// waiting; `None` once it went out.
    reply_seq: Option<u64>,
    /// The last id sent on this connection for the event (at first SINCE's id).
    after: u64,
    /// The highest id replayed (0: none yet); held live lines up to it are dropped.
    top: u64,
    phase: Phase,
    /// Started by a connection that may not publish: it takes one of `max_replays`.
    untrusted: bool,
    /// Live `MSG` lines of the event held meanwhile, and each one's id and end offset.
    held: Vec<u8>,
    held_ends: Vec<(u64, usize)>,
}

/// The replays of one connection (usually one).
#[derive(Default)]
pub(super) struct ConnReplays {
    list: Vec<Replay>,
    held_bytes: usize,
}

impl ConnReplays {
    /// Bytes of held live lines: they count toward `max_pending`.
    pub(super) fn held_bytes(&self) -> usize {
        self.held_bytes
    }
}

/// The connections with a replay, by slab key, with their connection ids.
#[derive(Default)]
pub(super) struct Replays {
    conns: IndexMap<usize, u64>,
}

/// Holds a live `MSG` line of `event` if the connection is replaying that event; true
/// if held. Called on the publish path only for connections with a replay.
pub(super) fn hold(c: &mut Conn, event: &str, id: u64, line: &[u8]) -> bool {
    let Some(cr) = c.replay.as_mut() else { return false };
    let Some(r) = cr.list.iter_mut().find(|r| &*r.event == event) else { return false };
    r.held.extend_from_slice(line);
    r.held_ends.push((id, r.held.len()));
    cr.held_bytes += line.len();
    true
}

/// The reply of the replay's command left the reply slots (whose front is `first_seq`).
fn reply_out(reply_seq: Option<u64>, first_seq: u64) -> bool {
    reply_seq.map_or(true, |s| first_seq > s)
}

/// Bytes queued to the socket, held lines not counted: what pacing looks at.
fn queued(c: &Conn) -> usize {
    c.out.len() + (c.shared.1 - c.shared.0) as usize
}

impl Reactor {
    /// `WATCH <event> [SINCE <id>]`.
    pub(super) fn watch(&mut self, key: usize, event: &str, since: Option<u64>) {
        let fresh = !self.clients.conns[key].subs.has_event(event);
        if !self.add_live(key, event, WATCH) {
            return;
        }
        let c = &mut self.clients.conns[key];
        let seq = (!c.slots.is_empty()).then(|| c.first_seq + c.slots.len() as u64);
        c.reply(&self.fan, |out| protocol::ok(out, "WATCH", event));
        self.clients.mark_dirty(key);
        if let Some(since) = since.filter(|_| fresh) {
            self.begin_replay(key, event, since, seq);
        }
    }

    /// `UNWATCH <event>`: ends the WATCH only (and its replay, if nothing else of this
    /// connection receives the event).
    pub(super) fn unwatch(&mut self, key: usize, event: &str) {
        let c = &mut self.clients.conns[key];
        if c.subs.remove(event, WATCH) && !c.subs.has_event(event) {
            self.clients.unindex(key, event);
            self.end_replay(key, event);
        }
        let c = &mut self.clients.conns[key];
        c.reply(&self.fan, |out| protocol::ok(out, "UNWATCH", event));
        self.clients.mark_dirty(key);
    }

    /// Starts a replay of `event` after `since` on the connection, whose live
    /// subscription of the event just started; `reply_seq` is its command's reply slot.
    pub(super) fn begin_replay(&mut self, key: usize, event: &str, since: u64, reply_seq: Option<u64>) {
        let Some((ev, _)) = self.clients.index.get_key_value(event) else { return };
        let ev = Rc::clone(ev);
        // Trust is not built yet: a connection that may not publish stands for an
        // untrusted one here.
        let untrusted = !self.may_publish(&self.clients.conns[key]);
        let c = &mut self.clients.conns[key];
        let cr = c.replay.get_or_insert_with(Box::default);
        cr.list.push(Replay {
            event: ev,
            reply_seq,
            after: since,
            top: 0,
            phase: Phase::Queued,
            untrusted,
            held: Vec::new(),
            held_ends: Vec::new(),
        });
        self.replays.conns.insert(key, c.id);
    }

    /// Ends the connection's replay of `event`, if any (UNSUB, UNWATCH): its held lines
    /// go with it, and a part still in flight is ignored when it comes.
    pub(super) fn end_replay(&mut self, key: usize, event: &str) {
        let c = &mut self.clients.conns[key];
        let Some(cr) = c.replay.as_mut() else { return };
        if let Some(i) = cr.list.iter().position(|r| &*r.event == event) {
            let r = cr.list.swap_remove(i);
            cr.held_bytes -= r.held.len();
        }
        if cr.list.is_empty() {
            c.replay = None;
        }
    }

    /// Once per turn: starts queued replays and asks for the next parts where the
    /// output has room. Shutdown abandons every replay.
    pub(super) fn pump_replays(&mut self) {
        if self.replays.conns.is_empty() {
            return;
        }
        if self.stopping.is_some() {
            for (key, id) in std::mem::take(&mut self.replays.conns) {
                if let Some(c) = self.clients.conns.get_mut(key).filter(|c| c.id == id) {
                    c.replay = None;
                }
            }
            return;
        }
        let mut running = self.prune_replays();
        let keys: Vec<usize> = self.replays.conns.keys().copied().collect();
        let mut asks: Vec<(usize, u64, Rc<str>, u64)> = Vec::new();
        for key in keys {
            let c = &mut self.clients.conns[key];
            let room = queued(c) < self.cfg.max_pending / 2 && !self.store.congested();
            let first_seq = c.first_seq;
            let Some(cr) = c.replay.as_mut() else { continue };
            for (i, r) in cr.list.iter_mut().enumerate() {
                if r.phase == Phase::Queued && reply_out(r.reply_seq, first_seq) {
                    r.reply_seq = None;
                    if !r.untrusted || running < self.cfg.max_replays as usize {
                        running += usize::from(r.untrusted);
                        r.phase = Phase::Ready;
                    }
                }
                if r.phase == Phase::Ready && room {
                    asks.push((key, i as u64, Rc::clone(&r.event), r.after));
                }
            }
        }
        let max_bytes = (self.cfg.max_pending / 4).clamp(1, BATCH_BYTES) as u32;
        for (key, i, event, after) in asks {
            let conn_id = self.clients.conns[key].id;
            let req = self.send_store(
                |req| ToStore::Replay {
                    req,
                    event: event.to_string(),
                    after,
                    max_rows: PART_ROWS,
                    max_bytes,
                },
                Target::Replay { key, conn_id },
            );
            if let Some(cr) = self.clients.conns[key].replay.as_mut() {
                cr.list[i as usize].phase = Phase::Fetching(req);
            }
        }
    }

    /// Forgets connections that no longer replay (closed, or done); returns how many
    /// untrusted replays are running.
    fn prune_replays(&mut self) -> usize {
        let conns = &self.clients.conns;
        let mut running = 0;
        self.replays.conns.retain(|&key, &mut id| match conns.get(key) {
            Some(c) if c.id == id && c.state != State::Closing => match &c.replay {
                Some(cr) => {
                    running += cr.list.iter().filter(|r| r.untrusted && r.phase != Phase::Queued).count();
                    true
                }
                None => false,
            },
            _ => false,
        });
        running
    }

    /// Whether `pump_replays` has something to do now (the loop must not sleep): a
    /// replay between parts whose output drained, or a queued one that may start.
    pub(super) fn replays_want_turn(&self) -> bool {
        if self.replays.conns.is_empty() || self.store.congested() {
            return false;
        }
        let (mut running, mut trusted, mut untrusted) = (0, false, false);
        for (&key, &id) in &self.replays.conns {
            let Some(c) = self.clients.conns.get(key).filter(|c| c.id == id) else { continue };
            let Some(cr) = &c.replay else { continue };
            let room = queued(c) < self.cfg.max_pending / 2;
            for r in &cr.list {
                match r.phase {
                    Phase::Ready if room => return true,
                    Phase::Ready | Phase::Fetching(_) => running += usize::from(r.untrusted),
                    Phase::Queued if reply_out(r.reply_seq, c.first_seq) => {
                        trusted |= !r.untrusted;
                        untrusted |= r.untrusted;
                    }
                    Phase::Queued => {}
                }
            }
        }
        trusted || untrusted && running < self.cfg.max_replays as usize
    }

    /// One part of a replay from the store: `GAP` if ids from the next one wanted up to
    /// `deleted` may have been deleted, the rows, and after the last part the held
    /// live lines the replay did not cover.
    pub(super) fn replay_part(&mut self, req: u64, rows: Vec<(u64, String)>, deleted: u64, more: bool) {
        let Some(r) = self.store.pending.remove(&req) else { return };
        // Orphan: timed out already (the connection was told).
        let Target::Replay { key, conn_id } = r.target else { return };
        let Some(c) = self.clients.conns.get_mut(key) else { return };
        if c.id != conn_id || c.state == State::Closing {
            return;
        }
        c.unshare(&self.fan);
        let Some(cr) = c.replay.as_mut() else { return };
        // Not found: the replay ended (UNSUB, UNWATCH) while the part was on its way.
        let Some(i) = cr.list.iter().position(|r| r.phase == Phase::Fetching(req)) else { return };
        let r = &mut cr.list[i];
        let from = r.after + 1;
        if deleted >= from {
            protocol::gap(&mut c.out, &r.event, from, deleted);
        }
        for (id, text) in &rows {
            protocol::msg(&mut c.out, &r.event, *id, text);
        }
        if let Some(&(last, _)) = rows.last() {
            r.after = last;
            r.top = last;
        }
        if more {
            r.phase = Phase::Ready;
        } else {
            let r = cr.list.swap_remove(i);
            cr.held_bytes -= r.held.len();
            let covered = r.held_ends.partition_point(|&(id, _)| id <= r.top);
            let from = covered.checked_sub(1).map_or(0, |j| r.held_ends[j].1);
            c.out.extend_from_slice(&r.held[from..]);
            if cr.list.is_empty() {
                c.replay = None;
            }
        }
        self.clients.mark_dirty(key);
    }

    /// A part could not be fetched (an error, a timeout, a request that killed the store
    /// twice): the connection gets `-ERR BUSY replay interrupted` as its last line and is
    /// closed; the client reconnects and resumes.
    pub(super) fn replay_interrupted(&mut self, key: usize, conn_id: u64) {
        let Some(c) = self.clients.conns.get_mut(key) else { return };
        if c.id != conn_id || c.state == State::Closing {
            return;
        }
        log::warn!("{}: replay interrupted: a part could not be fetched; closing", c.peer);
        c.replay = None;
        c.unshare(&self.fan);
        // Nothing after the last line: no more replies, no more MSGs.
        c.slots.clear();
        c.inbuf = Vec::new();
        protocol::err(&mut c.out, Code::Busy, "replay interrupted");
        c.state = State::Draining;
        let events: Vec<Rc<str>> = c.subs.iter().map(|(e, _)| Rc::clone(e)).collect();
        for e in events {
            self.clients.unindex(key, &e);
        }
        self.clients.mark_dirty(key);
    }
}
