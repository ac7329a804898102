//! notif-bench: the load generator behind `make bench`.
//!
//! One thread, one mio event loop, many non-blocking connections. It speaks notifd's
//! line protocol and, for comparison, Redis pub/sub (RESP), NATS's text protocol and
//! MQTT 3.1.1 at QoS 0, so that one program with one set of costs measures every server.
//! It only ever connects to loopback addresses, and every loop is bounded in count and
//! in time. Results are printed as `RESULT key=value ...` lines for bench/run.sh.
//!
//! Latency: each published payload carries its send time in nanoseconds of a monotonic
//! clock that the publishers and subscribers share (they are in this one process).
//!
//! Self-contained on purpose: it does not use the notifd library crate.

use std::collections::{HashMap, VecDeque};
use std::env;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol as SockProtocol, Socket, Type};

const USAGE: &str = "usage: notif-bench --scenario NAME [options]
scenarios:
  fanout    1 publisher -> --subs subscribers, at most --msgs messages or --duration
            seconds of publishing, --window messages in flight end to end
  latency   --rate publications/s to --subs subscribers for --duration seconds
  pairs     --pairs publishers each to its own subscriber, as fanout otherwise
  conns     --conns idle subscribed connections from --sources 127.0.0.x addresses;
            server memory (--pid, children included) before and --settle s after
  durable   notifd only: --conns pipelining connections, --inflight commands each,
            --kind sub|pub, for --duration seconds
  sqlite    no server: SQLite rows/s in --db, one transaction per row and batched
options:
  --server notifd|redis|nats|mqtt   --addr 127.0.0.1:PORT   --payload 64
  --timeout SECONDS (whole run, default 120)";

const PAYLOAD_MIN: usize = 40;
const SCRATCH: usize = 256 * 1024;
/// Connections being set up at once; more would overflow the server's accept backlog.
const SETUP_CONCURRENCY: usize = 256;
/// A message not delivered to every subscriber this long after it was sent is counted
/// as lost, and the window moves on.
const STALL: Duration = Duration::from_secs(5);
/// A subscriber's unparsed input never grows past this (a protocol error otherwise).
const MAX_RBUF: usize = 16 << 20;

fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Server {
    Notifd,
    Redis,
    Nats,
    Mqtt,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Notifd => "notifd",
            Server::Redis => "redis",
            Server::Nats => "nats",
            Server::Mqtt => "mqtt",
        }
    }
}

