//! notif-bench against the real daemon. CI does not run the benchmark; this keeps the
//! generator honest: what each scenario reports must add up (every message delivered,
//! every SUB acknowledged and stored, no error, no connection dropped).

mod util;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;
use util::Daemon;

const BENCH: &str = env!("CARGO_BIN_EXE_notif-bench");
/// A durable run's connection holds one live subscription per SUB it sends.
const CONF: &str = "max_subs_per_conn = 1000000";
/// notif-bench bounds itself (`--timeout`); this only catches a generator that hangs.
const LIMIT: Duration = Duration::from_secs(60);

/// One `RESULT` line as its fields.
struct Row(HashMap<String, String>);

impl Row {
    fn get(&self, key: &str) -> &str {
        self.0.get(key).unwrap_or_else(|| panic!("no {key} in {:?}", self.0))
    }

    fn num(&self, key: &str) -> f64 {
        let v = self.get(key);
        v.parse().unwrap_or_else(|_| panic!("{key}={v} is not a number in {:?}", self.0))
    }
}

/// Runs notif-bench to success and returns its `RESULT` lines.
fn results<'a>(args: impl IntoIterator<Item = &'a str>) -> Vec<Row> {
    let args: Vec<&str> = args.into_iter().collect();
    let child = Command::new(BENCH)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start notif-bench");
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(LIMIT) else {
        util::signal(pid, libc::SIGKILL);
        panic!("notif-bench {args:?} still running after {LIMIT:?}");
    };
    let out = out.expect("notif-bench's output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "notif-bench {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .map(|l| {
            Row(l.split(' ').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect())
        })
        .collect()
}

fn one(rows: Vec<Row>) -> Row {
    assert_eq!(rows.len(), 1, "one RESULT line: {:?}", rows.iter().map(|r| &r.0).collect::<Vec<_>>());
    rows.into_iter().next().unwrap()
}

#[test]
fn fanout_delivers_every_message_to_every_subscriber() {
    let d = Daemon::start(CONF);
    let addr = d.addr();
    let args = format!(
        "--server notifd --addr {addr} --scenario fanout --subs 5 --msgs 200 \
         --duration 60 --timeout 30"
    );
    let r = one(results(args.split(' ')));
    assert_eq!((r.get("scenario"), r.get("server"), r.get("subs")), ("fanout", "notifd", "5"));
    assert_eq!(r.get("sent"), "200");
    assert_eq!(r.get("delivered"), "1000");
    assert_eq!(r.get("lost"), "0");
    assert_eq!(r.get("errors"), "0");
    assert_eq!(r.get("dropped"), "0");
    assert!(r.num("msgs_per_s") > 0.0);
    assert!(r.num("p50_us") <= r.num("p99_us") && r.num("p99_us") <= r.num("max_us"), "{:?}", r.0);
}

#[test]
fn durable_subs_are_acknowledged_and_stored() {
    let d = Daemon::start(CONF);
    let addr = d.addr();
    let args = format!(
        "--server notifd --addr {addr} --scenario durable --kind sub --conns 2 \
         --inflight 8 --duration 0.3 --timeout 30"
    );
    let r = one(results(args.split(' ')));
    assert_eq!((r.get("scenario"), r.get("kind"), r.get("conns")), ("durable", "sub", "2"));
    let acked = r.num("acked") as i64;
    assert!(acked > 0, "{:?}", r.0);
    assert_eq!(r.get("errors"), "0");
    assert_eq!(r.get("dropped"), "0");
    let stored: i64 = d
        .db()
        .query_row("SELECT count(*) FROM subscriptions WHERE event = 'bench.durable'", [], |row| row.get(0))
        .unwrap();
    assert_eq!(stored, acked, "every acknowledged SUB is a stored subscription");
}

#[test]
fn sqlite_baseline_reports_each_mode_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("baseline.db");
    let rows = results(["--scenario", "sqlite", "--db", db.to_str().unwrap(), "--duration", "0.1"]);
    let modes: Vec<&str> = rows.iter().map(|r| r.get("mode")).collect();
    assert_eq!(modes, ["row", "batch64", "batch10000"]);
    for (r, batch) in rows.iter().zip([1.0, 64.0, 10_000.0]) {
        assert_eq!(r.get("scenario"), "sqlite");
        let n = r.num("rows");
        assert!(n >= batch && n % batch == 0.0, "whole transactions of {batch} rows: {:?}", r.0);
        assert!(r.num("rows_per_s") > 0.0, "{:?}", r.0);
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "the baseline removes its database: {left:?}");
}

#[test]
fn replay_reports_every_kept_notification() {
    let mut d = Daemon::start(CONF);
    d.stop();
    let db = d.path("db/notifd.db");
    let fill = one(results(["--scenario", "replay-fill", "--db", db.to_str().unwrap(), "--count", "5000"]));
    assert_eq!(fill.get("rows"), "5000");
    d.restart();
    let addr = d.addr().to_string();
    let r = one(results(["--addr", &addr, "--scenario", "replay", "--count", "5000", "--timeout", "30"]));
    assert_eq!((r.get("scenario"), r.get("msgs")), ("replay", "5000"));
    assert!(r.num("msgs_per_s") > 0.0, "{:?}", r.0);
}
