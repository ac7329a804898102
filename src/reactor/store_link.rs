//! The reactor's side of the store: requests in flight, their answers back to the
//! client that waits for them (in command order), notification id blocks, timeouts.

use super::child_link::Child;
use super::conn::State;
use super::supervise::{ChildId, Fault};
use super::{Reactor, Source};
use crate::ipc::{FromStore, ListRow, MailPlan, Refusal, StoreSettings, StoreStats, ToStore};
use crate::protocol::{self, Code};
use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

/// Ids per block reserved by the store; a new block is asked for at half.
const ID_BLOCK: u64 = 10_000;
/// Past these, the reactor stops taking commands that need the store.
const STORE_BACKLOG_MAX: usize = 8 << 20;
const STORE_PENDING_MAX: usize = 500_000;

/// What a store request answers to.
pub(super) enum Target {
    /// A client's reply slot; `n` is PUB's count of connections, `listed` LIST's rows
    /// so far.
    Reply { key: usize, conn_id: u64, seq: u64, n: u64, listed: u64 },
    /// The client is gone or already told UNAVAILABLE.
    Orphan,
    /// The reactor's own request for a block of ids.
    Ids,
    /// The reactor's own request for due emails.
    TakeMail,
    /// Mail outcomes handed on from a mailer.
    MailDone,
    /// An HTTP connection's request (`/metrics`).
    Http { key: usize, conn_id: u64 },
    /// A part of a connection's replay (see `replay`).
    Replay { key: usize, conn_id: u64 },
}

/// A request sent to the store and not yet answered.
pub(super) struct Request {
    /// Kept to send again after a store restart.
    pub(super) record: ToStore,
    pub(super) target: Target,
    /// Store deaths this request was in flight for.
    pub(super) deaths: u8,
    /// When it was first sent: `/health` calls a store stuck that holds a request past
    /// `store_timeout`.
    pub(super) sent: Instant,
}

/// The store child and everything the reactor keeps about talking to it.
pub(super) struct StoreLink {
    pub(super) child: Child,
    /// Requests in flight, by request number: replayed in this order after a restart.
    pub(super) pending: BTreeMap<u64, Request>,
    /// Client requests in flight, by the time each was sent, oldest first (answered
    /// ones stay until they would have timed out, and are skipped then). Each times out
    /// `store_timeout` after it was sent, with `store_timeout` as it is now: keyed by
    /// send time rather than by deadline, the queue stays in order whatever a reload
    /// does to the timeout, and a lowered timeout applies at once to the requests
    /// already waiting, not only to new ones.
    pub(super) sent: VecDeque<(Instant, u64)>,
    next_req: u64,
    /// Notification ids the store reserved durably.
    pub(super) ids: IdBlocks,
    /// Requests to send again after a database error, and when.
    pub(super) deferred: Vec<(Instant, ToStore, Target)>,
    /// What the store is told at start and after a reload.
    pub(super) settings: StoreSettings,
}

impl StoreLink {
    pub(super) fn new(settings: StoreSettings) -> StoreLink {
        StoreLink {
            child: Child::new("notifd-store".into(), Source::StoreRead.token(), Source::StoreWrite.token()),
            pending: BTreeMap::new(),
            sent: VecDeque::new(),
            next_req: 1,
            ids: IdBlocks::default(),
            deferred: Vec::new(),
            settings,
        }
    }

    /// Some notification id can be handed out now.
    pub(super) fn has_ids(&self) -> bool {
        self.ids.has()
    }

    /// When the oldest client request in flight times out, given the timeout now.
    pub(super) fn next_expiry(&self, timeout: Duration) -> Option<Instant> {
        self.sent.front().map(|&(sent, _)| sent + timeout)
    }

    /// Too much is waiting on the store to take more commands that need it.
    pub(super) fn congested(&self) -> bool {
        self.child.backlog() > STORE_BACKLOG_MAX || self.pending.len() > STORE_PENDING_MAX
    }
}

