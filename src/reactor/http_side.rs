//! The HTTP side's sockets (OPERATIONS.md *HTTP side*): the second listener, one small
//! connection per HTTP client, and the numbers that STATS and `/metrics` share.
//!
//! One request per connection, answered with `Connection: close`; what the bytes mean is
//! `crate::http`'s to say, so nothing here parses or builds a page. A connection holds at
//! most one request's worth of input (`MAX_HEAD + MAX_BODY`) and one response, is never
//! waited on, and is closed when it has not sent its request within
//! `REQUEST_TIMEOUT_SECS`: deadlines are checked by one sweep a second while connections
//! are open, not by a timer per connection. Tokens never reach the log.

use super::store_link::Target;
use super::{Reactor, Source};
use crate::http::{
    self, Action, HttpError, Limits, Metric, MetricKind, Request, RequestReader, Response, Status, Token,
};
use crate::ipc::{LinkAction, LinkKind, LinkView, StoreStats, ToStore};
use mio::net::{TcpListener, TcpStream};
use mio::Interest;
use slab::Slab;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How often deadlines are checked while HTTP connections are open.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How long a connection whose response is out may take to close its side. Closing at
/// once, with request bytes still unread (a body over the bound), would make the kernel
/// reset the connection and the client could lose the response.
const LINGER: Duration = Duration::from_secs(2);

/// Bytes a lingering connection may send per event before it is closed anyway: a
/// client that streams after its answer gets a reset rather than the loop's time.
const LINGER_BUDGET: usize = 64 * 1024;

/// Connections over `http_max_clients` that are still given their 503 (written, then
/// closed like any response, so the client reads it rather than a reset); past these,
/// a connection is closed at once.
const BUSY_EXTRA: usize = 16;

/// How often, at most, a refusal of connections (over `http_max_clients`, or out of
/// descriptors) is logged: a stranger can make it happen at every connection.
const BUSY_LOG_EVERY: Duration = Duration::from_secs(60);

/// Where an HTTP connection is in its one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the request.
    Reading,
    /// The request asked for something the store holds; its answer comes back through
    /// `Target::Http`.
    Waiting,
    /// The response is being written.
    Writing,
    /// The response is out and our side is shut; reading what the client still sends
    /// until it closes.
    Lingering,
}

/// Which page a link's path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkPath {
    /// `/confirm/<token>`.
    Confirm,
    /// `/unsubscribe/<token>`.
    Unsubscribe,
}

impl LinkPath {
    /// Whether a token of `kind` belongs under this path; any other is a 404.
    fn fits(self, kind: LinkKind) -> bool {
        match self {
            LinkPath::Confirm => kind == LinkKind::Confirm,
            LinkPath::Unsubscribe => matches!(kind, LinkKind::Unsubscribe | LinkKind::OptOut),
        }
    }
}

/// A link request waiting on the store. A POST goes in two steps: `Show` first, so a
/// token sent under the wrong path is refused before anything changes, then its action.
struct LinkAsk {
    path: LinkPath,
    /// Kept for the second step; `Token`'s `Debug` never shows it.
    token: Token,
    action: LinkAction,
    /// The store has said the token fits the path, and was sent the action.
    checked: bool,
}

/// One HTTP client.
struct HttpConn {
    /// Unique over the daemon's life, so a late store answer never reaches a newer
    /// connection under the same slab key.
    id: u64,
    sock: TcpStream,
    /// The client's address (an IPv4-mapped IPv6 address as IPv4).
    peer: SocketAddr,
    /// The request's bytes so far, at most `MAX_HEAD + MAX_BODY`.
    input: Vec<u8>,
    reader: RequestReader,
    /// The response's bytes not yet written.
    out: Vec<u8>,
    phase: Phase,
    /// The request was a HEAD: the response goes without its body.
    head: bool,
    /// The link request the store is asked about, while `Waiting` on it.
    link: Option<LinkAsk>,
    /// When the current phase has run out of time.
    deadline: Instant,
}

