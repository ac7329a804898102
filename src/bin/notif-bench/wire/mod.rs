//! The four wire codecs, one module per server, behind one dispatch on `Server`. Each
//! parser takes the unread bytes and returns one event and the number of bytes it used,
//! or `None` when more bytes are needed; each encoder appends to a connection's output.

mod mqtt;
mod nats;
mod notifd;
mod resp;

use std::io::Write;

use crate::now_ns;

/// The server under test, and so the wire protocol.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Server {
    Notifd,
    Redis,
    Nats,
    Mqtt,
}

impl Server {
    pub fn name(self) -> &'static str {
        match self {
            Server::Notifd => "notifd",
            Server::Redis => "redis",
            Server::Nats => "nats",
            Server::Mqtt => "mqtt",
        }
    }
}

/// What one parsed reply means to the event loop, whatever the protocol.
pub enum Ev<'a> {
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

/// One line without its CR LF, and the bytes it used.
fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let nl = find_nl(buf)?;
    let l = &buf[..nl];
    let l = l.strip_suffix(b"\r").unwrap_or(l);
    Some((l, nl + 1))
}

/// One event from the head of `buf`.
pub fn parse(server: Server, buf: &[u8]) -> Result<Option<(Ev<'_>, usize)>, String> {
    match server {
        Server::Notifd => Ok(notifd::parse(buf)),
        Server::Nats => nats::parse(buf),
        Server::Redis => resp::parse(buf),
        Server::Mqtt => mqtt::parse(buf),
    }
}

/// What a connection sends first (before any command).
pub fn hello(server: Server, out: &mut Vec<u8>, client_id: usize) {
    match server {
        Server::Notifd | Server::Redis => {}
        Server::Nats => nats::hello(out),
        Server::Mqtt => mqtt::hello(out, client_id),
    }
}

/// A subscription request whose confirmation comes back as one `Ev::Ack`.
pub fn subscribe(server: Server, out: &mut Vec<u8>, topic: &str, who: usize) {
    match server {
        Server::Notifd => notifd::subscribe(out, topic, who),
        Server::Redis => resp::subscribe(out, topic),
        Server::Nats => nats::subscribe(out, topic),
        Server::Mqtt => mqtt::subscribe(out, topic),
    }
}

pub fn publish(server: Server, out: &mut Vec<u8>, topic: &str, payload: &[u8]) {
    match server {
        Server::Notifd => notifd::publish(out, topic, payload),
        Server::Redis => resp::publish(out, topic, payload),
        Server::Nats => nats::publish(out, topic, payload),
        Server::Mqtt => mqtt::publish(out, topic, payload),
    }
}

/// `<send time ns, 20 digits> <sequence, 12 digits> xxx...`, `len` bytes, printable so
/// that it is valid notifd text.
pub fn make_payload(buf: &mut Vec<u8>, seq: u64, len: usize) {
    buf.clear();
    let _ = write!(buf, "{:020} {:012} ", now_ns(), seq);
    buf.resize(len, b'x');
}

/// The send time and the sequence number at the head of a payload.
pub fn read_payload(p: &[u8]) -> Option<(u64, u64)> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
