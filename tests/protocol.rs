//! Protocol v1 over real TCP: every verb and every error code of PROTOCOL.md, with edge
//! cases, pipelining order, end of input, limits and slow consumers.

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use util::{check_err, is_rfc3339_utc, parse_ok_pub, publish, Client, Daemon, WAIT};

#[test]
fn greeting_names_the_protocol_and_announces_keys() {
    let d = Daemon::start("max_line = 100");
    let c = d.client();
    let words: Vec<&str> = c.greeting.split(' ').collect();
    assert_eq!(&words[..3], ["HELLO", "notifd", "1"], "greeting {:?}", c.greeting);
    for w in &words[3..] {
        assert!(w.contains('=') && !w.starts_with('='), "greeting token {w:?} is not key=value");
    }
    assert!(words.contains(&"max_line=100"), "greeting {:?} does not announce max_line", c.greeting);
}

#[test]
fn ping_quit_and_case_insensitive_verbs() {
    let d = Daemon::start("");
    let mut c = d.client();
    c.cmd("PING");
    c.expect("PONG");
    c.cmd("ping");
    c.expect("PONG");
    c.cmd("PiNg  hello   world ");
    // The text is the rest of the line after the blanks that follow the verb.
    c.expect("PONG hello   world ");
    c.cmd("PING a\tb");
    c.expect("PONG a\tb");
    c.cmd("Sub ev.1 a@b");
    c.expect("+OK SUB ev.1");
    c.cmd("uNsUb ev.1 a@b");
    c.expect("+OK UNSUB ev.1");
    c.cmd("pub ev.1 x");
    parse_ok_pub(&c.line());
    c.cmd("list a@b");
    c.expect("+OK LIST 0");
    // Arguments separated by several spaces and tabs.
    c.send("SUB \t ev.2\t\t a@b\r\n");
    c.expect("+OK SUB ev.2");
    // LF alone ends a line too.
    c.send("PING lf\n");
    c.expect("PONG lf");
    c.cmd("Quit");
    c.expect("+OK QUIT");
    c.expect_eof();
}

#[test]
fn quit_ignores_what_follows_it() {
    let d = Daemon::start("");
    let mut c = d.client();
    c.send("PING 1\r\nQUIT\r\nPING 2\r\nSUB e a@b\r\n");
    c.expect("PONG 1");
    c.expect("+OK QUIT");
    c.expect_eof();
}

#[test]
fn blank_lines_get_no_reply() {
    let d = Daemon::start("");
    let mut c = d.client();
    c.send("\r\n\n   \r\n\t \t\n \r\nPING after\r\n");
    c.expect("PONG after");
    assert!(c.sync().is_empty());
}

#[test]
fn unknown_verbs_and_wrong_argument_counts() {
    let d = Daemon::start("");
    let mut c = d.client();
    for line in ["FOO", "SUBX e a@b", "HELLO", "MSG e 1 x", "+OK", "S\u{e9}B e a@b"] {
        c.cmd(line);
        c.expect_err("UNKNOWN");
    }
    for line in [
        "SUB",
        "SUB e",
        "SUB e a@b SINCE",
        "SUB e a@b extra",
        "UNSUB",
        "UNSUB e",
        // A third word is an UNSUB code (notifd-protocol(7), UNSUB); a fourth is one too many.
        "UNSUB e a@b c d",
        "PUB",
        "PUB e",
        "PUB e   ",
        "AUTH",
        "AUTH a b",
        "LIST",
        "LIST a@b c@d",
        "QUIT now",
    ] {
        c.cmd(line);
        let got = c.line();
        check_err(&got, "SYNTAX");
    }
    // Nothing of it took effect, and the connection goes on.
    c.cmd("LIST a@b");
    c.expect("+OK LIST 0");
    c.cmd("PING still here");
    c.expect("PONG still here");
}

#[test]
fn event_names() {
    let d = Daemon::start("");
    let mut c = d.client();
    let longest = "e".repeat(128);
    for ev in ["a", "A.b_c-d:e", "0", longest.as_str(), "orders.shipped"] {
        c.cmd(&format!("SUB {ev} a@b"));
        c.expect(&format!("+OK SUB {ev}"));
    }
    let too_long = "e".repeat(129);
    for ev in [too_long.as_str(), "a*", "a>b", "*", ">", "a/b", "a,b", "\u{e9}v", "a@b", "a+b", "a#"] {
        c.cmd(&format!("SUB {ev} a@b"));
        c.expect_err("EVENT");
        c.cmd(&format!("UNSUB {ev} a@b"));
        c.expect_err("EVENT");
        c.cmd(&format!("PUB {ev} text"));
        c.expect_err("EVENT");
    }
    // Case-sensitive: "Orders" is another event than "orders".
    let mut p = d.client();
    c.cmd("SUB orders x@y");
    c.expect("+OK SUB orders");
    let (_, n) = publish(&mut p, "Orders", "upper");
    assert_eq!(n, 0);
    let (id, n) = publish(&mut p, "orders", "lower");
    assert_eq!(n, 1);
    c.expect(&format!("MSG orders {id} lower"));
}