#[derive(Clone, Debug)]
struct Args {
    scenario: String,
    server: Server,
    addr: SocketAddr,
    subs: usize,
    msgs: u64,
    window: usize,
    rate: u64,
    duration: Duration,
    pairs: usize,
    conns: usize,
    sources: usize,
    pid: Option<u32>,
    settle: Duration,
    inflight: usize,
    kind: String,
    db: PathBuf,
    payload: usize,
    timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        scenario: String::new(),
        server: Server::Notifd,
        addr: "127.0.0.1:7600".parse().unwrap(),
        subs: 100,
        msgs: 10_000_000,
        window: 256,
        rate: 1000,
        duration: Duration::from_secs(5),
        pairs: 100,
        conns: 1000,
        sources: 0,
        pid: None,
        settle: Duration::from_secs(10),
        inflight: 64,
        kind: "sub".into(),
        db: PathBuf::from("notif-bench.db"),
        payload: 64,
        timeout: Duration::from_secs(120),
    };
    let argv: Vec<String> = env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        if k == "-h" || k == "--help" {
            return Err(String::new());
        }
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        let num = |v: &str| -> Result<u64, String> {
            v.parse::<u64>().map_err(|_| format!("{k}: bad number {v:?}"))
        };
        let secs = |v: &str| -> Result<Duration, String> {
            v.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e6)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| format!("{k}: bad duration {v:?}"))
        };
        match k.as_str() {
            "--scenario" => a.scenario = v.clone(),
            "--server" => {
                a.server = match v.as_str() {
                    "notifd" => Server::Notifd,
                    "redis" => Server::Redis,
                    "nats" => Server::Nats,
                    "mqtt" | "mosquitto" => Server::Mqtt,
                    _ => return Err(format!("unknown server {v}")),
                }
            }
            "--addr" => a.addr = v.parse().map_err(|_| format!("bad address {v}"))?,
            "--subs" => a.subs = num(v)? as usize,
            "--msgs" => a.msgs = num(v)?,
            "--window" => a.window = num(v)?.max(1) as usize,
            "--rate" => a.rate = num(v)?.max(1),
            "--duration" => a.duration = secs(v)?,
            "--pairs" => a.pairs = num(v)? as usize,
            "--conns" => a.conns = num(v)? as usize,
            "--sources" => a.sources = num(v)? as usize,
            "--pid" => a.pid = Some(num(v)? as u32),
            "--settle" => a.settle = secs(v)?,
            "--inflight" => a.inflight = num(v)?.max(1) as usize,
            "--kind" => a.kind = v.clone(),
            "--db" => a.db = PathBuf::from(v),
            "--payload" => a.payload = num(v)? as usize,
            "--timeout" => a.timeout = secs(v)?,
            _ => return Err(format!("unknown option {k}")),
        }
    }
    if !a.addr.ip().is_loopback() {
        return Err(format!("{}: only loopback addresses are allowed", a.addr));
    }
    if a.payload < PAYLOAD_MIN {
        return Err(format!("--payload must be at least {PAYLOAD_MIN}"));
    }
    if a.kind != "sub" && a.kind != "pub" {
        return Err("--kind is sub or pub".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("notif-bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    now_ns();
    raise_nofile();
    let r = match args.scenario.as_str() {
        "fanout" | "latency" | "pairs" => run_flows(&args),
        "conns" => run_conns(&args),
        "durable" => run_durable(&args),
        "sqlite" => run_sqlite(&args),
        other => Err(format!("unknown scenario {other:?}")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("notif-bench: {e}");
            ExitCode::from(1)
        }
    }
}

/// Lifts the soft open-files limit to the hard one: the connection scenario needs it.
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

/// CPU seconds (user + system) this process has used.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Wall time and CPU time of a measured interval; `cpu` is the fraction of one core.
struct Meter {
    wall: Instant,
    cpu: f64,
}

impl Meter {
    fn start() -> Meter {
        Meter { wall: Instant::now(), cpu: cpu_seconds() }
    }
    fn stop(&self) -> (f64, f64) {
        let secs = self.wall.elapsed().as_secs_f64().max(1e-9);
        (secs, (cpu_seconds() - self.cpu) / secs)
    }
}

// ---------------------------------------------------------------------------------
// Latency histogram: exact below 1,024 µs, then 512 sub-buckets per power of two
// (0.2 % resolution), so recording is an increment and memory is fixed.

struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    max: u64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram { buckets: vec![0; 1024 + 54 * 512], count: 0, max: 0 }
    }
    fn index(us: u64) -> usize {
        if us < 1024 {
            return us as usize;
        }
        let e = 63 - us.leading_zeros() as usize; // >= 10
        1024 + (e - 10) * 512 + ((us >> (e - 9)) & 511) as usize
    }
    fn lower(idx: usize) -> u64 {
        if idx < 1024 {
            return idx as u64;
        }
        let e = (idx - 1024) / 512 + 10;
        let m = ((idx - 1024) % 512) as u64;
        (1u64 << e) + (m << (e - 9))
    }
    fn record_ns(&mut self, ns: u64) {
        let us = ns / 1000;
        let last = self.buckets.len() - 1;
        self.buckets[Self::index(us).min(last)] += 1;
        self.count += 1;
        self.max = self.max.max(us);
    }
    fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let want = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &b) in self.buckets.iter().enumerate() {
            seen += b;
            if seen >= want {
                return Self::lower(i).min(self.max);
            }
        }
        self.max
    }
}

// ---------------------------------------------------------------------------------
// Wire formats. Each parser takes the unread bytes and returns one event and the
// number of bytes it used, or None when more bytes are needed.

enum Ev<'a> {
    /// notifd's HELLO, NATS's INFO, MQTT's CONNACK.
    Greeting,
    /// A positive reply: +OK, PONG, a RESP integer or subscribe confirmation, SUBACK.
    Ack,
    /// A delivered message's payload.
    Msg(&'a [u8]),
    /// NATS asks for a PONG.
    Ping,
    /// A negative reply, with its text.
    Err(&'a [u8]),
    /// Anything else (LIST lines, NATS +OK in verbose mode, ...).
    Other,
}

/// The first LF, eight bytes at a time: the line scan is most of the generator's
/// per-message work, and it must outrun the servers it measures.
fn find_nl(buf: &[u8]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    const NL: u64 = LO * b'\n' as u64;
    let mut chunks = buf.chunks_exact(8);
    let mut base = 0;
    for c in &mut chunks {
        let x = u64::from_le_bytes(c.try_into().unwrap()) ^ NL;
        let found = x.wrapping_sub(LO) & !x & HI;
        if found != 0 {
            return Some(base + (found.trailing_zeros() / 8) as usize);
        }
        base += 8;
    }
    chunks.remainder().iter().position(|&b| b == b'\n').map(|k| base + k)
}

fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let nl = find_nl(buf)?;
    let l = &buf[..nl];
    let l = l.strip_suffix(b"\r").unwrap_or(l);
    Some((l, nl + 1))
}

