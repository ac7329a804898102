//! The reactor: the parent process. One thread, one `mio::Poll`, and it never blocks.
//!
//! It owns the listening socket, every client connection, the index event → connections,
//! and the pipes to the store and the mailers (a star: every record passes through here).
//! It assigns notification ids from blocks the store reserved durably and fans `MSG` lines
//! out at once; `+OK` replies wait for the store's commit. No SQLite, no SMTP, no DNS, no
//! sleep while serving: anything slow lives in a child.
//!
//! Files: `conn` (one client), `subs` (its live subscriptions), `store_link` (requests
//! to the store and their answers), `mail_router` (routing emails between the store's outbox
//! and the mailers), `child_link` + `supervise` (the child processes), `lifecycle`
//! (reload and graceful stop).

mod child_link;
mod conn;
mod lifecycle;
mod mail_router;
mod store_link;
mod subs;
mod supervise;

use mail_router::MailRouter;

use crate::config::Transport;
use crate::config::{Config, MailPolicy};
use crate::ipc::{MailPlan, MailSettings, StoreSettings, ToStore};
use crate::protocol::{self, Code, Command, Framed};
use child_link::Child;
use conn::{Conn, State};
use indexmap::IndexSet;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LISTENER: Token = Token(usize::MAX);
const SIGNALS: Token = Token(usize::MAX - 1);
/// Child `i` (0 is the store, then the mailers) reads on `CHILD_BASE - 2i` and writes on
/// `CHILD_BASE - 2i - 1`; client connections use slab keys, far below.
const CHILD_BASE: usize = usize::MAX - 16;

/// Bytes read from one client per loop turn, so that one busy client cannot starve the rest.
const READ_BUDGET: usize = 256 * 1024;
/// The fan-out buffer keeps at most this capacity from one turn to the next.
const FAN_KEEP: usize = 4 << 20;
/// First capacity of an output buffer that receives a MSG.
const FANOUT_BUFFER: usize = 4096;
/// Ids per block reserved by the store; a new block is asked for at half.
const ID_BLOCK: u64 = 10_000;
/// Past these, the reactor stops taking commands that need the store.
const STORE_BACKLOG_MAX: usize = 8 << 20;
const STORE_PENDING_MAX: usize = 500_000;
/// Failed AUTH attempts before the connection is closed.
const MAX_AUTH_FAILURES: u8 = 3;

/// The signals the reactor acts on, set by handlers and read in the loop.
#[derive(Default)]
pub struct Signals {
    pub term: Arc<AtomicBool>,
    pub hup: Arc<AtomicBool>,
    pub chld: Arc<AtomicBool>,
}

/// What a store request answers to.
enum Target {
    /// A client's reply slot; `n` is PUB's count of connections.
    Reply {
        key: usize,
        conn_id: u64,
        seq: u64,
        n: u64,
        listed: u64,
    },
    /// The client is gone or already told UNAVAILABLE.
    Orphan,
    Ids,
    TakeMail,
    MailDone,
}

struct Request {
    record: ToStore,
    target: Target,
    /// Store deaths this request was in flight for.
    deaths: u8,
}

/// The live daemon.
pub struct Reactor {
    cfg: Config,
    poll: Poll,
    listener: Option<TcpListener>,
    /// Accepting paused until then (out of descriptors).
    accept_paused_until: Option<Instant>,
    /// The last accept failed for lack of descriptors (logged once per episode).
    out_of_fds: bool,
    signals: Signals,
    signal_rx: mio::net::UnixStream,
    conns: Slab<Conn>,
    next_conn_id: u64,
    per_ip: HashMap<IpKey, u32>,
    index: HashMap<Rc<str>, IndexSet<usize>>,
    /// Connections to write at the end of the turn.
    dirty: Vec<usize>,
    /// Connections to read again (budget ran out, or a pause was lifted).
    resume: Vec<usize>,
    /// Children whose pipe still had data when their read budget ran out.
    resume_child: Vec<usize>,
    /// Connections paused until the store catches up or ids arrive.
    waiting_store: Vec<usize>,
    /// Connections to close at the end of the turn.
    closing: Vec<usize>,
    /// Children: [0] is the store, the rest are mailers.
    children: Vec<Child>,
    pending: BTreeMap<u64, Request>,
    deadlines: VecDeque<(Instant, u64)>,
    next_req: u64,
    ids: Range<u64>,
    spare_ids: Option<Range<u64>>,
    ids_requested: bool,
    token_gen: u64,
    mail: MailRouter,
    /// Requests to send again after a database error, and when.
    deferred: Vec<(Instant, ToStore, Target)>,
    /// This turn's MSG lines, each formatted once; emptied after the turn's writes.
    fan: Vec<u8>,
    scratch: Vec<u8>,
    stopping: Option<Instant>,
    store_settings: StoreSettings,
}

