//! The reactor: the parent process. One thread, one `mio::Poll`, and it never blocks.
//!
//! It owns the listening socket, every client connection, the index event → connections,
//! and the pipes to the store and the mailers (a star: every record passes through here).
//! It assigns notification ids from blocks the store reserved durably and fans `MSG` lines
//! out at once; `+OK` replies wait for the store's commit. No SQLite, no SMTP, no DNS, no
//! sleep here: anything slow lives in a child.

mod children;
mod conn;
mod subs;

use crate::config::{Config, MailPolicy};
use crate::ipc::{
    self, FromMailer, FromStore, MailJob, MailOutcome, MailPlan, MailResult, MailSettings, StoreSettings,
    ToMailer, ToStore, Transport,
};
use crate::protocol::{self, Code, Command, Framed};
use children::Child;
use conn::{Conn, State};
use indexmap::IndexSet;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
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
/// Ids per block reserved by the store; a new block is asked for at half.
const ID_BLOCK: u64 = 10_000;
/// Past these, the reactor stops taking commands that need the store.
const STORE_BACKLOG_MAX: usize = 8 << 20;
const STORE_PENDING_MAX: usize = 500_000;
/// Emails a mailer holds at once.
const MAILER_CAPACITY: usize = 256;
/// Failed AUTH attempts before the connection is closed.
const MAX_AUTH_FAILURES: u8 = 3;
/// How long a stopping server gives slow clients to take their last bytes.
const SHUTDOWN_LINGER: Duration = Duration::from_secs(2);

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
    msgbuf: Vec<u8>,
    scratch: Vec<u8>,
    stopping: Option<Instant>,
    store_settings: StoreSettings,
}

/// Which mailer holds which email, and when to ask the store for more.
struct MailRouter {
    settings: MailSettings,
    /// Per mailer: the jobs it holds, for replay after its restart, with the number of
    /// that mailer's deaths each was held for.
    held: Vec<HashMap<MailKey, (MailJob, u8)>>,
    /// A TakeMail is in flight.
    asking: bool,
    /// Something may be due: ask when there is room.
    wanted: bool,
    /// The next pending email falls due then.
    next_due: Option<Instant>,
}

/// An email's identity: notification id and address.
type MailKey = (u64, Box<str>);

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

/// Store settings from the configuration.
pub fn store_settings(cfg: &Config) -> StoreSettings {
    StoreSettings {
        sync_full: cfg.sync == crate::config::SyncMode::Full,
        keep_days: cfg.keep_days,
        mail_retry_base: cfg.mail_retry_base,
        mail_max_tries: cfg.mail_max_tries,
        // Shorter than store_timeout, so a locked database is answered with an error
        // before the client gives up on us.
        busy_timeout_ms: (cfg.store_timeout * 1000 / 2).max(100),
    }
}

