//! The confirm and unsubscribe pages end to end (issue 10's *What must hold*): the real
//! binary, a real SMTP server (`util/smtp.rs`), a real HTTP client (`ureq`), and the
//! links as the emails carry them, their `public_url` origin rewritten to the HTTP
//! side's loopback address. What a page did is checked where it lands: the next PUB's
//! outbox rows and the emails the SMTP server gets.

mod util;

#[path = "util/http_client.rs"]
mod http_client;
#[path = "util/smtp.rs"]
mod smtp;

use http_client::{got, http_addr, Got};
use notifd::consent::{Link, Secret};
use smtp::{Options, SmtpServer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use util::{header, publish, Client, Daemon, WAIT};

const FROM: &str = "notifd@example.org";

/// The links' base in the emails; the test replaces it with the HTTP side's address.
const PUBLIC: &str = "https://notify.example.test";

/// A publish token long enough not to be warned about.
const TOKEN: &str = "t0k3n-0123456789abcdef";

/// How long an email may take (a debug build on a shared machine).
const MAIL_WAIT: Duration = Duration::from_secs(60);

/// notifd with the HTTP side on loopback (a kernel-chosen port), `public_url`, and
/// mail to `server`; plus `extra`.
fn start(server: &SmtpServer, extra: &str) -> (Daemon, SocketAddr) {
    let d = Daemon::start(&format!(
        "http_host = \"127.0.0.1\"\nhttp_port = 0\npublic_url = \"{PUBLIC}\"\n\
         mail_transport = \"smtp\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\n\
         mail_from = \"{FROM}\"\nmail_retry_base = 1\n{extra}",
        server.port
    ));
    let http = http_addr(&d);
    (d, http)
}

/// A link from an email, pointed at the HTTP side.
fn local(url: &str, http: SocketAddr) -> String {
    let path = url.strip_prefix(PUBLIC).unwrap_or_else(|| panic!("not under {PUBLIC}: {url}"));
    format!("http://{http}{path}")
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(WAIT * 3).redirects(0).build()
}

fn get(url: &str) -> Got {
    got(agent().get(url).call())
}

/// A POST of an urlencoded form.
fn post(url: &str, form: &str) -> Got {
    got(agent().post(url).set("Content-Type", "application/x-www-form-urlencoded").send_string(form))
}

/// A POST of a multipart form with one field.
fn post_multipart(url: &str, name: &str, value: &str) -> Got {
    let b = "----notifd-test-boundary-7MA4YWxkTrZu0gW";
    let body =
        format!("--{b}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n--{b}--\r\n");
    got(agent()
        .post(url)
        .set("Content-Type", &format!("multipart/form-data; boundary={b}"))
        .send_string(&body))
}

/// A page, as every page must be sent.
fn check_page(g: &Got, status: u16) {
    assert_eq!(g.status, status, "{}", g.body);
    assert_eq!(g.headers.get("cache-control").map(String::as_str), Some("no-store"));
    assert_eq!(g.headers.get("referrer-policy").map(String::as_str), Some("no-referrer"));
    assert_eq!(g.headers.get("x-frame-options").map(String::as_str), Some("DENY"));
    assert!(!g.headers.contains_key("location"), "never a redirect");
    assert!(g.headers.get("content-type").is_some_and(|t| t.starts_with("text/html")), "{:?}", g.headers);
}

/// Waits for the email of notification `id` to `to`; returns it parsed into
/// (headers by lowercase name, decoded body).
fn wait_email(server: &SmtpServer, id: u64, to: &str) -> (HashMap<String, String>, String) {
    let deadline = Instant::now() + MAIL_WAIT;
    loop {
        for r in server.received() {
            if !r.envelope_to.iter().any(|t| t == to) {
                continue;
            }
            let mail = mailparse::parse_mail(&r.raw).expect("parseable message");
            if header(&mail, "Message-ID").starts_with(&format!("<{id}.")) {
                let headers =
                    mail.headers.iter().map(|h| (h.get_key().to_ascii_lowercase(), h.get_value())).collect();
                return (headers, mail.get_body().expect("decodable body").replace("\r\n", "\n"));
            }
        }
        assert!(Instant::now() < deadline, "no email of notification {id} to {to} within {MAIL_WAIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The addresses that got an email of notification `id`.
fn emailed(server: &SmtpServer, id: u64) -> Vec<String> {
    let mut out = Vec::new();
    for r in server.received() {
        let mail = mailparse::parse_mail(&r.raw).expect("parseable message");
        if header(&mail, "Message-ID").starts_with(&format!("<{id}.")) {
            out.extend(r.envelope_to);
        }
    }
    out
}

/// The addresses the outbox holds an email of notification `id` for (sent or not): the
/// store decides them in the PUB's own transaction, so they are final at `+OK PUB`.
fn outbox_for(d: &Daemon, id: u64) -> Vec<String> {
    let db = d.db();
    let mut st = db.prepare("SELECT email FROM outbox WHERE notification_id = ?1 ORDER BY email").unwrap();
    st.query_map([id as i64], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
}

/// Publishes on `event` (from a connection without live subscriptions) and waits for
/// the email to `control`, a pair nothing removes, so that the other addresses' emails
/// of that notification, if any, had their chance too.
fn publish_and_wait(server: &SmtpServer, c: &mut Client, event: &str, control: &str) -> u64 {
    let (id, _) = publish(c, event, "something happened");
    wait_email(server, id, control);
    id
}

/// Whether `email` is subscribed to `event` in the database.
fn stored(d: &Daemon, email: &str, event: &str) -> bool {
    d.db()
        .query_row(
            "SELECT count(*) FROM subscriptions WHERE email = ?1 AND event = ?2",
            [email, event],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
        == 1
}

/// The unsubscribe link of a notification email: the `List-Unsubscribe` header (with
/// RFC 8058's `List-Unsubscribe-Post`, the URL being https), the same in the body.
fn unsubscribe_link(headers: &HashMap<String, String>, body: &str) -> String {
    let list = headers.get("list-unsubscribe").expect("List-Unsubscribe");
    let url = list.trim().strip_prefix('<').and_then(|u| u.strip_suffix('>')).expect("<url>").to_owned();
    assert!(url.starts_with(&format!("{PUBLIC}/unsubscribe/")), "{url}");
    assert_eq!(
        headers.get("list-unsubscribe-post").map(String::as_str),
        Some("List-Unsubscribe=One-Click"),
        "{headers:?}"
    );
    assert!(body.lines().any(|l| l == url), "the link is in the body:\n{body}");
    url
}

/// Every token that the test used: none may be in the log.
fn check_log_has_no_token(d: &Daemon, urls: &[&str]) {
    let log = d.log_text();
    for url in urls {
        let token = url.rsplit('/').next().unwrap();
        assert!(!log.contains(token), "a token in the log");
    }
}

#[test]
fn notification_links_unsubscribe_and_stop_all_email() {
    let server = SmtpServer::start(Options::default());
    let (d, http) = start(&server, "");
    let (mut s, mut c) = (d.client(), d.client());
    let (one_click, multi, all, control) =
        ("ana@example.org", "bo@example.org", "cy@example.org", "dee@example.org");
    for who in [one_click, multi, all, control] {
        s.cmd(&format!("SUB deploy {who}"));
        s.expect("+OK SUB deploy");
    }
    s.cmd(&format!("SUB backup {all}"));
    s.expect("+OK SUB backup");
    s.cmd(&format!("SUB backup {control}"));
    s.expect("+OK SUB backup");

    let id = publish_and_wait(&server, &mut c, "deploy", control);
    let link = |to: &str| {
        let (headers, body) = wait_email(&server, id, to);
        unsubscribe_link(&headers, &body)
    };
    let (a_url, b_url, c_url) = (link(one_click), link(multi), link(all));
    let (a, b, cc) = (local(&a_url, http), local(&b_url, http), local(&c_url, http));

    // GET and HEAD show the page and change nothing.
    let page = get(&a);
    check_page(&page, 200);
    assert!(page.body.contains(one_click) && page.body.contains("<code>deploy</code>"), "{}", page.body);
    assert!(
        page.body.contains("name=\"unsubscribe\"") && page.body.contains("name=\"all\""),
        "{}",
        page.body
    );
    assert!(!page.body.contains("<script"), "no JavaScript: {}", page.body);
    let head = got(agent().head(&a).call());
    check_page(&head, 200);
    assert!(head.body.is_empty());
    assert!(stored(&d, one_click, "deploy"));
    let id = publish_and_wait(&server, &mut c, "deploy", control);
    wait_email(&server, id, one_click);

    // RFC 8058's one-click POST, urlencoded, through a proxy (no matter); then again.
    let req = agent()
        .post(&a)
        .set("Content-Type", "application/x-www-form-urlencoded")
        .set("X-Forwarded-For", "127.0.0.1");
    let done = got(req.send_string("List-Unsubscribe=One-Click"));
    check_page(&done, 200);
    assert!(done.body.contains("Unsubscribed") && done.body.contains(one_click), "{}", done.body);
    let again = post(&a, "List-Unsubscribe=One-Click");
    assert_eq!((again.status, &again.body), (200, &done.body), "a repeated POST answers the same page");
    assert!(!stored(&d, one_click, "deploy"));
    // Its GET now says there is nothing to stop, and still offers the stop-all button.
    let after = get(&a);
    check_page(&after, 200);
    assert!(
        after.body.contains("Already unsubscribed") && after.body.contains("name=\"all\""),
        "{}",
        after.body
    );

    // The same with a multipart body.
    let done = post_multipart(&b, "List-Unsubscribe", "One-Click");
    check_page(&done, 200);
    assert!(done.body.contains("Unsubscribed") && done.body.contains(multi), "{}", done.body);

    // The page's "stop all email" button: every subscription of the address, and an opt-out.
    let done = post(&cc, "all=1");
    check_page(&done, 200);
    assert!(done.body.contains("All email stopped") && done.body.contains(all), "{}", done.body);
    assert_eq!(post(&cc, "all=1").body, done.body, "a repeated POST answers the same page");
    assert!(!stored(&d, all, "deploy") && !stored(&d, all, "backup"));
    let opted: i64 = d.db().query_row("SELECT count(*) FROM optouts", [], |r| r.get(0)).unwrap();
    assert_eq!(opted, 1);

    // The next PUBs: no email to any of them; the control gets its own.
    let id = publish_and_wait(&server, &mut c, "deploy", control);
    let backup = publish_and_wait(&server, &mut c, "backup", control);
    assert_eq!(outbox_for(&d, id), [control]);
    assert_eq!(outbox_for(&d, backup), [control]);
    assert_eq!(emailed(&server, id), [control]);
    assert_eq!(emailed(&server, backup), [control]);
    check_log_has_no_token(&d, &[&a_url, &b_url, &c_url]);
}

/// A pending pair as an untrusted SUB leaves it (a `subscriptions` row without
/// `confirmed_at`, its `asked` row with the next sequence number), and its confirm link
/// made with the database's secret: until the consent commands land, no SUB makes one.
fn pending_pair(d: &Daemon, email: &str, event: &str) -> String {
    let db = util::extra::db_rw(&d.path("db/notifd.db"));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let seq: i64 = db
        .query_row("UPDATE meta SET value = value + 1 WHERE key = 'next_seq' RETURNING value - 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    db.execute(
        "INSERT INTO subscriptions(email, event, created_at, confirmed_at) VALUES (?1, ?2, ?3, NULL)",
        rusqlite::params![email, event, now],
    )
    .unwrap();
    db.execute(
        "INSERT INTO asked(email, event, seq, asked_by, asked_at) VALUES (?1, ?2, ?3, '192.0.2.1', ?4)",
        rusqlite::params![email, event, seq, now],
    )
    .unwrap();
    let bytes: Vec<u8> =
        db.query_row("SELECT value FROM secrets WHERE name = 'consent'", [], |r| r.get(0)).unwrap();
    let secret = Secret::from_bytes(&bytes).unwrap();
    format!("{PUBLIC}/confirm/{}", secret.token(&Link::Confirm { email: email.into(), seq: seq as u64 }))
}

fn confirmed(d: &Daemon, email: &str, event: &str) -> bool {
    d.db()
        .query_row(
            "SELECT confirmed_at IS NOT NULL FROM subscriptions WHERE email = ?1 AND event = ?2",
            [email, event],
            |r| r.get(0),
        )
        .unwrap()
}

#[test]
fn the_confirm_page_confirms_only_on_post() {
    let server = SmtpServer::start(Options::default());
    let (d, http) = start(&server, "");
    let (mut s, mut c) = (d.client(), d.client());
    let control = "dee@example.org";
    s.cmd(&format!("SUB deploy {control}"));
    s.expect("+OK SUB deploy");
    // HTML in the event and the address (`&` and `'` are allowed in a local part):
    // escaped wherever the page shows them.
    let (who, evil) = ("o'hara&co@example.org", "<script>alert(1)</script>");
    // The link of the later pair covers both.
    pending_pair(&d, who, "deploy");
    let url = pending_pair(&d, who, evil);
    let confirm = local(&url, http);

    let page = get(&confirm);
    check_page(&page, 200);
    assert!(
        page.body.contains("name=\"confirm\"") && page.body.contains("<code>deploy</code>"),
        "{}",
        page.body
    );
    assert!(!page.body.contains("<script") && !page.body.contains(who), "{}", page.body);
    assert!(page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{}", page.body);
    assert!(page.body.contains("o&#39;hara&amp;co@example.org"), "{}", page.body);
    check_page(&got(agent().head(&confirm).call()), 200);
    assert!(!confirmed(&d, who, "deploy"), "GET changes nothing");
    let id = publish_and_wait(&server, &mut c, "deploy", control);
    assert_eq!(outbox_for(&d, id), [control], "no email to a pending pair");

    // The confirm token under the other path is not a link: 404, and nothing changes.
    let wrong = confirm.replace("/confirm/", "/unsubscribe/");
    check_page(&get(&wrong), 404);
    check_page(&post(&wrong, "unsubscribe=1"), 404);
    check_page(&post(&wrong, "all=1"), 404);
    let opted: i64 = d.db().query_row("SELECT count(*) FROM optouts", [], |r| r.get(0)).unwrap();
    assert_eq!(opted, 0);
    // A POST without the button changes nothing.
    check_page(&post(&confirm, "something=1"), 400);
    assert!(!confirmed(&d, who, "deploy"));

    let done = post(&confirm, "confirm=1");
    check_page(&done, 200);
    assert!(
        done.body.contains("Subscription confirmed") && done.body.contains("<code>deploy</code>"),
        "{}",
        done.body
    );
    assert!(!done.body.contains("<script"), "{}", done.body);
    assert!(confirmed(&d, who, "deploy") && confirmed(&d, who, evil));
    let again = post(&confirm, "confirm=1");
    assert_eq!((again.status, &again.body), (200, &done.body), "a repeated POST answers the same page");

    let id = publish_and_wait(&server, &mut c, "deploy", control);
    wait_email(&server, id, who);
    check_log_has_no_token(&d, &[&url]);
}

#[test]
fn bad_links_get_404_400_and_405_and_change_nothing() {
    let server = SmtpServer::start(Options::default());
    let (d, http) = start(&server, "");
    let (mut s, mut c) = (d.client(), d.client());
    let (who, control) = ("ana@example.org", "dee@example.org");
    for e in [who, control] {
        s.cmd(&format!("SUB deploy {e}"));
        s.expect("+OK SUB deploy");
    }
    let id = publish_and_wait(&server, &mut c, "deploy", control);
    let (headers, body) = wait_email(&server, id, who);
    let url = unsubscribe_link(&headers, &body);
    let real = local(&url, http);
    let token = url.rsplit('/').next().unwrap();
    check_page(&get(&real), 200);

    // Forged (the right form, one character changed), truncated, under the wrong path,
    // too short to be a token: one 404 page for all, GET or POST.
    let flip = if token.ends_with('A') { 'B' } else { 'A' };
    let forged = format!("{}{flip}", &token[..token.len() - 1]);
    let not_found = get(&format!("http://{http}/unsubscribe/{forged}"));
    check_page(&not_found, 404);
    for path in [
        format!("/unsubscribe/{forged}"),
        format!("/unsubscribe/{}", &token[..token.len() - 3]),
        format!("/unsubscribe/{}", &token[..30]),
        format!("/confirm/{token}"),
        "/unsubscribe/abc".to_string(),
    ] {
        let u = format!("http://{http}{path}");
        let g = get(&u);
        check_page(&g, 404);
        assert_eq!(g.body, not_found.body, "{path}");
        // Each body carries the button of either path, so the token is what is refused.
        check_page(&post(&u, "unsubscribe=1&confirm=1"), 404);
        check_page(&post(&u, "all=1&confirm=1"), 404);
        check_page(&post(&u, "List-Unsubscribe=One-Click&confirm=1"), 404);
    }
    // A proxy's header makes nothing valid or trusted.
    let proxied =
        agent().get(&format!("http://{http}/unsubscribe/{forged}")).set("X-Forwarded-For", "127.0.0.1");
    check_page(&got(proxied.call()), 404);
    let metrics =
        got(agent().get(&format!("http://{http}/metrics")).set("X-Forwarded-For", "127.0.0.1").call());
    assert_eq!(metrics.status, 403);

    // A POST without the button's field: 400, nothing changed.
    let g = post(&real, "unsubscribe=0&other=1");
    check_page(&g, 400);
    let g = post_multipart(&real, "nothing", "1");
    check_page(&g, 400);
    // Another method: 405 with Allow.
    let put = got(agent().put(&real).send_string("unsubscribe=1"));
    assert_eq!(put.status, 405);
    assert_eq!(put.headers.get("allow").map(String::as_str), Some("GET, HEAD, POST"));
    assert!(stored(&d, who, "deploy"), "nothing changed");
    let id = publish_and_wait(&server, &mut c, "deploy", control);
    wait_email(&server, id, who);

    // HTML in an event name is escaped on the unsubscribe page too.
    let evil = "<script>x</script>";
    let db = util::extra::db_rw(&d.path("db/notifd.db"));
    db.execute(
        "INSERT INTO subscriptions(email, event, created_at, confirmed_at) VALUES (?1, ?2, 1, 1)",
        [who, evil],
    )
    .unwrap();
    let bytes: Vec<u8> =
        db.query_row("SELECT value FROM secrets WHERE name = 'consent'", [], |r| r.get(0)).unwrap();
    let secret = Secret::from_bytes(&bytes).unwrap();
    let t = secret.token(&Link::Unsubscribe { email: who.into(), event: evil.into() });
    let page = get(&format!("http://{http}/unsubscribe/{t}"));
    check_page(&page, 200);
    assert!(
        !page.body.contains("<script") && page.body.contains("&lt;script&gt;x&lt;/script&gt;"),
        "{}",
        page.body
    );
    check_log_has_no_token(&d, &[&url, &forged, &t]);
}

#[test]
fn a_store_that_does_not_answer_gets_503() {
    let server = SmtpServer::start(Options::default());
    let (d, http) = start(&server, "store_timeout = 2\n");
    let (mut s, mut c) = (d.client(), d.client());
    s.cmd("SUB deploy ana@example.org");
    s.expect("+OK SUB deploy");
    let (id, _) = publish(&mut c, "deploy", "x");
    let (headers, body) = wait_email(&server, id, "ana@example.org");
    let url = local(&unsubscribe_link(&headers, &body), http);
    check_page(&get(&url), 200);
    let stopped = util::stop_process(d.store_pid());
    let g = get(&url);
    drop(stopped);
    check_page(&g, 503);
    assert!(g.body.contains("did not answer in time"), "{}", g.body);
}

/// Issue 10's whole path, from an untrusted SUB's confirmation email. It needs the
/// consent commands (the untrusted SUB that stores a pending pair and queues its
/// confirmation email), which another branch brings.
#[test]
fn untrusted_sub_confirmation_email_confirm_page_then_one_click() {
    let server = SmtpServer::start(Options::default());
    let (d, http) = start(&server, &format!("publish_token = \"{TOKEN}\"\n"));
    let who = "ana@example.org";
    let mut stranger = d.client();
    stranger.cmd(&format!("SUB deploy {who}"));
    stranger.expect("+OK SUB deploy pending");
    let (mut owner, mut publisher) = (d.client(), d.client());
    for c in [&mut owner, &mut publisher] {
        c.cmd(&format!("AUTH {TOKEN}"));
        c.expect("+OK AUTH");
    }
    owner.cmd("SUB deploy dee@example.org");
    owner.expect("+OK SUB deploy");

    // The one confirmation email, with the confirm link.
    let deadline = Instant::now() + MAIL_WAIT;
    let body = loop {
        let mine: Vec<_> =
            server.received().into_iter().filter(|r| r.envelope_to.iter().any(|t| t == who)).collect();
        if let Some(r) = mine.first() {
            assert_eq!(mine.len(), 1, "one confirmation email");
            let mail = mailparse::parse_mail(&r.raw).unwrap();
            break mail.get_body().unwrap().replace("\r\n", "\n");
        }
        assert!(Instant::now() < deadline, "no confirmation email");
        std::thread::sleep(Duration::from_millis(20));
    };
    let url = body.lines().find(|l| l.starts_with(&format!("{PUBLIC}/confirm/"))).expect("a confirm link");
    let confirm = local(url, http);
    let page = get(&confirm);
    check_page(&page, 200);
    assert!(page.body.contains("<code>deploy</code>"), "{}", page.body);
    let id = publish_and_wait(&server, &mut publisher, "deploy", "dee@example.org");
    assert!(!outbox_for(&d, id).iter().any(|e| e == who), "GET confirmed nothing");
    check_page(&post(&confirm, "confirm=1"), 200);

    let id = publish_and_wait(&server, &mut publisher, "deploy", "dee@example.org");
    let (headers, body) = wait_email(&server, id, who);
    let unsub = local(&unsubscribe_link(&headers, &body), http);
    check_page(&post(&unsub, "List-Unsubscribe=One-Click"), 200);
    let id = publish_and_wait(&server, &mut publisher, "deploy", "dee@example.org");
    assert_eq!(outbox_for(&d, id), ["dee@example.org"]);
    check_log_has_no_token(&d, &[url]);
}
