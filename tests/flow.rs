//! Flow control and connection limits as notifd(8) and notifd.conf(5) state them: a
//! client that does not read, a SUB the store could not confirm, the per-address limit
//! for IPv6, TCP keepalive, and `max_clients` under the open-files limit.

mod util;

use socket2::{Domain, Socket, Type};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use util::extra::{self, LoggedDaemon, Resume};
use util::{Client, Daemon, WAIT};

/// A connection with small socket buffers, so that what the server cannot send piles up
/// in its own output rather than in the kernel's.
fn small_buffers(addr: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.set_send_buffer_size(4096).unwrap();
    s.connect_timeout(&addr.into(), WAIT).unwrap();
    s.into()
}

#[test]
fn a_client_that_never_reads_is_not_read_from_and_loses_nothing() {
    const PINGS: usize = 3000;
    // 3000 bytes a line: 9 MB each way, far more than the socket buffers can hide.
    let text = "x".repeat(2990);
    let d = Daemon::start("max_pending = 65536");
    let mut c = Client::from_stream(small_buffers(d.addr()));
    assert!(c.line().starts_with("HELLO "));
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let mut sock = c.sock.try_clone().unwrap();
        let written = Arc::clone(&written);
        let text = text.clone();
        std::thread::spawn(move || {
            for i in 0..PINGS {
                sock.write_all(format!("PING {i:05} {text}\r\n").as_bytes()).unwrap();
                written.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // The server stops reading: its receive queue holds bytes, and neither that queue
    // nor the writer moves while the reactor runs a turn for another client.
    let mut other = d.client();
    let deadline = Instant::now() + WAIT;
    loop {
        let (u1, w1) = (util::server_unread(c.local_addr(), d.port), written.load(Ordering::Relaxed));
        other.cmd("PING");
        other.expect("PONG");
        let (u2, w2) = (util::server_unread(c.local_addr(), d.port), written.load(Ordering::Relaxed));
        if u1 == u2 && w1 == w2 && u1.is_some_and(|u| u > 0) {
            break;
        }
        assert!(w2 < PINGS, "the server read all {PINGS} PINGs of a client that read nothing");
        assert!(Instant::now() < deadline, "the server kept reading: unread {u2:?}, written {w2}");
    }
    assert!(written.load(Ordering::Relaxed) < PINGS);
    // Once the client reads, every reply arrives, in order.
    for i in 0..PINGS {
        let l = c.line();
        assert_eq!(l, format!("PONG {i:05} {text}"), "reply {i}");
    }
    writer.join().unwrap();
    c.sync();
}

#[test]
fn a_sub_answered_unavailable_keeps_its_live_subscription() {
    let d = Daemon::start("store_timeout = 1");
    let mut c = d.client();
    c.cmd("PING");
    c.expect("PONG");
    let store = d.store_pid();
    let resume = Resume(store);
    util::signal(store, libc::SIGSTOP);
    c.cmd("SUB ev a@example.com");
    c.expect_err("UNAVAILABLE");
    drop(resume);
    let mut p = d.client();
    p.cmd("PUB ev still here");
    assert!(c.line().starts_with("MSG ev ") && c.sync().is_empty());
    let ok = p.line();
    assert!(ok.starts_with("+OK PUB ") && ok.ends_with(" 1"), "{ok:?}");
}

/// A client bound to `from`, connected to `to`, and its first line.
fn connect_from(from: &str, to: SocketAddr) -> (Client, String) {
    let s = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("[{from}]:0").parse().unwrap();
    s.bind(&from.into()).unwrap();
    s.connect_timeout(&to.into(), WAIT).unwrap();
    let mut c = Client::from_stream(s.into());
    let first = c.line();
    (c, first)
}

#[test]
fn max_clients_per_ip_counts_ipv6_clients_by_their_64() {
    const ADDRS: &[&str] = &["fd00:1::1/64", "fd00:1::2/64", "fd00:2::1/64"];
    let ran = extra::in_new_netns(ADDRS, || {
        let d = Daemon::start("host = \"::\"\nmax_clients_per_ip = 1");
        let to = SocketAddr::from(("fd00:1::1".parse::<std::net::Ipv6Addr>().unwrap(), d.port));
        let (_first, hello) = connect_from("fd00:1::1", to);
        assert!(hello.starts_with("HELLO "), "{hello:?}");
        let (_same_64, busy) = connect_from("fd00:1::2", to);
        util::check_err(&busy, "BUSY");
        let (_other_64, hello) = connect_from("fd00:2::1", to);
        assert!(hello.starts_with("HELLO "), "another /64 is another client: {hello:?}");
    });
    if let Err(why) = ran {
        extra::skip("max_clients_per_ip_counts_ipv6_clients_by_their_64", &why);
    }
}

#[test]
fn tcp_keepalive_is_set_on_accepted_sockets() {
    let d = Daemon::start("tcp_keepalive = 45");
    let c = d.client();
    let left = extra::keepalive_timer(&c, d.port);
    assert!(left.is_some_and(|s| (35..=45).contains(&s)), "keepalive in {left:?} s, not 45");
}

#[test]
fn tcp_keepalive_zero_turns_it_off() {
    let d = Daemon::start("tcp_keepalive = 0");
    let c = d.client();
    assert_eq!(extra::keepalive_timer(&c, d.port), None);
}

/// Starts notifd with RLIMIT_NOFILE `nofile` and `max_clients` far above it: it takes
/// `nofile` - 34 clients (32 descriptors for itself and 2 per mailer), also after a
/// reload that raises `max_clients` again, and keeps the clients it has.
fn max_clients_fits(nofile: u64) {
    let fit = nofile - 34;
    let mut d = LoggedDaemon::start("max_clients = 10000", &[], Some(nofile));
    let warning = format!("max_clients 10000 does not fit under RLIMIT_NOFILE {nofile}; lowered to {fit}");
    d.wait_log(|l| l.contains(": warn: ") && l.contains(&warning), WAIT);
    let clients: Vec<Client> = (0..fit).map(|_| d.client()).collect();
    let busy = |d: &LoggedDaemon| {
        let mut extra = Client::connect_raw(SocketAddr::from(([127, 0, 0, 1], d.listen.port())));
        assert_eq!(util::check_err(&extra.line(), "BUSY"), "too many connections");
    };
    busy(&d);
    d.reload("max_clients = 5000");
    let warning = format!("max_clients 5000 does not fit under RLIMIT_NOFILE {nofile}; lowered to {fit}");
    d.wait_log(|l| l.contains(": warn: ") && l.contains(&warning), WAIT);
    busy(&d);
    for mut c in clients {
        c.cmd("PING");
        c.expect("PONG");
    }
}

#[test]
fn max_clients_is_lowered_to_fit_the_open_files_limit() {
    max_clients_fits(200);
}

#[test]
fn max_clients_is_lowered_to_fit_a_small_open_files_limit() {
    max_clients_fits(64);
}
