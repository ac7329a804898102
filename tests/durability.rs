//! What the database holds, and when: acknowledged rows, ids across restarts and crashes,
//! a store killed mid-stream, and a store that does not answer.

mod util;

use rusqlite::OptionalExtension;
use std::io::Write;
use std::time::{Duration, Instant};
use util::{check_err, publish, Daemon, WAIT};

fn row(db: &rusqlite::Connection, email: &str, event: &str) -> Option<i64> {
    db.query_row(
        "SELECT created_at FROM subscriptions WHERE email = ?1 AND event = ?2",
        [email, event],
        |r| r.get(0),
    )
    .optional()
    .expect("query subscriptions")
}

#[test]
fn the_row_is_there_when_ok_sub_arrives() {
    let d = Daemon::start("");
    let mut c = d.client();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    for i in 0..20 {
        let email = format!("user{i}@Example.ORG");
        c.cmd(&format!("SUB ev.{i} {email}"));
        c.expect(&format!("+OK SUB ev.{i}"));
        // Read right after the reply, from a separate read-only connection (WAL).
        let db = d.db();
        let at = row(&db, &format!("user{i}@example.org"), &format!("ev.{i}"))
            .unwrap_or_else(|| panic!("row {i} missing right after +OK SUB"));
        assert!((at - now).abs() < 120, "created_at {at} is Unix seconds of now ({now})");
    }
    // The table is exactly the contract's.
    let db = d.db();
    let sql: String = db
        .query_row("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'subscriptions'", [], |r| {
            r.get(0)
        })
        .unwrap();
    let cols: Vec<(String, String, i64)> = db
        .prepare("SELECT name, type, pk FROM pragma_table_info('subscriptions') ORDER BY cid")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        cols,
        [
            ("email".into(), "TEXT".into(), 1),
            ("event".into(), "TEXT".into(), 2),
            ("created_at".into(), "INTEGER".into(), 0),
            ("confirmed_at".into(), "INTEGER".into(), 0)
        ],
        "subscriptions table: {sql}"
    );
    let mode: String = db.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode.to_ascii_lowercase(), "wal");

    // UNSUB: the row is gone when +OK UNSUB arrives.
    c.cmd("UNSUB ev.3 user3@example.org");
    c.expect("+OK UNSUB ev.3");
    assert_eq!(row(&d.db(), "user3@example.org", "ev.3"), None);
}

#[test]
fn a_repeated_sub_keeps_the_first_timestamp() {
    let d = Daemon::start("");
    let mut c = d.client();
    c.cmd("SUB ev a@b");
    c.expect("+OK SUB ev");
    // Make the stored timestamp recognisably old, as an operator's tool might see it.
    {
        let rw = rusqlite::Connection::open(d.path("db/notifd.db")).unwrap();
        rw.busy_timeout(WAIT).unwrap();
        rw.execute("UPDATE subscriptions SET created_at = 1000 WHERE email = 'a@b'", []).unwrap();
    }
    c.cmd("SUB ev a@b");
    c.expect("+OK SUB ev");
    assert_eq!(row(&d.db(), "a@b", "ev"), Some(1000));
    c.cmd("LIST a@b");
    c.expect("SUB ev a@b 1970-01-01T00:16:40Z");
    c.expect("+OK LIST 1");
}

