//! The command handlers: one function per client command (see notifd-protocol(7)).
//!
//! A handler answers at once (`PING`, `QUIT`, `AUTH`, refusals) or sends a request to the
//! store and holds the client's reply slot until the store answers (`SUB`, `UNSUB`,
//! `PUB`, `LIST`, `CONFIRM`, `OPTOUT`). `PUB` also fans its `MSG` out to the live
//! subscribers at once.
//!
//! Trust (notifd-protocol(7), *Trust*) is decided here, per command, by [`trusted`]:
//! untrusted connections' SUB and UNSUB go by the consent rules and `sub_rate`, and
//! their codes are counted when wrong.

use super::conn::{Conn, State};
use super::limits::addr_key;
use super::Reactor;
use crate::config::{MailPolicy, Transport};
use crate::consent::Code as ConsentCode;
use crate::ipc::{MailPlan, ToStore};
use crate::protocol::{self, Code, Command};
use std::net::SocketAddr;
use std::rc::Rc;

/// First capacity of an output buffer that receives a MSG.
const FANOUT_BUFFER: usize = 4096;
/// Failed AUTH attempts before the connection is closed.
const MAX_AUTH_FAILURES: u8 = 3;

impl Reactor {
    /// Handles one line a client sent.
    pub(super) fn command(&mut self, key: usize, line: &[u8]) {
        let cmd = match protocol::parse_line(line) {
            Ok(None) => return,
            Ok(Some(cmd)) => cmd,
            Err(e) => return self.reply_err(key, e.code, &e.text),
        };
        match cmd {
            Command::Sub { event, email, since } => self.sub(key, event, &email, since),
            Command::Unsub { event, email, code } => self.unsub(key, event, &email, code),
            Command::Pub { event, text } => self.publish(key, event, text),
            Command::Auth { token } => self.auth(key, token),
            Command::List { email } => self.list(key, &email),
            Command::Ping { text } => self.ping(key, text),
            Command::Quit => self.quit(key),
            Command::Stats => self.stats(key),
            Command::Watch { event, since } => self.watch(key, event, since),
            Command::Unwatch { event } => self.unwatch(key, event),
            Command::Confirm { email, code } => self.confirm(key, &email, code, true),
            Command::OptOut { email, code } => self.confirm(key, &email, code, false),
        }
    }

    fn ping(&mut self, key: usize, text: Option<&str>) {
        self.clients.conns[key].reply(&self.fan, |out| protocol::pong(out, text));
        self.clients.mark_dirty(key);
    }

    fn quit(&mut self, key: usize) {
        let c = &mut self.clients.conns[key];
        c.reply(&self.fan, |out| protocol::ok(out, "QUIT", ""));
        c.state = State::Draining;
        c.inbuf = Vec::new();
        self.clients.mark_dirty(key);
    }

    pub(super) fn reply_err(&mut self, key: usize, code: Code, text: &str) {
        self.clients.conns[key].reply(&self.fan, |out| protocol::err(out, code, text));
        self.clients.mark_dirty(key);
    }

    /// Starts the live pair (a WATCH's email is `replay::WATCH`); false when refused
    /// for `max_subs_per_conn` (the client is told).
    pub(super) fn add_live(&mut self, key: usize, event: &str, email: &str) -> bool {
        if self.clients.live.is_some() {
            self.sync_live_trust(key);
        }
        let c = &self.clients.conns[key];
        if !c.subs.contains(event, email) {
            if c.subs.len() >= self.cfg.max_subs_per_conn as usize {
                let text = format!("at most {} subscriptions per connection", self.cfg.max_subs_per_conn);
                self.reply_err(key, Code::Limit, &text);
                return false;
            }
            let ev = match self.clients.index.get_key_value(event) {
                Some((k, _)) => Rc::clone(k),
                None => Rc::from(event),
            };
            let c = &mut self.clients.conns[key];
            c.subs.insert(Rc::clone(&ev), email.into());
            if let Some(live) = &mut self.clients.live {
                live.add(&ev, email, c.live_trusted);
            }
            self.clients.index.entry(ev).or_default().insert(key);
        }
        true
    }

    /// Moves the connection's live pairs in the offline policy's index to the count of
    /// its trust now, if that changed (an AUTH).
    fn sync_live_trust(&mut self, key: usize) {
        let now = self.may_publish(&self.clients.conns[key]);
        let c = &mut self.clients.conns[key];
        if c.live_trusted != now {
            if let Some(live) = &mut self.clients.live {
                live.remove_all(&c.subs, c.live_trusted);
                live.add_all(&c.subs, now);
            }
            c.live_trusted = now;
        }
    }