/// The page of a link whose token fits its path, after the action if there was one.
fn link_page(path: LinkPath, action: LinkAction, view: &LinkView) -> Response {
    let email = view.email.as_str();
    let events: Vec<&str> = view.events.iter().map(String::as_str).collect();
    match (path, view.kind, action) {
        (_, _, LinkAction::OptOut) | (_, LinkKind::OptOut, LinkAction::Apply) => http::opted_out_page(email),
        (LinkPath::Confirm, _, LinkAction::Show) => http::confirm_page(email, &events),
        (LinkPath::Confirm, _, LinkAction::Apply) => http::confirmed_page(email, &events),
        (LinkPath::Unsubscribe, LinkKind::OptOut, LinkAction::Show) if view.opted_out => {
            http::opted_out_page(email)
        }
        (LinkPath::Unsubscribe, LinkKind::OptOut, LinkAction::Show) => http::optout_page(email, &events),
        (LinkPath::Unsubscribe, _, action) => match (events.first(), action) {
            (Some(event), LinkAction::Show) => http::unsubscribe_page(email, event),
            (Some(event), _) => http::unsubscribed_page(email, event),
            (None, _) if view.opted_out => http::opted_out_page(email),
            (None, _) => http::not_subscribed_page(email),
        },
    }
}

/// The HTTP listener and its connections.
pub(super) struct HttpSide {
    listener: Option<TcpListener>,
    conns: Slab<HttpConn>,
    next_id: u64,
    /// Connections with output to write at the end of the turn.
    dirty: Vec<usize>,
    /// Connections to free at the end of the turn.
    closing: Vec<usize>,
    /// The next deadline sweep, while connections are open.
    pub(super) next_sweep: Option<Instant>,
    /// When a refusal of connections was last logged.
    refusal_logged: Option<Instant>,
}

impl HttpSide {
    /// No listener: `http_host` is empty.
    pub(super) fn none() -> HttpSide {
        HttpSide {
            listener: None,
            conns: Slab::new(),
            next_id: 1,
            dirty: Vec::new(),
            closing: Vec::new(),
            next_sweep: None,
            refusal_logged: None,
        }
    }

    /// Whether a refusal may be logged now; if so, the interval starts again.
    fn may_log_refusal(&mut self, now: Instant) -> bool {
        let quiet = !matches!(self.refusal_logged, Some(t) if now.duration_since(t) < BUSY_LOG_EVERY);
        if quiet {
            self.refusal_logged = Some(now);
        }
        quiet
    }

    fn close(&mut self, key: usize) {
        if self.conns.contains(key) && !self.closing.contains(&key) {
            self.closing.push(key);
        }
    }
}

/// The numbers the reactor counts itself for STATS and `/metrics`: plain integers, each
/// bumped where its event happens.
#[derive(Debug, Default)]
pub(super) struct Counters {
    /// PUBs accepted (given an id).
    pub(super) publications: u64,
    /// MSG lines queued to live connections, added once per PUB.
    pub(super) messages_sent: u64,
    /// Connections closed as slow consumers.
    pub(super) slow_consumers: u64,
}

fn metric(name: &'static str, kind: MetricKind, help: &'static str, value: u64) -> Metric {
    Metric { name, help, kind, value }
}

impl Reactor {
    /// Takes over the bound HTTP listener (start-up, from `main`).
    pub fn add_http(&mut self, listener: std::net::TcpListener) -> io::Result<()> {
        let mut listener = TcpListener::from_std(listener);
        self.poll.registry().register(&mut listener, Source::HttpListener.token(), Interest::READABLE)?;
        self.http.listener = Some(listener);
        Ok(())
    }

    /// Every number of STATS and `/metrics`, in the order the man page lists them.
    pub(super) fn metrics(&self, store: &StoreStats) -> Vec<Metric> {
        use MetricKind::{Counter, Gauge};
        let live: usize = self.clients.conns.iter().map(|(_, c)| c.subs.len()).sum();
        let restarts = |c: &super::child_link::Child| c.starts.saturating_sub(1);
        let mailer_restarts = self.mailers.iter().map(|m| restarts(&m.child)).sum();
        vec![
            metric(
                "uptime_seconds",
                Gauge,
                "Seconds since notifd started.",
                self.started.elapsed().as_secs(),
            ),
            metric("connections", Gauge, "Client connections open.", self.clients.conns.len() as u64),
            metric(
                "connections_total",
                Counter,
                "Client connections accepted since start.",
                self.clients.next_id - 1,
            ),
            metric(
                "live_subscriptions",
                Gauge,
                "Live (event, email) subscriptions of the open connections.",
                live as u64,
            ),
            metric("publications_total", Counter, "PUBs accepted since start.", self.counters.publications),
            metric(
                "messages_sent_total",
                Counter,
                "MSG lines queued to live connections since start.",
                self.counters.messages_sent,
            ),
            metric(
                "slow_consumers_total",
                Counter,
                "Connections closed as slow consumers since start.",
                self.counters.slow_consumers,
            ),
            metric(
                "stored_subscriptions",
                Gauge,
                "Subscriptions in the database.",
                store.stored_subscriptions,
            ),
            metric(
                "pending_subscriptions",
                Gauge,
                "Stored subscriptions waiting for their confirmation.",
                store.pending_subscriptions,
            ),
            metric("outbox_pending", Gauge, "Emails waiting to be sent or being sent.", store.outbox_pending),
            metric(
                "emails_sent_total",
                Counter,
                "Emails accepted by the mail transport, as the database counts them.",
                store.emails_sent_total,
            ),
            metric(
                "emails_failed_total",
                Counter,
                "Emails given up after their last try, as the database counts them.",
                store.emails_failed_total,
            ),
            metric(
                "store_restarts_total",
                Counter,
                "Restarts of the store since start.",
                restarts(&self.store.child),
            ),
            metric("mailer_restarts_total", Counter, "Restarts of the mailers since start.", mailer_restarts),
        ]
    }

