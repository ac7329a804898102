//! Client bytes as they come off a socket: framed by `take_line` at any `max_line` and
//! any split into reads, then every whole line through `parse_line`.
//!
//! Input: byte 0 picks `max_line` (1..=256, small so that both sides of the bound are
//! reached), byte 1 the size of each read, the rest is the stream.

#![no_main]

use libfuzzer_sys::fuzz_target;
use notifd::protocol::{parse_line, take_line, valid_email, valid_event, Command, Framed};

/// What framing must yield, worked out on the whole stream at once: each LF-ended
/// segment is a line if it fits in `max_line` with its LF, else one TooLong; an
/// unfinished tail is one TooLong once it reaches `max_line`, else nothing yet.
fn expected(stream: &[u8], max_line: usize) -> Vec<Option<&[u8]>> {
    let mut out = Vec::new();
    let mut segments = stream.split(|&b| b == b'\n').peekable();
    while let Some(s) = segments.next() {
        let ended = segments.peek().is_some();
        if ended {
            out.push((s.len() < max_line).then_some(s));
        } else if s.len() >= max_line {
            out.push(None);
        }
    }
    out
}

fn check_command(cmd: &Command<'_>) {
    let text_ok = |t: &str| !t.is_empty() && !t.chars().any(|c| c.is_control() && c != '\t');
    match cmd {
        Command::Sub { event, email, .. } | Command::Unsub { event, email, .. } => {
            assert!(valid_event(event).is_ok());
            assert_eq!(valid_email(email.as_bytes()).as_deref(), Some(&**email));
        }
        Command::Pub { event, text, .. } => {
            assert!(valid_event(event).is_ok());
            assert!(text_ok(text));
        }
        Command::Auth { token, .. } => assert!(!token.is_empty() && !token.contains([' ', '\t'])),
        Command::List { email, .. } => assert_eq!(valid_email(email.as_bytes()).as_deref(), Some(&**email)),
        Command::Ping { text, .. } => assert!(text.is_none_or(text_ok)),
        Command::Quit => {}
        // Verbs added later parse without panicking; what they hold is checked by their
        // unit tests until an arm is added here.
        #[allow(unreachable_patterns)]
        _ => {}
    }
}

fn parse(line: &[u8]) {
    match parse_line(line) {
        Ok(Some(cmd)) => check_command(&cmd),
        Ok(None) => {
            assert!(line.strip_suffix(b"\r").unwrap_or(line).iter().all(|&b| b == b' ' || b == b'\t'))
        }
        Err(e) => assert!(!e.text.is_empty() && !e.text.contains(['\r', '\n'])),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&[max, read], stream)) = data.split_first_chunk::<2>() else { return };
    let max_line = max as usize + 1;
    let read = read as usize % 64 + 1;

    // The reactor's loop: append a read, take lines until none is whole.
    let mut held: Vec<u8> = Vec::new();
    let mut discarding = false;
    let mut got: Vec<Option<Vec<u8>>> = Vec::new();
    for chunk in stream.chunks(read) {
        held.extend_from_slice(chunk);
        loop {
            let (item, used) = take_line(&held, max_line, &mut discarding);
            assert!(used <= held.len());
            match item {
                Some(Framed::Line(l)) => {
                    assert!(l.len() < max_line);
                    assert!(!l.contains(&b'\n'));
                    parse(l);
                    got.push(Some(l.to_vec()));
                }
                Some(Framed::TooLong) => got.push(None),
                None => {}
            }
            if used == 0 {
                break;
            }
            held.drain(..used);
        }
        assert!(held.len() < max_line, "held {} bytes with max_line {max_line}", held.len());
    }
    let want = expected(stream, max_line);
    let got: Vec<Option<&[u8]>> = got.iter().map(|l| l.as_deref()).collect();
    assert_eq!(got, want);

    parse(stream);
});
