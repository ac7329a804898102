//! Replay and WATCH as notifd-protocol(7) states them: a client that reconnects with
//! SINCE the last id it got misses nothing and gets nothing twice (while publications
//! keep coming, across store crashes and daemon restarts), a replay of a million kept
//! notifications to a slow reader stays in bounded memory, GAP after `keep_days`,
//! `max_replays`, an interrupted replay, bad input, and WATCH sharing delivery with SUB.

mod util;

use socket2::{Domain, Socket, Type};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use util::{extra, Client, Daemon, WAIT};

const DAY: i64 = 86_400;

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A socket with a small receive buffer: a reader the server cannot hide in the kernel.
fn small_buffer(addr: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect_timeout(&addr.into(), WAIT).unwrap();
    s.into()
}

/// A connection with a small receive buffer, its greeting read: the writing half and a
/// reader over a 4 KiB buffer, so that the server meets a slow reader.
fn slow_reader(addr: SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    let sock = small_buffer(addr);
    let w = sock.try_clone().unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut r = BufReader::with_capacity(4096, sock);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("HELLO "), "{line:?}");
    (w, r)
}

/// Stops the daemon, adds `n` notifications of `event` straight into its database with
/// ids from the next unreserved one (moving `next_id` past them, as a reservation
/// would), and starts it again. Returns the first id.
fn insert_kept(d: &mut Daemon, event: &str, n: u64, text: &str) -> u64 {
    d.stop();
    let mut db = extra::db_rw(&d.path("db/notifd.db"));
    let tx = db.transaction().unwrap();
    let first: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'next_id'", [], |r| r.get(0)).unwrap();
    {
        let mut st = tx
            .prepare("INSERT INTO notifications(id, event, text, created_at) VALUES (?1, ?2, ?3, ?4)")
            .unwrap();
        for id in first..first + n as i64 {
            st.execute((id, event, text, now())).unwrap();
        }
    }
    tx.execute("UPDATE meta SET value = ?1 WHERE key = 'next_id'", [first + n as i64]).unwrap();
    tx.commit().unwrap();
    drop(db);
    d.restart();
    first as u64
}

/// The id of a `MSG <event> <id> <text>` line of `event`.
fn msg_id(line: &str, event: &str) -> Option<u64> {
    let rest = line.strip_prefix("MSG ")?.strip_prefix(event)?.strip_prefix(' ')?;
    rest.split(' ').next()?.parse().ok()
}

/// Reads lines up to the `PONG` of a PING: the ids of the `MSG`s of `event` (other lines
/// must not come).
fn ids_until_pong(c: &mut Client, event: &str) -> Vec<u64> {
    c.sync().iter().map(|l| msg_id(l, event).unwrap_or_else(|| panic!("unexpected {l:?}"))).collect()
}

/// The next lines are `MSG`s of `event` with exactly these ids, and nothing else follows
/// before the `PONG` of a PING sent after them.
fn expect_ids(c: &mut Client, event: &str, want: &[u64]) {
    let got: Vec<u64> = (0..want.len())
        .map(|_| {
            let l = c.line();
            msg_id(&l, event).unwrap_or_else(|| panic!("expected a MSG of {event}, got {l:?}"))
        })
        .collect();
    assert_eq!(got, want);
    assert!(ids_until_pong(c, event).is_empty(), "more MSGs after {want:?}");
}

#[test]
fn watch_shares_delivery_with_sub_and_counts_toward_the_limit() {
    let d = Daemon::start("max_subs_per_conn = 2");
    let mut p = d.client();
    let mut c = d.client();
    assert!(c.greeting.split(' ').any(|w| w == "abilities=watch,since,confirm,stats"), "{}", c.greeting);
    c.cmd("WATCH e");
    c.expect("+OK WATCH e");
    c.cmd("WATCH e");
    c.expect("+OK WATCH e");
    c.cmd("SUB e a@example.com");
    c.expect("+OK SUB e");
    // Two pairs: a third (a WATCH of another event) is over the limit.
    c.cmd("WATCH f");
    c.expect_err("LIMIT");
    let (id, n) = util::publish(&mut p, "e", "one");
    assert_eq!(n, 1, "one MSG per connection");
    expect_ids(&mut c, "e", &[id]);
    // UNWATCH ends the WATCH only: the SUB still delivers.
    c.cmd("UNWATCH e");
    c.expect("+OK UNWATCH e");
    c.cmd("UNWATCH e");
    c.expect("+OK UNWATCH e");
    let (id, _) = util::publish(&mut p, "e", "two");
    expect_ids(&mut c, "e", &[id]);
    c.cmd("UNSUB e a@example.com");
    c.expect("+OK UNSUB e");
    c.cmd("WATCH e");
    c.expect("+OK WATCH e");
    c.cmd("UNSUB e a@example.com");
    c.expect("+OK UNSUB e");
    let (id, _) = util::publish(&mut p, "e", "three");
    expect_ids(&mut c, "e", &[id]);
    // Nothing is stored for a WATCH.
    let rows: i64 = d.db().query_row("SELECT count(*) FROM subscriptions", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, 0);
}

