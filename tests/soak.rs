//! Soak: a few hundred clients doing every command, slow readers, garbage, over-long
//! lines, half-open connections and reconnect storms against the release daemon, while
//! its store and its mailer are SIGKILLed at random moments. Then: every acknowledged
//! subscription and publication is in the database, every email of an acknowledged
//! publication is in the outbox or the spool, no id was given twice, the reactor's RSS
//! is back near its start, and no child outlived the daemon.
//!
//! Ignored by `cargo test`: `make soak` runs it with the release build,
//! `cargo test --release --test soak -- --ignored --nocapture`. SOAK_SECONDS (default
//! 600) is how long the load lasts, SOAK_CLIENTS (default 200) how many command clients
//! run, SOAK_SEED the seed (printed, so a run can be repeated).
//!
//! Every client owns its addresses, so the history of each (email, event) pair is one
//! sequence of commands and what the database must hold follows from it. A command whose
//! outcome is unknown (UNAVAILABLE, a dropped connection) retires its address: later
//! commands use a fresh one.

mod util;

use socket2::{Domain, SockRef, Socket, Type};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use util::Daemon;

/// Events the command clients use (`soak.e0` ...); one stable pair each.
const EVENTS: u64 = 32;
/// The event of the large publications that slow readers fall behind on.
const FLOOD: &str = "soak.flood";
/// The one address slow readers subscribe with, so that a flood costs one email each.
const SLOW_EMAIL: &str = "slow@soak.test";
/// Longest wait for a reply: `store_timeout` (30 s) plus a store restart and its replay.
const REPLY_WAIT: Duration = Duration::from_secs(75);
/// The daemon's `max_line` (the default).
const MAX_LINE: usize = 4096;
/// The daemon's `max_pending`, small so that a slow reader is dropped within seconds.
const MAX_PENDING: usize = 256 << 10;
/// How far above its start the reactor's RSS may end.
const RSS_SLACK: u64 = 32 << 20;

/// xorshift64*: enough randomness for a load, and repeatable from the printed seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// One SUB or UNSUB of a pair: when it was sent, and when its `+OK` came (if it did).
#[derive(Clone, Copy)]
struct Op {
    sub: bool,
    sent: Instant,
    acked: Option<Instant>,
}

/// One PUB: its token (in its text), when it was sent, and its `+OK PUB` time and id.
struct PubLog {
    token: u64,
    event: String,
    sent: Instant,
    acked: Option<(Instant, u64)>,
}

/// What one client thread did and saw.
#[derive(Default)]
struct Outcome {
    tally: BTreeMap<&'static str, u64>,
    pairs: HashMap<(String, String), Vec<Op>>,
    pubs: Vec<PubLog>,
    /// `(id, token)` of every MSG received.
    msgs: Vec<(u64, u64)>,
    failures: Vec<String>,
}

impl Outcome {
    fn count(&mut self, what: &'static str) {
        *self.tally.entry(what).or_default() += 1;
    }

    fn fail(&mut self, what: String) {
        if self.failures.len() < 20 {
            self.failures.push(what);
        }
        self.count("failures");
    }

    fn merge(&mut self, other: Outcome) {
        for (k, v) in other.tally {
            *self.tally.entry(k).or_default() += v;
        }
        for (k, ops) in other.pairs {
            self.pairs.entry(k).or_default().extend(ops);
        }
        self.pubs.extend(other.pubs);
        self.msgs.extend(other.msgs);
        self.failures.extend(other.failures);
    }
}

/// What every thread shares.
struct Ctx<'a> {
    daemon: &'a Daemon,
    addr: SocketAddr,
    end: Instant,
    seed: u64,
    kills: AtomicU64,
}

impl Ctx<'_> {
    fn over(&self) -> bool {
        Instant::now() >= self.end
    }

    /// Sleeps `d`, or less when the load ends first.
    fn pause(&self, d: Duration) {
        let left = self.end.saturating_duration_since(Instant::now());
        std::thread::sleep(d.min(left));
    }
}

/// How a wait for a line ended.
enum Got {
    Line(String),
    /// The server closed (or reset) the connection.
    Closed,
    TimedOut,
}

