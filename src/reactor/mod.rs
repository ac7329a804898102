//! The reactor: the parent process. One thread, one `mio::Poll`, and it never blocks.
//!
//! It owns the listening socket, every client connection, the index event → connections,
//! and the pipes to the store and the mailers (a star: every record passes through here).
//! It assigns notification ids from blocks the store reserved durably and fans `MSG` lines
//! out at once; `+OK` replies wait for the store's commit. No SQLite, no SMTP, no DNS, no
//! sleep while serving: anything slow lives in a child.
//!
//! Files: this one is the loop and its dispatch; `client_io` (accepting, reading,
//! framing, writing and closing client sockets), `commands` (one handler per client
//! command), `conn` (one client), `subs` (its live subscriptions), `store_link` (requests
//! to the store and their answers), `mail_router` (routing emails between the store's
//! outbox and the mailers), `child_link` (one child's pipes) and `supervise` (forking,
//! losing and restarting the children), `lifecycle` (reload and graceful stop), `limits`
//! (per-address and per-network bounds, idle connections, the total output budget),
//! `http_side` (the HTTP listener, its connections, and the numbers of STATS and
//! `/metrics`), `replay` (WATCH, and SINCE's replays), `tls_conn` (the TLS listener's
//! connections: rustls between socket and lines).

mod child_link;
mod client_io;
mod commands;
mod conn;
mod http_side;
mod lifecycle;
mod limits;
mod mail_router;
mod replay;
mod store_link;
mod subs;
mod supervise;
mod tls_conn;

use crate::config::{Config, MailPolicy, Transport};
use crate::ipc::MailSettings;
use client_io::{Acceptor, Clients};
use http_side::{Counters, HttpSide};
use mail_router::{MailRouter, MailerLink};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};
use store_link::StoreLink;
use supervise::ChildId;
use tls_conn::TlsSide;

/// The fan-out buffer keeps at most this capacity from one turn to the next.
const FAN_KEEP: usize = 4 << 20;

/// Where a poll event comes from. The listener, the signals and the children's pipes
/// take tokens counting down from `usize::MAX`; client connections use their slab keys,
/// far below; HTTP connections theirs from `HTTP_BASE`, and the HTTP listener sits at
/// `FIXED_FLOOR`, between the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The listening socket: accept.
    Listener,
    /// signal-hook-mio's pipe: a signal arrived.
    Signals,
    /// The store's pipe to the reactor: records to read.
    StoreRead,
    /// The reactor's pipe to the store: room to write.
    StoreWrite,
    /// Mailer `i`'s pipe to the reactor.
    MailerRead(usize),
    /// The reactor's pipe to mailer `i`.
    MailerWrite(usize),
    /// A client connection, by slab key.
    Client(usize),
    /// The HTTP listening socket: accept.
    HttpListener,
    /// An HTTP connection, by its slab key.
    Http(usize),
    /// [tls] The TLS listening socket: accept.
    TlsListener,
}

/// Tokens from here up are not connections.
const FIXED_FLOOR: usize = usize::MAX / 2;

/// Tokens from here up to `FIXED_FLOOR` are HTTP connections; a slab of `max_clients`
/// (a `u32`) never gets here.
const HTTP_BASE: usize = usize::MAX / 4;
/// [tls] The TLS listener's token: above the clients, far below the children's, which
/// count down from the top two per mailer.
const TLS_LISTENER_TOKEN: usize = FIXED_FLOOR + 7643;

impl Source {
    fn token(self) -> Token {
        Token(match self {
            Source::Listener => usize::MAX,
            Source::Signals => usize::MAX - 1,
            Source::StoreRead => usize::MAX - 2,
            Source::StoreWrite => usize::MAX - 3,
            Source::MailerRead(i) => usize::MAX - 4 - 2 * i,
            Source::MailerWrite(i) => usize::MAX - 5 - 2 * i,
            Source::Client(key) => key,
            Source::HttpListener => FIXED_FLOOR,
            Source::Http(key) => HTTP_BASE + key,
            Source::TlsListener => TLS_LISTENER_TOKEN,
        })
    }

    fn of(Token(t): Token) -> Source {
        if t < HTTP_BASE {
            return Source::Client(t);
        }
        if t < FIXED_FLOOR {
            return Source::Http(t - HTTP_BASE);
        }
        if t == FIXED_FLOOR {
            return Source::HttpListener;
        }
        if t == TLS_LISTENER_TOKEN {
            return Source::TlsListener;
        }
        match usize::MAX - t {
            0 => Source::Listener,
            1 => Source::Signals,
            2 => Source::StoreRead,
            3 => Source::StoreWrite,
            d if d % 2 == 0 => Source::MailerRead((d - 4) / 2),
            d => Source::MailerWrite((d - 5) / 2),
        }
    }
}