/// Notification ids: the block in use, and the next one once the store reserved it.
#[derive(Default)]
pub(super) struct IdBlocks {
    current: Range<u64>,
    spare: Option<Range<u64>>,
    /// A `ReserveIds` is in flight.
    pub(super) requested: bool,
}

impl IdBlocks {
    /// Some id can be handed out now.
    fn has(&self) -> bool {
        !self.current.is_empty() || self.spare.is_some()
    }

    /// The next id, moving to the spare block when the current one is used up.
    fn take(&mut self) -> Option<u64> {
        if self.current.is_empty() {
            self.current = self.spare.take()?;
        }
        let id = self.current.start;
        self.current.start += 1;
        Some(id)
    }

    /// Under half a block left and none spare: time to ask for the next.
    fn low(&self) -> bool {
        self.current.end - self.current.start < ID_BLOCK / 2 && self.spare.is_none()
    }

    /// A block the store reserved.
    fn got(&mut self, ids: Range<u64>) {
        self.requested = false;
        if self.current.is_empty() {
            self.current = ids;
        } else {
            self.spare = Some(ids);
        }
    }
}

impl Reactor {
    /// Sends a client's request to the store and holds a reply slot for it.
    pub(super) fn store_request(&mut self, key: usize, make: impl FnOnce(u64) -> ToStore, n: u64) {
        let c = &mut self.clients.conns[key];
        let seq = c.push_waiting();
        let target = Target::Reply { key, conn_id: c.id, seq, n, listed: 0 };
        self.send_store(make, target);
    }

    /// Sends the record `make` builds around a new request id, and keeps it until the
    /// store answers (for replay after a store restart).
    pub(super) fn send_store(&mut self, make: impl FnOnce(u64) -> ToStore, target: Target) -> u64 {
        let req = self.store.next_req;
        self.store.next_req += 1;
        let record = make(req);
        self.store.child.send(&record);
        let sent = Instant::now();
        if matches!(target, Target::Reply { .. } | Target::Replay { .. }) {
            self.store.sent.push_back((sent, req));
        }
        self.store.pending.insert(req, Request { record, target, deaths: 0, sent });
        req
    }

    /// The next notification id; `None` when no block is reserved (`can_take` checks
    /// `has_ids` first, so only a bug gets here).
    pub(super) fn take_id(&mut self) -> Option<u64> {
        let id = self.store.ids.take()?;
        if self.store.ids.low() {
            self.ask_ids();
        }
        Some(id)
    }

    /// Asks the store for the next block of ids, unless that is already in flight.
    pub(super) fn ask_ids(&mut self) {
        if !self.store.ids.requested {
            self.store.ids.requested = true;
            self.send_store(|req| ToStore::ReserveIds { req, count: ID_BLOCK }, Target::Ids);
        }
    }

    /// Handles one record from the store.
    pub(super) fn dispatch_store(&mut self, m: FromStore) -> Result<(), Fault> {
        if !self.store.child.greeted && !matches!(m, FromStore::Hello { .. }) {
            return Err(Fault::Broken("a record before its hello".into()));
        }
        match m {
            FromStore::Hello { version } => return self.hello(ChildId::Store, version),
            FromStore::Done { req } => self.store_done(req),
            FromStore::Failed { req, reason } => self.store_failed(req, &reason),
            FromStore::ListChunk { req, rows, last } => {
                let rows =
                    rows.into_iter().map(|(event, created_at)| ListRow { event, created_at, pending: false });
                self.list_chunk(req, rows.collect(), last)
            }
            FromStore::Pairs { req, rows, last } => self.list_chunk(req, rows, last),
            FromStore::Ids { req, start, end } => {
                self.store.pending.remove(&req);
                self.store.ids.got(start..end);
            }
            FromStore::Mail { req, jobs, next_due } => {
                self.store.pending.remove(&req);
                self.got_mail(jobs, next_due);
            }
            FromStore::Stats { req, stats } => self.stats_answer(req, &stats),
            FromStore::LinkPage { req, page } => self.http_link_answer(req, page),
            FromStore::Refused { req, why } => self.store_refused(req, why),
            FromStore::Confirmed { req, count } => self.store_confirmed(req, count),
            FromStore::Replayed { req, rows, deleted, more } => self.replay_part(req, rows, deleted, more),
        }
        Ok(())
    }

