//! Connections and memory under a stranger's pressure (issue 9, items 8 to 11):
//! `idle_timeout`, `max_clients_per_net`, the slow-consumer line and
//! `max_pending_total`, and `auth_fail_limit` with its one log line per address.

mod util;

use socket2::{Domain, Socket, Type};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use util::extra;
use util::{check_err, parse_ok_pub, Client, Daemon, WAIT};

/// A connection from `from` to `to`, nothing read yet.
fn connect_from(from: &str, to: SocketAddr) -> Client {
    let from: IpAddr = from.parse().unwrap();
    let s = Socket::new(Domain::for_address(SocketAddr::new(from, 0)), Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(from, 0).into()).unwrap_or_else(|e| panic!("bind {from}: {e}"));
    s.connect_timeout(&to.into(), WAIT).unwrap_or_else(|e| panic!("connect {from} -> {to}: {e}"));
    Client::from_stream(s.into())
}

/// `from` is let in: its first line is the greeting.
fn admitted(from: &str, to: SocketAddr) -> Client {
    let mut c = connect_from(from, to);
    let first = c.line();
    assert!(first.starts_with("HELLO notifd 1"), "{from} was not let in: {first:?}");
    c
}

/// `from` is refused: `-ERR BUSY <text>`, then EOF; returns the text.
fn refused(from: &str, to: SocketAddr) -> String {
    let mut c = connect_from(from, to);
    let text = check_err(&c.line(), "BUSY");
    c.expect_eof();
    text
}

/// A subscriber that never reads: a small receive buffer and MSS, so that what the
/// server cannot send piles up in its own output rather than in the kernel's.
fn slow_subscriber(d: &Daemon, events: &[&str]) -> Client {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.set_mss(536).unwrap();
    sock.connect_timeout(&d.addr().into(), WAIT).unwrap();
    let mut c = Client::from_stream(sock.into());
    assert!(c.line().starts_with("HELLO notifd 1"));
    for e in events {
        c.cmd(&format!("SUB {e} slow@x"));
        c.expect(&format!("+OK SUB {e}"));
    }
    c
}

/// Every line the server still sends, until it closes the connection (bounded).
fn rest_until_eof(c: &mut Client) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        match c.try_line(WAIT) {
            Ok(Some(l)) => lines.push(l),
            Ok(None) => return lines,
            Err(e) => panic!("no EOF after {} lines: {e}", lines.len()),
        }
    }
}