/// Signals received and not yet acted on.
#[derive(Default)]
struct Received {
    /// SIGTERM or SIGINT: stop gracefully.
    term: bool,
    /// SIGHUP: reload the configuration and reopen the log.
    hup: bool,
    /// SIGCHLD: reap.
    chld: bool,
}

/// The live daemon.
pub struct Reactor {
    cfg: Config,
    poll: Poll,
    acceptor: Acceptor,
    signals: Signals,
    received: Received,
    clients: Clients,
    store: StoreLink,
    mailers: Vec<MailerLink>,
    mail: MailRouter,
    /// The connections replaying kept notifications (SINCE).
    replays: replay::Replays,
    /// Children whose pipe still had data when their read budget ran out.
    resume_child: Vec<ChildId>,
    /// This turn's MSG lines, each formatted once and shared by every subscriber (see
    /// `Conn::shared`); emptied after the turn's writes.
    fan: Vec<u8>,
    /// The `publish_token` generation: a reload that changes the token bumps it, so
    /// connections that authenticated with the old one must AUTH again.
    token_gen: u64,
    /// The `token_gen` the offline policy's live addresses were counted under; another
    /// one has them counted afresh, since a new token changes who is trusted.
    live_gen: u64,
    /// Stopping gracefully since then.
    stopping: Option<Instant>,
    /// Why the daemon cannot go on (a child speaks another record version); `run`
    /// returns it.
    fatal: Option<String>,
    /// The HTTP listener (when `http_host` is set) and its connections.
    http: HttpSide,
    /// What STATS and `/metrics` count that nothing else keeps.
    counters: Counters,
    /// When the reactor started, for `uptime_seconds`.
    started: Instant,
    /// [tls] The TLS listener, its configuration and the handshakes under way.
    tls: TlsSide,
}

