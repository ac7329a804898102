//! The mail transports against real receivers: an SMTP server (`util/smtp.rs`, started
//! per test on a loopback port), a sendmail stand-in script, and a spool folder.

mod util;

#[path = "util/smtp.rs"]
mod smtp;

use mailparse::{MailHeaderMap, ParsedMail};
use notifd::ipc::{MailJob, MailKind, MailOutcome, MailResult, MailSettings, SmtpTls, Transport};
use notifd::transport::{spool_file_name, Mailer};
use smtp::{Options, SmtpServer};
use std::time::{Duration, Instant};
use util::header;

const FROM: &str = "notifd@example.org";

fn settings(transport: Transport, port: u16) -> MailSettings {
    MailSettings {
        transport,
        from: FROM.into(),
        smtp_host: "127.0.0.1".into(),
        smtp_port: port,
        smtp_tls: SmtpTls::None,
        smtp_user: String::new(),
        smtp_password: String::new(),
        smtp_ca_pem: None,
        sendmail_path: "/usr/sbin/sendmail".into(),
        spool_dir: "/nonexistent".into(),
        sendmail_timeout: 60,
        public_url: String::new(),
        server: "notify.example.org:7600".into(),
    }
}

fn job(id: u64, email: &str, text: &str) -> MailJob {
    MailJob {
        id,
        email: email.into(),
        event: "deploy.prod".into(),
        text: text.into(),
        created_at: 1_700_000_000 + id as i64,
        tries: 0,
        kind: MailKind::Notification { unsub_code: "7KQ2-M4XH-9TZB".into(), unsub_token: "token".into() },
    }
}

fn jobs(n: u64) -> Vec<MailJob> {
    (1..=n).map(|i| job(i, &format!("user{i}@example.org"), &format!("notification number {i}"))).collect()
}

fn outcomes(results: &[MailResult]) -> Vec<&MailOutcome> {
    results.iter().map(|r| &r.outcome).collect()
}

/// Results are one per job, in job order, each naming its job.
fn assert_matches_jobs(results: &[MailResult], jobs: &[MailJob]) {
    assert_eq!(results.len(), jobs.len());
    for (r, j) in results.iter().zip(jobs) {
        assert_eq!((r.id, r.email.as_str()), (j.id, j.email.as_str()));
    }
}

fn all_sent(results: &[MailResult]) -> bool {
    results.iter().all(|r| r.outcome == MailOutcome::Sent)
}

fn body(mail: &ParsedMail) -> String {
    mail.get_body().expect("decodable body").replace("\r\n", "\n")
}

