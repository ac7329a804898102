//! The reactor's side of the store: requests in flight, their answers back to the
//! client that waits for them (in command order), notification id blocks, timeouts.

use super::conn::State;
use super::{Reactor, Request, Target, ID_BLOCK};
use crate::ipc::{self, FromStore, MailPlan, ToStore};
use crate::protocol::{self, Code};
use std::ops::Range;
use std::time::{Duration, Instant};

impl Reactor {
    /// Sends a client's request to the store and holds a reply slot for it.
    pub(super) fn store_request(&mut self, key: usize, make: impl FnOnce(u64) -> ToStore, n: u64) {
        let c = &mut self.conns[key];
        let seq = c.push_waiting();
        let target = Target::Reply { key, conn_id: c.id, seq, n, listed: 0 };
        self.send_store(make, target);
    }

    /// Sends the record `make` builds around a new request id, and keeps it until the
    /// store answers (for replay after a store restart).
    pub(super) fn send_store(&mut self, make: impl FnOnce(u64) -> ToStore, target: Target) {
        let req = self.next_req;
        self.next_req += 1;
        let record = make(req);
        self.children[0].send(&record);
        if matches!(target, Target::Reply { .. }) {
            let deadline = Instant::now() + Duration::from_secs(self.cfg.store_timeout.into());
            self.deadlines.push_back((deadline, req));
        }
        self.pending.insert(req, Request { record, target, deaths: 0 });
    }

    pub(super) fn has_ids(&self) -> bool {
        !self.ids.is_empty() || self.spare_ids.is_some()
    }

    pub(super) fn take_id(&mut self) -> u64 {
        if self.ids.is_empty() {
            self.ids = self.spare_ids.take().expect("can_take checked has_ids");
        }
        let id = self.ids.start;
        self.ids.start += 1;
        if self.ids.end - self.ids.start < ID_BLOCK / 2 && self.spare_ids.is_none() {
            self.ask_ids();
        }
        id
    }

    pub(super) fn ask_ids(&mut self) {
        if !self.ids_requested {
            self.ids_requested = true;
            self.send_store(|req| ToStore::ReserveIds { req, count: ID_BLOCK }, Target::Ids);
        }
    }

    pub(super) fn dispatch_store(&mut self, m: FromStore) -> Result<(), String> {
        match m {
            FromStore::Hello { version } => self.hello(0, version),
            FromStore::Done { req } => {
                self.store_done(req);
                Ok(())
            }
            FromStore::Failed { req, reason } => {
                self.store_failed(req, &reason);
                Ok(())
            }
            FromStore::ListChunk { req, rows, last } => {
                self.list_chunk(req, rows, last);
                Ok(())
            }
            FromStore::Ids { req, start, end } => {
                self.pending.remove(&req);
                self.got_ids(start..end);
                Ok(())
            }
            FromStore::Mail { req, jobs, next_due } => {
                self.pending.remove(&req);
                self.got_mail(jobs, next_due);
                Ok(())
            }
        }
    }

    pub(super) fn hello(&mut self, i: usize, version: u32) -> Result<(), String> {
        if version != ipc::VERSION {
            log::error!(
                "{} speaks record version {version}, this reactor {}",
                self.children[i].name,
                ipc::VERSION
            );
            std::process::exit(1);
        }
        self.children[i].greeted = true;
        Ok(())
    }

    pub(super) fn got_ids(&mut self, ids: Range<u64>) {
        self.ids_requested = false;
        if self.ids.is_empty() {
            self.ids = ids;
        } else {
            self.spare_ids = Some(ids);
        }
    }

    /// The connection slot a store request answers, if the connection is still there.
    pub(super) fn reply_slot(&self, target: &Target) -> Option<(usize, u64)> {
        match *target {
            Target::Reply { key, conn_id, seq, .. } => match self.conns.get(key) {
                Some(c) if c.id == conn_id && c.state != State::Closing => Some((key, seq)),
                _ => None,
            },
            _ => None,
        }
    }

