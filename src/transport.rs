//! Turning a [`MailJob`] into a sent email: the message, the transports, and what an
//! outcome means.
//!
//! Everything here blocks, and is meant for the mailer child only: the reactor must never
//! call into this module. It holds no state about jobs; the outbox in the store decides
//! what is tried again, so a job is reported `Sent` only once a transport took it.
//!
//! The message for a job is a pure function of the job and the mail settings (fixed
//! Date, Message-ID and body; see `transport/message.rs`), so a retry sends, or spools, the same
//! bytes.

use crate::ipc::{MailJob, MailOutcome, MailResult, MailSettings, SmtpTls, Transport, CONFIRMATION_IDS};
use lettre::address::Envelope;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, SmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Quit, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::Message;
use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

mod message;
use message::Writer;

/// How long one SMTP connect, command or reply may take before the try counts as failed.
pub const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest reason text put in a [`MailOutcome`]; it ends up in the database and the log.
const MAX_REASON: usize = 200;

/// Why mail settings or a message are unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailError {
    /// `mail_from` is not an address.
    From(String),
    /// The recipient of a job is not an address.
    Recipient(String),
    /// lettre refused to build the message.
    Message(String),
    /// `smtp_ca_file` holds no usable PEM certificate.
    CaCert(String),
    /// The TLS settings for the relay cannot be built.
    Tls(String),
    /// `smtp_host` is empty.
    SmtpHost,
    /// `sendmail_path` is not a file.
    Sendmail(String),
    /// `spool_dir` is not an absolute path.
    SpoolDir(String),
}

impl fmt::Display for MailError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MailError::From(e) => write!(f, "mail_from is not a valid address: {e}"),
            MailError::Recipient(e) => write!(f, "invalid recipient address: {e}"),
            MailError::Message(e) => write!(f, "cannot build the message: {e}"),
            MailError::CaCert(e) => write!(f, "smtp_ca_file: {e}"),
            MailError::Tls(e) => write!(f, "smtp_tls: {e}"),
            MailError::SmtpHost => write!(f, "smtp_host is empty"),
            MailError::Sendmail(e) => write!(f, "sendmail_path: {e}"),
            MailError::SpoolDir(p) => write!(f, "spool_dir {p:?} is not an absolute path"),
        }
    }
}

impl std::error::Error for MailError {}

/// Sends jobs with the configured transport. For SMTP it keeps one connection open across
/// jobs and batches, reconnecting only when the relay dropped it.
pub struct Mailer {
    writer: Writer,
    sink: Sink,
}

/// Where messages go.
enum Sink {
    Smtp(Box<Relay>),
    Sendmail(Sendmail),
    Spool(PathBuf),
    Off,
}

/// An SMTP relay and the connection to it, if one is open.
struct Relay {
    host: String,
    port: u16,
    tls: RelayTls,
    hello: ClientId,
    credentials: Option<Credentials>,
    timeout: Duration,
    conn: Option<SmtpConnection>,
    /// Messages accepted on `conn`: a connection that dies after making progress is
    /// replaced once; one that dies before is a relay in trouble.
    accepted_on_conn: u64,
}

enum RelayTls {
    Plain,
    Starttls(TlsParameters),
    Wrapper(TlsParameters),
}

impl Mailer {
    /// Checks the settings and prepares the transport. Opens no connection: the first
    /// batch does.
    pub fn new(settings: &MailSettings) -> Result<Mailer, MailError> {
        let writer = Writer::new(settings)?;
        let sink = match settings.transport {
            Transport::Smtp => Sink::Smtp(Box::new(Relay::new(settings)?)),
            Transport::Sendmail => {
                let path = Path::new(&settings.sendmail_path);
                if !path.is_file() {
                    return Err(MailError::Sendmail(format!("{:?} is not a file", settings.sendmail_path)));
                }
                let timeout = Duration::from_secs(settings.sendmail_timeout.max(1).into());
                Sink::Sendmail(Sendmail { path: path.to_path_buf(), timeout })
            }
            Transport::Spool => {
                let dir = PathBuf::from(&settings.spool_dir);
                if !dir.is_absolute() {
                    return Err(MailError::SpoolDir(settings.spool_dir.clone()));
                }
                Sink::Spool(dir)
            }
            Transport::None => Sink::Off,
        };
        Ok(Mailer { writer, sink })
    }