#[test]
fn email_syntax() {
    let d = Daemon::start("");
    let mut c = d.client();
    let local64 = "l".repeat(64);
    let label63 = "d".repeat(63);
    // 64 + 1 + (63 + 1 + 63 + 1 + 61) = 254 bytes, every part at or under its own limit.
    let long_domain = format!("{label63}.{label63}.{}", "x".repeat(61));
    let addr254 = format!("{local64}@{long_domain}");
    assert_eq!(addr254.len(), 254);
    let addr255 = format!("{local64}@{long_domain}x");
    let good = [
        "a@b".to_string(),
        "a@localhost".into(),
        "first.last@example.com".into(),
        "!#$%&'*+/=?^_`{|}~-@x.y".into(),
        "a-b@c-d.e-f".into(),
        format!("{local64}@b"),
        format!("a@{label63}.com"),
        addr254.clone(),
        "0@0".into(),
    ];
    for e in &good {
        c.cmd(&format!("SUB ev {e}"));
        c.expect("+OK SUB ev");
    }
    let local65 = "l".repeat(65);
    let label64 = "d".repeat(64);
    let bad = [
        "ab".to_string(),
        "@b".into(),
        "a@".into(),
        "a@@b".into(),
        "a@b@c".into(),
        ".a@b".into(),
        "a.@b".into(),
        "a..b@c".into(),
        "a@-b".into(),
        "a@b-".into(),
        "a@b.".into(),
        "a@.b".into(),
        "a@b..c".into(),
        "a@b_c".into(),
        "a(b)@c".into(),
        "a\"b@c".into(),
        "\u{e9}@b".into(),
        "a@\u{e9}.com".into(),
        format!("{local65}@b"),
        format!("a@{label64}.com"),
        addr255,
    ];
    for e in &bad {
        c.cmd(&format!("SUB ev {e}"));
        c.expect_err("EMAIL");
        c.cmd(&format!("UNSUB ev {e}"));
        c.expect_err("EMAIL");
        c.cmd(&format!("LIST {e}"));
        c.expect_err("EMAIL");
    }
}

#[test]
fn domain_is_lowercased_local_part_kept() {
    let d = Daemon::start("");
    let mut c = d.client();
    c.cmd("SUB ev Ana.Maria@Example.COM");
    c.expect("+OK SUB ev");
    // The same address, spelled with another case in the domain.
    c.cmd("SUB ev2 Ana.Maria@EXAMPLE.com");
    c.expect("+OK SUB ev2");
    c.cmd("LIST Ana.Maria@example.COM");
    let l1 = c.line();
    let l2 = c.line();
    c.expect("+OK LIST 2");
    for (l, ev) in [(l1, "ev"), (l2, "ev2")] {
        let w: Vec<&str> = l.split(' ').collect();
        assert_eq!(w.len(), 4, "{l:?}");
        assert_eq!(&w[..3], ["SUB", ev, "Ana.Maria@example.com"], "{l:?}");
        assert!(is_rfc3339_utc(w[3]), "timestamp in {l:?}");
    }
    // The local part is case-sensitive: another address.
    c.cmd("LIST ana.maria@example.com");
    c.expect("+OK LIST 0");
    // UNSUB with the domain in another case removes the same live and stored pair.
    c.cmd("UNSUB ev ana.maria@x");
    c.expect("+OK UNSUB ev");
    c.cmd("UNSUB ev Ana.Maria@eXample.com");
    c.expect("+OK UNSUB ev");
    c.cmd("LIST Ana.Maria@Example.Com");
    let l = c.line();
    assert!(l.starts_with("SUB ev2 Ana.Maria@example.com "), "{l:?}");
    c.expect("+OK LIST 1");
}

#[test]
fn list_is_ordered_by_event_bytes_with_timestamps() {
    let d = Daemon::start("");
    let mut c = d.client();
    for ev in ["b", "B", "a", "_x", "a.b", "a-b", "1", ":"] {
        c.cmd(&format!("SUB {ev} who@x.org"));
        c.expect(&format!("+OK SUB {ev}"));
    }
    c.cmd("SUB other who2@x.org");
    c.expect("+OK SUB other");
    let before = std::time::SystemTime::now();
    c.cmd("LIST who@x.org");
    let mut events = Vec::new();
    loop {
        let l = c.line();
        if l.starts_with("+OK LIST ") {
            assert_eq!(l, "+OK LIST 8");
            break;
        }
        let w: Vec<&str> = l.split(' ').collect();
        assert_eq!(w.len(), 4, "{l:?}");
        assert_eq!((w[0], w[2]), ("SUB", "who@x.org"), "{l:?}");
        assert!(is_rfc3339_utc(w[3]), "timestamp in {l:?}");
        // When the SUB was made: now, not 1970 or a time in milliseconds.
        let at = humantime::parse_rfc3339(w[3]).unwrap_or_else(|e| panic!("{l:?}: {e}"));
        let age = std::time::SystemTime::now().duration_since(at).unwrap_or_default();
        assert!(age < Duration::from_secs(120) && at <= before + Duration::from_secs(1), "{l:?}");
        events.push(w[1].to_string());
    }
    let mut sorted = events.clone();
    sorted.sort();
    assert_eq!(events, sorted, "LIST must be in byte order");
    assert_eq!(events, ["1", ":", "B", "_x", "a", "a-b", "a.b", "b"]);
}

#[test]
fn max_line_boundary_and_too_long() {
    let d = Daemon::start("max_line = 64");
    let mut c = d.client();
    assert!(c.greeting.split(' ').any(|w| w == "max_line=64"), "{}", c.greeting);
    // 5 ("PING ") + 57 + 2 (CRLF) = 64 bytes: accepted.
    let t57 = "x".repeat(57);
    c.send(&format!("PING {t57}\r\n"));
    c.expect(&format!("PONG {t57}"));
    // 64 bytes with a bare LF: accepted.
    let t58 = "y".repeat(58);
    c.send(&format!("PING {t58}\n"));
    c.expect(&format!("PONG {t58}"));
    // 65 bytes: refused, and the connection goes on.
    c.send(&format!("PING {t58}\r\n"));
    let text = c.expect_err("TOO_LONG");
    assert!(!text.is_empty());
    c.cmd("PING after");
    c.expect("PONG after");
    // A very long line, sent in pieces: one error, then the next line works.
    c.send(&"z".repeat(5000));
    c.send(&"z".repeat(5000));
    c.send("\r\nPING again\r\n");
    c.expect_err("TOO_LONG");
    c.expect("PONG again");
    // The over-long line is dropped whole: its tail is not taken as a command.
    let mut sneaky = "PING ".to_string();
    sneaky.push_str(&"w".repeat(70));
    sneaky.push_str(" QUIT\r\nPING ok\r\n");
    c.send(&sneaky);
    c.expect_err("TOO_LONG");
    c.expect("PONG ok");
    // A SUB at the boundary is a command like any other.
    let ev = "e".repeat(64 - "SUB  a@b\r\n".len());
    let line = format!("SUB {ev} a@b\r\n");
    assert_eq!(line.len(), 64);
    c.send(&line);
    c.expect(&format!("+OK SUB {ev}"));
    assert!(c.sync().is_empty());
}

