//! Consent over TCP: untrusted and trusted connections, pending subscriptions, the
//! CONFIRM, OPTOUT and UNSUB codes from the spooled emails, and the limits a stranger
//! meets (notifd-protocol(7), *Trust* and *Consent*).
//!
//! `publish_token` is set, so a loopback client is untrusted until it AUTHs; emails go to
//! the spool, where the tests read the exact lines the contract promises.

mod util;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use util::{Client, Daemon, WAIT};

const TOKEN: &str = "consent-test-token";

/// A daemon with the token set and emails spooled, plus `extra`.
fn start(extra: &str) -> Daemon {
    Daemon::start(&format!(
        "publish_token = \"{TOKEN}\"\nmail_transport = \"spool\"\nmail_retry_base = 1\n\
         mail_from = \"notifd@example.org\"\n{extra}"
    ))
}

/// A connection that sent the token.
fn trusted(d: &Daemon) -> Client {
    let mut c = d.client();
    c.cmd(&format!("AUTH {TOKEN}"));
    c.expect("+OK AUTH");
    c
}

/// The spooled files whose names start with `prefix`, sorted.
fn spooled(d: &Daemon, prefix: &str) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(d.path("spool")) else { return Vec::new() };
    let mut names: Vec<PathBuf> = dir
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(prefix) && n.ends_with(".eml")
        })
        .collect();
    names.sort();
    names
}

/// Waits for `n` spooled files starting with `prefix`; returns them.
fn wait_spooled(d: &Daemon, prefix: &str, n: usize) -> Vec<PathBuf> {
    util::wait_until(&format!("{n} spooled {prefix}* emails"), WAIT * 3, || spooled(d, prefix).len() >= n);
    spooled(d, prefix)
}

/// The decoded body's lines.
fn body_lines(path: &PathBuf) -> Vec<String> {
    let raw = std::fs::read(path).unwrap();
    let mail = mailparse::parse_mail(&raw).unwrap();
    let body = mail.get_body().unwrap();
    body.lines().map(|l| l.trim_end().to_string()).collect()
}

/// The one body line starting with `prefix`, checked to be exactly `prefix` and a code
/// printed `XXXX-XXXX-XXXX` in Crockford base32; returns the code.
fn code_line(lines: &[String], prefix: &str) -> String {
    let found: Vec<&String> = lines.iter().filter(|l| l.starts_with(prefix)).collect();
    assert_eq!(found.len(), 1, "one line starting {prefix:?} in {lines:#?}");
    let code = &found[0][prefix.len()..];
    let groups: Vec<&str> = code.split('-').collect();
    assert!(
        groups.len() == 3
            && groups.iter().all(|g| g.len() == 4
                && g.bytes().all(|b| b.is_ascii_digit() || b"ABCDEFGHJKMNPQRSTVWXYZ".contains(&b))),
        "not a code: {:?}",
        found[0]
    );
    code.to_string()
}

/// An untrusted connection that subscribed `email` to `event` (pending), and the code
/// of the line starting `<word> <email> ` in the confirmation email that follows.
fn pending_with_code(d: &Daemon, event: &str, email: &str, word: &str) -> (Client, String) {
    let mut u = d.client();
    u.cmd(&format!("SUB {event} {email}"));
    u.expect(&format!("+OK SUB {event} pending"));
    let code = code_line(&body_lines(&wait_spooled(d, "confirm-", 1)[0]), &format!("{word} {email} "));
    (u, code)
}

/// A count from the database.
fn count(d: &Daemon, sql: &str, email: &str) -> i64 {
    d.db().query_row(sql, [email], |r| r.get(0)).unwrap()
}

/// Stored pairs of `email`: (pending, confirmed).
fn pairs(d: &Daemon, email: &str) -> (i64, i64) {
    let sql = "SELECT count(*) FILTER (WHERE confirmed_at IS NULL), count(confirmed_at) FROM subscriptions \
               WHERE email = ?1";
    d.db().query_row(sql, [email], |r| Ok((r.get(0)?, r.get(1)?))).unwrap()
}