    /// Sends every job over as few connections as possible and returns exactly one
    /// result per job, in the same order.
    pub fn send_batch(&mut self, jobs: &[MailJob]) -> Vec<MailResult> {
        match &mut self.sink {
            Sink::Smtp(relay) => relay.send_batch(&self.writer, jobs),
            Sink::Sendmail(sendmail) => {
                // After one run overran, the rest wait for a later batch rather than
                // each costing another full timeout on a wedged mail system.
                let mut hung: Option<String> = None;
                jobs.iter()
                    .map(|job| {
                        let outcome = match (&hung, self.writer.compose(job)) {
                            (Some(why), _) => MailOutcome::Retry(one_line(&format!("not tried: {why}"))),
                            (None, Ok(message)) => {
                                match sendmail.send(message.envelope(), &message.formatted()) {
                                    Ok(()) => MailOutcome::Sent,
                                    // Temporary (EX_TEMPFAIL) and permanent failures are not
                                    // told apart; the outbox's try limit bounds the retries.
                                    Err(SendmailError::Failed(e)) => {
                                        MailOutcome::Retry(one_line(&format!("sendmail: {e}")))
                                    }
                                    Err(SendmailError::TimedOut(e)) => {
                                        let why = format!("sendmail: {e}");
                                        hung = Some(why.clone());
                                        MailOutcome::Retry(one_line(&why))
                                    }
                                }
                            }
                            (None, Err(e)) => MailOutcome::Fail(one_line(&e.to_string())),
                        };
                        result(job, outcome)
                    })
                    .collect()
            }
            Sink::Spool(dir) => jobs
                .iter()
                .map(|job| {
                    let outcome = match self.writer.compose(job) {
                        Ok(message) => match spool(dir, &spool_file_name(job), &message.formatted()) {
                            Ok(()) => MailOutcome::Sent,
                            Err(e) => MailOutcome::Retry(one_line(&format!("spool {}: {e}", dir.display()))),
                        },
                        Err(e) => MailOutcome::Fail(one_line(&e.to_string())),
                    };
                    result(job, outcome)
                })
                .collect(),
            // The store never queues mail with transport none; if it did, the jobs are
            // not silently claimed as sent.
            Sink::Off => jobs
                .iter()
                .map(|job| result(job, MailOutcome::Fail("mail_transport is none".into())))
                .collect(),
        }
    }

    /// Replaces [`SMTP_TIMEOUT`] for connects, commands and replies (tests use a short one).
    pub fn set_smtp_timeout(&mut self, timeout: Duration) {
        if let Sink::Smtp(relay) = &mut self.sink {
            relay.timeout = timeout;
            if let Some(conn) = &mut relay.conn {
                let _ = conn.set_timeout(Some(timeout));
            }
        }
    }

    /// Ends an open SMTP connection politely (QUIT, bounded by a short timeout).
    pub fn close(&mut self) {
        if let Sink::Smtp(relay) = &mut self.sink {
            relay.close();
        }
    }
}

impl Drop for Mailer {
    fn drop(&mut self) {
        self.close();
    }
}

impl Relay {
    fn new(settings: &MailSettings) -> Result<Relay, MailError> {
        if settings.smtp_host.is_empty() {
            return Err(MailError::SmtpHost);
        }
        let tls = match settings.smtp_tls {
            SmtpTls::None => RelayTls::Plain,
            SmtpTls::Starttls => RelayTls::Starttls(tls_parameters(settings)?),
            SmtpTls::Tls => RelayTls::Wrapper(tls_parameters(settings)?),
        };
        let credentials = (!settings.smtp_user.is_empty())
            .then(|| Credentials::new(settings.smtp_user.clone(), settings.smtp_password.clone()));
        Ok(Relay {
            host: settings.smtp_host.clone(),
            port: settings.smtp_port,
            tls,
            hello: ClientId::default(),
            credentials,
            timeout: SMTP_TIMEOUT,
            conn: None,
            accepted_on_conn: 0,
        })
    }

    fn send_batch(&mut self, writer: &Writer, jobs: &[MailJob]) -> Vec<MailResult> {
        let mut results = Vec::with_capacity(jobs.len());
        // A connection kept from the last batch may have been closed by the relay since.
        if let Some(conn) = &mut self.conn {
            if !conn.test_connected() {
                self.drop_connection();
            }
        }
        let timeout = self.timeout;
        for (at, job) in jobs.iter().enumerate() {
            let message = match writer.compose(job) {
                Ok(m) => m,
                Err(e) => {
                    results.push(result(job, MailOutcome::Fail(one_line(&e.to_string()))));
                    continue;
                }
            };
            let conn = match self.connection() {
                Ok(conn) => conn,
                Err(e) => {
                    // Nothing to gain from trying the rest one by one, each waiting for
                    // the same dead or refusing relay.
                    let reason =
                        one_line(&format!("{}:{}: {}", self.host, self.port, smtp_reason(&e, self.timeout)));
                    results.extend(jobs[at..].iter().map(|j| result(j, MailOutcome::Retry(reason.clone()))));
                    return results;
                }
            };
            match transact(conn, message.envelope(), &message.formatted()) {
                Ok(()) => {
                    self.accepted_on_conn += 1;
                    results.push(result(job, MailOutcome::Sent));
                }
                Err(e) => {
                    let reply = e.status().map(|code| code.to_string().parse::<u16>().unwrap_or(0));
                    let reason = smtp_reason(&e, timeout);
                    results.push(result(job, outcome_for(reply, reason.clone())));
                    if session_lost(reply) {
                        let progressed = self.accepted_on_conn > 0;
                        self.drop_connection();
                        if !progressed {
                            let reason = one_line(&format!("not tried: {reason}"));
                            results.extend(
                                jobs[at + 1..].iter().map(|j| result(j, MailOutcome::Retry(reason.clone()))),
                            );
                            return results;
                        }
                    } else if conn.command(Rset).is_err() {
                        self.drop_connection();
                    }
                }
            }
        }
        results
    }

