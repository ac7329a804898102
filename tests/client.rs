//! notif(1) against the real daemon: black-box, through the built binaries, with a
//! temporary configuration (`port = 0`, the port read from the `listening on ADDRESS`
//! log line). The daemon's log is dumped when a test fails.

mod util;

use std::io::{self, BufRead, BufReader, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use util::{is_rfc3339_utc, Daemon};

const NOTIF: &str = env!("CARGO_BIN_EXE_notif");
/// Generous: the machines are shared.
const WAIT: Duration = Duration::from_secs(30);
/// A `publish_token` long enough not to draw a warning.
const TOKEN: &str = "client-test-token-0123456789";

/// notif with `args`, none of the `NOTIF_*` variables of whoever runs the tests.
fn notif_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(NOTIF);
    cmd.env_remove("NOTIF_HOST").env_remove("NOTIF_PORT").env_remove("NOTIF_TOKEN").args(args);
    cmd
}

/// notif to a daemon on 127.0.0.1 (the tests' default `host`).
fn notif(port: u16, args: &[&str]) -> Output {
    let mut cmd = notif_cmd(&["-H", "127.0.0.1", "-p", &port.to_string()]);
    cmd.args(args);
    run(cmd)
}

/// Runs a command to completion, killed after WAIT.
fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    if let Err(e) = wait_exit(&mut child) {
        let out = child.wait_with_output().unwrap();
        panic!("{cmd:?}: {e}: {}", text(&out.stderr));
    }
    child.wait_with_output().unwrap()
}