/// The lines of a trusted LIST of `email`, its `+OK` included.
fn list(t: &mut Client, email: &str) -> Vec<String> {
    t.cmd(&format!("LIST {email}"));
    let mut lines = Vec::new();
    loop {
        let l = t.line();
        let end = l.starts_with("+OK LIST") || l.starts_with("-ERR");
        lines.push(l);
        if end {
            return lines;
        }
    }
}

/// The full path of the untrusted SUB: a pending reply, one confirmation email with the
/// exact CONFIRM and OPTOUT lines, CONFIRM, a notification email with the exact UNSUB
/// line, UNSUB with its code, and no email after that.
#[test]
fn untrusted_sub_is_confirmed_with_the_emailed_code_and_stopped_with_the_unsub_code() {
    let d = start("");
    let ana = "ana@example.org";
    let mut u = d.client();
    assert!(u.greeting.contains(" abilities=watch,since,confirm,stats"), "{}", u.greeting);
    u.cmd(&format!("SUB news {ana}"));
    u.expect("+OK SUB news pending");
    let mut t = trusted(&d);
    let l = list(&mut t, ana);
    assert_eq!(l.len(), 2, "{l:?}");
    assert!(l[0].starts_with(&format!("SUB news {ana} ")) && l[0].ends_with(" pending"), "{l:?}");
    assert_eq!(l[1], "+OK LIST 1");
    t.cmd("STATS");
    let stats: Vec<String> =
        std::iter::from_fn(|| Some(t.line())).take_while(|l| !l.starts_with("+OK")).collect();
    assert!(stats.contains(&"STAT pending_subscriptions 1".to_string()), "{stats:?}");

    let confirm = wait_spooled(&d, "confirm-", 1);
    assert_eq!(confirm.len(), 1, "{confirm:?}");
    let lines = body_lines(&confirm[0]);
    let code = code_line(&lines, &format!("CONFIRM {ana} "));
    code_line(&lines, &format!("OPTOUT {ana} "));
    // A PUB before the confirmation emails nobody.
    util::publish(&mut t, "news", "before");
    let notifications =
        "SELECT count(*) FROM outbox o JOIN notifications n ON n.id = o.notification_id WHERE o.email = ?1";
    assert_eq!(count(&d, notifications, ana), 0);

    // Case and dashes do not matter.
    u.expect("MSG news 1 before");
    u.cmd(&format!("CONFIRM {ana} {}", code.to_lowercase().replace('-', "")));
    u.expect("+OK CONFIRM 1");
    let l = list(&mut t, ana);
    assert!(l[0].starts_with(&format!("SUB news {ana} ")) && !l[0].ends_with("pending"), "{l:?}");

    let (id, _) = util::publish(&mut t, "news", "after");
    let mail = wait_spooled(&d, &format!("{id}-"), 1);
    let unsub = code_line(&body_lines(&mail[0]), &format!("UNSUB news {ana} "));

    // From any connection: a fresh untrusted one.
    let mut other = d.client();
    other.cmd(&format!("UNSUB news {ana} {unsub}"));
    other.expect("+OK UNSUB news");
    assert_eq!(list(&mut t, ana), ["+OK LIST 0"]);
    let (id, _) = util::publish(&mut t, "news", "gone");
    assert_eq!(
        count(&d, &format!("SELECT count(*) FROM outbox WHERE email = ?1 AND notification_id = {id}"), ana),
        0
    );
    assert_eq!(spooled(&d, &format!("{id}-")), Vec::<PathBuf>::new());
}