#[derive(Hash, PartialEq, Eq, Clone, Copy)]
enum IpKey {
    V4(u32),
    /// The /64 of an IPv6 address: one host usually holds a whole /64.
    V6(u64),
}

fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(a) => IpKey::V4(a.into()),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => IpKey::V4(v4.into()),
            None => IpKey::V6((u128::from(a) >> 64) as u64),
        },
    }
}

impl Reactor {
    /// Builds the reactor around a bound listener; forks the children.
    pub fn new(cfg: Config, listener: std::net::TcpListener, mail: MailSettings) -> io::Result<Reactor> {
        let poll = Poll::new()?;
        let mut listener = TcpListener::from_std(listener);
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let signals = Signals::default();
        let (signal_rx, signal_tx) = std::os::unix::net::UnixStream::pair()?;
        signal_rx.set_nonblocking(true)?;
        signal_tx.set_nonblocking(true)?;
        for (sig, flag) in [
            (signal_hook::consts::SIGTERM, &signals.term),
            (signal_hook::consts::SIGINT, &signals.term),
            (signal_hook::consts::SIGHUP, &signals.hup),
            (signal_hook::consts::SIGCHLD, &signals.chld),
        ] {
            signal_hook::flag::register(sig, Arc::clone(flag))?;
            signal_hook::low_level::pipe::register(sig, signal_tx.try_clone()?)?;
        }
        let mut signal_rx = mio::net::UnixStream::from_std(signal_rx);
        poll.registry().register(&mut signal_rx, SIGNALS, Interest::READABLE)?;
        let workers = if cfg.mail_transport == Transport::None { 0 } else { cfg.mail_workers as usize };
        let mut children = vec![Child::new("notifd-store".into(), Token(CHILD_BASE), Token(CHILD_BASE - 1))];
        for i in 1..=workers {
            children.push(Child::new(
                format!("notifd-mailer {i}"),
                Token(CHILD_BASE - 2 * i),
                Token(CHILD_BASE - 2 * i - 1),
            ));
        }
        let store_settings = cfg.store_settings();
        let mut r = Reactor {
            poll,
            listener: Some(listener),
            accept_paused_until: None,
            out_of_fds: false,
            signals,
            signal_rx,
            // Reserved, not touched: the pages of unused entries never count in RSS, and
            // the slab never has to copy itself while it grows.
            conns: Slab::with_capacity(cfg.max_clients as usize),
            next_conn_id: 1,
            per_ip: HashMap::new(),
            index: HashMap::new(),
            dirty: Vec::new(),
            resume: Vec::new(),
            resume_child: Vec::new(),
            waiting_store: Vec::new(),
            closing: Vec::new(),
            children,
            pending: BTreeMap::new(),
            deadlines: VecDeque::new(),
            next_req: 1,
            ids: 0..0,
            spare_ids: None,
            ids_requested: false,
            token_gen: 1,
            mail: MailRouter {
                settings: mail,
                held: vec![HashMap::new(); workers],
                asking: false,
                wanted: true,
                next_due: None,
            },
            deferred: Vec::new(),
            fan: Vec::with_capacity(64 * 1024),
            scratch: vec![0; 64 * 1024],
            stopping: None,
            store_settings,
            cfg,
        };
        for i in 0..r.children.len() {
            r.start_child(i)?;
        }
        r.ask_ids();
        Ok(r)
    }