/// A client connection that tolerates everything the server may do to it.
struct Conn {
    sock: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Connects (with a small receive buffer when `rcvbuf` is set) without reading.
    fn connect(addr: SocketAddr, rcvbuf: Option<usize>) -> io::Result<Conn> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        if let Some(n) = rcvbuf {
            s.set_recv_buffer_size(n)?;
        }
        s.connect_timeout(&addr.into(), Duration::from_secs(10))?;
        let sock: TcpStream = s.into();
        sock.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(Conn { sock, buf: Vec::new() })
    }

    /// Connects and reads the greeting; `None` (counted) when refused or busy.
    fn open(ctx: &Ctx, out: &mut Outcome, rcvbuf: Option<usize>) -> Option<Conn> {
        let mut c = match Conn::connect(ctx.addr, rcvbuf) {
            Ok(c) => c,
            Err(_) => {
                out.count("connect_errors");
                return None;
            }
        };
        out.count("connections");
        match c.line(Duration::from_secs(30), out) {
            Got::Line(l) if l.starts_with("HELLO notifd 1") => Some(c),
            Got::Line(l) if l.starts_with("-ERR BUSY ") => {
                out.count("busy_at_connect");
                None
            }
            Got::Line(l) => {
                out.fail(format!("unexpected greeting {l:?}"));
                None
            }
            Got::Closed | Got::TimedOut => {
                out.count("no_greeting");
                None
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> bool {
        self.sock.write_all(bytes).is_ok()
    }

    /// The next line, CRLF removed.
    fn line(&mut self, wait: Duration, out: &mut Outcome) -> Got {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.buf.drain(..=i).collect();
                if !raw.ends_with(b"\r\n") {
                    out.fail(format!("server line without CRLF: {:?}", String::from_utf8_lossy(&raw)));
                }
                let body = raw.strip_suffix(b"\r\n").unwrap_or(&raw[..raw.len() - 1]);
                return match String::from_utf8(body.to_vec()) {
                    Ok(s) => Got::Line(s),
                    Err(_) => {
                        out.fail(format!("server line not UTF-8: {:?}", String::from_utf8_lossy(body)));
                        Got::Line(String::new())
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Got::TimedOut;
            }
            let _ = self.sock.set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))));
            let mut chunk = [0u8; 16384];
            match self.sock.read(&mut chunk) {
                Ok(0) => return Got::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Got::Closed,
            }
        }
    }

    /// The next line that is not a MSG; MSGs on the way are recorded.
    fn reply(&mut self, out: &mut Outcome) -> Got {
        loop {
            match self.line(REPLY_WAIT, out) {
                Got::Line(l) if l.starts_with("MSG ") => record_msg(&l, out),
                other => return other,
            }
        }
    }

    /// Reads (MSGs recorded) until the server closes, for at most `wait`; whether it did.
    fn until_closed(&mut self, wait: Duration, out: &mut Outcome) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            match self.line(deadline.saturating_duration_since(Instant::now()), out) {
                Got::Line(l) if l.starts_with("MSG ") => record_msg(&l, out),
                Got::Line(l) if l.starts_with("-ERR BUSY ") => out.count("busy_before_close"),
                Got::Line(l) => out.fail(format!("unexpected line before close: {l:?}")),
                Got::Closed => return true,
                Got::TimedOut => return false,
            }
        }
    }

    /// Closes with a RST instead of a FIN.
    fn reset(self) {
        let _ = SockRef::from(&self.sock).set_linger(Some(Duration::ZERO));
    }
}

/// Publication texts start with `soak <token>`, the token unique to the publication.
fn pub_text(token: u64, pad: usize) -> String {
    format!("soak {token:016x} {}", "x".repeat(pad))
}

fn token_of(text: &str) -> Option<u64> {
    let hex = text.strip_prefix("soak ")?.get(..16)?;
    u64::from_str_radix(hex, 16).ok()
}

fn record_msg(line: &str, out: &mut Outcome) {
    // MSG <event> <id> <text>
    let mut f = line.splitn(4, ' ');
    let (_, _, id, text) = (f.next(), f.next(), f.next(), f.next());
    match (id.and_then(|i| i.parse().ok()), text.and_then(token_of)) {
        (Some(id), Some(token)) => {
            out.msgs.push((id, token));
            out.count("msgs");
        }
        _ => out.fail(format!("malformed MSG {line:?}")),
    }
}

/// `soak.e<n>`.
fn event(n: u64) -> String {
    format!("soak.e{n}")
}

// ---- the command clients ---------------------------------------------------------------

/// A command client: sessions of random commands with pauses, ended by QUIT, by closing
/// its sending side, or by vanishing.
struct Regular<'a, 'c> {
    ctx: &'a Ctx<'c>,
    id: u64,
    rng: Rng,
    out: Outcome,
    /// The address in use; bumped when a command's outcome is unknown.
    generation: u64,
    seq: u64,
}

/// What became of one command: whether the connection is still usable.
enum Next {
    Go,
    Dead,
}

impl Regular<'_, '_> {
    fn email(&self) -> String {
        format!("w{}g{}@soak.test", self.id, self.generation)
    }

    /// Events the current address is subscribed to, by its own history.
    fn subscribed(&self) -> Vec<String> {
        let email = self.email();
        let mut evs: Vec<String> = self
            .out
            .pairs
            .iter()
            .filter(|((e, _), ops)| *e == email && ops.last().is_some_and(|o| o.sub && o.acked.is_some()))
            .map(|((_, ev), _)| ev.clone())
            .collect();
        evs.sort();
        evs
    }

    fn run(mut self) -> Outcome {
        while !self.ctx.over() {
            let Some(mut c) = Conn::open(self.ctx, &mut self.out, None) else {
                self.ctx.pause(self.rng.millis(100, 1000));
                continue;
            };
            self.session(&mut c);
        }
        self.out
    }

    fn session(&mut self, c: &mut Conn) {
        let commands = 1 + self.rng.below(40);
        let mut auth_failures = 0;
        for _ in 0..commands {
            if self.ctx.over() {
                break;
            }
            let roll = self.rng.below(100);
            let next = match roll {
                0..=29 => self.sub_or_unsub(c, true),
                30..=49 => self.sub_or_unsub(c, false),
                50..=52 => self.publish(c),
                53..=55 => {
                    auth_failures += 1;
                    self.auth(c, auth_failures)
                }
                56..=64 => self.list(c),
                65..=67 => self.pipelined_pings(c),
                _ => self.ping(c),
            };
            if let Next::Dead = next {
                return;
            }
            self.ctx.pause(self.rng.millis(200, 1800));
        }
        match self.rng.below(10) {
            0..=5 => {
                self.out.count("cmd_quit");
                if !c.send(b"QUIT\r\n") {
                    return;
                }
                match c.reply(&mut self.out) {
                    Got::Line(l) if l == "+OK QUIT" => {
                        self.out.count("ack_quit");
                        if !c.until_closed(Duration::from_secs(30), &mut self.out) {
                            self.out.fail("no close within 30 s after +OK QUIT".into());
                        }
                    }
                    Got::Line(l) if l.starts_with("-ERR BUSY ") => self.out.count("busy"),
                    Got::Line(l) => self.out.fail(format!("QUIT got {l:?}")),
                    Got::Closed | Got::TimedOut => self.out.count("quit_unanswered"),
                }
            }
            6..=7 => {
                // EOF on read is a QUIT for the server.
                self.out.count("half_close");
                let _ = c.sock.shutdown(Shutdown::Write);
                if !c.until_closed(Duration::from_secs(30), &mut self.out) {
                    self.out.fail("no close within 30 s after our FIN".into());
                }
            }
            _ => self.out.count("vanished"),
        }
    }

