//! Connections and the event loop: one mio poll over every connection of a run, reading
//! until `WouldBlock`, parsing with the server's codec, and counting what arrives into
//! the flows of messages and the latency histogram.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol as SockProtocol, Socket, Type};

use crate::histogram::Histogram;
use crate::now_ns;
use crate::tls::Session;
use crate::wire::{hello, make_payload, parse, publish, read_payload, subscribe, Ev, Server};

/// One read's worth of bytes.
const SCRATCH: usize = 256 * 1024;
/// Connections being set up at once; more would overflow the server's accept backlog.
const SETUP_CONCURRENCY: usize = 256;
/// A message not delivered to every subscriber this long after it was sent is counted
/// as lost, and the window moves on.
pub const STALL: Duration = Duration::from_secs(5);
/// A subscriber's unparsed input never grows past this (a protocol error otherwise).
const MAX_RBUF: usize = 16 << 20;

/// What a connection is for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// Subscribed; counts deliveries for its flow.
    Sub,
    /// Publishes for its flow.
    Pub,
    /// Subscribed and silent (connection scenario).
    Idle,
    /// Pipelines durable SUB or PUB commands (notifd only).
    Writer,
}

/// One client connection and its buffers.
pub struct Conn {
    stream: TcpStream,
    role: Role,
    flow: usize,
    connected: bool,
    greeted: bool,
    /// Setup finished: subscribed (Sub, Idle) or greeted (Pub, Writer).
    pub ready: bool,
    pub closed: bool,
    rbuf: Vec<u8>,
    pub wbuf: Vec<u8>,
    woff: usize,
    /// Writer: send times of the commands awaiting their reply, oldest first.
    pub pending: VecDeque<u64>,
    pub sent: u64,
    /// `--tls`: the connection's TLS session.
    tls: Option<Box<Session>>,
}

/// One publisher's stream of messages to its subscribers, with an end-to-end window:
/// at most `window` messages are out before the oldest has reached every subscriber.
pub struct Flow {
    topic: String,
    pub publisher: usize,
    pub subs_live: u64,
    pub subs_start: u64,
    pub total: u64,
    pub sent: u64,
    /// Lowest sequence number not yet delivered to every live subscriber.
    oldest: u64,
    window: usize,
    counts: Vec<u64>,
    sent_at: Vec<u64>,
    pub delivered: u64,
    pub last_send: u64,
}

impl Flow {
    /// A flow to `subs` subscribers of `topic`, `total` messages at most, `window` of them
    /// out at once; its publisher is set once connected.
    pub fn new(topic: String, subs: u64, total: u64, window: usize) -> Flow {
        Flow {
            topic,
            publisher: 0,
            subs_live: subs,
            subs_start: subs,
            total,
            sent: 0,
            oldest: 0,
            window,
            counts: vec![0; window],
            sent_at: vec![0; window],
            delivered: 0,
            last_send: 0,
        }
    }
    pub fn can_send(&self) -> bool {
        self.sent < self.total && ((self.sent - self.oldest) as usize) < self.window
    }
    /// `now`: when the read that carried the message returned.
    fn deliver(&mut self, seq: u64, now: u64) {
        self.delivered += 1;
        if seq < self.oldest || seq >= self.sent {
            return; // late (already counted lost) or foreign
        }
        self.counts[(seq as usize) % self.window] += 1;
        self.advance(now);
    }
    pub fn advance(&mut self, now: u64) {
        while self.oldest < self.sent {
            let i = (self.oldest as usize) % self.window;
            let stalled = now.saturating_sub(self.sent_at[i]) > STALL.as_nanos() as u64;
            if self.counts[i] < self.subs_live && !stalled {
                break;
            }
            self.counts[i] = 0;
            self.oldest += 1;
        }
    }
    pub fn done(&self) -> bool {
        self.sent == self.total && self.oldest == self.sent
    }
}