/// OPTOUT with the emailed code; then a stranger's SUB of that address gets the same
/// reply and no confirmation email; a trusted SUB lifts the opt-out and is confirmed.
#[test]
fn an_opted_out_address_gets_no_confirmation_until_a_trusted_sub() {
    let d = start("");
    let bo = "bo@example.net";
    let (mut u, optout) = pending_with_code(&d, "alerts", bo, "OPTOUT");
    u.cmd(&format!("OPTOUT {bo} {optout}"));
    u.expect("+OK OPTOUT");

    let mut stranger = d.client();
    stranger.cmd(&format!("SUB other {bo}"));
    stranger.expect("+OK SUB other pending");
    assert_eq!(pairs(&d, bo), (0, 0));
    assert_eq!(count(&d, "SELECT count(*) FROM confirmations WHERE email = ?1", bo), 1);

    let mut t = trusted(&d);
    t.cmd(&format!("SUB alerts {bo}"));
    t.expect("+OK SUB alerts");
    let l = list(&mut t, bo);
    assert_eq!(l.len(), 2, "{l:?}");
    assert!(!l[0].ends_with("pending"), "{l:?}");
    // The opt-out is lifted: a stranger's SUB stores a pending pair again.
    stranger.cmd(&format!("SUB third {bo}"));
    stranger.expect("+OK SUB third pending");
    assert_eq!(pairs(&d, bo).0, 1);
}

/// Forged, garbage and other addresses' codes get `-ERR AUTH` and the connection goes
/// on; a code used again confirms nothing more.
#[test]
fn wrong_codes_are_refused_and_the_connection_stays() {
    let d = start("");
    let cy = "cy@example.com";
    let (mut u, code) = pending_with_code(&d, "e", cy, "CONFIRM");
    for bad in [
        format!("CONFIRM {cy} 0000-0000-0000"),
        format!("CONFIRM {cy} not-a-code"),
        format!("CONFIRM {cy} {code}X"),
        format!("CONFIRM other@example.com {code}"),
        format!("OPTOUT {cy} {code}"),
        format!("OPTOUT {cy} zz"),
        format!("UNSUB e {cy} {code}"),
        format!("UNSUB e {cy} <b>"),
    ] {
        u.cmd(&bad);
        u.expect_err("AUTH");
    }
    u.cmd("PING still");
    u.expect("PONG still");
    u.cmd(&format!("CONFIRM {cy} {code}"));
    u.expect("+OK CONFIRM 1");
    u.cmd(&format!("CONFIRM {cy} {code}"));
    u.expect("+OK CONFIRM 0");
    assert_eq!(pairs(&d, cy), (0, 1));
}

/// Past `auth_fail_limit` wrong codes in a minute, codes from that address are refused
/// unchecked (the right one too), on every connection from it, logged once; a failed
/// AUTH counter is not involved.
#[test]
fn wrong_codes_past_the_limit_are_refused_unchecked_and_logged_once() {
    let d = start("auth_fail_limit = 3\n");
    let di = "di@example.com";
    let (mut u, code) = pending_with_code(&d, "e", di, "CONFIRM");
    for _ in 0..3 {
        u.cmd(&format!("CONFIRM {di} 0000-0000-0000"));
        u.expect_err("AUTH");
    }
    u.cmd(&format!("CONFIRM {di} {code}"));
    let text = u.expect_err("AUTH");
    assert!(text.contains("try again"), "{text}");
    let mut v = d.client();
    v.cmd(&format!("CONFIRM {di} {code}"));
    v.expect_err("AUTH");
    v.cmd(&format!("UNSUB e {di} {code}"));
    v.expect_err("AUTH");
    u.cmd("PING");
    u.expect("PONG");
    let needle = "wrong CONFIRM, OPTOUT or UNSUB codes from this address";
    d.wait_log_count(needle, 1, WAIT);
    assert_eq!(d.log_count(needle), 1, "{}", d.log_text());
    assert_eq!(pairs(&d, di).0, 1);
    // AUTH has its own counter.
    trusted(&d);
}

/// One mailbox written with other case or a `+tag`, and one address asked for many
/// events: one confirmation email per interval, `max_unconfirmed_per_email` kept.
#[test]
fn one_mailbox_gets_one_confirmation_per_interval() {
    let d = start("max_unconfirmed_per_email = 5\nsub_rate = 1000\n");
    let mut u = d.client();
    for m in ["eve@example.org", "Eve@EXAMPLE.org", "eve+x@example.org", "EVE+y@example.org"] {
        u.cmd(&format!("SUB one {m}"));
        u.expect("+OK SUB one pending");
    }
    let mut others: Vec<Client> = (0..4).map(|_| d.client()).collect();
    for i in 0..40 {
        let c = &mut others[i % 4];
        c.cmd(&format!("SUB many.{i} fay@example.org"));
        c.expect(&format!("+OK SUB many.{i} pending"));
    }
    // Each SUB's confirmation is queued in its own commit: all are there now.
    let total: i64 = d.db().query_row("SELECT count(*) FROM confirmations", [], |r| r.get(0)).unwrap();
    assert_eq!(total, 2, "one for eve's mailbox, one for fay");
    assert_eq!(pairs(&d, "fay@example.org"), (5, 0));
    wait_spooled(&d, "confirm-", 2);
    u.sync();
    assert_eq!(spooled(&d, "confirm-").len(), 2);
}