#[test]
fn bad_input_gets_a_clear_answer_and_changes_nothing() {
    let d = Daemon::start("");
    let mut p = d.client();
    let mut c = d.client();
    let (first, _) = util::publish(&mut p, "e", "kept");
    for bad in [
        "SUB e a@example.com SINCE",
        "SUB e a@example.com SINCE -1",
        "SUB e a@example.com SINCE x1",
        "SUB e a@example.com SINCE 9223372036854775808",
        "SUB e a@example.com SINCE 1 SINCE 2",
        "WATCH e SINCE",
        "WATCH e SINCE -5",
        "WATCH e SINCE abc",
        "WATCH e SINCE 18446744073709551616",
        "WATCH e SINCE 0 SINCE 0",
        "WATCH e e",
        "UNWATCH",
    ] {
        c.cmd(bad);
        c.expect_err("SYNTAX");
    }
    c.cmd("WATCH bad/event SINCE 0");
    c.expect_err("EVENT");
    c.cmd("UNWATCH e*");
    c.expect_err("EVENT");
    c.cmd("UNWATCH never.watched");
    c.expect("+OK UNWATCH never.watched");
    // None of it started anything.
    let (id, n) = util::publish(&mut p, "e", "live");
    assert_eq!(n, 0);
    assert!(ids_until_pong(&mut c, "e").is_empty());
    let stored: i64 = d.db().query_row("SELECT count(*) FROM subscriptions", [], |r| r.get(0)).unwrap();
    assert_eq!(stored, 0);
    // An id past every id given replays nothing, and live lines are not filtered by it:
    // the next MSG is the live one (a replay would hold it behind older ones).
    c.cmd("WATCH e SINCE 9223372036854775807");
    c.expect("+OK WATCH e");
    let (live, _) = util::publish(&mut p, "e", "after");
    expect_ids(&mut c, "e", &[live]);
    // SINCE on an event the connection already receives replays nothing.
    c.cmd(&format!("SUB e a@example.com SINCE {}", first - 1));
    c.expect("+OK SUB e");
    let (next, _) = util::publish(&mut p, "e", "next");
    expect_ids(&mut c, "e", &[next]);
    // A fresh connection replays what is kept, of its event only, oldest first.
    util::publish(&mut p, "o", "other event");
    let mut r = d.client();
    r.cmd(&format!("WATCH e SINCE {}", first - 1));
    r.expect("+OK WATCH e");
    expect_ids(&mut r, "e", &[first, id, live, next]);
    let mut s = d.client();
    s.cmd(&format!("SUB e b@example.com SINCE {first}"));
    s.expect("+OK SUB e");
    expect_ids(&mut s, "e", &[id, live, next]);
}

/// What disturbs the daemon while the client reconnects.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Disturb {
    Nothing,
    /// SIGKILL of the store, a few times.
    KillStore,
    /// SIGTERM and a new start of the whole daemon, half way.
    Restart,
}

/// What the publisher and the follower share.
struct Shared {
    addr: Mutex<SocketAddr>,
    /// The last id published on `e`, once everything is published.
    last_e: Mutex<Option<u64>>,
}

const TOTAL: usize = 20_000;
const BATCH: usize = 500;

/// Publishes `count` notifications, two of three on `e`, pipelined in batches; calls
/// `between` after each batch. Returns the ids of `e` answered `+OK PUB`, and how many
/// PUBs were answered with an error.
fn publish_batches(addr: SocketAddr, count: usize, mut between: impl FnMut(usize)) -> (Vec<u64>, usize) {
    let mut c = Client::connect(addr);
    let (mut ids, mut errors) = (Vec::new(), 0);
    for b in 0..count / BATCH {
        let mut text = String::new();
        let events: Vec<&str> =
            (0..BATCH).map(|i| if (b * BATCH + i) % 3 == 2 { "o" } else { "e" }).collect();
        for (i, ev) in events.iter().enumerate() {
            text.push_str(&format!("PUB {ev} n{}\r\n", b * BATCH + i));
        }
        c.send(&text);
        for ev in events {
            let l = c.line();
            if l.starts_with("+OK PUB ") {
                if ev == "e" {
                    ids.push(util::parse_ok_pub(&l).0);
                }
            } else {
                util::check_err(&l, "UNAVAILABLE");
                errors += 1;
            }
        }
        between(b);
    }
    (ids, errors)
}