    fn sub_or_unsub(&mut self, c: &mut Conn, sub: bool) -> Next {
        let ev = if sub {
            event(self.rng.below(EVENTS))
        } else {
            let evs = self.subscribed();
            if evs.is_empty() {
                event(self.rng.below(EVENTS))
            } else {
                evs[self.rng.below(evs.len() as u64) as usize].clone()
            }
        };
        let email = self.email();
        let verb = if sub { "SUB" } else { "UNSUB" };
        self.out.count(if sub { "cmd_sub" } else { "cmd_unsub" });
        let sent = Instant::now();
        let ops = self.out.pairs.entry((email.clone(), ev.clone())).or_default();
        ops.push(Op { sub, sent, acked: None });
        let at = ops.len() - 1;
        if !c.send(format!("{verb} {ev} {email}\r\n").as_bytes()) {
            self.generation += 1;
            return Next::Dead;
        }
        let want = format!("+OK {verb} {ev}");
        match c.reply(&mut self.out) {
            Got::Line(l) if l == want => {
                self.out.pairs.get_mut(&(email, ev)).expect("pushed above")[at].acked = Some(Instant::now());
                self.out.count(if sub { "ack_sub" } else { "ack_unsub" });
                Next::Go
            }
            got => self.unknown(verb, got, true),
        }
    }

    /// A command that did not get its `+OK`. Its outcome is unknown, so the address is
    /// retired when the command changes the database (`retire`).
    fn unknown(&mut self, verb: &str, got: Got, retire: bool) -> Next {
        if retire {
            self.generation += 1;
        }
        match got {
            Got::Line(l) if l.starts_with("-ERR UNAVAILABLE ") => {
                self.out.count("unavailable");
                Next::Go
            }
            Got::Line(l) if l.starts_with("-ERR BUSY ") => {
                self.out.count("busy");
                Next::Dead
            }
            Got::Line(l) => {
                self.out.fail(format!("{verb} got {l:?}"));
                Next::Dead
            }
            Got::Closed => {
                self.out.count("closed_by_server");
                Next::Dead
            }
            Got::TimedOut => {
                self.out.fail(format!("{verb}: no reply within {REPLY_WAIT:?}"));
                Next::Dead
            }
        }
    }

    fn publish(&mut self, c: &mut Conn) -> Next {
        self.seq += 1;
        let token = (self.id << 32) | self.seq;
        let ev = event(self.rng.below(EVENTS));
        publish(c, &mut self.out, token, &ev, self.rng.below(200) as usize)
    }

    fn auth(&mut self, c: &mut Conn, failures: u32) -> Next {
        self.out.count("cmd_auth");
        if !c.send(format!("AUTH wrong-{:x}\r\n", self.rng.next()).as_bytes()) {
            return Next::Dead;
        }
        match c.reply(&mut self.out) {
            Got::Line(l) if l.starts_with("-ERR AUTH ") => {
                self.out.count("auth_refused");
                // The third failure closes the connection.
                if failures >= 3 {
                    if c.until_closed(Duration::from_secs(30), &mut self.out) {
                        self.out.count("auth_closed");
                    } else {
                        self.out.fail("still open after 3 failed AUTHs".into());
                    }
                    return Next::Dead;
                }
                Next::Go
            }
            got => self.unknown("AUTH", got, false),
        }
    }

    fn list(&mut self, c: &mut Conn) -> Next {
        self.out.count("cmd_list");
        let email = self.email();
        if !c.send(format!("LIST {email}\r\n").as_bytes()) {
            return Next::Dead;
        }
        let mut rows = Vec::new();
        loop {
            match c.reply(&mut self.out) {
                Got::Line(l) if l.starts_with("SUB ") => {
                    rows.push(l.split(' ').nth(1).unwrap_or_default().to_string());
                }
                Got::Line(l) if l.starts_with("+OK LIST ") => {
                    self.out.count("ack_list");
                    if l != format!("+OK LIST {}", rows.len()) {
                        self.out.fail(format!("{l:?} after {} rows", rows.len()));
                    }
                    // The address is retired at the first unknown outcome, so its history
                    // here is all acknowledged: LIST must show exactly that.
                    let want = self.subscribed();
                    if rows != want {
                        self.out.fail(format!("LIST {email}: {rows:?}, acknowledged {want:?}"));
                    }
                    return Next::Go;
                }
                Got::Line(l) if l.starts_with("-ERR UNAVAILABLE ") && rows.is_empty() => {
                    self.out.count("unavailable");
                    return Next::Go;
                }
                got => return self.unknown("LIST", got, false),
            }
        }
    }

