//! Email through the whole daemon: clients SUB and PUB over TCP, the store queues the
//! emails in its outbox, the mailer sends them to a real SMTP server (`util/smtp.rs`,
//! started per test on a loopback port) or spools them, across relay outages and crashes.

mod util;

#[path = "util/smtp.rs"]
mod smtp;

use smtp::{Options, SmtpServer};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use util::{header, Client, Daemon, WAIT};

const FROM: &str = "notifd@example.org";

/// How long a whole backlog (hundreds of emails, a debug build, a shared machine) may take.
const LONG: Duration = Duration::from_secs(120);

/// The configuration for the SMTP transport to `127.0.0.1:port`, with quick retries;
/// a key that `extra` sets replaces the one here (TOML refuses a key set twice).
fn smtp_config(port: u16, extra: &str) -> String {
    let base = [
        ("mail_transport", "\"smtp\"".to_string()),
        ("smtp_host", "\"127.0.0.1\"".to_string()),
        ("smtp_port", port.to_string()),
        ("mail_from", format!("\"{FROM}\"")),
        ("mail_retry_base", "1".to_string()),
    ];
    let sets = |key: &str| {
        extra
            .lines()
            .any(|l| l.trim_start().strip_prefix(key).is_some_and(|r| r.trim_start().starts_with('=')))
    };
    let mut text = String::new();
    for (k, v) in base {
        if !sets(k) {
            text.push_str(&format!("{k} = {v}\n"));
        }
    }
    text + extra
}

/// Subscribes each address to `event` (pipelined), and checks every `+OK`.
fn subscribe(c: &mut Client, event: &str, emails: &[String]) {
    let mut lines = String::new();
    for e in emails {
        lines.push_str(&format!("SUB {event} {e}\r\n"));
    }
    c.send(&lines);
    for _ in emails {
        c.expect(&format!("+OK SUB {event}"));
    }
}

fn addresses(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:04}@example.org")).collect()
}

/// Waits until the server accepted at least `n` messages; returns how many it has.
fn wait_messages(server: &SmtpServer, n: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let got = server.message_count();
        if got >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{got} of {n} messages within {timeout:?}; server events: {:?}\n{}",
            server.events().iter().rev().take(10).collect::<Vec<_>>(),
            server.errors()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until every address in `want` got at least one message; returns the
/// addresses the server saw, with how many messages each got.
fn wait_recipients(server: &SmtpServer, want: &[String], timeout: Duration) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for r in server.received() {
            for to in r.envelope_to {
                *seen.entry(to).or_default() += 1;
            }
        }
        let missing: Vec<&String> = want.iter().filter(|w| !seen.contains_key(*w)).collect();
        if missing.is_empty() {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} addresses still without their email after {timeout:?}, e.g. {:?}",
            missing.len(),
            want.len(),
            &missing[..missing.len().min(5)]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The outbox rows of one notification: address → (state, tries, last_error).
fn outbox(d: &Daemon, id: u64) -> BTreeMap<String, (String, u32, Option<String>)> {
    let db = d.db();
    let mut st =
        db.prepare("SELECT email, state, tries, last_error FROM outbox WHERE notification_id = ?1").unwrap();
    let rows = st
        .query_map([id as i64], |r| Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?, r.get(3)?))))
        .unwrap();
    rows.map(Result::unwrap).collect()
}