#[test]
fn invalid_utf8_is_syntax_and_the_connection_goes_on() {
    let d = Daemon::start("");
    let mut c = d.client();
    c.send_bytes(b"PING \xff\xfe\r\n");
    c.expect_err("SYNTAX");
    c.send_bytes(b"PUB ev caf\xc3\r\n");
    c.expect_err("SYNTAX");
    c.send_bytes(b"\xc0\xafSUB ev a@b\r\n");
    c.expect_err("SYNTAX");
    c.send_bytes(b"SUB ev a@b\xed\xa0\x80\r\n");
    c.expect_err("SYNTAX");
    c.cmd("PING fine");
    c.expect("PONG fine");
    // Valid multi-byte UTF-8 in text is kept as sent.
    c.cmd("PING caf\u{e9} \u{1f600}");
    c.expect("PONG caf\u{e9} \u{1f600}");
}

#[test]
fn control_characters_in_text_are_refused() {
    let d = Daemon::start("");
    let mut c = d.client();
    let mut s = d.client();
    s.cmd("SUB ev a@b");
    s.expect("+OK SUB ev");
    for bad in ["a\u{1}b", "\u{7}", "a\u{0}b", "x\u{1b}[31m", "a\u{7f}", "a\rb", "a\u{85}b", "a\u{c}"] {
        c.send(&format!("PING {bad}\r\n"));
        c.expect_err("SYNTAX");
        c.send(&format!("PUB ev {bad}\r\n"));
        c.expect_err("SYNTAX");
    }
    // A tab is allowed, in PUB too, and kept.
    let (id, n) = publish(&mut c, "ev", "a\tb  c");
    assert_eq!(n, 1);
    // None of the refused PUBs reached the subscriber.
    s.expect(&format!("MSG ev {id} a\tb  c"));
    assert!(s.sync().is_empty());
}

#[test]
fn pub_text_is_kept_exactly() {
    let d = Daemon::start("");
    let mut c = d.client();
    c.cmd("SUB ev a@b");
    c.expect("+OK SUB ev");
    c.send("PUB ev    Order 1042   has\tshipped  \r\n");
    let m = c.line();
    let (id, n) = parse_ok_pub(&c.line());
    assert_eq!(n, 1);
    assert_eq!(m, format!("MSG ev {id} Order 1042   has\tshipped  "));
    // Only spaces and tabs separate arguments: other Unicode spaces are part of the text.
    c.send("PUB ev \u{2000}\u{3000}wide\u{a0}\r\n");
    let m = c.line();
    let (id, _) = parse_ok_pub(&c.line());
    assert_eq!(m, format!("MSG ev {id} \u{2000}\u{3000}wide\u{a0}"));
}

#[test]
fn msg_goes_to_every_live_subscriber_and_the_publisher() {
    let d = Daemon::start("");
    let mut a = d.client();
    let mut b = d.client();
    let mut p = d.client();
    let mut other = d.client();
    a.cmd("SUB orders.shipped ana@example.com");
    a.expect("+OK SUB orders.shipped");
    b.cmd("SUB orders.shipped bob@example.com");
    b.expect("+OK SUB orders.shipped");
    p.cmd("SUB orders.shipped pub@example.com");
    p.expect("+OK SUB orders.shipped");
    other.cmd("SUB orders.other ana@example.com");
    other.expect("+OK SUB orders.other");
    p.cmd("PUB orders.shipped Order 1042 has shipped");
    // The MSG goes out at once; the +OK waits for the commit.
    let m = p.line();
    let (id, n) = parse_ok_pub(&p.line());
    assert_eq!(n, 3);
    let want = format!("MSG orders.shipped {id} Order 1042 has shipped");
    assert_eq!(m, want);
    a.expect(&want);
    b.expect(&want);
    assert!(other.sync().is_empty(), "a subscriber of another event got the MSG");
    // Ids increase.
    let (id2, n2) = publish(&mut other, "orders.shipped", "second");
    assert!(id2 > id);
    assert_eq!(n2, 3);
    for c in [&mut a, &mut b, &mut p] {
        c.expect(&format!("MSG orders.shipped {id2} second"));
    }
    // Nobody subscribed: n is 0.
    let (id3, n3) = publish(&mut p, "nobody.listens", "x");
    assert!(id3 > id2);
    assert_eq!(n3, 0);
    // A subscriber that left is not counted.
    drop(b);
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, n) = publish(&mut other, "orders.shipped", "after");
        if n == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "a closed connection is still counted");
    }
}

#[test]
fn one_msg_per_connection_even_with_several_emails() {
    let d = Daemon::start("");
    let mut a = d.client();
    a.cmd("SUB ev one@x");
    a.expect("+OK SUB ev");
    a.cmd("SUB ev two@x");
    a.expect("+OK SUB ev");
    let mut p = d.client();
    let (id, n) = publish(&mut p, "ev", "hi");
    assert_eq!(n, 1);
    a.expect(&format!("MSG ev {id} hi"));
    assert!(a.sync().is_empty(), "one MSG per connection");
}

#[test]
fn pipelined_sub_then_pub_delivers() {
    let d = Daemon::start("");
    let mut c = d.client();
    c.send("SUB ev a@b\r\nPUB ev hello\r\n");
    let mut lines = vec![c.line(), c.line(), c.line()];
    let okpub = lines.iter().position(|l| l.starts_with("+OK PUB ")).expect("+OK PUB");
    let (id, n) = parse_ok_pub(&lines.remove(okpub));
    assert_eq!(n, 1);
    lines.sort();
    assert_eq!(lines, ["+OK SUB ev".to_string(), format!("MSG ev {id} hello")]);
}