    fn ping(&mut self, c: &mut Conn) -> Next {
        self.out.count("cmd_ping");
        let tag = self.rng.next();
        if !c.send(format!("PING p {tag}\r\n").as_bytes()) {
            return Next::Dead;
        }
        match c.reply(&mut self.out) {
            Got::Line(l) if l == format!("PONG p {tag}") => {
                self.out.count("ack_ping");
                Next::Go
            }
            got => self.unknown("PING", got, false),
        }
    }

    /// 100 PINGs in one write (over `max_inflight`): 100 PONGs in order.
    fn pipelined_pings(&mut self, c: &mut Conn) -> Next {
        self.out.count("cmd_ping_pipelined");
        let mut batch = String::new();
        for i in 0..100 {
            batch.push_str(&format!("ping {i}\r\n"));
        }
        if !c.send(batch.as_bytes()) {
            return Next::Dead;
        }
        for i in 0..100 {
            match c.reply(&mut self.out) {
                Got::Line(l) if l == format!("PONG {i}") => {}
                got => return self.unknown("pipelined PING", got, false),
            }
        }
        self.out.count("ack_ping_pipelined");
        Next::Go
    }
}

/// Sends one PUB and records it; a PUB is never sent again (that could publish twice).
fn publish(c: &mut Conn, out: &mut Outcome, token: u64, ev: &str, pad: usize) -> Next {
    out.count("cmd_pub");
    out.pubs.push(PubLog { token, event: ev.to_string(), sent: Instant::now(), acked: None });
    let at = out.pubs.len() - 1;
    if !c.send(format!("PUB {ev} {}\r\n", pub_text(token, pad)).as_bytes()) {
        return Next::Dead;
    }
    match c.reply(out) {
        Got::Line(l) if l.starts_with("+OK PUB ") => {
            let id = l.split(' ').nth(2).and_then(|i| i.parse::<u64>().ok());
            let n = l.split(' ').nth(3).and_then(|n| n.parse::<u64>().ok());
            match (id, n) {
                (Some(id), Some(_)) => {
                    out.pubs[at].acked = Some((Instant::now(), id));
                    out.count("ack_pub");
                }
                _ => out.fail(format!("malformed {l:?}")),
            }
            Next::Go
        }
        Got::Line(l) if l.starts_with("-ERR UNAVAILABLE ") => {
            out.count("unavailable");
            Next::Go
        }
        Got::Line(l) if l.starts_with("-ERR BUSY ") => {
            out.count("busy");
            Next::Dead
        }
        Got::Line(l) => {
            out.fail(format!("PUB got {l:?}"));
            Next::Dead
        }
        Got::Closed => {
            out.count("closed_by_server");
            Next::Dead
        }
        Got::TimedOut => {
            out.fail(format!("PUB: no reply within {REPLY_WAIT:?}"));
            Next::Dead
        }
    }
}

// ---- the other clients -----------------------------------------------------------------

/// Large publications on FLOOD, twenty a second (80 kB/s), for the slow readers to fall behind on.
fn flood(ctx: &Ctx, id: u64) -> Outcome {
    let mut out = Outcome::default();
    let mut seq = 0;
    while !ctx.over() {
        let Some(mut c) = Conn::open(ctx, &mut out, None) else {
            ctx.pause(Duration::from_millis(500));
            continue;
        };
        while !ctx.over() {
            seq += 1;
            if let Next::Dead = publish(&mut c, &mut out, (id << 32) | seq, FLOOD, 3900) {
                break;
            }
            ctx.pause(Duration::from_millis(50));
        }
    }
    out
}

/// Subscribes to FLOOD with a small receive buffer, then reads a little now and then, or
/// not at all, until the server drops it as a slow consumer or the session ends.
fn slow_reader(ctx: &Ctx, seed: u64) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut out = Outcome::default();
    while !ctx.over() {
        let Some(mut c) = Conn::open(ctx, &mut out, Some(4096)) else {
            ctx.pause(rng.millis(200, 2000));
            continue;
        };
        out.count("slow_sessions");
        out.count("cmd_sub");
        let sent = Instant::now();
        if !c.send(format!("SUB {FLOOD} {SLOW_EMAIL}\r\n").as_bytes()) {
            continue;
        }
        let ops = out.pairs.entry((SLOW_EMAIL.to_string(), FLOOD.to_string())).or_default();
        ops.push(Op { sub: true, sent, acked: None });
        let at = ops.len() - 1;
        match c.reply(&mut out) {
            Got::Line(l) if l == format!("+OK SUB {FLOOD}") => {
                out.pairs.get_mut(&(SLOW_EMAIL.to_string(), FLOOD.to_string())).expect("pushed")[at].acked =
                    Some(Instant::now());
                out.count("ack_sub");
            }
            _ => continue,
        }
        let trickle = rng.chance(50);
        // Long enough for a reader that reads nothing to fill the kernel's buffers (the
        // server's send buffer grows to megabytes) and then max_pending.
        let session =
            Instant::now() + if trickle { rng.millis(20_000, 60_000) } else { rng.millis(60_000, 120_000) };
        let mut dropped = false;
        while Instant::now() < session && !ctx.over() && !dropped {
            if trickle {
                let mut small = [0u8; 256];
                let _ = c.sock.set_read_timeout(Some(Duration::from_millis(50)));
                match c.sock.read(&mut small) {
                    Ok(0) => dropped = true,
                    Ok(n) => c.buf.extend_from_slice(&small[..n]),
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                    Err(_) => dropped = true,
                }
                ctx.pause(Duration::from_millis(300));
            } else {
                ctx.pause(Duration::from_millis(500));
            }
        }
        // Whatever came, up to the close if the server dropped it.
        let mut busy = false;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match c.line(deadline.saturating_duration_since(Instant::now()), &mut out) {
                Got::Line(l) if l.starts_with("MSG ") => record_msg(&l, &mut out),
                Got::Line(l) if l.starts_with("-ERR BUSY ") => busy = true,
                Got::Line(l) => out.fail(format!("slow reader got {l:?}")),
                Got::Closed => {
                    dropped = true;
                    break;
                }
                Got::TimedOut => break,
            }
        }
        if dropped {
            out.count("slow_dropped");
        }
        if busy {
            out.count("slow_busy_line");
        }
    }
    out
}