    /// The open connection, or a new one (connect, STARTTLS, AUTH).
    fn connection(&mut self) -> Result<&mut SmtpConnection, lettre::transport::smtp::Error> {
        if self.conn.is_none() {
            let wrapper = match &self.tls {
                RelayTls::Wrapper(params) => Some(params),
                RelayTls::Plain | RelayTls::Starttls(_) => None,
            };
            let mut conn = SmtpConnection::connect(
                (self.host.as_str(), self.port),
                Some(self.timeout),
                &self.hello,
                wrapper,
                None,
            )?;
            if let RelayTls::Starttls(params) = &self.tls {
                conn.starttls(params, &self.hello)?;
            }
            if let Some(credentials) = &self.credentials {
                conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)?;
            }
            self.accepted_on_conn = 0;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connection just set"))
    }

    /// Forgets a connection that failed. No QUIT (lettre's `abort` sends one): on a relay
    /// that stopped answering it would wait out another full timeout.
    fn drop_connection(&mut self) {
        self.conn = None; // closes the socket
        self.accepted_on_conn = 0;
    }

    fn close(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            // A hung relay must not hold up the mailer's exit for the full timeout.
            let _ = conn.set_timeout(Some(Duration::from_secs(2)));
            let _ = conn.command(Quit);
        }
    }
}

/// Why a sendmail run did not take an email.
enum SendmailError {
    /// It could not run, or exited with a failure.
    Failed(String),
    /// It ran past `sendmail_timeout` and was killed.
    TimedOut(String),
}

/// The local sendmail program, run once per email and killed when it overruns.
struct Sendmail {
    path: PathBuf,
    timeout: Duration,
}

impl Sendmail {
    /// Runs `sendmail -i -f FROM -- TO...` with `email` on its standard input. A run
    /// that takes longer than `timeout` is killed with its process group (a script's
    /// own children too), so a hung sendmail cannot wedge the mailer.
    fn send(&self, envelope: &Envelope, email: &[u8]) -> Result<(), SendmailError> {
        use SendmailError::Failed;
        let mut command = Command::new(&self.path);
        command.arg("-i");
        if let Some(from) = envelope.from() {
            command.arg("-f").arg(from);
        }
        command.arg("--").args(envelope.to());
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| Failed(format!("cannot run {}: {e}", self.path.display())))?;
        let pid = child.id() as i32;
        let (stdin, stderr) = (child.stdin.take(), child.stderr.take());
        // Writing, reading and waiting each block on the program; threads let one
        // deadline bound all three.
        let email = email.to_vec();
        let writer = std::thread::spawn(move || stdin.map(|mut i| i.write_all(&email)));
        let (said_tx, said_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut said = Vec::new();
            if let Some(e) = stderr {
                let _ = e.take(4096).read_to_end(&mut said);
            }
            let _ = said_tx.send(said);
        });
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = done_tx.send(child.wait());
        });
        let status = match done_rx.recv_timeout(self.timeout) {
            Ok(status) => status.map_err(|e| Failed(format!("wait: {e}")))?,
            Err(_) => {
                // The process group this run created: its leader has not been reaped yet
                // (the waiting thread holds it), so the id is still ours.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = done_rx.recv();
                return Err(SendmailError::TimedOut(format!(
                    "no exit within {} s; killed",
                    self.timeout.as_secs()
                )));
            }
        };
        let wrote = writer.join().ok().flatten();
        // A program that exited may leave children holding stderr: do not wait on them.
        let said = said_rx.recv_timeout(Duration::from_secs(1)).unwrap_or_default();
        if status.success() {
            return match wrote {
                Some(Err(e)) => Err(Failed(format!("it exited before taking the whole message: {e}"))),
                _ => Ok(()),
            };
        }
        let said = String::from_utf8_lossy(&said);
        Err(Failed(format!("{status}: {}", said.trim())))
    }
}

