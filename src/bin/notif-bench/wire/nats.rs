//! NATS's text protocol: `CONNECT` after the server's `INFO`, `SUB`/`PUB` with payload
//! lengths, and `PING`s the client must answer.

use super::{line, Ev};

/// One line, or a `MSG` line with the payload that follows it.
pub fn parse(buf: &[u8]) -> Result<Option<(Ev<'_>, usize)>, String> {
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

/// Quiet mode: no `+OK` after every command.
pub fn hello(out: &mut Vec<u8>) {
    out.extend_from_slice(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"name\":\"notif-bench\"}\r\n");
}

pub fn subscribe(out: &mut Vec<u8>, topic: &str) {
    // PING after SUB: its PONG says the SUB has been processed.
    out.extend_from_slice(format!("SUB {topic} 1\r\nPING\r\n").as_bytes());
}

pub fn publish(out: &mut Vec<u8>, topic: &str, payload: &[u8]) {
    out.extend_from_slice(format!("PUB {topic} {}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_then_ping() {
        let n = b"MSG a 1 3\r\nabc\r\nPING\r\n";
        let (ev, used) = parse(n).unwrap().unwrap();
        assert!(matches!(ev, Ev::Msg(b"abc")));
        assert!(matches!(parse(&n[used..]).unwrap(), Some((Ev::Ping, 6))));
    }
}