    /// Ends the connection's live subscription of the pair, if it has one.
    pub(super) fn drop_live(&mut self, key: usize, event: &str, email: &str) {
        let c = &mut self.clients.conns[key];
        if c.subs.remove(event, email) {
            if let Some(live) = &mut self.clients.live {
                live.remove(event, email, c.live_trusted);
            }
            if !c.subs.has_event(event) {
                self.clients.unindex(key, event);
                self.end_replay(key, event);
            }
        }
    }

    /// The connection's SUBs and UNSUBs go by the consent rules: untrusted, with
    /// `confirm = true`.
    fn by_consent(&self, key: usize) -> bool {
        self.cfg.confirm && !self.may_publish(&self.clients.conns[key])
    }

    /// Counts a stored-subscription command against `sub_rate` when the connection is
    /// untrusted; false when it is refused (the client is told when to retry).
    fn take_sub(&mut self, key: usize) -> bool {
        let c = &self.clients.conns[key];
        if self.may_publish(c) {
            return true;
        }
        let rate = self.cfg.sub_rate;
        match self.clients.sweep.take_sub(c.peer.ip(), rate) {
            Ok(false) => true,
            Ok(true) => {
                log::warn!(
                    "{}: sub_rate reached ({rate} SUB and UNSUB a minute per address, {} per network); \
                     refusing more for the rest of the minute",
                    c.peer,
                    u64::from(rate) * 10
                );
                true
            }
            Err(wait) => {
                let text = format!(
                    "at most {rate} SUB and UNSUB a minute from your address and {} from your network; \
                     try again in {wait} s",
                    u64::from(rate) * 10
                );
                self.reply_err(key, Code::Limit, &text);
                false
            }
        }
    }

    /// SUB. Its live part starts at once, also for an untrusted SUB whose store part may
    /// still be refused for `max_unconfirmed`: holding it until the store answers would
    /// break the contract that a pipelined SUB then PUB delivers the MSG. A refused SUB's
    /// live part is ended when the refusal comes back (`store_link`), so for that short
    /// window (one store round trip) the connection may receive MSGs of the event; it
    /// gets no email and nothing is stored, which is what the limit protects.
    fn sub(&mut self, key: usize, event: &str, email: &str, since: Option<u64>) {
        if !self.take_sub(key) {
            return;
        }
        // SINCE on an event this connection already receives replays nothing.
        let fresh = !self.clients.conns[key].subs.has_event(event);
        if !self.add_live(key, event, email) {
            return;
        }
        let now = crate::ipc::unix_now();
        let consent = self.by_consent(key);
        let client = if consent { self.clients.conns[key].peer.ip().to_string() } else { String::new() };
        self.store_request(
            key,
            |req| ToStore::Subscribe {
                req,
                email: email.into(),
                event: event.into(),
                now,
                trusted: !consent,
                client,
            },
            0,
        );
        if let Some(since) = since.filter(|_| fresh) {
            let c = &self.clients.conns[key];
            let seq = c.first_seq + c.slots.len() as u64 - 1;
            self.begin_replay(key, event, since, Some(seq));
        }
    }

    /// UNSUB. With a code, the live part ends once the store accepted the code
    /// (`store_link`), so a wrong code changes nothing.
    fn unsub(&mut self, key: usize, event: &str, email: &str, code: Option<&str>) {
        if !self.take_sub(key) {
            return;
        }
        if let Some(code) = code {
            if let Some(text) = self.code_refused(key, code) {
                return self.reply_err(key, Code::Auth, &text);
            }
        } else {
            self.drop_live(key, event, email);
        }
        let trusted = !self.by_consent(key);
        let code = code.map(str::to_string);
        self.store_request(
            key,
            |req| ToStore::Unsubscribe { req, email: email.into(), event: event.into(), trusted, code },
            0,
        );
    }

    /// CONFIRM (`confirm`) or OPTOUT: anyone may send them; the code is the proof.
    fn confirm(&mut self, key: usize, email: &str, code: &str, confirm: bool) {
        if let Some(text) = self.code_refused(key, code) {
            return self.reply_err(key, Code::Auth, &text);
        }
        let (email, code, now) = (email.to_string(), code.to_string(), crate::ipc::unix_now());
        self.store_request(
            key,
            |req| {
                if confirm {
                    ToStore::Confirm { req, email, code, now }
                } else {
                    ToStore::OptOut { req, email, code, now }
                }
            },
            0,
        );
    }

    /// Why a CONFIRM, OPTOUT or UNSUB code is refused before the store sees it: the
    /// client's address is past `auth_fail_limit` wrong codes in its minute (refused
    /// unchecked, not counted), or the code does not have the form of one (counted as
    /// wrong). `None`: the store checks it.
    fn code_refused(&mut self, key: usize, code: &str) -> Option<String> {
        let peer = self.clients.conns[key].peer;
        let now = self.clients.sweep.tick;
        let fails = &self.clients.sweep.code_fails;
        let addr = addr_key(peer.ip());
        if fails.over(&addr, now, self.cfg.auth_fail_limit) {
            let wait = fails.left(&addr, now).max(1);
            return Some(format!("too many wrong codes from your address; try again in {wait} s"));
        }
        if ConsentCode::parse(code).is_none() {
            self.code_failed(peer);
            return Some(WRONG_CODE.into());
        }
        None
    }

