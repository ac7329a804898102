//! Client sockets: accepting and admitting, reading and framing lines, writing and
//! flushing once per turn, closing and reaping at the end of the turn.

use super::conn::{Conn, State};
use super::limits::{addr_key, net_key, AddrKey, NetKey, Sweep};
use super::subs::{LiveAddrs, Subs};
use super::tls_conn::TLS_HANDSHAKE_RECORD;
use super::{Reactor, Source, FAN_KEEP};
use crate::protocol::{self, Code, Framed};
use indexmap::IndexSet;
use mio::net::{TcpListener, TcpStream};
use mio::Interest;
use slab::Slab;
use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Bytes read from one client per loop turn, so that one busy client cannot starve the rest.
const READ_BUDGET: usize = 256 * 1024;

/// The listening socket, and whether accepting is paused.
pub(super) struct Acceptor {
    /// `None` with `plain = false`, or once the daemon is stopping.
    pub(super) listener: Option<TcpListener>,
    /// Accepting paused until then (out of descriptors).
    pub(super) paused_until: Option<Instant>,
    /// The last accept failed for lack of descriptors (logged once per episode).
    out_of_fds: bool,
}

impl Acceptor {
    pub(super) fn new(listener: Option<TcpListener>) -> Acceptor {
        Acceptor { listener, paused_until: None, out_of_fds: false }
    }
}

/// The client table: every connection, the index event → connections, and the lists of
/// connections that something must happen to later in the turn.
pub(super) struct Clients {
    pub(super) conns: Slab<Conn>,
    /// The id of the next connection (see `Conn::id`); less one, the connections
    /// accepted so far.
    pub(super) next_id: u64,
    /// Connections per address (per /64 for IPv6), for `max_clients_per_ip`.
    per_ip: HashMap<AddrKey, u32>,
    /// Connections per network (IPv4 /24, IPv6 /48), for `max_clients_per_net`.
    per_net: HashMap<NetKey, u32>,
    /// Unsent bytes of all connections together (the sum of their `Conn::counted`), for
    /// `max_pending_total`; brought up to date as each connection is written.
    pub(super) pending_total: usize,
    /// No connection has a slab key this high: the sweep looks at keys below it.
    pub(super) key_limit: usize,
    /// The coarse clock, idle connections and failed-AUTH windows.
    pub(super) sweep: Sweep,
    /// The connections with a live subscription to each event.
    pub(super) index: HashMap<Rc<str>, IndexSet<usize>>,
    /// The live addresses of each event, while `mail_policy` is offline.
    pub(super) live: Option<LiveAddrs>,
    /// Connections to write at the end of the turn.
    pub(super) dirty: Vec<usize>,
    /// Connections to read again (budget ran out, or a pause was lifted).
    pub(super) resume: Vec<usize>,
    /// Connections paused until the store catches up or ids arrive.
    waiting_store: Vec<usize>,
    /// Connections to close at the end of the turn.
    pub(super) closing: Vec<usize>,
    /// Where a client's bytes are read to before they are taken as lines.
    scratch: Vec<u8>,
}

impl Clients {
    pub(super) fn new(max_clients: usize) -> Clients {
        Clients {
            // Reserved, not touched: the pages of unused entries never count in RSS, and
            // the slab never has to copy itself while it grows.
            conns: Slab::with_capacity(max_clients),
            next_id: 1,
            per_ip: HashMap::new(),
            per_net: HashMap::new(),
            pending_total: 0,
            key_limit: 0,
            sweep: Sweep::new(),
            index: HashMap::new(),
            live: None,
            dirty: Vec::new(),
            resume: Vec::new(),
            waiting_store: Vec::new(),
            closing: Vec::new(),
            scratch: vec![0; 64 * 1024],
        }
    }