/// The connections of one run, their flows, and what was measured.
pub struct Bench {
    server: Server,
    poll: Poll,
    pub conns: Vec<Conn>,
    pub flows: Vec<Flow>,
    pub hist: Histogram,
    scratch: Vec<u8>,
    pub errors: u64,
    pub dropped: u64,
    pub acked: u64,
    pub payload: Vec<u8>,
    payload_len: usize,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Bench {
    pub fn new(
        server: Server,
        payload_len: usize,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Result<Bench, String> {
        Ok(Bench {
            server,
            poll: Poll::new().map_err(|e| format!("poll: {e}"))?,
            conns: Vec::new(),
            flows: Vec::new(),
            hist: Histogram::new(),
            scratch: vec![0; SCRATCH],
            errors: 0,
            dropped: 0,
            acked: 0,
            payload: Vec::with_capacity(payload_len),
            payload_len,
            tls,
        })
    }

    /// Starts a non-blocking connect from `source` (a 127.0.0.x address, or any).
    fn open(
        &mut self,
        addr: SocketAddr,
        source: Option<IpAddr>,
        role: Role,
        flow: usize,
    ) -> Result<usize, String> {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(SockProtocol::TCP))
            .map_err(|e| format!("socket: {e}"))?;
        sock.set_nonblocking(true).map_err(|e| e.to_string())?;
        sock.set_nodelay(true).map_err(|e| e.to_string())?;
        if let Some(ip) = source {
            sock.bind(&SocketAddr::new(ip, 0).into()).map_err(|e| format!("bind {ip}: {e}"))?;
        }
        match sock.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(format!("connect {addr}: {e}")),
        }
        let mut stream = TcpStream::from_std(sock.into());
        let id = self.conns.len();
        self.poll
            .registry()
            .register(&mut stream, Token(id), Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| format!("register: {e}"))?;
        let mut wbuf = Vec::new();
        hello(self.server, &mut wbuf, id);
        if matches!(role, Role::Sub | Role::Idle) {
            let topic = self.flows.get(flow).map_or("bench.idle", |f| &f.topic);
            subscribe(self.server, &mut wbuf, topic, id);
        }
        let tls = match &self.tls {
            // NATS 2.9 says INFO in clear first; the others start with the handshake.
            Some(config) => Some(Box::new(Session::new(config, self.server != Server::Nats)?)),
            None => None,
        };
        self.conns.push(Conn {
            tls,
            stream,
            role,
            flow,
            connected: false,
            greeted: false,
            ready: false,
            closed: false,
            rbuf: Vec::new(),
            wbuf,
            woff: 0,
            pending: VecDeque::new(),
            sent: 0,
        });
        Ok(id)
    }

