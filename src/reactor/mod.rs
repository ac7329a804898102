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
mod client_io;
mod commands;
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
use client_io::IpKey;
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
}