#[test]
fn three_jobs_arrive_with_their_headers_and_body() {
    let server = SmtpServer::start(Options::default());
    let mut mailer = Mailer::new(&settings(Transport::Smtp, server.port)).unwrap();
    // The first two are one notification to two addresses.
    let batch = vec![
        job(7, "alice@example.org", "build 1234 is live"),
        job(7, "bob@example.net", "Grüße aus Köln — 東京 ✓"),
        job(9, "o'hara+tag@example.com", "tab\tseparated"),
    ];
    let results = mailer.send_batch(&batch);
    assert_matches_jobs(&results, &batch);
    assert!(all_sent(&results), "{results:?}\n{}", server.errors());

    let received = server.received();
    assert_eq!(received.len(), 3);
    for (got, job) in received.iter().zip(&batch) {
        assert_eq!(got.envelope_from, FROM);
        assert_eq!(got.envelope_to, std::slice::from_ref(&job.email));
        let mail = mailparse::parse_mail(&got.raw).expect("parseable message");
        assert_eq!(header(&mail, "From"), FROM);
        assert_eq!(header(&mail, "To"), job.email);
        assert_eq!(header(&mail, "Subject"), "[notifd] deploy.prod");
        let date = mailparse::dateparse(&header(&mail, "Date")).unwrap();
        assert_eq!(date, job.created_at);
        let message_id = header(&mail, "Message-ID");
        assert!(
            message_id.starts_with(&format!("<{}.", job.id)) && message_id.ends_with("@notifd>"),
            "{message_id}"
        );
        assert_eq!(mail.ctype.mimetype, "text/plain");
        assert_eq!(mail.ctype.charset, "utf-8");
        let text = body(&mail);
        let published = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_secs(job.created_at as u64),
        );
        // The whole body, so each line is checked in its place: the event is also in
        // the footer and the id may be in the date.
        assert_eq!(
            text,
            format!(
                "{t}\n\nEvent: deploy.prod\nNotification: {id}\nPublished: {published}\n\nYou receive \
                 this because {e}\nis subscribed to deploy.prod.\nTo stop it, send this line to the notifd \
                 server at\nnotify.example.org:7600:\n\nUNSUB deploy.prod {e} 7KQ2-M4XH-9TZB\n",
                t = job.text,
                id = job.id,
                e = job.email
            )
        );
    }
    // Message-IDs differ per address for one notification, and are the same on a retry.
    let ids: Vec<String> =
        received.iter().map(|r| header(&mailparse::parse_mail(&r.raw).unwrap(), "Message-ID")).collect();
    assert_eq!(batch[0].id, batch[1].id);
    assert_ne!(ids[0], ids[1]);
    assert_ne!(ids[1], ids[2]);
    let mut retry = batch[0].clone();
    retry.tries = 1;
    assert!(all_sent(&mailer.send_batch(&[retry])));
    let again = server.received();
    assert_eq!(header(&mailparse::parse_mail(&again[3].raw).unwrap(), "Message-ID"), ids[0]);
    assert_eq!(server.connections(), 1, "the second batch reused the connection: {:?}", server.events());
}

#[test]
fn header_injection_in_the_text_stays_in_the_body() {
    let server = SmtpServer::start(Options::default());
    let mut mailer = Mailer::new(&settings(Transport::Smtp, server.port)).unwrap();
    let evil =
        "hi\r\nBcc: mallory@evil.example\r\nSubject: spoofed\r\n\r\n.\r\nMAIL FROM:<x@evil.example>\n.\nend";
    let batch = [job(1, "alice@example.org", evil)];
    let results = mailer.send_batch(&batch);
    assert!(all_sent(&results), "{results:?}");
    let received = server.received();
    assert_eq!(received.len(), 1, "the lone dot did not end the message early");
    assert_eq!(received[0].envelope_to, ["alice@example.org"]);
    let mail = mailparse::parse_mail(&received[0].raw).unwrap();
    assert!(mail.headers.get_first_value("Bcc").is_none());
    assert_eq!(header(&mail, "Subject"), "[notifd] deploy.prod");
    let text = body(&mail);
    assert!(
        text.starts_with(
            "hi\nBcc: mallory@evil.example\nSubject: spoofed\n\n.\nMAIL FROM:<x@evil.example>\n.\nend\n"
        ),
        "{text}"
    );
}

#[test]
fn starttls_with_a_test_ca() {
    let certs = tempfile::tempdir().unwrap();
    let (ca_pem, chain, key) = smtp::test_certificates(certs.path());
    let server = SmtpServer::start(Options { tls: Some((chain, key)), ..Options::default() });
    let mut s = settings(Transport::Smtp, server.port);
    s.smtp_host = "localhost".into(); // the name in the certificate
    s.smtp_tls = SmtpTls::Starttls;

    // Without the CA the certificate is not trusted: nothing is sent, all kept for later.
    let mut untrusted = Mailer::new(&s).unwrap();
    let results = untrusted.send_batch(&jobs(2));
    for o in outcomes(&results) {
        assert!(
            matches!(o, MailOutcome::Retry(r) if r.contains("tls") || r.contains("certificate")),
            "{o:?}"
        );
    }

    // Plain text to a server that requires STARTTLS: its 530 is about the session, not
    // the message, so that is a Retry too.
    let mut plain = Mailer::new(&MailSettings { smtp_tls: SmtpTls::None, ..s.clone() }).unwrap();
    let results = plain.send_batch(&jobs(2));
    assert!(matches!(results[0].outcome, MailOutcome::Retry(ref r) if r.starts_with("530")), "{results:?}");
    assert_eq!(server.message_count(), 0);

    s.smtp_ca_pem = Some(ca_pem);
    let mut mailer = Mailer::new(&s).unwrap();
    let batch = jobs(3);
    let results = mailer.send_batch(&batch);
    assert_matches_jobs(&results, &batch);
    assert!(all_sent(&results), "{results:?}\n{}", server.errors());
    let received = server.received();
    assert_eq!(received.len(), 3);
    assert!(received.iter().all(|r| r.tls), "every message came over STARTTLS");
    assert_eq!(received.iter().map(|r| r.conn).collect::<std::collections::BTreeSet<_>>().len(), 1);
}