#[test]
fn an_idle_connection_is_closed_and_a_subscriber_is_not() {
    let d = Daemon::start("idle_timeout = 1");
    let mut sub = d.client();
    sub.cmd("SUB ev a@example.com");
    sub.expect("+OK SUB ev");
    // Connected after the SUB: the subscriber has been quiet longer when this one goes.
    let mut silent = d.client();
    let t0 = Instant::now();
    match silent.try_line(WAIT) {
        Ok(Some(l)) => assert_eq!(l, "-ERR BUSY idle"),
        other => panic!("a silent connection was not closed as idle: {other:?}"),
    }
    silent.expect_eof();
    assert!(t0.elapsed() >= Duration::from_secs(1), "closed before idle_timeout: {:?}", t0.elapsed());
    // The subscriber, silent for longer, is still there and was sent nothing.
    assert_eq!(sub.sync(), Vec::<String>::new());
    // A client that keeps sending commands is not idle either.
    let mut busy = d.client();
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        busy.cmd("PING");
        busy.expect("PONG");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn max_clients_per_net_counts_ipv4_by_the_24_and_applies_on_reload() {
    let d = Daemon::start("max_clients_per_net = 2");
    let to = d.addr();
    let _a = admitted("127.0.0.1", to);
    let b = admitted("127.0.0.2", to);
    assert_eq!(refused("127.0.0.3", to), "too many connections from your network");
    let _other_24 = admitted("127.0.1.1", to);
    // One of the /24 leaves: its slot is free again.
    drop(b);
    let deadline = Instant::now() + WAIT;
    let _c = loop {
        let mut c = connect_from("127.0.0.3", to);
        let first = c.line();
        if first.starts_with("HELLO ") {
            break c;
        }
        check_err(&first, "BUSY");
        assert!(Instant::now() < deadline, "the slot of a closed connection was never freed");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Raised by a reload: from then on, more come in.
    util::write_config(d.dir.path(), "max_clients_per_net = 3");
    d.signal(libc::SIGHUP);
    d.wait_log(|l| l.contains("configuration reloaded") && l.contains("max_clients_per_net"), WAIT);
    let _d = admitted("127.0.0.4", to);
    assert_eq!(refused("127.0.0.5", to), "too many connections from your network");
}

#[test]
fn max_clients_per_net_counts_ipv6_by_the_48_and_mapped_ipv4_as_ipv4() {
    const ADDRS: &[&str] = &["fd00:1:2:1::1/64", "fd00:1:2:2::1/64", "fd00:1:2:3::1/64", "fd00:1:3::1/64"];
    let ran = extra::in_new_netns(ADDRS, || {
        let d = Daemon::start("host = \"::\"\nmax_clients_per_net = 2\nmax_clients_per_ip = 1");
        let v6 = SocketAddr::from(("fd00:1:2:1::1".parse::<std::net::Ipv6Addr>().unwrap(), d.port));
        let _a = admitted("fd00:1:2:1::1", v6);
        // Another /64 of the same /48: under max_clients_per_ip, over the network's cap.
        let _b = admitted("fd00:1:2:2::1", v6);
        assert_eq!(refused("fd00:1:2:3::1", v6), "too many connections from your network");
        let _other_48 = admitted("fd00:1:3::1", v6);
        // IPv4 through the dual-stack socket: counted by its /24, apart from IPv6.
        let v4 = SocketAddr::from(([127, 0, 0, 1], d.port));
        let _c = admitted("127.0.0.1", v4);
        let _e = admitted("127.0.0.2", v4);
        assert_eq!(refused("127.0.0.3", v4), "too many connections from your network");
    });
    if let Err(why) = ran {
        util::skip("max_clients_per_net_counts_ipv6_by_the_48_and_mapped_ipv4_as_ipv4", &why);
    }
}

#[test]
fn a_slow_consumer_is_told_why_before_it_is_closed() {
    let d = Daemon::start("max_pending = 4096\nsync = \"normal\"");
    let mut slow = slow_subscriber(&d, &["feed"]);
    let mut p = d.client();
    let text = "t".repeat(400);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = 0;
    loop {
        p.cmd(&format!("PUB feed {sent} {text}"));
        sent += 1;
        let (_, n) = parse_ok_pub(&p.line());
        if n == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the slow consumer was never dropped ({sent} MSGs)");
    }
    d.wait_log(|l| l.contains("slow consumer") && l.contains(&slow.local_addr().to_string()), WAIT);
    // It reads now: whole lines, some MSGs, and the last line says why.
    let lines = rest_until_eof(&mut slow);
    assert!(lines.len() > 1 && lines.len() < sent, "{} lines of {sent} MSGs", lines.len());
    assert_eq!(lines.last().unwrap(), "-ERR BUSY slow consumer");
    for l in &lines[..lines.len() - 1] {
        assert!(l.starts_with("MSG feed ") && l.ends_with(&text), "not a whole MSG line: {l:?}");
    }
}

#[test]
fn past_max_pending_total_the_largest_consumer_goes_first() {
    let d = Daemon::start("max_pending = 1048576\nmax_pending_total = 32768\nsync = \"normal\"");
    // `big` takes both events, `small` one: `big` always has twice the unsent bytes.
    let mut big = slow_subscriber(&d, &["one", "two"]);
    let mut small = slow_subscriber(&d, &["one"]);
    let mut p = d.client();
    let text = "t".repeat(400);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ones = Vec::new();
    loop {
        p.cmd(&format!("PUB one {} {text}", ones.len()));
        let (id, n) = parse_ok_pub(&p.line());
        assert!(n >= 1, "the smaller consumer was dropped");
        ones.push(format!("MSG one {id} {} {text}", ones.len()));
        p.cmd(&format!("PUB two x {text}"));
        let (_, n2) = parse_ok_pub(&p.line());
        if n2 == 0 {
            // `big` is gone; `small` is under the budget alone.
            break;
        }
        assert!(Instant::now() < deadline, "nobody was dropped ({} rounds)", ones.len());
    }
    let line = d.wait_log(|l| l.contains("max_pending_total"), WAIT);
    assert!(line.contains(&big.local_addr().to_string()), "the larger went first: {line:?}");
    let lines = rest_until_eof(&mut big);
    assert_eq!(lines.last().map(String::as_str), Some("-ERR BUSY slow consumer"));
    // The smaller one lost nothing: every "one", in order, then its PONG.
    let got = small.sync();
    assert_eq!(got.len(), ones.len(), "the smaller consumer missed MSGs");
    assert!(got == ones, "the smaller consumer's MSGs differ from what was published");
    assert!(!d.log_has(&format!("{}: slow consumer", small.local_addr())));
}

#[test]
fn failed_auths_past_the_limit_are_refused_unchecked_and_logged_once() {
    const TOKEN: &str = "0123456789abcdef";
    let d = Daemon::start(&format!("publish_token = \"{TOKEN}\"\nauth_fail_limit = 10"));
    // Nine failures over three connections (the third on each closes it).
    for _ in 0..3 {
        let mut c = d.client();
        c.cmd("AUTH wrong-guess-0001");
        assert_eq!(c.expect_err("AUTH"), "wrong token");
        c.cmd("AUTH wrong-guess-0002");
        assert_eq!(c.expect_err("AUTH"), "wrong token");
        c.cmd("AUTH wrong-guess-0003");
        c.expect_err("AUTH");
        c.expect_eof();
    }
    let mut c = d.client();
    c.cmd("AUTH wrong-guess-0010");
    assert_eq!(c.expect_err("AUTH"), "wrong token", "the tenth is still checked");
    // The eleventh is not checked: the right token is refused too.
    c.cmd(&format!("AUTH {TOKEN}"));
    let text = c.expect_err("AUTH");
    assert!(text.contains("your address"), "{text:?}");
    c.cmd("PUB ev not allowed");
    c.expect_err("AUTH");
    // Also on a new connection, and many more times, within the minute.
    for _ in 0..4 {
        let mut c = d.client();
        for _ in 0..2 {
            c.cmd(&format!("AUTH {TOKEN}"));
            assert!(c.expect_err("AUTH").contains("your address"));
        }
        c.cmd("AUTH wrong-guess-0099");
        c.expect_err("AUTH");
        c.expect_eof();
    }
    // The last close is logged (at debug) after every line the attempts caused.
    d.wait_log_count("refused AUTH attempts; closing", 4, WAIT);
    assert_eq!(d.log_count("failed AUTHs from this address within a minute"), 1, "one summary line");
    let warned: Vec<String> =
        d.log_lines().into_iter().filter(|l| l.contains("AUTH") && l.contains(": warn: ")).collect();
    // The three closes below the limit and the summary; nothing per failure past it.
    assert_eq!(warned.len(), 4, "{warned:#?}");
    // Another address is not concerned.
    let mut other = connect_from("127.0.0.2", d.addr());
    other.line();
    other.cmd(&format!("AUTH {TOKEN}"));
    other.expect("+OK AUTH");
}
