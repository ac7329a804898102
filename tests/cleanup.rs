//! The database as notifd(8) describes it: its schema and version, the upgrade of an
//! older one, what `keep_days` deletes and what it never does, and
//! `mail_policy = "none"`.

mod util;

use util::{extra, Daemon};

const DAY: i64 = 86_400;

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A SUB round trip: the store answers only after its start-up cleanup.
fn store_answered(d: &Daemon) {
    let mut c = d.client();
    c.cmd("SUB sync a@example.com");
    c.expect("+OK SUB sync");
}

/// Notification ids left, in order.
fn notifications(d: &Daemon) -> Vec<i64> {
    let db = d.db();
    let mut st = db.prepare("SELECT id FROM notifications ORDER BY id").unwrap();
    st.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
}

/// Emails left, as (notification id, address), in order.
fn emails(d: &Daemon) -> Vec<(i64, String)> {
    let db = d.db();
    let mut st = db.prepare("SELECT notification_id, email FROM outbox ORDER BY 1, 2").unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
}

#[test]
fn keep_days_deletes_old_notifications_and_finished_emails_never_pending_ones() {
    let mut d = Daemon::start("keep_days = 0");
    store_answered(&d);
    d.stop();
    let (old, recent) = (now() - 40 * DAY, now() - DAY);
    {
        let db = extra::db_rw(&d.path("db/notifd.db"));
        // 1: old, its emails sent and failed; 2: old, an email still pending;
        // 3: recent, its email sent; 4: old, no email.
        for (id, at) in [(1, old), (2, old), (3, recent), (4, old)] {
            db.execute(
                "INSERT INTO notifications(id, event, text, created_at) VALUES (?1, 'ev', 'text', ?2)",
                (id, at),
            )
            .unwrap();
        }
        for (id, email, state, at) in [
            (1, "sent@example.com", "sent", old),
            (1, "failed@example.com", "failed", old),
            (2, "pending@example.com", "pending", old),
            (2, "sent@example.com", "sent", old),
            (3, "sent@example.com", "sent", recent),
        ] {
            db.execute(
                "INSERT INTO outbox(notification_id, email, state, tries, next_try_at, updated_at)
                 VALUES (?1, ?2, ?3, 1, ?4, ?4)",
                (id, email, state, at),
            )
            .unwrap();
        }
    }
    let all_emails = emails(&d);
    // keep_days = 0 keeps everything.
    d.restart();
    store_answered(&d);
    assert_eq!(notifications(&d), [1, 2, 3, 4]);
    assert_eq!(emails(&d), all_emails);
    d.stop();
    util::write_config(d.dir.path(), "keep_days = 30");
    d.restart();
    store_answered(&d);
    assert_eq!(
        emails(&d),
        [(2, "pending@example.com".to_string()), (3, "sent@example.com".to_string())],
        "old sent and failed emails go, a pending one and a recent one stay"
    );
    // A notification goes with its emails; one with a pending email stays for it.
    assert_eq!(notifications(&d), [2, 3]);
}

#[test]
fn a_fresh_database_has_the_documented_schema_and_version() {
    let d = Daemon::start("");
    store_answered(&d);
    let db = d.db();
    let version: i64 = db.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 3, "notifd(8): the schema version is 3");
    let columns = |table: &str| -> Vec<String> {
        let mut st = db.prepare(&format!("PRAGMA table_info({table})")).unwrap();
        st.query_map([], |r| r.get(1)).unwrap().map(Result::unwrap).collect()
    };
    assert_eq!(columns("subscriptions"), ["email", "event", "created_at", "confirmed_at"]);
    assert_eq!(columns("notifications"), ["id", "event", "text", "created_at"]);
    assert_eq!(
        columns("outbox"),
        ["notification_id", "email", "state", "tries", "next_try_at", "last_error", "updated_at"]
    );
    assert_eq!(columns("meta"), ["key", "value"]);
    let mode: String = db.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn a_database_made_before_consent_is_upgraded_and_its_subscriptions_stay_confirmed() {
    // A database file as notifd 0.1 (schema 1) left it, with subscriptions and an email
    // still waiting.
    let old = tempfile::tempdir().unwrap();
    let path = old.path().join("old.db");
    {
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch("PRAGMA journal_mode=WAL").unwrap();
        db.execute_batch(include_str!("data/schema-v1.sql")).unwrap();
        db.execute_batch(
            "INSERT INTO subscriptions VALUES ('ana@example.com', 'ev', 100), ('bo@example.com', 'ev', 200),
                                              ('ana@example.com', 'other', 300);
             INSERT INTO notifications VALUES (5, 'ev', 'before', 150);
             INSERT INTO outbox VALUES (5, 'bo@example.com', 'pending', 0, 4000000000, NULL, 150);
             UPDATE meta SET value = 11 WHERE key = 'next_id';",
        )
        .unwrap();
    }
    let d =
        Daemon::start(&format!("database = {:?}\nmail_transport = \"spool\"", path.display().to_string()));
    let mut c = d.client();
    // Trusted (loopback, no publish_token): LIST shows both of ana's pairs as confirmed.
    c.cmd("LIST ana@example.com");
    c.expect("SUB ev ana@example.com 1970-01-01T00:01:40Z");
    c.expect("SUB other ana@example.com 1970-01-01T00:05:00Z");
    c.expect("+OK LIST 2");
    // A PUB emails both old subscribers of ev, so both are confirmed; ids go on.
    c.cmd("PUB ev after");
    let ok = c.line();
    let id: i64 = ok.strip_prefix("+OK PUB ").unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(id >= 11, "{ok}");
    let db =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let version: i64 = db.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 3);
    let mut st = db.prepare("SELECT email FROM outbox WHERE notification_id = ?1 ORDER BY email").unwrap();
    let to: Vec<String> = st.query_map([id], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
    assert_eq!(to, ["ana@example.com", "bo@example.com"]);
    let unconfirmed: i64 = db
        .query_row("SELECT count(*) FROM subscriptions WHERE confirmed_at IS NOT created_at", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(unconfirmed, 0, "every old row is confirmed as of when it was made");
    // The waiting email is still there.
    let waiting: i64 =
        db.query_row("SELECT count(*) FROM outbox WHERE notification_id = 5", [], |r| r.get(0)).unwrap();
    assert_eq!(waiting, 1);
}

#[test]
fn mail_policy_none_queues_no_email() {
    let d = Daemon::start("mail_transport = \"spool\"\nmail_policy = \"none\"");
    let mut c = d.client();
    c.cmd("SUB ev a@example.com");
    c.expect("+OK SUB ev");
    c.cmd("PUB ev hello");
    assert!(c.line().starts_with("MSG ev "), "live delivery goes on");
    let ok = c.line();
    let id: i64 = ok.strip_prefix("+OK PUB ").unwrap().split(' ').next().unwrap().parse().unwrap();
    // The +OK PUB follows the commit of the notification and of its emails, if any.
    let db = d.db();
    let stored: i64 =
        db.query_row("SELECT count(*) FROM notifications WHERE id = ?1", [id], |r| r.get(0)).unwrap();
    assert_eq!(stored, 1);
    let queued: i64 = db.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0)).unwrap();
    assert_eq!(queued, 0, "mail_policy = \"none\" queued an email");
}