/// Lines that are no command: random bytes after a first byte that no verb starts with,
/// some over `max_line`. Each gets exactly one `-ERR`, TOO_LONG for the long ones, and
/// the connection goes on (a PING after each batch proves it).
fn garbage(ctx: &Ctx, seed: u64) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut out = Outcome::default();
    while !ctx.over() {
        let Some(mut c) = Conn::open(ctx, &mut out, None) else {
            ctx.pause(rng.millis(200, 2000));
            continue;
        };
        'batches: for batch in 0..1 + rng.below(10) {
            if ctx.over() {
                break;
            }
            let mut bytes = Vec::new();
            let mut long = Vec::new();
            for _ in 0..1 + rng.below(30) {
                let len = match rng.below(10) {
                    0 => MAX_LINE - 1 + rng.below(3) as usize, // around the bound (LF counted)
                    1 => MAX_LINE + rng.below(16_000) as usize,
                    _ => 1 + rng.below(200) as usize,
                };
                let first = [0xff, 0x01, b'#', 0x80][rng.below(4) as usize];
                bytes.push(first);
                for _ in 1..len {
                    let b = rng.below(256) as u8;
                    bytes.push(if b == b'\n' { b'\r' } else { b });
                }
                bytes.push(b'\n');
                long.push(len + 1 > MAX_LINE);
            }
            *out.tally.entry("garbage_lines").or_default() += long.len() as u64;
            let tag = format!("g{batch}-{:x}", rng.next());
            bytes.extend_from_slice(format!("PING {tag}\r\n").as_bytes());
            if !c.send(&bytes) {
                break;
            }
            for is_long in long {
                match c.reply(&mut out) {
                    Got::Line(l) if is_long && l.starts_with("-ERR TOO_LONG ") => out.count("too_long"),
                    Got::Line(l)
                        if !is_long && (l.starts_with("-ERR UNKNOWN ") || l.starts_with("-ERR SYNTAX ")) =>
                    {
                        out.count("garbage_refused")
                    }
                    Got::Line(l) => {
                        out.fail(format!("garbage line (long: {is_long}) got {l:?}"));
                        break 'batches;
                    }
                    Got::Closed | Got::TimedOut => {
                        out.fail("garbage closed or stalled the connection".into());
                        break 'batches;
                    }
                }
            }
            match c.reply(&mut out) {
                Got::Line(l) if l == format!("PONG {tag}") => out.count("garbage_survived"),
                _ => {
                    out.fail("no PONG after a garbage batch".into());
                    break;
                }
            }
            ctx.pause(rng.millis(100, 1000));
        }
        // Half the time, leave in the middle of an over-long line.
        if rng.chance(50) {
            let _ = c.send(&vec![b'~'; MAX_LINE + 10]);
            c.reset();
        }
    }
    out
}

/// Connections that connect and vanish, hold a partial line, or subscribe and then stop
/// reading; closed by FIN or by RST.
fn half_open(ctx: &Ctx, seed: u64) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut out = Outcome::default();
    while !ctx.over() {
        let Ok(mut c) = Conn::connect(ctx.addr, Some(4096)) else {
            out.count("connect_errors");
            ctx.pause(rng.millis(100, 1000));
            continue;
        };
        out.count("half_open");
        match rng.below(4) {
            0 => {}
            1 => {
                let _ = c.send(format!("SUB {} half@", event(rng.below(EVENTS))).as_bytes());
                ctx.pause(rng.millis(1000, 10_000));
            }
            2 => {
                // Its reply is never read, so the pair is not tracked.
                let _ = c.send(format!("SUB {} half@soak.test\r\n", event(rng.below(EVENTS))).as_bytes());
                ctx.pause(rng.millis(5000, 30_000));
            }
            _ => ctx.pause(rng.millis(1000, 5000)),
        }
        if rng.chance(50) {
            c.reset();
        }
        ctx.pause(rng.millis(100, 2000));
    }
    out
}

/// Bursts of connections opened at once and dropped together.
fn storm(ctx: &Ctx, seed: u64) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut out = Outcome::default();
    while !ctx.over() {
        let mut conns = Vec::new();
        for _ in 0..20 + rng.below(40) {
            match Conn::connect(ctx.addr, None) {
                Ok(c) => conns.push(c),
                Err(_) => out.count("connect_errors"),
            }
        }
        out.count("storms");
        for c in &mut conns {
            out.count("storm_connections");
            if rng.chance(50) {
                match c.line(Duration::from_secs(30), &mut out) {
                    Got::Line(l) if l.starts_with("HELLO notifd 1") => {}
                    Got::Line(l) if l.starts_with("-ERR BUSY ") => out.count("busy_at_connect"),
                    Got::Line(l) => out.fail(format!("storm greeting {l:?}")),
                    Got::Closed | Got::TimedOut => out.count("no_greeting"),
                }
            }
        }
        for c in conns {
            if rng.chance(50) {
                c.reset();
            }
        }
        ctx.pause(rng.millis(1000, 4000));
    }
    out
}

