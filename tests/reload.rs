//! SIGHUP as notifd.conf(5) describes it: which keys a reload applies, which wait for a
//! restart, and what happens to what is already there.

mod util;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use util::{extra, Daemon, WAIT};

/// Rewrites the configuration (test defaults plus `extra`), sends SIGHUP and waits for
/// the reload's log line.
fn reload(d: &Daemon, extra: &str) {
    let before = d.log_count("configuration reloaded");
    util::write_config(d.dir.path(), extra);
    d.signal(libc::SIGHUP);
    d.wait_log_count("configuration reloaded", before + 1, WAIT);
}

fn outbox_rows(d: &Daemon) -> i64 {
    d.db().query_row("SELECT count(*) FROM outbox", [], |r| r.get(0)).unwrap()
}

/// Files in a folder whose names end in `.eml`.
fn emails_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|it| it.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".eml")).count())
        .unwrap_or(0)
}

/// SUB then PUB on one loopback client; returns the notification id.
fn sub_and_pub(c: &mut util::Client) -> u64 {
    c.cmd("SUB ev a@example.com");
    c.expect("+OK SUB ev");
    c.cmd("PUB ev hello");
    assert!(c.line().starts_with("MSG ev "));
    let ok = c.line();
    ok.strip_prefix("+OK PUB ").and_then(|r| r.split(' ').next()).unwrap().parse().unwrap()
}

#[test]
fn restart_only_keys_warn_and_keep_their_running_values() {
    let d = Daemon::start("mail_transport = \"spool\"");
    let mut c = d.client();
    c.cmd("SUB ev a@example.com");
    c.expect("+OK SUB ev");
    let other_db = d.path("other/notifd.db");
    reload(
        &d,
        &format!(
            "mail_transport = \"spool\"\nhost = \"127.0.0.2\"\nport = 1\ndatabase = {:?}\nuser = \"nobody\"\n\
             pid_file = {:?}\nmail_workers = 3",
            other_db.display().to_string(),
            d.path("other/notifd.pid").display().to_string()
        ),
    );
    for key in ["host", "port", "database", "user", "pid_file", "mail_workers"] {
        let warning = format!("reload: \"{key}\" changed; it takes effect at the next restart");
        assert!(d.log_lines().iter().any(|l| l.contains(": warn: ") && l.contains(&warning)), "{warning}");
    }
    // Still on the old address and port.
    let mut fresh = d.client();
    fresh.cmd("PING");
    fresh.expect("PONG");
    // A store started after the reload opens the running database, not the new one.
    util::signal(d.store_pid(), libc::SIGKILL);
    d.wait_log_count("notifd-store started", 2, WAIT);
    c.cmd("LIST a@example.com");
    assert!(c.line().starts_with("SUB ev a@example.com "));
    c.expect("+OK LIST 1");
    assert!(!other_db.exists(), "the new database path was opened");
    // Still one mailer.
    assert!(!d.log_has("notifd-mailer 2"), "a reload started more mailers");
}

/// Starts with mail_transport `from`, reloads with `to` (the warning checked), then
/// publishes to a subscribed address.
fn flip_mail_and_publish(from: &str, to: &str) -> Daemon {
    let d = Daemon::start(&format!("mail_transport = \"{from}\""));
    reload(&d, &format!("mail_transport = \"{to}\""));
    assert!(d.log_has("turning mail_transport on or off takes effect at the next restart"));
    sub_and_pub(&mut d.client());
    d
}

#[test]
fn turning_mail_on_waits_for_a_restart() {
    let d = flip_mail_and_publish("none", "spool");
    // The +OK PUB came after the commit: nothing was queued with it.
    assert_eq!(outbox_rows(&d), 0, "a reload turned mail on");
    assert!(!d.log_has("notifd-mailer"), "a reload started a mailer");
}

#[test]
fn turning_mail_off_waits_for_a_restart() {
    let d = flip_mail_and_publish("spool", "none");
    assert_eq!(outbox_rows(&d), 1, "a reload turned mail off");
    util::wait_until("the email in the spool", WAIT, || emails_in(&d.path("spool")) == 1);
}

#[test]
fn a_change_between_transports_applies_at_once() {
    let tools = tempfile::tempdir().unwrap();
    let script = tools.path().join("sendmail");
    let sent = tools.path().join("sent.eml");
    std::fs::write(&script, format!("#!/bin/sh\ncat > '{}'\n", sent.display())).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start("mail_transport = \"spool\"");
    reload(&d, &format!("mail_transport = \"sendmail\"\nsendmail_path = {:?}", script.display().to_string()));
    let mut c = d.client();
    let id = sub_and_pub(&mut c);
    util::wait_until("the email through sendmail", WAIT, || {
        std::fs::read_to_string(&sent).is_ok_and(|m| m.contains(&format!("<{id}.")))
    });
    assert_eq!(emails_in(&d.path("spool")), 0, "spooled after the reload");
}

#[test]
fn a_lowered_max_subs_per_conn_keeps_existing_subscriptions() {
    let d = Daemon::start("max_subs_per_conn = 3");
    let mut c = d.client();
    for e in ["e1", "e2", "e3"] {
        c.cmd(&format!("SUB {e} a@example.com"));
        c.expect(&format!("+OK SUB {e}"));
    }
    reload(&d, "max_subs_per_conn = 1");
    // Over the new limit: no new pair, but a repeated one is not new.
    c.cmd("SUB e4 a@example.com");
    c.expect_err("LIMIT");
    c.cmd("SUB e1 a@example.com");
    c.expect("+OK SUB e1");
    // The three live subscriptions are still there.
    let mut p = d.client();
    for e in ["e1", "e2", "e3"] {
        p.cmd(&format!("PUB {e} x"));
        let ok = p.line();
        assert!(ok.starts_with("+OK PUB ") && ok.ends_with(" 1"), "{e} reached {ok:?}");
        assert!(c.line().starts_with(&format!("MSG {e} ")));
    }
    c.cmd("PUB e4 x");
    assert!(c.line().starts_with("+OK PUB "), "no live subscription to e4");
    // A new connection gets the new limit.
    let mut n = d.client();
    n.cmd("SUB e1 b@example.com");
    n.expect("+OK SUB e1");
    n.cmd("SUB e2 b@example.com");
    n.expect_err("LIMIT");
}

#[test]
fn tcp_keepalive_applies_to_connections_accepted_after_the_reload() {
    let d = Daemon::start("tcp_keepalive = 45");
    let before = d.client();
    reload(&d, "tcp_keepalive = 0");
    let after = d.client();
    let left = extra::keepalive_timer(&before, d.port);
    assert!(left.is_some_and(|s| (35..=45).contains(&s)), "the connection from before the reload: {left:?}");
    assert_eq!(extra::keepalive_timer(&after, d.port), None, "the connection from after the reload");
}