/// One mail transaction on an open connection. Unlike lettre's `SmtpConnection::send`, a
/// refused sender or recipient leaves the connection usable (the caller sends RSET),
/// so one bad address does not cost a reconnection.
fn transact(
    conn: &mut SmtpConnection,
    envelope: &Envelope,
    email: &[u8],
) -> Result<(), lettre::transport::smtp::Error> {
    let mut params = Vec::new();
    // Bodies are 7bit, quoted-printable or base64, so this is for a non-ASCII mail_from
    // display name only, which lettre encodes anyway; kept for safety.
    if !email.is_ascii() && conn.server_info().supports_feature(Extension::EightBitMime) {
        params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    conn.command(Mail::new(envelope.from().cloned(), params))?;
    for to in envelope.to() {
        conn.command(Rcpt::new(to.clone(), Vec::new()))?;
    }
    conn.command(Data)?;
    // One write for the content and its final dot. lettre's `message` writes the dot
    // separately, and that small second write waits under Nagle's algorithm for the
    // relay's delayed ACK: about 40 ms per email, 25 emails a second at best.
    conn.command(DataContent(dot_stuffed(email)))?;
    Ok(())
}

/// The content of a DATA command, ready for the wire.
struct DataContent(String);

impl fmt::Display for DataContent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `email` with a dot doubled at the start of each line and the final `.` line added
/// (RFC 5321 4.5.2). lettre's messages are CRLF-terminated ASCII.
fn dot_stuffed(email: &[u8]) -> String {
    let text = String::from_utf8_lossy(email);
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.split_inclusive("\r\n") {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
    }
    if !out.is_empty() && !out.ends_with("\r\n") {
        out.push_str("\r\n");
    }
    out.push_str(".\r\n");
    out
}

fn tls_parameters(settings: &MailSettings) -> Result<TlsParameters, MailError> {
    let mut builder = TlsParameters::builder(settings.smtp_host.clone());
    if let Some(pem) = &settings.smtp_ca_pem {
        // lettre's rustls backend accepts a PEM with no certificate in it; refuse that
        // here rather than fail every TLS handshake later.
        if !String::from_utf8_lossy(pem).contains("-----BEGIN CERTIFICATE-----") {
            return Err(MailError::CaCert("no PEM certificate in it".into()));
        }
        let cert = Certificate::from_pem(pem).map_err(|e| MailError::CaCert(e.to_string()))?;
        builder = builder.add_root_certificate(cert);
    }
    builder.build().map_err(|e| MailError::Tls(e.to_string()))
}

fn parse_from(from: &str) -> Result<Mailbox, MailError> {
    let mailbox: Mailbox =
        from.parse().map_err(|e: lettre::address::AddressError| MailError::From(e.to_string()))?;
    if !mailbox.email.to_string().is_ascii() {
        return Err(MailError::From(format!("{from:?} is not ASCII")));
    }
    Ok(mailbox)
}

fn result(job: &MailJob, outcome: MailOutcome) -> MailResult {
    MailResult { id: job.id, email: job.email.clone(), outcome }
}

// --- outcomes --------------------------------------------------------------------------

/// What an SMTP failure means for the job: `reply` is the relay's reply code, `None` when
/// there was no reply (refused, timed out, TLS, connection dropped).
fn outcome_for(reply: Option<u16>, reason: String) -> MailOutcome {
    match reply {
        // Replies about our session rather than this message: "authentication
        // required", "credentials invalid", "encryption required". Fixing the settings
        // fixes them, so the email is kept.
        Some(530 | 534 | 535 | 538) => MailOutcome::Retry(reason),
        Some(500..=599) => MailOutcome::Fail(reason),
        Some(_) | None => MailOutcome::Retry(reason),
    }
}

/// Whether the connection is unusable after this failure: no reply at all, or 421 (the
/// relay is closing the channel).
fn session_lost(reply: Option<u16>) -> bool {
    matches!(reply, None | Some(421))
}

/// `550 5.1.1 no such user` when the relay replied, else lettre's description.
fn smtp_reason(e: &lettre::transport::smtp::Error, timeout: Duration) -> String {
    let text = match (e.status(), std::error::Error::source(e)) {
        (Some(code), Some(message)) => format!("{code} {message}"),
        (Some(code), None) => code.to_string(),
        // A read timeout (SO_RCVTIMEO) shows as EAGAIN, "Resource temporarily
        // unavailable", which would puzzle whoever reads the log.
        (None, _) if e.is_timeout() || io_kind(e) == Some(std::io::ErrorKind::WouldBlock) => {
            format!("no answer within {} s", timeout.as_secs_f32())
        }
        (None, _) => e.to_string(),
    };
    one_line(&text)
}

/// The kind of the I/O error under `e`, if there is one.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut source = e.source();
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = err.source();
    }
    None
}

/// `s` on one line (control characters become spaces, runs of spaces shrink to one),
/// at most [`MAX_REASON`] bytes.
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_REASON));
    for c in s.chars().map(|c| if c.is_control() { ' ' } else { c }) {
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        if out.len() + c.len_utf8() > MAX_REASON {
            break;
        }
        out.push(c);
    }
    out.truncate(out.trim_end().len());
    out
}

// --- the message -----------------------------------------------------------------------

/// The email for `job` as a mailer with `settings` writes it.
pub fn build_message(settings: &MailSettings, job: &MailJob) -> Result<Message, MailError> {
    Writer::new(settings)?.compose(job)
}

/// FNV-1a, 64 bits: stable across Rust releases and platforms, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

// --- the spool -------------------------------------------------------------------------