    /// Puts the connection on the list to write at the end of the turn.
    pub(super) fn mark_dirty(&mut self, key: usize) {
        let c = &mut self.conns[key];
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(key);
        }
    }

    /// Marks the connection to be closed at the end of the turn.
    pub(super) fn close(&mut self, key: usize) {
        if let Some(c) = self.conns.get_mut(key) {
            if c.state != State::Closing {
                c.state = State::Closing;
                self.closing.push(key);
            }
        }
    }

    /// Takes a closing connection's pairs out of the indexes.
    pub(super) fn forget_pairs(&mut self, key: usize, subs: &Subs, trusted: bool) {
        if let Some(live) = &mut self.live {
            live.remove_all(subs, trusted);
        }
        let events: HashSet<&Rc<str>> = subs.iter().map(|(e, _)| e).collect();
        for e in events {
            self.unindex(key, e);
        }
    }

    /// The addresses live on `event`, for `mail_policy = "offline"`; the index is built
    /// here if a reload just turned that policy on. A connection closing this turn gets
    /// no more MSG, so its pairs are taken out first: it makes no address live.
    pub(super) fn live_addresses(&mut self, event: &str) -> Vec<String> {
        let closing = std::mem::take(&mut self.closing);
        for &key in &closing {
            let Some(c) = self.conns.get_mut(key) else { continue };
            if c.subs.len() > 0 {
                let subs = std::mem::take(&mut c.subs);
                let trusted = c.live_trusted;
                self.forget_pairs(key, &subs, trusted);
            }
        }
        self.closing = closing;
        let conns = &self.conns;
        let live = self
            .live
            .get_or_insert_with(|| LiveAddrs::of(conns.iter().map(|(_, c)| (&c.subs, c.live_trusted))));
        live.addresses(event).map(str::to_string).collect()
    }

    /// Brings the connection's share of `pending_total` up to date: O(1).
    pub(super) fn recount(&mut self, key: usize) {
        let c = &mut self.conns[key];
        let unsent = c.unsent();
        self.pending_total = self.pending_total - c.counted + unsent;
        c.counted = unsent;
    }

    /// Takes the connection out of the index of `event`.
    pub(super) fn unindex(&mut self, key: usize, event: &str) {
        if let Some(set) = self.index.get_mut(event) {
            set.swap_remove(&key);
            if set.is_empty() {
                self.index.remove(event);
            }
        }
    }
}