/// Many mailboxes at one domain, then at a thousand domains, all from one client:
/// confirmation emails stop at `confirm_domain_rate` per domain and `confirm_rate` in all
/// per hour; the replies do not change, and every pair waits pending for its turn.
#[test]
fn confirmation_emails_stop_at_the_domain_and_total_rates() {
    let d = start("sub_rate = 100000\nmax_subs_per_conn = 2000\nconfirm_domain_rate = 2\nconfirm_rate = 5\n");
    let mut u = d.client();
    for i in 0..10 {
        u.cmd(&format!("SUB rate m{i}@same.example"));
        u.expect("+OK SUB rate pending");
    }
    for i in 0..1000 {
        u.cmd(&format!("SUB rate n@d{i}.example"));
        u.expect("+OK SUB rate pending");
    }
    let db = d.db();
    let n = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        n("SELECT count(*) FROM confirmations WHERE domain = 'same.example'"),
        2,
        "confirm_domain_rate"
    );
    assert_eq!(n("SELECT count(*) FROM confirmations"), 5, "confirm_rate");
    assert_eq!(n("SELECT count(*) FROM subscriptions WHERE confirmed_at IS NULL"), 1010, "all wait pending");
    wait_spooled(&d, "confirm-", 5);
    u.sync();
    assert_eq!(spooled(&d, "confirm-").len(), 5);
}

/// A SUB storm from one address meets `sub_rate`: `-ERR LIMIT` saying when to retry, and
/// the refused SUB's live part does not start; UNSUB counts too; trusted connections are
/// not limited.
#[test]
fn a_sub_storm_from_one_address_is_rate_limited() {
    let d = start("sub_rate = 5\n");
    let mut u = d.client();
    for i in 0..5 {
        u.cmd(&format!("SUB s.{i} gus@example.org"));
        u.expect(&format!("+OK SUB s.{i} pending"));
    }
    u.cmd("SUB s.5 gus@example.org");
    let text = u.expect_err("LIMIT");
    assert!(text.contains("try again in"), "{text}");
    u.cmd("UNSUB s.0 gus@example.org");
    u.expect_err("LIMIT");
    let mut t = trusted(&d);
    for i in 0..20 {
        t.cmd(&format!("SUB t.{i} gus@example.org"));
        t.expect(&format!("+OK SUB t.{i}"));
    }
    util::publish(&mut t, "s.5", "not for u");
    util::publish(&mut t, "s.0", "for u");
    let got = u.sync();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("MSG s.0 ") && got[0].ends_with(" for u"), "{got:?}");
}

/// `max_unconfirmed` refuses an untrusted SUB of a new pair with `-ERR LIMIT`, and its
/// live part is gone by the reply.
#[test]
fn max_unconfirmed_refuses_a_new_pending_pair_and_its_live_part() {
    let d = start("max_unconfirmed = 1\n");
    let mut u = d.client();
    u.cmd("SUB a hal@example.org");
    u.expect("+OK SUB a pending");
    u.cmd("SUB b ian@example.org");
    let text = u.expect_err("LIMIT");
    assert!(text.contains("unconfirmed"), "{text}");
    let mut t = trusted(&d);
    util::publish(&mut t, "b", "not for u");
    util::publish(&mut t, "a", "for u");
    let got = u.sync();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("MSG a "), "{got:?}");
    assert_eq!(pairs(&d, "ian@example.org"), (0, 0));
}