/// SIGKILLs the store or the mailer every 5 to 20 s, each time waiting for the daemon to
/// start the new one before the next kill.
fn killer(ctx: &Ctx, max_kills: u64) -> Outcome {
    let mut rng = Rng::new(ctx.seed ^ 0x4b11);
    let mut out = Outcome::default();
    let d = ctx.daemon;
    while !ctx.over() && ctx.kills.load(Ordering::Relaxed) < max_kills {
        ctx.pause(rng.millis(5000, 20_000));
        if ctx.over() {
            break;
        }
        let (name, pids) = if rng.chance(60) {
            ("notifd-store", d.child_pids("notifd-store"))
        } else {
            ("notifd-mailer", d.mailer_pids())
        };
        let Some(&pid) = pids.last() else { continue };
        util::kill_if_ours(pid, libc::SIGKILL);
        ctx.kills.fetch_add(1, Ordering::Relaxed);
        out.count(if name == "notifd-store" { "kills_store" } else { "kills_mailer" });
        let restarted = Instant::now() + Duration::from_secs(60);
        loop {
            let now = if name == "notifd-store" { d.child_pids(name) } else { d.mailer_pids() };
            if now.len() > pids.len() {
                break;
            }
            if Instant::now() >= restarted {
                out.fail(format!("{name} (pid {pid}) not restarted within 60 s of SIGKILL"));
                return out;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    out
}

// ---- set-up and checks -----------------------------------------------------------------

fn clock_seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    t.as_secs() ^ u64::from(t.subsec_nanos())
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Keys of later versions that a soak from one address needs, each with the largest
/// value the binary accepts; left out when the binary does not know the key (an unknown
/// key is a configuration error).
fn optional_keys() -> String {
    let mut keep = String::new();
    for key in ["max_clients_per_net", "auth_fail_limit"] {
        for value in [1_000_000, 100_000, 10_000, 1000] {
            let line = format!("{key} = {value}");
            let dir = tempfile::tempdir().expect("temporary folder");
            let conf = util::write_config(dir.path(), &line);
            let Ok(res) = std::process::Command::new(util::bin()).arg("-t").arg("-c").arg(&conf).output()
            else {
                break;
            };
            let err = String::from_utf8_lossy(&res.stderr);
            if err.contains(&format!("unknown key \"{key}\"")) {
                break;
            }
            if !err.contains(key) {
                keep.push_str(&line);
                keep.push('\n');
                break;
            }
        }
    }
    keep
}

/// The stable pairs: one address per event, subscribed before the load and never
/// unsubscribed, plus the slow readers' pair.
fn stable_pairs(d: &Daemon, out: &mut Outcome) {
    let mut c = d.client();
    let mut pairs: Vec<(String, String)> =
        (0..EVENTS).map(|n| (format!("stable{n}@soak.test"), event(n))).collect();
    pairs.push((SLOW_EMAIL.to_string(), FLOOD.to_string()));
    for (email, ev) in pairs {
        out.count("cmd_sub");
        out.count("ack_sub");
        let sent = Instant::now();
        c.cmd(&format!("SUB {ev} {email}"));
        c.expect(&format!("+OK SUB {ev}"));
        out.pairs.entry((email, ev)).or_default().push(Op { sub: true, sent, acked: Some(Instant::now()) });
    }
    c.cmd("QUIT");
    c.expect("+OK QUIT");
}

/// Whether the pair with `ops` (in the order sent) must be in the database at the end:
/// an acknowledged SUB with no UNSUB sent after it. `Some(false)`: it must not be (the
/// last command was an acknowledged UNSUB and every one before it was acknowledged).
fn must_hold(ops: &[Op]) -> Option<bool> {
    let last_sub = ops.iter().rposition(|o| o.sub && o.acked.is_some());
    if let Some(i) = last_sub {
        if !ops[i + 1..].iter().any(|o| !o.sub) {
            return Some(true);
        }
    }
    let last = ops.last()?;
    (!last.sub && ops.iter().all(|o| o.acked.is_some())).then_some(false)
}

/// Whether publication `p` must have emailed the pair with `ops`: the last SUB
/// acknowledged before `p` was sent has no UNSUB sent after it (an UNSUB may delete
/// emails still waiting).
fn must_email(ops: &[Op], sent: Instant) -> bool {
    let Some(i) = ops.iter().rposition(|o| o.sub && o.acked.is_some_and(|a| a < sent)) else { return false };
    !ops[i + 1..].iter().any(|o| !o.sub)
}

/// What the checks found: figures for the summary, the checks that passed, the failures.
#[derive(Default)]
struct Verdict {
    figures: Vec<String>,
    passed: Vec<&'static str>,
    failures: Vec<String>,
}

impl Verdict {
    /// Records a check; only the first few of its problems are kept.
    fn check(&mut self, name: &'static str, problems: Vec<String>) {
        if problems.is_empty() {
            self.passed.push(name);
            return;
        }
        let more = problems.len().saturating_sub(5);
        self.failures.extend(problems.into_iter().take(5));
        if more > 0 {
            self.failures.push(format!("... and {more} more of \"{name}\""));
        }
    }
}

/// Runs every client and the killer until `seconds` have passed; what they did.
fn run_load(d: &Daemon, seconds: u64, clients: u64, seed: u64) -> Outcome {
    let ctx = Ctx {
        daemon: d,
        addr: d.addr(),
        end: Instant::now() + Duration::from_secs(seconds),
        seed,
        kills: AtomicU64::new(0),
    };
    let ctx = &ctx;
    let mut jobs: Vec<Box<dyn FnOnce() -> Outcome + Send + '_>> = Vec::new();
    for id in 0..clients {
        let rng = Rng::new(seed ^ (id + 1).wrapping_mul(0x1000_0001));
        jobs.push(Box::new(move || {
            Regular { ctx, id, rng, out: Outcome::default(), generation: 0, seq: 0 }.run()
        }));
    }
    jobs.push(Box::new(move || flood(ctx, clients)));
    for i in 0..10 {
        jobs.push(Box::new(move || slow_reader(ctx, seed ^ (0x510 + i))));
    }
    for i in 0..6 {
        jobs.push(Box::new(move || garbage(ctx, seed ^ (0x6a7 + i))));
    }
    for i in 0..10 {
        jobs.push(Box::new(move || half_open(ctx, seed ^ (0x4a1f + i))));
    }
    for i in 0..4 {
        jobs.push(Box::new(move || storm(ctx, seed ^ (0x5707 + i))));
    }
    jobs.push(Box::new(move || killer(ctx, seconds / 5 + 1)));
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|job| std::thread::Builder::new().stack_size(256 << 10).spawn_scoped(s, job).expect("spawn"))
            .collect();
        handles.into_iter().map(|h| h.join().expect("a client thread panicked")).collect()
    });
    let mut all = Outcome::default();
    for o in outcomes {
        all.merge(o);
    }
    all
}