impl Reactor {
    /// Accepts until WouldBlock, from the plain listener or (`tls`) the TLS one; out of
    /// descriptors, pauses accepting for 100 ms.
    pub(super) fn accept(&mut self, tls: bool) {
        loop {
            let listener = if tls { self.tls.listener.as_ref() } else { self.acceptor.listener.as_ref() };
            let Some(listener) = listener else { return };
            match listener.accept() {
                Ok((sock, peer)) => {
                    self.acceptor.out_of_fds = false;
                    self.admit(sock, peer, tls)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    // The pending connection stays in the backlog; try again shortly
                    // rather than spin on a readable listener we cannot serve.
                    if !self.acceptor.out_of_fds {
                        // Once per episode: it repeats every 100 ms while it lasts.
                        log::warn!("accept: out of file descriptors; retrying every 100 ms");
                        self.acceptor.out_of_fds = true;
                    }
                    self.acceptor.paused_until = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
                Err(e) => {
                    log::warn!("accept: {e}");
                    return;
                }
            }
        }
    }

    /// Admits a new connection, or refuses it with `-ERR BUSY` when over a limit (in
    /// plain text, even on the TLS port: a refused client is not worth a handshake, and
    /// its TLS library reports the close).
    fn admit(&mut self, mut sock: TcpStream, peer: SocketAddr, tls: bool) {
        // A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; log them as a.b.c.d.
        let peer = match peer {
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), v6.port()),
                None => peer,
            },
            v4 => v4,
        };
        let key = addr_key(peer.ip());
        let net = net_key(peer.ip());
        let from_ip = self.clients.per_ip.get(&key).copied().unwrap_or(0);
        let from_net = self.clients.per_net.get(&net).copied().unwrap_or(0);
        let busy = if self.clients.conns.len() >= self.cfg.max_clients as usize {
            Some("too many connections")
        } else if from_ip >= self.cfg.max_clients_per_ip {
            Some("too many connections from your address")
        } else if from_net >= self.cfg.max_clients_per_net {
            Some("too many connections from your network")
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
        let entry = self.clients.conns.vacant_entry();
        let k = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            Source::Client(k).token(),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("{peer}: register: {e}");
            return;
        }
        let mut c = Conn::new(self.clients.next_id, sock, peer, self.clients.sweep.tick);
        self.clients.next_id += 1;
        // [tls] The greeting waits in `out` until the handshake is over.
        if tls && !self.tls.start(k, &mut c) {
            let _ = self.poll.registry().deregister(&mut c.sock);
            return;
        }
        protocol::greeting(&mut c.out, self.cfg.max_line);
        c.dirty = true;
        entry.insert(c);
        *self.clients.per_ip.entry(key).or_insert(0) += 1;
        *self.clients.per_net.entry(net).or_insert(0) += 1;
        self.clients.key_limit = self.clients.key_limit.max(k + 1);
        self.clients.dirty.push(k);
        log::debug!("{peer}: connected");
    }

    /// A readiness event on a client socket.
    pub(super) fn conn_event(&mut self, key: usize, readable: bool, writable: bool) {
        if !self.clients.conns.contains(key) {
            return;
        }
        if writable {
            self.clients.mark_dirty(key);
        }
        if readable {
            self.read_conn(key);
        }
    }

    /// Reads and handles commands until WouldBlock, a pause, or the turn's budget.
    fn read_conn(&mut self, key: usize) {
        let mut budget = READ_BUDGET;
        loop {
            let c = &mut self.clients.conns[key];
            if c.state != State::Open || c.paused || c.eof {
                return;
            }
            if budget == 0 {
                self.clients.resume.push(key);
                return;
            }
            let mut buf = std::mem::take(&mut self.clients.scratch);
            let got = match c.tls.as_deref_mut() {
                None => c.sock.read(&mut buf),
                // [tls] Plaintext out of ciphertext; handshake messages and the greeting
                // that waited for the handshake go out at the end of the turn.
                Some(t) => {
                    let got = t.read(&mut c.sock, &mut buf);
                    if t.wants_write() || (!t.handshaking() && !c.out.is_empty()) {
                        self.clients.mark_dirty(key);
                    }
                    got
                }
            };
            let c = &mut self.clients.conns[key];
            if let Ok(n) = got {
                // [tls] A TLS ClientHello on the plain port: no protocol answer can help
                // a TLS client, so just a close (its bytes read, so a FIN, not a reset).
                if n > 0 && buf[0] == TLS_HANDSHAKE_RECORD && c.tls.is_none() && c.inbuf.is_empty() {
                    log::debug!("{}: TLS handshake on the plain port; closing", c.peer);
                    self.clients.scratch = buf;
                    self.clients.close(key);
                    return;
                }
            }
            match got {
                Ok(0) => {
                    self.clients.scratch = buf;
                    self.conn_eof(key);
                    return;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    if self.clients.conns[key].inbuf.is_empty() {
                        let used = self.take_lines(key, &buf[..n]);
                        if let Some(c) = self.clients.conns.get_mut(key) {
                            if c.state == State::Open {
                                c.inbuf.extend_from_slice(&buf[used..n]);
                            }
                        }
                    } else {
                        self.clients.conns[key].inbuf.extend_from_slice(&buf[..n]);
                        self.process_inbuf(key);
                    }
                    self.clients.scratch = buf;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.clients.scratch = buf;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.clients.scratch = buf,
                Err(e) => {
                    self.clients.scratch = buf;
                    log::debug!("{}: read: {e}", self.clients.conns[key].peer);
                    self.clients.close(key);
                    return;
                }
            }
        }
    }

    /// Handles the complete lines held in the connection's input buffer.
    fn process_inbuf(&mut self, key: usize) {
        let inbuf = std::mem::take(&mut self.clients.conns[key].inbuf);
        let used = self.take_lines(key, &inbuf);
        if let Some(c) = self.clients.conns.get_mut(key) {
            if c.state == State::Open && used < inbuf.len() {
                let mut rest = inbuf;
                rest.drain(..used);
                c.inbuf = rest;
            }
        }
    }

    /// The peer closed its side: like QUIT, without the reply.
    fn conn_eof(&mut self, key: usize) {
        let c = &mut self.clients.conns[key];
        c.eof = true;
        if !c.inbuf.is_empty() && !c.discarding && !c.paused {
            // A last line without its LF is still a command.
            c.inbuf.push(b'\n');
            self.process_inbuf(key);
        }
        if let Some(c) = self.clients.conns.get_mut(key) {
            if c.state == State::Open && !c.paused {
                c.state = State::Draining;
                c.inbuf = Vec::new();
                self.clients.mark_dirty(key);
            }
        }
    }

    /// Whether the connection may take one more command now.
    fn can_take(&self, c: &Conn) -> bool {
        // A client that sends without reading its replies stops being read once its
        // output is over budget, rather than growing it without bound.
        c.slots.len() < self.cfg.max_inflight as usize
            && c.out.len() + (c.held as usize) < self.cfg.max_pending
            && !self.store.congested()
            && self.store.has_ids()
    }

    /// Takes and handles lines from `data`; returns the bytes used. Stops early when the
    /// connection must pause or stops reading.
    fn take_lines(&mut self, key: usize, data: &[u8]) -> usize {
        let max_line = self.cfg.max_line;
        let mut at = 0;
        loop {
            let Some(c) = self.clients.conns.get(key) else { return data.len() };
            if c.state != State::Open {
                return data.len();
            }
            if !self.can_take(c) {
                self.pause(key);
                return at;
            }
            let c = &mut self.clients.conns[key];
            let (item, used) = protocol::take_line(&data[at..], max_line, &mut c.discarding);
            if used == 0 {
                return at;
            }
            if item.is_some() {
                c.last_cmd = self.clients.sweep.tick;
            }
            match item {
                None => {}
                Some(Framed::TooLong) => {
                    let text = format!("line longer than {max_line} bytes");
                    c.reply(&self.fan, |out| protocol::err(out, Code::TooLong, &text));
                    self.clients.mark_dirty(key);
                }
                Some(Framed::Line(line)) => self.command(key, line),
            }
            at += used;
        }
    }

    /// Stops reading the connection until what it waits for is there.
    fn pause(&mut self, key: usize) {
        let global = self.store.congested() || !self.store.has_ids();
        let c = &mut self.clients.conns[key];
        if !c.paused {
            c.paused = true;
            if global {
                self.clients.waiting_store.push(key);
            }
            // Otherwise max_inflight: resumed when a reply goes out (fill_slot).
        }
    }

    /// Reads again the connections whose pause was lifted or whose budget ran out.
    pub(super) fn resume_conns(&mut self) {
        if !self.clients.waiting_store.is_empty() && !self.store.congested() && self.store.has_ids() {
            let w = std::mem::take(&mut self.clients.waiting_store);
            self.clients.resume.extend(w);
        }
        let list = std::mem::take(&mut self.clients.resume);
        for key in list {
            let Some(c) = self.clients.conns.get_mut(key) else { continue };
            if c.state != State::Open {
                continue;
            }
            c.paused = false;
            if !c.inbuf.is_empty() {
                self.process_inbuf(key);
            }
            let Some(c) = self.clients.conns.get(key) else { continue };
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

    /// Writes every connection that has something to send: once per turn.
    pub(super) fn flush_conns(&mut self) {
        let dirty = std::mem::take(&mut self.clients.dirty);
        for key in dirty {
            let Some(c) = self.clients.conns.get_mut(key) else { continue };
            c.dirty = false;
            if c.state == State::Closing {
                continue;
            }
            let written = c.flush(&self.fan);
            self.clients.recount(key);
            let c = &mut self.clients.conns[key];
            if let Err(e) = written {
                log::debug!("{}: write: {e}", c.peer);
                c.state = State::Closing;
                self.clients.closing.push(key);
                continue;
            }
            // Only QUIT or EOF make a connection finish here: one the server is stopping
            // is closed by stop_step, after its `-ERR BUSY shutting down`.
            if c.finished() {
                if c.tls.is_some() {
                    // [tls] close_notify before the FIN, when the socket takes it.
                    c.close_notify();
                    let _ = c.flush(&self.fan);
                }
                c.state = State::Closing;
                self.clients.closing.push(key);
            } else if c.paused && c.unsent() < self.cfg.max_pending / 2 {
                // Paused for its output budget (or something that resume re-checks).
                self.clients.resume.push(key);
            }
        }
        self.clients.dirty.clear();
        // After the writes: what the sockets took at once does not count.
        self.enforce_total();
        // Every connection that shared the buffer was dirty, so it is written or closed.
        self.fan.clear();
        if self.fan.capacity() > FAN_KEEP {
            self.fan = Vec::with_capacity(64 * 1024);
        }
    }

    /// Frees connections marked closing: never in the middle of a dispatch.
    pub(super) fn reap_conns(&mut self) {
        let closing = std::mem::take(&mut self.clients.closing);
        for key in closing {
            if !self.clients.conns.contains(key) {
                continue;
            }
            let mut c = self.clients.conns.remove(key);
            let _ = self.poll.registry().deregister(&mut c.sock);
            self.clients.forget_pairs(key, &c.subs, c.live_trusted);
            self.clients.pending_total -= c.counted;
            if c.lingering {
                self.clients.sweep.lingering -= 1;
            }
            uncount(&mut self.clients.per_ip, addr_key(c.peer.ip()));
            uncount(&mut self.clients.per_net, net_key(c.peer.ip()));
            log::debug!("{}: closed", c.peer);
        }
    }
}

/// One connection fewer under `key`; a key with none left is forgotten.
fn uncount<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, u32>, key: K) {
    if let Some(n) = counts.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&key);
        }
    }
}