/// Waits until the outbox row of `id` for `email` satisfies `pred`; returns it.
fn wait_row(
    d: &Daemon,
    id: u64,
    email: &str,
    pred: impl Fn(&(String, u32, Option<String>)) -> bool,
) -> (String, u32, Option<String>) {
    let deadline = Instant::now() + WAIT * 2;
    loop {
        let rows = outbox(d, id);
        if let Some(row) = rows.get(email).filter(|r| pred(r)) {
            return row.clone();
        }
        assert!(Instant::now() < deadline, "outbox row ({id}, {email}) not as expected: {rows:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until every outbox row of notification `id` is in a final state (sent or failed).
fn wait_outbox_final(
    d: &Daemon,
    id: u64,
    timeout: Duration,
) -> BTreeMap<String, (String, u32, Option<String>)> {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = outbox(d, id);
        if !rows.is_empty() && rows.values().all(|(state, _, _)| state == "sent" || state == "failed") {
            return rows;
        }
        assert!(Instant::now() < deadline, "outbox of {id} not final within {timeout:?}: {rows:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn created_at(d: &Daemon, id: u64) -> i64 {
    d.db().query_row("SELECT created_at FROM notifications WHERE id = ?1", [id as i64], |r| r.get(0)).unwrap()
}

/// The UNSUB code of (`to`, `event`), from the secret in the daemon's database.
fn unsub_code(d: &Daemon, to: &str, event: &str) -> String {
    let bytes: Vec<u8> =
        d.db().query_row("SELECT value FROM secrets WHERE name = 'consent'", [], |r| r.get(0)).unwrap();
    notifd::consent::Secret::from_bytes(&bytes).unwrap().unsub_code(to, event).to_string()
}

/// One email as notifd must write it: headers, then the body with the text, the event,
/// the id, the publication time and the UNSUB line with a code.
fn check_email(raw: &[u8], to: &str, event: &str, id: u64, text: &str, published: i64) {
    let mail = mailparse::parse_mail(raw).expect("parseable message");
    assert_eq!(header(&mail, "From"), FROM);
    assert_eq!(header(&mail, "MIME-Version"), "1.0");
    assert_eq!(header(&mail, "Auto-Submitted"), "auto-generated");
    assert!(header(&mail, "List-Id").contains(&format!("<{event}.notifd.")), "{}", header(&mail, "List-Id"));
    assert_eq!(header(&mail, "To"), to);
    assert_eq!(header(&mail, "Subject"), format!("[notifd] {event}"));
    assert_eq!(mailparse::dateparse(&header(&mail, "Date")).unwrap(), published);
    let message_id = header(&mail, "Message-ID");
    assert!(message_id.starts_with(&format!("<{id}.")) && message_id.ends_with("@notifd>"), "{message_id}");
    assert_eq!(mail.ctype.mimetype, "text/plain");
    assert_eq!(mail.ctype.charset, "utf-8");
    let body = mail.get_body().expect("decodable body").replace("\r\n", "\n");
    assert!(body.starts_with(&format!("{text}\n")), "{body}");
    assert!(body.contains(&format!("Event: {event}\n")), "{body}");
    assert!(body.contains(&format!("Notification: {id}\n")), "{body}");
    let time =
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(published as u64));
    assert!(body.contains(&format!("Published: {time}\n")), "{body}");
    // Prose is filled into short lines: compare it with its line breaks as spaces.
    let prose = body.replace('\n', " ");
    assert!(prose.contains(&format!("You receive this because {to} is subscribed to {event}.")), "{body}");
    // The last line: the exact UNSUB line, with a code of the printed form.
    let last = body.trim_end().lines().last().unwrap();
    let code = last.strip_prefix(&format!("UNSUB {event} {to} ")).unwrap_or_else(|| panic!("{body}"));
    assert!(notifd::consent::Code::parse(code).is_some_and(|c| c.to_string() == code), "{body}");
}

#[test]
fn three_subscribers_get_one_email_each_and_another_event_none() {
    let server = SmtpServer::start(Options::default());
    let d = Daemon::start(&smtp_config(server.port, ""));
    let mut subs = d.client();
    let three: Vec<String> =
        ["alice@example.org", "bob@example.net", "o'hara+tag@example.com"].map(String::from).to_vec();
    subscribe(&mut subs, "deploy.prod", &three);
    subscribe(&mut subs, "deploy.staging", &["dave@example.org".to_string()]);

    let mut publisher = d.client();
    let text = "build 1234 is live: Grüße aus Köln ✓";
    let id = util::publish(&mut publisher, "deploy.prod", text).0;
    wait_messages(&server, 3, WAIT * 3);

    // Every row of that publication is final, so nothing more is coming for it.
    let rows = wait_outbox_final(&d, id, WAIT);
    assert_eq!(rows.keys().cloned().collect::<Vec<_>>(), {
        let mut s = three.clone();
        s.sort();
        s
    });
    assert!(rows.values().all(|(state, tries, _)| state == "sent" && *tries == 1), "{rows:?}");

    let received = server.received();
    assert_eq!(received.len(), 3, "{:?}", server.events());
    let published = created_at(&d, id);
    let mut to: Vec<String> = Vec::new();
    for r in &received {
        assert_eq!(r.envelope_from, FROM);
        assert_eq!(r.envelope_to.len(), 1);
        check_email(&r.raw, &r.envelope_to[0], "deploy.prod", id, text, published);
        // The code is the one the server takes for that pair.
        let line = format!(
            "UNSUB deploy.prod {0} {1}",
            r.envelope_to[0],
            unsub_code(&d, &r.envelope_to[0], "deploy.prod")
        );
        let body = mailparse::parse_mail(&r.raw).unwrap().get_body().unwrap();
        assert!(body.lines().any(|l| l.trim_end() == line), "no line {line:?} in {body}");
        // It names the server where that line goes, with the port it listens on.
        let server = format!("server at 127.0.0.1:{}:", d.port);
        assert!(body.replace("\r\n", " ").replace('\n', " ").contains(&server), "no {server:?} in {body}");
        to.push(r.envelope_to[0].clone());
    }
    to.sort();
    let mut want = three.clone();
    want.sort();
    assert_eq!(to, want, "dave (deploy.staging only) got nothing");
    assert_eq!(server.connections(), 1, "one batch, one connection: {:?}", server.events());
}

#[test]
fn starttls_with_the_ca_from_smtp_ca_file() {
    let certs = tempfile::tempdir().unwrap();
    let (ca_pem, chain, key) = smtp::test_certificates(certs.path());
    let ca_file = certs.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let server = SmtpServer::start(Options { tls: Some((chain, key)), ..Options::default() });
    let d = Daemon::start(&smtp_config(
        server.port,
        &format!(
            "smtp_host = \"localhost\"\nsmtp_tls = \"starttls\"\nsmtp_ca_file = {:?}\n",
            ca_file.display().to_string()
        ),
    ));
    let mut subs = d.client();
    subscribe(&mut subs, "tls.test", &["alice@example.org".to_string()]);
    let id = util::publish(&mut d.client(), "tls.test", "over TLS").0;
    wait_messages(&server, 1, WAIT * 3);
    let received = server.received();
    assert!(received[0].tls, "the message came over STARTTLS");
    check_email(&received[0].raw, "alice@example.org", "tls.test", id, "over TLS", created_at(&d, id));
    let rows = wait_outbox_final(&d, id, WAIT);
    assert_eq!(rows["alice@example.org"].0, "sent");
}

/// `smtp_tls = "starttls"` never falls back to plain text: with a relay that does not
/// offer STARTTLS, the email stays pending and is tried again, and the log says why.
#[test]
fn starttls_that_the_relay_does_not_offer_is_a_failed_try() {
    let server = SmtpServer::start(Options::default());
    let d = Daemon::start(&smtp_config(server.port, "smtp_tls = \"starttls\"\n"));
    let mut subs = d.client();
    subscribe(&mut subs, "tls.test", &["alice@example.org".to_string()]);
    let id = util::publish(&mut d.client(), "tls.test", "not in plain text").0;
    d.wait_log(|l| l.contains("try 1 failed, next in") && l.contains("STARTTLS"), WAIT * 2);
    let (state, _, error) = wait_row(&d, id, "alice@example.org", |r| r.1 >= 2);
    assert_eq!(state, "pending");
    assert!(error.as_deref().is_some_and(|e| e.contains("STARTTLS")), "{error:?}");
    assert!(server.connections() >= 2, "it reached the relay each time: {:?}", server.events());
    assert_eq!(server.message_count(), 0, "{:?}", server.events());
}

/// `smtp_password_file` is read again on HUP: the next email authenticates with the
/// password the file holds then.
#[test]
fn the_smtp_password_file_is_reread_on_hup() {
    let server = SmtpServer::start(Options {
        auth: Some(("notifd".into(), "new password".into())),
        ..Options::default()
    });
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("smtp-password");
    std::fs::write(&password_file, "old password\n").unwrap();
    let d = Daemon::start(&smtp_config(
        server.port,
        &format!("smtp_user = \"notifd\"\nsmtp_password_file = {:?}\n", password_file.display().to_string()),
    ));
    let mut subs = d.client();
    subscribe(&mut subs, "secret", &["alice@example.org".to_string()]);
    let id = util::publish(&mut d.client(), "secret", "after the new password").0;
    let (state, _, error) = wait_row(&d, id, "alice@example.org", |r| r.1 >= 1);
    assert_eq!(state, "pending");
    assert!(error.as_deref().is_some_and(|e| e.contains("535")), "{error:?}");
    assert!(server.events().iter().any(|e| e.starts_with("auth ") && e.ends_with(" refused")));

    std::fs::write(&password_file, "new password\n").unwrap();
    let reloads = d.log_count("configuration reloaded");
    d.signal(libc::SIGHUP);
    d.wait_log_count("configuration reloaded", reloads + 1, WAIT);
    let rows = wait_outbox_final(&d, id, WAIT * 3);
    assert_eq!(rows["alice@example.org"].0, "sent", "{rows:?}");
    let ok = server.events().iter().filter(|e| e.starts_with("auth ") && e.ends_with(" ok")).count();
    assert_eq!(ok, 1, "{:?}", server.events());
    assert_eq!(server.message_count(), 1);
}

#[test]
fn a_421_for_the_first_tries_then_the_email_arrives() {
    let server = SmtpServer::start(Options { tempfail: 2, ..Options::default() });
    let d = Daemon::start(&smtp_config(server.port, ""));
    let mut subs = d.client();
    subscribe(&mut subs, "outage", &["alice@example.org".to_string()]);
    let id = util::publish(&mut d.client(), "outage", "after two 421s").0;
    // Retry delays: about 1 s, then about 2 s.
    wait_messages(&server, 1, WAIT * 3);
    let rows = wait_outbox_final(&d, id, WAIT);
    let (state, tries, _) = &rows["alice@example.org"];
    assert_eq!((state.as_str(), *tries), ("sent", 3), "{rows:?}");
    let refusals = server.events().iter().filter(|l| l.starts_with("reply ") && l.ends_with(" 421")).count();
    assert_eq!(refusals, 2, "{:?}", server.events());
    assert!(d.log_has("try 1 failed, next in"), "{}", d.log_text());
    assert!(d.log_has("try 2 failed, next in"), "{}", d.log_text());
    assert_eq!(server.message_count(), 1);
}

#[test]
fn a_relay_that_is_down_then_up_gets_the_email() {
    // The relay greets every connection with 421 until it is brought up.
    let server = SmtpServer::start(Options { down: true, ..Options::default() });
    let d = Daemon::start(&smtp_config(server.port, ""));
    let mut subs = d.client();
    subscribe(&mut subs, "outage", &["alice@example.org".to_string()]);
    let id = util::publish(&mut d.client(), "outage", "the relay was down").0;
    d.wait_log(|l| l.contains("try 1 failed, next in"), WAIT * 2);
    // The log line comes just before the commit.
    let (state, _, error) = wait_row(&d, id, "alice@example.org", |r| r.1 == 1);
    assert_eq!(state, "pending");
    let error = error.unwrap_or_default();
    assert!(error.contains(&server.port.to_string()) && error.contains("421"), "{error}");
    assert_eq!(server.message_count(), 0);

    server.set_down(false);
    wait_messages(&server, 1, WAIT * 3);
    let rows = wait_outbox_final(&d, id, WAIT);
    assert_eq!(rows["alice@example.org"].0, "sent", "{rows:?}");
    let received = server.received();
    check_email(
        &received[0].raw,
        "alice@example.org",
        "outage",
        id,
        "the relay was down",
        created_at(&d, id),
    );
}

#[test]
fn sigkill_of_the_mailer_in_the_middle_of_500_emails() {
    let server = SmtpServer::start(Options::default());
    let d = Daemon::start(&smtp_config(server.port, ""));
    let everyone = addresses("user", 500);
    let mut subs = d.client();
    subscribe(&mut subs, "big", &everyone);
    let first_mailer = *d.mailer_pids().last().expect("a mailer pid in the log");
    let id = util::publish(&mut d.client(), "big", "five hundred").0;

    // Kill it once some emails went out. The connections open at the kill are the first
    // mailer's: the later ones are its successor's.
    wait_messages(&server, 10, WAIT * 3);
    let conns_at_kill = server.connections() as u32;
    util::signal(first_mailer, libc::SIGKILL);
    d.wait_log(|l| l.contains("notifd-mailer 1 lost"), WAIT);
    d.wait_log(|l| l.contains("notifd-mailer 1 restarted"), WAIT);
    let second_mailer = *d.mailer_pids().last().unwrap();
    assert_ne!(second_mailer, first_mailer);

    let seen = wait_recipients(&server, &everyone, LONG);
    assert_eq!(seen.len(), 500, "only subscribers were mailed");
    let rows = wait_outbox_final(&d, id, LONG);
    assert_eq!(rows.len(), 500);
    assert!(
        rows.values().all(|(state, _, _)| state == "sent"),
        "{:?}",
        rows.values().find(|r| r.0 != "sent")
    );
    let received = server.received();
    let before = received.iter().filter(|r| r.conn <= conns_at_kill).count();
    assert!(before < 500, "all 500 went out before the kill: the test tested nothing");
    assert!(received.iter().any(|r| r.conn > conns_at_kill), "the next mailer sent nothing");
    let dups: usize = seen.values().map(|n| n - 1).sum();
    println!("500 emails across a mailer kill after {before}: {dups} sent twice");
}

#[test]
fn sigkill_of_the_whole_daemon_with_emails_pending() {
    // The relay is down at first: the emails stay pending.
    let server = SmtpServer::start(Options { down: true, ..Options::default() });
    let mut d = Daemon::start(&smtp_config(server.port, ""));
    let people = addresses("p", 3);
    let mut subs = d.client();
    subscribe(&mut subs, "crash", &people);
    let mut publisher = d.client();
    let ids = [
        util::publish(&mut publisher, "crash", "first").0,
        util::publish(&mut publisher, "crash", "second").0,
    ];
    d.wait_log(|l| l.contains("try 1 failed, next in"), WAIT * 2);
    wait_row(&d, ids[0], &people[0], |r| r.1 >= 1);
    drop((subs, publisher));
    d.kill_all();
    for id in ids {
        let rows = outbox(&d, id);
        assert_eq!(rows.len(), 3);
        assert!(rows.values().all(|(s, _, _)| s == "pending" || s == "sending"), "{rows:?}");
    }

    server.set_down(false);
    d.restart();
    wait_messages(&server, 6, WAIT * 3);
    for id in ids {
        let rows = wait_outbox_final(&d, id, WAIT);
        assert!(rows.values().all(|(s, _, _)| s == "sent"), "{rows:?}");
    }
    let mut got: Vec<(String, String)> = server
        .received()
        .iter()
        .map(|r| {
            let mail = mailparse::parse_mail(&r.raw).unwrap();
            let body = mail.get_body().unwrap();
            (r.envelope_to[0].clone(), body.lines().next().unwrap().to_string())
        })
        .collect();
    got.sort();
    got.dedup();
    let mut want: Vec<(String, String)> =
        people.iter().flat_map(|p| [(p.clone(), "first".into()), (p.clone(), "second".into())]).collect();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn the_spool_transport_writes_parseable_eml_files() {
    let d = Daemon::start("mail_transport = \"spool\"\nmail_from = \"notifd@example.org\"\n");
    let spool = d.path("spool");
    let people = vec!["alice@example.org".to_string(), "a/b%c@example.org".to_string()];
    let mut subs = d.client();
    subscribe(&mut subs, "spooled", &people);
    let text = "spooled — ünïcode";
    let id = util::publish(&mut d.client(), "spooled", text).0;
    let rows = wait_outbox_final(&d, id, WAIT * 3);
    assert!(rows.values().all(|(s, _, _)| s == "sent"), "{rows:?}");

    let mut names: Vec<String> =
        std::fs::read_dir(&spool).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with(&format!("{id}-")) && n.ends_with(".eml")), "{names:?}");
    let published = created_at(&d, id);
    let mut to = BTreeSet::new();
    for n in &names {
        let raw = std::fs::read(spool.join(n)).unwrap();
        let mail = mailparse::parse_mail(&raw).unwrap();
        let addr = header(&mail, "To");
        check_email(&raw, &addr, "spooled", id, text, published);
        to.insert(addr);
    }
    assert_eq!(to, people.into_iter().collect());
}

#[test]
fn offline_policy_skips_an_address_with_a_live_subscription() {
    let server = SmtpServer::start(Options::default());
    let d = Daemon::start(&smtp_config(server.port, "mail_policy = \"offline\"\n"));
    // alice stays connected; bob subscribed and left.
    let mut alice = d.client();
    subscribe(&mut alice, "news", &["alice@example.org".to_string()]);
    let mut bob = d.client();
    subscribe(&mut bob, "news", &["bob@example.org".to_string()]);
    let bob_addr = bob.local_addr();
    bob.cmd("QUIT");
    bob.expect("+OK QUIT");
    bob.expect_eof();
    d.wait_log(|l| l.contains(&format!("{bob_addr}: closed")), WAIT);

    let mut publisher = d.client();
    publisher.cmd("PUB news hello offline");
    let line = publisher.line();
    let parts: Vec<&str> = line.split(' ').collect();
    assert_eq!((parts[0], parts[1], parts[3]), ("+OK", "PUB", "1"), "one live subscriber: {line}");
    let id: u64 = parts[2].parse().unwrap();
    assert_eq!(alice.line(), format!("MSG news {id} hello offline"));
    let rows = wait_outbox_final(&d, id, WAIT * 3);
    assert_eq!(rows.keys().collect::<Vec<_>>(), ["bob@example.org"], "alice is live: no email");
    assert_eq!(rows["bob@example.org"].0, "sent");
    let seen = wait_recipients(&server, &["bob@example.org".to_string()], WAIT);
    assert!(!seen.contains_key("alice@example.org"), "{seen:?}");
}

#[test]
fn a_5xx_is_given_up_at_once() {
    let server = SmtpServer::start(Options { reject_rcpt: Some("bounce".into()), ..Options::default() });
    let d = Daemon::start(&smtp_config(server.port, "mail_max_tries = 5\n"));
    let people = vec!["bounce@example.org".to_string(), "ok@example.org".to_string()];
    let mut subs = d.client();
    subscribe(&mut subs, "hard", &people);
    let id = util::publish(&mut d.client(), "hard", "one bounces").0;
    let rows = wait_outbox_final(&d, id, WAIT * 3);
    let (state, tries, error) = &rows["bounce@example.org"];
    assert_eq!((state.as_str(), *tries), ("failed", 1), "{rows:?}");
    let error = error.as_deref().unwrap_or_default();
    assert!(error.starts_with("550") && error.contains("no such user"), "{error}");
    assert_eq!(rows["ok@example.org"].0, "sent");
    let refusals = server.events().iter().filter(|l| l.starts_with("reply ") && l.ends_with(" 550")).count();
    assert_eq!(refusals, 1, "one attempt only: {:?}", server.events());
    d.wait_log(|l| l.contains("bounce@example.org: given up after 1 tries"), WAIT);
    assert!(!d.log_has("try 1 failed"), "{}", d.log_text());
}

/// `cargo test --release --test mail -- --ignored --nocapture throughput`
#[test]
#[ignore = "a measurement, not a check"]
fn throughput_of_a_thousand_pending_emails_through_the_daemon() {
    let server = SmtpServer::start(Options { no_save: true, ..Options::default() });
    let d = Daemon::start(&smtp_config(server.port, "log_level = \"info\"\n"));
    let everyone = addresses("reader", 1000);
    let mut subs = d.client();
    subscribe(&mut subs, "bench", &everyone);
    let mut publisher = d.client();
    let start = Instant::now();
    util::publish(&mut publisher, "bench", "throughput");
    let committed = start.elapsed();
    wait_messages(&server, 1000, LONG);
    let elapsed = start.elapsed();
    println!(
        "1000 emails from one PUB (committed in {:.3} s) delivered in {:.2} s over {} SMTP connection(s): {:.0} emails/s",
        committed.as_secs_f64(),
        elapsed.as_secs_f64(),
        server.connections(),
        1000.0 / elapsed.as_secs_f64()
    );
}

/// Kills the mailer now running and waits for its replacement; returns the new pid.
fn kill_mailer(d: &Daemon) -> i32 {
    let old = *d.mailer_pids().last().expect("a mailer pid in the log");
    let restarts = d.log_count("notifd-mailer 1 restarted");
    util::signal(old, libc::SIGKILL);
    d.wait_log_count("notifd-mailer 1 restarted", restarts + 1, WAIT);
    *d.mailer_pids().last().unwrap()
}

/// Emails the store leases while their mailer is dead (a TakeMail in flight when it died)
/// wait for the next mailer; they are not left leased to nobody.
#[test]
fn emails_taken_while_the_mailer_is_down_are_not_stranded() {
    let server = SmtpServer::start(Options::default());
    // The store waits for the test's write lock below for up to store_timeout / 2.
    let d = Daemon::start(&smtp_config(server.port, "store_timeout = 120\n"));
    let everyone = addresses("user", 500);
    let mut subs = d.client();
    subscribe(&mut subs, "big", &everyone);
    // Quick deaths double the restart delay: after these five, the next death keeps
    // the mailer down for 3.2 s.
    for _ in 0..5 {
        kill_mailer(&d);
    }

    let lock = rusqlite::Connection::open(d.path("db/notifd.db")).unwrap();
    let id = util::publish(&mut d.client(), "big", "stranded?").0;
    // The mailer got its first 256 and is sending them. Stopped, it sends at most the
    // one message already on the wire while the test takes the database's write lock.
    wait_messages(&server, 1, WAIT * 3);
    let mailer = *d.mailer_pids().last().unwrap();
    util::signal(mailer, libc::SIGSTOP);
    let at_lock = server.message_count() + 1;
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    util::signal(mailer, libc::SIGCONT);
    // It reports every 50: past one more report, that report and the TakeMail that
    // follows it wait for the store, which waits for the lock.
    let kill_at = at_lock + 50 + 10;
    assert!(kill_at <= 256, "{at_lock} sent before the lock: no report left to hold up");
    wait_messages(&server, kill_at, WAIT * 3);
    let pending = |db: &rusqlite::Connection| -> i64 {
        db.query_row("SELECT count(*) FROM outbox WHERE state = 'pending'", [], |r| r.get(0)).unwrap()
    };
    let pending_at_kill = pending(&lock);
    let losses = d.log_count("notifd-mailer 1 lost");
    util::signal(mailer, libc::SIGKILL);
    d.wait_log_count("notifd-mailer 1 lost", losses + 1, WAIT);
    let restarts = d.log_count("notifd-mailer 1 restarted");
    lock.execute_batch("COMMIT").unwrap();
    // The store answers the TakeMail now: the emails it leases leave 'pending' while no
    // mailer is up.
    util::wait_until("the store leasing emails", WAIT, || pending(&d.db()) < pending_at_kill);
    assert_eq!(
        d.log_count("notifd-mailer 1 restarted"),
        restarts,
        "the mailer was back before the store answered: the test tested nothing"
    );
    d.wait_log_count("notifd-mailer 1 restarted", restarts + 1, WAIT);

    wait_recipients(&server, &everyone, Duration::from_secs(60));
    let rows = wait_outbox_final(&d, id, WAIT * 3);
    assert!(
        rows.values().all(|(state, _, _)| state == "sent"),
        "{:?}",
        rows.values().find(|r| r.0 != "sent")
    );
}

/// Emails of long texts to many addresses are more than one pipe record can hold: the
/// store and the reactor cut them into batches instead of breaking the pipe.
#[test]
fn long_texts_to_many_addresses_cross_the_pipes_in_batches() {
    let d = Daemon::start("mail_transport = \"spool\"\nmax_line = 65536\n");
    let people = addresses("long", 40);
    let mut subs = d.client();
    subscribe(&mut subs, "long", &people);
    // 40 emails of 60,000 bytes: 2.4 MB of jobs, over the 1 MiB record maximum.
    let text = "x".repeat(60_000);
    let id = util::publish(&mut d.client(), "long", &text).0;
    let rows = wait_outbox_final(&d, id, WAIT * 3);
    assert_eq!(rows.len(), 40);
    assert!(rows.values().all(|(s, _, _)| s == "sent"), "{rows:?}");
    assert!(!d.log_has("lost"), "a child was lost:\n{}", d.log_text());
    assert_eq!(std::fs::read_dir(d.path("spool")).unwrap().count(), 40);
}