/// `<id>-<address>.eml`, or `confirm-<n>-<address>.eml` for a confirmation email, with every byte of the address outside `[A-Za-z0-9._@+-]`
/// written `%XX`: distinct addresses never share a file, no address leaves the folder,
/// and no shell metacharacter (`` ` $ | & * ? ``, spaces, quotes) reaches a script that
/// lists the spool. An address that would make the name too long for a file system is
/// cut and followed by a hash of the whole address.
pub fn spool_file_name(job: &MailJob) -> String {
    let mut escaped = String::with_capacity(job.email.len());
    for &b in job.email.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'+' | b'-') {
            escaped.push(char::from(b));
        } else {
            escaped.push_str(&format!("%{b:02X}"));
        }
    }
    // 255 bytes is the usual limit; ".<name>.tmp" must fit too.
    const MAX_ESCAPED: usize = 200;
    if escaped.len() > MAX_ESCAPED {
        let mut cut = MAX_ESCAPED - 18;
        while !escaped.is_char_boundary(cut) {
            cut -= 1;
        }
        escaped.truncate(cut);
        escaped.push_str(&format!("~{:016x}", fnv1a(job.email.as_bytes())));
    }
    if job.id & CONFIRMATION_IDS != 0 {
        format!("confirm-{}-{escaped}.eml", job.id & !CONFIRMATION_IDS)
    } else {
        format!("{}-{escaped}.eml", job.id)
    }
}