#[test]
fn a_publication_is_stored_when_ok_pub_arrives() {
    let d = Daemon::start("");
    let mut c = d.client();
    let (id, _) = publish(&mut c, "ev", "hello  there");
    let db = d.db();
    let (event, text): (String, String) = db
        .query_row("SELECT event, text FROM notifications WHERE id = ?1", [id as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("the notification is stored when +OK PUB arrives");
    assert_eq!((event.as_str(), text.as_str()), ("ev", "hello  there"));
}

#[test]
fn ids_increase_across_a_restart() {
    let mut d = Daemon::start("");
    let mut c = d.client();
    let mut last = 0;
    for i in 0..5 {
        let (id, _) = publish(&mut c, "ev", &format!("n{i}"));
        assert!(id > last);
        last = id;
    }
    c.cmd("SUB ev keep@x");
    c.expect("+OK SUB ev");
    drop(c);
    let st = d.stop();
    assert!(st.success(), "exit status {st:?}");

    d.restart();
    let mut c = d.client();
    let (id, _) = publish(&mut c, "ev", "after restart");
    assert!(id > last, "id {id} after a restart is not greater than {last}");
    // The subscription survived.
    c.cmd("LIST keep@x");
    assert!(c.line().starts_with("SUB ev keep@x "));
    c.expect("+OK LIST 1");
}

#[test]
fn ids_are_not_reused_after_sigkill_of_every_process() {
    const N: usize = 50;
    let mut d = Daemon::start("");
    let mut s = d.client();
    s.cmd("SUB ev watcher@x");
    s.expect("+OK SUB ev");
    let mut p = d.client();
    p.cmd("PUB ev committed");
    assert!(s.line().starts_with("MSG ev "));
    let (committed, _) = util::parse_ok_pub(&p.line());
    // With the store stopped, nothing is committed from here on; a MSG does not wait for
    // the store, so these ids go out to the subscriber all the same.
    let _cont = util::stop_process(d.store_pid());
    let mut batch = String::new();
    for i in 0..N {
        batch.push_str(&format!("PUB ev m{i}\r\n"));
    }
    p.send(&batch);
    let seen: Vec<u64> = (0..N)
        .map(|i| {
            let l = s.line();
            assert!(l.starts_with("MSG ev ") && l.ends_with(&format!(" m{i}")), "{l:?}");
            l.split(' ').nth(2).unwrap().parse().unwrap()
        })
        .collect();
    assert!(seen.iter().all(|&id| id > committed), "{seen:?} after {committed}");
    d.kill_all();
    drop((s, p));

    d.restart();
    // None of the ids seen was committed: the daemon died with all of them outstanding.
    let db = d.db();
    let stored: Vec<i64> = db
        .prepare("SELECT id FROM notifications ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(stored, [committed as i64], "only the publication acknowledged before the kill is stored");
    let max_seen = *seen.iter().max().unwrap();
    let mut c = d.client();
    let (id, _) = publish(&mut c, "ev", "after the crash");
    assert!(id > max_seen, "id {id} after SIGKILL was already seen in a MSG (max {max_seen})");
}

/// The kill lands while SUBs are in flight: the store is stopped first (so it commits
/// nothing more and answers nothing), the daemon reads a batch of SUBs and passes them
/// on, and only then is the store killed. Those SUBs, and the thousands pipelined after
/// them, can only be answered by the store started after the kill.
#[test]
fn store_killed_midway_through_thousands_of_pipelined_subs() {
    const N: usize = 5000;
    const BEFORE: usize = 500;
    // In flight at the kill: fewer than max_inflight, so the daemon reads them all.
    const IN_FLIGHT: usize = 50;
    let d = Daemon::start("max_subs_per_conn = 10000\nmax_inflight = 64");
    let first_store = d.store_pid();
    let mut c = d.client();
    let sub = |i: usize| format!("SUB bulk u{i}@example.com\r\n");
    let mut ok = Vec::with_capacity(N);
    let read = |c: &mut util::Client, range: std::ops::Range<usize>, ok: &mut Vec<usize>| {
        for i in range {
            let l = c.line();
            assert_eq!(l, "+OK SUB bulk", "reply to SUB {i}");
            ok.push(i);
        }
    };
    c.send(&(0..BEFORE).map(sub).collect::<String>());
    read(&mut c, 0..BEFORE, &mut ok);

    let stopped = util::stop_process(first_store);
    c.send(&(BEFORE..BEFORE + IN_FLIGHT).map(sub).collect::<String>());
    util::wait_until("the daemon to read the SUBs", WAIT, || {
        util::server_unread(c.local_addr(), d.port) == Some(0)
    });
    util::signal(first_store, libc::SIGKILL);
    drop(stopped);
    let script: String = (BEFORE + IN_FLIGHT..N).map(sub).collect();
    let mut w = c.sock.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(script.as_bytes()).unwrap());

    // Sent again to the new store after one death, every SUB is acknowledged.
    read(&mut c, BEFORE..N, &mut ok);
    writer.join().unwrap();
    assert!(c.sync().is_empty());
    d.wait_log(|l| l.contains("notifd-store lost"), WAIT);
    let stores = d.child_pids("notifd-store");
    assert!(stores.len() >= 2, "the store was not restarted: {stores:?}");
    assert!(!stores[1..].contains(&first_store));

    // Every acknowledged row is there.
    let db = d.db();
    let mut st = db.prepare("SELECT email FROM subscriptions WHERE event = 'bulk'").unwrap();
    let stored: std::collections::HashSet<String> =
        st.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
    let missing: Vec<usize> =
        ok.iter().copied().filter(|i| !stored.contains(&format!("u{i}@example.com"))).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged rows missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(ok.len(), N);
}

#[test]
fn unavailable_after_store_timeout() {
    let d = Daemon::start("store_timeout = 1");
    let store = d.store_pid();
    let mut c = d.client();
    c.cmd("SUB warmup a@b");
    c.expect("+OK SUB warmup");
    let _cont = util::stop_process(store);
    let t0 = Instant::now();
    c.cmd("SUB ev a@b");
    c.cmd("PING behind");
    let l = c.line();
    let waited = t0.elapsed();
    check_err(&l, "UNAVAILABLE");
    assert!(waited >= Duration::from_millis(900), "UNAVAILABLE before store_timeout: {waited:?}");
    assert!(waited < Duration::from_secs(5), "UNAVAILABLE took {waited:?}");
    // The reply order holds: the PING waited behind the SUB.
    c.expect("PONG behind");
    // A PUB too: its MSG goes out at once, its +OK cannot.
    c.cmd("PUB warmup x");
    let m = c.line();
    assert!(m.starts_with("MSG warmup ") && m.ends_with(" x"), "{m:?}");
    check_err(&c.line(), "UNAVAILABLE");
    // When the store is back, things work again; a SUB again is safe.
    util::signal(store, libc::SIGCONT);
    c.cmd("SUB ev a@b");
    c.expect("+OK SUB ev");
    let db = d.db();
    assert!(row(&db, "a@b", "ev").is_some());
}