#[test]
fn unsub_ends_live_delivery_only_for_that_pair_and_connection() {
    let d = Daemon::start("");
    let mut x = d.client();
    let mut y = d.client();
    let mut p = d.client();
    x.cmd("SUB ev a@x");
    x.expect("+OK SUB ev");
    x.cmd("SUB ev b@x");
    x.expect("+OK SUB ev");
    y.cmd("SUB ev a@x");
    y.expect("+OK SUB ev");
    // X drops a@x but still holds b@x: it keeps receiving ev.
    x.cmd("UNSUB ev a@x");
    x.expect("+OK UNSUB ev");
    let (id, n) = publish(&mut p, "ev", "one");
    assert_eq!(n, 2);
    x.expect(&format!("MSG ev {id} one"));
    y.expect(&format!("MSG ev {id} one"));
    // Y's live subscription of a@x was not touched, although the stored one is gone.
    p.cmd("LIST a@x");
    p.expect("+OK LIST 0");
    // X drops b@x too: no more ev for X.
    x.cmd("UNSUB ev b@x");
    x.expect("+OK UNSUB ev");
    let (id, n) = publish(&mut p, "ev", "two");
    assert_eq!(n, 1);
    y.expect(&format!("MSG ev {id} two"));
    assert!(x.sync().is_empty(), "X still got a MSG after UNSUB");
    // UNSUB of something never subscribed is fine.
    x.cmd("UNSUB never z@z");
    x.expect("+OK UNSUB never");
    // UNSUB takes effect from the moment it is read: UNSUB then PUB, pipelined.
    y.send("UNSUB ev a@x\r\nPUB ev three\r\n");
    y.expect("+OK UNSUB ev");
    let (_, n) = parse_ok_pub(&y.line());
    assert_eq!(n, 0);
    assert!(y.sync().is_empty());
}

#[test]
fn repeated_sub_is_fine_and_keeps_one_row() {
    let d = Daemon::start("");
    let mut c = d.client();
    for _ in 0..3 {
        c.cmd("SUB ev a@b");
        c.expect("+OK SUB ev");
    }
    c.cmd("LIST a@b");
    assert!(c.line().starts_with("SUB ev a@b "));
    c.expect("+OK LIST 1");
    let mut p = d.client();
    let (id, n) = publish(&mut p, "ev", "once");
    assert_eq!(n, 1);
    c.expect(&format!("MSG ev {id} once"));
    assert!(c.sync().is_empty());
}

#[test]
fn max_subs_per_conn() {
    let d = Daemon::start("max_subs_per_conn = 3");
    let mut c = d.client();
    for ev in ["e1", "e2", "e3"] {
        c.cmd(&format!("SUB {ev} a@b"));
        c.expect(&format!("+OK SUB {ev}"));
    }
    // A repeated SUB does not count twice.
    c.cmd("SUB e1 a@b");
    c.expect("+OK SUB e1");
    c.cmd("SUB e4 a@b");
    c.expect_err("LIMIT");
    c.cmd("SUB e1 other@b");
    c.expect_err("LIMIT");
    // Refused: neither live nor stored.
    let mut p = d.client();
    let (_, n) = publish(&mut p, "e4", "x");
    assert_eq!(n, 0);
    p.cmd("LIST a@b");
    for ev in ["e1", "e2", "e3"] {
        assert!(p.line().starts_with(&format!("SUB {ev} a@b ")));
    }
    p.expect("+OK LIST 3");
    // UNSUB frees a slot.
    c.cmd("UNSUB e2 a@b");
    c.expect("+OK UNSUB e2");
    c.cmd("SUB e4 a@b");
    c.expect("+OK SUB e4");
    c.cmd("SUB e5 a@b");
    c.expect_err("LIMIT");
    // An UNSUB of a pair not held frees nothing.
    c.cmd("UNSUB e9 a@b");
    c.expect("+OK UNSUB e9");
    c.cmd("SUB e5 a@b");
    c.expect_err("LIMIT");
    // The limit is per connection.
    let mut c2 = d.client();
    c2.cmd("SUB e5 a@b");
    c2.expect("+OK SUB e5");
    let (id, n) = publish(&mut p, "e4", "y");
    assert_eq!(n, 1);
    c.expect(&format!("MSG e4 {id} y"));
}

#[test]
fn auth_with_publish_token() {
    let d = Daemon::start("publish_token = \"s3cret-token\"");
    let mut s = d.client();
    // Untrusted: the subscription is stored pending (notifd-protocol(7), *Trust*).
    s.cmd("SUB ev a@b");
    s.expect("+OK SUB ev pending");
    let mut c = d.client();
    // Loopback is not enough once a token is set.
    c.cmd("PUB ev nope");
    c.expect_err("AUTH");
    c.cmd("LIST a@b");
    c.expect_err("AUTH");
    c.cmd("AUTH wrong");
    c.expect_err("AUTH");
    c.cmd("PUB ev nope");
    c.expect_err("AUTH");
    c.cmd("AUTH s3cret-token");
    c.expect("+OK AUTH");
    let (id, n) = publish(&mut c, "ev", "yes");
    assert_eq!(n, 1);
    s.expect(&format!("MSG ev {id} yes"));
    c.cmd("LIST a@b");
    let l = c.line();
    assert!(l.starts_with("SUB ev a@b ") && l.ends_with(" pending"), "{l}");
    c.expect("+OK LIST 1");
    // SUB, UNSUB and PING need no AUTH; an untrusted UNSUB says so.
    s.cmd("UNSUB ev a@b");
    s.expect("+OK UNSUB ev live");
    assert!(s.sync().is_empty(), "the refused PUBs must not have been delivered");
}

