//! notif(1) and notif-bench against the real daemon: black-box, through the built
//! binaries, with a temporary configuration (`port = 0`, the port read from the
//! `listening on ADDRESS` log line). The daemon's log is dumped when a test fails.

mod util;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};
use util::Daemon;

/// Every daemon here lets one connection hold many subscriptions (the bench smoke run).
const CONF: &str = "max_subs_per_conn = 1000000";
const NOTIF: &str = env!("CARGO_BIN_EXE_notif");
const BENCH: &str = env!("CARGO_BIN_EXE_notif-bench");
/// Generous: the machines are shared.
const WAIT: Duration = Duration::from_secs(30);

fn notif(port: u16, args: &[&str]) -> Output {
    let mut cmd = Command::new(NOTIF);
    cmd.arg("-p").arg(port.to_string()).args(args);
    run(cmd)
}

/// Runs a command to completion, killed after WAIT.
fn run(mut cmd: Command) -> Output {
    cmd.env_remove("NOTIF_HOST")
        .env_remove("NOTIF_PORT")
        .env_remove("NOTIF_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let end = Instant::now() + WAIT;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > end {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("{cmd:?} did not finish: {}", text(&out.stderr));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

/// A running `notif sub`, its stdout and stderr lines arriving on channels.
struct Subscriber {
    child: Child,
    out: Receiver<String>,
    err: Receiver<String>,
}

impl Subscriber {
    fn start(port: u16, email: &str, events: &[&str]) -> Subscriber {
        let mut child = Command::new(NOTIF)
            .env_remove("NOTIF_HOST")
            .env_remove("NOTIF_PORT")
            .arg("-H")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(port.to_string())
            .arg("sub")
            .arg(email)
            .args(events)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Subscriber {
            out: lines(child.stdout.take().unwrap()),
            err: lines(child.stderr.take().unwrap()),
            child,
        }
    }

    fn next_line(&self) -> String {
        self.out.recv_timeout(WAIT).expect("a notification line from notif sub")
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines<R: Read + Send + 'static>(r: R) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits until `notif list EMAIL` shows `event`: the SUB was read and committed.
fn wait_subscribed(port: u16, email: &str, event: &str) {
    let end = Instant::now() + WAIT;
    loop {
        let o = notif(port, &["list", email]);
        if code(&o) == 0 && text(&o.stdout).lines().any(|l| l.starts_with(event)) {
            return;
        }
        assert!(Instant::now() < end, "{email} never subscribed to {event}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

#[test]
fn ping_prints_pong() {
    let d = Daemon::start(CONF);
    let o = notif(d.port, &["ping"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "PONG\n");
    let o = notif(d.port, &["ping", "hello", "there"]);
    assert_eq!(code(&o), 0);
    assert_eq!(text(&o.stdout), "PONG hello there\n");
}

#[test]
fn pub_prints_growing_ids_and_list_exits_0() {
    let d = Daemon::start(CONF);
    let mut last = 0u64;
    for _ in 0..3 {
        let o = notif(d.port, &["pub", "orders.shipped", "Order", "1042", "shipped"]);
        assert_eq!(code(&o), 0, "{}", text(&o.stderr));
        let id: u64 = text(&o.stdout).trim().parse().expect("an id on stdout");
        assert!(id > last, "ids grow: {id} after {last}");
        last = id;
    }
    let o = notif(d.port, &["list", "nobody@example.com"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "");
}

#[test]
fn sub_prints_what_another_notif_publishes() {
    let d = Daemon::start(CONF);
    let sub = Subscriber::start(d.port, "ana@example.com", &["orders.shipped", "orders.paid"]);
    wait_subscribed(d.port, "ana@example.com", "orders.shipped ");
    wait_subscribed(d.port, "ana@example.com", "orders.paid ");
    let o = notif(d.port, &["pub", "orders.shipped", "Order 1042 has  shipped"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let id = text(&o.stdout).trim().to_string();
    assert_eq!(sub.next_line(), format!("orders.shipped {id} Order 1042 has  shipped"));
    let o = notif(d.port, &["pub", "orders.paid", "paid"]);
    let id = text(&o.stdout).trim().to_string();
    assert_eq!(sub.next_line(), format!("orders.paid {id} paid"));

    // list: `EVENT TIMESTAMP`, ordered by event name.
    let o = notif(d.port, &["list", "ana@example.com"]);
    assert_eq!(code(&o), 0);
    let out = text(&o.stdout);
    let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(rows[0][0], "orders.paid");
    assert_eq!(rows[1][0], "orders.shipped");
    for r in &rows {
        assert_eq!(r.len(), 2, "{out}");
        assert!(is_rfc3339_utc(r[1]), "timestamp {:?}", r[1]);
    }
}

#[test]
fn sub_reconnects_and_subscribes_again() {
    let mut d = Daemon::start(CONF);
    let port = d.port;
    let sub = Subscriber::start(port, "bo@example.com", &["deploys"]);
    wait_subscribed(port, "bo@example.com", "deploys ");
    assert!(d.stop().success());
    let said = sub.err.recv_timeout(WAIT).expect("a word on stderr");
    assert!(said.contains("reconnect"), "{said}");
    // Same port, same database: the subscriber comes back by itself.
    let conf = std::fs::read_to_string(&d.conf).unwrap().replace("port = 0", &format!("port = {port}"));
    std::fs::write(&d.conf, conf).unwrap();
    d.restart();
    let end = Instant::now() + WAIT;
    loop {
        let line = sub.err.recv_timeout(WAIT).expect("more on stderr");
        if line.contains("reconnected") {
            break;
        }
        assert!(Instant::now() < end, "no reconnection");
    }
    let o = notif(d.port, &["pub", "deploys", "v2 is out"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let id = text(&o.stdout).trim().to_string();
    assert_eq!(sub.next_line(), format!("deploys {id} v2 is out"));
}

#[test]
fn server_errors_exit_1_with_the_line_on_stderr() {
    let d = Daemon::start(CONF);
    let o = notif(d.port, &["pub", "bad*event", "text"]);
    assert_eq!(code(&o), 1);
    assert!(text(&o.stderr).contains("-ERR EVENT"), "{}", text(&o.stderr));
    let o = notif(d.port, &["list", "not-an-address"]);
    assert_eq!(code(&o), 1);
    assert!(text(&o.stderr).contains("-ERR EMAIL"), "{}", text(&o.stderr));
    let o = notif(d.port, &["sub", "ana@example.com", "bad*event"]);
    assert_eq!(code(&o), 1);
    assert!(text(&o.stderr).contains("-ERR EVENT"), "{}", text(&o.stderr));
}

#[test]
fn exit_3_when_nothing_listens() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cmd = Command::new(NOTIF);
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string(), "ping"]);
    let o = run(cmd);
    assert_eq!(code(&o), 3, "{}", text(&o.stderr));
    assert!(!o.stderr.is_empty());
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &[][..],
        &["frobnicate"],
        &["pub", "only-an-event"],
        &["sub", "ana@example.com"],
        &["list"],
        &["list", "a@example.com", "b@example.com"],
        &["-p", "notaport", "ping"],
        &["-p", "70000", "ping"],
        &["-x", "ping"],
        &["-H"],
        &["pub", "ev", "two\nlines"],
    ] {
        let mut cmd = Command::new(NOTIF);
        cmd.args(args);
        let o = run(cmd);
        assert_eq!(code(&o), 2, "notif {args:?}: {}", text(&o.stderr));
        assert!(text(&o.stderr).contains("usage"), "notif {args:?}");
    }
}

#[test]
fn ipv6_literal() {
    if TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    }
    let d = Daemon::start(&format!("host = \"::\"\n{CONF}"));
    let mut cmd = Command::new(NOTIF);
    cmd.args(["-H", "::1", "-p", &d.port.to_string(), "ping"]);
    let o = run(cmd);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "PONG\n");
}

fn result_field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

fn bench(args: &[&str]) -> String {
    let mut cmd = Command::new(BENCH);
    cmd.args(args);
    let o = run(cmd);
    assert_eq!(code(&o), 0, "notif-bench {args:?}: {}", text(&o.stderr));
    let out = text(&o.stdout);
    out.lines()
        .rfind(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line in {out:?}"))
        .to_string()
}

/// CI does not run the benchmark; this keeps the generator honest against notifd.
#[test]
fn bench_smoke() {
    let d = Daemon::start(CONF);
    let addr = format!("127.0.0.1:{}", d.port);
    let r = bench(&[
        "--server",
        "notifd",
        "--addr",
        &addr,
        "--scenario",
        "fanout",
        "--subs",
        "5",
        "--msgs",
        "200",
        "--timeout",
        "20",
    ]);
    assert_eq!(result_field(&r, "delivered"), "1000", "{r}");
    assert_eq!(result_field(&r, "lost"), "0", "{r}");
    assert_eq!(result_field(&r, "errors"), "0", "{r}");
    let r = bench(&[
        "--server",
        "notifd",
        "--addr",
        &addr,
        "--scenario",
        "durable",
        "--kind",
        "sub",
        "--conns",
        "2",
        "--inflight",
        "8",
        "--duration",
        "0.3",
        "--timeout",
        "20",
    ]);
    assert!(result_field(&r, "acked").parse::<u64>().unwrap() > 0, "{r}");
    assert_eq!(result_field(&r, "errors"), "0", "{r}");
    let db = d.dir.path().join("baseline.db");
    let r = bench(&["--scenario", "sqlite", "--db", db.to_str().unwrap(), "--duration", "0.1"]);
    assert!(r.contains("mode=batch10000"), "{r}");
    assert!(!Path::new(&db).exists(), "the baseline cleans up after itself");
}