/// The clients are gone: the reactor gives back what they cost (bounded wait).
fn check_memory(reactor: i32, rss_start: u64, v: &mut Verdict) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut rss_end = util::rss(reactor);
    while rss_end > rss_start + RSS_SLACK && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        rss_end = util::rss(reactor);
    }
    v.figures.push(format!("reactor RSS: start {} KiB, end {} KiB", rss_start >> 10, rss_end >> 10));
    let mut problems = Vec::new();
    if rss_end > rss_start + RSS_SLACK {
        problems.push(format!(
            "reactor RSS {} MiB at the end, {} MiB at the start",
            rss_end >> 20,
            rss_start >> 20
        ));
    }
    v.check("rss", problems);
}

/// No zombie child before the stop, a clean exit on SIGTERM, and no child after it.
fn check_processes(d: &mut Daemon, v: &mut Verdict) {
    let reactor = d.pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    let zombies = loop {
        let z: Vec<i32> = util::children_of(reactor)
            .into_iter()
            .filter(|&p| util::stat(p).is_some_and(|(s, _)| s == 'Z'))
            .collect();
        if z.is_empty() || Instant::now() >= deadline {
            break z;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    v.check("no zombie", zombies.iter().map(|p| format!("zombie child {p} of the reactor")).collect());
    v.figures.push(format!(
        "children started: {} stores, {} mailers; slow consumers in the log: {}",
        d.child_pids("notifd-store").len(),
        d.mailer_pids().len(),
        d.log_count("slow consumer")
    ));
    let children = d.all_child_pids();
    let status = d.stop();
    let mut problems = Vec::new();
    if !status.success() {
        problems.push(format!("the daemon exited with {status} on SIGTERM"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while children.iter().any(|&p| util::alive_notifd(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in children.into_iter().filter(|&p| util::alive_notifd(p)) {
        problems.push(format!("child {p} alive after the stop"));
    }
    v.check("clean stop, no process left", problems);
}

/// One publication, one id, whoever saw it (its publisher or a subscriber).
fn check_ids(all: &Outcome, v: &mut Verdict) {
    let mut by_id: HashMap<u64, u64> = HashMap::new();
    let mut by_token: HashMap<u64, u64> = HashMap::new();
    let mut problems = Vec::new();
    let acked = all.pubs.iter().filter_map(|p| p.acked.map(|(_, id)| (id, p.token)));
    for (id, token) in acked.chain(all.msgs.iter().copied()) {
        if *by_id.entry(id).or_insert(token) != token || *by_token.entry(token).or_insert(id) != id {
            problems.push(format!("id {id} / publication {token:016x} seen with another id or publication"));
        }
    }
    v.figures.push(format!("MSGs received {}, distinct ids {}", all.msgs.len(), by_id.len()));
    v.check("ids unique", problems);
}

/// Reads the database (after the stop) and the spool: acknowledged pairs and
/// publications are there, and so are the emails they owe.
fn check_database(d: &Daemon, all: &mut Outcome, v: &mut Verdict) {
    let db = d.db();
    let mut q = db.prepare("SELECT email, event FROM subscriptions").unwrap();
    let stored: HashSet<(String, String)> =
        q.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
    let (mut held, mut gone, mut problems) = (0, 0, Vec::new());
    for (pair, ops) in &mut all.pairs {
        ops.sort_by_key(|o| o.sent);
        match must_hold(ops) {
            Some(true) => {
                held += 1;
                if !stored.contains(pair) {
                    problems.push(format!("acknowledged SUB {} {} missing", pair.1, pair.0));
                }
            }
            Some(false) => {
                gone += 1;
                if stored.contains(pair) {
                    problems.push(format!("acknowledged UNSUB {} {} still stored", pair.1, pair.0));
                }
            }
            None => {}
        }
    }
    v.check("subscriptions", problems);

    let mut q = db.prepare("SELECT id, text FROM notifications").unwrap();
    let texts: HashMap<u64, String> = q
        .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut q = db.prepare("SELECT notification_id, email FROM outbox").unwrap();
    let outbox: HashSet<(u64, String)> = q
        .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let spool: HashSet<String> = std::fs::read_dir(d.path("spool"))
        .map(|it| it.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let mut by_event: HashMap<&str, Vec<(&str, &[Op])>> = HashMap::new();
    for ((email, ev), ops) in &all.pairs {
        by_event.entry(ev.as_str()).or_default().push((email.as_str(), ops.as_slice()));
    }
    let (mut pubs, mut emails, mut pub_problems, mut email_problems) = (0, 0, Vec::new(), Vec::new());
    for p in &all.pubs {
        let Some((_, id)) = p.acked else { continue };
        pubs += 1;
        if texts.get(&id).and_then(|t| token_of(t)) != Some(p.token) {
            pub_problems
                .push(format!("acknowledged PUB {id} ({:016x}) missing or wrong in the database", p.token));
        }
        for (email, ops) in by_event.get(p.event.as_str()).map(Vec::as_slice).unwrap_or_default() {
            if !must_email(ops, p.sent) {
                continue;
            }
            emails += 1;
            if !outbox.contains(&(id, email.to_string())) && !spool.contains(&format!("{id}-{email}.eml")) {
                email_problems.push(format!("no email of PUB {id} to {email} in the outbox or the spool"));
            }
        }
    }
    v.check("publications", pub_problems);
    v.check("emails", email_problems);
    v.figures.push(format!(
        "checked: {held} SUB pairs held, {gone} UNSUB pairs gone, {pubs} acknowledged PUBs, {emails} emails \
         ({} outbox rows, {} spool files)",
        outbox.len(),
        spool.len()
    ));
    let idle = held == 0 || pubs == 0 || emails == 0;
    v.check("something to check", if idle { vec!["the load left nothing to check".into()] } else { vec![] });
}

fn print_summary(all: &Outcome, v: &Verdict, load: Duration, seed: u64) {
    let t = &all.tally;
    let n = |k: &str| t.get(k).copied().unwrap_or(0);
    eprintln!("soak: summary after {:.0} s of load (seed {seed})", load.as_secs_f64());
    eprintln!("  tally: {t:?}");
    eprintln!(
        "  commands: SUB {} / +OK {}, UNSUB {} / +OK {}, PUB {} / +OK {}, AUTH {} (refused {}, closed {}), \
         LIST {} / +OK {}, PING {} / PONG {}, pipelined PINGx100 {} / {}, QUIT {} / +OK {}",
        n("cmd_sub"),
        n("ack_sub"),
        n("cmd_unsub"),
        n("ack_unsub"),
        n("cmd_pub"),
        n("ack_pub"),
        n("cmd_auth"),
        n("auth_refused"),
        n("auth_closed"),
        n("cmd_list"),
        n("ack_list"),
        n("cmd_ping"),
        n("ack_ping"),
        n("cmd_ping_pipelined"),
        n("ack_ping_pipelined"),
        n("cmd_quit"),
        n("ack_quit"),
    );
    eprintln!("  kills: store {}, mailer {}", n("kills_store"), n("kills_mailer"));
    eprintln!(
        "  slow readers: {} sessions, {} dropped, {} saw -ERR BUSY",
        n("slow_sessions"),
        n("slow_dropped"),
        n("slow_busy_line")
    );
    for f in &v.figures {
        eprintln!("  {f}");
    }
    eprintln!("  checks passed: {}", v.passed.join(", "));
    if !v.failures.is_empty() {
        eprintln!("  FAILURES ({} in the clients):", n("failures"));
        for f in &v.failures {
            eprintln!("    {f}");
        }
    }
}

#[test]
#[ignore = "minutes long; run by make soak"]
fn soak() {
    let seconds = env_u64("SOAK_SECONDS", 600);
    let clients = env_u64("SOAK_CLIENTS", 200);
    let seed = env_u64("SOAK_SEED", clock_seed());
    eprintln!("soak: {seconds} s, {clients} command clients, seed {seed}");

    let extra = format!(
        "mail_transport = \"spool\"\nmail_policy = \"all\"\nlog_level = \"info\"\nmax_clients_per_ip = 100000\n\
         mail_retry_base = 1\nmax_pending = {MAX_PENDING}\n{}",
        optional_keys()
    );
    eprintln!("soak: configuration beyond the test defaults: {}", extra.trim_end().replace('\n', "; "));
    let mut d = Daemon::start(&extra);
    let reactor = d.pid();
    let mut all = Outcome::default();
    stable_pairs(&d, &mut all);
    let rss_start = util::rss(reactor);

    let started = Instant::now();
    all.merge(run_load(&d, seconds, clients, seed));
    let load = started.elapsed();

    let mut v = Verdict { failures: std::mem::take(&mut all.failures), ..Verdict::default() };
    check_memory(reactor, rss_start, &mut v);
    check_processes(&mut d, &mut v);
    check_ids(&all, &mut v);
    check_database(&d, &mut all, &mut v);
    print_summary(&all, &v, load, seed);
    assert!(v.failures.is_empty(), "soak failed: {} problems (above)", v.failures.len());
}