#[test]
fn implicit_tls_with_auth() {
    let certs = tempfile::tempdir().unwrap();
    let (ca_pem, chain, key) = smtp::test_certificates(certs.path());
    let server = SmtpServer::start(Options {
        tls: Some((chain, key)),
        implicit_tls: true,
        auth: Some(("notifd".into(), "s3cret pass".into())),
        ..Options::default()
    });
    let mut s = settings(Transport::Smtp, server.port);
    s.smtp_host = "localhost".into();
    s.smtp_tls = SmtpTls::Tls;
    s.smtp_ca_pem = Some(ca_pem);
    s.smtp_user = "notifd".into();

    // A wrong password is a problem of the settings, not of the emails: kept for later.
    s.smtp_password = "wrong".into();
    let results = Mailer::new(&s).unwrap().send_batch(&jobs(3));
    for o in outcomes(&results) {
        assert!(
            matches!(o, MailOutcome::Retry(r) if r.contains("535")),
            "{o:?} {:?} {}",
            server.events(),
            server.errors()
        );
    }
    assert_eq!(server.connections(), 1, "one refused AUTH, not one per job: {:?}", server.events());

    s.smtp_password = "s3cret pass".into();
    let results = Mailer::new(&s).unwrap().send_batch(&jobs(3));
    assert!(all_sent(&results), "{results:?}\n{}", server.errors());
    let received = server.received();
    assert_eq!(received.len(), 3);
    assert!(received.iter().all(|r| r.tls));
    assert!(server.events().contains(&"auth 2 ok".to_string()), "{:?}", server.events());
}

#[test]
fn a_421_is_retried_and_a_later_batch_gets_through() {
    let server = SmtpServer::start(Options { tempfail: 2, ..Options::default() });
    let mut mailer = Mailer::new(&settings(Transport::Smtp, server.port)).unwrap();
    let batch = jobs(3);
    for round in 0..2 {
        let results = mailer.send_batch(&batch);
        assert_matches_jobs(&results, &batch);
        for o in outcomes(&results) {
            assert!(matches!(o, MailOutcome::Retry(r) if r.contains("421")), "round {round}: {o:?}");
        }
    }
    assert_eq!(server.message_count(), 0);
    let results = mailer.send_batch(&batch);
    assert!(all_sent(&results), "{results:?}");
    assert_eq!(server.message_count(), 3);
    // One connection per batch: the rest of a batch is not tried after a 421.
    assert_eq!(server.connections(), 3, "{:?}", server.events());
}

#[test]
fn a_relay_that_closes_after_some_messages_gets_a_new_connection() {
    let server = SmtpServer::start(Options { max_per_conn: 2, ..Options::default() });
    let mut mailer = Mailer::new(&settings(Transport::Smtp, server.port)).unwrap();
    let batch = jobs(5);
    let results = mailer.send_batch(&batch);
    assert_matches_jobs(&results, &batch);
    let o = outcomes(&results);
    assert_eq!(
        (o[0], o[1], o[3], o[4]),
        (&MailOutcome::Sent, &MailOutcome::Sent, &MailOutcome::Sent, &MailOutcome::Sent)
    );
    assert!(matches!(o[2], MailOutcome::Retry(r) if r.starts_with("421")), "{o:?}");
    assert_eq!(server.connections(), 2, "{:?}", server.events());
}