impl Reactor {
    /// Builds the reactor around the bound listeners (the plain one unless `plain =
    /// false`; the TLS one with its configuration when `tls_cert_file` is set); forks the
    /// children.
    pub fn new(
        cfg: Config,
        listener: Option<std::net::TcpListener>,
        tls: Option<(std::net::TcpListener, Arc<rustls::ServerConfig>)>,
        mail: MailSettings,
    ) -> io::Result<Reactor> {
        let poll = Poll::new()?;
        let listener = match listener {
            Some(l) => {
                let mut l = TcpListener::from_std(l);
                poll.registry().register(&mut l, Source::Listener.token(), Interest::READABLE)?;
                Some(l)
            }
            None => None,
        };
        let mut tls_side = TlsSide::default();
        if let Some((l, config)) = tls {
            let mut l = TcpListener::from_std(l);
            poll.registry().register(&mut l, Source::TlsListener.token(), Interest::READABLE)?;
            tls_side.listener = Some(l);
            tls_side.config = Some(config);
        }
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP, SIGCHLD])?;
        poll.registry().register(&mut signals, Source::Signals.token(), Interest::READABLE)?;
        let workers = if cfg.mail_transport == Transport::None { 0 } else { cfg.mail_workers as usize };
        let mut r = Reactor {
            poll,
            acceptor: Acceptor::new(listener),
            signals,
            received: Received::default(),
            clients: Clients::new(cfg.max_clients as usize),
            store: StoreLink::new(cfg.store_settings()),
            mailers: (0..workers).map(MailerLink::new).collect(),
            mail: MailRouter::new(mail),
            replays: replay::Replays::default(),
            resume_child: Vec::new(),
            fan: Vec::with_capacity(64 * 1024),
            token_gen: 1,
            live_gen: 1,
            stopping: None,
            fatal: None,
            http: HttpSide::none(),
            counters: Counters::default(),
            started: Instant::now(),
            tls: tls_side,
            cfg,
        };
        if r.mail_policy() == MailPolicy::Offline {
            // Kept from the first SUB on, so that no PUB has to build it from every pair.
            r.clients.live = Some(Default::default());
        }
        for id in r.child_ids() {
            r.start_child(id)?;
        }
        r.ask_ids();
        Ok(r)
    }

    /// Runs until SIGTERM/SIGINT and a clean stop, and returns the exit status; or
    /// returns why the daemon cannot go on.
    pub fn run(&mut self) -> Result<i32, String> {
        let mut events = Events::with_capacity(1024);
        // One turn's work before the first wait: what `wait_store` read from the children
        // (a mailer's hello, the first id block) woke nothing, and the first request for
        // due emails would otherwise wait for an unrelated event (a client, a signal).
        self.clients.sweep.set_clock(Instant::now());
        if let Some(status) = self.end_turn()? {
            return Ok(status);
        }
        loop {
            let timeout = self.next_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("poll: {e}");
                    return Ok(1);
                }
            }
            self.clients.sweep.set_clock(Instant::now());
            for ev in events.iter() {
                self.dispatch(Source::of(ev.token()), ev.is_readable(), ev.is_writable());
            }
            if let Some(status) = self.end_turn()? {
                return Ok(status);
            }
        }
    }

    /// The work after a turn's events; `Ok(Some(status))` once stopped, `Err` for a fatal
    /// error (a child speaking another record version).
    fn end_turn(&mut self) -> Result<Option<i32>, String> {
        let status = self.after_events();
        match self.fatal.take() {
            Some(why) => Err(why),
            None => Ok(status),
        }
    }

    fn dispatch(&mut self, source: Source, readable: bool, writable: bool) {
        match source {
            Source::Listener => self.accept(false),
            Source::TlsListener => self.accept(true),
            Source::Signals => self.take_signals(),
            Source::StoreRead => self.child_readable(ChildId::Store),
            Source::StoreWrite => self.flush_child(ChildId::Store),
            Source::MailerRead(i) => self.child_readable(ChildId::Mailer(i)),
            Source::MailerWrite(i) => self.flush_child(ChildId::Mailer(i)),
            Source::Client(key) => self.conn_event(key, readable, writable),
            Source::HttpListener => self.http_accept(),
            Source::Http(key) => self.http_event(key, readable, writable),
        }
    }

    /// Notes the signals that arrived; they are acted on after the turn's events.
    fn take_signals(&mut self) {
        for sig in self.signals.pending() {
            match sig {
                SIGTERM | SIGINT => self.received.term = true,
                SIGHUP => self.received.hup = true,
                SIGCHLD => self.received.chld = true,
                _ => {}
            }
        }
    }

    /// Everything that happens once per turn after the events.
    fn after_events(&mut self) -> Option<i32> {
        if std::mem::take(&mut self.received.chld) {
            self.reap();
        }
        if std::mem::take(&mut self.received.hup) {
            self.reload();
        }
        if std::mem::take(&mut self.received.term) && self.stopping.is_none() {
            self.begin_stop();
        }
        let now = Instant::now();
        self.restart_children(now);
        self.expire(now);
        self.sweep(now);
        self.expire_handshakes(now);
        self.run_deferred(now);
        for id in std::mem::take(&mut self.resume_child) {
            self.child_readable(id);
        }
        self.resume_conns();
        self.pump_mail(now);
        self.pump_replays();
        self.flush_children();
        self.flush_conns();
        self.reap_conns();
        if self.stopping.is_some() {
            self.http_stop();
        }
        self.http_turn(now);
        if let Some(since) = self.stopping {
            return self.stop_step(since);
        }
        if let Some(t) = self.acceptor.paused_until {
            if now >= t {
                self.acceptor.paused_until = None;
                self.accept(false);
                self.accept(true);
            }
        }
        None
    }

    fn next_timeout(&self) -> Option<Duration> {
        if !self.clients.resume.is_empty()
            || !self.clients.closing.is_empty()
            || !self.resume_child.is_empty()
            || self.replays_want_turn()
        {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        consider(self.store.next_expiry(self.store_timeout()));
        consider(self.acceptor.paused_until);
        consider(self.tls.handshakes.next_deadline());
        consider(self.mail.next_due);
        consider(self.store.deferred.iter().map(|d| d.0).min());
        consider(self.store.child.restart_at);
        consider(self.sweep_due());
        consider(self.http.next_sweep);
        for m in &self.mailers {
            consider(m.child.restart_at);
        }
        if self.stopping.is_some() {
            consider(Some(now + Duration::from_millis(50)));
        }
        next.map(|t| t.saturating_duration_since(now) + Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_decode_to_their_source() {
        let sources = [
            Source::Listener,
            Source::Signals,
            Source::StoreRead,
            Source::StoreWrite,
            Source::MailerRead(0),
            Source::MailerWrite(0),
            Source::MailerRead(63),
            Source::MailerWrite(63),
            Source::Client(0),
            Source::Client(1_000_000),
            Source::Client(u32::MAX as usize),
            Source::HttpListener,
            Source::Http(0),
            Source::Http(1_000_000),
            Source::Http(u32::MAX as usize),
            Source::TlsListener,
        ];
        let mut tokens = std::collections::HashSet::new();
        for s in sources {
            assert_eq!(Source::of(s.token()), s, "{s:?}");
            assert!(tokens.insert(s.token()), "{s:?} shares its token");
        }
        assert_eq!(Source::of(Token(usize::MAX)), Source::Listener);
        assert_eq!(Source::of(Token(usize::MAX - 4)), Source::MailerRead(0));
        assert_eq!(Source::of(Token(usize::MAX - 7)), Source::MailerWrite(1));
    }
}