    pub(super) fn store_done(&mut self, req: u64) {
        let Some(r) = self.pending.remove(&req) else { return };
        match r.target {
            Target::MailDone | Target::Orphan | Target::Ids | Target::TakeMail => {}
            Target::Reply { n, .. } => {
                if let ToStore::Publish { mail, .. } = &r.record {
                    if *mail != MailPlan::Nobody {
                        self.mail.wanted = true;
                    }
                }
                let Some((key, seq)) = self.reply_slot(&r.target) else { return };
                self.fill_slot(key, seq, |out| match &r.record {
                    ToStore::Subscribe { event, .. } => protocol::ok(out, "SUB", event),
                    ToStore::Unsubscribe { event, .. } => protocol::ok(out, "UNSUB", event),
                    ToStore::Publish { id, .. } => protocol::ok_pub(out, *id, n),
                    _ => protocol::err(out, Code::Unavailable, "unexpected answer from the store"),
                });
            }
        }
    }

    pub(super) fn store_failed(&mut self, req: u64, reason: &str) {
        let Some(r) = self.pending.remove(&req) else { return };
        log::warn!("store: request failed: {reason}");
        match r.target {
            Target::Reply { .. } => self
                .fail_reply(&r.target, "the database reported an error; it may or may not have taken effect"),
            Target::Orphan => {}
            // Not a client's: try again in a second.
            target => self.deferred.push((Instant::now() + Duration::from_secs(1), r.record, target)),
        }
    }

    pub(super) fn run_deferred(&mut self, now: Instant) {
        if self.deferred.iter().any(|d| d.0 <= now) {
            let all = std::mem::take(&mut self.deferred);
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
                    self.deferred.push((at, record, target));
                }
            }
        }
    }

    pub(super) fn list_chunk(&mut self, req: u64, rows: Vec<(String, i64)>, last: bool) {
        let Some(r) = self.pending.get_mut(&req) else { return };
        let ToStore::List { email, .. } = &r.record else { return };
        let email = email.clone();
        let count = match &mut r.target {
            Target::Reply { listed, .. } => {
                *listed += rows.len() as u64;
                *listed
            }
            _ => 0,
        };
        if let Some((key, seq)) = self.reply_slot(&self.pending[&req].target) {
            if let Some(slot) = self.conns[key].slot(seq) {
                for (event, at) in &rows {
                    protocol::list_line(&mut slot.data, event, &email, *at);
                }
            }
            if last {
                self.fill_slot(key, seq, |out| protocol::ok(out, "LIST", &count.to_string()));
            }
        }
        if last {
            self.pending.remove(&req);
        }
    }

    /// Completes a reply slot (appending `write`) and sends what is now in order.
    pub(super) fn fill_slot(&mut self, key: usize, seq: u64, write: impl FnOnce(&mut Vec<u8>)) {
        let c = &mut self.conns[key];
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
            self.resume.push(key);
        }
        self.mark_dirty(key);
    }

    /// Answers `-ERR UNAVAILABLE` for client requests the store did not confirm in time.
    pub(super) fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, req)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            let Some(r) = self.pending.get_mut(&req) else { continue };
            let target = std::mem::replace(&mut r.target, Target::Orphan);
            self.fail_reply(
                &target,
                "the database did not confirm in time; it may or may not have taken effect",
            );
        }
    }

    /// Answers a client's request with `-ERR UNAVAILABLE <text>`, dropping any part of
    /// a LIST reply gathered so far.
    pub(super) fn fail_reply(&mut self, target: &Target, text: &str) {
        if let Some((key, seq)) = self.reply_slot(target) {
            if let Some(slot) = self.conns[key].slot(seq) {
                slot.data.clear();
            }
            self.fill_slot(key, seq, |out| protocol::err(out, Code::Unavailable, text));
        }
    }
}