/// Writes `bytes` to `dir/name` so that no reader ever sees a partial file: a temporary
/// name, fsync, rename over any earlier try, fsync of the folder.
fn spool(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut file =
            fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o640).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, dir.join(name))?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::message::message_id;
    use super::*;
    use crate::ipc::{AskedPair, MailKind};

    /// Spool settings from `from`, with no public_url.
    fn settings(from: &str) -> MailSettings {
        MailSettings {
            transport: Transport::Spool,
            from: from.into(),
            smtp_host: "localhost".into(),
            smtp_port: 25,
            smtp_tls: SmtpTls::None,
            smtp_user: String::new(),
            smtp_password: String::new(),
            smtp_ca_pem: None,
            sendmail_path: "/usr/sbin/sendmail".into(),
            spool_dir: "/var/spool/notifd".into(),
            sendmail_timeout: 60,
            public_url: String::new(),
            server: "notify.example.org:7600".into(),
        }
    }

    fn job(text: &str) -> MailJob {
        MailJob {
            id: 42,
            email: "alice@example.org".into(),
            event: "deploy.prod".into(),
            text: text.into(),
            created_at: 1_700_000_000,
            tries: 0,
            kind: MailKind::Notification { unsub_code: "7KQ2-M4XH-9TZB".into(), unsub_token: "TOKEN".into() },
        }
    }

    fn formatted(job: &MailJob) -> String {
        formatted_with("", job)
    }

    /// With `public_url` set to `url`.
    fn formatted_with(url: &str, job: &MailJob) -> String {
        let mut s = settings("notifd <notifd@example.org>");
        s.public_url = url.into();
        String::from_utf8(build_message(&s, job).unwrap().formatted()).unwrap()
    }

    fn confirmation() -> MailJob {
        MailJob {
            id: CONFIRMATION_IDS | 9,
            email: "bo@example.net".into(),
            event: String::new(),
            text: String::new(),
            created_at: 1_700_000_000,
            tries: 0,
            kind: MailKind::Confirmation {
                events: vec![
                    AskedPair {
                        event: "orders.shipped".into(),
                        asked_by: "192.0.2.7".into(),
                        asked_at: 1_699_999_990,
                    },
                    AskedPair {
                        event: "orders.paid".into(),
                        asked_by: "2001:db8::1".into(),
                        asked_at: 1_699_999_999,
                    },
                ],
                confirm_code: "7KQ2-M4XH-9TZB".into(),
                optout_code: "AAAA-BBBB-CCCC".into(),
                confirm_token: "CTOKEN".into(),
                optout_token: "OTOKEN".into(),
            },
        }
    }

    fn decoded_body(raw: &str) -> String {
        mailparse::parse_mail(raw.as_bytes()).unwrap().get_body().unwrap().replace("\r\n", "\n")
    }

    /// The header lines, unfolded, and the body.
    fn split(raw: &str) -> (Vec<String>, String) {
        let (head, body) = raw.split_once("\r\n\r\n").expect("a blank line ends the headers");
        let mut headers: Vec<String> = Vec::new();
        for line in head.split("\r\n") {
            if line.starts_with([' ', '\t']) {
                headers.last_mut().unwrap().push_str(line);
            } else {
                headers.push(line.to_string());
            }
        }
        (headers, body.to_string())
    }

    fn header<'a>(headers: &'a [String], name: &str) -> Vec<&'a str> {
        headers
            .iter()
            .filter_map(|h| h.split_once(": ").filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v))
            .collect()
    }

    #[test]
    fn headers_and_body() {
        let raw = formatted(&job("build 1234 is live"));
        let (headers, body) = split(&raw);
        assert_eq!(header(&headers, "From"), ["notifd <notifd@example.org>"]);
        assert_eq!(header(&headers, "To"), ["alice@example.org"]);
        assert_eq!(header(&headers, "Subject"), ["[notifd] deploy.prod"]);
        assert_eq!(header(&headers, "Date"), ["Tue, 14 Nov 2023 22:13:20 +0000"]);
        assert_eq!(header(&headers, "Message-ID"), [message_id(&job(""))]);
        assert_eq!(header(&headers, "Content-Type"), ["text/plain; charset=utf-8"]);
        assert_eq!(header(&headers, "MIME-Version"), ["1.0"]);
        assert_eq!(header(&headers, "Auto-Submitted"), ["auto-generated"]);
        assert_eq!(header(&headers, "List-Id"), ["\"deploy.prod\" <deploy.prod.notifd.example.org>"]);
        // Without public_url: no link, no List-Unsubscribe.
        assert!(header(&headers, "List-Unsubscribe").is_empty());
        assert!(header(&headers, "List-Unsubscribe-Post").is_empty());
        // ASCII with short lines: 7bit, the body as it is.
        assert_eq!(header(&headers, "Content-Transfer-Encoding"), ["7bit"]);
        assert!(body.lines().all(|l| l.len() <= 76), "{body}");
        let want = "build 1234 is live\n\nEvent: deploy.prod\nNotification: 42\n\
                    Published: 2023-11-14T22:13:20Z\n\n\
                    You receive this because alice@example.org\nis subscribed to deploy.prod.\n\
                    To stop it, send this line to the notifd server at\nnotify.example.org:7600:\n\n\
                    UNSUB deploy.prod alice@example.org 7KQ2-M4XH-9TZB\n";
        assert_eq!(body.replace("\r\n", "\n"), want);
        assert_eq!(decoded_body(&raw), want);
    }

    #[test]
    fn an_https_public_url_gets_one_click_unsubscribe() {
        let raw = formatted_with("https://notify.example.org/n", &job("x"));
        let (headers, body) = split(&raw);
        let url = "https://notify.example.org/n/unsubscribe/TOKEN";
        assert_eq!(header(&headers, "List-Unsubscribe"), [format!("<{url}>")]);
        assert_eq!(header(&headers, "List-Unsubscribe-Post"), ["List-Unsubscribe=One-Click"]);
        assert_eq!(header(&headers, "Content-Transfer-Encoding"), ["7bit"]);
        let lines: Vec<&str> = body.split("\r\n").collect();
        assert!(lines.contains(&url), "{body}");
        assert!(lines.contains(&"UNSUB deploy.prod alice@example.org 7KQ2-M4XH-9TZB"), "{body}");
        // http: the link and List-Unsubscribe, but RFC 8058 is for HTTPS only.
        let raw = formatted_with("http://notify.example.org", &job("x"));
        let (headers, body) = split(&raw);
        assert_eq!(header(&headers, "List-Unsubscribe"), ["<http://notify.example.org/unsubscribe/TOKEN>"]);
        assert!(header(&headers, "List-Unsubscribe-Post").is_empty());
        assert!(body.split("\r\n").any(|l| l == "http://notify.example.org/unsubscribe/TOKEN"));
    }

    #[test]
    fn long_reply_lines_stay_whole_and_7bit() {
        // An address and an event at their longest make an UNSUB line of over 300
        // characters, and a long link: still 7bit (under RFC 5322's 998), not broken.
        let mut j = job("x");
        j.email = format!("{}@{}.example.org", "a".repeat(64), "b".repeat(60));
        j.event = "e".repeat(128);
        let raw = formatted_with("https://notify.example.org", &j);
        let (headers, body) = split(&raw);
        assert_eq!(header(&headers, "Content-Transfer-Encoding"), ["7bit"]);
        let line = format!("UNSUB {} {} 7KQ2-M4XH-9TZB", j.event, j.email);
        assert!(body.split("\r\n").any(|l| l == line), "{body}");
        // Non-ASCII text: encoded, and the decoded lines are exact.
        let mut j = job("Grüße");
        j.email = format!("{}@example.org", "a".repeat(64));
        let raw = formatted(&j);
        let line = format!("UNSUB deploy.prod {} 7KQ2-M4XH-9TZB", j.email);
        assert!(decoded_body(&raw).lines().any(|l| l == line));
    }

    #[test]
    fn a_confirmation_email() {
        let raw = formatted_with("https://notify.example.org/", &confirmation());
        let (headers, body) = split(&raw);
        assert_eq!(header(&headers, "To"), ["bo@example.net"]);
        assert_eq!(header(&headers, "Subject"), ["[notifd] Confirm notifications of 2 events"]);
        assert_eq!(header(&headers, "MIME-Version"), ["1.0"]);
        assert_eq!(header(&headers, "Auto-Submitted"), ["auto-generated"]);
        assert_eq!(header(&headers, "Message-ID"), [message_id(&confirmation())]);
        assert!(message_id(&confirmation()).starts_with("<confirm.9."));
        assert!(header(&headers, "List-Unsubscribe").is_empty(), "nobody is subscribed yet");
        assert_eq!(header(&headers, "Content-Transfer-Encoding"), ["7bit"]);
        let body = body.replace("\r\n", "\n");
        let lines: Vec<&str> = body.lines().collect();
        for exact in [
            "CONFIRM bo@example.net 7KQ2-M4XH-9TZB",
            "OPTOUT bo@example.net AAAA-BBBB-CCCC",
            "https://notify.example.org/confirm/CTOKEN",
            "https://notify.example.org/unsubscribe/OTOKEN",
            "  orders.shipped",
            "    asked from 192.0.2.7 at 2023-11-14T22:13:10Z",
            "  orders.paid",
            "    asked from 2001:db8::1 at 2023-11-14T22:13:19Z",
        ] {
            assert!(lines.contains(&exact), "no line {exact:?} in\n{body}");
        }
        assert!(body.contains("notify.example.org:7600"), "{body}");
        assert!(body.contains("ignore this email: that is enough"), "{body}");
        // Without public_url: the lines, no links.
        let raw = formatted(&confirmation());
        assert!(!raw.contains("http"), "{raw}");
        assert!(raw.contains("\r\nCONFIRM bo@example.net 7KQ2-M4XH-9TZB\r\n"));
        assert!(raw.contains("\r\nOPTOUT bo@example.net AAAA-BBBB-CCCC\r\n"));
        assert_eq!(spool_file_name(&confirmation()), "confirm-9-bo@example.net.eml");
    }

    #[test]
    fn message_id_is_stable_and_per_address() {
        let a = job("x");
        let mut retry = job("other text");
        retry.tries = 3;
        assert_eq!(message_id(&a), message_id(&retry));
        assert_eq!(message_id(&a), "<42.fe0b59c46c41d4d1@notifd>");
        let mut b = job("x");
        b.email = "bob@example.org".into();
        assert_ne!(message_id(&a), message_id(&b));
        // A retry (the same job, tried before) builds the same bytes: a spooled retry is
        // identical.
        let mut again = job("x");
        again.tries = 3;
        assert_eq!(formatted(&a), formatted(&again));
    }

    #[test]
    fn non_ascii_text_is_encoded() {
        let raw = formatted(&job("Grüße aus Köln — 東京 ✓"));
        assert!(raw.is_ascii(), "the whole message is 7-bit clean");
        let (headers, _) = split(&raw);
        let cte = header(&headers, "Content-Transfer-Encoding");
        assert!(cte == ["quoted-printable"] || cte == ["base64"], "{cte:?}");
    }

    #[test]
    fn crlf_in_any_field_never_makes_a_header() {
        let evil = "hi\r\nBcc: mallory@evil.example\r\n\r\nX-Injected: 1\nSubject: spoof\rTo: x@y";
        let mut j = job(evil);
        j.event = "ev\r\nBcc: mallory@evil.example".into();
        let raw = formatted(&j);
        let (headers, body) = split(&raw);
        for h in &headers {
            let name = h.split(':').next().unwrap();
            assert!(
                [
                    "From",
                    "To",
                    "Subject",
                    "Date",
                    "Message-ID",
                    "Content-Type",
                    "Content-Transfer-Encoding",
                    "MIME-Version",
                    "Auto-Submitted",
                    "List-Id"
                ]
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name)),
                "unexpected header line {h:?} in\n{raw}"
            );
        }
        assert_eq!(header(&headers, "Subject").len(), 1);
        assert_eq!(header(&headers, "To"), ["alice@example.org"]);
        assert!(body.contains("Bcc: mallory@evil.example"), "the text stays in the body");
        // No bare CR or LF anywhere: every line ends in CRLF.
        assert!(!raw.replace("\r\n", "").contains(['\r', '\n']));
    }

    #[test]
    fn an_address_with_crlf_is_refused() {
        let mut j = job("x");
        j.email = "a@b.org\r\nBcc: c@d.org".into();
        assert!(matches!(build_message(&settings("n@x.org"), &j), Err(MailError::Recipient(_))));
        j.email = "not an address".into();
        assert!(matches!(build_message(&settings("n@x.org"), &j), Err(MailError::Recipient(_))));
    }

    #[test]
    fn bad_from_is_refused() {
        assert!(matches!(build_message(&settings("nobody"), &job("x")), Err(MailError::From(_))));
        assert!(matches!(build_message(&settings("a@b\r\nBcc: c@d"), &job("x")), Err(MailError::From(_))));
    }

    #[test]
    fn negative_time_is_the_epoch() {
        let mut j = job("x");
        j.created_at = -5;
        assert!(formatted(&j).contains("Published: 1970-01-01T00:00:00Z"));
    }

    #[test]
    fn spool_names_escape_everything_but_a_safe_set() {
        let mut j = job("x");
        j.email = "a`b$c|d&e*f?g h'i\"j;k(l)m<n>o\\p~q#r!s{t}u=v,w:x^y%z@Ex-am_ple.org+1".into();
        let name = spool_file_name(&j);
        assert_eq!(
            name,
            "42-a%60b%24c%7Cd%26e%2Af%3Fg%20h%27i%22j%3Bk%28l%29m%3Cn%3Eo%5Cp%7Eq%23r%21s%7Bt%7Du%3Dv\
             %2Cw%3Ax%5Ey%25z@Ex-am_ple.org+1.eml"
        );
        assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._@+-%".contains(&b)));
        j.email = "é@x.org".into();
        assert_eq!(spool_file_name(&j), "42-%C3%A9@x.org.eml");
    }

    #[test]
    fn a_sendmail_that_overruns_is_killed_and_the_rest_of_the_batch_waits() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("sendmail");
        fs::write(&script, "#!/bin/sh\ncat >/dev/null\nexec sleep 60\n").unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let sendmail = Sink::Sendmail(Sendmail { path: script, timeout: Duration::from_secs(1) });
        let writer = Writer::new(&settings("n@example.org")).unwrap();
        let mut mailer = Mailer { writer, sink: sendmail };
        let mut second = job("x");
        second.id = 43;
        let started = std::time::Instant::now();
        let results = mailer.send_batch(&[job("x"), second]);
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        assert!(matches!(&results[0].outcome, MailOutcome::Retry(r) if r.contains("killed")), "{results:?}");
        assert!(
            matches!(&results[1].outcome, MailOutcome::Retry(r) if r.starts_with("not tried")),
            "{results:?}"
        );
    }

    #[test]
    fn spool_names() {
        let mut j = job("x");
        assert_eq!(spool_file_name(&j), "42-alice@example.org.eml");
        j.email = "a/b@c.org".into();
        let slash = spool_file_name(&j);
        assert_eq!(slash, "42-a%2Fb@c.org.eml");
        j.email = "a%2Fb@c.org".into();
        assert_ne!(spool_file_name(&j), slash, "escaping is injective");
        j.email = "../../etc/passwd@x".into();
        assert!(!spool_file_name(&j).contains('/'));
        j.email = format!("{}@example.org", "/".repeat(240));
        let long = spool_file_name(&j);
        assert!(long.len() + ".tmp".len() + 1 < 255, "{}", long.len());
        j.email = format!("{}@example.org", "/".repeat(239));
        assert_ne!(spool_file_name(&j), long);
    }

    #[test]
    fn dots_are_stuffed_and_the_end_is_marked() {
        assert_eq!(dot_stuffed(b"a\r\n.\r\n..b\r\nc.d\r\n"), "a\r\n..\r\n...b\r\nc.d\r\n.\r\n");
        assert_eq!(dot_stuffed(b".x"), "..x\r\n.\r\n");
        assert_eq!(dot_stuffed(b""), ".\r\n");
        // A bare LF is not a line end on the wire, so the dot after it is left alone.
        assert_eq!(dot_stuffed(b"a\n.b\r\n"), "a\n.b\r\n.\r\n");
    }

    #[test]
    fn outcomes() {
        let r = || "why".to_string();
        assert_eq!(outcome_for(Some(550), r()), MailOutcome::Fail(r()));
        assert_eq!(outcome_for(Some(554), r()), MailOutcome::Fail(r()));
        assert_eq!(outcome_for(Some(421), r()), MailOutcome::Retry(r()));
        assert_eq!(outcome_for(Some(451), r()), MailOutcome::Retry(r()));
        assert_eq!(outcome_for(Some(535), r()), MailOutcome::Retry(r()));
        assert_eq!(outcome_for(None, r()), MailOutcome::Retry(r()));
        assert!(session_lost(None));
        assert!(session_lost(Some(421)));
        assert!(!session_lost(Some(450)));
        assert!(!session_lost(Some(550)));
    }

    #[test]
    fn reasons_are_one_short_line() {
        assert_eq!(one_line("550 5.1.1\r\n  no such\tuser "), "550 5.1.1 no such user");
        let long = "é".repeat(300);
        let cut = one_line(&long);
        assert!(cut.len() <= MAX_REASON && cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn settings_are_checked() {
        let mut s = MailSettings {
            transport: Transport::Smtp,
            from: "notifd@localhost".into(),
            smtp_host: "localhost".into(),
            smtp_port: 25,
            smtp_tls: SmtpTls::Starttls,
            smtp_user: String::new(),
            smtp_password: String::new(),
            smtp_ca_pem: Some(b"not a certificate".to_vec()),
            sendmail_path: "/nonexistent/sendmail".into(),
            spool_dir: "relative/spool".into(),
            sendmail_timeout: 60,
            public_url: String::new(),
            server: "notify.example.org:7600".into(),
        };
        assert!(matches!(Mailer::new(&s), Err(MailError::CaCert(_))));
        s.smtp_ca_pem = None;
        assert!(Mailer::new(&s).is_ok());
        s.from = "no at sign".into();
        assert!(matches!(Mailer::new(&s), Err(MailError::From(_))));
        s.from = "notifd@localhost".into();
        s.smtp_host.clear();
        assert!(matches!(Mailer::new(&s), Err(MailError::SmtpHost)));
        s.transport = Transport::Sendmail;
        assert!(matches!(Mailer::new(&s), Err(MailError::Sendmail(_))));
        s.transport = Transport::Spool;
        assert!(matches!(Mailer::new(&s), Err(MailError::SpoolDir(_))));
        s.transport = Transport::None;
        let mut none = Mailer::new(&s).unwrap();
        let got = none.send_batch(&[job("x")]);
        assert_eq!(got[0].outcome, MailOutcome::Fail("mail_transport is none".into()));
    }
}