    /// Counts a wrong code from `peer`'s address; reaching the limit is logged once per
    /// address and minute.
    pub(super) fn code_failed(&mut self, peer: SocketAddr) {
        let addr = addr_key(peer.ip());
        let now = self.clients.sweep.tick;
        let limit = self.cfg.auth_fail_limit;
        let fails = &mut self.clients.sweep.code_fails;
        if fails.hit(addr, now) == limit {
            log::warn!(
                "{peer}: {limit} wrong CONFIRM, OPTOUT or UNSUB codes from this address within a minute; \
                 refusing its codes unchecked for {} s",
                fails.left(&addr, now)
            );
        }
    }

    /// Whether the connection is trusted (notifd-protocol(7), *Trust*): it may PUB,
    /// LIST and STATS, and its SUB and UNSUB are the operator's own.
    pub(super) fn may_publish(&self, c: &Conn) -> bool {
        trusted(c, &self.cfg.publish_token, self.token_gen)
    }

    fn publish(&mut self, key: usize, event: &str, text: &str) {
        if !self.may_publish(&self.clients.conns[key]) {
            return self.reply_err(key, Code::Auth, self.auth_text());
        }
        let Some(id) = self.take_id() else {
            // can_take checked has_ids, so this is a bug; it costs this command only.
            return self.reply_err(key, Code::Unavailable, "no notification id is reserved yet; try again");
        };
        // Formatted once into the turn's fan-out buffer; a subscriber with nothing else
        // to send this turn is written straight from there (see Conn::shared).
        let a = self.fan.len();
        protocol::msg(&mut self.fan, event, id, text);
        let b = self.fan.len();
        let shareable = b <= u32::MAX as usize;
        let mail = self.mail_plan(event);
        let mut n = 0u64;
        let mut slow = Vec::new();
        if let Some(set) = self.clients.index.get(event) {
            for &k in set {
                let c = &mut self.clients.conns[k];
                if c.state == State::Closing {
                    continue;
                }
                let (sa, sb) = c.shared;
                if c.replay.is_some() && super::replay::hold(c, event, id, &self.fan[a..b]) {
                    // Held until the replay of this event ends; counted in unsent().
                } else if shareable && c.out.is_empty() && (sa == sb || sb as usize == a) {
                    c.shared = (if sa == sb { a as u32 } else { sa }, b as u32);
                } else {
                    c.unshare(&self.fan);
                    if c.out.is_empty() {
                        // Many MSGs usually follow in the same turn: spare the doublings.
                        c.out.reserve(FANOUT_BUFFER);
                    }
                    c.out.extend_from_slice(&self.fan[a..b]);
                }
                n += 1;
                if c.unsent() > self.cfg.max_pending {
                    log::warn!(
                        "{}: slow consumer: over {} unsent bytes; disconnecting",
                        c.peer,
                        self.cfg.max_pending
                    );
                    slow.push(k);
                } else if !c.dirty {
                    c.dirty = true;
                    self.clients.dirty.push(k);
                }
            }
        }
        for k in slow {
            self.drop_conn(k, super::limits::Dropped::SlowConsumer);
        }
        self.counters.publications += 1;
        self.counters.messages_sent += n;
        let now = crate::ipc::unix_now();
        self.store_request(
            key,
            |req| ToStore::Publish { req, id, event: event.into(), text: text.into(), now, mail },
            n,
        );
    }

    /// The mail policy in force: `none` whatever it says when mail is off.
    pub(super) fn mail_policy(&self) -> MailPolicy {
        match self.cfg.mail_transport {
            Transport::None => MailPolicy::None,
            _ => self.cfg.mail_policy,
        }
    }

