//! notifd's line protocol (notifd-protocol(7)): `SUB`, `PUB`, and the replies and `MSG`
//! lines they bring back. The server greets first; the client says nothing before its
//! commands.

use super::{line, Ev};

/// One line: a `MSG`'s text, a reply, or the greeting.
pub fn parse(buf: &[u8]) -> Option<(Ev<'_>, usize)> {
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

/// `SUB`, for a subscriber address of its own.
pub fn subscribe(out: &mut Vec<u8>, topic: &str, who: usize) {
    out.extend_from_slice(format!("SUB {topic} s{who}@bench.example\r\n").as_bytes());
}

pub fn publish(out: &mut Vec<u8>, topic: &str, payload: &[u8]) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(topic.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_text() {
        let l = b"MSG ev 17 some text here\r\n";
        assert!(matches!(parse(l), Some((Ev::Msg(b"some text here"), 26))));
    }
}
