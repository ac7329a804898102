//! The children as notifd(8) promises them: they die with the parent, a request or an
//! email that survives two deaths of its child is given up on, and they run nicer than
//! the parent.

mod util;

use std::os::unix::fs::PermissionsExt;
use util::extra::{self, Resume};
use util::{Daemon, WAIT};

/// The store and the mailers as the log names them, once each has armed PR_SET_PDEATHSIG
/// and set its niceness (both happen before it names itself).
fn named_children(d: &Daemon, mailers: usize) -> Vec<i32> {
    util::wait_until("the mailers to start", WAIT, || d.mailer_pids().len() >= mailers);
    let pids = d.all_child_pids();
    for &pid in &pids {
        util::wait_until("the child to name itself", WAIT, || {
            util::comm(pid).is_some_and(|c| c == "notifd-store" || c == "notifd-mailer")
        });
    }
    pids
}

#[test]
fn children_die_when_the_parent_is_killed() {
    let mut d = Daemon::start("mail_transport = \"spool\"\nmail_workers = 2");
    let children = named_children(&d, 2);
    assert_eq!(children.len(), 3, "a store and two mailers: {children:?}");
    // Stopped children cannot notice their pipes closing: only the kernel's
    // PR_SET_PDEATHSIG can end them now.
    let _resume: Vec<Resume> = children.iter().map(|&p| Resume(p)).collect();
    for &pid in &children {
        util::signal(pid, libc::SIGSTOP);
        util::wait_until("the child to stop", WAIT, || util::stat(pid).is_some_and(|(s, _)| s == 'T'));
    }
    d.signal(libc::SIGKILL);
    d.wait_exit(WAIT).expect("SIGKILL ends the parent");
    for &pid in &children {
        util::wait_gone(pid, WAIT);
    }
}

#[test]
fn children_run_five_nicer_than_the_parent() {
    let d = Daemon::start("mail_transport = \"spool\"");
    let parent = extra::niceness(d.pid()).expect("the parent's niceness");
    let want = (parent + 5).min(19);
    for pid in named_children(&d, 1) {
        assert_eq!(extra::niceness(pid), Some(want), "niceness of child {pid} (parent at {parent})");
    }
}

#[test]
fn a_request_through_two_store_deaths_is_answered_unavailable() {
    let d = Daemon::start("");
    let mut c = d.client();
    // A first round trip: the id block is in, so the SUB below is read at once.
    c.cmd("PING");
    c.expect("PONG");
    // While the test holds the write lock, no store can commit (nor even start up), so
    // the SUB stays in flight whatever the timing.
    let lock = extra::db_rw(&d.path("db/notifd.db"));
    lock.execute_batch("BEGIN IMMEDIATE").expect("take the write lock");
    c.cmd("SUB ev a@example.com");
    util::wait_until("the reactor to read the SUB", WAIT, || {
        util::server_unread(c.local_addr(), d.port) == Some(0)
    });
    for death in 1..=2 {
        d.wait_log_count("notifd-store started", death, WAIT);
        util::signal(d.store_pid(), libc::SIGKILL);
    }
    // The third store is not sent the request again: the client hears at once, long
    // before store_timeout (30 s).
    c.expect_err("UNAVAILABLE");
    d.wait_log(|l| l.contains("in flight for two store deaths"), WAIT);
    assert_eq!(d.log_count("notifd-store started"), 3);
    lock.execute_batch("ROLLBACK").expect("release the write lock");
    // The third store works, and the connection goes on.
    c.cmd("SUB ev2 a@example.com");
    c.expect("+OK SUB ev2");
    // The given-up SUB was not sent to the third store.
    let events: Vec<String> = {
        let db = d.db();
        let mut st = db.prepare("SELECT event FROM subscriptions ORDER BY event").unwrap();
        st.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    assert_eq!(events, ["ev2"]);
}

/// A `sendmail` that takes the message and never answers, so that a mailer holds its
/// email; it notes each run in `runs` and ends with the mailer that started it.
fn hanging_sendmail(dir: &std::path::Path) -> std::path::PathBuf {
    let script = dir.join("sendmail");
    let runs = dir.join("runs");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho run >> '{}'\nwhile kill -0 $PPID 2>/dev/null; do sleep 1; done\n",
            runs.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn runs(dir: &std::path::Path) -> usize {
    std::fs::read_to_string(dir.join("runs")).map(|s| s.lines().count()).unwrap_or(0)
}

#[test]
fn an_email_held_through_two_mailer_deaths_is_a_failed_try() {
    let tools = tempfile::tempdir().unwrap();
    let script = hanging_sendmail(tools.path());
    let d = Daemon::start(&format!(
        "mail_transport = \"sendmail\"\nsendmail_path = {:?}\nmail_retry_base = 3600",
        script.display().to_string()
    ));
    let mut c = d.client();
    c.cmd("SUB ev a@example.com");
    c.expect("+OK SUB ev");
    c.cmd("PUB ev hello");
    assert!(c.line().starts_with("MSG ev "));
    let id: i64 = c.line().strip_prefix("+OK PUB ").unwrap().split(' ').next().unwrap().parse().unwrap();
    for death in 1..=2 {
        // Each mailer has the email in hand (its sendmail runs) when it is killed.
        util::wait_until("a mailer to hold the email", WAIT, || runs(tools.path()) >= death);
        let mailer = *d.mailer_pids().last().unwrap();
        util::signal(mailer, libc::SIGKILL);
        d.wait_log_count("notifd-mailer 1 started", death + 1, WAIT);
    }
    d.wait_log(|l| l.contains("held through two deaths; reported as failed tries"), WAIT);
    let db = d.db();
    let row = || {
        db.query_row("SELECT state, tries, last_error FROM outbox WHERE notification_id = ?1", [id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<String>>(2)?))
        })
        .unwrap()
    };
    util::wait_until("the outbox to record the try", WAIT, || row().1 == 1);
    let (state, tries, error) = row();
    assert_eq!((state.as_str(), tries), ("pending", 1), "one failed try, retried later");
    assert!(error.unwrap_or_default().contains("died twice"), "last_error says why");
    // Not handed to the third mailer: it waits for its retry, an hour away.
    assert_eq!(runs(tools.path()), 2);
}