#[test]
fn a_dead_relay_gives_retry_at_once_for_the_whole_batch() {
    // Nothing listens there, and the held socket keeps the port from other tests.
    let (_held, port) = {
        let p = util::ClosedPort::new();
        let port = p.port;
        (p, port)
    };
    let mut mailer = Mailer::new(&settings(Transport::Smtp, port)).unwrap();
    let batch = jobs(50);
    let start = Instant::now();
    let results = mailer.send_batch(&batch);
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    assert_matches_jobs(&results, &batch);
    for o in outcomes(&results) {
        assert!(matches!(o, MailOutcome::Retry(r) if r.contains(&port.to_string())), "{o:?}");
    }
}

#[test]
fn a_relay_that_never_answers_costs_one_timeout_per_batch() {
    // Accepts connections (the kernel does, from the backlog) and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let mut mailer = Mailer::new(&settings(Transport::Smtp, port)).unwrap();
    mailer.set_smtp_timeout(Duration::from_millis(500));
    let batch = jobs(20);
    let start = Instant::now();
    let results = mailer.send_batch(&batch);
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    assert_matches_jobs(&results, &batch);
    for o in outcomes(&results) {
        assert!(matches!(o, MailOutcome::Retry(r) if r.contains("no answer within 0.5 s")), "{o:?}");
    }
}

#[test]
fn a_550_fails_that_job_only_and_the_connection_goes_on() {
    let server = SmtpServer::start(Options {
        reject_rcpt: Some("bounce".into()),
        defer_rcpt: Some("grey".into()),
        ..Options::default()
    });
    let mut mailer = Mailer::new(&settings(Transport::Smtp, server.port)).unwrap();
    let batch = vec![
        job(1, "ok1@example.org", "a"),
        job(1, "bounce@example.org", "a"),
        job(1, "grey@example.org", "a"),
        job(1, "ok2@example.org", "a"),
    ];
    let results = mailer.send_batch(&batch);
    assert_matches_jobs(&results, &batch);
    assert_eq!(results[0].outcome, MailOutcome::Sent);
    assert!(
        matches!(&results[1].outcome, MailOutcome::Fail(r) if r.starts_with("550 5.1.1") && r.contains("no such user")),
        "{:?}",
        results[1]
    );
    assert!(matches!(&results[2].outcome, MailOutcome::Retry(r) if r.starts_with("451")), "{:?}", results[2]);
    assert_eq!(results[3].outcome, MailOutcome::Sent);
    let to: Vec<_> = server.received().into_iter().flat_map(|r| r.envelope_to).collect();
    assert_eq!(to, ["ok1@example.org", "ok2@example.org"]);
    assert_eq!(server.connections(), 1, "RSET, not a reconnection: {:?}", server.events());
}

#[test]
fn two_hundred_jobs_use_one_connection() {
    let server = SmtpServer::start(Options::default());
    let mut mailer = Mailer::new(&settings(Transport::Smtp, server.port)).unwrap();
    let batch = jobs(200);
    let results = mailer.send_batch(&batch);
    assert_matches_jobs(&results, &batch);
    assert!(all_sent(&results));
    assert_eq!(server.message_count(), 200);
    assert_eq!(server.connections(), 1, "{:?}", &server.events()[..5]);
}