    /// The connection slot a store request answers, if the connection is still there.
    pub(super) fn reply_slot(&self, target: &Target) -> Option<(usize, u64)> {
        match *target {
            Target::Reply { key, conn_id, seq, .. } => match self.clients.conns.get(key) {
                Some(c) if c.id == conn_id && c.state != State::Closing => Some((key, seq)),
                _ => None,
            },
            Target::Orphan
            | Target::Ids
            | Target::TakeMail
            | Target::MailDone
            | Target::Http { .. }
            | Target::Replay { .. } => None,
        }
    }

    pub(super) fn store_done(&mut self, req: u64) {
        let Some(r) = self.store.pending.remove(&req) else { return };
        match r.target {
            Target::MailDone | Target::Orphan | Target::Ids | Target::TakeMail | Target::Http { .. } => {}
            // A store that answers a replay part with Done is broken.
            Target::Replay { .. } => self.fail_reply(&r.target, "unexpected answer from the store"),
            Target::Reply { n, .. } => {
                match &r.record {
                    ToStore::Publish { mail, .. } if *mail != MailPlan::Nobody => self.mail.wanted = true,
                    // Its confirmation email may be in the outbox now.
                    ToStore::Subscribe { trusted: false, .. } => self.mail.wanted = true,
                    _ => {}
                }
                let Some((key, seq)) = self.reply_slot(&r.target) else { return };
                if let ToStore::Unsubscribe { event, email, code: Some(_), .. } = &r.record {
                    // The code was right: the live part ends too.
                    self.drop_live(key, event, email);
                }
                self.fill_slot(key, seq, |out| match &r.record {
                    // The same reply whatever was stored, so it tells nobody the state
                    // of an address (notifd-protocol(7), *Consent*).
                    ToStore::Subscribe { event, trusted: false, .. } => {
                        protocol::ok(out, "SUB", &format!("{event} pending"))
                    }
                    ToStore::Subscribe { event, .. } => protocol::ok(out, "SUB", event),
                    ToStore::Unsubscribe { event, trusted: false, code: None, .. } => {
                        protocol::ok(out, "UNSUB", &format!("{event} live"))
                    }
                    ToStore::Unsubscribe { event, .. } => protocol::ok(out, "UNSUB", event),
                    ToStore::OptOut { .. } => protocol::ok(out, "OPTOUT", ""),
                    ToStore::Publish { id, .. } => protocol::ok_pub(out, *id, n),
                    // A store that answers these with Done is broken; the client is told.
                    ToStore::List { .. }
                    | ToStore::Stats { .. }
                    | ToStore::Hello { .. }
                    | ToStore::ReserveIds { .. }
                    | ToStore::TakeMail { .. }
                    | ToStore::MailDone { .. }
                    | ToStore::Configure(_)
                    | ToStore::Logging(_)
                    | ToStore::ListPairs { .. }
                    | ToStore::Confirm { .. }
                    | ToStore::OpenLink { .. }
                    | ToStore::Replay { .. } => {
                        protocol::err(out, Code::Unavailable, "unexpected answer from the store")
                    }
                });
            }
        }
    }

    pub(super) fn store_failed(&mut self, req: u64, reason: &str) {
        let Some(r) = self.store.pending.remove(&req) else { return };
        log::warn!("store: request failed: {reason}");
        match r.target {
            Target::Reply { .. } | Target::Replay { .. } => self
                .fail_reply(&r.target, "the database reported an error; it may or may not have taken effect"),
            Target::Orphan => {}
            Target::Http { key, conn_id } => self.http_store_failed(key, conn_id),
            // Not a client's: try again in a second.
            target @ (Target::Ids | Target::TakeMail | Target::MailDone) => {
                self.store.deferred.push((Instant::now() + Duration::from_secs(1), r.record, target))
            }
        }
    }

