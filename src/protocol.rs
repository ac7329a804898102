//! Protocol v1: client bytes → lines → commands, and replies → bytes.
//!
//! Pure: no I/O, no logging, no allocation but for an email whose domain needs
//! lowercasing. This is where the unit and property tests of the wire format live.

use std::borrow::Cow;
use std::fmt;

/// The protocol version in the greeting.
pub const VERSION: u32 = 1;

/// Longest event name.
pub const MAX_EVENT: usize = 128;

/// One thing taken from a client's byte stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Framed<'a> {
    /// A whole line, LF removed (a CR before it is still there).
    Line(&'a [u8]),
    /// A line over `max_line` bytes; the rest of it up to its LF is being discarded.
    TooLong,
}

/// Takes the next line from `buf`. Returns what it found (if anything) and how many
/// bytes of `buf` it used; `used == 0` means `buf` holds less than a whole line and
/// must be kept (it is then shorter than `max_line`). `discarding` carries the state of
/// an over-long line between calls.
pub fn take_line<'a>(buf: &'a [u8], max_line: usize, discarding: &mut bool) -> (Option<Framed<'a>>, usize) {
    if *discarding {
        return match memchr(b'\n', buf) {
            Some(i) => {
                *discarding = false;
                (None, i + 1)
            }
            None => (None, buf.len()),
        };
    }
    let window = &buf[..buf.len().min(max_line)];
    match memchr(b'\n', window) {
        Some(i) => (Some(Framed::Line(&buf[..i])), i + 1),
        None if buf.len() >= max_line => {
            *discarding = true;
            (Some(Framed::TooLong), max_line)
        }
        None => (None, 0),
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

/// A client command, borrowing from its line.
#[derive(Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `SUB <event> <email> [SINCE <id>]`.
    Sub {
        /// The event name.
        event: &'a str,
        /// The address, its domain lowercased.
        email: Cow<'a, str>,
        /// Replay what is kept after this id (see *Replay* in notifd-protocol(7)).
        since: Option<u64>,
    },
    /// `UNSUB <event> <email> [<code>]`.
    Unsub {
        /// The event name.
        event: &'a str,
        /// The address, its domain lowercased.
        email: Cow<'a, str>,
        /// The pair's UNSUB code from a notification email, as typed.
        code: Option<&'a str>,
    },
    /// `PUB <event> <text>`.
    Pub {
        /// The event name.
        event: &'a str,
        /// The rest of the line, exactly.
        text: &'a str,
    },
    /// `AUTH <token>`.
    Auth {
        /// The token the client offers.
        token: &'a str,
    },
    /// `LIST <email>`.
    List {
        /// The address, its domain lowercased.
        email: Cow<'a, str>,
    },
    /// `PING [<text>]`.
    Ping {
        /// Echoed in the `PONG`.
        text: Option<&'a str>,
    },
    /// `QUIT`.
    Quit,
    /// `STATS`.
    Stats,
    /// `WATCH <event> [SINCE <id>]`: live delivery with no email, nothing stored.
    Watch {
        /// The event name.
        event: &'a str,
        /// Replay what is kept after this id.
        since: Option<u64>,
    },
    /// `UNWATCH <event>`.
    Unwatch {
        /// The event name.
        event: &'a str,
    },
    /// `CONFIRM <email> <code>`.
    Confirm {
        /// The address, its domain lowercased.
        email: Cow<'a, str>,
        /// The code from the confirmation email, as typed.
        code: &'a str,
    },
    /// `OPTOUT <email> <code>`.
    OptOut {
        /// The address, its domain lowercased.
        email: Cow<'a, str>,
        /// The opt-out code from the confirmation email, as typed.
        code: &'a str,
    },
}

/// The stable error codes of `-ERR <CODE> <text>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Wrong arguments, invalid UTF-8, control characters.
    Syntax,
    /// Unknown verb.
    Unknown,
    /// Line longer than `max_line`.
    TooLong,
    /// Invalid event name.
    Event,
    /// Invalid email address.
    Email,
    /// Not allowed, or a wrong token.
    Auth,
    /// Too many subscriptions on this connection.
    Limit,
    /// The database did not confirm.
    Unavailable,
    /// Server full or shutting down.
    Busy,
}