fn parse(server: Server, buf: &[u8]) -> Result<Option<(Ev<'_>, usize)>, String> {
    match server {
        Server::Notifd => Ok(parse_notifd(buf)),
        Server::Nats => parse_nats(buf),
        Server::Redis => parse_resp(buf),
        Server::Mqtt => parse_mqtt(buf),
    }
}

fn parse_notifd(buf: &[u8]) -> Option<(Ev<'_>, usize)> {
    let (l, used) = line(buf)?;
    let ev = if let Some(rest) = l.strip_prefix(b"MSG ") {
        // MSG <event> <id> <text>
        let mut parts = rest.splitn(3, |&b| b == b' ');
        let _event = parts.next();
        let _id = parts.next();
        Ev::Msg(parts.next().unwrap_or(b""))
    } else if l.starts_with(b"+OK") || l.starts_with(b"PONG") {
        Ev::Ack
    } else if l.starts_with(b"-ERR") {
        Ev::Err(l)
    } else if l.starts_with(b"HELLO ") {
        Ev::Greeting
    } else {
        Ev::Other
    };
    Some((ev, used))
}

fn parse_nats(buf: &[u8]) -> Result<Option<(Ev<'_>, usize)>, String> {
    let Some((l, used)) = line(buf) else {
        return Ok(None);
    };
    if l.starts_with(b"MSG ") {
        // MSG <subject> <sid> [reply-to] <#bytes>\r\n<payload>\r\n
        let len = l
            .rsplit(|&b| b == b' ')
            .next()
            .and_then(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok())
            .ok_or("nats: bad MSG line")?;
        let end = used + len + 2;
        if buf.len() < end {
            return Ok(None);
        }
        return Ok(Some((Ev::Msg(&buf[used..used + len]), end)));
    }
    let ev = if l.starts_with(b"PING") {
        Ev::Ping
    } else if l.starts_with(b"PONG") {
        Ev::Ack
    } else if l.starts_with(b"INFO ") {
        Ev::Greeting
    } else if l.starts_with(b"-ERR") {
        Ev::Err(l)
    } else {
        Ev::Other
    };
    Ok(Some((ev, used)))
}

/// The part of RESP that pub/sub uses: simple strings, errors, integers, bulk strings
/// and arrays of those.
fn parse_resp(buf: &[u8]) -> Result<Option<(Ev<'_>, usize)>, String> {
    let Some((l, used)) = line(buf) else {
        return Ok(None);
    };
    let num = |s: &[u8]| -> Result<i64, String> {
        std::str::from_utf8(s)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| "redis: bad length".to_string())
    };
    match l.first() {
        Some(b'+') | Some(b':') => Ok(Some((Ev::Ack, used))),
        Some(b'-') => Ok(Some((Ev::Err(l), used))),
        Some(b'$') => {
            let n = num(&l[1..])?;
            let end = used + if n < 0 { 0 } else { n as usize + 2 };
            Ok((buf.len() >= end).then_some((Ev::Other, end)))
        }
        Some(b'*') => {
            let n = num(&l[1..])?;
            let mut pos = used;
            let mut kind: &[u8] = b"";
            let mut third: &[u8] = b"";
            for k in 0..n.max(0) {
                let Some((el, u)) = line(&buf[pos..]) else {
                    return Ok(None);
                };
                let start = pos + u;
                match el.first() {
                    Some(b'$') => {
                        let len = num(&el[1..])?.max(0) as usize;
                        if buf.len() < start + len + 2 {
                            return Ok(None);
                        }
                        let data = &buf[start..start + len];
                        if k == 0 {
                            kind = data;
                        } else if k == 2 {
                            third = data;
                        }
                        pos = start + len + 2;
                    }
                    _ => pos = start,
                }
            }
            let ev = match kind {
                b"message" => Ev::Msg(third),
                b"subscribe" => Ev::Ack,
                _ => Ev::Other,
            };
            Ok(Some((ev, pos)))
        }
        _ => Err("redis: unexpected reply".into()),
    }
}

