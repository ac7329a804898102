//! Redis pub/sub over RESP: `SUBSCRIBE` and `PUBLISH` as arrays of bulk strings; the
//! server says nothing until asked.

use super::{line, Ev};

/// The part of RESP that pub/sub uses: simple strings, errors, integers, bulk strings
/// and arrays of those.
pub fn parse(buf: &[u8]) -> Result<Option<(Ev<'_>, usize)>, String> {
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

pub fn subscribe(out: &mut Vec<u8>, topic: &str) {
    out.extend_from_slice(format!("*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{topic}\r\n", topic.len()).as_bytes());
}

pub fn publish(out: &mut Vec<u8>, topic: &str, payload: &[u8]) {
    out.extend_from_slice(
        format!("*3\r\n$7\r\nPUBLISH\r\n${}\r\n{topic}\r\n${}\r\n", topic.len(), payload.len()).as_bytes(),
    );
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_then_integer() {
        let r = b"*3\r\n$7\r\nmessage\r\n$1\r\nx\r\n$3\r\nabc\r\n:1\r\n";
        let (ev, used) = parse(r).unwrap().unwrap();
        assert!(matches!(ev, Ev::Msg(b"abc")));
        assert!(matches!(parse(&r[used..]).unwrap(), Some((Ev::Ack, 4))));
        assert!(parse(&r[..10]).unwrap().is_none());
    }
}