#[test]
fn three_failed_auths_close_the_connection() {
    let d = Daemon::start("publish_token = \"tok\"");
    let mut c = d.client();
    c.cmd("AUTH a");
    c.expect_err("AUTH");
    c.cmd("AUTH b");
    c.expect_err("AUTH");
    c.cmd("AUTH c");
    c.expect_err("AUTH");
    c.expect_eof();
    // A good AUTH in between resets nothing for others, and a fresh connection starts over.
    let mut c = d.client();
    c.send("AUTH x\r\nAUTH y\r\nAUTH tok\r\nPING\r\n");
    c.expect_err("AUTH");
    c.expect_err("AUTH");
    c.expect("+OK AUTH");
    c.expect("PONG");
    // Pipelined failures: the commands after the third are not answered.
    let mut c = d.client();
    c.send("AUTH 1\r\nAUTH 2\r\nAUTH 3\r\nPING\r\n");
    c.expect_err("AUTH");
    c.expect_err("AUTH");
    c.expect_err("AUTH");
    c.expect_eof();
}

#[test]
fn without_token_loopback_may_publish_and_auth_fails() {
    let d = Daemon::start("");
    let mut c = d.client();
    let (id, n) = publish(&mut c, "ev", "x");
    assert!(id > 0);
    assert_eq!(n, 0);
    c.cmd("LIST a@b");
    c.expect("+OK LIST 0");
    c.cmd("AUTH anything");
    c.expect_err("AUTH");
    c.cmd("AUTH \"\"");
    c.expect_err("AUTH");
}

/// A non-loopback address of this machine, if it has one.
fn non_loopback_v4() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn without_token_only_loopback_may_publish_or_list() {
    let Some(ip) = non_loopback_v4() else {
        util::skip(
            "without_token_only_loopback_may_publish_or_list",
            "this machine has no non-loopback IPv4 address",
        );
        return;
    };
    let d = Daemon::start("host = \"0.0.0.0\"");
    let mut c = Client::connect(SocketAddr::new(ip, d.port));
    c.cmd("PUB ev x");
    c.expect_err("AUTH");
    c.cmd("LIST a@b");
    c.expect_err("AUTH");
    c.cmd("AUTH x");
    c.expect_err("AUTH");
    // SUB is for everyone; untrusted, it is stored pending.
    c.cmd("SUB ev a@b");
    c.expect("+OK SUB ev pending");
    let mut l = d.client();
    let (id, n) = publish(&mut l, "ev", "from loopback");
    assert_eq!(n, 1);
    c.expect(&format!("MSG ev {id} from loopback"));
}

#[test]
fn with_token_a_remote_client_may_publish_after_auth() {
    let Some(ip) = non_loopback_v4() else {
        util::skip(
            "with_token_a_remote_client_may_publish_after_auth",
            "this machine has no non-loopback IPv4 address",
        );
        return;
    };
    let d = Daemon::start("host = \"0.0.0.0\"\npublish_token = \"t\"");
    let mut c = Client::connect(SocketAddr::new(ip, d.port));
    c.cmd("PUB ev x");
    c.expect_err("AUTH");
    c.cmd("AUTH t");
    c.expect("+OK AUTH");
    let (_, n) = publish(&mut c, "ev", "x");
    assert_eq!(n, 0);
}

#[test]
fn end_of_input_is_quit() {
    let d = Daemon::start("");
    let mut c = d.client();
    let mut cmds = String::new();
    for i in 0..50 {
        cmds.push_str(&format!("SUB ev{i} u{i}@x\r\nPING {i}\r\n"));
    }
    cmds.push_str("PUB ev7 last words\r\n");
    c.send(&cmds);
    c.shutdown_write();
    let mut got = Vec::new();
    while let Some(l) = c.try_line(WAIT).unwrap() {
        got.push(l);
    }
    let msg = got.iter().position(|l| l.starts_with("MSG ")).expect("the MSG arrives");
    let m = got.remove(msg);
    let last = got.pop().unwrap();
    let (id, n) = parse_ok_pub(&last);
    assert_eq!(n, 1);
    assert_eq!(m, format!("MSG ev7 {id} last words"));
    let want: Vec<String> = (0..50).flat_map(|i| [format!("+OK SUB ev{i}"), format!("PONG {i}")]).collect();
    assert_eq!(got, want);
    // And the subscriptions are stored.
    let mut l = d.client();
    l.cmd("LIST u49@x");
    assert!(l.line().starts_with("SUB ev49 u49@x "));
    l.expect("+OK LIST 1");
}

#[test]
fn eof_right_after_connect() {
    let d = Daemon::start("");
    let mut c = d.client();
    c.shutdown_write();
    c.expect_eof();
    // The daemon is fine.
    let mut c = d.client();
    c.cmd("PING");
    c.expect("PONG");
}