impl Code {
    /// The code as it goes on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Syntax => "SYNTAX",
            Code::Unknown => "UNKNOWN",
            Code::TooLong => "TOO_LONG",
            Code::Event => "EVENT",
            Code::Email => "EMAIL",
            Code::Auth => "AUTH",
            Code::Limit => "LIMIT",
            Code::Unavailable => "UNAVAILABLE",
            Code::Busy => "BUSY",
        }
    }
}

/// A refused line: the code and a human-readable text (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError {
    /// The code.
    pub code: Code,
    /// The text.
    pub text: Cow<'static, str>,
}

impl ProtoError {
    fn new(code: Code, text: impl Into<Cow<'static, str>>) -> Self {
        ProtoError { code, text: text.into() }
    }
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code.as_str(), self.text)
    }
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Splits off the first word; returns it and the rest with its leading blanks removed.
fn word(s: &str) -> (&str, &str) {
    let s = s.trim_start_matches([' ', '\t']);
    match s.find([' ', '\t']) {
        Some(i) => (&s[..i], s[i..].trim_start_matches([' ', '\t'])),
        None => (s, ""),
    }
}

/// Parses one line (LF removed). `Ok(None)` for a blank line, which gets no reply.
pub fn parse_line(line: &[u8]) -> Result<Option<Command<'_>>, ProtoError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(|&b| is_blank(b)) {
        return Ok(None);
    }
    let Ok(line) = std::str::from_utf8(line) else {
        return Err(ProtoError::new(Code::Syntax, "line is not valid UTF-8"));
    };
    let (verb, rest) = word(line);
    let cmd = if verb.eq_ignore_ascii_case("SUB") {
        let (event, rest) = word(rest);
        let (email, rest) = word(rest);
        if email.is_empty() {
            return Err(ProtoError::new(
                Code::Syntax,
                "SUB takes an event and an email, then SINCE <id> if wanted",
            ));
        }
        let since = since(rest, "SUB takes an event and an email, then SINCE <id> if wanted")?;
        let event = valid_event(event)?;
        let email = valid_email(email.as_bytes()).ok_or_else(bad_email)?;
        Command::Sub { event, email, since }
    } else if verb.eq_ignore_ascii_case("UNSUB") {
        let usage =
            || ProtoError::new(Code::Syntax, "UNSUB takes an event and an email, then a code if wanted");
        let (event, email, code) = match (args::<2>(rest), args::<3>(rest)) {
            (Some([event, email]), _) => (event, email, None),
            (None, Some([event, email, code])) => (event, email, Some(code)),
            _ => return Err(usage()),
        };
        let event = valid_event(event)?;
        let email = valid_email(email.as_bytes()).ok_or_else(bad_email)?;
        Command::Unsub { event, email, code }
    } else if verb.eq_ignore_ascii_case("CONFIRM") || verb.eq_ignore_ascii_case("OPTOUT") {
        let confirm = verb.eq_ignore_ascii_case("CONFIRM");
        let [email, code] = args::<2>(rest).ok_or_else(|| {
            ProtoError::new(
                Code::Syntax,
                if confirm {
                    "CONFIRM takes an email and a code"
                } else {
                    "OPTOUT takes an email and a code"
                },
            )
        })?;
        let email = valid_email(email.as_bytes()).ok_or_else(bad_email)?;
        if confirm {
            Command::Confirm { email, code }
        } else {
            Command::OptOut { email, code }
        }
    } else if verb.eq_ignore_ascii_case("WATCH") {
        let (event, rest) = word(rest);
        if event.is_empty() {
            return Err(ProtoError::new(Code::Syntax, "WATCH takes an event, then SINCE <id> if wanted"));
        }
        let since = since(rest, "WATCH takes an event, then SINCE <id> if wanted")?;
        Command::Watch { event: valid_event(event)?, since }
    } else if verb.eq_ignore_ascii_case("UNWATCH") {
        let [event] =
            args::<1>(rest).ok_or_else(|| ProtoError::new(Code::Syntax, "UNWATCH takes an event"))?;
        Command::Unwatch { event: valid_event(event)? }
    } else if verb.eq_ignore_ascii_case("PUB") {
        let (event, text) = word(rest);
        if event.is_empty() || text.is_empty() {
            return Err(ProtoError::new(Code::Syntax, "PUB takes an event and a text"));
        }
        let event = valid_event(event)?;
        Command::Pub { event, text: valid_text(text)? }
    } else if verb.eq_ignore_ascii_case("AUTH") {
        let [token] = args::<1>(rest).ok_or_else(|| ProtoError::new(Code::Syntax, "AUTH takes a token"))?;
        Command::Auth { token }
    } else if verb.eq_ignore_ascii_case("LIST") {
        let [email] = args::<1>(rest).ok_or_else(|| ProtoError::new(Code::Syntax, "LIST takes an email"))?;
        Command::List { email: valid_email(email.as_bytes()).ok_or_else(bad_email)? }
    } else if verb.eq_ignore_ascii_case("PING") {
        Command::Ping { text: if rest.is_empty() { None } else { Some(valid_text(rest)?) } }
    } else if verb.eq_ignore_ascii_case("QUIT") {
        if !rest.is_empty() {
            return Err(ProtoError::new(Code::Syntax, "QUIT takes no arguments"));
        }
        Command::Quit
    } else if verb.eq_ignore_ascii_case("STATS") {
        if !rest.is_empty() {
            return Err(ProtoError::new(Code::Syntax, "STATS takes no arguments"));
        }
        Command::Stats
    } else {
        let shown: String = verb.chars().filter(|c| !c.is_control()).take(32).collect();
        return Err(ProtoError::new(Code::Unknown, format!("unknown command \"{shown}\"")));
    };
    Ok(Some(cmd))
}