/// An untrusted UNSUB ends its own live part and removes only a pending pair: a
/// confirmed one stays, and the reply is the same.
#[test]
fn an_untrusted_unsub_leaves_a_confirmed_pair() {
    let d = start("");
    let jo = "jo@example.org";
    let mut t = trusted(&d);
    t.cmd(&format!("SUB kept {jo}"));
    t.expect("+OK SUB kept");
    let mut u = d.client();
    u.cmd(&format!("SUB kept {jo}"));
    u.expect("+OK SUB kept pending");
    u.cmd(&format!("SUB pend {jo}"));
    u.expect("+OK SUB pend pending");
    u.cmd(&format!("UNSUB kept {jo}"));
    u.expect("+OK UNSUB kept live");
    u.cmd(&format!("UNSUB pend {jo}"));
    u.expect("+OK UNSUB pend live");
    let l = list(&mut t, jo);
    assert_eq!(l.len(), 2, "{l:?}");
    assert!(l[0].starts_with(&format!("SUB kept {jo} ")) && !l[0].ends_with("pending"), "{l:?}");
    // Its live part ended with the UNSUB.
    util::publish(&mut trusted(&d), "kept", "x");
    assert_eq!(u.sync(), Vec::<String>::new());
    t.expect("MSG kept 1 x");
    // A trusted UNSUB removes it.
    t.cmd(&format!("UNSUB kept {jo}"));
    t.expect("+OK UNSUB kept");
    assert_eq!(list(&mut t, jo), ["+OK LIST 0"]);
}

/// With `confirm = false` an untrusted SUB and UNSUB behave as the first step's, but
/// PUB and LIST still need the token.
#[test]
fn confirm_false_stores_untrusted_subs_confirmed() {
    let d = start("confirm = false\n");
    let mut u = d.client();
    u.cmd("SUB open kim@example.org");
    u.expect("+OK SUB open");
    u.cmd("LIST kim@example.org");
    u.expect_err("AUTH");
    let mut t = trusted(&d);
    let l = list(&mut t, "kim@example.org");
    assert!(l.len() == 2 && !l[0].ends_with("pending"), "{l:?}");
    u.cmd("UNSUB open kim@example.org");
    u.expect("+OK UNSUB open");
    assert_eq!(list(&mut t, "kim@example.org"), ["+OK LIST 0"]);
}

/// Under `mail_policy = "offline"` only a trusted live connection holds an address's
/// email back: a stranger's SUB of it does not, until that connection AUTHs.
#[test]
fn offline_policy_counts_only_trusted_live_connections() {
    let d = start("mail_policy = \"offline\"\n");
    let lu = "lu@example.org";
    let mut t = trusted(&d);
    t.cmd(&format!("SUB off {lu}"));
    t.expect("+OK SUB off");
    let mut publisher = trusted(&d);
    let mut u = d.client();
    u.cmd(&format!("SUB off {lu}"));
    u.expect("+OK SUB off pending");
    // t holds it live and trusted: no email.
    let (id, _) = util::publish(&mut publisher, "off", "one");
    let q = |id: u64| format!("SELECT count(*) FROM outbox WHERE email = ?1 AND notification_id = {id}");
    assert_eq!(count(&d, &q(id), lu), 0);
    t.expect(&format!("MSG off {id} one"));
    t.cmd("QUIT");
    t.expect("+OK QUIT");
    t.expect_eof();
    let peer = t.local_addr();
    d.wait_log(|l| l.contains(&format!("{peer}: closed")), WAIT);
    // Only the stranger holds it: emailed.
    let (id2, _) = util::publish(&mut publisher, "off", "two");
    assert_eq!(count(&d, &q(id2), lu), 1);
    u.expect(&format!("MSG off {id} one"));
    u.expect(&format!("MSG off {id2} two"));
    u.cmd(&format!("AUTH {TOKEN}"));
    u.expect("+OK AUTH");
    let (id, _) = util::publish(&mut publisher, "off", "three");
    assert_eq!(count(&d, &q(id), lu), 0);
}