    pub(super) fn run_deferred(&mut self, now: Instant) {
        if self.store.deferred.iter().any(|d| d.0 <= now) {
            let all = std::mem::take(&mut self.store.deferred);
            for (at, record, target) in all {
                if at <= now {
                    let renumber = |req| {
                        let mut record = record;
                        if let Some(r) = record.req_mut() {
                            *r = req;
                        }
                        record
                    };
                    self.send_store(renumber, target);
                } else {
                    self.store.deferred.push((at, record, target));
                }
            }
        }
    }

    /// A consent request refused: a wrong code (counted against the client's address)
    /// or a limit. A SUB refused for `max_unconfirmed` loses its live part.
    fn store_refused(&mut self, req: u64, why: Refusal) {
        let Some(r) = self.store.pending.remove(&req) else { return };
        if !matches!(r.target, Target::Reply { .. }) {
            return self.fail_reply(&r.target, "unexpected answer from the store");
        }
        if let (Refusal::Auth, Target::Reply { key, conn_id, .. }) = (&why, &r.target) {
            // Counted even when the connection is closing, while its address is known.
            if let Some(c) = self.clients.conns.get(*key).filter(|c| c.id == *conn_id) {
                let peer = c.peer;
                self.code_failed(peer);
            }
        }
        let Some((key, seq)) = self.reply_slot(&r.target) else { return };
        match why {
            Refusal::Auth => {
                self.fill_slot(key, seq, |out| protocol::err(out, Code::Auth, super::commands::WRONG_CODE))
            }
            Refusal::Limit(text) => {
                if let ToStore::Subscribe { event, email, .. } = &r.record {
                    self.drop_live(key, event, email);
                }
                self.fill_slot(key, seq, |out| protocol::err(out, Code::Limit, &text));
            }
        }
    }

    /// CONFIRM's answer.
    fn store_confirmed(&mut self, req: u64, count: u32) {
        let Some(r) = self.store.pending.remove(&req) else { return };
        if !matches!(r.target, Target::Reply { .. }) {
            return self.fail_reply(&r.target, "unexpected answer from the store");
        }
        let Some((key, seq)) = self.reply_slot(&r.target) else { return };
        self.fill_slot(key, seq, |out| protocol::ok(out, "CONFIRM", &count.to_string()));
    }

    /// A part of a LIST answer (`Pairs`, or the older `ListChunk` without states).
    pub(super) fn list_chunk(&mut self, req: u64, rows: Vec<ListRow>, last: bool) {
        let Some(r) = self.store.pending.get_mut(&req) else { return };
        let (ToStore::List { email, .. } | ToStore::ListPairs { email, .. }) = &r.record else { return };
        let email = email.clone();
        let count = match &mut r.target {
            Target::Reply { listed, .. } => {
                *listed += rows.len() as u64;
                *listed
            }
            Target::Orphan
            | Target::Ids
            | Target::TakeMail
            | Target::MailDone
            | Target::Http { .. }
            | Target::Replay { .. } => 0,
        };
        if let Some((key, seq)) = self.reply_slot(&self.store.pending[&req].target) {
            if let Some(slot) = self.clients.conns[key].slot(seq) {
                for row in &rows {
                    protocol::list_line(&mut slot.data, &row.event, &email, row.created_at, row.pending);
                }
            }
            if last {
                self.fill_slot(key, seq, |out| protocol::ok(out, "LIST", &count.to_string()));
            }
        }
        if last {
            self.store.pending.remove(&req);
        }
    }