/// What one pipelined command should get back.
enum Want {
    Exact(String),
    Err(&'static str),
    /// `+OK PUB <id> <n>`, and the MSG this connection should see for it.
    Pub {
        n: u64,
        event: String,
        text: String,
        to_self: bool,
        to_other: bool,
    },
    /// LIST: rows of (event, email), then `+OK LIST <count>`.
    List {
        email: String,
        events: Vec<String>,
    },
}

/// A small deterministic generator, so that a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn pipelining_hundreds_of_mixed_commands_in_one_write() {
    let d = Daemon::start("");
    // Another subscriber of ev0, to check the counts and its own MSGs.
    let mut other = d.client();
    other.cmd("SUB ev0 other@example.net");
    other.expect("+OK SUB ev0");

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let events = ["ev0", "ev1", "ev2", "ev3"];
    let locals = ["u0", "u1", "u2", "U3", "u.4", "u+5"];
    let mut live: BTreeSet<(String, String)> = BTreeSet::new();
    let mut stored: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut script = String::new();
    let mut wants = Vec::new();
    let n_cmds = 700;
    for i in 0..n_cmds {
        let ev = events[rng.below(4) as usize].to_string();
        let local = locals[rng.below(6) as usize];
        // The domain in varying case: it is lowercased on input.
        let (sent, norm) = if rng.below(2) == 0 {
            (format!("{local}@Example.COM"), format!("{local}@example.com"))
        } else {
            (format!("{local}@example.com"), format!("{local}@example.com"))
        };
        match rng.below(100) {
            0..=24 => {
                script.push_str(&format!("SUB {ev} {sent}\r\n"));
                live.insert((ev.clone(), norm.clone()));
                stored.entry(norm).or_default().insert(ev.clone());
                wants.push(Want::Exact(format!("+OK SUB {ev}")));
            }
            25..=36 => {
                script.push_str(&format!("unsub {ev} {sent}\r\n"));
                live.remove(&(ev.clone(), norm.clone()));
                stored.entry(norm).or_default().remove(&ev);
                wants.push(Want::Exact(format!("+OK UNSUB {ev}")));
            }
            37..=56 => {
                let text = format!("note {i}  with\tspaces");
                script.push_str(&format!("PUB {ev} {text}\r\n"));
                let to_self = live.iter().any(|(e, _)| *e == ev);
                let to_other = ev == "ev0";
                let n = u64::from(to_self) + u64::from(to_other);
                wants.push(Want::Pub { n, event: ev, text, to_self, to_other });
            }
            57..=71 => {
                if rng.below(3) == 0 {
                    script.push_str("PING\r\n");
                    wants.push(Want::Exact("PONG".into()));
                } else {
                    script.push_str(&format!("Ping {i} x\r\n"));
                    wants.push(Want::Exact(format!("PONG {i} x")));
                }
            }
            72..=79 => {
                script.push_str(&format!("LIST {sent}\r\n"));
                let evs: Vec<String> =
                    stored.get(&norm).map(|s| s.iter().cloned().collect()).unwrap_or_default();
                wants.push(Want::List { email: norm, events: evs });
            }
            80..=84 => {
                // Blank lines: no reply.
                script.push_str(if rng.below(2) == 0 { "\r\n" } else { " \t \r\n" });
            }
            _ => {
                let (line, code) = match rng.below(8) {
                    0 => (format!("SUB {ev}"), "SYNTAX"),
                    1 => ("FROB x".to_string(), "UNKNOWN"),
                    2 => (format!("SUB bad*{ev} {sent}"), "EVENT"),
                    3 => (format!("SUB {ev} no-at-sign"), "EMAIL"),
                    4 => (format!("PUB {ev}"), "SYNTAX"),
                    5 => ("PING a\u{1}b".to_string(), "SYNTAX"),
                    6 => (format!("SUB {ev} {sent} SINCE -5"), "SYNTAX"),
                    _ => (format!("LIST {local}@@x"), "EMAIL"),
                };
                script.push_str(&line);
                script.push_str("\r\n");
                wants.push(Want::Err(code));
            }
        }
    }
    assert!(wants.len() > 500, "the script should hold hundreds of commands");

    let mut c = d.client();
    // One write; a thread writes it so that reading replies cannot deadlock against it.
    let mut w = c.sock.try_clone().unwrap();
    let bytes = script.into_bytes();
    let writer = std::thread::spawn(move || w.write_all(&bytes).unwrap());

    let mut msgs_self = Vec::new();
    let mut expected_self = Vec::new();
    let mut expected_other = Vec::new();
    let mut last_id = 0;
    let next_line = |c: &mut Client, msgs: &mut Vec<String>, in_list: bool| loop {
        let l = c.line();
        if l.starts_with("MSG ") {
            assert!(!in_list, "a MSG arrived inside a LIST reply: {l:?}");
            msgs.push(l);
        } else {
            return l;
        }
    };
    for (k, want) in wants.iter().enumerate() {
        let l = next_line(&mut c, &mut msgs_self, false);
        match want {
            Want::Exact(s) => assert_eq!(&l, s, "reply {k}"),
            Want::Err(code) => {
                check_err(&l, code);
            }
            Want::Pub { n, event, text, to_self, to_other } => {
                let (id, got_n) = parse_ok_pub(&l);
                assert_eq!(got_n, *n, "reply {k}: {l:?}");
                assert!(id > last_id, "ids must increase: {id} after {last_id}");
                last_id = id;
                let m = format!("MSG {event} {id} {text}");
                if *to_self {
                    expected_self.push(m.clone());
                }
                if *to_other {
                    expected_other.push(m);
                }
            }
            Want::List { email, events } => {
                let mut l = l;
                for ev in events {
                    let w: Vec<&str> = l.split(' ').collect();
                    assert_eq!(w.len(), 4, "reply {k}: {l:?}");
                    assert_eq!((w[0], w[1], w[2]), ("SUB", ev.as_str(), email.as_str()), "reply {k}");
                    assert!(is_rfc3339_utc(w[3]), "{l:?}");
                    l = next_line(&mut c, &mut msgs_self, true);
                }
                assert_eq!(l, format!("+OK LIST {}", events.len()), "reply {k}");
            }
        }
    }
    writer.join().unwrap();
    // Nothing more, but perhaps MSGs still queued behind the last reply.
    msgs_self.extend(c.sync());
    assert_eq!(msgs_self, expected_self, "the MSGs this connection got");
    assert_eq!(other.sync(), expected_other, "the MSGs the other subscriber got");
}

#[test]
fn busy_at_max_clients() {
    let d = Daemon::start("max_clients = 2");
    let a = d.client();
    let mut b = d.client();
    let mut c = Client::connect_raw(d.addr());
    check_err(&c.line(), "BUSY");
    c.expect_eof();
    // The held connections are unaffected.
    b.cmd("PING");
    b.expect("PONG");
    // When one leaves, a new client gets in.
    drop(a);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut c = Client::connect_raw(d.addr());
        let l = c.line();
        if l.starts_with("HELLO notifd 1") {
            c.cmd("PING");
            c.expect("PONG");
            break;
        }
        check_err(&l, "BUSY");
        assert!(Instant::now() < deadline, "the closed connection's place was never freed");
    }
}