fn parse_mqtt(buf: &[u8]) -> Result<Option<(Ev<'_>, usize)>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut rem = 0usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        rem |= ((b & 0x7f) as usize) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err("mqtt: bad remaining length".into());
        }
    }
    let end = i + rem;
    if buf.len() < end {
        return Ok(None);
    }
    let body = &buf[i..end];
    let ev = match buf[0] >> 4 {
        2 => match body.get(1) {
            Some(0) => Ev::Greeting,
            _ => Ev::Err(b"CONNACK refused"),
        },
        3 => {
            let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
            let mut p = 2 + tlen;
            if (buf[0] >> 1) & 3 != 0 {
                p += 2; // packet id, QoS > 0
            }
            Ev::Msg(body.get(p..).unwrap_or(b""))
        }
        9 => match body.get(2) {
            Some(0x80) => Ev::Err(b"SUBACK failure"),
            _ => Ev::Ack,
        },
        13 => Ev::Ack,
        _ => Ev::Other,
    };
    Ok(Some((ev, end)))
}

fn mqtt_packet(out: &mut Vec<u8>, first: u8, body: &[u8]) {
    out.push(first);
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
}

fn mqtt_str(body: &mut Vec<u8>, s: &[u8]) {
    body.extend_from_slice(&(s.len() as u16).to_be_bytes());
    body.extend_from_slice(s);
}

/// What a connection sends first (before any command).
fn hello(server: Server, out: &mut Vec<u8>, client_id: usize) {
    match server {
        Server::Notifd | Server::Redis => {}
        Server::Nats => out.extend_from_slice(
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"name\":\"notif-bench\"}\r\n",
        ),
        Server::Mqtt => {
            let mut body = Vec::new();
            mqtt_str(&mut body, b"MQTT");
            body.push(4); // protocol level 3.1.1
            body.push(0x02); // clean session
            body.extend_from_slice(&0u16.to_be_bytes()); // no keepalive
            mqtt_str(&mut body, format!("nb{}x{client_id}", std::process::id()).as_bytes());
            mqtt_packet(out, 0x10, &body);
        }
    }
}

/// A subscription request whose confirmation comes back as one `Ev::Ack`.
fn subscribe(server: Server, out: &mut Vec<u8>, topic: &str, who: usize) {
    match server {
        Server::Notifd => out.extend_from_slice(format!("SUB {topic} s{who}@bench.example\r\n").as_bytes()),
        Server::Redis => out.extend_from_slice(
            format!("*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{topic}\r\n", topic.len()).as_bytes(),
        ),
        // PING after SUB: its PONG says the SUB has been processed.
        Server::Nats => out.extend_from_slice(format!("SUB {topic} 1\r\nPING\r\n").as_bytes()),
        Server::Mqtt => {
            let mut body = Vec::new();
            body.extend_from_slice(&1u16.to_be_bytes());
            mqtt_str(&mut body, topic.as_bytes());
            body.push(0); // QoS 0
            mqtt_packet(out, 0x82, &body);
        }
    }
}

fn publish(server: Server, out: &mut Vec<u8>, topic: &str, payload: &[u8]) {
    match server {
        Server::Notifd => {
            out.extend_from_slice(b"PUB ");
            out.extend_from_slice(topic.as_bytes());
            out.push(b' ');
            out.extend_from_slice(payload);
            out.extend_from_slice(b"\r\n");
        }
        Server::Redis => {
            out.extend_from_slice(
                format!("*3\r\n$7\r\nPUBLISH\r\n${}\r\n{topic}\r\n${}\r\n", topic.len(), payload.len())
                    .as_bytes(),
            );
            out.extend_from_slice(payload);
            out.extend_from_slice(b"\r\n");
        }
        Server::Nats => {
            out.extend_from_slice(format!("PUB {topic} {}\r\n", payload.len()).as_bytes());
            out.extend_from_slice(payload);
            out.extend_from_slice(b"\r\n");
        }
        Server::Mqtt => {
            let mut body = Vec::with_capacity(2 + topic.len() + payload.len());
            mqtt_str(&mut body, topic.as_bytes());
            body.extend_from_slice(payload);
            mqtt_packet(out, 0x30, &body);
        }
    }
}

/// `<send time ns, 20 digits> <sequence, 12 digits> xxx...`, `len` bytes, printable so
/// that it is valid notifd text.
fn make_payload(buf: &mut Vec<u8>, seq: u64, len: usize) {
    buf.clear();
    let _ = write!(buf, "{:020} {:012} ", now_ns(), seq);
    buf.resize(len, b'x');
}

fn read_payload(p: &[u8]) -> Option<(u64, u64)> {
    let digits = |s: &[u8]| -> Option<u64> {
        let mut v = 0u64;
        for &b in s {
            if !b.is_ascii_digit() {
                return None;
            }
            v = v * 10 + (b - b'0') as u64;
        }
        Some(v)
    };
    if p.len() < 33 {
        return None;
    }
    Some((digits(&p[..20])?, digits(&p[21..33])?))
}

