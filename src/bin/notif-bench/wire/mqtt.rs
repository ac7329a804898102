//! MQTT 3.1.1 at QoS 0: `CONNECT`/`CONNACK`, `SUBSCRIBE`/`SUBACK`, `PUBLISH`, in binary
//! control packets with a variable-length remaining length.

use super::Ev;

/// One control packet.
pub fn parse(buf: &[u8]) -> Result<Option<(Ev<'_>, usize)>, String> {
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

/// A fixed header (`first` and the remaining length) followed by `body`.
fn packet(out: &mut Vec<u8>, first: u8, body: &[u8]) {
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

/// A length-prefixed UTF-8 string.
fn string(body: &mut Vec<u8>, s: &[u8]) {
    body.extend_from_slice(&(s.len() as u16).to_be_bytes());
    body.extend_from_slice(s);
}

/// `CONNECT` with a client id of its own: the broker drops an older session of the same id.
pub fn hello(out: &mut Vec<u8>, client_id: usize) {
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.push(4); // protocol level 3.1.1
    body.push(0x02); // clean session
    body.extend_from_slice(&0u16.to_be_bytes()); // no keepalive
    string(&mut body, format!("nb{}x{client_id}", std::process::id()).as_bytes());
    packet(out, 0x10, &body);
}

pub fn subscribe(out: &mut Vec<u8>, topic: &str) {
    let mut body = Vec::new();
    body.extend_from_slice(&1u16.to_be_bytes());
    string(&mut body, topic.as_bytes());
    body.push(0); // QoS 0
    packet(out, 0x82, &body);
}

pub fn publish(out: &mut Vec<u8>, topic: &str, payload: &[u8]) {
    let mut body = Vec::with_capacity(2 + topic.len() + payload.len());
    string(&mut body, topic.as_bytes());
    body.extend_from_slice(payload);
    packet(out, 0x30, &body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_roundtrip() {
        let mut m = Vec::new();
        publish(&mut m, "t", b"hello");
        let (ev, used) = parse(&m).unwrap().unwrap();
        assert!(matches!(ev, Ev::Msg(b"hello")));
        assert_eq!(used, m.len());
    }
}