#[test]
fn busy_at_max_clients_per_ip() {
    let d = Daemon::start("host = \"0.0.0.0\"\nmax_clients_per_ip = 2");
    let _a = d.client();
    let _b = d.client();
    let mut c = Client::connect_raw(d.addr());
    check_err(&c.line(), "BUSY");
    c.expect_eof();
    // Another address is another count.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into()).unwrap();
    sock.connect(&SocketAddr::from(([127, 0, 0, 1], d.port)).into()).unwrap();
    let mut other = Client::from_stream(sock.into());
    let g = other.line();
    assert!(g.starts_with("HELLO notifd 1"), "{g:?}");
    other.cmd("PING");
    other.expect("PONG");
}

#[test]
fn slow_consumer_is_dropped_and_others_get_everything() {
    let d = Daemon::start("max_pending = 4096\nsync = \"normal\"");
    let pid = d.pid();

    // The slow subscriber: a small receive buffer, and it never reads after its SUB.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    // A small MSS too: on loopback (MTU 64 KiB) the server's send buffer would otherwise
    // autotune to megabytes, which the test would have to fill first.
    sock.set_mss(536).unwrap();
    sock.connect(&d.addr().into()).unwrap();
    let mut slow = Client::from_stream(sock.into());
    assert!(slow.line().starts_with("HELLO notifd 1"));
    slow.cmd("SUB feed slow@x");
    slow.expect("+OK SUB feed");

    // The good subscriber reads everything, in its own thread, until "PONG done".
    let mut good = d.client();
    good.cmd("SUB feed good@x");
    good.expect("+OK SUB feed");
    let mut good_w = good.sock.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        loop {
            match good.try_line(Duration::from_secs(30)) {
                Ok(Some(l)) if l == "PONG done" => return got,
                Ok(Some(l)) => got.push(l),
                Ok(None) => panic!("the good subscriber was disconnected after {} lines", got.len()),
                Err(e) => panic!("the good subscriber: {e}"),
            }
        }
    });
    let rss_before = util::rss(pid);

    let mut p = d.client();
    let text = "t".repeat(400);
    let mut sent = Vec::new();
    let mut dropped_at = None;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(30);
    // Publish in small pipelined batches (well under max_pending per loop turn, so the
    // good reader is never over it), until the slow one is dropped, then some more.
    let mut i = 0u64;
    loop {
        let mut batch = String::new();
        for k in 0..4 {
            batch.push_str(&format!("PUB feed {} {text}\r\n", i * 4 + k));
        }
        p.send(&batch);
        for k in 0..4 {
            let (id, n) = parse_ok_pub(&p.line());
            sent.push(format!("MSG feed {id} {} {text}", i * 4 + k));
            match dropped_at {
                None if n == 2 => {}
                None => {
                    assert_eq!(n, 1, "n counts the connections the MSG was queued to");
                    dropped_at = Some(sent.len());
                }
                Some(_) => assert_eq!(n, 1, "the slow consumer came back?"),
            }
        }
        i += 1;
        if dropped_at.is_some_and(|at| sent.len() >= at + 200) {
            break;
        }
        assert!(Instant::now() < deadline, "the slow consumer was never dropped ({} MSGs sent)", sent.len());
    }
    eprintln!("dropped after {dropped_at:?} MSGs, {:?}", t0.elapsed());
    let line = d.wait_log(|l| l.contains("slow consumer"), WAIT);
    assert!(line.contains(&slow.local_addr().to_string()), "the log names the peer: {line:?}");
    let rss_after = util::rss(pid);
    assert!(rss_after < rss_before + (64 << 20), "memory grew from {rss_before} to {rss_after} bytes");

    // The good subscriber got every MSG, in order.
    good_w.write_all(b"PING done\r\n").unwrap();
    let got = reader.join().expect("the good subscriber's reader");
    assert_eq!(got.len(), sent.len(), "the good subscriber missed MSGs");
    assert!(got == sent, "the good subscriber's MSGs differ from what was published");

    // The slow one was closed: after what the kernel held for it, it sees EOF.
    let mut buf = [0u8; 65536];
    slow.sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut drained = 0usize;
    loop {
        match slow.sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => drained += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the slow consumer was not disconnected: {e} (after {drained} bytes)"),
        }
    }
    eprintln!("drained {drained}");
    assert!(drained < sent.len() * text.len(), "the slow consumer got everything: it was not slow");
}

#[test]
fn a_ready_reply_waits_behind_one_that_waits_on_the_store() {
    let d = Daemon::start("");
    let mut c = d.client();
    c.cmd("SUB warm a@b");
    c.expect("+OK SUB warm");
    let store = d.store_pid();
    let cont = util::stop_process(store);
    c.send("SUB ev a@b\r\nPING ready\r\nFOO\r\nPUB ev x\r\nPING last\r\n");
    // Once the daemon has read them all, PONG and -ERR UNKNOWN are ready, but must wait.
    util::wait_until("the daemon to read the commands", WAIT, || {
        util::server_unread(c.local_addr(), d.port) == Some(0)
    });
    // The MSG does not wait for the store: it arrives while the store is stopped.
    let m = c.line();
    assert!(m.starts_with("MSG ev ") && m.ends_with(" x"), "expected the MSG first, got {m:?}");
    drop(cont);
    c.expect("+OK SUB ev");
    c.expect("PONG ready");
    c.expect_err("UNKNOWN");
    let (_, n) = parse_ok_pub(&c.line());
    assert_eq!(n, 1);
    c.expect("PONG last");
}