// ---------------------------------------------------------------------------------
// Connections and the event loop.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    /// Subscribed; counts deliveries for its flow.
    Sub,
    /// Publishes for its flow.
    Pub,
    /// Subscribed and silent (connection scenario).
    Idle,
    /// Pipelines durable SUB or PUB commands (notifd only).
    Writer,
}

struct Conn {
    stream: TcpStream,
    role: Role,
    flow: usize,
    connected: bool,
    greeted: bool,
    /// Setup finished: subscribed (Sub, Idle) or greeted (Pub, Writer).
    ready: bool,
    closed: bool,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    woff: usize,
    /// Writer: send times of the commands awaiting their reply, oldest first.
    pending: VecDeque<u64>,
    sent: u64,
}

/// One publisher's stream of messages to its subscribers, with an end-to-end window:
/// at most `window` messages are out before the oldest has reached every subscriber.
struct Flow {
    topic: String,
    publisher: usize,
    subs_live: u64,
    subs_start: u64,
    total: u64,
    sent: u64,
    /// Lowest sequence number not yet delivered to every live subscriber.
    oldest: u64,
    window: usize,
    counts: Vec<u64>,
    sent_at: Vec<u64>,
    delivered: u64,
    last_send: u64,
}

impl Flow {
    fn can_send(&self) -> bool {
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
    fn advance(&mut self, now: u64) {
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
    fn done(&self) -> bool {
        self.sent == self.total && self.oldest == self.sent
    }
}

struct Bench {
    server: Server,
    poll: Poll,
    conns: Vec<Conn>,
    flows: Vec<Flow>,
    hist: Histogram,
    scratch: Vec<u8>,
    errors: u64,
    dropped: u64,
    acked: u64,
    payload: Vec<u8>,
    payload_len: usize,
}

impl Bench {
    fn new(server: Server, payload_len: usize) -> Result<Bench, String> {
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
        self.conns.push(Conn {
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

    fn poll_once(&mut self, events: &mut Events, timeout: Duration) -> Result<(), String> {
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
            let n = match self.conns[i].stream.read(&mut scratch) {
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
            if self.conns[i].closed || n < scratch.len() {
                break;
            }
        }
        self.scratch = scratch;
        if !self.conns[i].closed && self.conns[i].woff < self.conns[i].wbuf.len() {
            self.flush(i);
        }
    }

    fn handle(&mut self, i: usize, ev: Ev<'_>, now: u64) {
        let c = &mut self.conns[i];
        match ev {
            Ev::Greeting => {
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

    fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
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
    fn setup(
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
    fn send_one(&mut self, f: usize) {
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

fn sources(n: usize) -> Vec<IpAddr> {
    (0..n).map(|k| IpAddr::V4(Ipv4Addr::new(127, 0, 0, (k + 1) as u8))).collect()
}

fn fmt_result(fields: &[(&str, String)]) -> String {
    let mut s = String::from("RESULT");
    for (k, v) in fields {
        s.push(' ');
        s.push_str(k);
        s.push('=');
        s.push_str(v);
    }
    s
}

/// fanout, latency and pairs: flows of messages from publishers to subscribers.
fn run_flows(a: &Args) -> Result<(), String> {
    let deadline = Instant::now() + a.timeout;
    let mut b = Bench::new(a.server, a.payload)?;
    let (nflows, subs_per_flow, total, window, rate) = match a.scenario.as_str() {
        "fanout" => (1, a.subs, a.msgs, a.window, None),
        "pairs" => (a.pairs, 1, a.msgs, a.window, None),
        _ => {
            let total = (a.rate as f64 * a.duration.as_secs_f64()) as u64;
            // Not gated by the window: the window only has to cover the stall time.
            let w = (a.rate as usize * (STALL.as_secs() as usize + 1)).max(1);
            (1, a.subs, total, w, Some(a.rate))
        }
    };
    let mut plan = Vec::new();
    for f in 0..nflows {
        let topic = if nflows == 1 { format!("bench.{}", a.scenario) } else { format!("bench.pair{f}") };
        b.flows.push(Flow {
            topic,
            publisher: 0,
            subs_live: subs_per_flow as u64,
            subs_start: subs_per_flow as u64,
            total,
            sent: 0,
            oldest: 0,
            window,
            counts: vec![0; window],
            sent_at: vec![0; window],
            delivered: 0,
            last_send: 0,
        });
        for _ in 0..subs_per_flow {
            plan.push((Role::Sub, f));
        }
    }
    let (ready, failed) = b.setup(a.addr, &plan, &[], deadline)?;
    if failed > 0 {
        return Err(format!("{failed} subscriber(s) failed, {ready} ready"));
    }
    let pubs: Vec<(Role, usize)> = (0..nflows).map(|f| (Role::Pub, f)).collect();
    let first_pub = b.conns.len();
    let (_, failed) = b.setup(a.addr, &pubs, &[], deadline)?;
    if failed > 0 {
        return Err(format!("{failed} publisher(s) failed"));
    }
    for f in 0..nflows {
        b.flows[f].publisher = first_pub + f;
    }
    let mut events = Events::with_capacity(1024);
    let meter = Meter::start();
    let start_ns = now_ns();
    let mut capped = false;
    loop {
        let now = now_ns();
        if rate.is_none() && !capped && meter.wall.elapsed() >= a.duration {
            // Bounded in time as well as in count: stop publishing, let the rest arrive.
            capped = true;
            for f in b.flows.iter_mut() {
                f.total = f.sent;
            }
        }
        for f in 0..b.flows.len() {
            let p = b.flows[f].publisher;
            if b.conns[p].closed {
                return Err("a publisher was disconnected".into());
            }
            match rate {
                None => {
                    while b.flows[f].can_send() {
                        b.send_one(f);
                    }
                }
                Some(r) => {
                    while b.flows[f].sent < b.flows[f].total
                        && start_ns + b.flows[f].sent * 1_000_000_000 / r <= now
                    {
                        b.send_one(f);
                    }
                }
            }
            if !b.conns[p].wbuf.is_empty() {
                b.flush(p);
            }
            b.flows[f].advance(now);
        }
        let all_sent = b.flows.iter().all(|f| f.sent == f.total);
        let finished = match rate {
            None => b.flows.iter().all(Flow::done),
            Some(_) => {
                all_sent
                    && b.flows.iter().all(|f| {
                        f.delivered >= f.total * f.subs_live
                            || now.saturating_sub(f.last_send) > STALL.as_nanos() as u64
                    })
            }
        };
        if finished {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("notif-bench: timeout; reporting what was measured");
            break;
        }
        let timeout = match rate {
            Some(r) if !all_sent => {
                let next = start_ns + b.flows[0].sent * 1_000_000_000 / r;
                Duration::from_nanos(next.saturating_sub(now_ns()))
            }
            _ => Duration::from_millis(100),
        };
        b.poll_once(&mut events, timeout)?;
    }
    // The last delivery, not the loop's end, closes the interval.
    let (secs, cpu) = meter.stop();
    let delivered: u64 = b.flows.iter().map(|f| f.delivered).sum();
    let expected: u64 = b.flows.iter().map(|f| f.sent * f.subs_start).sum();
    let sent: u64 = b.flows.iter().map(|f| f.sent).sum();
    let mut fields = vec![("scenario", a.scenario.clone()), ("server", a.server.name().into())];
    match a.scenario.as_str() {
        "pairs" => fields.push(("pairs", a.pairs.to_string())),
        _ => fields.push(("subs", a.subs.to_string())),
    }
    if rate.is_some() {
        fields.push(("rate", a.rate.to_string()));
    }
    fields.extend([
        ("sent", sent.to_string()),
        ("delivered", delivered.to_string()),
        ("lost", expected.saturating_sub(delivered).to_string()),
        ("secs", format!("{secs:.3}")),
        ("msgs_per_s", format!("{:.0}", delivered as f64 / secs)),
        ("p50_us", b.hist.quantile(0.50).to_string()),
        ("p99_us", b.hist.quantile(0.99).to_string()),
        ("max_us", b.hist.max.to_string()),
        ("errors", b.errors.to_string()),
        ("dropped", b.dropped.to_string()),
        ("gen_cpu", format!("{cpu:.2}")),
    ]);
    println!("{}", fmt_result(&fields));
    Ok(())
}

/// VmRSS in KiB of `pid` and all its descendants.
fn tree_rss_kb(pid: u32) -> u64 {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // pid (comm) state ppid ...: comm may hold spaces, so parse after ')'.
            let Some(after) = stat.rfind(')').map(|k| &stat[k + 1..]) else {
                continue;
            };
            if let Some(ppid) = after.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                children.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut total = 0;
    let mut todo = vec![pid];
    let mut seen = 0;
    while let Some(p) = todo.pop() {
        seen += 1;
        if seen > 100_000 {
            break;
        }
        if let Ok(status) = fs::read_to_string(format!("/proc/{p}/status")) {
            for l in status.lines() {
                if let Some(v) = l.strip_prefix("VmRSS:") {
                    total += v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
        if let Some(c) = children.get(&p) {
            todo.extend(c);
        }
    }
    total
}

fn run_conns(a: &Args) -> Result<(), String> {
    let pid = a.pid.ok_or("conns needs --pid of the server")?;
    let deadline = Instant::now() + a.timeout;
    let mut b = Bench::new(a.server, a.payload)?;
    // About 20,000 ephemeral ports per source address keeps clear of the range's end.
    let nsrc = if a.sources > 0 { a.sources } else { (a.conns / 20_000 + 1).max(4) }.min(254);
    let before = tree_rss_kb(pid);
    let meter = Meter::start();
    let plan = vec![(Role::Idle, 0); a.conns];
    let (ready, failed) = b.setup(a.addr, &plan, &sources(nsrc), deadline)?;
    let (connect_secs, cpu) = meter.stop();
    // Idle means idle: only answer the server's keep-alive pings meanwhile.
    let mut events = Events::with_capacity(1024);
    let settle_end = Instant::now() + a.settle;
    while Instant::now() < settle_end {
        b.poll_once(&mut events, Duration::from_millis(200))?;
    }
    let still = b.conns.iter().filter(|c| c.ready && !c.closed).count();
    let after = tree_rss_kb(pid);
    let per_conn = if still > 0 { (after.saturating_sub(before) * 1024) as f64 / still as f64 } else { 0.0 };
    println!(
        "{}",
        fmt_result(&[
            ("scenario", "conns".into()),
            ("server", a.server.name().into()),
            ("conns", a.conns.to_string()),
            ("ready", ready.to_string()),
            ("failed", failed.to_string()),
            ("open_after_settle", still.to_string()),
            ("sources", nsrc.to_string()),
            ("rss_before_kb", before.to_string()),
            ("rss_after_kb", after.to_string()),
            ("bytes_per_conn", format!("{per_conn:.0}")),
            ("connect_secs", format!("{connect_secs:.2}")),
            ("gen_cpu", format!("{cpu:.2}")),
        ])
    );
    Ok(())
}

fn run_durable(a: &Args) -> Result<(), String> {
    if a.server != Server::Notifd {
        return Err("durable is a notifd scenario".into());
    }
    let deadline = Instant::now() + a.timeout;
    let mut b = Bench::new(a.server, a.payload)?;
    let plan = vec![(Role::Writer, 0); a.conns];
    let (_, failed) = b.setup(a.addr, &plan, &[], deadline)?;
    if failed > 0 {
        return Err(format!("{failed} connection(s) failed"));
    }
    let run = std::process::id();
    let mut events = Events::with_capacity(1024);
    let meter = Meter::start();
    let stop_at = Instant::now() + a.duration;
    let mut line = Vec::with_capacity(128);
    loop {
        let issuing = Instant::now() < stop_at;
        let mut outstanding = 0;
        for i in 0..b.conns.len() {
            if b.conns[i].closed {
                continue;
            }
            while issuing && b.conns[i].pending.len() < a.inflight {
                let c = &mut b.conns[i];
                let n = c.sent;
                c.sent += 1;
                line.clear();
                if a.kind == "sub" {
                    let _ = write!(line, "SUB bench.durable r{run}c{i}n{n}@bench.example\r\n");
                } else {
                    make_payload(&mut b.payload, n, a.payload);
                    line.extend_from_slice(b"PUB bench.durable ");
                    line.extend_from_slice(&b.payload);
                    line.extend_from_slice(b"\r\n");
                }
                c.wbuf.extend_from_slice(&line);
                c.pending.push_back(now_ns());
            }
            if !b.conns[i].wbuf.is_empty() {
                b.flush(i);
            }
            outstanding += b.conns[i].pending.len();
        }
        if !issuing && outstanding == 0 {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("notif-bench: timeout with {outstanding} commands unanswered");
            break;
        }
        b.poll_once(&mut events, Duration::from_millis(20))?;
    }
    let (secs, cpu) = meter.stop();
    println!(
        "{}",
        fmt_result(&[
            ("scenario", "durable".into()),
            ("server", "notifd".into()),
            ("kind", a.kind.clone()),
            ("conns", a.conns.to_string()),
            ("inflight", a.inflight.to_string()),
            ("acked", b.acked.to_string()),
            ("errors", b.errors.to_string()),
            ("secs", format!("{secs:.3}")),
            ("acked_per_s", format!("{:.0}", b.acked as f64 / secs)),
            ("p50_us", b.hist.quantile(0.50).to_string()),
            ("p99_us", b.hist.quantile(0.99).to_string()),
            ("dropped", b.dropped.to_string()),
            ("gen_cpu", format!("{cpu:.2}")),
        ])
    );
    Ok(())
}

/// The baselines for the durable scenario: SQLite on the same disk, no server, with
/// `synchronous = FULL` and WAL, inserting rows shaped like notifd's subscriptions.
fn run_sqlite(a: &Args) -> Result<(), String> {
    use rusqlite::{params, Connection};
    let e = |e: rusqlite::Error| format!("sqlite {}: {e}", a.db.display());
    for suffix in ["", "-wal", "-shm"] {
        let mut p = a.db.clone().into_os_string();
        p.push(suffix);
        let _ = fs::remove_file(p);
    }
    let db = Connection::open(&a.db).map_err(e)?;
    db.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE IF NOT EXISTS subscriptions(email TEXT, event TEXT,
           created_at INTEGER, PRIMARY KEY (email, event));",
    )
    .map_err(e)?;
    let mut n = 0u64;
    for (mode, batch) in [("row", 1usize), ("batch64", 64), ("batch10000", 10_000)] {
        let meter = Meter::start();
        let stop_at = Instant::now() + a.duration;
        let mut rows = 0u64;
        while Instant::now() < stop_at && rows < 100_000_000 {
            let tx = db.unchecked_transaction().map_err(e)?;
            {
                let mut st = tx
                    .prepare_cached("INSERT OR IGNORE INTO subscriptions VALUES (?1, 'bench.sqlite', ?2)")
                    .map_err(e)?;
                for _ in 0..batch {
                    n += 1;
                    st.execute(params![format!("u{n}@bench.example"), 1_800_000_000i64]).map_err(e)?;
                }
            }
            tx.commit().map_err(e)?;
            rows += batch as u64;
        }
        let (secs, cpu) = meter.stop();
        println!(
            "{}",
            fmt_result(&[
                ("scenario", "sqlite".into()),
                ("mode", mode.into()),
                ("rows", rows.to_string()),
                ("secs", format!("{secs:.3}")),
                ("rows_per_s", format!("{:.0}", rows as f64 / secs)),
                ("gen_cpu", format!("{cpu:.2}")),
            ])
        );
    }
    drop(db);
    for suffix in ["", "-wal", "-shm"] {
        let mut p = a.db.clone().into_os_string();
        p.push(suffix);
        let _ = fs::remove_file(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles() {
        let mut h = Histogram::new();
        for us in 1..=1000u64 {
            h.record_ns(us * 1000);
        }
        assert_eq!(h.quantile(0.5), 500);
        assert_eq!(h.quantile(0.99), 990);
        h.record_ns(5_000_000_000);
        assert_eq!(h.max, 5_000_000);
        let big = Histogram::index(123_456);
        assert!(Histogram::lower(big) <= 123_456 && 123_456 - Histogram::lower(big) < 300);
    }

    #[test]
    fn find_nl_agrees_with_position() {
        let mut buf = vec![b'a'; 40];
        assert_eq!(find_nl(&buf), None);
        for k in 0..40 {
            buf[k] = b'\n';
            buf[(k + 7) % 40] = 0x8a; // high bit set: no false match
            assert_eq!(find_nl(&buf), buf.iter().position(|&b| b == b'\n'), "{k}");
            buf[k] = b'a';
            buf[(k + 7) % 40] = b'a';
        }
        assert_eq!(find_nl(b"ab\n\n"), Some(2));
    }

    #[test]
    fn payload_roundtrip() {
        let mut p = Vec::new();
        make_payload(&mut p, 42, 64);
        assert_eq!(p.len(), 64);
        let (_, seq) = read_payload(&p).unwrap();
        assert_eq!(seq, 42);
    }

    #[test]
    fn parsers() {
        let r = b"*3\r\n$7\r\nmessage\r\n$1\r\nx\r\n$3\r\nabc\r\n:1\r\n";
        let (ev, used) = parse_resp(r).unwrap().unwrap();
        assert!(matches!(ev, Ev::Msg(b"abc")));
        assert!(matches!(parse_resp(&r[used..]).unwrap(), Some((Ev::Ack, 4))));
        assert!(parse_resp(&r[..10]).unwrap().is_none());
        let n = b"MSG a 1 3\r\nabc\r\nPING\r\n";
        let (ev, used) = parse_nats(n).unwrap().unwrap();
        assert!(matches!(ev, Ev::Msg(b"abc")));
        assert!(matches!(parse_nats(&n[used..]).unwrap(), Some((Ev::Ping, 6))));
        let mut m = Vec::new();
        publish(Server::Mqtt, &mut m, "t", b"hello");
        let (ev, used) = parse_mqtt(&m).unwrap().unwrap();
        assert!(matches!(ev, Ev::Msg(b"hello")));
        assert_eq!(used, m.len());
        let l = b"MSG ev 17 some text here\r\n";
        assert!(matches!(parse_notifd(l), Some((Ev::Msg(b"some text here"), 26))));
    }
}