/// Mail settings from the configuration, with the secret files read now.
pub fn mail_settings(cfg: &Config) -> Result<MailSettings, String> {
    let smtp_password = match &cfg.smtp_password_file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| format!("smtp_password_file {}: {e}", p.display()))?
            .trim_end_matches(['\r', '\n'])
            .to_string(),
        None => String::new(),
    };
    let smtp_ca_pem = match &cfg.smtp_ca_file {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("smtp_ca_file {}: {e}", p.display()))?),
        None => None,
    };
    Ok(MailSettings {
        transport: cfg.mail_transport,
        from: cfg.mail_from.clone(),
        smtp_host: cfg.smtp_host.clone(),
        smtp_port: cfg.smtp_port,
        smtp_tls: cfg.smtp_tls,
        smtp_user: cfg.smtp_user.clone(),
        smtp_password,
        smtp_ca_pem,
        sendmail_path: cfg.sendmail_path.display().to_string(),
        spool_dir: cfg.spool_dir.display().to_string(),
    })
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
        let store_settings = store_settings(&cfg);
        let mut r = Reactor {
            poll,
            listener: Some(listener),
            accept_paused_until: None,
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
            msgbuf: Vec::with_capacity(8192),
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
                Ok((sock, peer)) => self.admit(sock, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    // The pending connection stays in the backlog; try again shortly
                    // rather than spin on a readable listener we cannot serve.
                    log::warn!("accept: out of file descriptors; pausing accept for 100 ms");
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
                    c.reply(|out| protocol::err(out, Code::TooLong, &text));
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
                self.conns[key].reply(|out| protocol::pong(out, text));
                self.mark_dirty(key);
            }
            Command::Quit => {
                let c = &mut self.conns[key];
                c.reply(|out| protocol::ok(out, "QUIT", ""));
                c.state = State::Draining;
                c.inbuf = Vec::new();
                self.mark_dirty(key);
            }
        }
    }

    fn reply_err(&mut self, key: usize, code: Code, text: &str) {
        self.conns[key].reply(|out| protocol::err(out, code, text));
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
        let now = crate::store::unix_now();
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
        self.msgbuf.clear();
        protocol::msg(&mut self.msgbuf, event, id, text);
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
                c.out.extend_from_slice(&self.msgbuf);
                n += 1;
                if c.out.len() > self.cfg.max_pending {
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
            (_, MailPolicy::Offline) if live.is_empty() => MailPlan::All,
            (_, MailPolicy::Offline) => MailPlan::AllExcept(live),
        };
        let now = crate::store::unix_now();
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
            c.reply(|out| protocol::ok(out, "AUTH", ""));
        } else {
            c.auth_failures += 1;
            if c.auth_failures >= MAX_AUTH_FAILURES {
                log::warn!("{}: {MAX_AUTH_FAILURES} failed AUTH attempts; closing", c.peer);
                c.reply(|out| protocol::err(out, Code::Auth, "too many failed attempts; closing"));
                c.state = State::Draining;
                c.inbuf = Vec::new();
            } else {
                c.reply(|out| protocol::err(out, Code::Auth, "wrong token"));
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

    // ---- the store ----------------------------------------------------------------------

    /// Sends a client's request to the store and holds a reply slot for it.
    fn store_request(&mut self, key: usize, make: impl FnOnce(u64) -> ToStore, n: u64) {
        let c = &mut self.conns[key];
        let seq = c.push_waiting();
        let target = Target::Reply { key, conn_id: c.id, seq, n, listed: 0 };
        let req = self.next_req;
        self.send_store(make(req), target);
    }

    fn send_store(&mut self, record: ToStore, target: Target) {
        let req = self.next_req;
        self.next_req += 1;
        self.children[0].send(&record);
        if matches!(target, Target::Reply { .. }) {
            let deadline = Instant::now() + Duration::from_secs(self.cfg.store_timeout.into());
            self.deadlines.push_back((deadline, req));
        }
        self.pending.insert(req, Request { record, target, deaths: 0 });
    }

    fn has_ids(&self) -> bool {
        !self.ids.is_empty() || self.spare_ids.is_some()
    }

    fn take_id(&mut self) -> u64 {
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

    fn ask_ids(&mut self) {
        if !self.ids_requested {
            self.ids_requested = true;
            let req = self.next_req;
            self.send_store(ToStore::ReserveIds { req, count: ID_BLOCK }, Target::Ids);
        }
    }

    fn child_readable(&mut self, i: usize) {
        let mut more = false;
        let eof = match self.children[i].read(&mut more) {
            Ok(eof) => eof,
            Err(e) => return self.child_lost(i, &format!("read: {e}")),
        };
        loop {
            let res = if i == 0 {
                self.children[0].next_frame::<FromStore>().map(|m| m.map(|m| self.dispatch_store(m)))
            } else {
                self.children[i].next_frame::<FromMailer>().map(|m| m.map(|m| self.dispatch_mailer(i, m)))
            };
            match res {
                Ok(Some(Ok(()))) => {}
                Ok(Some(Err(why))) => return self.child_lost(i, &why),
                Ok(None) => break,
                Err(e) => return self.child_lost(i, &format!("broken record: {e}")),
            }
        }
        if eof {
            self.child_lost(i, "pipe closed");
        } else if more {
            // Come back next turn: edge-triggered, and the budget stopped us early.
            self.resume_child.push(i);
        }
    }

    fn dispatch_store(&mut self, m: FromStore) -> Result<(), String> {
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

    fn hello(&mut self, i: usize, version: u32) -> Result<(), String> {
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

    fn got_ids(&mut self, ids: Range<u64>) {
        self.ids_requested = false;
        if self.ids.is_empty() {
            self.ids = ids;
        } else {
            self.spare_ids = Some(ids);
        }
    }

    /// The connection slot a store request answers, if the connection is still there.
    fn reply_slot(&self, target: &Target) -> Option<(usize, u64)> {
        match *target {
            Target::Reply { key, conn_id, seq, .. } => match self.conns.get(key) {
                Some(c) if c.id == conn_id && c.state != State::Closing => Some((key, seq)),
                _ => None,
            },
            _ => None,
        }
    }

    fn store_done(&mut self, req: u64) {
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

    fn store_failed(&mut self, req: u64, reason: &str) {
        let Some(r) = self.pending.remove(&req) else { return };
        log::warn!("store: request failed: {reason}");
        match r.target {
            Target::Reply { .. } => {
                if let Some((key, seq)) = self.reply_slot(&r.target) {
                    self.fill_slot(key, seq, |out| {
                        protocol::err(
                            out,
                            Code::Unavailable,
                            "the database reported an error; it may or may not have taken effect",
                        )
                    });
                }
            }
            Target::Orphan => {}
            // Not a client's: try again in a second.
            target => self.deferred.push((Instant::now() + Duration::from_secs(1), r.record, target)),
        }
    }

    fn run_deferred(&mut self, now: Instant) {
        if self.deferred.iter().any(|d| d.0 <= now) {
            let all = std::mem::take(&mut self.deferred);
            for (at, record, target) in all {
                if at <= now {
                    let record = with_req(record, self.next_req);
                    self.send_store(record, target);
                } else {
                    self.deferred.push((at, record, target));
                }
            }
        }
    }

    fn list_chunk(&mut self, req: u64, rows: Vec<(String, i64)>, last: bool) {
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
    fn fill_slot(&mut self, key: usize, seq: u64, write: impl FnOnce(&mut Vec<u8>)) {
        let c = &mut self.conns[key];
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
    fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, req)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            let Some(r) = self.pending.get_mut(&req) else { continue };
            let target = std::mem::replace(&mut r.target, Target::Orphan);
            if let Some((key, seq)) = self.reply_slot(&target) {
                self.fill_slot(key, seq, |out| {
                    protocol::err(
                        out,
                        Code::Unavailable,
                        "the database did not confirm in time; it may or may not have taken effect",
                    )
                });
            }
        }
    }

    // ---- children ---------------------------------------------------------------------

    fn start_child(&mut self, i: usize) -> io::Result<()> {
        let spawned = if i == 0 {
            let db = self.cfg.database.clone();
            let settings = self.store_settings.clone();
            crate::child::spawn("notifd-store", "store", move |input, output| {
                crate::store::run(&db, settings, input, output)
            })?
        } else {
            crate::child::spawn("notifd-mailer", "mailer", crate::mailer::run)?
        };
        let pid = spawned.pid;
        self.children[i].attach(spawned, self.poll.registry())?;
        log::info!("{} started (pid {pid})", self.children[i].name);
        if i == 0 {
            self.children[0].send(&ToStore::Hello { version: ipc::VERSION });
            self.replay_store();
        } else {
            let child = &mut self.children[i];
            child.send(&ToMailer::Hello { version: ipc::VERSION });
            child.send(&ToMailer::Configure(self.mail.settings.clone()));
            let jobs: Vec<MailJob> = self.mail.held[i - 1].values().map(|(j, _)| j.clone()).collect();
            if !jobs.is_empty() {
                child.send(&ToMailer::Send { jobs });
            }
        }
        Ok(())
    }

    /// After a store restart: everything in flight goes again, in its original order;
    /// a request that was in flight for two deaths is answered with an error instead.
    fn replay_store(&mut self) {
        let reqs: Vec<u64> = self.pending.keys().copied().collect();
        for req in reqs {
            let r = &self.pending[&req];
            if r.deaths >= 2 {
                let r = self.pending.remove(&req).expect("listed");
                log::warn!("store: a request was in flight for two store deaths; answering an error");
                if let Some((key, seq)) = self.reply_slot(&r.target) {
                    self.fill_slot(key, seq, |out| {
                        protocol::err(out, Code::Unavailable, "the store failed twice on this command")
                    });
                }
                if matches!(r.target, Target::Ids) {
                    self.ids_requested = false;
                    self.ask_ids();
                }
                if matches!(r.target, Target::TakeMail) {
                    self.mail.asking = false;
                }
                continue;
            }
            self.children[0].send(&r.record);
        }
    }

    fn child_lost(&mut self, i: usize, why: &str) {
        if !self.children[i].up() {
            return;
        }
        if self.stopping.is_none() {
            log::error!("{} lost: {why}", self.children[i].name);
        }
        self.children[i].lost(self.poll.registry(), Instant::now());
        self.reap();
        if i == 0 {
            for r in self.pending.values_mut() {
                r.deaths += 1;
            }
        } else {
            self.mailer_lost(i);
        }
    }

    fn restart_children(&mut self, now: Instant) {
        if self.stopping.is_some() {
            return;
        }
        for i in 0..self.children.len() {
            if self.children[i].restart_at.is_some_and(|t| t <= now) {
                if let Err(e) = self.start_child(i) {
                    log::error!("{}: cannot fork: {e}", self.children[i].name);
                    self.children[i].restart_at = Some(now + Duration::from_secs(1));
                } else {
                    log::info!("{} restarted", self.children[i].name);
                }
            }
        }
    }

    /// Collects exited children, so none is left a zombie.
    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    if let Some(i) = self.children.iter().position(|c| c.pid == Some(pid)) {
                        let how = match status {
                            WaitStatus::Exited(_, code) => format!("exited with status {code}"),
                            WaitStatus::Signaled(_, sig, _) => format!("killed by {sig}"),
                            other => format!("{other:?}"),
                        };
                        if self.stopping.is_none() {
                            log::warn!("{} (pid {pid}) {how}", self.children[i].name);
                        }
                        self.children[i].pid = None;
                        if self.children[i].up() {
                            // Noticed before its pipe said so.
                            self.child_lost(i, &how);
                        }
                    }
                }
            }
        }
    }

    fn flush_children(&mut self) {
        for i in 0..self.children.len() {
            if let Err(e) = self.children[i].flush() {
                self.child_lost(i, &format!("write: {e}"));
            }
        }
    }

    // ---- mail -------------------------------------------------------------------------

    fn mailer_room(&self) -> usize {
        (1..self.children.len())
            .filter(|&i| self.children[i].up())
            .map(|i| MAILER_CAPACITY.saturating_sub(self.mail.held[i - 1].len()))
            .sum()
    }

    /// Asks the store for due emails when a mailer has room and something may be due.
    fn pump_mail(&mut self, now: Instant) {
        if self.children.len() < 2 || self.mail.asking || self.stopping.is_some() {
            return;
        }
        if self.mail.next_due.is_some_and(|t| t <= now) {
            self.mail.next_due = None;
            self.mail.wanted = true;
        }
        let room = self.mailer_room();
        if !self.mail.wanted || room == 0 || !self.children[0].up() {
            return;
        }
        self.mail.wanted = false;
        self.mail.asking = true;
        let req = self.next_req;
        let now_unix = crate::store::unix_now();
        self.send_store(ToStore::TakeMail { req, max: room as u32, now: now_unix }, Target::TakeMail);
    }

    fn got_mail(&mut self, jobs: Vec<MailJob>, next_due: Option<i64>) {
        self.mail.asking = false;
        let full = !jobs.is_empty();
        self.mail.next_due = next_due.map(|due| {
            let wait = (due - crate::store::unix_now()).clamp(0, 3600) as u64;
            Instant::now() + Duration::from_secs(wait)
        });
        // Hand each job to the mailer with the most room; skip one a mailer already holds
        // (the store released its lease after a store restart). The store has leased
        // these jobs: when every mailer died while the TakeMail was in flight, a dead one
        // holds them and gets them when it restarts, rather than nobody until the store's
        // next start.
        let mut batches: Vec<Vec<MailJob>> = vec![Vec::new(); self.children.len()];
        for job in jobs {
            let key = (job.id, Box::from(job.email.as_str()));
            if self.mail.held.iter().any(|h| h.contains_key(&key)) {
                continue;
            }
            let best = (1..self.children.len()).max_by_key(|&i| {
                (self.children[i].up(), MAILER_CAPACITY.saturating_sub(self.mail.held[i - 1].len()))
            });
            let Some(i) = best else { break };
            self.mail.held[i - 1].insert(key, (job.clone(), 0));
            batches[i].push(job);
        }
        for (i, jobs) in batches.into_iter().enumerate() {
            if !jobs.is_empty() {
                self.children[i].send(&ToMailer::Send { jobs });
            }
        }
        if full {
            self.mail.wanted = true;
        }
    }

    /// An email held by a mailer that died twice is reported as a failed try instead
    /// of being handed out a third time: the outbox retries it later, with a limit.
    fn mailer_lost(&mut self, i: usize) {
        let mut poisoned = Vec::new();
        self.mail.held[i - 1].retain(|_, (job, deaths)| {
            *deaths += 1;
            if *deaths >= 2 {
                poisoned.push(MailResult {
                    id: job.id,
                    email: job.email.clone(),
                    outcome: MailOutcome::Retry("the mailer died twice sending this email".into()),
                });
                false
            } else {
                true
            }
        });
        if !poisoned.is_empty() {
            log::warn!(
                "{}: {} emails were held through two deaths; reported as failed tries",
                self.children[i].name,
                poisoned.len()
            );
            let req = self.next_req;
            let now = crate::store::unix_now();
            self.send_store(ToStore::MailDone { req, results: poisoned, now }, Target::MailDone);
        }
    }

    fn dispatch_mailer(&mut self, i: usize, m: FromMailer) -> Result<(), String> {
        match m {
            FromMailer::Hello { version } => self.hello(i, version),
            FromMailer::Results { results } => {
                for r in &results {
                    self.mail.held[i - 1].remove(&(r.id, Box::from(r.email.as_str())));
                }
                let req = self.next_req;
                let now = crate::store::unix_now();
                self.send_store(ToStore::MailDone { req, results, now }, Target::MailDone);
                self.mail.wanted = true;
                Ok(())
            }
        }
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
            if let Err(e) = c.flush() {
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

    // ---- signals ------------------------------------------------------------------------

    fn drain_signal_pipe(&mut self) {
        let mut buf = [0u8; 64];
        while let Ok(n) = self.signal_rx.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    }

    fn reload(&mut self) {
        // For logrotate: the file is reopened whether or not the configuration loads.
        if let Err(e) = crate::logger::reopen() {
            log::error!("reload: cannot reopen the log: {e}");
        }
        let Some(file) = self.cfg.file.clone() else {
            log::info!("reload: no configuration file; nothing to reread");
            return;
        };
        let new = match Config::load(&file, false) {
            Ok(c) => c,
            Err(e) => {
                log::error!("reload refused, keeping the running configuration: {e}");
                return;
            }
        };
        let mail = match mail_settings(&new) {
            Ok(m) => m,
            Err(e) => {
                log::error!("reload refused, keeping the running configuration: {e}");
                return;
            }
        };
        let old = std::mem::replace(&mut self.cfg, new);
        let changed = changed_keys(&old, &self.cfg);
        for key in ["host", "port", "database", "user", "pid_file", "mail_workers"] {
            if changed.contains(&key) {
                log::warn!("reload: \"{key}\" changed; it takes effect at the next restart");
            }
        }
        // Keys that only a restart applies keep their running values.
        self.cfg.host = old.host.clone();
        self.cfg.port = old.port;
        self.cfg.database = old.database.clone();
        self.cfg.user = old.user.clone();
        self.cfg.pid_file = old.pid_file.clone();
        self.cfg.mail_workers = old.mail_workers;
        if (old.mail_transport == Transport::None) != (self.cfg.mail_transport == Transport::None) {
            log::warn!("reload: turning mail_transport on or off takes effect at the next restart");
            self.cfg.mail_transport = old.mail_transport;
        }
        if self.cfg.publish_token != old.publish_token {
            // Connections that authenticated with the old token must AUTH again.
            self.token_gen += 1;
        }
        let target = crate::daemon::log_target(&self.cfg);
        if let Err(e) = crate::logger::configure(&target, self.cfg.log_level) {
            log::error!("reload: cannot open the log: {e}");
        }
        let logging = crate::logger::settings(&target, self.cfg.log_level);
        self.store_settings = store_settings(&self.cfg);
        self.children[0].send(&ToStore::Configure(self.store_settings.clone()));
        self.children[0].send(&ToStore::Logging(logging.clone()));
        self.mail.settings = mail;
        for i in 1..self.children.len() {
            self.children[i].send(&ToMailer::Configure(self.mail.settings.clone()));
            self.children[i].send(&ToMailer::Logging(logging.clone()));
        }
        if changed.is_empty() {
            log::info!("configuration reloaded: nothing changed");
        } else {
            log::info!("configuration reloaded: changed {}", changed.join(", "));
        }
    }

    // ---- stopping -----------------------------------------------------------------------

    fn begin_stop(&mut self) {
        log::info!("stopping: finishing commands in flight");
        self.stopping = Some(Instant::now());
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        // Stop reading commands; what was read is finished and answered.
        for (key, c) in self.conns.iter_mut() {
            if c.state == State::Open {
                c.state = State::Stopping;
                c.inbuf = Vec::new();
                if !c.dirty {
                    c.dirty = true;
                    self.dirty.push(key);
                }
            }
        }
        // Mailers first: what they did not report is sent again after the restart.
        for i in 1..self.children.len() {
            self.children[i].close_input(self.poll.registry());
        }
    }

    /// One step of the stop; returns the exit status once done.
    fn stop_step(&mut self, since: Instant) -> Option<i32> {
        let waiting = self.conns.iter().any(|(_, c)| !c.slots.is_empty());
        let store_busy =
            self.pending.values().any(|r| matches!(r.target, Target::MailDone | Target::Reply { .. }));
        let limit = Duration::from_secs(self.cfg.store_timeout.into()) + Duration::from_millis(500);
        if (waiting || store_busy) && since.elapsed() < limit && self.children[0].up() {
            return None;
        }
        // Every reply is out (or the wait is over): say goodbye.
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for &key in &keys {
            let c = &mut self.conns[key];
            for slot in c.slots.iter_mut().filter(|s| !s.done) {
                slot.data.clear();
                protocol::err(
                    &mut slot.data,
                    Code::Unavailable,
                    "the server stopped before the database confirmed",
                );
                slot.done = true;
            }
            c.drain_slots();
            if c.state == State::Stopping {
                protocol::err(&mut c.out, Code::Busy, "shutting down");
            }
            let _ = c.flush();
        }
        let linger_until = Instant::now() + SHUTDOWN_LINGER;
        while Instant::now() < linger_until && self.conns.iter().any(|(_, c)| !c.out.is_empty()) {
            // Bounded: slow clients get SHUTDOWN_LINGER to take their last bytes.
            let mut events = Events::with_capacity(256);
            let _ = self.poll.poll(&mut events, Some(Duration::from_millis(20)));
            for (_, c) in self.conns.iter_mut() {
                if !c.out.is_empty() {
                    let _ = c.flush();
                }
            }
        }
        for key in keys {
            let mut c = self.conns.remove(key);
            let _ = c.sock.shutdown(std::net::Shutdown::Both);
            let _ = self.poll.registry().deregister(&mut c.sock);
        }
        self.children[0].close_input(self.poll.registry());
        self.wait_children();
        log::info!("stopped");
        Some(0)
    }

    /// Waits (bounded) for every child to exit, then kills what is left.
    fn wait_children(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.reap();
            let alive: Vec<nix::unistd::Pid> = self.children.iter().filter_map(|c| c.pid).collect();
            if alive.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                for pid in alive {
                    log::warn!("child {pid} did not exit; killing it");
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = waitpid(pid, None);
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Sets a replayed record's request id.
fn with_req(mut record: ToStore, new: u64) -> ToStore {
    match &mut record {
        ToStore::Subscribe { req, .. }
        | ToStore::Unsubscribe { req, .. }
        | ToStore::Publish { req, .. }
        | ToStore::List { req, .. }
        | ToStore::ReserveIds { req, .. }
        | ToStore::TakeMail { req, .. }
        | ToStore::MailDone { req, .. } => *req = new,
        ToStore::Hello { .. } | ToStore::Configure(_) | ToStore::Logging(_) => {}
    }
    record
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The names of the keys whose values differ.
fn changed_keys(a: &Config, b: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    macro_rules! cmp {
        ($($k:ident),*) => { $( if a.$k != b.$k { out.push(stringify!($k)); } )* };
    }
    cmp!(
        host,
        port,
        max_clients,
        max_clients_per_ip,
        max_line,
        max_pending,
        max_inflight,
        max_subs_per_conn,
        tcp_keepalive,
        publish_token,
        database,
        sync,
        keep_days,
        store_timeout,
        mail_transport,
        mail_policy,
        mail_from,
        smtp_host,
        smtp_port,
        smtp_tls,
        smtp_user,
        smtp_password_file,
        smtp_ca_file,
        sendmail_path,
        spool_dir,
        mail_workers,
        mail_retry_base,
        mail_max_tries,
        user,
        pid_file,
        log,
        log_level
    );
    out
}
