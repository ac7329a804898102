//! The HTTP side against the real binary (OPERATIONS.md *HTTP side*): `/health`,
//! `/metrics` read with a real HTTP client and parsed by a Prometheus text-format
//! parser, every bound, the listener's own limits, and STATS over the protocol with the
//! same numbers as `/metrics`.

mod util;

#[path = "util/http_client.rs"]
mod http_client;

use http_client::{got, http_addr, Got};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use util::{Daemon, WAIT};

/// A publish token long enough not to be warned about.
const TOKEN: &str = "t0k3n-0123456789abcdef";

/// A link token of the right form (`http.rs`'s MIN_TOKEN and alphabet).
const LINK: &str = "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA";

/// Starts notifd with the HTTP side on loopback, a kernel-chosen port, plus `extra`.
fn start(extra: &str) -> (Daemon, SocketAddr) {
    let d = Daemon::start(&format!("http_host = \"127.0.0.1\"\nhttp_port = 0\n{extra}"));
    let http = http_addr(&d);
    (d, http)
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(WAIT * 3).build()
}

fn get(http: SocketAddr, path: &str) -> Got {
    got(agent().get(&format!("http://{http}{path}")).call())
}

/// `/metrics` as parsed by `prometheus-parse`: name (without `notifd_`) → value, after
/// checking that every sample has its HELP and a counter or gauge TYPE.
fn parse_metrics(body: &str) -> HashMap<String, u64> {
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    let mut out = HashMap::new();
    for s in scrape.samples {
        assert!(scrape.docs.contains_key(&s.metric), "{} has no HELP", s.metric);
        let v = match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            other => panic!("{}: not a counter or a gauge: {other:?}", s.metric),
        };
        let name = s.metric.strip_prefix("notifd_").expect("notifd_ prefix").to_owned();
        assert!(out.insert(name, v as u64).is_none(), "{} twice", s.metric);
    }
    out
}

/// STATS over the protocol: name → value, checking the `+OK STATS <count>` line.
fn stats(c: &mut util::Client) -> HashMap<String, u64> {
    c.cmd("STATS");
    let mut out = HashMap::new();
    loop {
        let l = c.line();
        if let Some(n) = l.strip_prefix("+OK STATS ") {
            assert_eq!(n.parse::<usize>().unwrap(), out.len(), "{l}");
            return out;
        }
        let mut w = l.split(' ');
        let (Some("STAT"), Some(name), Some(v), None) = (w.next(), w.next(), w.next(), w.next()) else {
            panic!("not a STAT line: {l:?}");
        };
        assert!(out.insert(name.to_owned(), v.parse().unwrap()).is_none(), "{name} twice");
    }
}

/// The counters that PROTOCOL.md's STATS names at least.
const NAMES: [&str; 14] = [
    "uptime_seconds",
    "connections",
    "connections_total",
    "live_subscriptions",
    "publications_total",
    "messages_sent_total",
    "slow_consumers_total",
    "stored_subscriptions",
    "pending_subscriptions",
    "outbox_pending",
    "emails_sent_total",
    "emails_failed_total",
    "store_restarts_total",
    "mailer_restarts_total",
];