    /// Runs until SIGTERM/SIGINT and a clean stop; returns the exit status.
    pub fn run(&mut self) -> i32 {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.next_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("poll: {e}");
                    return 1;
                }
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    SIGNALS => self.drain_signal_pipe(),
                    Token(t) if t > CHILD_BASE - 2 * self.children.len() && t <= CHILD_BASE => {
                        let i = (CHILD_BASE - t) / 2;
                        if (CHILD_BASE - t) % 2 == 0 {
                            self.child_readable(i);
                        } else if let Err(e) = self.children[i].flush() {
                            self.child_lost(i, &format!("write: {e}"));
                        }
                    }
                    Token(key) => self.conn_event(key, ev.is_readable(), ev.is_writable()),
                }
            }
            if let Some(status) = self.after_events() {
                return status;
            }
        }
    }

    /// Everything that happens once per turn after the events.
    fn after_events(&mut self) -> Option<i32> {
        if self.signals.chld.swap(false, Ordering::Relaxed) {
            self.reap();
        }
        if self.signals.hup.swap(false, Ordering::Relaxed) {
            self.reload();
        }
        if self.signals.term.swap(false, Ordering::Relaxed) && self.stopping.is_none() {
            self.begin_stop();
        }
        let now = Instant::now();
        self.restart_children(now);
        self.expire(now);
        self.run_deferred(now);
        for i in std::mem::take(&mut self.resume_child) {
            self.child_readable(i);
        }
        self.resume_conns();
        self.pump_mail(now);
        self.flush_children();
        self.flush_conns();
        self.reap_conns();
        if let Some(since) = self.stopping {
            return self.stop_step(since);
        }
        if let Some(t) = self.accept_paused_until {
            if now >= t {
                self.accept_paused_until = None;
                self.accept();
            }
        }
        None
    }

    fn next_timeout(&self) -> Option<Duration> {
        if !self.resume.is_empty() || !self.closing.is_empty() || !self.resume_child.is_empty() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        consider(self.deadlines.front().map(|d| d.0));
        consider(self.accept_paused_until);
        consider(self.mail.next_due);
        consider(self.deferred.iter().map(|d| d.0).min());
        for c in &self.children {
            consider(c.restart_at);
        }
        if self.stopping.is_some() {
            consider(Some(now + Duration::from_millis(50)));
        }
        next.map(|t| t.saturating_duration_since(now) + Duration::from_millis(1))
    }

    // ---- clients ----------------------------------------------------------------------

    fn accept(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else { return };
            match listener.accept() {
                Ok((sock, peer)) => {
                    self.out_of_fds = false;
                    self.admit(sock, peer)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    // The pending connection stays in the backlog; try again shortly
                    // rather than spin on a readable listener we cannot serve.
                    if !self.out_of_fds {
                        // Once per episode: it repeats every 100 ms while it lasts.
                        log::warn!("accept: out of file descriptors; retrying every 100 ms");
                        self.out_of_fds = true;
                    }
                    self.accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
                Err(e) => {
                    log::warn!("accept: {e}");
                    return;
                }
            }
        }
    }

    fn admit(&mut self, mut sock: TcpStream, peer: SocketAddr) {
        // A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; log them as a.b.c.d.
        let peer = match peer {
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), v6.port()),
                None => peer,
            },
            v4 => v4,
        };
        let key = ip_key(peer.ip());
        let from_ip = self.per_ip.get(&key).copied().unwrap_or(0);
        let busy = if self.conns.len() >= self.cfg.max_clients as usize {
            Some("too many connections")
        } else if from_ip >= self.cfg.max_clients_per_ip {
            Some("too many connections from your address")
        } else {
            None
        };
        if let Some(why) = busy {
            log::debug!("{peer}: refused: {why}");
            let mut line = Vec::new();
            protocol::err(&mut line, Code::Busy, why);
            // A fresh socket's buffer takes one short line; if not, the client was gone.
            let _ = io::Write::write(&mut sock, &line);
            return;
        }
        let _ = sock.set_nodelay(true);
        if self.cfg.tcp_keepalive > 0 {
            let ka =
                socket2::TcpKeepalive::new().with_time(Duration::from_secs(self.cfg.tcp_keepalive.into()));
            let _ = socket2::SockRef::from(&sock).set_tcp_keepalive(&ka);
        }
        let entry = self.conns.vacant_entry();
        let k = entry.key();
        if let Err(e) =
            self.poll.registry().register(&mut sock, Token(k), Interest::READABLE | Interest::WRITABLE)
        {
            log::warn!("{peer}: register: {e}");
            return;
        }
        let mut c = Conn::new(self.next_conn_id, sock, peer);
        self.next_conn_id += 1;
        protocol::greeting(&mut c.out, self.cfg.max_line);
        c.dirty = true;
        entry.insert(c);
        *self.per_ip.entry(key).or_insert(0) += 1;
        self.dirty.push(k);
        log::debug!("{peer}: connected");
    }

    fn conn_event(&mut self, key: usize, readable: bool, writable: bool) {
        if !self.conns.contains(key) {
            return;
        }
        if writable {
            self.mark_dirty(key);
        }
        if readable {
            self.read_conn(key);
        }
    }

    fn mark_dirty(&mut self, key: usize) {
        let c = &mut self.conns[key];
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(key);
        }
    }

    /// Reads and handles commands until WouldBlock, a pause, or the turn's budget.
    fn read_conn(&mut self, key: usize) {
        let mut budget = READ_BUDGET;
        loop {
            let c = &mut self.conns[key];
            if c.state != State::Open || c.paused || c.eof {
                return;
            }
            if budget == 0 {
                self.resume.push(key);
                return;
            }
            let mut buf = std::mem::take(&mut self.scratch);
            let got = c.sock.read(&mut buf);
            match got {
                Ok(0) => {
                    self.scratch = buf;
                    self.conn_eof(key);
                    return;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    if self.conns[key].inbuf.is_empty() {
                        let used = self.take_lines(key, &buf[..n]);
                        if let Some(c) = self.conns.get_mut(key) {
                            if c.state == State::Open {
                                c.inbuf.extend_from_slice(&buf[used..n]);
                            }
                        }
                    } else {
                        self.conns[key].inbuf.extend_from_slice(&buf[..n]);
                        self.process_inbuf(key);
                    }
                    self.scratch = buf;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.scratch = buf;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.scratch = buf,
                Err(e) => {
                    self.scratch = buf;
                    log::debug!("{}: read: {e}", self.conns[key].peer);
                    self.close(key);
                    return;
                }
            }
        }
    }

    /// Handles the complete lines held in the connection's input buffer.
    fn process_inbuf(&mut self, key: usize) {
        let inbuf = std::mem::take(&mut self.conns[key].inbuf);
        let used = self.take_lines(key, &inbuf);
        if let Some(c) = self.conns.get_mut(key) {
            if c.state == State::Open && used < inbuf.len() {
                let mut rest = inbuf;
                rest.drain(..used);
                c.inbuf = rest;
            }
        }
    }

    /// The peer closed its side: like QUIT, without the reply.
    fn conn_eof(&mut self, key: usize) {
        let c = &mut self.conns[key];
        c.eof = true;
        if !c.inbuf.is_empty() && !c.discarding && !c.paused {
            // A last line without its LF is still a command.
            c.inbuf.push(b'\n');
            self.process_inbuf(key);
        }
        if let Some(c) = self.conns.get_mut(key) {
            if c.state == State::Open && !c.paused {
                c.state = State::Draining;
                c.inbuf = Vec::new();
                self.mark_dirty(key);
            }
        }
    }

    /// Whether the connection may take one more command now.
    fn can_take(&self, c: &Conn) -> bool {
        // A client that sends without reading its replies stops being read once its
        // output is over budget, rather than growing it without bound.
        c.slots.len() < self.cfg.max_inflight as usize
            && c.out.len() < self.cfg.max_pending
            && !self.store_congested()
            && self.has_ids()
    }

    fn store_congested(&self) -> bool {
        self.children[0].backlog() > STORE_BACKLOG_MAX || self.pending.len() > STORE_PENDING_MAX
    }

    /// Takes and handles lines from `data`; returns the bytes used. Stops early when the
    /// connection must pause or stops reading.
    fn take_lines(&mut self, key: usize, data: &[u8]) -> usize {
        let max_line = self.cfg.max_line;
        let mut at = 0;
        loop {
            let Some(c) = self.conns.get(key) else { return data.len() };
            if c.state != State::Open {
                return data.len();
            }
            if !self.can_take(c) {
                self.pause(key);
                return at;
            }
            let c = &mut self.conns[key];
            let (item, used) = protocol::take_line(&data[at..], max_line, &mut c.discarding);
            if used == 0 {
                return at;
            }
            match item {
                None => {}
                Some(Framed::TooLong) => {
                    let text = format!("line longer than {max_line} bytes");
                    c.reply(&self.fan, |out| protocol::err(out, Code::TooLong, &text));
                    self.mark_dirty(key);
                }
                Some(Framed::Line(line)) => self.command(key, line),
            }
            at += used;
        }
    }

    fn pause(&mut self, key: usize) {
        let global = self.store_congested() || !self.has_ids();
        let c = &mut self.conns[key];
        if !c.paused {
            c.paused = true;
            if global {
                self.waiting_store.push(key);
            }
            // Otherwise max_inflight: resumed when a reply goes out (fill_slot).
        }
    }

    fn resume_conns(&mut self) {
        if !self.waiting_store.is_empty() && !self.store_congested() && self.has_ids() {
            let w = std::mem::take(&mut self.waiting_store);
            self.resume.extend(w);
        }
        let list = std::mem::take(&mut self.resume);
        for key in list {
            let Some(c) = self.conns.get_mut(key) else { continue };
            if c.state != State::Open {
                continue;
            }
            c.paused = false;
            if !c.inbuf.is_empty() {
                self.process_inbuf(key);
            }
            let Some(c) = self.conns.get(key) else { continue };
            if c.paused || c.state != State::Open {
                continue;
            }
            if c.eof {
                self.conn_eof(key);
            } else {
                self.read_conn(key);
            }
        }
    }

    fn command(&mut self, key: usize, line: &[u8]) {
        let cmd = match protocol::parse_line(line) {
            Ok(None) => return,
            Ok(Some(cmd)) => cmd,
            Err(e) => return self.reply_err(key, e.code, &e.text),
        };
        match cmd {
            Command::Sub { event, email } => self.sub(key, event, &email),
            Command::Unsub { event, email } => self.unsub(key, event, &email),
            Command::Pub { event, text } => self.publish(key, event, text),
            Command::Auth { token } => self.auth(key, token),
            Command::List { email } => self.list(key, &email),
            Command::Ping { text } => {
                self.conns[key].reply(&self.fan, |out| protocol::pong(out, text));
                self.mark_dirty(key);
            }
            Command::Quit => {
                let c = &mut self.conns[key];
                c.reply(&self.fan, |out| protocol::ok(out, "QUIT", ""));
                c.state = State::Draining;
                c.inbuf = Vec::new();
                self.mark_dirty(key);
            }
        }
    }

    fn reply_err(&mut self, key: usize, code: Code, text: &str) {
        self.conns[key].reply(&self.fan, |out| protocol::err(out, code, text));
        self.mark_dirty(key);
    }

    fn sub(&mut self, key: usize, event: &str, email: &str) {
        let c = &self.conns[key];
        if !c.subs.contains(event, email) {
            if c.subs.len() >= self.cfg.max_subs_per_conn as usize {
                let text = format!("at most {} subscriptions per connection", self.cfg.max_subs_per_conn);
                return self.reply_err(key, Code::Limit, &text);
            }
            let ev = match self.index.get_key_value(event) {
                Some((k, _)) => Rc::clone(k),
                None => Rc::from(event),
            };
            let c = &mut self.conns[key];
            c.subs.insert(Rc::clone(&ev), email.into());
            self.index.entry(ev).or_default().insert(key);
        }
        let now = crate::ipc::unix_now();
        self.store_request(
            key,
            |req| ToStore::Subscribe { req, email: email.into(), event: event.into(), now },
            0,
        );
    }

    fn unsub(&mut self, key: usize, event: &str, email: &str) {
        let c = &mut self.conns[key];
        if c.subs.remove(event, email) && !c.subs.has_event(event) {
            self.unindex(key, event);
        }
        self.store_request(
            key,
            |req| ToStore::Unsubscribe { req, email: email.into(), event: event.into() },
            0,
        );
    }

    fn unindex(&mut self, key: usize, event: &str) {
        if let Some(set) = self.index.get_mut(event) {
            set.swap_remove(&key);
            if set.is_empty() {
                self.index.remove(event);
            }
        }
    }

    fn may_publish(&self, c: &Conn) -> bool {
        if self.cfg.publish_token.is_empty() {
            c.loopback
        } else {
            c.auth_gen == self.token_gen
        }
    }

    fn publish(&mut self, key: usize, event: &str, text: &str) {
        if !self.may_publish(&self.conns[key]) {
            return self.reply_err(key, Code::Auth, self.auth_text());
        }
        let id = self.take_id();
        // Formatted once into the turn's fan-out buffer; a subscriber with nothing else
        // to send this turn is written straight from there (see Conn::shared).
        let a = self.fan.len();
        protocol::msg(&mut self.fan, event, id, text);
        let b = self.fan.len();
        let shareable = b <= u32::MAX as usize;
        let offline =
            self.cfg.mail_policy == MailPolicy::Offline && self.cfg.mail_transport != Transport::None;
        let mut live: Vec<String> = Vec::new();
        let mut n = 0u64;
        if let Some(set) = self.index.get(event) {
            for &k in set {
                let c = &mut self.conns[k];
                if c.state == State::Closing {
                    continue;
                }
                if offline {
                    live.extend(c.subs.iter().filter(|(e, _)| &**e == event).map(|(_, m)| m.to_string()));
                }
                let (sa, sb) = c.shared;
                if shareable && c.out.is_empty() && (sa == sb || sb as usize == a) {
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
                    c.state = State::Closing;
                    self.closing.push(k);
                } else if !c.dirty {
                    c.dirty = true;
                    self.dirty.push(k);
                }
            }
        }
        let mail = match (self.cfg.mail_transport, self.cfg.mail_policy) {
            (Transport::None, _) | (_, MailPolicy::None) => MailPlan::Nobody,
            (_, MailPolicy::All) => MailPlan::All,
            (_, MailPolicy::Offline) => {
                live.sort_unstable();
                live.dedup();
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
        };
        let now = crate::ipc::unix_now();
        self.store_request(
            key,
            |req| ToStore::Publish { req, id, event: event.into(), text: text.into(), now, mail },
            n,
        );
    }

    fn auth_text(&self) -> &'static str {
        if self.cfg.publish_token.is_empty() {
            "only loopback clients may publish or list"
        } else {
            "send AUTH with the publish token first"
        }
    }

    fn auth(&mut self, key: usize, token: &str) {
        let good = !self.cfg.publish_token.is_empty() && constant_time_eq(token, &self.cfg.publish_token);
        let c = &mut self.conns[key];
        if good {
            c.auth_gen = self.token_gen;
            c.auth_failures = 0;
            c.reply(&self.fan, |out| protocol::ok(out, "AUTH", ""));
        } else {
            c.auth_failures += 1;
            if c.auth_failures >= MAX_AUTH_FAILURES {
                log::warn!("{}: {MAX_AUTH_FAILURES} failed AUTH attempts; closing", c.peer);
                c.reply(&self.fan, |out| protocol::err(out, Code::Auth, "too many failed attempts; closing"));
                c.state = State::Draining;
                c.inbuf = Vec::new();
            } else {
                c.reply(&self.fan, |out| protocol::err(out, Code::Auth, "wrong token"));
            }
        }
        self.mark_dirty(key);
    }

    fn list(&mut self, key: usize, email: &str) {
        if !self.may_publish(&self.conns[key]) {
            return self.reply_err(key, Code::Auth, self.auth_text());
        }
        self.store_request(key, |req| ToStore::List { req, email: email.into() }, 0);
    }

    // ---- writing and closing --------------------------------------------------------

    fn flush_conns(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for key in dirty {
            let Some(c) = self.conns.get_mut(key) else { continue };
            c.dirty = false;
            if c.state == State::Closing {
                continue;
            }
            if let Err(e) = c.flush(&self.fan) {
                log::debug!("{}: write: {e}", c.peer);
                c.state = State::Closing;
                self.closing.push(key);
                continue;
            }
            // Only QUIT or EOF make a connection finish here: one the server is stopping
            // is closed by stop_step, after its `-ERR BUSY shutting down`.
            if c.finished() {
                c.state = State::Closing;
                self.closing.push(key);
            } else if c.paused && c.out.len() < self.cfg.max_pending / 2 {
                // Paused for its output budget (or something that resume re-checks).
                self.resume.push(key);
            }
        }
        self.dirty.clear();
        // Every connection that shared the buffer was dirty, so it is written or closed.
        self.fan.clear();
        if self.fan.capacity() > FAN_KEEP {
            self.fan = Vec::with_capacity(64 * 1024);
        }
    }

    fn close(&mut self, key: usize) {
        if let Some(c) = self.conns.get_mut(key) {
            if c.state != State::Closing {
                c.state = State::Closing;
                self.closing.push(key);
            }
        }
    }

    /// Frees connections marked closing: never in the middle of a dispatch.
    fn reap_conns(&mut self) {
        let closing = std::mem::take(&mut self.closing);
        for key in closing {
            if !self.conns.contains(key) {
                continue;
            }
            let mut c = self.conns.remove(key);
            let _ = self.poll.registry().deregister(&mut c.sock);
            let events: HashSet<Rc<str>> = c.subs.iter().map(|(e, _)| Rc::clone(e)).collect();
            for e in events {
                self.unindex(key, &e);
            }
            let k = ip_key(c.peer.ip());
            if let Some(n) = self.per_ip.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.per_ip.remove(&k);
                }
            }
            log::debug!("{}: closed", c.peer);
        }
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