/// The largest id `SINCE` takes: 2^63 − 1, the largest id SQLite stores.
pub const MAX_SINCE: u64 = i64::MAX as u64;

/// What follows a command's own arguments: nothing, or `SINCE <id>` once. `usage` is
/// the text of the `-ERR SYNTAX` for anything else.
fn since(rest: &str, usage: &'static str) -> Result<Option<u64>, ProtoError> {
    let (kw, rest) = word(rest);
    if kw.is_empty() {
        return Ok(None);
    }
    if !kw.eq_ignore_ascii_case("SINCE") {
        return Err(ProtoError::new(Code::Syntax, usage));
    }
    let (id, rest) = word(rest);
    if id.is_empty() {
        return Err(ProtoError::new(Code::Syntax, "SINCE takes an id"));
    }
    // Digits only: no sign, no "+5", no "0x".
    let id = match id.bytes().all(|b| b.is_ascii_digit()).then(|| id.parse::<u64>().ok()).flatten() {
        Some(n) if n <= MAX_SINCE => n,
        _ => return Err(ProtoError::new(Code::Syntax, "SINCE takes an id from 0 to 9223372036854775807")),
    };
    let (next, _) = word(rest);
    if next.eq_ignore_ascii_case("SINCE") {
        return Err(ProtoError::new(Code::Syntax, "SINCE given twice"));
    }
    if !next.is_empty() {
        return Err(ProtoError::new(Code::Syntax, usage));
    }
    Ok(Some(id))
}

/// Exactly `N` blank-separated words, or `None`.
fn args<const N: usize>(mut rest: &str) -> Option<[&str; N]> {
    let mut out = [""; N];
    for slot in out.iter_mut() {
        let (w, r) = word(rest);
        if w.is_empty() {
            return None;
        }
        *slot = w;
        rest = r;
    }
    rest.is_empty().then_some(out)
}

fn bad_email() -> ProtoError {
    ProtoError::new(Code::Email, "invalid email address")
}