#[test]
fn health_and_the_security_headers() {
    let (d, http) = start("");
    let g = get(http, "/health");
    assert_eq!((g.status, g.body.as_str()), (200, "ok"));
    assert!(g.headers["content-type"].starts_with("text/plain"), "{:?}", g.headers);
    for (name, want) in [
        ("connection", "close"),
        ("cache-control", "no-store"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
    ] {
        assert_eq!(g.headers.get(name).map(String::as_str), Some(want), "{name}");
    }
    // HEAD: the same headers, the length of the body, and no body.
    let h = got(agent().head(&format!("http://{http}/health")).call());
    assert_eq!((h.status, h.body.as_str()), (200, ""));
    assert_eq!(h.headers["content-length"], "2");
    assert_eq!(h.headers["cache-control"], "no-store");
    drop(d);
    // No http_host: no HTTP listener.
    let plain = Daemon::start("");
    plain.client().cmd("PING");
    assert!(!plain.log_has("http listening"), "{}", plain.log_text());
}

#[test]
fn stats_and_metrics_show_the_same_numbers() {
    let (d, http) = start("");
    // Two subscribers of e, one of them also of other, one with two addresses.
    let mut conns = [d.client(), d.client()];
    for (i, event, email) in [(0, "e", "a"), (0, "e", "b"), (1, "e", "c"), (1, "other", "c")] {
        conns[i].cmd(&format!("SUB {event} {email}@example.org"));
        conns[i].expect(&format!("+OK SUB {event}"));
    }
    let mut p = d.client();
    for text in ["one", "two"] {
        let (_, n) = util::publish(&mut p, "e", text);
        assert_eq!(n, 2);
    }
    util::publish(&mut p, "nobody", "hello");
    let s = stats(&mut p);
    let m = parse_metrics(&get(http, "/metrics").body);
    for name in NAMES {
        assert!(s.contains_key(name), "STATS lacks {name}: {s:?}");
    }
    assert_eq!(s.keys().collect::<std::collections::BTreeSet<_>>(), m.keys().collect(), "the same names");
    for (name, v) in &s {
        if name != "uptime_seconds" {
            assert_eq!(m[name], *v, "{name}: /metrics and STATS differ");
        }
    }
    assert!(m["uptime_seconds"] >= s["uptime_seconds"]);
    let want = [
        ("connections", 3),
        ("connections_total", 3),
        ("live_subscriptions", 4),
        ("publications_total", 3),
        ("messages_sent_total", 4),
        ("slow_consumers_total", 0),
        ("stored_subscriptions", 4),
        ("pending_subscriptions", 0),
        ("outbox_pending", 0),
        ("store_restarts_total", 0),
        ("mailer_restarts_total", 0),
    ];
    for (name, v) in want {
        assert_eq!(s[name], v, "{name}");
    }
    // The body the metrics were read from is the Prometheus text format.
    let g = get(http, "/metrics");
    assert_eq!(g.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    assert!(g.body.contains("# TYPE notifd_publications_total counter\n"), "{}", g.body);
    assert!(g.body.contains("# TYPE notifd_connections gauge\n"), "{}", g.body);
    // A connection gone, its live subscriptions gone with it.
    let [a, _b] = conns;
    drop(a);
    util::wait_until("the connection to close", WAIT, || stats(&mut p)["connections"] == 2);
    let s = stats(&mut p);
    assert_eq!((s["live_subscriptions"], s["connections_total"]), (2, 3));
}

#[test]
fn metrics_refused_through_a_proxy_or_without_the_token() {
    let (d, http) = start("");
    let url = format!("http://{http}/metrics");
    assert_eq!(got(agent().get(&url).call()).status, 200);
    for (name, value) in
        [("X-Forwarded-For", "203.0.113.9"), ("Forwarded", "for=203.0.113.9"), ("X-Real-IP", "1.2.3.4")]
    {
        let g = got(agent().get(&url).set(name, value).call());
        assert_eq!(g.status, 403, "{name}");
    }
    drop(d);
    let (d, http) = start(&format!("publish_token = \"{TOKEN}\""));
    let url = format!("http://{http}/metrics");
    assert_eq!(got(agent().get(&url).call()).status, 403, "loopback is not enough with a token set");
    let wrong = format!("Bearer {}x", TOKEN);
    assert_eq!(got(agent().get(&url).set("Authorization", &wrong).call()).status, 403);
    let basic = format!("Basic {TOKEN}");
    assert_eq!(got(agent().get(&url).set("Authorization", &basic).call()).status, 403);
    let right = format!("Bearer {TOKEN}");
    let g = got(agent().get(&url).set("Authorization", &right).call());
    assert_eq!(g.status, 200);
    parse_metrics(&g.body);
    // The bearer counts through a proxy too: it is the secret, not the address.
    let g = got(agent().get(&url).set("Authorization", &right).set("X-Forwarded-For", "203.0.113.9").call());
    assert_eq!(g.status, 200);
    // STATS: untrusted without AUTH, trusted after.
    let mut c = d.client();
    c.cmd("STATS");
    c.expect_err("AUTH");
    c.cmd(&format!("AUTH {TOKEN}"));
    c.expect("+OK AUTH");
    assert_eq!(stats(&mut c).len(), NAMES.len());
    c.sync();
    assert!(!d.log_text().contains(TOKEN), "the token reached the log");
}

#[test]
fn every_bound() {
    let (d, http) = start("");
    let base = format!("http://{http}");
    // A head over 8 KiB.
    let g = got(agent().get(&format!("{base}/health")).set("X-Padding", &"a".repeat(9000)).call());
    assert_eq!(g.status, 431);
    // A body over 4 KiB.
    let body = format!("confirm=1&pad={}", "b".repeat(5000));
    let g = got(agent()
        .post(&format!("{base}/confirm/{LINK}"))
        .set("Content-Type", "application/x-www-form-urlencoded")
        .send_string(&body));
    assert_eq!(g.status, 413);
    // Unknown paths.
    for path in ["/", "/healthz", "/metrics/", "/confirm/short"] {
        assert_eq!(get(http, path).status, 404, "{path}");
    }
    // Other methods: 405 and what is allowed.
    for (method, path, allow) in [
        ("PUT", "/health".to_owned(), "GET, HEAD"),
        ("POST", "/metrics".to_owned(), "GET, HEAD"),
        ("DELETE", format!("/confirm/{LINK}"), "GET, HEAD, POST"),
    ] {
        let g = got(agent().request(method, &format!("{base}{path}")).call());
        assert_eq!(g.status, 405, "{method} {path}");
        assert_eq!(g.headers.get("allow").map(String::as_str), Some(allow), "{method} {path}");
    }
    // Until the consent store exists, no link is valid (GET and POST alike).
    assert_eq!(get(http, &format!("/confirm/{LINK}")).status, 404);
    assert_eq!(get(http, &format!("/unsubscribe/{LINK}")).status, 404);
    let g = got(agent()
        .post(&format!("{base}/unsubscribe/{LINK}"))
        .set("Content-Type", "application/x-www-form-urlencoded")
        .send_string("List-Unsubscribe=One-Click"));
    assert_eq!(g.status, 404);
    assert!(!d.log_text().contains(LINK), "a link token reached the log");
    // The daemon still serves after all that.
    assert_eq!(get(http, "/health").status, 200);
}

/// Reads until EOF or `limit`; returns what came and when the connection closed.
fn read_to_close(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let start = Instant::now();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        s.set_read_timeout(Some(limit - start.elapsed().min(limit) + Duration::from_millis(1))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (all, Some(start.elapsed())),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (all, Some(start.elapsed())),
            Err(e) => panic!("read: {e}"),
        }
    }
    (all, None)
}

#[test]
fn a_silent_connection_is_closed_after_ten_seconds() {
    let (d, http) = start("");
    let mut silent = TcpStream::connect(http).unwrap();
    let mut partial = TcpStream::connect(http).unwrap();
    partial.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
    let (bytes, closed) = read_to_close(&mut silent, Duration::from_secs(30));
    let closed = closed.expect("closed within 30 s");
    assert!(bytes.is_empty(), "{:?}", String::from_utf8_lossy(&bytes));
    assert!(closed >= Duration::from_secs(9), "closed after {closed:?}: too early");
    let (bytes, closed) = read_to_close(&mut partial, Duration::from_secs(10));
    assert!(closed.is_some() && bytes.is_empty(), "{:?}", String::from_utf8_lossy(&bytes));
    d.wait_log(|l| l.contains("no whole request within 10 s"), WAIT);
    assert_eq!(get(http, "/health").status, 200);
}

#[test]
fn http_max_clients_is_a_bound() {
    let (d, http) = start("http_max_clients = 2");
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(http).unwrap()).collect();
    d.wait_log_count("http connected", 2, WAIT);
    let g = get(http, "/health");
    assert_eq!(g.status, 503, "{}", g.body);
    assert!(g.body.contains("Too many connections"), "{}", g.body);
    d.wait_log(|l| l.contains("over http_max_clients (2)"), WAIT);
    // The client listener is not affected.
    d.client().cmd("PING");
    drop(held);
    util::wait_until("a free HTTP slot", WAIT, || get(http, "/health").status == 200);
}