    pub fn poll_once(&mut self, events: &mut Events, timeout: Duration) -> Result<(), String> {
        match self.poll.poll(events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(format!("poll: {e}")),
        }
        for ev in events.iter() {
            let i = ev.token().0;
            if self.conns[i].closed {
                continue;
            }
            if !self.conns[i].connected {
                let c = &mut self.conns[i];
                if let Ok(Some(e)) | Err(e) = c.stream.take_error() {
                    self.close(i, &format!("connect: {e}"));
                    continue;
                }
                match c.stream.peer_addr() {
                    Ok(_) => {
                        c.connected = true;
                        if self.server == Server::Redis {
                            c.greeted = true;
                            if matches!(c.role, Role::Pub | Role::Writer) {
                                c.ready = true;
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => continue,
                    Err(e) => {
                        self.close(i, &format!("connect: {e}"));
                        continue;
                    }
                }
            }
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                self.read(i);
            }
            if ev.is_writable() && !self.conns[i].closed {
                self.flush(i);
            }
        }
        Ok(())
    }

    fn read(&mut self, i: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        loop {
            let c = &mut self.conns[i];
            let got = match c.tls.as_deref_mut() {
                Some(t) if t.on => t.read(&mut c.stream, &mut scratch),
                _ => c.stream.read(&mut scratch),
            };
            let n = match got {
                Ok(0) => {
                    self.close(i, "connection closed by the server");
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.close(i, &format!("read: {e}"));
                    break;
                }
            };
            let now = now_ns();
            let mut rbuf = std::mem::take(&mut self.conns[i].rbuf);
            let data: &[u8] = if rbuf.is_empty() {
                &scratch[..n]
            } else {
                rbuf.extend_from_slice(&scratch[..n]);
                &rbuf
            };
            let mut pos = 0;
            let mut failed = None;
            loop {
                match parse(self.server, &data[pos..]) {
                    Ok(Some((ev, used))) => {
                        pos += used;
                        self.handle(i, ev, now);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                self.close(i, &e);
                break;
            }
            let rest = data[pos..].to_vec();
            if rest.len() > MAX_RBUF {
                self.close(i, "reply too long");
                break;
            }
            if !rest.is_empty() {
                self.conns[i].rbuf = rest;
            } else if !rbuf.is_empty() {
                rbuf.clear();
                self.conns[i].rbuf = rbuf;
            }
            // A short read emptied the socket: the next arrival raises a new edge, so
            // the read that would only say WouldBlock can be saved (one syscall per
            // wake-up, which matters when the generator must outrun the server).
            // (Not through TLS: a short plaintext read says nothing of the socket.)
            if self.conns[i].closed || (self.conns[i].tls.is_none() && n < scratch.len()) {
                break;
            }
        }
        self.scratch = scratch;
        let c = &self.conns[i];
        let tls_out = c.tls.as_ref().is_some_and(|t| t.on && t.wants_write());
        if !c.closed && (c.woff < c.wbuf.len() || tls_out) {
            self.flush(i);
        }
    }

    fn handle(&mut self, i: usize, ev: Ev<'_>, now: u64) {
        let c = &mut self.conns[i];
        match ev {
            Ev::Greeting => {
                if let Some(t) = c.tls.as_deref_mut() {
                    // NATS: the handshake starts after INFO.
                    t.on = true;
                }
                c.greeted = true;
                if matches!(c.role, Role::Pub | Role::Writer) {
                    c.ready = true;
                }
            }
            Ev::Ack => match c.role {
                Role::Sub | Role::Idle => c.ready = true,
                Role::Pub => {}
                Role::Writer => {
                    if let Some(t) = c.pending.pop_front() {
                        self.hist.record_ns(now.saturating_sub(t));
                        self.acked += 1;
                    }
                }
            },
            Ev::Msg(p) => {
                if c.role == Role::Sub {
                    if let Some((ts, seq)) = read_payload(p) {
                        self.hist.record_ns(now.saturating_sub(ts));
                        let f = c.flow;
                        self.flows[f].deliver(seq, now);
                    }
                }
            }
            Ev::Ping => c.wbuf.extend_from_slice(b"PONG\r\n"),
            Ev::Err(text) => {
                self.errors += 1;
                if self.errors <= 5 {
                    let text = String::from_utf8_lossy(text);
                    let short: String = text.chars().take(160).collect();
                    eprintln!("notif-bench: connection {i}: {short}");
                }
                if c.role == Role::Writer {
                    c.pending.pop_front();
                }
                if !c.greeted || (matches!(c.role, Role::Sub | Role::Idle) && !c.ready) {
                    self.close(i, "refused");
                }
            }
            Ev::Other => {}
        }
    }

    pub fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if let Some(t) = c.tls.as_deref_mut() {
            if !t.on {
                return; // NATS before INFO: nothing may go out in clear
            }
            let sent =
                if c.wbuf.is_empty() { t.push(&mut c.stream) } else { t.write(&mut c.stream, &c.wbuf) };
            c.wbuf.clear();
            c.woff = 0;
            match sent {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => self.close(i, &format!("TLS write: {e}")),
            }
            return;
        }
        while c.woff < c.wbuf.len() {
            match c.stream.write(&c.wbuf[c.woff..]) {
                Ok(n) => c.woff += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => {
                    self.close(i, &format!("write: {e}"));
                    return;
                }
            }
        }
        c.wbuf.clear();
        c.woff = 0;
    }

    fn close(&mut self, i: usize, why: &str) {
        let c = &mut self.conns[i];
        if c.closed {
            return;
        }
        c.closed = true;
        let _ = self.poll.registry().deregister(&mut c.stream);
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
        c.rbuf = Vec::new();
        c.wbuf = Vec::new();
        self.dropped += 1;
        if self.dropped <= 5 {
            eprintln!("notif-bench: connection {i} ({:?}): {why}", c.role);
        }
        if c.role == Role::Sub {
            let f = &mut self.flows[c.flow];
            f.subs_live = f.subs_live.saturating_sub(1);
            f.advance(now_ns());
        }
    }

    /// Opens `plan` connections, at most SETUP_CONCURRENCY unfinished at once, and
    /// waits until each is ready or closed. Returns (ready, failed).
    pub fn setup(
        &mut self,
        addr: SocketAddr,
        plan: &[(Role, usize)],
        sources: &[IpAddr],
        deadline: Instant,
    ) -> Result<(usize, usize), String> {
        let mut events = Events::with_capacity(1024);
        let first = self.conns.len();
        let mut next = 0;
        loop {
            let unfinished = self.conns[first..].iter().filter(|c| !c.ready && !c.closed).count();
            let mut room = SETUP_CONCURRENCY.saturating_sub(unfinished);
            while room > 0 && next < plan.len() {
                let (role, flow) = plan[next];
                let src = (!sources.is_empty()).then(|| sources[next % sources.len()]);
                match self.open(addr, src, role, flow) {
                    Ok(_) => {}
                    Err(e) => {
                        // Out of ports or descriptors: stop opening, keep what we have.
                        eprintln!("notif-bench: {e}");
                        next = plan.len();
                        break;
                    }
                }
                next += 1;
                room -= 1;
            }
            let done = self.conns[first..].iter().all(|c| c.ready || c.closed);
            if next >= plan.len() && done {
                break;
            }
            if Instant::now() > deadline {
                return Err("timed out while connecting".into());
            }
            self.poll_once(&mut events, Duration::from_millis(50))?;
        }
        let ready = self.conns[first..].iter().filter(|c| c.ready && !c.closed).count();
        Ok((ready, plan.len() - ready))
    }

    /// Queues the next message of flow `f` on its publisher.
    pub fn send_one(&mut self, f: usize) {
        let flow = &mut self.flows[f];
        let seq = flow.sent;
        make_payload(&mut self.payload, seq, self.payload_len);
        let now = now_ns();
        let w = flow.window;
        flow.sent_at[(seq as usize) % w] = now;
        flow.sent += 1;
        flow.last_send = now;
        let c = &mut self.conns[flow.publisher];
        publish(self.server, &mut c.wbuf, &flow.topic, &self.payload);
    }
}