/// An event name: 1 to 128 characters from `A-Z a-z 0-9 . _ - :`.
pub fn valid_event(s: &str) -> Result<&str, ProtoError> {
    let ok = !s.is_empty()
        && s.len() <= MAX_EVENT
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if ok {
        Ok(s)
    } else {
        Err(ProtoError::new(Code::Event, "invalid event name: 1 to 128 of A-Z a-z 0-9 . _ - :"))
    }
}

fn valid_text(s: &str) -> Result<&str, ProtoError> {
    if s.chars().any(|c| c.is_control() && c != '\t') {
        Err(ProtoError::new(Code::Syntax, "control characters are not allowed in text"))
    } else {
        Ok(s)
    }
}

/// A mailbox `local@domain` per notifd-protocol(7), with the domain lowercased; `None` if invalid.
pub fn valid_email(s: &[u8]) -> Option<Cow<'_, str>> {
    if s.len() > 254 || !s.is_ascii() {
        return None;
    }
    let at = memchr(b'@', s)?;
    let (local, domain) = (&s[..at], &s[at + 1..]);
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && local.first() != Some(&b'.')
        && local.last() != Some(&b'.')
        && !local.windows(2).any(|w| w == b"..")
        && local.iter().all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~.-".contains(&b));
    let domain_ok = domain.split(|&b| b == b'.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label.first() != Some(&b'-')
            && label.last() != Some(&b'-')
            && label.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-')
    });
    if !(local_ok && domain_ok) {
        return None;
    }
    // ASCII was checked above, so this cannot fail.
    let s = std::str::from_utf8(s).ok()?;
    if domain.iter().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(format!("{}@{}", &s[..at], s[at + 1..].to_ascii_lowercase())))
    } else {
        Some(Cow::Borrowed(s))
    }
}

/// Appends a decimal number without going through `fmt`.
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    let mut buf = itoa::Buffer::new();
    out.extend_from_slice(buf.format(n).as_bytes());
}

/// `HELLO notifd 1 version=… max_line=…`.
pub fn greeting(out: &mut Vec<u8>, max_line: usize) {
    out.extend_from_slice(b"HELLO notifd 1 version=");
    out.extend_from_slice(env!("CARGO_PKG_VERSION").as_bytes());
    out.extend_from_slice(b" max_line=");
    push_u64(out, max_line as u64);
    // Only what this build has; a later ability adds a word.
    out.extend_from_slice(b" abilities=watch,since,confirm,stats\r\n");
}