#[test]
fn spool_files_are_whole_and_a_retry_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(Transport::Spool, 0);
    s.spool_dir = dir.path().to_str().unwrap().into();
    let mut mailer = Mailer::new(&s).unwrap();
    let mut batch = jobs(3);
    batch.push(job(4, "a/b%c@example.org", "slash"));
    batch.push(job(4, "a%2Fb%25c@example.org", "not the same file"));
    let results = mailer.send_batch(&batch);
    assert_matches_jobs(&results, &batch);
    assert!(all_sent(&results), "{results:?}");

    let list = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let names = list();
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(
        names.iter().all(|n| n.ends_with(".eml") && !n.starts_with('.')),
        "no temporary file left: {names:?}"
    );
    for j in &batch {
        let raw = std::fs::read(dir.path().join(spool_file_name(j))).unwrap();
        let mail = mailparse::parse_mail(&raw).unwrap();
        assert_eq!(header(&mail, "To"), j.email);
        assert_eq!(header(&mail, "From"), FROM);
        assert!(body(&mail).starts_with(&j.text));
    }

    // A retry of the first job rewrites its file, and adds none.
    let first = dir.path().join(spool_file_name(&batch[0]));
    let before = std::fs::read(&first).unwrap();
    std::fs::write(&first, b"stale").unwrap();
    let mut retry = batch[0].clone();
    retry.tries = 2;
    assert!(all_sent(&mailer.send_batch(&[retry])));
    assert_eq!(list(), names);
    assert_eq!(std::fs::read(&first).unwrap(), before);

    // A folder that cannot be written: Retry, and nothing left behind.
    let mut gone = s.clone();
    gone.spool_dir = dir.path().join("missing").to_str().unwrap().into();
    let results = Mailer::new(&gone).unwrap().send_batch(&batch[..1]);
    assert!(matches!(&results[0].outcome, MailOutcome::Retry(r) if r.contains("missing")), "{results:?}");
}

#[test]
fn sendmail_gets_the_message_on_stdin() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let script = dir.path().join("sendmail");
    std::fs::write(
        &script,
        format!("#!/bin/sh\nprintf '%s\\n' \"$@\" > '{o}/args.'$$\ncat > '{o}/msg.'$$\n", o = out.display()),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut s = settings(Transport::Sendmail, 0);
    s.sendmail_path = script.to_str().unwrap().into();
    let mut mailer = Mailer::new(&s).unwrap();
    let batch = [job(5, "alice@example.org", "via sendmail\n.\nstill here")];
    let results = mailer.send_batch(&batch);
    assert!(all_sent(&results), "{results:?}");

    let mut files: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    let args = std::fs::read_to_string(&files[0]).unwrap();
    assert_eq!(args, format!("-i\n-f\n{FROM}\n--\nalice@example.org\n"));
    let raw = std::fs::read(&files[1]).unwrap();
    let mail = mailparse::parse_mail(&raw).unwrap();
    assert_eq!(header(&mail, "To"), "alice@example.org");
    assert!(body(&mail).starts_with("via sendmail\n.\nstill here\n"));

    // A sendmail that fails: Retry, with what it said.
    std::fs::write(&script, "#!/bin/sh\ncat >/dev/null\necho 'queue is full' >&2\nexit 75\n").unwrap();
    let results = mailer.send_batch(&batch);
    assert!(
        matches!(&results[0].outcome, MailOutcome::Retry(r) if r.contains("queue is full")),
        "{results:?}"
    );
}

/// `cargo test --test mail_transport -- --ignored --nocapture throughput`
#[test]
#[ignore = "a measurement, not a check"]
fn throughput_of_a_thousand_emails_in_one_batch() {
    let server = SmtpServer::start(Options { no_save: true, ..Options::default() });
    let mut mailer = Mailer::new(&settings(Transport::Smtp, server.port)).unwrap();
    let batch = jobs(1000);
    let start = Instant::now();
    let results = mailer.send_batch(&batch);
    let elapsed = start.elapsed();
    assert!(all_sent(&results));
    assert_eq!(server.message_count(), 1000);
    assert_eq!(server.connections(), 1);
    println!(
        "1000 emails in one batch over {} SMTP connection: {:.2} s, {:.0} emails/s",
        server.connections(),
        elapsed.as_secs_f64(),
        1000.0 / elapsed.as_secs_f64()
    );
}