/// Waits up to WAIT for `child` to exit; kills it at the timeout.
fn wait_exit(child: &mut Child) -> Result<ExitStatus, String> {
    let end = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Ok(status);
        }
        if Instant::now() > end {
            let _ = child.kill();
            return Err(format!("still running after {WAIT:?}"));
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
    fn start(server: SocketAddr, email: &str, events: &[&str]) -> Subscriber {
        Subscriber::spawn(server, email, events, true)
    }

    /// `stdout_open = false`: the read end of its stdout is closed at once.
    fn spawn(server: SocketAddr, email: &str, events: &[&str], stdout_open: bool) -> Subscriber {
        let mut child = notif_cmd(&["-H", &server.ip().to_string(), "-p", &server.port().to_string()])
            .arg("sub")
            .arg(email)
            .args(events)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let out = if stdout_open { lines(stdout) } else { mpsc::channel().1 };
        Subscriber { out, err: lines(child.stderr.take().unwrap()), child }
    }

    fn next_line(&self) -> String {
        self.out.recv_timeout(WAIT).expect("a notification line from notif sub")
    }

    /// Waits for a stderr line containing `word`, skipping others.
    fn said(&self, word: &str) -> String {
        util::said(&self.err, word, "notif sub")
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

/// A TCP relay on a port of its own that forwards each connection to the daemon it is
/// pointed at. A daemon restarted with `port = 0` comes back on a new port; the relay
/// keeps the one address its clients know, so no test releases a port and hopes to
/// bind it again. Pointed at nothing, it closes each connection at once.
struct Relay {
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let relay = Relay { addr, target: Arc::new(Mutex::new(Some(target))), stop: Arc::default() };
        let (target, stop) = (Arc::clone(&relay.target), Arc::clone(&relay.stop));
        thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (Ok(client), Some(to)) = (client, *target.lock().unwrap()) else {
                    continue;
                };
                if let Ok(server) = TcpStream::connect_timeout(&to, WAIT) {
                    splice(client, server);
                }
            }
        });
        relay
    }

    fn point_to(&self, target: Option<SocketAddr>) {
        *self.target.lock().unwrap() = target;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread, which then ends.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies both ways; when either side ends, both connections are shut down.
fn splice(a: TcpStream, b: TcpStream) {
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    for (mut from, mut to) in [(a, b), (b2, a2)] {
        thread::spawn(move || {
            let _ = io::copy(&mut from, &mut to);
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        });
    }
}

#[test]
fn ping_prints_pong() {
    let d = Daemon::start("");
    let o = notif(d.port, &["ping"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "PONG\n");
    let o = notif(d.port, &["ping", "hello", "there"]);
    assert_eq!(code(&o), 0);
    assert_eq!(text(&o.stdout), "PONG hello there\n");
}

#[test]
fn pub_prints_growing_ids_and_list_exits_0() {
    let d = Daemon::start("");
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
    let d = Daemon::start("");
    let sub = Subscriber::start(d.addr(), "ana@example.com", &["orders.shipped", "orders.paid"]);
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
    let mut d = Daemon::start("");
    let relay = Relay::start(d.addr());
    let sub = Subscriber::start(relay.addr, "bo@example.com", &["deploys"]);
    wait_subscribed(d.port, "bo@example.com", "deploys ");
    // Until the restarted daemon is up, the relay refuses: whatever takes the old port
    // meanwhile is not mistaken for it.
    relay.point_to(None);
    assert!(d.stop().success());
    sub.said("reconnect");
    // Same database, and the same address for the subscriber: it comes back by itself.
    d.restart();
    relay.point_to(Some(d.addr()));
    sub.said("reconnected");
    let o = notif(d.port, &["pub", "deploys", "v2 is out"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let id = text(&o.stdout).trim().to_string();
    assert_eq!(sub.next_line(), format!("deploys {id} v2 is out"));
}

#[test]
fn sub_exits_0_without_a_word_when_its_stdout_closes() {
    let d = Daemon::start("");
    let mut sub = Subscriber::spawn(d.addr(), "cy@example.com", &["news"], false);
    wait_subscribed(d.port, "cy@example.com", "news ");
    // notif learns that its stdout is closed when it prints the next notification.
    let o = notif(d.port, &["pub", "news", "nobody reads this"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let status = wait_exit(&mut sub.child).expect("notif sub exits once its stdout is closed");
    assert_eq!(status.code(), Some(0), "{status}");
    let said: Vec<String> = sub.err.iter().collect();
    assert!(said.is_empty(), "{said:?}");
}

#[test]
fn server_errors_exit_1_with_the_line_on_stderr() {
    let d = Daemon::start("");
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
    let closed = util::ClosedPort::new();
    let port = closed.port;
    let o = run(notif_cmd(&["-H", "127.0.0.1", "-p", &port.to_string(), "ping"]));
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
        &["-é", "ping"],
        &["--host", "127.0.0.1", "ping"],
        &["-H"],
        &["pub", "ev", "two\nlines"],
    ] {
        let o = run(notif_cmd(args));
        assert_eq!(code(&o), 2, "notif {args:?}: {}", text(&o.stderr));
        assert!(text(&o.stderr).contains("usage"), "notif {args:?}");
    }
}

#[test]
fn help_exits_0_with_the_usage_on_stdout() {
    for args in [&["-h"][..], &["--help"], &["-p", "1", "-h", "ping"]] {
        let o = run(notif_cmd(args));
        assert_eq!(code(&o), 0, "notif {args:?}: {}", text(&o.stderr));
        assert!(text(&o.stdout).starts_with("usage: notif [-h] "), "notif {args:?}: {}", text(&o.stdout));
        assert!(o.stderr.is_empty(), "notif {args:?}: {}", text(&o.stderr));
    }
}

#[test]
fn ipv6_literal_with_and_without_brackets() {
    if !util::have_ipv6_loopback() {
        eprintln!("SKIPPED: ipv6_literal_with_and_without_brackets: no IPv6 loopback (::1) here");
        return;
    }
    let d = Daemon::start("host = \"::1\"");
    for host in ["::1", "[::1]"] {
        let o = run(notif_cmd(&["-H", host, "-p", &d.port.to_string(), "ping", "over", "IPv6"]));
        assert_eq!(code(&o), 0, "-H {host}: {}", text(&o.stderr));
        assert_eq!(text(&o.stdout), "PONG over IPv6\n", "-H {host}");
    }
}

#[test]
fn a_authenticates_with_the_token() {
    let d = Daemon::start(&format!("publish_token = \"{TOKEN}\""));
    let mut watcher = d.client();
    // Untrusted without the token: stored pending, delivered live all the same.
    watcher.cmd("SUB alerts w@example.com");
    watcher.expect("+OK SUB alerts pending");
    // Loopback is not enough once the server has a token.
    let o = notif(d.port, &["pub", "alerts", "no token"]);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("-ERR AUTH"), "{}", text(&o.stderr));
    let o = notif(d.port, &["-a", "not-the-token-at-all", "pub", "alerts", "wrong token"]);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("-ERR AUTH"), "{}", text(&o.stderr));
    let o = notif(d.port, &["-a", TOKEN, "pub", "alerts", "with the token"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let id = text(&o.stdout).trim().to_string();
    watcher.expect(&format!("MSG alerts {id} with the token"));
    let o = notif(d.port, &["-a", TOKEN, "list", "w@example.com"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert!(text(&o.stdout).starts_with("alerts "), "{}", text(&o.stdout));
}

#[test]
fn notif_variables_are_the_defaults_of_h_p_and_a() {
    let d = Daemon::start(&format!("publish_token = \"{TOKEN}\""));
    let mut watcher = d.client();
    // Untrusted without the token: stored pending, delivered live all the same.
    watcher.cmd("SUB env.test w@example.com");
    watcher.expect("+OK SUB env.test pending");
    let port = d.port.to_string();
    let closed = util::ClosedPort::new();
    let refused = closed.port;
    let refused = refused.to_string();
    let publish = |env: &[(&str, &str)], opts: &[&str], text: &str| -> Output {
        let mut cmd = notif_cmd(opts);
        cmd.args(["pub", "env.test", text]).envs(env.iter().copied());
        run(cmd)
    };

    // The three variables alone reach the daemon and authenticate.
    let env = [("NOTIF_HOST", "127.0.0.1"), ("NOTIF_PORT", port.as_str()), ("NOTIF_TOKEN", TOKEN)];
    let o = publish(&env, &[], "from the environment");
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    watcher.expect(&format!("MSG env.test {} from the environment", text(&o.stdout).trim()));

    // Options win over the variables (which point nowhere, with a wrong token).
    let env =
        [("NOTIF_HOST", "127.0.0.2"), ("NOTIF_PORT", refused.as_str()), ("NOTIF_TOKEN", "wrong-token-wrong")];
    let o = publish(&env, &["-H", "127.0.0.1", "-p", &port, "-a", TOKEN], "options win");
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    watcher.expect(&format!("MSG env.test {} options win", text(&o.stdout).trim()));
    // ... and each variable counts on its own.
    let o = publish(&env, &["-p", &port, "-a", TOKEN], "host from NOTIF_HOST");
    assert_eq!(code(&o), 3, "127.0.0.2 has no server: {}", text(&o.stderr));
    let o = publish(&env, &["-H", "127.0.0.1", "-a", TOKEN], "port from NOTIF_PORT");
    assert_eq!(code(&o), 3, "the refused port: {}", text(&o.stderr));
    let o = publish(&env, &["-H", "127.0.0.1", "-p", &port], "token from NOTIF_TOKEN");
    assert_eq!(code(&o), 1, "the wrong token: {}", text(&o.stderr));
    assert!(text(&o.stderr).contains("-ERR AUTH"), "{}", text(&o.stderr));

    let o = publish(&[("NOTIF_PORT", "notaport")], &[], "bad port");
    assert_eq!(code(&o), 2, "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("NOTIF_PORT"), "{}", text(&o.stderr));
    assert_eq!(watcher.sync(), Vec::<String>::new(), "only the two publications that succeeded");
}