/// `-ERR <CODE> <text>`.
pub fn err(out: &mut Vec<u8>, code: Code, text: &str) {
    out.extend_from_slice(b"-ERR ");
    out.extend_from_slice(code.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `+OK <what> <arg>` (e.g. `+OK SUB orders`), or `+OK <what>` when `arg` is empty.
pub fn ok(out: &mut Vec<u8>, what: &str, arg: &str) {
    out.extend_from_slice(b"+OK ");
    out.extend_from_slice(what.as_bytes());
    if !arg.is_empty() {
        out.push(b' ');
        out.extend_from_slice(arg.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// `+OK PUB <id> <n>`.
pub fn ok_pub(out: &mut Vec<u8>, id: u64, n: u64) {
    out.extend_from_slice(b"+OK PUB ");
    push_u64(out, id);
    out.push(b' ');
    push_u64(out, n);
    out.extend_from_slice(b"\r\n");
}

/// `PONG` or `PONG <text>`.
pub fn pong(out: &mut Vec<u8>, text: Option<&str>) {
    out.extend_from_slice(b"PONG");
    if let Some(t) = text {
        out.push(b' ');
        out.extend_from_slice(t.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// `MSG <event> <id> <text>`.
pub fn msg(out: &mut Vec<u8>, event: &str, id: u64, text: &str) {
    out.extend_from_slice(b"MSG ");
    out.extend_from_slice(event.as_bytes());
    out.push(b' ');
    push_u64(out, id);
    out.push(b' ');
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `GAP <event> <from> <to>`: ids `from` to `to` may have been deleted by `keep_days`.
pub fn gap(out: &mut Vec<u8>, event: &str, from: u64, to: u64) {
    out.extend_from_slice(b"GAP ");
    out.extend_from_slice(event.as_bytes());
    out.push(b' ');
    push_u64(out, from);
    out.push(b' ');
    push_u64(out, to);
    out.extend_from_slice(b"\r\n");
}

/// `SUB <event> <email> <timestamp>`, a LIST data line; ` pending` after it for a pair
/// not yet confirmed.
pub fn list_line(out: &mut Vec<u8>, event: &str, email: &str, created_at: i64, pending: bool) {
    out.extend_from_slice(b"SUB ");
    out.extend_from_slice(event.as_bytes());
    out.push(b' ');
    out.extend_from_slice(email.as_bytes());
    out.push(b' ');
    out.extend_from_slice(rfc3339(created_at).as_bytes());
    if pending {
        out.extend_from_slice(b" pending");
    }
    out.extend_from_slice(b"\r\n");
}

/// `STAT <name> <value>`, a STATS data line.
pub fn stat_line(out: &mut Vec<u8>, name: &str, value: u64) {
    out.extend_from_slice(b"STAT ");
    out.extend_from_slice(name.as_bytes());
    out.push(b' ');
    push_u64(out, value);
    out.extend_from_slice(b"\r\n");
}

/// Unix seconds as RFC 3339 UTC to the second, `2026-11-28T00:05:09Z`.
pub fn rfc3339(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<Option<Command<'_>>, ProtoError> {
        parse_line(s.as_bytes())
    }

    fn code(s: &str) -> Code {
        parse(s).unwrap_err().code
    }

    #[test]
    fn verbs_are_case_insensitive_and_blanks_separate() {
        let want = Command::Sub { event: "orders.shipped", email: "ana@example.com".into(), since: None };
        assert_eq!(parse("SUB orders.shipped ana@example.com").unwrap(), Some(want));
        let want = Command::Sub { event: "orders.shipped", email: "ana@example.com".into(), since: None };
        assert_eq!(parse("sUb \t orders.shipped  \tana@example.com \r").unwrap(), Some(want));
        assert_eq!(parse("quit").unwrap(), Some(Command::Quit));
        assert_eq!(parse("Ping").unwrap(), Some(Command::Ping { text: None }));
    }

    #[test]
    fn blank_lines_get_no_reply() {
        for s in ["", "\r", "  \t ", " \r"] {
            assert_eq!(parse(s).unwrap(), None);
        }
    }

    #[test]
    fn pub_text_is_the_rest_of_the_line() {
        let c = parse("PUB e  Order 1042  has\tshipped \r").unwrap().unwrap();
        assert_eq!(c, Command::Pub { event: "e", text: "Order 1042  has\tshipped " });
        assert_eq!(code("PUB e"), Code::Syntax);
        assert_eq!(code("PUB e   "), Code::Syntax);
        assert_eq!(code("PUB"), Code::Syntax);
        assert_eq!(code("PUB e a\x01b"), Code::Syntax);
        assert_eq!(code("PUB e a\x7fb"), Code::Syntax);
        assert_eq!(code("PUB bad/event text"), Code::Event);
    }

    #[test]
    fn ping_echoes_its_text() {
        assert_eq!(parse("PING  hello  there").unwrap(), Some(Command::Ping { text: Some("hello  there") }));
        assert_eq!(code("PING a\x1bb"), Code::Syntax);
    }

    #[test]
    fn stats_takes_no_arguments() {
        assert_eq!(parse("stats").unwrap(), Some(Command::Stats));
        assert_eq!(parse("STATS \r").unwrap(), Some(Command::Stats));
        assert_eq!(code("STATS x"), Code::Syntax);
        let mut out = Vec::new();
        stat_line(&mut out, "connections", 12);
        assert_eq!(out, b"STAT connections 12\r\n");
    }

    #[test]
    fn argument_counts() {
        assert_eq!(code("SUB e"), Code::Syntax);
        assert_eq!(code("SUB e a@b c"), Code::Syntax);
        assert_eq!(code("SUB e a@b SINCE 5 x"), Code::Syntax);
        assert_eq!(code("UNSUB e a@b SINCE 5"), Code::Syntax);
        assert_eq!(code("WATCH"), Code::Syntax);
        assert_eq!(code("WATCH e x"), Code::Syntax);
        assert_eq!(code("UNWATCH"), Code::Syntax);
        assert_eq!(code("UNWATCH e f"), Code::Syntax);
        assert_eq!(code("UNWATCH e SINCE 1"), Code::Syntax);
        assert_eq!(code("UNSUB"), Code::Syntax);
        assert_eq!(code("LIST"), Code::Syntax);
        assert_eq!(code("LIST a@b c@d"), Code::Syntax);
        assert_eq!(code("AUTH"), Code::Syntax);
        assert_eq!(code("AUTH a b"), Code::Syntax);
        assert_eq!(code("QUIT now"), Code::Syntax);
        assert_eq!(code("HELO x"), Code::Unknown);
        assert_eq!(code("SUBSCRIBE e a@b"), Code::Unknown);
    }

    #[test]
    fn since_and_watch() {
        let sub = |since| Some(Command::Sub { event: "e", email: "a@b".into(), since });
        assert_eq!(parse("SUB e a@b SINCE 0").unwrap(), sub(Some(0)));
        assert_eq!(parse("sub e a@b since\t 17 \r").unwrap(), sub(Some(17)));
        assert_eq!(parse("SUB e a@b SINCE 9223372036854775807").unwrap(), sub(Some(MAX_SINCE)));
        assert_eq!(parse("WATCH e").unwrap(), Some(Command::Watch { event: "e", since: None }));
        assert_eq!(parse("watch e SINCE 5").unwrap(), Some(Command::Watch { event: "e", since: Some(5) }));
        assert_eq!(parse("UNWATCH e").unwrap(), Some(Command::Unwatch { event: "e" }));
        for bad in [
            "SINCE",
            "SINCE ",
            "SINCE -1",
            "SINCE +1",
            "SINCE x",
            "SINCE 1.5",
            "SINCE 0x10",
            "SINCE 9223372036854775808",
            "SINCE 99999999999999999999999",
            "SINCE 1 SINCE 2",
            "SINCE 1 since 1",
            "SINCE 1 2",
        ] {
            assert_eq!(code(&format!("SUB e a@b {bad}")), Code::Syntax, "SUB {bad}");
            assert_eq!(code(&format!("WATCH e {bad}")), Code::Syntax, "WATCH {bad}");
            assert!(!parse(&format!("SUB e a@b {bad}")).unwrap_err().text.is_empty());
        }
        assert_eq!(code("WATCH bad/event"), Code::Event);
        assert_eq!(code("WATCH bad/event SINCE 1"), Code::Event);
        assert_eq!(code("UNWATCH a*"), Code::Event);
        assert_eq!(code("SUB bad/e a@b SINCE 1"), Code::Event);
        assert_eq!(code("SUB e bad SINCE 1"), Code::Email);
    }

    #[test]
    fn invalid_utf8_is_syntax() {
        assert_eq!(parse_line(b"PUB e \xff\xfe").unwrap_err().code, Code::Syntax);
    }

    #[test]
    fn event_names() {
        let max = "a".repeat(128);
        assert!(valid_event(&max).is_ok());
        assert!(valid_event(&"a".repeat(129)).is_err());
        assert!(valid_event("A-z_0.9:x").is_ok());
        for bad in ["", "a*", "a>", "a/b", "é", "a b"] {
            assert!(valid_event(bad).is_err(), "{bad}");
        }
        assert_eq!(code(&format!("SUB {} a@b", "e".repeat(129))), Code::Event);
    }

    #[test]
    fn email_addresses() {
        assert_eq!(valid_email(b"ana@example.com").unwrap(), "ana@example.com");
        assert_eq!(valid_email(b"Ana@Example.COM").unwrap(), "Ana@example.com");
        assert_eq!(valid_email(b"x@localhost").unwrap(), "x@localhost");
        assert!(valid_email(b"a.b+c!#$%&'*/=?^_`{|}~-@a-b.c").is_some());
        let local64 = format!("{}@b", "a".repeat(64));
        assert!(valid_email(local64.as_bytes()).is_some());
        let local65 = format!("{}@b", "a".repeat(65));
        assert!(valid_email(local65.as_bytes()).is_none());
        let label63 = format!("a@{}", "b".repeat(63));
        assert!(valid_email(label63.as_bytes()).is_some());
        let label64 = format!("a@{}", "b".repeat(64));
        assert!(valid_email(label64.as_bytes()).is_none());
        let long = format!("a@{}.{}.{}.{}", "b".repeat(63), "c".repeat(63), "d".repeat(63), "e".repeat(61));
        assert_eq!(long.len(), 255);
        assert!(valid_email(long.as_bytes()).is_none());
        for bad in [
            "", "a", "@b", "a@", "a@@b", "a@b@c", ".a@b", "a.@b", "a..b@c", "a@b.", "a@.b", "a@-b", "a@b-",
            "a@b..c", "a b@c", "a@b_c", "é@b", "a@bé", "a\"@b", "a(b)@c",
        ] {
            assert!(valid_email(bad.as_bytes()).is_none(), "{bad}");
        }
        assert_eq!(code("SUB e not-an-email"), Code::Email);
        assert_eq!(code("LIST a@"), Code::Email);
    }

    #[test]
    fn take_line_at_the_max_line_boundary() {
        let max = 10;
        let mut d = false;
        // 9 bytes + LF = 10 bytes: fits.
        assert_eq!(take_line(b"123456789\nX", max, &mut d), (Some(Framed::Line(b"123456789")), 10));
        // 8 bytes + CR + LF = 10 bytes: fits.
        assert_eq!(take_line(b"12345678\r\n", max, &mut d), (Some(Framed::Line(b"12345678\r")), 10));
        // 10 bytes + LF = 11 bytes: too long, then the rest up to LF is discarded.
        assert_eq!(take_line(b"1234567890\nok\n", max, &mut d), (Some(Framed::TooLong), 10));
        assert!(d);
        assert_eq!(take_line(b"\nok\n", max, &mut d), (None, 1));
        assert!(!d);
        assert_eq!(take_line(b"ok\n", max, &mut d), (Some(Framed::Line(b"ok")), 3));
        // Incomplete and short: keep it.
        assert_eq!(take_line(b"123456789", max, &mut d), (None, 0));
        // Incomplete and already max_line long: too long at once.
        assert_eq!(take_line(b"1234567890", max, &mut d), (Some(Framed::TooLong), 10));
        assert_eq!(take_line(b"xxxx", max, &mut d), (None, 4));
        assert!(d);
    }

    #[test]
    fn consent_commands_take_an_email_and_a_code() {
        let want = Command::Confirm { email: "Ana@example.com".into(), code: "7kq2-m4xh-9tzb" };
        assert_eq!(parse("confirm Ana@EXAMPLE.com 7kq2-m4xh-9tzb").unwrap(), Some(want));
        let want = Command::OptOut { email: "a@b".into(), code: "X" };
        assert_eq!(parse("OPTOUT a@b X").unwrap(), Some(want));
        let want = Command::Unsub { event: "e", email: "a@b".into(), code: Some("7KQ2M4XH9TZB") };
        assert_eq!(parse("UNSUB e a@b 7KQ2M4XH9TZB").unwrap(), Some(want));
        assert_eq!(
            parse("UNSUB e a@b").unwrap(),
            Some(Command::Unsub { event: "e", email: "a@b".into(), code: None })
        );
        for bad in ["CONFIRM", "CONFIRM a@b", "CONFIRM a@b c d", "OPTOUT a@b", "OPTOUT", "UNSUB e a@b c d"] {
            assert_eq!(code(bad), Code::Syntax, "{bad}");
        }
        assert_eq!(code("CONFIRM nobody 7KQ2M4XH9TZB"), Code::Email);
        assert_eq!(code("OPTOUT a@-b x"), Code::Email);
        assert_eq!(code("UNSUB bad/e a@b 7KQ2M4XH9TZB"), Code::Event);
    }

    #[test]
    fn replies() {
        let mut out = Vec::new();
        err(&mut out, Code::TooLong, "line too long");
        ok(&mut out, "SUB", "e");
        ok(&mut out, "QUIT", "");
        ok_pub(&mut out, 17, 1);
        pong(&mut out, None);
        pong(&mut out, Some("x y"));
        msg(&mut out, "e", 17, "Order 1042");
        list_line(&mut out, "e", "a@b", 1_795_824_309, false);
        list_line(&mut out, "f", "a@b", 1_795_824_309, true);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "-ERR TOO_LONG line too long\r\n+OK SUB e\r\n+OK QUIT\r\n+OK PUB 17 1\r\nPONG\r\nPONG x y\r\n\
             MSG e 17 Order 1042\r\nSUB e a@b 2026-11-28T00:05:09Z\r\n\
             SUB f a@b 2026-11-28T00:05:09Z pending\r\n"
        );
        let mut g = Vec::new();
        greeting(&mut g, 4096);
        assert!(g.starts_with(b"HELLO notifd 1 version="));
        assert!(g.ends_with(b" max_line=4096 abilities=watch,since,confirm,stats\r\n"));
        let mut out = Vec::new();
        gap(&mut out, "e", 1, 500);
        assert_eq!(out, b"GAP e 1 500\r\n");
    }

    proptest! {
        #[test]
        fn arbitrary_lines_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            match parse_line(&bytes) {
                Ok(_) => {}
                Err(e) => prop_assert!(!e.text.is_empty()),
            }
        }

        #[test]
        fn arbitrary_text_lines_never_panic(s in "\\PC{0,80}") {
            let _ = parse(&s);
            let _ = parse(&format!("PUB e {s}"));
            let _ = parse(&format!("SUB {s} a@b"));
            let _ = parse(&format!("SUB e {s}"));
        }

        #[test]
        fn since_takes_every_id_up_to_2_63_and_nothing_else(id in any::<u64>(), junk in "[^0-9 \t\r\n]{1,5}") {
            let (watch, sub) = (format!("WATCH e SINCE {id}"), format!("SUB e a@b SINCE {id}"));
            let got = parse(&watch);
            if id <= MAX_SINCE {
                prop_assert_eq!(got.unwrap(), Some(Command::Watch { event: "e", since: Some(id) }));
                prop_assert_eq!(parse(&sub).unwrap(), Some(Command::Sub { event: "e", email: "a@b".into(), since: Some(id) }));
            } else {
                prop_assert_eq!(got.unwrap_err().code, Code::Syntax);
            }
            let bad = format!("WATCH e SINCE {junk}{id}");
            prop_assert_eq!(parse(&bad).unwrap_err().code, Code::Syntax);
        }

        #[test]
        fn pub_round_trips(event in "[A-Za-z0-9._:-]{1,128}", text in "[^\\p{Cc}]*[^\\p{Cc}\\s]") {
            let line = format!("PUB {event} {text}");
            let got = parse(&line).unwrap().unwrap();
            prop_assert_eq!(got, Command::Pub { event: &event, text: text.trim_start_matches([' ', '\t']) });
        }

        #[test]
        fn framing_never_holds_more_than_max_line(
            chunks in proptest::collection::vec(proptest::collection::vec(prop_oneof![Just(b'\n'), any::<u8>()], 0..50), 0..20),
            max in 2usize..40,
        ) {
            let mut held: Vec<u8> = Vec::new();
            let mut d = false;
            for c in chunks {
                held.extend_from_slice(&c);
                loop {
                    let (item, used) = take_line(&held, max, &mut d);
                    if let Some(Framed::Line(l)) = item {
                        prop_assert!(l.len() < max);
                    }
                    if used == 0 { break; }
                    held.drain(..used);
                }
                prop_assert!(held.len() < max);
            }
        }
    }
}