    /// The store's counts: a STATS reply (its `STAT` lines and `+OK` in one slot, so no
    /// `MSG` comes between them) or a `/metrics` page.
    fn stats_answer(&mut self, req: u64, stats: &StoreStats) {
        let Some(r) = self.store.pending.remove(&req) else { return };
        let metrics = self.metrics(stats);
        match r.target {
            Target::Reply { .. } => {
                let Some((key, seq)) = self.reply_slot(&r.target) else { return };
                self.fill_slot(key, seq, |out| {
                    for m in &metrics {
                        protocol::stat_line(out, m.name, m.value);
                    }
                    protocol::ok(out, "STATS", &metrics.len().to_string());
                });
            }
            Target::Http { key, conn_id } => self.http_metrics(key, conn_id, &metrics),
            Target::Orphan | Target::Ids | Target::TakeMail | Target::MailDone => {}
            // A store that answers a replay part with counts is broken.
            Target::Replay { .. } => self.fail_reply(&r.target, "unexpected answer from the store"),
        }
    }

    /// Completes a reply slot (appending `write`) and sends what is now in order.
    pub(super) fn fill_slot(&mut self, key: usize, seq: u64, write: impl FnOnce(&mut Vec<u8>)) {
        let c = &mut self.clients.conns[key];
        c.unshare(&self.fan);
        let front = seq == c.first_seq;
        let Some(slot) = c.slot(seq) else { return };
        if front && slot.data.is_empty() {
            // The usual case, answers arriving in order: straight to the output, with
            // no buffer of the slot's own.
            write(&mut c.out);
            c.slots.pop_front();
            c.first_seq += 1;
        } else {
            write(&mut slot.data);
            slot.done = true;
        }
        c.drain_slots();
        if c.paused && c.slots.len() < self.cfg.max_inflight as usize {
            self.clients.resume.push(key);
        }
        self.clients.mark_dirty(key);
    }

    /// Answers `-ERR UNAVAILABLE` for client requests the store did not confirm in time.
    pub(super) fn expire(&mut self, now: Instant) {
        let timeout = self.store_timeout();
        while let Some(&(sent, req)) = self.store.sent.front() {
            if sent + timeout > now {
                break;
            }
            self.store.sent.pop_front();
            let Some(r) = self.store.pending.get_mut(&req) else { continue };
            let target = std::mem::replace(&mut r.target, Target::Orphan);
            self.fail_reply(
                &target,
                "the database did not confirm in time; it may or may not have taken effect",
            );
        }
    }

    /// How long a client request may wait for the store.
    pub(super) fn store_timeout(&self) -> Duration {
        Duration::from_secs(self.cfg.store_timeout.into())
    }

    /// Answers a client's request with `-ERR UNAVAILABLE <text>`, dropping any part of
    /// a LIST reply gathered so far.
    pub(super) fn fail_reply(&mut self, target: &Target, text: &str) {
        if let Target::Replay { key, conn_id } = *target {
            return self.replay_interrupted(key, conn_id);
        }
        if let Some((key, seq)) = self.reply_slot(target) {
            if let Some(slot) = self.clients.conns[key].slot(seq) {
                slot.data.clear();
            }
            self.fill_slot(key, seq, |out| protocol::err(out, Code::Unavailable, text));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_in_order_across_blocks() {
        let mut ids = IdBlocks::default();
        assert!(!ids.has() && ids.take().is_none());
        ids.requested = true;
        ids.got(1..1 + ID_BLOCK);
        assert!(!ids.requested && ids.has() && !ids.low());
        for want in 1..=ID_BLOCK / 2 + 1 {
            assert_eq!(ids.take(), Some(want));
        }
        assert!(ids.low());
        ids.got(50_000..50_000 + ID_BLOCK);
        assert!(!ids.low());
        while ids.current.start < ids.current.end {
            ids.take();
        }
        // The spare block takes over; a whole block left is not low.
        assert_eq!(ids.take(), Some(50_000));
        assert!(ids.has() && !ids.low());
    }
}