/// notif to the daemon with `args`, killed if it runs past the wait; (status, stdout,
/// stderr).
fn notif(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    let mut child = util::notif_command(d.port, args).spawn().expect("spawn notif");
    let mut status = None;
    util::wait_until("notif to exit", WAIT, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let out = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (status.unwrap().code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// notif(1): `sub` says when the subscription waits for its confirmation, `confirm`
/// confirms with the emailed code, `list` shows the state, `unsub` stops with the code
/// and says when an untrusted UNSUB left a confirmed pair.
#[test]
fn notif_sub_confirm_list_and_unsub() {
    let d = start("");
    let zed = "zed@example.org";
    let mut sub = std::process::Command::new(env!("CARGO_BIN_EXE_notif"))
        .env_remove("NOTIF_TOKEN")
        .args(["-H", "127.0.0.1", "-p", &d.port.to_string(), "sub", zed, "news"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn notif sub");
    let stderr = sub.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let said = util::said(&rx, "pending:", "notif sub");
    let _ = sub.kill();
    let _ = sub.wait();
    assert_eq!(said, format!("pending: check {zed} for a confirmation message"));

    let (status, out, err) = notif(&d, &["-a", TOKEN, "list", zed]);
    assert!(status == 0 && out.starts_with("news ") && out.trim_end().ends_with(" pending"), "{out}{err}");
    let code = code_line(&body_lines(&wait_spooled(&d, "confirm-", 1)[0]), &format!("CONFIRM {zed} "));
    let (status, out, err) = notif(&d, &["confirm", zed, &code]);
    assert_eq!((status, out.as_str()), (0, "1\n"), "{err}");
    let (status, out, _) = notif(&d, &["-a", TOKEN, "list", zed]);
    assert!(status == 0 && !out.contains("pending"), "{out}");

    let (status, _, err) = notif(&d, &["unsub", "news", zed]);
    assert_eq!(status, 0, "{err}");
    assert!(err.contains("a confirmed subscription stays"), "{err}");
    let (id, _) = util::publish(&mut trusted(&d), "news", "hello");
    let unsub =
        code_line(&body_lines(&wait_spooled(&d, &format!("{id}-"), 1)[0]), &format!("UNSUB news {zed} "));
    let (status, _, err) = notif(&d, &["unsub", "news", zed, "0000-0000-0000"]);
    assert!(status == 1 && err.contains("-ERR AUTH"), "{err}");
    let (status, _, err) = notif(&d, &["unsub", "news", zed, &unsub]);
    assert_eq!(status, 0, "{err}");
    let (_, out, _) = notif(&d, &["-a", TOKEN, "list", zed]);
    assert_eq!(out, "");
}

/// A connection to the daemon from the loopback address `127.0.0.<last>`.
fn client_from(d: &Daemon, last: u8) -> Client {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from = std::net::SocketAddr::from(([127, 0, 0, last], 0));
    sock.bind(&from.into()).unwrap();
    sock.connect_timeout(&d.listen.into(), WAIT).unwrap();
    let mut c = Client::from_stream(sock.into());
    c.greeting = c.line();
    c
}

/// `sub_rate` counts per address, and ten times that per network: ten addresses of one
/// /24 use up the network's minute, and an eleventh gets `-ERR LIMIT` at once.
#[test]
fn sub_rate_is_ten_times_per_network() {
    let d = start("sub_rate = 1\n");
    let mut first = client_from(&d, 2);
    first.cmd("SUB n.2 net@example.org");
    first.expect("+OK SUB n.2 pending");
    first.cmd("SUB n.2b net@example.org");
    first.expect_err("LIMIT");
    for last in 3..=11 {
        let mut c = client_from(&d, last);
        c.cmd(&format!("SUB n.{last} net@example.org"));
        c.expect(&format!("+OK SUB n.{last} pending"));
    }
    let mut eleventh = client_from(&d, 12);
    eleventh.cmd("SUB n.12 net@example.org");
    let text = eleventh.expect_err("LIMIT");
    assert!(text.contains("network") && text.contains("try again in"), "{text}");
    d.wait_log(|l| l.contains("127.0.0.2:") && l.contains("sub_rate reached"), WAIT);
}