/// Reconnects again and again with SINCE the last id it got, dropping the connection
/// after a random number of lines; returns the ids received, in order, and how many
/// connections it made.
fn follow(shared: &Shared, mut rng: u64) -> (Vec<u64>, usize) {
    let mut got: Vec<u64> = Vec::new();
    let mut rounds = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        assert!(Instant::now() < deadline, "the follower did not catch up within 10 minutes");
        let last = got.last().copied().unwrap_or(0);
        let done = shared.last_e.lock().unwrap().is_some_and(|l| last >= l);
        if done && rounds >= 20 {
            return (got, rounds);
        }
        let addr = *shared.addr.lock().unwrap();
        let Ok(sock) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            // The daemon is restarting: bounded by the deadline above.
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let mut c = Client::from_stream(sock);
        match c.try_line(WAIT) {
            Ok(Some(l)) if l.starts_with("HELLO ") => {}
            _ => continue,
        }
        rounds += 1;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let command = if rounds % 2 == 0 {
            format!("WATCH e SINCE {last}\r\n")
        } else {
            format!("SUB e follower@example.com SINCE {last}\r\n")
        };
        if c.sock.write_all(command.as_bytes()).is_err() {
            continue;
        }
        let budget = 1 + rng % 600;
        let mut n = 0;
        loop {
            let wait = if done { Duration::from_millis(300) } else { Duration::from_secs(30) };
            match c.try_line(wait) {
                Ok(Some(l)) => {
                    if let Some(id) = msg_id(&l, "e") {
                        let last = got.last().copied().unwrap_or(0);
                        assert!(id > last, "id {id} after {last}: not increasing (round {rounds})");
                        got.push(id);
                        n += 1;
                        if n >= budget {
                            break;
                        }
                    } else if l.starts_with("-ERR BUSY") {
                        break;
                    } else {
                        assert!(l.starts_with("+OK "), "unexpected line {l:?}");
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
}

fn reconnecting_client_misses_nothing(disturb: Disturb) {
    let mut d = Daemon::start("sync = \"normal\"");
    let shared = Shared { addr: Mutex::new(d.addr()), last_e: Mutex::new(None) };
    let (published, errors, rounds, got) = std::thread::scope(|s| {
        let follower = s.spawn(|| follow(&shared, 0x9e37_79b9_7f4a_7c15));
        let mut kills = 0;
        let (mut published, mut errors) = publish_batches(d.addr(), TOTAL / 2, |b| {
            if disturb == Disturb::KillStore && (b == 5 || b == 14) {
                util::signal(d.store_pid(), libc::SIGKILL);
                kills += 1;
                d.wait_log_count("notifd-store restarted", kills, WAIT);
            }
        });
        if disturb == Disturb::Restart {
            d.stop();
            d.restart();
            *shared.addr.lock().unwrap() = d.addr();
        }
        let (more, more_errors) = publish_batches(d.addr(), TOTAL / 2, |b| {
            if disturb == Disturb::KillStore && b == 8 {
                util::signal(d.store_pid(), libc::SIGKILL);
                kills += 1;
                d.wait_log_count("notifd-store restarted", kills, WAIT);
            }
        });
        published.extend(more);
        errors += more_errors;
        *shared.last_e.lock().unwrap() = published.last().copied();
        let (got, rounds) = follower.join().unwrap();
        (published, errors, rounds, got)
    });
    assert!(rounds >= 20, "only {rounds} connections");
    if errors == 0 {
        assert_eq!(got.len(), published.len(), "received {} of {} ids", got.len(), published.len());
        assert!(got == published, "the ids received are not the ids published");
    } else {
        // A PUB answered UNAVAILABLE may have gone out live without being kept.
        let set: std::collections::HashSet<u64> = got.iter().copied().collect();
        assert!(published.iter().all(|id| set.contains(id)), "a published id is missing");
        assert!(got.len() <= published.len() + errors);
    }
    eprintln!("{rounds} connections, {} ids of e, {errors} PUB errors", got.len());
}

#[test]
fn a_client_reconnecting_with_since_gets_every_id_once_in_order() {
    reconnecting_client_misses_nothing(Disturb::Nothing);
}

#[test]
fn replays_survive_sigkill_of_the_store() {
    reconnecting_client_misses_nothing(Disturb::KillStore);
}

#[test]
fn replays_survive_a_daemon_restart() {
    reconnecting_client_misses_nothing(Disturb::Restart);
}

#[test]
fn a_million_kept_notifications_replay_to_a_slow_reader_in_bounded_memory() {
    const N: u64 = 1_000_000;
    let mut d = Daemon::start("sync = \"normal\"");
    // 120 bytes a line, 120 MB in all: far more than the 32 MiB the reactor may grow by.
    let text = "n".repeat(100);
    let first = insert_kept(&mut d, "big", N, &text);
    let start_rss = util::rss(d.pid());
    let (mut w, mut r) = slow_reader(d.addr());
    let mut line = String::new();
    w.write_all(format!("WATCH big SINCE {}\r\n", first - 1).as_bytes()).unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "+OK WATCH big\r\n");
    // A reader that stalls for a while, then reads slowly: the server must wait for it,
    // not buffer for it.
    let stalled = Instant::now();
    let mut max_rss = start_rss;
    while stalled.elapsed() < Duration::from_secs(3) {
        max_rss = max_rss.max(util::rss(d.pid()));
        std::thread::sleep(Duration::from_millis(100));
    }
    for want in first..first + N {
        line.clear();
        r.read_line(&mut line).unwrap_or_else(|e| panic!("reading id {want}: {e}"));
        if line != format!("MSG big {want} {text}\r\n") {
            panic!("expected id {want}, got {line:?}");
        }
        if want % 200 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        if want % 5000 == 0 {
            max_rss = max_rss.max(util::rss(d.pid()));
        }
    }
    // Not dropped: it still answers.
    w.write_all(b"PING done\r\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "PONG done\r\n");
    let grew = max_rss.saturating_sub(start_rss);
    eprintln!("reactor RSS: {start_rss} at start, {max_rss} at most (+{} KiB)", grew / 1024);
    assert!(grew <= 32 << 20, "the reactor grew by {grew} bytes during the replay");
    assert!(!d.log_has("slow consumer"));
}

#[test]
fn gap_tells_what_keep_days_deleted() {
    let mut d = Daemon::start("keep_days = 30");
    let mut c = d.client();
    let mut ids = Vec::new();
    for i in 0..12 {
        let ev = if i % 3 == 2 { "o" } else { "e" };
        ids.push((ev, util::publish(&mut c, ev, &format!("t{i}")).0));
    }
    drop(c);
    d.stop();
    // The first seven are older than keep_days: the start-up cleanup deletes them.
    let h = ids[6].1;
    {
        let db = extra::db_rw(&d.path("db/notifd.db"));
        db.execute("UPDATE notifications SET created_at = ?1 WHERE id <= ?2", (now() - 40 * DAY, h)).unwrap();
    }
    d.restart();
    let kept: Vec<u64> = ids.iter().filter(|(ev, id)| *ev == "e" && *id > h).map(|p| p.1).collect();
    let mut c = d.client();
    c.cmd("WATCH e SINCE 0");
    c.expect("+OK WATCH e");
    c.expect(&format!("GAP e 1 {h}"));
    expect_ids(&mut c, "e", &kept);
    // From inside the deleted range: the GAP starts at the next id wanted.
    let mut c = d.client();
    c.cmd(&format!("SUB e a@example.com SINCE {}", h - 2));
    c.expect("+OK SUB e");
    c.expect(&format!("GAP e {} {h}", h - 1));
    expect_ids(&mut c, "e", &kept);
    // From past it: no GAP.
    let mut c = d.client();
    c.cmd(&format!("WATCH e SINCE {h}"));
    c.expect("+OK WATCH e");
    expect_ids(&mut c, "e", &kept);
    let stored: i64 = d.db().query_row("SELECT count(*) FROM notifications", [], |r| r.get(0)).unwrap();
    assert_eq!(stored as usize, ids.iter().filter(|p| p.1 > h).count());
}

#[test]
fn max_replays_makes_untrusted_replays_wait_and_unwatch_ends_one() {
    let mut d =
        Daemon::start("publish_token = \"tok\"\nmax_replays = 1\nmax_pending = 65536\nsync = \"normal\"");
    // 10 MB: more than the kernel's buffers can hide from a reader that does not read.
    let first = insert_kept(&mut d, "e", 100_000, &"x".repeat(100));
    let last = first + 100_000 - 1;
    // A: untrusted (no AUTH), takes the one turn and stalls, reading nothing.
    let mut a = Client::from_stream(small_buffer(d.addr()));
    assert!(a.line().starts_with("HELLO "));
    a.cmd("WATCH e SINCE 0");
    // Its replay started in the turn that sent this reply.
    a.expect("+OK WATCH e");
    // B: untrusted too, waits its turn with nothing sent but its reply.
    let mut b = d.client();
    b.cmd("WATCH e SINCE 0");
    b.expect("+OK WATCH e");
    // A trusted connection does not wait for a turn.
    let mut t = d.client();
    t.cmd("AUTH tok");
    t.expect("+OK AUTH");
    t.cmd(&format!("WATCH e SINCE {}", last - 3));
    t.expect("+OK WATCH e");
    expect_ids(&mut t, "e", &[last - 2, last - 1, last]);
    // Had B's replay started, its first part, asked for before T's, would have been
    // written to B before T's MSGs were, and so before the PONG of this PING.
    assert!(ids_until_pong(&mut b, "e").is_empty(), "B replays while A holds the one turn");
    // UNWATCH ends A's replay: after its reply, no MSG of e comes; B gets its turn.
    a.cmd("UNWATCH e");
    loop {
        let l = a.line();
        if l == "+OK UNWATCH e" {
            break;
        }
        assert!(msg_id(&l, "e").is_some(), "unexpected {l:?}");
    }
    assert!(ids_until_pong(&mut a, "e").is_empty(), "MSGs after UNWATCH");
    let l = b.line();
    assert_eq!(msg_id(&l, "e"), Some(first), "{l:?}");
}

#[test]
fn a_part_that_cannot_be_fetched_ends_the_connection() {
    let d = Daemon::start("store_timeout = 1");
    let mut c = d.client();
    util::publish(&mut c, "e", "kept");
    let _cont = util::stop_process(d.store_pid());
    let mut r = d.client();
    r.cmd("WATCH e SINCE 0");
    r.expect("+OK WATCH e");
    r.expect("-ERR BUSY replay interrupted");
    r.expect_eof();
    // The live part of other connections goes on.
    c.cmd("WATCH e");
    c.expect("+OK WATCH e");
}

/// A running notif whose output the test reads when it wants (until then its stdout
/// pipe fills and notif stops reading its socket: a slow consumer).
struct Notif {
    child: std::process::Child,
    stdout: Option<std::process::ChildStdout>,
    err: std::sync::mpsc::Receiver<String>,
}

impl Notif {
    fn spawn(port: u16, args: &[&str]) -> Notif {
        let mut child = util::notif_command(port, args).spawn().expect("start notif");
        let stderr = child.stderr.take().unwrap();
        let (tx, err) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[notif] {l}");
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Notif { stdout: child.stdout.take(), child, err }
    }

    /// From now on, stdout lines arrive on the returned channel.
    fn read_stdout(&mut self) -> std::sync::mpsc::Receiver<String> {
        let out = self.stdout.take().expect("stdout taken once");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// Waits for a stderr line containing `word`; returns it.
    fn said(&self, word: &str) -> String {
        util::said(&self.err, word, "notif")
    }
}

impl Drop for Notif {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the stored subscription is there: the SUB was read and committed.
fn wait_stored(d: &Daemon, email: &str) {
    util::wait_until("the subscription to be stored", WAIT, || {
        d.db()
            .query_row("SELECT count(*) FROM subscriptions WHERE email = ?1", [email], |r| r.get::<_, i64>(0))
            .unwrap()
            == 1
    });
}

#[test]
fn notif_sub_resumes_after_a_slow_consumer_drop_without_loss() {
    let d = Daemon::start("max_pending = 65536\nsync = \"normal\"");
    let mut n = Notif::spawn(d.port, &["sub", "slow@example.com", "e"]);
    wait_stored(&d, "slow@example.com");
    // notif's stdout is not read: it stops reading its socket, and the server's output
    // to it grows until the server drops it. Publish until then, and a little more.
    let mut p = d.client();
    let text = "x".repeat(400);
    let mut published = Vec::new();
    let mut after_drop = 0;
    for b in 0..200 {
        let batch: String = (0..200).map(|i| format!("PUB e {b}.{i} {text}\r\n")).collect();
        p.send(&batch);
        for _ in 0..200 {
            published.push(util::parse_ok_pub(&p.line()).0);
        }
        if d.log_has("slow consumer") {
            after_drop += 1;
            if after_drop == 5 {
                break;
            }
        }
    }
    assert_eq!(after_drop, 5, "no slow-consumer drop after {} MB", (published.len() * 420) >> 20);
    let out = n.read_stdout();
    let mut got = Vec::new();
    while got.len() < published.len() {
        let l = out
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("notif printed {} of {} notifications", got.len(), published.len()));
        let id: u64 = l.split(' ').nth(1).and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("{l:?}"));
        got.push(id);
    }
    assert!(got == published, "notif printed other ids than those published (or some twice)");
    n.said("connection lost");
    n.said("reconnected");
}

#[test]
fn notif_watch_keeps_its_place_across_runs_and_says_what_failed() {
    let mut d = Daemon::start("");
    let state = d.path("watch.state");
    let state = state.to_str().unwrap();
    let mut p = d.client();
    let before = util::publish(&mut p, "e", "before").0;
    let mut n =
        Notif::spawn(d.port, &["watch", "--since", &before.to_string(), "--state", state, "--json", "e"]);
    let out = n.read_stdout();
    let mut ids = Vec::new();
    for t in ["one", "two \"quoted\" \\ three"] {
        ids.push(util::publish(&mut p, "e", t).0);
    }
    util::publish(&mut p, "other", "not watched");
    let want = [
        format!("{{\"event\":\"e\",\"id\":{},\"text\":\"one\"}}", ids[0]),
        format!("{{\"event\":\"e\",\"id\":{},\"text\":\"two \\\"quoted\\\" \\\\ three\"}}", ids[1]),
    ];
    for w in &want {
        assert_eq!(&out.recv_timeout(WAIT).expect("a JSON line"), w);
    }
    util::wait_until("the state file", WAIT, || {
        std::fs::read_to_string(state).is_ok_and(|s| s == format!("e {}\n", ids[1]))
    });
    // The daemon stops: notif says why it lost the connection, then what each retry met.
    drop(p);
    d.stop();
    let lost = n.said("connection lost");
    assert!(lost.contains("shutting down"), "{lost}");
    let retry = n.said("reconnect failed");
    assert!(retry.contains("refused") && !retry.contains("shutting down"), "{retry}");
    drop(n);
    // Published while no notif ran; a new run starts where the last one stopped.
    d.restart();
    let mut p = d.client();
    let later = util::publish(&mut p, "e", "later").0;
    let mut n = Notif::spawn(d.port, &["watch", "--state", state, "e"]);
    let out = n.read_stdout();
    assert_eq!(out.recv_timeout(WAIT).expect("the replayed line"), format!("e {later} later"));
}

#[test]
fn a_store_killed_mid_replay_resumes_it_from_the_last_id_sent() {
    const N: u64 = 100_000;
    let mut d = Daemon::start("sync = \"normal\"");
    let text = "y".repeat(100);
    let first = insert_kept(&mut d, "e", N, &text);
    let (mut w, mut r) = slow_reader(d.addr());
    let mut line = String::new();
    // A command is read only once ids are reserved: a round trip first, so that the
    // stopped store below holds up nothing but the replay.
    w.write_all(b"PING\r\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "PONG\r\n");
    // The first part is asked for while the store is stopped: it is in flight when the
    // store dies, and is sent again to the next one.
    let stopped = util::stop_process(d.store_pid());
    w.write_all(b"WATCH e SINCE 0\r\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "+OK WATCH e\r\n");
    util::signal(stopped.0, libc::SIGKILL);
    d.wait_log_count("notifd-store restarted", 1, WAIT);
    let mut want = first;
    let mut read_to = |upto: u64, r: &mut BufReader<TcpStream>| {
        while want < upto {
            line.clear();
            r.read_line(&mut line).unwrap_or_else(|e| panic!("reading id {want}: {e}"));
            assert_eq!(line, format!("MSG e {want} {text}\r\n"));
            want += 1;
        }
    };
    read_to(first + N / 3, &mut r);
    // Again in the middle, wherever the replay is.
    util::signal(d.store_pid(), libc::SIGKILL);
    d.wait_log_count("notifd-store restarted", 2, WAIT);
    read_to(first + N, &mut r);
    w.write_all(b"PING end\r\n").unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "PONG end\r\n", "nothing more, nothing twice");
}