#[test]
fn max_inflight_pauses_reading_without_losing_anything() {
    const PINGS: usize = 20_000;
    let d = Daemon::start("max_inflight = 1\nsync = \"normal\"");
    let mut c = d.client();
    c.cmd("SUB warm a@b");
    c.expect("+OK SUB warm");
    let store = util::stop_process(d.store_pid());
    let mut script = String::from("SUB e a@b\r\n");
    for i in 0..PINGS {
        script.push_str(&format!("PING {i}\r\nBAD\r\n"));
    }
    let mut w = c.sock.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(script.as_bytes()).unwrap());
    // The SUB waits on the stopped store and takes the one slot: the daemon reads no
    // further than its first chunk and leaves the rest in the kernel, and still does
    // after a whole loop turn (a round trip on another connection).
    const UNREAD: u64 = 32 * 1024;
    let unread = || util::server_unread(c.local_addr(), d.port).unwrap_or(0);
    util::wait_until("the daemon to leave bytes unread", WAIT, || unread() >= UNREAD);
    let mut other = d.client();
    other.cmd("PING");
    other.expect("PONG");
    let left = unread();
    assert!(left >= UNREAD, "the daemon read on past max_inflight: {left} bytes left unread");

    // Nothing is refused or lost: every reply, in order.
    drop(store);
    c.expect("+OK SUB e");
    for i in 0..PINGS {
        c.expect(&format!("PONG {i}"));
        c.expect_err("UNKNOWN");
    }
    writer.join().unwrap();
    assert!(c.sync().is_empty());
}

/// Publications on two events, interleaved in one write: each subscriber gets exactly
/// its events' MSGs in publication order, also when its share of the turn's MSGs is not
/// one contiguous run (the reactor then copies instead of writing from the shared
/// buffer), and also when a reply of its own falls between them in the same loop turn.
#[test]
fn interleaved_events_reach_each_subscriber_in_order() {
    let d = Daemon::start("");
    let mut only_a = d.client();
    only_a.cmd("SUB a x@example.com");
    only_a.expect("+OK SUB a");
    let mut both = d.client();
    both.send("SUB a y@example.com\r\nSUB b y@example.com\r\n");
    both.expect("+OK SUB a");
    both.expect("+OK SUB b");
    let event = |i: usize| if i % 3 == 1 { "b" } else { "a" };
    let batch = |range: std::ops::Range<usize>| -> String {
        range.map(|i| format!("PUB {} m{i}\r\n", event(i))).collect()
    };
    let mut ids = Vec::new();
    let want = |ids: &[u64], range: std::ops::Range<usize>, pick: &dyn Fn(usize) -> bool| -> Vec<String> {
        range.filter(|&i| pick(i)).map(|i| format!("MSG {} {} m{i}", event(i), ids[i])).collect()
    };

    // One publisher, one write.
    let mut p = d.client();
    p.send(&batch(0..30));
    for _ in 0..30 {
        ids.push(parse_ok_pub(&p.line()).0);
    }
    // Each sync's PING goes out after every +OK PUB was read, so after every MSG was
    // queued: its PONG comes after them all.
    assert_eq!(only_a.sync(), want(&ids, 0..30, &|i| i % 3 != 1));
    assert_eq!(both.sync(), want(&ids, 0..30, &|_| true));

    // Three connections' input in one loop turn: the reactor is stopped while a first
    // publisher writes, `both` sends a PING (then a PUB on an event nobody follows, whose
    // id tells when `both` was handled), and a second publisher writes. Woken, the
    // reactor handles the three in some order; when `both` comes between the publishers,
    // its PONG must fall between their runs of MSGs. The order is the kernel's, so
    // several rounds are tried until one has `both` in the middle.
    let mut p2 = d.client();
    let mut middle = false;
    for round in 0..10 {
        let first = 30 + round * 30;
        let inputs = [
            batch(first..first + 15),
            "PING mid\r\nPUB nobody marker\r\n".into(),
            batch(first + 15..first + 30),
        ];
        let reactor = util::stop_process(d.pid());
        for (c, input) in [&mut p, &mut both, &mut p2].into_iter().zip(&inputs) {
            c.send(input);
            util::wait_until("the input to reach the daemon's socket", WAIT, || {
                util::server_unread(c.local_addr(), d.port) == Some(input.len() as u64)
            });
        }
        drop(reactor);
        for c in [&mut p, &mut p2] {
            for _ in 0..15 {
                ids.push(parse_ok_pub(&c.line()).0);
            }
        }
        let mut got = both.sync();
        let ok_pub = got.iter().position(|l| l.starts_with("+OK PUB ")).expect("the marker's +OK PUB");
        let (marker, n) = parse_ok_pub(&got.remove(ok_pub));
        assert_eq!(n, 0);
        let pong = got.iter().position(|l| l == "PONG mid").expect("PONG mid");
        assert!(pong <= ok_pub, "PONG mid after the +OK PUB that follows it: {got:?}");
        got.remove(pong);
        // Publications are numbered in the order the reactor handled them.
        let before = (first..first + 30).filter(|&i| ids[i] < marker).count();
        assert!(before % 15 == 0, "a publisher's batch was split: {before} MSGs before the marker");
        let mut runs: Vec<usize> = (first..first + 30).collect();
        runs.sort_by_key(|&i| ids[i]);
        let msg = |i: usize| format!("MSG {} {} m{i}", event(i), ids[i]);
        assert_eq!(
            got,
            runs.iter().map(|&i| msg(i)).collect::<Vec<_>>(),
            "round {round}: the MSGs in id order"
        );
        assert_eq!(pong, before, "round {round}: PONG mid is not where `both` was handled: {got:?}");
        assert_eq!(only_a.sync(), runs.iter().filter(|&&i| i % 3 != 1).map(|&i| msg(i)).collect::<Vec<_>>());
        if before == 15 {
            middle = true;
            break;
        }
    }
    assert!(middle, "in ten rounds, the reactor never handled `both` between the two publishers");
}