#[test]
fn health_says_when_the_store_is_stuck() {
    let (d, http) = start("store_timeout = 1");
    assert_eq!(get(http, "/health").status, 200);
    let mut c = d.client();
    // Answered, so the store has reserved the first ids too.
    c.cmd("SUB warmup a@example.org");
    c.expect("+OK SUB warmup");
    let cont = util::stop_process(d.store_pid());
    c.cmd("SUB e a@example.org");
    c.expect_err("UNAVAILABLE");
    let mut last = String::new();
    util::wait_until("/health to say the store is down", WAIT, || {
        let g = get(http, "/health");
        last = g.body;
        g.status == 503
    });
    assert_eq!(last, "down: store");
    // /metrics needs the store: 503 once store_timeout has passed.
    let g = get(http, "/metrics");
    assert_eq!(g.status, 503, "{}", g.body);
    drop(cont);
    util::wait_until("/health to recover", WAIT, || get(http, "/health").status == 200);
    assert_eq!(get(http, "/metrics").status, 200);
}

#[test]
fn health_names_a_mailer_that_is_down() {
    let (d, http) = start("mail_transport = \"spool\"\nmail_workers = 2");
    util::wait_until("both mailers up", WAIT, || get(http, "/health").status == 200);
    // A killed mailer is down until its restart, which waits longer after each quick
    // death: kill it until /health is seen between the death and the restart.
    let mut seen = None;
    for _ in 0..6 {
        let pid = *d.child_pids("notifd-mailer 1").last().expect("mailer 1 started");
        let restarts = d.log_count("notifd-mailer 1 restarted");
        util::signal(pid, libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(3);
        while seen.is_none() && Instant::now() < deadline {
            let g = get(http, "/health");
            if g.status == 503 {
                seen = Some(g.body);
            }
        }
        util::wait_until("the mailer restarted", WAIT, || {
            d.log_count("notifd-mailer 1 restarted") > restarts
        });
        if seen.is_some() {
            break;
        }
    }
    assert_eq!(seen.as_deref(), Some("down: mailer 1"), "/health while mailer 1 was down");
    util::wait_until("/health to recover", WAIT, || get(http, "/health").status == 200);
    let m = parse_metrics(&get(http, "/metrics").body);
    assert!(m["mailer_restarts_total"] >= 1, "{m:?}");
    assert_eq!(m["store_restarts_total"], 0);
}

#[test]
fn the_http_side_is_dual_stack() {
    if !util::have_ipv6_loopback() {
        return util::skip("the_http_side_is_dual_stack", "no IPv6 loopback");
    }
    let d = Daemon::start("http_host = \"::\"\nhttp_port = 0");
    let port = http_addr(&d).port();
    for ip in ["127.0.0.1", "[::1]"] {
        let g = got(agent().get(&format!("http://{ip}:{port}/health")).call());
        assert_eq!(g.status, 200, "{ip}");
    }
    // Through the dual-stack socket an IPv4 loopback client is still loopback.
    assert_eq!(got(agent().get(&format!("http://127.0.0.1:{port}/metrics")).call()).status, 200);
}

#[test]
fn a_slow_consumer_is_counted() {
    let (d, http) = start("max_pending = 4096\nsync = \"normal\"");
    // A subscriber with a small receive buffer that never reads after its SUB.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.set_mss(536).unwrap();
    sock.connect(&d.addr().into()).unwrap();
    let mut slow = util::Client::from_stream(sock.into());
    assert!(slow.line().starts_with("HELLO notifd 1"));
    slow.cmd("SUB feed slow@example.org");
    slow.expect("+OK SUB feed");
    let mut p = d.client();
    let text = "x".repeat(1000);
    for _ in 0..2000 {
        util::publish(&mut p, "feed", &text);
        if d.log_has("slow consumer") {
            break;
        }
    }
    d.wait_log(|l| l.contains("slow consumer"), WAIT);
    let m = parse_metrics(&get(http, "/metrics").body);
    assert_eq!(m["slow_consumers_total"], 1);
    assert_eq!(stats(&mut p)["slow_consumers_total"], 1);
}

/// `notif ARGS` to the daemon on 127.0.0.1, killed if it runs past 30 s; its status and
/// standard output.
fn notif(port: u16, args: &[&str]) -> (i32, String, String) {
    let mut child = util::notif_command(port, args).spawn().expect("start notif");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("notif {args:?} still runs after 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[test]
fn notif_stats_prints_the_counters() {
    let d = Daemon::start(&format!("publish_token = \"{TOKEN}\""));
    let (status, out, err) = notif(d.port, &["-a", TOKEN, "stats"]);
    assert_eq!(status, 0, "{err}");
    let got: Vec<&str> = out.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(got, NAMES, "{out}");
    assert!(out.lines().all(|l| l.split(' ').nth(1).is_some_and(|v| v.parse::<u64>().is_ok())), "{out}");
    assert!(out.contains("\nconnections 1\n"), "{out}");
    // Without the token: the server's refusal, exit 1.
    let (status, out, err) = notif(d.port, &["stats"]);
    assert_eq!((status, out.as_str()), (1, ""), "{err}");
    assert!(err.contains("-ERR AUTH"), "{err}");
}