    /// Accepts until WouldBlock; over `http_max_clients`, answers 503 and closes.
    pub(super) fn http_accept(&mut self) {
        let now = Instant::now();
        loop {
            let Some(listener) = self.http.listener.as_ref() else { return };
            let (mut sock, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, most likely: the connection stays in the
                    // backlog and is taken at the listener's next event.
                    if self.http.may_log_refusal(now) {
                        log::warn!("http accept: {e}");
                    }
                    return;
                }
            };
            // A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; log them as a.b.c.d.
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            let max = self.cfg.http_max_clients as usize;
            let busy = self.http.conns.len() >= max;
            if busy {
                if self.http.may_log_refusal(now) {
                    log::warn!("http: over http_max_clients ({max}); refusing with 503");
                }
                if self.http.conns.len() >= max + BUSY_EXTRA {
                    continue;
                }
            }
            let entry = self.http.conns.vacant_entry();
            let key = entry.key();
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(e) = self.poll.registry().register(&mut sock, Source::Http(key).token(), interest) {
                log::warn!("{peer}: http register: {e}");
                continue;
            }
            entry.insert(HttpConn {
                id: self.http.next_id,
                sock,
                peer,
                input: Vec::new(),
                reader: RequestReader::new(),
                out: Vec::new(),
                phase: Phase::Reading,
                head: false,
                link: None,
                deadline: now + Duration::from_secs(http::REQUEST_TIMEOUT_SECS),
            });
            self.http.next_id += 1;
            self.http.next_sweep.get_or_insert(now + SWEEP_EVERY);
            log::debug!("{peer}: http connected");
            if busy {
                let page =
                    http::error_page(Status::ServiceUnavailable, "too many connections; try again later");
                self.http_respond(key, &page);
            }
        }
    }

    /// A readiness event on an HTTP connection.
    pub(super) fn http_event(&mut self, key: usize, readable: bool, writable: bool) {
        let Some(c) = self.http.conns.get(key) else { return };
        if writable && c.phase == Phase::Writing {
            self.http.dirty.push(key);
        }
        if readable {
            match c.phase {
                Phase::Reading => self.http_read(key),
                Phase::Lingering => self.http_drain(key),
                // Bytes after the request are not ours.
                Phase::Waiting | Phase::Writing => {}
            }
        }
    }

    /// Reads until WouldBlock or a whole request (or a final refusal).
    fn http_read(&mut self, key: usize) {
        let limits = Limits::default();
        let cap = limits.max_head + limits.max_body;
        let mut buf = [0u8; 4096];
        loop {
            let c = &mut self.http.conns[key];
            let want = (cap - c.input.len()).min(buf.len());
            let n = match c.sock.read(&mut buf[..want.max(1)]) {
                Ok(0) => {
                    log::debug!("{}: http: closed before a whole request", c.peer);
                    return self.http.close(key);
                }
                Ok(n) => n.min(want),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("{}: http read: {e}", c.peer);
                    return self.http.close(key);
                }
            };
            c.input.extend_from_slice(&buf[..n]);
            // At the cap the reader's answer is final, so no more than that is ever held.
            match c.reader.read(&c.input, &limits) {
                Ok(None) => {}
                Ok(Some(req)) => return self.http_request(key, req),
                Err(e) => return self.http_refused(key, &e),
            }
        }
    }

    /// A request refused by its bytes (400, 404, 405, 411, 413, 415, 431).
    fn http_refused(&mut self, key: usize, e: &HttpError) {
        log::debug!("{}: http: {e}", self.http.conns[key].peer);
        self.http.conns[key].head = e.head;
        self.http_respond(key, &e.response());
    }

    /// A whole request: answered at once, or once the store has answered.
    fn http_request(&mut self, key: usize, req: Request) {
        let c = &mut self.http.conns[key];
        c.head = req.is_head();
        c.input = Vec::new();
        log::debug!("{}: http {:?} {}", c.peer, req.method, req.route.name());
        let response = match req.action() {
            Action::Health => self.health(),
            Action::Metrics if !self.metrics_allowed(key, &req) => {
                log::debug!("{}: http: metrics refused", self.http.conns[key].peer);
                http::forbidden()
            }
            Action::Metrics => {
                let conn_id = self.http.conns[key].id;
                self.send_store(|req| ToStore::Stats { req }, Target::Http { key, conn_id });
                self.http_wait(key);
                return;
            }
            Action::ConfirmPage(t) => return self.http_link(key, LinkPath::Confirm, t, LinkAction::Show),
            Action::Confirm(t) => return self.http_link(key, LinkPath::Confirm, t, LinkAction::Apply),
            Action::UnsubscribePage(t) => {
                return self.http_link(key, LinkPath::Unsubscribe, t, LinkAction::Show)
            }
            Action::Unsubscribe(t) => {
                return self.http_link(key, LinkPath::Unsubscribe, t, LinkAction::Apply)
            }
            Action::OptOut(t) => return self.http_link(key, LinkPath::Unsubscribe, t, LinkAction::OptOut),
        };
        self.http_respond(key, &response);
    }

    /// The connection now waits on the store, for at most `store_timeout`.
    fn http_wait(&mut self, key: usize) {
        let c = &mut self.http.conns[key];
        c.phase = Phase::Waiting;
        c.deadline = Instant::now() + Duration::from_secs(self.cfg.store_timeout.into());
    }

    /// A confirm or unsubscribe link: a token of the wrong form is a 404 at once; any
    /// other is shown by the store first (see [`LinkAsk`]).
    fn http_link(&mut self, key: usize, path: LinkPath, token: &Token, action: LinkAction) {
        if !crate::consent::token_form_ok(token.as_str()) {
            log::debug!("{}: http: a link token of the wrong form", self.http.conns[key].peer);
            return self.http_respond(key, &http::not_found_page());
        }
        let ask = LinkAsk { path, token: token.clone(), action, checked: action == LinkAction::Show };
        self.http_open_link(key, &ask, LinkAction::Show);
        self.http.conns[key].link = Some(ask);
    }

    fn http_open_link(&mut self, key: usize, ask: &LinkAsk, action: LinkAction) {
        let conn_id = self.http.conns[key].id;
        let token = ask.token.as_str().to_owned();
        let now = crate::ipc::unix_now();
        self.send_store(|req| ToStore::OpenLink { req, token, action, now }, Target::Http { key, conn_id });
        self.http_wait(key);
    }

    /// The store's `LinkPage` answer: for a waiting HTTP connection; any other request
    /// answered with it is failed.
    pub(super) fn http_link_answer(&mut self, req: u64, view: Option<LinkView>) {
        let Some(r) = self.store.pending.remove(&req) else { return };
        match r.target {
            Target::Http { key, conn_id } => self.http_link_page(key, conn_id, view),
            target => self.fail_reply(&target, "unexpected answer from the store"),
        }
    }

    /// The store's view of a link, if its connection still waits: the page, or the
    /// POST's second step.
    fn http_link_page(&mut self, key: usize, conn_id: u64, view: Option<LinkView>) {
        if !self.http_waiting(key, conn_id) {
            return;
        }
        let Some(mut ask) = self.http.conns[key].link.take() else {
            // An answer to a request that was not a link's: the store is confused.
            let text = "unexpected answer from the database";
            return self.http_respond(key, &http::error_page(Status::InternalServerError, text));
        };
        let peer = self.http.conns[key].peer;
        let Some(view) = view.filter(|v| ask.path.fits(v.kind)) else {
            log::debug!("{peer}: http: a link not valid for its path");
            return self.http_respond(key, &http::not_found_page());
        };
        if !ask.checked {
            ask.checked = true;
            self.http_open_link(key, &ask, ask.action);
            self.http.conns[key].link = Some(ask);
            return;
        }
        if view.changed > 0 {
            let what = match (view.kind, ask.action) {
                (_, LinkAction::OptOut) | (LinkKind::OptOut, _) => "opted out",
                (LinkKind::Confirm, _) => "confirmed",
                (LinkKind::Unsubscribe, _) => "unsubscribed",
            };
            log::info!("{peer}: http: {what} ({} pairs)", view.changed);
        }
        self.http_respond(key, &link_page(ask.path, ask.action, &view));
    }

    /// `/metrics` is for the operator: the publish token as a bearer, or, with no token
    /// set, a loopback client whose request no proxy forwarded.
    fn metrics_allowed(&self, key: usize, req: &Request) -> bool {
        if self.cfg.publish_token.is_empty() {
            self.http.conns[key].peer.ip().is_loopback() && !req.proxied
        } else {
            req.bearer
                .as_ref()
                .is_some_and(|t| super::commands::constant_time_eq(t.as_str(), &self.cfg.publish_token))
        }
    }

    /// `/health`: 200 while the store and every mailer answer, else 503 naming which do
    /// not. A child answers when it runs and has greeted; the store also must not hold a
    /// request it was sent more than `store_timeout` ago.
    fn health(&self) -> Response {
        let timeout = Duration::from_secs(self.cfg.store_timeout.into());
        let stuck = self.store.pending.values().next().is_some_and(|r| r.sent.elapsed() > timeout);
        let store = &self.store.child;
        let mut down: Vec<String> = Vec::new();
        if !store.up() || !store.greeted || stuck {
            down.push("store".into());
        }
        for (i, m) in self.mailers.iter().enumerate() {
            if !m.child.up() || !m.child.greeted {
                down.push(format!("mailer {}", i + 1));
            }
        }
        let down: Vec<&str> = down.iter().map(String::as_str).collect();
        http::health(&down)
    }

    /// The store's counts for a `/metrics` request, if its connection still waits.
    pub(super) fn http_metrics(&mut self, key: usize, conn_id: u64, metrics: &[Metric]) {
        if self.http_waiting(key, conn_id) {
            self.http_respond(key, &http::metrics_response(metrics));
        }
    }

    /// The store failed the request of a waiting connection.
    pub(super) fn http_store_failed(&mut self, key: usize, conn_id: u64) {
        if self.http_waiting(key, conn_id) {
            let text = "the database reported an error";
            self.http_respond(key, &http::error_page(Status::InternalServerError, text));
        }
    }

    fn http_waiting(&self, key: usize, conn_id: u64) -> bool {
        self.http.conns.get(key).is_some_and(|c| c.id == conn_id && c.phase == Phase::Waiting)
    }

    /// Queues the response; it is written at the end of the turn.
    fn http_respond(&mut self, key: usize, response: &Response) {
        let c = &mut self.http.conns[key];
        log::debug!("{}: http: {} {}", c.peer, response.status.code(), response.status.reason());
        response.encode(c.head, crate::ipc::unix_now(), &mut c.out);
        c.phase = Phase::Writing;
        c.input = Vec::new();
        c.deadline = Instant::now() + Duration::from_secs(http::REQUEST_TIMEOUT_SECS);
        self.http.dirty.push(key);
    }

    /// Reads and drops what a lingering client still sends; closes at its EOF, or when
    /// it sends more than a turn's worth.
    fn http_drain(&mut self, key: usize) {
        let mut buf = [0u8; 4096];
        let c = &mut self.http.conns[key];
        let mut budget = LINGER_BUDGET;
        loop {
            match c.sock.read(&mut buf) {
                Ok(0) => return self.http.close(key),
                Ok(n) if n >= budget => return self.http.close(key),
                Ok(n) => budget -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.http.close(key),
            }
        }
    }

    /// End of the turn: deadlines (once a second), writes, then frees closed connections.
    pub(super) fn http_turn(&mut self, now: Instant) {
        if self.http.next_sweep.is_some_and(|t| t <= now) {
            self.http_sweep(now);
        }
        for key in std::mem::take(&mut self.http.dirty) {
            self.http_flush(key, now);
        }
        for key in std::mem::take(&mut self.http.closing) {
            if let Some(mut c) = self.http.conns.try_remove(key) {
                let _ = self.poll.registry().deregister(&mut c.sock);
                log::debug!("{}: http closed", c.peer);
            }
        }
        if self.http.conns.is_empty() {
            self.http.next_sweep = None;
        }
    }

    fn http_sweep(&mut self, now: Instant) {
        self.http.next_sweep = Some(now + SWEEP_EVERY);
        let late: Vec<usize> =
            self.http.conns.iter().filter(|(_, c)| c.deadline <= now).map(|(k, _)| k).collect();
        for key in late {
            let c = &self.http.conns[key];
            match c.phase {
                Phase::Waiting => {
                    let text = "the database did not answer in time";
                    self.http_respond(key, &http::error_page(Status::ServiceUnavailable, text));
                }
                Phase::Reading => {
                    log::debug!(
                        "{}: http: no whole request within {} s; closing",
                        c.peer,
                        http::REQUEST_TIMEOUT_SECS
                    );
                    self.http.close(key);
                }
                Phase::Writing | Phase::Lingering => self.http.close(key),
            }
        }
    }

    /// Writes what the socket takes; once the response is out, shuts our side and lingers.
    fn http_flush(&mut self, key: usize, now: Instant) {
        let Some(c) = self.http.conns.get_mut(key) else { return };
        if c.phase != Phase::Writing {
            return;
        }
        let mut written = 0;
        while written < c.out.len() {
            match c.sock.write(&c.out[written..]) {
                Ok(0) => return self.http.close(key),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.http.close(key),
            }
        }
        c.out.drain(..written);
        if c.out.is_empty() {
            c.out = Vec::new();
            let _ = c.sock.shutdown(std::net::Shutdown::Write);
            c.phase = Phase::Lingering;
            c.deadline = c.deadline.min(now + LINGER);
            self.http_drain(key);
        }
    }

    /// The daemon is stopping: no more HTTP; what is open is closed at once.
    pub(super) fn http_stop(&mut self) {
        if let Some(mut l) = self.http.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let keys: Vec<usize> = self.http.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.http.close(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn title(path: LinkPath, kind: LinkKind, action: LinkAction, events: &[&str], opted_out: bool) -> String {
        let view = LinkView {
            kind,
            email: "ana@example.org".into(),
            events: events.iter().map(|e| e.to_string()).collect(),
            changed: 0,
            opted_out,
        };
        let body = link_page(path, action, &view).body;
        let start = body.find("<h1>").expect("a heading") + 4;
        body[start..start + body[start..].find("</h1>").unwrap()].to_owned()
    }

    #[test]
    fn each_link_and_action_gets_its_page() {
        use LinkAction::{Apply, OptOut, Show};
        use LinkPath::{Confirm as C, Unsubscribe as U};
        let cases = [
            (C, LinkKind::Confirm, Show, &["e"][..], false, "Confirm email notifications"),
            (C, LinkKind::Confirm, Show, &[], false, "Nothing to confirm"),
            (C, LinkKind::Confirm, Apply, &["e"], false, "Subscription confirmed"),
            (U, LinkKind::Unsubscribe, Show, &["e"], false, "Unsubscribe"),
            (U, LinkKind::Unsubscribe, Show, &[], false, "Already unsubscribed"),
            (U, LinkKind::Unsubscribe, Show, &[], true, "All email stopped"),
            (U, LinkKind::Unsubscribe, Apply, &["e"], false, "Unsubscribed"),
            (U, LinkKind::Unsubscribe, OptOut, &[], true, "All email stopped"),
            (U, LinkKind::OptOut, Show, &["e"], false, "Stop all email"),
            (U, LinkKind::OptOut, Show, &[], true, "All email stopped"),
            (U, LinkKind::OptOut, Apply, &[], true, "All email stopped"),
            (U, LinkKind::OptOut, OptOut, &[], true, "All email stopped"),
        ];
        for (path, kind, action, events, opted_out, want) in cases {
            assert_eq!(title(path, kind, action, events, opted_out), want, "{path:?} {kind:?} {action:?}");
        }
    }

    #[test]
    fn a_token_fits_only_its_path() {
        assert!(LinkPath::Confirm.fits(LinkKind::Confirm));
        assert!(!LinkPath::Confirm.fits(LinkKind::Unsubscribe) && !LinkPath::Confirm.fits(LinkKind::OptOut));
        assert!(
            LinkPath::Unsubscribe.fits(LinkKind::Unsubscribe) && LinkPath::Unsubscribe.fits(LinkKind::OptOut)
        );
        assert!(!LinkPath::Unsubscribe.fits(LinkKind::Confirm));
    }
}