    /// Who is emailed about a publication to `event`. Under the offline policy, the
    /// addresses live on the event at this moment (before this PUB's MSG closes any slow
    /// consumer) are left out.
    fn mail_plan(&mut self, event: &str) -> MailPlan {
        let policy = self.mail_policy();
        if policy != MailPolicy::Offline {
            // Not read until a reload makes the policy offline again: not kept up to date
            // meanwhile (built again by the first offline PUB after that reload).
            self.clients.live = None;
        }
        match policy {
            MailPolicy::None => MailPlan::Nobody,
            MailPolicy::All => MailPlan::All,
            MailPolicy::Offline => {
                if self.live_gen != self.token_gen {
                    // A new token changed who is trusted: counted afresh below.
                    self.clients.live = None;
                    self.live_gen = self.token_gen;
                }
                if self.clients.live.is_none() {
                    let (token, gen) = (&self.cfg.publish_token, self.token_gen);
                    for (_, c) in self.clients.conns.iter_mut() {
                        c.live_trusted = trusted(c, token, gen);
                    }
                }
                let live = self.clients.live_addresses(event);
                if live.is_empty() {
                    MailPlan::All
                } else if live.iter().map(|m| m.len() + 2).sum::<usize>() > crate::ipc::BATCH_BYTES {
                    // The record must fit in one frame. So many live addresses are
                    // rare; mailing them too is what at-least-once allows.
                    log::warn!("PUB {event}: too many live addresses to leave out; mailing all");
                    MailPlan::All
                } else {
                    MailPlan::AllExcept(live)
                }
            }
        }
    }

    fn auth_text(&self) -> &'static str {
        if self.cfg.publish_token.is_empty() {
            "only loopback clients may publish or list"
        } else {
            "send AUTH with the publish token first"
        }
    }

    /// Checks the token, unless the client's address is past `auth_fail_limit` failures
    /// in its minute: then the AUTH is refused unchecked, and not logged, until the
    /// minute has passed; hitting the limit is logged once per address and minute.
    fn auth(&mut self, key: usize, token: &str) {
        let addr = addr_key(self.clients.conns[key].peer.ip());
        let now = self.clients.sweep.tick;
        let limit = self.cfg.auth_fail_limit;
        let fails = &mut self.clients.sweep.auth_fails;
        let refused = fails.over(&addr, now, limit);
        let good = !refused
            && !self.cfg.publish_token.is_empty()
            && constant_time_eq(token, &self.cfg.publish_token);
        if !good && !refused && fails.hit(addr, now) == limit {
            log::warn!(
                "{}: {limit} failed AUTHs from this address within a minute; refusing its AUTHs \
                 unchecked for {} s",
                self.clients.conns[key].peer,
                fails.left(&addr, now)
            );
        }
        let c = &mut self.clients.conns[key];
        if good {
            c.auth_gen = self.token_gen;
            c.auth_failures = 0;
            c.reply(&self.fan, |out| protocol::ok(out, "AUTH", ""));
            // Its live pairs now count for the offline policy.
            self.sync_live_trust(key);
            self.clients.mark_dirty(key);
            return;
        } else {
            c.auth_failures += 1;
            if c.auth_failures >= MAX_AUTH_FAILURES {
                if refused {
                    log::debug!("{}: {MAX_AUTH_FAILURES} refused AUTH attempts; closing", c.peer);
                } else {
                    log::warn!("{}: {MAX_AUTH_FAILURES} failed AUTH attempts; closing", c.peer);
                }
                c.reply(&self.fan, |out| protocol::err(out, Code::Auth, "too many failed attempts; closing"));
                c.state = State::Draining;
                c.inbuf = Vec::new();
            } else if refused {
                let text = "too many failed attempts from your address; try again in a minute";
                c.reply(&self.fan, |out| protocol::err(out, Code::Auth, text));
            } else {
                c.reply(&self.fan, |out| protocol::err(out, Code::Auth, "wrong token"));
            }
        }
        self.clients.mark_dirty(key);
    }

    fn list(&mut self, key: usize, email: &str) {
        if !self.may_publish(&self.clients.conns[key]) {
            return self.reply_err(key, Code::Auth, self.auth_text());
        }
        self.store_request(key, |req| ToStore::ListPairs { req, email: email.into() }, 0);
    }

    /// STATS: the reactor's numbers join the store's when it answers (`stats_answer`).
    fn stats(&mut self, key: usize) {
        if !self.may_publish(&self.clients.conns[key]) {
            return self.reply_err(key, Code::Auth, self.auth_text());
        }
        self.store_request(key, |req| ToStore::Stats { req }, 0);
    }
}

/// The text of `-ERR AUTH` for a wrong CONFIRM, OPTOUT or UNSUB code.
pub(super) const WRONG_CODE: &str = "wrong or expired code";

/// Trusted: from loopback while `publish_token` is empty, or authenticated with the
/// token of generation `gen` (a reload that changes the token makes a new one).
// The third way: a TLS client certificate verified against `tls_client_ca_file`.
fn trusted(c: &Conn, token: &str, gen: u64) -> bool {
    if c.tls.as_ref().is_some_and(|t| t.trusted) {
        // [tls] A client certificate verified by tls_client_ca_file.
        return true;
    }
    if token.is_empty() {
        c.loopback
    } else {
        c.auth_gen == gen
    }
}

/// Whether `a` and `b` are equal, in a time that does not depend on where they differ.
pub(super) fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
